// spm_model.h — reads a SentencePiece `.model` file (a serialized sentencepiece.ModelProto)
// without libsentencepiece or libprotobuf, and builds the val_bpb byte tables.
//
// Only what the loader needs of the protobuf wire format:
// a message is a sequence of fields, each `key = (field << 3) | wire_type` as a varint, then
//   wire 0: varint, 1: 8 bytes, 2: varint length + bytes (strings, sub-messages), 5: 4 bytes.
// Unknown fields are skipped by wire type; groups (wire 3/4) are rejected. Every read is
// bounds-checked, so a corrupt file gives an error naming the file and byte offset, never a crash.
#pragma once
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <vector>

// Piece types as numbered in sentencepiece_model.proto (BYTE = 6 comes after UNUSED = 5).
enum { SPM_NORMAL = 1, SPM_UNKNOWN = 2, SPM_CONTROL = 3, SPM_USER_DEFINED = 4, SPM_UNUSED = 5, SPM_BYTE = 6 };
enum { SPM_UNIGRAM = 1, SPM_BPE = 2, SPM_WORD = 3, SPM_CHAR = 4 };

// One NormalizerSpec; absent fields keep the proto2 defaults.
struct SpmNormalizerSpec {
    std::string name;
    std::string precompiled_charsmap;  // uint32 trie size, darts-clone trie, NUL-terminated pool
    bool add_dummy_prefix = true;
    bool remove_extra_whitespaces = true;
    bool escape_whitespaces = true;
};

struct SpmModel {
    std::string path;                  // where it was loaded from (for messages)
    uint64_t checksum = 0;             // fnv1a64 of the file bytes
    size_t file_bytes = 0;
    // vocabulary: id = position in the file
    std::vector<std::string> pieces;
    std::vector<float> scores;
    std::vector<uint8_t> types;        // SPM_NORMAL ... SPM_BYTE
    // trainer spec (only the fields that change loading, encoding or decoding)
    int model_type = SPM_UNIGRAM;
    int trainer_vocab_size = 8000;     // as written in the trainer spec; pieces.size() is the real size
    bool byte_fallback = false;
    bool treat_whitespace_as_suffix = false;
    int unk_id = 0, bos_id = 1, eos_id = 2, pad_id = -1;
    std::string unk_surface = " \xE2\x81\x87 ";  // " ⁇ ", what decode prints for <unk>
    SpmNormalizerSpec normalizer;
    bool has_denormalizer = false;
    SpmNormalizerSpec denormalizer;
};

// 64-bit FNV-1a: cheap, dependency-free checksum used for files and tensors.
inline uint64_t fnv1a64(const void* data, size_t n) {
    const uint8_t* p = (const uint8_t*)data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ull; }
    return h;
}

// --- protobuf wire reader ---------------------------------------------------------------------

struct PbReader {
    const uint8_t* buf;      // whole file, so offsets in messages are file offsets
    size_t pos, end;         // current message is buf[pos, end)
    const std::string* path;
};

[[noreturn]] inline void pb_fail(const PbReader& r, size_t offset, const std::string& what) {
    throw std::runtime_error("spm model " + *r.path + ": byte offset " + std::to_string(offset) + ": " + what);
}

inline uint64_t pb_varint(PbReader& r) {
    size_t start = r.pos;
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (r.pos >= r.end) pb_fail(r, start, "expected a varint, found the end of the message (truncated)");
        uint8_t b = r.buf[r.pos++];
        v |= (uint64_t)(b & 0x7F) << (7 * i);
        if (!(b & 0x80)) return v;
    }
    pb_fail(r, start, "expected a varint of at most 10 bytes, found a longer one");
}

// Reads a wire-type-2 payload and returns a reader limited to it.
inline PbReader pb_sub(PbReader& r) {
    size_t at = r.pos;
    uint64_t len = pb_varint(r);
    if (len > r.end - r.pos)
        pb_fail(r, at, "expected a length within the message (" + std::to_string(r.end - r.pos) +
                       " bytes left), found " + std::to_string(len));
    PbReader sub = {r.buf, r.pos, r.pos + (size_t)len, r.path};
    r.pos += (size_t)len;
    return sub;
}

inline std::string pb_string(PbReader& r) {
    PbReader s = pb_sub(r);
    return std::string((const char*)s.buf + s.pos, s.end - s.pos);
}

inline float pb_float(PbReader& r) {
    if (r.end - r.pos < 4) pb_fail(r, r.pos, "expected a 4-byte float, found the end of the message (truncated)");
    uint32_t u = (uint32_t)r.buf[r.pos] | (uint32_t)r.buf[r.pos + 1] << 8 | (uint32_t)r.buf[r.pos + 2] << 16 |
                 (uint32_t)r.buf[r.pos + 3] << 24;
    r.pos += 4;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

struct PbField { uint32_t number; int wire; size_t offset; };

inline PbField pb_key(PbReader& r) {
    size_t at = r.pos;
    uint64_t key = pb_varint(r);
    PbField f = {(uint32_t)(key >> 3), (int)(key & 7), at};
    if (key > 0xFFFFFFFFull || f.number == 0)
        pb_fail(r, at, "expected a field key with a field number in 1..2^29-1, found " + std::to_string(key));
    if (f.wire == 3 || f.wire == 4)
        pb_fail(r, at, "expected wire type 0, 1, 2 or 5, found group wire type " + std::to_string(f.wire));
    if (f.wire > 5) pb_fail(r, at, "expected wire type 0, 1, 2 or 5, found " + std::to_string(f.wire));
    return f;
}

// A known field must arrive with the wire type its declaration implies.
inline void pb_expect(const PbReader& r, const PbField& f, int wire, const char* name) {
    if (f.wire != wire)
        pb_fail(r, f.offset,
                std::string("field ") + name + " (#" + std::to_string(f.number) + "): expected wire type " +
                    std::to_string(wire) + ", found " + std::to_string(f.wire));
}

inline void pb_skip(PbReader& r, const PbField& f) {
    if (f.wire == 0) { pb_varint(r); return; }
    if (f.wire == 2) { pb_sub(r); return; }
    size_t n = f.wire == 1 ? 8 : 4;
    if (r.end - r.pos < n)
        pb_fail(r, r.pos, "expected " + std::to_string(n) + " bytes of a fixed-size field, found the end (truncated)");
    r.pos += n;
}

// --- ModelProto messages ------------------------------------------------------------------------

inline void spm_parse_piece(PbReader r, SpmModel& m) {
    size_t start = r.pos;
    std::string piece; float score = 0.0f; uint64_t type = SPM_NORMAL;
    while (r.pos < r.end) {
        PbField f = pb_key(r);
        if (f.number == 1) { pb_expect(r, f, 2, "piece"); piece = pb_string(r); }
        else if (f.number == 2) {
            pb_expect(r, f, 5, "score"); score = pb_float(r);
            if (score != score) pb_fail(r, f.offset, "expected a score that is a number, found NaN");
        }
        else if (f.number == 3) {
            pb_expect(r, f, 0, "type"); type = pb_varint(r);
            if (type < 1 || type > 6)
                pb_fail(r, f.offset, "expected a piece type in 1..6, found " + std::to_string(type));
        } else pb_skip(r, f);
    }
    if (piece.empty())
        pb_fail(r, start,
                "expected a non-empty piece string for id " + std::to_string(m.pieces.size()) + ", found none");
    m.pieces.push_back(piece); m.scores.push_back(score); m.types.push_back((uint8_t)type);
}

inline void spm_parse_trainer(PbReader r, SpmModel& m) {
    while (r.pos < r.end) {
        PbField f = pb_key(r);
        switch (f.number) {
        case 3: pb_expect(r, f, 0, "model_type"); m.model_type = (int)pb_varint(r); break;
        case 4: pb_expect(r, f, 0, "vocab_size"); m.trainer_vocab_size = (int)pb_varint(r); break;
        case 24:
            pb_expect(r, f, 0, "treat_whitespace_as_suffix");
            m.treat_whitespace_as_suffix = pb_varint(r) != 0;
            break;
        case 35: pb_expect(r, f, 0, "byte_fallback"); m.byte_fallback = pb_varint(r) != 0; break;
        case 40: pb_expect(r, f, 0, "unk_id"); m.unk_id = (int)pb_varint(r); break;  // int32: 64-bit two's complement
        case 41: pb_expect(r, f, 0, "bos_id"); m.bos_id = (int)pb_varint(r); break;
        case 42: pb_expect(r, f, 0, "eos_id"); m.eos_id = (int)pb_varint(r); break;
        case 43: pb_expect(r, f, 0, "pad_id"); m.pad_id = (int)pb_varint(r); break;
        case 44: pb_expect(r, f, 2, "unk_surface"); m.unk_surface = pb_string(r); break;
        default: pb_skip(r, f);
        }
    }
}

inline void spm_parse_normalizer(PbReader r, SpmNormalizerSpec& n) {
    while (r.pos < r.end) {
        PbField f = pb_key(r);
        switch (f.number) {
        case 1: pb_expect(r, f, 2, "name"); n.name = pb_string(r); break;
        case 2: pb_expect(r, f, 2, "precompiled_charsmap"); n.precompiled_charsmap = pb_string(r); break;
        case 3: pb_expect(r, f, 0, "add_dummy_prefix"); n.add_dummy_prefix = pb_varint(r) != 0; break;
        case 4: pb_expect(r, f, 0, "remove_extra_whitespaces"); n.remove_extra_whitespaces = pb_varint(r) != 0; break;
        case 5: pb_expect(r, f, 0, "escape_whitespaces"); n.escape_whitespaces = pb_varint(r) != 0; break;
        default: pb_skip(r, f);
        }
    }
}

// Byte value of a BYTE piece name "<0xXX>" (uppercase hex, as SentencePiece writes them), or -1.
inline int spm_byte_piece_value(const std::string& p) {
    auto hex = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1; };
    if (p.size() != 6 || p.compare(0, 3, "<0x") != 0 || p[5] != '>' || hex(p[3]) < 0 || hex(p[4]) < 0) return -1;
    return hex(p[3]) * 16 + hex(p[4]);
}

// Checks what the encoder, decoder and byte tables rely on. Offsets here refer to the whole file.
inline void spm_validate(const SpmModel& m, const PbReader& r) {
    int n = (int)m.pieces.size();
    if (n < 4) pb_fail(r, 0, "expected at least 4 pieces, found " + std::to_string(n));
    std::unordered_set<std::string> seen;
    int n_unknown = 0, unknown_id = -1, n_byte = 0;
    for (int i = 0; i < n; i++) {
        if (!seen.insert(m.pieces[i]).second)
            pb_fail(r, 0, "expected unique pieces, found a second \"" + m.pieces[i] + "\" at id " + std::to_string(i));
        if (m.types[i] == SPM_UNKNOWN) { n_unknown++; unknown_id = i; }
        if (m.types[i] == SPM_BYTE) {
            // byte pieces are named <0x00> ... <0xFF>; decode reads the byte value from the name
            const std::string& p = m.pieces[i];
            if (spm_byte_piece_value(p) < 0)
                pb_fail(r, 0, "expected byte piece " + std::to_string(i) + " to be named <0xXX>, found \"" + p + "\"");
            n_byte++;
        }
    }
    if (n_unknown != 1) pb_fail(r, 0, "expected exactly one UNKNOWN piece, found " + std::to_string(n_unknown));
    if (m.unk_id != unknown_id)
        pb_fail(r, 0,
                "expected trainer_spec.unk_id to be the UNKNOWN piece's id " + std::to_string(unknown_id) + ", found " +
                    std::to_string(m.unk_id));
    if (m.byte_fallback ? n_byte != 256 : n_byte != 0)
        pb_fail(r, 0, std::string("byte_fallback is ") + (m.byte_fallback ? "true" : "false") + ": expected " +
                      (m.byte_fallback ? "256" : "0") + " BYTE pieces, found " + std::to_string(n_byte));
    const int ids[3] = {m.bos_id, m.eos_id, m.pad_id};
    const char* names[3] = {"bos_id", "eos_id", "pad_id"};
    for (int k = 0; k < 3; k++)
        if (ids[k] >= n || (ids[k] >= 0 && m.types[ids[k]] != SPM_CONTROL))
            pb_fail(r, 0,
                    std::string("expected ") + names[k] + " " + std::to_string(ids[k]) +
                        " to be -1 or a CONTROL piece among " + std::to_string(n) + " pieces");
}

// Parses a ModelProto from memory; `path` only names the source in error messages.
inline SpmModel spm_load_bytes(const std::string& bytes, const std::string& path) {
    SpmModel m;
    m.path = path;
    m.file_bytes = bytes.size();
    m.checksum = fnv1a64(bytes.data(), bytes.size());
    PbReader r = {(const uint8_t*)bytes.data(), 0, bytes.size(), &m.path};
    bool has_trainer = false, has_normalizer = false;
    while (r.pos < r.end) {
        PbField f = pb_key(r);
        switch (f.number) {
        case 1: pb_expect(r, f, 2, "pieces"); spm_parse_piece(pb_sub(r), m); break;
        case 2: pb_expect(r, f, 2, "trainer_spec"); spm_parse_trainer(pb_sub(r), m); has_trainer = true; break;
        case 3:
            pb_expect(r, f, 2, "normalizer_spec");
            spm_parse_normalizer(pb_sub(r), m.normalizer);
            has_normalizer = true;
            break;
        case 5:
            pb_expect(r, f, 2, "denormalizer_spec");
            spm_parse_normalizer(pb_sub(r), m.denormalizer);
            m.has_denormalizer = true;
            break;
        default: pb_skip(r, f);
        }
    }
    if (!has_trainer) pb_fail(r, r.pos, "expected a trainer_spec (field 2), found none");
    if (!has_normalizer) pb_fail(r, r.pos, "expected a normalizer_spec (field 3), found none");
    spm_validate(m, r);
    return m;
}

inline SpmModel spm_load(const std::string& path) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) throw std::runtime_error("spm model " + path + ": cannot open: " + strerror(errno));
    std::string bytes;
    char chunk[1 << 16];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) bytes.append(chunk, got);
    bool bad = ferror(f) != 0;
    fclose(f);
    if (bad)
        throw std::runtime_error("spm model " + path + ": read error after " + std::to_string(bytes.size()) + " bytes");
    return spm_load_bytes(bytes, path);
}

// --- val_bpb byte tables --------------------------------------------------------------------------
// Same rule as the reference's build_sentencepiece_luts in train_gpt.py: tables over
// max(pieces, vocab_size) ids; CONTROL/UNKNOWN/UNUSED and ids past the vocabulary are 0-byte
// boundaries; BYTE pieces are 1 byte; other pieces count the UTF-8 bytes left after dropping one
// leading "▁", which instead becomes has_leading_space (a space counted unless the previous
// token is a boundary).

struct ByteLuts {
    std::vector<int16_t> base_bytes;
    std::vector<uint8_t> has_leading_space, is_boundary;
};

inline ByteLuts spm_byte_luts(const SpmModel& m, int vocab_size) {
    int n = (int)m.pieces.size();
    size_t size = (size_t)(vocab_size > n ? vocab_size : n);
    ByteLuts t;
    t.base_bytes.assign(size, 0);
    t.has_leading_space.assign(size, 0);
    t.is_boundary.assign(size, 1);
    for (int i = 0; i < n; i++) {
        int type = m.types[i];
        if (type == SPM_CONTROL || type == SPM_UNKNOWN || type == SPM_UNUSED) continue;
        t.is_boundary[i] = 0;
        if (type == SPM_BYTE) { t.base_bytes[i] = 1; continue; }
        const std::string& p = m.pieces[i];
        size_t len = p.size();
        if (p.compare(0, 3, "\xE2\x96\x81") == 0) { t.has_leading_space[i] = 1; len -= 3; }
        t.base_bytes[i] = (int16_t)(len > 32767 ? 32767 : len);
    }
    return t;
}
