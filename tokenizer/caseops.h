// caseops.h — CaseOps, the lossless case transform of the CaseOps tokenizer (PR #1729,
// `lossless_caps_caseops_v1`), and the original-byte count of each token's surface.
//
//   caseops_encode(text, n, &out)           original -> transformed (every byte sequence)
//   caseops_decode(text, n, &out, &err)     transformed -> original; false (err set) outside the image
//   caseops_byte_weights(text, n, &w)       per transformed byte: 1 if it stands for an original byte
//
// Four private-use characters, U+E001..U+E004 (UTF-8 EE 80 81..84), are operators. Over each maximal
// run of ASCII letters (a "word"):
//   lowercase                     unchanged
//   ALLCAPS (2+ letters)          ALLCAPS + lowercase(word)
//   Title (upper, then lowercase) TITLE + lowercase(word)
//   anything else (mixed)         TITLE if the first letter is upper; then each later upper letter
//                                 as CAPNEXT + its lowercase, every letter lowercased
// An operator character in the input is written ESC + itself. Everything else (other bytes, invalid
// UTF-8 included) is copied. Words end at any non-letter byte, operators included. The transform
// works on bytes: on valid UTF-8 it equals the reference's character-level one, because EE 80 8x
// can only occur as the encoding of U+E00x there.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

enum CaseOp { CASEOP_NONE = 0, CASEOP_TITLE = 1, CASEOP_ALLCAPS = 2, CASEOP_CAPNEXT = 3, CASEOP_ESC = 4 };

// The operator at s[0..n) (its 3 bytes), or CASEOP_NONE.
inline int caseops_op_at(const uint8_t* s, size_t n) {
    if (n < 3 || s[0] != 0xEE || s[1] != 0x80 || s[2] < 0x81 || s[2] > 0x84) return CASEOP_NONE;
    return s[2] - 0x80;
}
inline void caseops_put_op(std::string* out, int op) {
    out->push_back((char)0xEE);
    out->push_back((char)0x80);
    out->push_back((char)(0x80 + op));
}
inline bool caseops_upper(uint8_t c) { return c >= 'A' && c <= 'Z'; }
inline bool caseops_lower(uint8_t c) { return c >= 'a' && c <= 'z'; }
inline bool caseops_alpha(uint8_t c) { return caseops_upper(c) || caseops_lower(c); }
inline char caseops_tolower(uint8_t c) { return (char)(caseops_upper(c) ? c + 32 : c); }

inline void caseops_encode(const char* text, size_t n, std::string* out) {
    const uint8_t* s = (const uint8_t*)text;
    out->clear();
    out->reserve(n + n / 8);
    for (size_t i = 0; i < n;) {
        int op = caseops_op_at(s + i, n - i);
        if (op != CASEOP_NONE) {  // a literal operator character
            caseops_put_op(out, CASEOP_ESC);
            caseops_put_op(out, op);
            i += 3;
            continue;
        }
        if (!caseops_alpha(s[i])) {
            out->push_back((char)s[i]);
            i++;
            continue;
        }
        size_t j = i;
        int uppers = 0;
        while (j < n && caseops_alpha(s[j])) uppers += caseops_upper(s[j++]);
        size_t len = j - i;
        bool first_upper = caseops_upper(s[i]);
        if (uppers == 0) {
            out->append(text + i, len);
        } else if (len >= 2 && uppers == (int)len) {
            caseops_put_op(out, CASEOP_ALLCAPS);
            for (size_t k = i; k < j; k++) out->push_back(caseops_tolower(s[k]));
        } else if (first_upper && uppers == 1) {  // Title, a single capital letter included
            caseops_put_op(out, CASEOP_TITLE);
            for (size_t k = i; k < j; k++) out->push_back(caseops_tolower(s[k]));
        } else {  // mixed case
            if (first_upper) caseops_put_op(out, CASEOP_TITLE);
            out->push_back(caseops_tolower(s[i]));
            for (size_t k = i + 1; k < j; k++) {
                if (caseops_upper(s[k])) caseops_put_op(out, CASEOP_CAPNEXT);
                out->push_back(caseops_tolower(s[k]));
            }
        }
        i = j;
    }
}

// Inverse of caseops_encode. Accepts exactly the encoder's outputs: anything else (a dangling or
// misplaced operator, an upper-case ASCII letter, a marker the encoder would not have written) is
// rejected, so encode and decode are inverse bijections between all byte strings and the image.
inline bool caseops_decode(const char* text, size_t n, std::string* out, std::string* err) {
    const uint8_t* s = (const uint8_t*)text;
    out->clear();
    out->reserve(n);
    int mode = CASEOP_NONE;  // TITLE or ALLCAPS waiting for the word's first letter
    bool capnext = false, in_word = false, allcaps = false;
    auto fail = [&](const char* why, size_t at) {
        *err = std::string(why) + " at byte " + std::to_string(at);
        return false;
    };
    for (size_t i = 0; i < n;) {
        int op = caseops_op_at(s + i, n - i);
        if (op == CASEOP_ESC) {
            int lit = caseops_op_at(s + i + 3, n - i - 3);
            if (lit == CASEOP_NONE) return fail("ESC not followed by an operator character", i);
            if (mode != CASEOP_NONE || capnext) return fail("case marker not followed by a letter", i);
            out->append(text + i + 3, 3);
            in_word = allcaps = false;
            i += 6;
            continue;
        }
        if (op == CASEOP_TITLE || op == CASEOP_ALLCAPS) {
            if (mode != CASEOP_NONE || in_word || capnext) return fail("misplaced word case marker", i);
            mode = op;
            i += 3;
            continue;
        }
        if (op == CASEOP_CAPNEXT) {
            if (capnext || !in_word || allcaps) return fail("misplaced CAPNEXT", i);
            capnext = true;
            i += 3;
            continue;
        }
        uint8_t c = s[i];
        if (caseops_upper(c)) return fail("upper-case letter in transformed text", i);
        if (caseops_lower(c)) {
            bool up = capnext || (!in_word && mode != CASEOP_NONE) || allcaps;
            if (!in_word) { allcaps = mode == CASEOP_ALLCAPS; mode = CASEOP_NONE; in_word = true; }
            out->push_back(up ? (char)(c - 32) : (char)c);
            capnext = false;
            i++;
            continue;
        }
        if (mode != CASEOP_NONE || capnext) return fail("case marker not followed by a letter", i);
        out->push_back((char)c);
        in_word = allcaps = false;
        i++;
    }
    if (mode != CASEOP_NONE || capnext) return fail("dangling case marker", n);
    // The grammar above still admits a few non-canonical forms (e.g. TITLE + one letter + CAPNEXT on
    // every other letter for an ALLCAPS word): the encoder's own output is the only accepted one.
    std::string again;
    caseops_encode(out->data(), out->size(), &again);
    if (again.size() != n || memcmp(again.data(), text, n) != 0) {
        size_t k = 0;
        while (k < n && k < again.size() && again[k] == text[k]) k++;
        return fail("not the transform's canonical form", k);
    }
    return true;
}

// Per byte of transformed text: 1 if it stands for one original byte, 0 for operator bytes (the
// case markers and ESC; a literal operator character after ESC counts its 3 bytes). The sum over a
// token's surface is the token's share of the original text: over a document it is the original's
// UTF-8 length.
inline void caseops_byte_weights(const char* text, size_t n, std::vector<uint8_t>* w) {
    const uint8_t* s = (const uint8_t*)text;
    w->assign(n, 1);
    for (size_t i = 0; i < n;) {
        int op = caseops_op_at(s + i, n - i);
        if (op == CASEOP_NONE) { i++; continue; }
        for (int k = 0; k < 3; k++) (*w)[i + k] = 0;
        i += 3;
        if (op == CASEOP_ESC && caseops_op_at(s + i, n - i) != CASEOP_NONE) i += 3;  // the literal keeps weight 1
    }
}
