// spm_encode.h — SentencePiece BPE encoding and decoding, written from SentencePiece's documented
// behaviour; gives the same ids as `spm_encode --output_format=id` (v0.1.97) for the challenge's models.
// Used by the ./tokenize tool and the tests; train_gpt only needs spm_model.h.
//
//   SpmEncoder enc = spm_encoder_build(model);        // once; read-only afterwards
//   SpmScratch scratch;                               // one per thread
//   spm_encode(enc, text, len, &ids, &scratch);       // ids are appended
//   std::string text = spm_decode(model, ids.data(), ids.size());
//
// Pipeline: normalize (charsmap + whitespace rules) -> split into UTF-8 characters -> BPE merges
// (highest-scoring merged piece first, leftmost on ties) -> ids, with unknown characters as one
// <unk> per run, or as their UTF-8 bytes when the model has byte_fallback.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "spm_model.h"

static const char SPM_SPACE[] = "\xE2\x96\x81";  // U+2581 "▁", SentencePiece's visible space
static const char SPM_REPLACEMENT[] = "\xEF\xBF\xBD";  // U+FFFD

// --- UTF-8 -------------------------------------------------------------------------------------

// Length of the valid UTF-8 character at s[0..n), or 0 if the bytes there are not one
// (overlong forms, surrogates D800-DFFF and values past U+10FFFF are invalid).
inline int spm_utf8_valid_len(const uint8_t* s, size_t n) {
    if (n == 0) return 0;
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    auto cont = [&](size_t k) { return k < n && (s[k] & 0xC0) == 0x80; };
    if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        if (!cont(1) || !cont(2)) return 0;
        uint32_t cp = (uint32_t)(c & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F);
        return (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)) ? 0 : 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (!cont(1) || !cont(2) || !cont(3)) return 0;
        uint32_t cp =
            (uint32_t)(c & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 | (uint32_t)(s[2] & 0x3F) << 6 | (s[3] & 0x3F);
        return (cp < 0x10000 || cp > 0x10FFFF) ? 0 : 4;
    }
    return 0;
}

// Character length as SentencePiece splits symbols: from the lead byte alone, cut at the end.
inline size_t spm_char_len(const uint8_t* s, size_t n) {
    static const uint8_t len_by_high_nibble[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    size_t len = len_by_high_nibble[s[0] >> 4];
    return len < n ? len : n;
}

// --- precompiled charsmap: a darts-clone double-array trie over UTF-8 keys -----------------------
// Blob layout: uint32 trie size T, T bytes of 32-bit units, then NUL-terminated replacements.
// Unit fields: has_leaf bit 8; value = low 31 bits; label = low byte plus bit 31 (leaf units carry
// bit 31, so they never match an input byte); offset = bits 10.. shifted by 8 more when bit 9 is set.

struct SpmCharsmap {
    std::vector<uint32_t> units;  // empty: no normalization rules
    std::string pool;             // replacements; std::string keeps a NUL after the last one
};

inline uint32_t darts_offset(uint32_t u) { return (u >> 10) << ((u & 0x200) >> 6); }
inline uint32_t darts_label(uint32_t u) { return u & 0x800000FF; }
inline bool darts_has_leaf(uint32_t u) { return (u >> 8) & 1; }
inline uint32_t darts_value(uint32_t u) { return u & 0x7FFFFFFF; }

inline SpmCharsmap spm_charsmap_parse(const std::string& blob, const std::string& path) {
    SpmCharsmap cm;
    if (blob.empty()) return cm;
    const uint8_t* b = (const uint8_t*)blob.data();
    uint64_t trie_bytes =
        blob.size() >= 4 ? (uint64_t)b[0] | (uint64_t)b[1] << 8 | (uint64_t)b[2] << 16 | (uint64_t)b[3] << 24 : 0;
    if (blob.size() < 4 || trie_bytes > blob.size() - 4 || trie_bytes % 4 != 0 || trie_bytes == 0)
        throw std::runtime_error(
            "spm model " + path + ": precompiled_charsmap of " + std::to_string(blob.size()) +
            " bytes: expected a trie size that is a positive multiple of 4 within the blob, found " +
            std::to_string(trie_bytes));
    cm.units.resize(trie_bytes / 4);
    for (size_t i = 0; i < cm.units.size(); i++) {
        const uint8_t* p = b + 4 + 4 * i;
        cm.units[i] = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    }
    cm.pool = blob.substr(4 + trie_bytes);
    return cm;
}

// Longest key that is a prefix of s[0..n): returns its length in bytes (0: no key) and points
// *repl at its NUL-terminated replacement. Node indices are checked, so a corrupt trie only
// fails to match.
inline size_t spm_charsmap_match(const SpmCharsmap& cm, const uint8_t* s, size_t n, const char** repl,
                                 size_t* repl_len) {
    size_t units = cm.units.size();
    if (units == 0) return 0;
    size_t best = 0;
    size_t node = darts_offset(cm.units[0]);
    for (size_t i = 0; i < n; i++) {
        node ^= s[i];
        if (node >= units) break;
        uint32_t u = cm.units[node];
        if (darts_label(u) != s[i]) break;
        node ^= darts_offset(u);
        if (node >= units) break;
        if (darts_has_leaf(u)) {
            uint32_t v = darts_value(cm.units[node]);
            if (v <= cm.pool.size()) {
                best = i + 1;
                *repl = cm.pool.c_str() + v;
            }
        }
    }
    if (best) *repl_len = strlen(*repl);
    return best;
}

// Every (key, replacement) rule of the trie, depth-first; stops at `limit` rules so a corrupt
// trie cannot make it run away. Used by tests and `tokenize charsmap`.
inline std::vector<std::pair<std::string, std::string>> spm_charsmap_rules(const SpmCharsmap& cm,
                                                                           size_t limit = 10000000) {
    std::vector<std::pair<std::string, std::string>> rules;
    if (cm.units.empty()) return rules;
    std::vector<std::pair<size_t, std::string>> stack = {{darts_offset(cm.units[0]), ""}};
    while (!stack.empty() && rules.size() < limit) {
        auto [base, key] = stack.back();
        stack.pop_back();
        if (key.size() >= 64) continue;  // real keys are at most 4 characters
        for (int c = 255; c >= 1; c--) {
            size_t child = base ^ (size_t)c;
            if (child >= cm.units.size() || darts_label(cm.units[child]) != (uint32_t)c) continue;
            size_t next = child ^ darts_offset(cm.units[child]);
            if (next >= cm.units.size()) continue;
            std::string k = key + (char)c;
            if (darts_has_leaf(cm.units[child])) {
                uint32_t v = darts_value(cm.units[next]);
                if (v <= cm.pool.size()) rules.push_back({k, std::string(cm.pool.c_str() + v)});
            }
            stack.push_back({next, k});
        }
    }
    return rules;
}

// --- normalization ---------------------------------------------------------------------------------

struct SpmNormalizer {
    SpmCharsmap charsmap;
    bool add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces, treat_whitespace_as_suffix;
    std::vector<std::string> user;  // USER_DEFINED pieces, longest first: matched whole, never normalized
};

// Length of the longest USER_DEFINED piece that s[0..n) starts with (0: none).
inline size_t spm_user_match(const std::vector<std::string>& user, const uint8_t* s, size_t n) {
    for (const std::string& p : user)
        if (p.size() <= n && memcmp(p.data(), s, p.size()) == 0) return p.size();
    return 0;
}

inline SpmNormalizer spm_normalizer_build(const SpmNormalizerSpec& spec, bool treat_whitespace_as_suffix,
                                          const std::string& path) {
    SpmNormalizer n;
    n.charsmap = spm_charsmap_parse(spec.precompiled_charsmap, path);
    n.add_dummy_prefix = spec.add_dummy_prefix;
    n.remove_extra_whitespaces = spec.remove_extra_whitespaces;
    n.escape_whitespaces = spec.escape_whitespaces;
    n.treat_whitespace_as_suffix = treat_whitespace_as_suffix;
    return n;
}

// One normalization unit at s[0..n): a USER_DEFINED piece, else the longest charsmap key, else one
// valid UTF-8 character unchanged, else one invalid byte that becomes U+FFFD. Returns the bytes consumed.
inline size_t spm_next_unit(const SpmNormalizer& nm, const uint8_t* s, size_t n, const char** repl, size_t* repl_len) {
    size_t user = nm.user.empty() ? 0 : spm_user_match(nm.user, s, n);
    if (user) { *repl = (const char*)s; *repl_len = user; return user; }  // a user-defined piece, as written
    size_t len = spm_charsmap_match(nm.charsmap, s, n, repl, repl_len);
    if (len) return len;
    int clen = spm_utf8_valid_len(s, n);
    if (clen) { *repl = (const char*)s; *repl_len = (size_t)clen; return (size_t)clen; }
    *repl = SPM_REPLACEMENT; *repl_len = 3;
    return 1;
}

// Normalized text as the BPE sees it: charsmap applied, leading and trailing
// whitespace dropped, whitespace runs collapsed to one, spaces written as "▁". With `orig`, each
// output byte also gets the input offset of the unit that produced it (SentencePiece's norm_to_orig).
inline void spm_normalize(const SpmNormalizer& nm, const char* text, size_t n, std::string* out,
                          std::vector<uint32_t>* orig = nullptr) {
    out->clear();
    if (orig) orig->clear();
    const uint8_t* s = (const uint8_t*)text;
    const char* space = nm.escape_whitespaces ? SPM_SPACE : " ";
    size_t space_len = strlen(space);
    const char* r; size_t rlen;
    size_t i = 0;
    if (nm.remove_extra_whitespaces) {
        while (i < n) {
            size_t used = spm_next_unit(nm, s + i, n - i, &r, &rlen);
            if (!(rlen == 1 && r[0] == ' ')) break;
            i += used;
        }
    }
    if (i == n) return;  // nothing but whitespace: no tokens
    if (nm.add_dummy_prefix && !nm.treat_whitespace_as_suffix) out->append(space, space_len);
    bool prev_space = nm.remove_extra_whitespaces;
    if (orig) orig->assign(out->size(), (uint32_t)i);
    while (i < n) {
        size_t unit = i;
        i += spm_next_unit(nm, s + i, n - i, &r, &rlen);
        if (nm.remove_extra_whitespaces && prev_space)
            while (rlen > 0 && r[0] == ' ') { r++; rlen--; }
        if (rlen == 0) continue;  // deleted character: prev_space unchanged
        for (size_t k = 0; k < rlen; k++) {
            if (r[k] == ' ') out->append(space, space_len);
            else out->push_back(r[k]);
        }
        if (orig) orig->resize(out->size(), (uint32_t)unit);
        prev_space = r[rlen - 1] == ' ';
    }
    if (nm.remove_extra_whitespaces)
        while (out->size() >= space_len && out->compare(out->size() - space_len, space_len, space) == 0)
            out->resize(out->size() - space_len);
    if (nm.add_dummy_prefix && nm.treat_whitespace_as_suffix) out->append(space, space_len);
    if (orig) orig->resize(out->size(), (uint32_t)n);
}

// --- BPE -------------------------------------------------------------------------------------------
// Symbols carry a small integer code: the piece id for characters/pieces that can take part in a
// merge (NORMAL, USER_DEFINED, UNUSED), a number past the vocabulary for characters that occur
// inside pieces without being pieces, and -1 for characters that can never merge. A merge is
// then one hash look-up of (left code, right code).

struct SpmHash {  // open addressing, uint64 key -> int >= 0
    std::vector<uint64_t> keys;
    std::vector<int32_t> vals;  // -1 = empty slot
    size_t mask = 0;
};

inline size_t spm_hash_slot(uint64_t key, size_t mask) { return (size_t)((key * 0x9E3779B97F4A7C15ull) >> 29) & mask; }

inline void spm_hash_init(SpmHash& h, size_t expected) {
    size_t cap = 16;
    while (cap < 2 * expected) cap *= 2;
    h.keys.assign(cap, 0); h.vals.assign(cap, -1); h.mask = cap - 1;
}

inline void spm_hash_put(SpmHash& h, uint64_t key, int val) {
    size_t i = spm_hash_slot(key, h.mask);
    while (h.vals[i] >= 0 && h.keys[i] != key) i = (i + 1) & h.mask;
    h.keys[i] = key; h.vals[i] = val;
}

inline int spm_hash_get(const SpmHash& h, uint64_t key) {
    for (size_t i = spm_hash_slot(key, h.mask);; i = (i + 1) & h.mask) {
        if (h.vals[i] < 0) return -1;
        if (h.keys[i] == key) return h.vals[i];
    }
}

inline uint64_t spm_char_key(const uint8_t* s, size_t len) {  // one character (1-4 bytes) -> unique key
    uint64_t k = len;
    for (size_t i = 0; i < len; i++) k = k << 8 | s[i];
    return k;
}

inline uint64_t spm_pair_key(int left, int right) { return (uint64_t)(uint32_t)left << 32 | (uint32_t)right; }

struct SpmEncoder {
    SpmNormalizer normalizer;
    std::string path;
    int n_pieces = 0, unk_id = 0;
    bool byte_fallback = false;
    int byte_ids[256];                    // byte value -> BYTE piece id (byte fallback)
    std::vector<float> scores;
    int ascii_code[128];                  // code of each 1-byte character
    SpmHash char_codes;                   // code of longer characters
    SpmHash merges;                       // (left code, right code) -> merged piece id
    std::unordered_map<std::string, int> piece_ids;  // every piece, for unknown-looking symbols
    // When no mergeable piece has a space symbol after its first character, no merge can cross the
    // start of a word, so each word is encoded alone (and its result can be cached).
    bool split_words = false;
    std::string space;                    // "▁", or " " without escape_whitespaces
};

// USER_DEFINED pieces (CaseOps' operators) are symbols of their own that never merge (SentencePiece
// freezes them); the BPE finds their ids by name.
inline bool spm_mergeable(int type) { return type == SPM_NORMAL || type == SPM_UNUSED; }

inline SpmEncoder spm_encoder_build(const SpmModel& m) {
    if (m.model_type != SPM_BPE)
        throw std::runtime_error("spm model " + m.path + ": expected model_type BPE (2), found " +
                                 std::to_string(m.model_type));
    for (size_t i = 0; i < m.pieces.size(); i++) {
        // UNUSED pieces would be split back after the BPE; the challenge's models have none, so they
        // are refused, not guessed at.
        if (m.types[i] == SPM_UNUSED)
            throw std::runtime_error("spm model " + m.path + ": piece " + std::to_string(i) +
                                     " is UNUSED, which this encoder does not support");
    }
    if (m.has_denormalizer)
        throw std::runtime_error("spm model " + m.path +
                                 ": has a denormalizer_spec, which this encoder does not support");
    SpmEncoder e;
    e.path = m.path;
    e.normalizer = spm_normalizer_build(m.normalizer, m.treat_whitespace_as_suffix, m.path);
    for (size_t i = 0; i < m.pieces.size(); i++)
        if (m.types[i] == SPM_USER_DEFINED && !m.pieces[i].empty()) e.normalizer.user.push_back(m.pieces[i]);
    std::stable_sort(e.normalizer.user.begin(), e.normalizer.user.end(),
                     [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
    e.n_pieces = (int)m.pieces.size();
    e.unk_id = m.unk_id;
    e.byte_fallback = m.byte_fallback;
    e.scores = m.scores;
    e.space = m.normalizer.escape_whitespaces ? SPM_SPACE : " ";
    for (int b = 0; b < 256; b++) e.byte_ids[b] = e.unk_id;
    for (int i = 0; i < e.n_pieces; i++) {
        e.piece_ids[m.pieces[i]] = i;
        if (m.types[i] == SPM_BYTE) e.byte_ids[spm_byte_piece_value(m.pieces[i])] = i;
    }
    // character codes: mergeable single-character pieces first, then characters inside pieces
    std::unordered_map<uint64_t, int> codes;
    for (int i = 0; i < e.n_pieces; i++) {
        const std::string& p = m.pieces[i];
        const uint8_t* s = (const uint8_t*)p.data();
        if (spm_mergeable(m.types[i]) && spm_char_len(s, p.size()) == p.size()) codes[spm_char_key(s, p.size())] = i;
    }
    int next_code = e.n_pieces;
    for (int i = 0; i < e.n_pieces; i++) {
        if (!spm_mergeable(m.types[i])) continue;
        const std::string& p = m.pieces[i];
        const uint8_t* s = (const uint8_t*)p.data();
        for (size_t k = 0; k < p.size(); k += spm_char_len(s + k, p.size() - k)) {
            uint64_t key = spm_char_key(s + k, spm_char_len(s + k, p.size() - k));
            if (!codes.count(key)) codes[key] = next_code++;
        }
    }
    for (int c = 0; c < 128; c++) e.ascii_code[c] = -1;
    spm_hash_init(e.char_codes, codes.size());
    for (auto& kv : codes) {
        bool ascii = kv.first >> 8 == 1 && (kv.first & 0xFF) < 0x80;  // a 1-byte key is (1 << 8) | byte
        if (ascii) e.ascii_code[kv.first & 0x7F] = kv.second;
        else spm_hash_put(e.char_codes, kv.first, kv.second);
    }
    // merges: every split of a mergeable piece into two symbols that could exist
    auto code_of = [&](const std::string& s) -> int {
        auto it = e.piece_ids.find(s);
        if (it != e.piece_ids.end() && spm_mergeable(m.types[it->second])) return it->second;
        const uint8_t* b = (const uint8_t*)s.data();
        if (spm_char_len(b, s.size()) != s.size()) return -1;  // not a piece, not one character: never a symbol
        auto c = codes.find(spm_char_key(b, s.size()));
        return c == codes.end() ? -1 : c->second;
    };
    std::vector<std::pair<uint64_t, int>> pairs;
    e.split_words = true;
    for (int i = 0; i < e.n_pieces; i++) {
        if (!spm_mergeable(m.types[i])) continue;
        const std::string& p = m.pieces[i];
        if (p.find(e.space, 1) != std::string::npos) e.split_words = false;
        const uint8_t* s = (const uint8_t*)p.data();
        for (size_t k = spm_char_len(s, p.size()); k < p.size(); k += spm_char_len(s + k, p.size() - k)) {
            int l = code_of(p.substr(0, k)), r = code_of(p.substr(k));
            if (l >= 0 && r >= 0) pairs.push_back({spm_pair_key(l, r), i});
        }
    }
    spm_hash_init(e.merges, pairs.size());
    for (auto& pr : pairs) spm_hash_put(e.merges, pr.first, pr.second);
    return e;
}

struct SpmSymbol { int begin, len, code, prev, next; };
struct SpmCandidate { float score; int left, right, len, piece; };

// Priority: higher merged-piece score first; on equal scores the leftmost pair.
inline bool spm_candidate_less(const SpmCandidate& a, const SpmCandidate& b) {
    if (a.score != b.score) return a.score < b.score;
    return a.left > b.left;
}

struct SpmScratch {
    std::string normalized;
    std::vector<SpmSymbol> symbols;
    std::vector<SpmCandidate> heap;
    std::unordered_map<std::string, std::vector<int>> word_cache;  // word -> ids (split_words only)
    std::vector<uint32_t> orig, begins;  // spans only: input offset per normalized byte, normalized begin per id
};

inline void spm_push_candidate(const SpmEncoder& e, SpmScratch& sc, int left, int right) {
    if (left < 0 || right < 0) return;
    const SpmSymbol& a = sc.symbols[left];
    const SpmSymbol& b = sc.symbols[right];
    if (a.code < 0 || b.code < 0) return;
    int piece = spm_hash_get(e.merges, spm_pair_key(a.code, b.code));
    if (piece < 0) return;
    sc.heap.push_back({e.scores[piece], left, right, a.len + b.len, piece});
    std::push_heap(sc.heap.begin(), sc.heap.end(), spm_candidate_less);
}

// BPE over text[0..n) (already normalized); appends ids, unknown symbols as unk_id or bytes. With
// `begins`, each id also gets base + the offset of its first byte in text.
inline void spm_bpe(const SpmEncoder& e, const char* text, size_t n, std::vector<int>* ids, SpmScratch& sc,
                    std::vector<uint32_t>* begins = nullptr, uint32_t base = 0) {
    const uint8_t* s = (const uint8_t*)text;
    if (n > (size_t)INT32_MAX)
        throw std::runtime_error("encode: a word of " + std::to_string(n) + " bytes is over the 2 GiB limit");
    sc.symbols.clear();
    sc.heap.clear();
    const std::vector<std::string>& user = e.normalizer.user;
    for (size_t i = 0; i < n;) {
        int len = (int)spm_char_len(s + i, n - i);
        int code = s[i] < 0x80 ? e.ascii_code[s[i]] : spm_hash_get(e.char_codes, spm_char_key(s + i, len));
        int ulen = user.empty() ? 0 : (int)spm_user_match(user, s + i, n - i);
        if (ulen) { len = ulen; code = -1; }  // frozen: found by name below
        int k = (int)sc.symbols.size();
        sc.symbols.push_back({(int)i, len, code, k - 1, k + 1});
        i += len;
    }
    if (sc.symbols.empty()) return;
    sc.symbols.back().next = -1;
    for (int k = 0; k + 1 < (int)sc.symbols.size(); k++) spm_push_candidate(e, sc, k, k + 1);
    while (!sc.heap.empty()) {
        std::pop_heap(sc.heap.begin(), sc.heap.end(), spm_candidate_less);
        SpmCandidate c = sc.heap.back();
        sc.heap.pop_back();
        SpmSymbol& a = sc.symbols[c.left];
        SpmSymbol& b = sc.symbols[c.right];
        // stale entry: one side was absorbed or grew since it was queued
        if (a.len == 0 || b.len == 0 || a.len + b.len != c.len) continue;
        a.len += b.len;
        a.code = c.piece;
        a.next = b.next;
        b.len = 0;
        if (a.next >= 0) sc.symbols[a.next].prev = c.left;
        spm_push_candidate(e, sc, a.prev, c.left);
        spm_push_candidate(e, sc, c.left, a.next);
    }
    for (int k = 0; k >= 0; k = sc.symbols[k].next) {
        const SpmSymbol& sym = sc.symbols[k];
        int id = sym.code;
        if (id < 0 || id >= e.n_pieces) {  // not a mergeable piece: a control/byte piece name or unknown
            auto it = e.piece_ids.find(std::string(text + sym.begin, sym.len));
            id = it == e.piece_ids.end() ? e.unk_id : it->second;
        }
        if (id == e.unk_id && e.byte_fallback) {
            for (int b = 0; b < sym.len; b++) ids->push_back(e.byte_ids[s[sym.begin + b]]);
            if (begins) begins->resize(ids->size(), base + (uint32_t)sym.begin);
            continue;
        }
        ids->push_back(id);
        if (begins) begins->push_back(base + (uint32_t)sym.begin);
    }
}

// Encodes one document (raw UTF-8, any bytes) and appends its ids. With `spans`, each id also gets
// the input offset where its surface begins: token k's surface is text[spans[k], spans[k+1]) (the
// last one's ends at n), SentencePiece's surfaces, except that the first token's starts at 0, so
// that leading whitespace the normalizer drops is charged too and the surfaces tile the input.
inline void spm_encode(const SpmEncoder& e, const char* text, size_t n, std::vector<int>* ids, SpmScratch* scratch,
                       std::vector<uint32_t>* spans = nullptr) {
    SpmScratch& sc = *scratch;
    if (spans && n > UINT32_MAX) throw std::runtime_error("encode: a document over 4 GiB cannot carry byte spans");
    spm_normalize(e.normalizer, text, n, &sc.normalized, spans ? &sc.orig : nullptr);
    const std::string& t = sc.normalized;
    size_t first = ids->size();
    std::vector<uint32_t>* begins = spans ? &sc.begins : nullptr;
    if (begins) begins->clear();
    if (!e.split_words) {
        spm_bpe(e, t.data(), t.size(), ids, sc, begins);
    } else if (begins) {  // the word cache holds no offsets
        for (size_t begin = 0; begin < t.size();) {
            size_t end = t.find(e.space, begin + 1);
            if (end == std::string::npos) end = t.size();
            spm_bpe(e, t.data() + begin, end - begin, ids, sc, begins, (uint32_t)begin);
            begin = end;
        }
    } else {
        if (sc.word_cache.size() > 200000) sc.word_cache.clear();  // bounded memory on huge corpora
        std::string word;
        for (size_t begin = 0; begin < t.size();) {
            size_t end = t.find(e.space, begin + 1);
            if (end == std::string::npos) end = t.size();
            word.assign(t, begin, end - begin);
            auto it = sc.word_cache.find(word);
            if (it == sc.word_cache.end()) {
                std::vector<int> w;
                spm_bpe(e, word.data(), word.size(), &w, sc);
                it = sc.word_cache.emplace(word, std::move(w)).first;
            }
            ids->insert(ids->end(), it->second.begin(), it->second.end());
            begin = end;
        }
    }
    // SentencePiece merges a run of unknown symbols into one <unk> (only reachable without byte
    // fallback, where unknown characters stay <unk>).
    size_t w = first;
    for (size_t r = first; r < ids->size(); r++) {
        int id = (*ids)[r];
        if (id == e.unk_id && w > first && (*ids)[w - 1] == e.unk_id) continue;
        if (begins) (*begins)[w - first] = (*begins)[r - first];
        (*ids)[w++] = id;
    }
    ids->resize(w);
    if (!spans) return;
    for (size_t k = 0; k < w - first; k++) spans->push_back(k == 0 ? 0 : sc.orig[(*begins)[k]]);
}

// --- decode ----------------------------------------------------------------------------------------
// Decode: CONTROL -> nothing; UNKNOWN -> unk_surface; a run of BYTE pieces -> its bytes,
// character by character, each invalid byte as U+FFFD; other pieces with "▁" -> " ", except that
// while the output is still empty one leading "▁" is dropped. (That is the rule for the challenge's
// models. With remove_extra_whitespaces off, SentencePiece drops only the first such "▁", and only
// if add_dummy_prefix is on.)

inline std::string spm_decode(const SpmModel& m, const int* ids, size_t n) {
    std::string out, bytes;
    const bool strip_bos_space = m.normalizer.add_dummy_prefix || m.normalizer.remove_extra_whitespaces;
    bool bos_space_seen = false;
    auto flush_bytes = [&]() {
        const uint8_t* b = (const uint8_t*)bytes.data();
        for (size_t i = 0; i < bytes.size();) {
            int len = spm_utf8_valid_len(b + i, bytes.size() - i);
            if (len) { out.append(bytes, i, len); i += len; }
            else { out += SPM_REPLACEMENT; i++; }
        }
        bytes.clear();
    };
    for (size_t i = 0; i < n; i++) {
        int id = ids[i];
        if (id < 0 || id >= (int)m.pieces.size())
            throw std::runtime_error("decode: id " + std::to_string(id) + " at position " + std::to_string(i) +
                                     " is outside the vocabulary of " + std::to_string(m.pieces.size()));
        int type = m.types[id];
        if (type == SPM_BYTE) { bytes.push_back((char)spm_byte_piece_value(m.pieces[id])); continue; }
        flush_bytes();
        if (type == SPM_CONTROL) continue;
        if (type == SPM_UNKNOWN) { out += m.unk_surface; continue; }
        const std::string& p = m.pieces[id];
        size_t k = 0;
        if (strip_bos_space && !bos_space_seen && out.empty() && p.compare(0, 3, SPM_SPACE) == 0) {
            k = 3;
            bos_space_seen = !m.normalizer.remove_extra_whitespaces;
        }
        while (k < p.size()) {
            if (p.compare(k, 3, SPM_SPACE) == 0) { out.push_back(' '); k += 3; }
            else out.push_back(p[k++]);
        }
    }
    flush_bytes();
    return out;
}
