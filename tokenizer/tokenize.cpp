// tokenize — command-line SentencePiece tool for pgolf (no libsentencepiece needed).
//
//   ./tokenize encode MODEL [FILE...]        one line of ids per input line (= spm_encode --output_format=id)
//   ./tokenize decode MODEL [FILE...]        one line of text per line of ids
//   ./tokenize info MODEL                    vocabulary, settings, byte tables, checksum
//   ./tokenize bytes MODEL [FILE...]         val_bpb bytes each line's tokens count (after a BOS)
//   ./tokenize charsmap MODEL                normalization rules as "KEY\tVALUE" code points in hex
//   ./tokenize shard MODEL OUTDIR [options] [FILE...]   documents -> challenge-format shards
//
// Build: g++ -O2 -std=c++17 -Wall -Wextra -o tokenize tokenizer/tokenize.cpp
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "caseops.h"
#include "spm_encode.h"

struct UsageError : std::runtime_error { using std::runtime_error::runtime_error; };

// --- input lines -------------------------------------------------------------------------------

struct LineReader {
    FILE* f = nullptr;
    std::string name;     // file name for messages ("<stdin>")
    long line_no = 0;
    char* buf = nullptr;  // getline's buffer
    size_t cap = 0;
    LineReader() = default;
    LineReader(const LineReader&) = delete;
    ~LineReader() { if (f && f != stdin) fclose(f); free(buf); }  // also when an error unwinds
};

static void line_reader_open(LineReader& r, const std::string& path) {
    r.line_no = 0;
    if (path == "-") { r.f = stdin; r.name = "<stdin>"; return; }
    r.f = fopen(path.c_str(), "rb");
    r.name = path;
    if (!r.f) throw std::runtime_error(path + ": cannot open: " + strerror(errno));
}

// Next line without its '\n' (bytes, NULs included); false at the end of the file.
static bool line_reader_next(LineReader& r, std::string* line) {
    ssize_t got = getline(&r.buf, &r.cap, r.f);
    if (got < 0) {
        if (ferror(r.f)) throw std::runtime_error(r.name + ": read error after line " + std::to_string(r.line_no));
        return false;
    }
    r.line_no++;
    size_t len = (size_t)got;
    if (len > 0 && r.buf[len - 1] == '\n') len--;
    line->assign(r.buf, len);
    return true;
}

static void line_reader_close(LineReader& r) {
    if (r.f && r.f != stdin) fclose(r.f);
    r.f = nullptr;
    free(r.buf);
    r.buf = nullptr;
    r.cap = 0;
}

static std::vector<std::string> inputs_or_stdin(const std::vector<std::string>& files) {
    return files.empty() ? std::vector<std::string>{"-"} : files;
}

static void write_out(const std::string& s) {
    if (fwrite(s.data(), 1, s.size(), stdout) != s.size()) throw std::runtime_error("<stdout>: write error");
}

// --- JSON: the "text" string of one JSONL object ------------------------------------------------------
// A small strict parser (RFC 8259): objects, arrays, strings with every escape, numbers, literals.
// Only the top-level "text" member is kept (the last one, if repeated, as Python's json does).

struct JsonParser {
    const char* s;
    size_t n, i;
    int depth;
    std::string err;
};

static bool json_fail(JsonParser& p, const std::string& what) {
    if (p.err.empty()) p.err = "column " + std::to_string(p.i + 1) + ": " + what;
    return false;
}

static void json_ws(JsonParser& p) {
    while (p.i < p.n && (p.s[p.i] == ' ' || p.s[p.i] == '\t' || p.s[p.i] == '\n' || p.s[p.i] == '\r')) p.i++;
}

static void utf8_append(std::string* out, uint32_t cp) {
    if (cp < 0x80) out->push_back((char)cp);
    else if (cp < 0x800) { out->push_back((char)(0xC0 | cp >> 6)); out->push_back((char)(0x80 | (cp & 0x3F))); }
    else if (cp < 0x10000) {
        out->push_back((char)(0xE0 | cp >> 12)); out->push_back((char)(0x80 | (cp >> 6 & 0x3F)));
        out->push_back((char)(0x80 | (cp & 0x3F)));
    } else {
        out->push_back((char)(0xF0 | cp >> 18)); out->push_back((char)(0x80 | (cp >> 12 & 0x3F)));
        out->push_back((char)(0x80 | (cp >> 6 & 0x3F))); out->push_back((char)(0x80 | (cp & 0x3F)));
    }
}

static bool json_hex4(JsonParser& p, uint32_t* v) {
    *v = 0;
    for (int k = 0; k < 4; k++, p.i++) {
        char c = p.i < p.n ? p.s[p.i] : 0;
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (d < 0) return json_fail(p, "expected 4 hex digits after \\u");
        *v = *v << 4 | (uint32_t)d;
    }
    return true;
}

// Parses a string at p.i (which must be '"'); appends its value to *out unless out is null.
static bool json_string(JsonParser& p, std::string* out) {
    if (p.i >= p.n || p.s[p.i] != '"') return json_fail(p, "expected '\"'");
    p.i++;
    while (true) {
        if (p.i >= p.n) return json_fail(p, "expected the closing '\"' of a string, found the end of the line");
        unsigned char c = (unsigned char)p.s[p.i];
        if (c == '"') { p.i++; return true; }
        if (c < 0x20) return json_fail(p, "expected an escaped control character, found raw byte " + std::to_string(c));
        if (c != '\\') {  // copy the run of plain bytes at once
            size_t j = p.i;
            while (j < p.n && p.s[j] != '"' && p.s[j] != '\\' && (unsigned char)p.s[j] >= 0x20) j++;
            if (out) out->append(p.s + p.i, j - p.i);
            p.i = j;
            continue;
        }
        p.i++;
        char e = p.i < p.n ? p.s[p.i] : 0;
        const char* simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            static const char values[] = "\"\\/\b\f\n\r\t";
            if (out) out->push_back(values[simple - "\"\\/bfnrt"]);
            p.i++;
            continue;
        }
        if (e != 'u')
            return json_fail(p,
                             std::string("expected an escape (\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX), found '\\") +
                                 (e ? std::string(1, e) : "") + "'");
        p.i++;
        uint32_t cp;
        if (!json_hex4(p, &cp)) return false;
        if (cp >= 0xDC00 && cp <= 0xDFFF)
            return json_fail(p, "expected a high surrogate before low surrogate \\u" + std::to_string(cp));
        if (cp >= 0xD800 && cp <= 0xDBFF) {  // UTF-16 pair: \uD83D\uDE00 -> U+1F600
            if (p.i + 1 >= p.n || p.s[p.i] != '\\' || p.s[p.i + 1] != 'u')
                return json_fail(p, "expected a low surrogate \\uDC00-\\uDFFF after a high surrogate");
            p.i += 2;
            uint32_t lo;
            if (!json_hex4(p, &lo)) return false;
            if (lo < 0xDC00 || lo > 0xDFFF)
                return json_fail(p, "expected a low surrogate \\uDC00-\\uDFFF after a high surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        if (out) utf8_append(out, cp);
    }
}

static bool json_value(JsonParser& p);

static bool json_number(JsonParser& p) {
    auto digits = [&]() {
        size_t j = p.i;
        while (p.i < p.n && p.s[p.i] >= '0' && p.s[p.i] <= '9') p.i++;
        return p.i > j;
    };
    if (p.i < p.n && p.s[p.i] == '-') p.i++;
    if (p.i < p.n && p.s[p.i] == '0') p.i++;
    else if (!digits()) return json_fail(p, "expected a digit");
    if (p.i < p.n && p.s[p.i] == '.') { p.i++; if (!digits()) return json_fail(p, "expected a digit after '.'"); }
    if (p.i < p.n && (p.s[p.i] == 'e' || p.s[p.i] == 'E')) {
        p.i++;
        if (p.i < p.n && (p.s[p.i] == '+' || p.s[p.i] == '-')) p.i++;
        if (!digits()) return json_fail(p, "expected a digit in the exponent");
    }
    return true;
}

// Parses an object; at top level (text != null) keeps the value of member "text".
static bool json_object(JsonParser& p, std::string* text, bool* has_text) {
    p.i++;  // '{'
    json_ws(p);
    if (p.i < p.n && p.s[p.i] == '}') { p.i++; return true; }
    while (true) {
        json_ws(p);
        std::string key;
        if (!json_string(p, &key)) return false;
        json_ws(p);
        if (p.i >= p.n || p.s[p.i] != ':') return json_fail(p, "expected ':' after an object key");
        p.i++;
        json_ws(p);
        if (text && key == "text") {
            if (p.i >= p.n || p.s[p.i] != '"') return json_fail(p, "expected member \"text\" to be a string");
            text->clear();
            if (!json_string(p, text)) return false;
            *has_text = true;
        } else if (!json_value(p)) {
            return false;
        }
        json_ws(p);
        if (p.i < p.n && p.s[p.i] == ',') { p.i++; continue; }
        if (p.i < p.n && p.s[p.i] == '}') { p.i++; return true; }
        return json_fail(p, "expected ',' or '}' in an object");
    }
}

static bool json_value(JsonParser& p) {
    if (p.i >= p.n) return json_fail(p, "expected a value, found the end of the line");
    char c = p.s[p.i];
    if (c == '"') return json_string(p, nullptr);
    if (c == '{' || c == '[') {
        if (++p.depth > 512) return json_fail(p, "expected nesting depth at most 512");
        bool ok;
        if (c == '{') ok = json_object(p, nullptr, nullptr);
        else {
            p.i++;
            json_ws(p);
            ok = true;
            if (p.i < p.n && p.s[p.i] == ']') p.i++;
            else while (true) {
                json_ws(p);
                if (!json_value(p)) { ok = false; break; }
                json_ws(p);
                if (p.i < p.n && p.s[p.i] == ',') { p.i++; continue; }
                if (p.i < p.n && p.s[p.i] == ']') { p.i++; break; }
                ok = json_fail(p, "expected ',' or ']' in an array");
                break;
            }
        }
        p.depth--;
        return ok;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return json_number(p);
    for (const char* lit : {"true", "false", "null"}) {
        size_t len = strlen(lit);
        if (p.n - p.i >= len && memcmp(p.s + p.i, lit, len) == 0) { p.i += len; return true; }
    }
    return json_fail(p, std::string("expected a value, found '") + c + "'");
}

// The "text" member of the JSON object on one line. Returns false with *err set when the line is
// not a single JSON object or has no string "text".
static bool json_text_field(const std::string& line, std::string* text, std::string* err) {
    JsonParser p = {line.data(), line.size(), 0, 0, ""};
    bool has_text = false;
    json_ws(p);
    if (p.i >= p.n || p.s[p.i] != '{') json_fail(p, "expected a JSON object starting with '{'");
    else if (json_object(p, text, &has_text)) {
        json_ws(p);
        if (p.i != p.n) json_fail(p, "expected the end of the line after the object");
        else if (!has_text) json_fail(p, "expected a member \"text\", found none");
    }
    *err = p.err;
    return p.err.empty();
}

// --- documents: JSONL lines or blank-line-separated paragraphs ------------------------------------------

enum DocFormat { FORMAT_AUTO, FORMAT_JSONL, FORMAT_TEXT };

struct DocReader {
    std::vector<std::string> inputs;
    size_t next_input = 0;
    DocFormat requested = FORMAT_AUTO, format = FORMAT_AUTO;
    LineReader lr;
    bool open = false;
    std::vector<std::string> pending;  // lines read ahead while detecting the format
    std::string line;
};

static bool doc_reader_line(DocReader& d, std::string* line) {
    if (!d.pending.empty()) { *line = d.pending.front(); d.pending.erase(d.pending.begin()); return true; }
    return line_reader_next(d.lr, line);
}

static bool is_blank(const std::string& s) {
    for (char c : s) if (c != ' ' && c != '\t' && c != '\r') return false;
    return true;
}

// Next document's text; false when every input is exhausted.
static bool doc_reader_next(DocReader& d, std::string* doc) {
    while (true) {
        if (!d.open) {
            if (d.next_input >= d.inputs.size()) return false;
            const std::string& path = d.inputs[d.next_input++];
            line_reader_open(d.lr, path);
            d.open = true;
            d.pending.clear();
            d.format = d.requested;
            if (d.format == FORMAT_AUTO) {  // by extension, else by the first non-space character
                if (path.size() > 6 && path.compare(path.size() - 6, 6, ".jsonl") == 0) d.format = FORMAT_JSONL;
                else {
                    std::string l;
                    while (line_reader_next(d.lr, &l)) {
                        d.pending.push_back(l);
                        if (!is_blank(l)) break;
                    }
                    size_t k = d.pending.empty() ? 0 : d.pending.back().find_first_not_of(" \t\r");
                    d.format = (!d.pending.empty() && k != std::string::npos && d.pending.back()[k] == '{')
                                   ? FORMAT_JSONL
                                   : FORMAT_TEXT;
                }
            }
        }
        if (d.format == FORMAT_JSONL) {
            while (doc_reader_line(d, &d.line)) {
                if (is_blank(d.line)) continue;
                std::string err;
                doc->clear();
                if (!json_text_field(d.line, doc, &err))
                    throw std::runtime_error(d.lr.name + ":" + std::to_string(d.lr.line_no - (long)d.pending.size()) +
                                             ": malformed JSONL: " + err);
                return true;
            }
        } else {
            // a document is a run of non-blank lines, kept with its newlines
            bool any = false;
            doc->clear();
            while (doc_reader_line(d, &d.line)) {
                if (is_blank(d.line)) { if (any) return true; continue; }
                if (any) doc->push_back('\n');
                doc->append(d.line);
                any = true;
            }
            if (any) { line_reader_close(d.lr); d.open = false; return true; }
        }
        line_reader_close(d.lr);
        d.open = false;
    }
}

// --- shard files (the challenge's format, as llm.c's)
// ------------------------------------------------------------------- 256 little-endian int32 header [20240520, 1, N,
// 0...], then N little-endian uint16 tokens. Each file is written as NAME.tmp and renamed when complete. With a byte
// sidecar (CaseOps, as PR #1729 writes it), every val file fineweb_val_K.bin gets a twin fineweb_val_bytes_K.bin of the
// same layout whose entry i is the number of original UTF-8 bytes token i stands for (BOS: 0). Its header adds [3] =
// SIDECAR_KIND and [4], [5] = the low and high halves of the fnv1a64 of the token file's N uint16 values, so a reader
// can tell that the two belong together.

static const int SHARD_MAGIC = 20240520, SHARD_VERSION = 1;
static const uint32_t SIDECAR_KIND = 0x53594221;  // "!BYS"

struct ShardWriter {
    std::string outdir, split;      // split: "val" or "train"
    int64_t shard_tokens = 0;       // tokens per full file
    int index = 0;                  // next file number in this split
    FILE* f = nullptr;
    std::string tmp_path, path;
    int64_t n = 0;                  // tokens in the open file
    std::vector<uint8_t> buf;
    std::vector<std::string> written;
    int64_t total = 0;
    bool sidecar = false;           // also write fineweb_val_bytes_K.bin
    FILE* fb = nullptr;
    std::string bytes_tmp, bytes_path;
    std::vector<uint8_t> bbuf;
    uint64_t fnv = 0;               // fnv1a64 of the open file's token bytes
};

static void put_le32(uint8_t* p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void shard_flush_buf(ShardWriter& w) {
    if (!w.buf.empty() && fwrite(w.buf.data(), 1, w.buf.size(), w.f) != w.buf.size())
        throw std::runtime_error(w.tmp_path + ": write error: " + strerror(errno));
    w.buf.clear();
    if (w.fb && !w.bbuf.empty() && fwrite(w.bbuf.data(), 1, w.bbuf.size(), w.fb) != w.bbuf.size())
        throw std::runtime_error(w.bytes_tmp + ": write error: " + strerror(errno));
    w.bbuf.clear();
}

static void shard_close(ShardWriter& w) {
    if (!w.f) return;
    shard_flush_buf(w);
    uint8_t header[1024] = {0};
    put_le32(header, SHARD_MAGIC);
    put_le32(header + 4, SHARD_VERSION);
    put_le32(header + 8, (uint32_t)w.n);
    bool ok = fseek(w.f, 0, SEEK_SET) == 0 && fwrite(header, 1, sizeof header, w.f) == sizeof header;
    ok = (fclose(w.f) == 0) && ok;
    w.f = nullptr;
    if (!ok) throw std::runtime_error(w.tmp_path + ": write error: " + strerror(errno));
    if (rename(w.tmp_path.c_str(), w.path.c_str()) != 0)
        throw std::runtime_error(w.tmp_path + ": cannot rename to " + w.path + ": " + strerror(errno));
    fprintf(stderr, "wrote %s (%lld tokens)\n", w.path.c_str(), (long long)w.n);
    w.written.push_back(w.path);
    if (!w.fb) return;
    put_le32(header + 12, SIDECAR_KIND);
    put_le32(header + 16, (uint32_t)w.fnv);
    put_le32(header + 20, (uint32_t)(w.fnv >> 32));
    ok = fseek(w.fb, 0, SEEK_SET) == 0 && fwrite(header, 1, sizeof header, w.fb) == sizeof header;
    ok = (fclose(w.fb) == 0) && ok;
    w.fb = nullptr;
    if (!ok) throw std::runtime_error(w.bytes_tmp + ": write error: " + strerror(errno));
    if (rename(w.bytes_tmp.c_str(), w.bytes_path.c_str()) != 0)
        throw std::runtime_error(w.bytes_tmp + ": cannot rename to " + w.bytes_path + ": " + strerror(errno));
    w.written.push_back(w.bytes_path);
}

// `bytes`: the token's original UTF-8 bytes, for the sidecar.
static void shard_put(ShardWriter& w, int id, int64_t bytes = 0) {
    if (id < 0 || id > 65535)
        throw std::runtime_error("shard: token id " + std::to_string(id) + " does not fit in uint16");
    if (w.sidecar && (bytes < 0 || bytes > 65535))
        throw std::runtime_error("shard: a token stands for " + std::to_string(bytes) + " original bytes, more than a "
                                 "uint16 sidecar entry holds (a whitespace run of that length?)");
    if (!w.f) {
        char name[64];
        snprintf(name, sizeof name, "fineweb_%s_%06d.bin", w.split.c_str(), w.index);
        w.path = w.outdir + "/" + name;
        w.tmp_path = w.path + ".tmp";
        w.f = fopen(w.tmp_path.c_str(), "wb");
        if (!w.f) throw std::runtime_error(w.tmp_path + ": cannot create: " + strerror(errno));
        uint8_t placeholder[1024] = {0};  // the header is written at close, when N is known
        if (fwrite(placeholder, 1, sizeof placeholder, w.f) != sizeof placeholder)
            throw std::runtime_error(w.tmp_path + ": write error: " + strerror(errno));
        if (w.sidecar) {
            snprintf(name, sizeof name, "fineweb_%s_bytes_%06d.bin", w.split.c_str(), w.index);
            w.bytes_path = w.outdir + "/" + name;
            w.bytes_tmp = w.bytes_path + ".tmp";
            w.fb = fopen(w.bytes_tmp.c_str(), "wb");
            if (!w.fb) throw std::runtime_error(w.bytes_tmp + ": cannot create: " + strerror(errno));
            if (fwrite(placeholder, 1, sizeof placeholder, w.fb) != sizeof placeholder)
                throw std::runtime_error(w.bytes_tmp + ": write error: " + strerror(errno));
            w.fnv = 14695981039346656037ull;
        }
        w.index++;
        w.n = 0;
    }
    w.buf.push_back((uint8_t)id);
    w.buf.push_back((uint8_t)(id >> 8));
    if (w.sidecar) {
        for (int k = 0; k < 2; k++) { w.fnv ^= (uint8_t)(id >> (8 * k)); w.fnv *= 1099511628211ull; }
        w.bbuf.push_back((uint8_t)bytes);
        w.bbuf.push_back((uint8_t)(bytes >> 8));
    }
    w.n++;
    w.total++;
    if (w.buf.size() >= (1 << 22)) shard_flush_buf(w);
    if (w.n == w.shard_tokens) shard_close(w);
}

// --- subcommands ----------------------------------------------------------------------------------------

// Runs fn(line, reader, out) on every line of the inputs (or stdin); fn appends its output line to
// out, which is written in pieces of about 1 MB.
template <class F> static void for_each_line(const std::vector<std::string>& files, F fn) {
    std::string line, out;
    for (const std::string& path : inputs_or_stdin(files)) {
        LineReader lr;
        line_reader_open(lr, path);
        while (line_reader_next(lr, &line)) {
            fn(line, lr, out);
            if (out.size() > (1 << 20)) { write_out(out); out.clear(); }
        }
        line_reader_close(lr);
    }
    write_out(out);
}

static int cmd_encode(const SpmModel& m, const std::vector<std::string>& files) {
    SpmEncoder enc = spm_encoder_build(m);
    SpmScratch scratch;
    std::vector<int> ids;
    for_each_line(files, [&](const std::string& line, const LineReader&, std::string& out) {
        ids.clear();
        spm_encode(enc, line.data(), line.size(), &ids, &scratch);
        for (size_t k = 0; k < ids.size(); k++) {
            if (k) out.push_back(' ');
            char num[12], *p = num + sizeof num;  // ids are >= 0: digits from the right
            unsigned v = (unsigned)ids[k];
            do { *--p = (char)('0' + v % 10); v /= 10; } while (v);
            out.append(p, num + sizeof num - p);
        }
        out.push_back('\n');
    });
    return 0;
}

// Integers of one line of ids; throws naming file and line on anything else.
static void parse_ids(const std::string& line, const LineReader& lr, std::vector<int>* ids) {
    ids->clear();
    const char* p = line.c_str();
    while (true) {
        while (*p == ' ' || *p == '\t' || *p == '\r') p++;
        if (!*p) break;
        char* end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < INT32_MIN || v > INT32_MAX ||
            (*end && *end != ' ' && *end != '\t' && *end != '\r'))
            throw std::runtime_error(lr.name + ":" + std::to_string(lr.line_no) +
                                     ": expected space-separated integer ids, found \"" +
                                     std::string(p, strcspn(p, " \t\r")) + "\"");
        ids->push_back((int)v);
        p = end;
    }
}

static int cmd_decode(const SpmModel& m, const std::vector<std::string>& files) {
    if (m.has_denormalizer)
        throw std::runtime_error(m.path + ": has a denormalizer_spec, which decode does not support");
    std::vector<int> ids;
    for_each_line(files, [&](const std::string& line, const LineReader& lr, std::string& out) {
        parse_ids(line, lr, &ids);
        try {
            out += spm_decode(m, ids.data(), ids.size());
        } catch (const std::exception& e) {
            throw std::runtime_error(lr.name + ":" + std::to_string(lr.line_no) + ": " + e.what());
        }
        out.push_back('\n');
    });
    return 0;
}

// val_bpb bytes of each line's tokens, scored as targets after a BOS (spm_byte_luts's rule).
static int cmd_bytes(const SpmModel& m, const std::vector<std::string>& files) {
    SpmEncoder enc = spm_encoder_build(m);
    ByteLuts luts = spm_byte_luts(m, (int)m.pieces.size());
    SpmScratch scratch;
    std::vector<int> ids;
    for_each_line(files, [&](const std::string& line, const LineReader&, std::string& out) {
        ids.clear();
        spm_encode(enc, line.data(), line.size(), &ids, &scratch);
        long long bytes = 0;
        int prev = m.bos_id >= 0 ? m.bos_id : m.unk_id;  // both are boundaries
        for (int id : ids) {
            bytes += luts.base_bytes[id] + (luts.has_leading_space[id] && !luts.is_boundary[prev] ? 1 : 0);
            prev = id;
        }
        out += std::to_string(bytes) + "\n";
    });
    return 0;
}

static std::string codepoints_hex(const std::string& s) {
    std::string out;
    const uint8_t* b = (const uint8_t*)s.data();
    for (size_t i = 0; i < s.size();) {
        int len = spm_utf8_valid_len(b + i, s.size() - i);
        uint32_t cp;
        if (len == 0) { cp = 0xFFFD; len = 1; }
        else if (len == 1) cp = b[i];
        else if (len == 2) cp = (uint32_t)(b[i] & 0x1F) << 6 | (b[i + 1] & 0x3F);
        else if (len == 3) cp = (uint32_t)(b[i] & 0x0F) << 12 | (uint32_t)(b[i + 1] & 0x3F) << 6 | (b[i + 2] & 0x3F);
        else
            cp = (uint32_t)(b[i] & 0x07) << 18 | (uint32_t)(b[i + 1] & 0x3F) << 12 | (uint32_t)(b[i + 2] & 0x3F) << 6 |
                 (b[i + 3] & 0x3F);
        char num[16];
        snprintf(num, sizeof num, "%s%X", out.empty() ? "" : " ", cp);
        out += num;
        i += len;
    }
    return out;
}

// Rules in the layout of `spm_normalize --decompile` (first two columns), for cross-checking.
static int cmd_charsmap(const SpmModel& m) {
    SpmCharsmap cm = spm_charsmap_parse(m.normalizer.precompiled_charsmap, m.path);
    std::string out;
    for (auto& rule : spm_charsmap_rules(cm))
        out += codepoints_hex(rule.first) + "\t" + codepoints_hex(rule.second) + "\n";
    write_out(out);
    return 0;
}

static const char* type_name(int t) {
    static const char* names[] = {"?", "NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE"};
    return t >= 1 && t <= 6 ? names[t] : "?";
}

static int cmd_info(const SpmModel& m) {
    static const char* model_types[] = {"?", "UNIGRAM", "BPE", "WORD", "CHAR"};
    int n = (int)m.pieces.size();
    int counts[7] = {0};
    for (int i = 0; i < n; i++) counts[m.types[i]]++;
    ByteLuts luts = spm_byte_luts(m, n);
    long long base_sum = 0, lead = 0;
    for (int i = 0; i < n; i++) { base_sum += luts.base_bytes[i]; lead += luts.has_leading_space[i]; }
    printf("model: %s (%zu bytes)\n", m.path.c_str(), m.file_bytes);
    printf("checksum: %016llx (fnv1a64 of the file)\n", (unsigned long long)m.checksum);
    printf("model_type: %s\n", m.model_type >= 1 && m.model_type <= 4 ? model_types[m.model_type] : "?");
    printf("vocab_size: %d pieces (trainer_spec says %d)\n", n, m.trainer_vocab_size);
    printf("special ids: unk %d, bos %d, eos %d, pad %d\n", m.unk_id, m.bos_id, m.eos_id, m.pad_id);
    printf("byte_fallback: %s\n", m.byte_fallback ? "true" : "false");
    printf("treat_whitespace_as_suffix: %s\n", m.treat_whitespace_as_suffix ? "true" : "false");
    printf("unk_surface: \"%s\"\n", m.unk_surface.c_str());
    printf(
        "normalizer: %s, charsmap %zu bytes, add_dummy_prefix %s, remove_extra_whitespaces %s, escape_whitespaces %s\n",
        m.normalizer.name.c_str(), m.normalizer.precompiled_charsmap.size(),
        m.normalizer.add_dummy_prefix ? "true" : "false", m.normalizer.remove_extra_whitespaces ? "true" : "false",
        m.normalizer.escape_whitespaces ? "true" : "false");
    printf("denormalizer: %s\n", m.has_denormalizer ? "present" : "none");
    printf("piece types:");
    for (int t = 1; t <= 6; t++) printf(" %s %d%s", type_name(t), counts[t], t < 6 ? "," : "\n");
    printf("byte tables: sum of base bytes %lld, %lld pieces with a leading space\n", base_sum, lead);
    return 0;
}

struct ShardOptions {
    DocFormat format = FORMAT_AUTO;
    int64_t val_docs = 50000, val_tokens = -1;  // val_tokens >= 0 replaces val_docs
    int64_t shard_tokens = 100000000;
    int threads = 2;
    bool caseops = false;  // --transform caseops: CaseOps text, and the val split's byte sidecar
};

static int64_t parse_count(const std::string& flag, const char* v, int64_t max) {
    char* end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (!*v || *end || errno || x < 0 || x > max)
        throw UsageError(flag + ": expected an integer in 0.." + std::to_string(max) + ", found \"" + v + "\"");
    return x;
}

// OUTDIR/manifest.txt: which tokenizer made the shards (train_gpt refuses another one).
static void write_manifest(const SpmModel& m, const std::string& outdir, int64_t val_tokens, int64_t train_tokens,
                           bool caseops) {
    std::string path = outdir + "/manifest.txt", tmp = path + ".tmp";
    size_t slash = m.path.rfind('/');
    char text[1024];
    const char* name = slash == std::string::npos ? m.path.c_str() : m.path.c_str() + slash + 1;
    int n = snprintf(text, sizeof text,
                     "format=pgolf-shards-1\ntokenizer=%s\ntokenizer_checksum=%016llx\nvocab_size=%zu\n"
                     "val_tokens=%lld\ntrain_tokens=%lld\ntransform=%s\n", name, (unsigned long long)m.checksum,
                     m.pieces.size(), (long long)val_tokens, (long long)train_tokens, caseops ? "caseops" : "none");
    FILE* f = fopen(tmp.c_str(), "wb");
    bool ok = f && fwrite(text, 1, n, f) == (size_t)n;
    ok = (f && fclose(f) == 0) && ok;
    if (!ok || rename(tmp.c_str(), path.c_str()) != 0) {
        remove(tmp.c_str());
        throw std::runtime_error(path + ": cannot write: " + strerror(errno));
    }
}

// CaseOps: encodes one transformed document, appending its ids and, per id, the original UTF-8 bytes
// its surface stands for (caseops_byte_weights summed over the surface). Over the document they add
// up to the original text's length.
static void caseops_token_bytes(const SpmEncoder& enc, const std::string& transformed, std::vector<int>* ids,
                                std::vector<int64_t>* nbytes, SpmScratch* scratch) {
    std::vector<uint32_t> spans;
    std::vector<uint8_t> weight;
    size_t first = ids->size();
    spm_encode(enc, transformed.data(), transformed.size(), ids, scratch, &spans);
    caseops_byte_weights(transformed.data(), transformed.size(), &weight);
    std::vector<int64_t> prefix(weight.size() + 1, 0);
    for (size_t i = 0; i < weight.size(); i++) prefix[i + 1] = prefix[i] + weight[i];
    size_t n = ids->size() - first;
    for (size_t k = 0; k < n; k++) {
        size_t b = spans[k], e = k + 1 < n ? spans[k + 1] : transformed.size();
        nbytes->push_back(prefix[e] - prefix[b]);
    }
}

// Documents are encoded in batches by `threads` workers, each on a contiguous slice, and written in
// input order, so the output does not depend on the thread count.
static int cmd_shard(const SpmModel& m, const std::string& outdir, const ShardOptions& opt,
                     const std::vector<std::string>& files) {
    if (m.bos_id < 0) throw std::runtime_error(m.path + ": model has no BOS piece, which shards need");
    if (mkdir(outdir.c_str(), 0755) != 0 && errno != EEXIST)
        throw std::runtime_error(outdir + ": cannot create directory: " + strerror(errno));
    // Training reads every fineweb_*.bin of a folder: old shards left beside new ones would be read too.
    if (DIR* d = opendir(outdir.c_str())) {
        std::string first;
        int count = 0;
        while (dirent* e = readdir(d))
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && count++ == 0) first = e->d_name;
        closedir(d);
        if (count > 0)
            throw std::runtime_error(outdir + ": output folder is not empty (" + std::to_string(count) +
                                     " entries, e.g. " + first + "); old shards would be read together with the new "
                                     "ones: remove them or choose a new folder");
    } else throw std::runtime_error(outdir + ": cannot open directory: " + strerror(errno));
    SpmEncoder enc = spm_encoder_build(m);
    int threads = opt.threads;
    std::vector<SpmScratch> scratch(threads);
    DocReader reader;
    reader.inputs = inputs_or_stdin(files);
    reader.requested = opt.format;
    ShardWriter val, train;
    val.outdir = train.outdir = outdir;
    val.split = "val";
    train.split = "train";
    val.shard_tokens = train.shard_tokens = opt.shard_tokens;
    val.sidecar = opt.caseops;
    int64_t docs_val = 0, docs_train = 0, text_bytes = 0;
    bool in_val = true;
    auto t0 = std::chrono::steady_clock::now();

    std::vector<std::string> batch;
    std::vector<std::vector<int>> ids(threads);
    std::vector<std::vector<size_t>> ends(threads);  // end offset of each document in ids[t]
    std::vector<std::vector<int64_t>> nbytes(threads);  // CaseOps: original bytes of each token in ids[t]
    bool more = true;
    while (more) {
        batch.clear();
        size_t batch_bytes = 0;
        std::string doc;
        while (batch_bytes < (16u << 20) && batch.size() < 65536) {
            if (!doc_reader_next(reader, &doc)) { more = false; break; }
            batch_bytes += doc.size();
            batch.push_back(std::move(doc));
        }
        text_bytes += (int64_t)batch_bytes;
        // slice the batch by bytes so the workers get similar amounts of text
        std::vector<size_t> bounds = {0};
        size_t acc = 0;
        for (size_t k = 0; k < batch.size(); k++) {
            acc += batch[k].size();
            if (bounds.size() < (size_t)threads && acc * threads >= batch_bytes * bounds.size())
                bounds.push_back(k + 1);
        }
        while (bounds.size() <= (size_t)threads) bounds.push_back(batch.size());
        auto work = [&](int t) {
            ids[t].clear();
            ends[t].clear();
            nbytes[t].clear();
            std::string transformed;
            for (size_t k = bounds[t]; k < bounds[t + 1]; k++) {
                if (opt.caseops) {
                    caseops_encode(batch[k].data(), batch[k].size(), &transformed);
                    caseops_token_bytes(enc, transformed, &ids[t], &nbytes[t], &scratch[t]);
                } else {
                    spm_encode(enc, batch[k].data(), batch[k].size(), &ids[t], &scratch[t]);
                }
                ends[t].push_back(ids[t].size());
            }
        };
        std::vector<std::thread> pool;
        for (int t = 1; t < threads; t++) pool.emplace_back(work, t);
        work(0);
        for (auto& th : pool) th.join();
        for (int t = 0; t < threads; t++) {
            size_t begin = 0;
            for (size_t end : ends[t]) {
                if (in_val && (opt.val_tokens >= 0 ? val.total >= opt.val_tokens : docs_val >= opt.val_docs)) {
                    shard_close(val);  // the val split ends with its own (possibly short) file
                    in_val = false;
                }
                ShardWriter& w = in_val ? val : train;
                shard_put(w, m.bos_id);  // every document starts with BOS (no EOS), as the reference export
                for (size_t k = begin; k < end; k++) shard_put(w, ids[t][k], opt.caseops ? nbytes[t][k] : 0);
                (in_val ? docs_val : docs_train)++;
                begin = end;
            }
        }
    }
    shard_close(val);
    shard_close(train);
    write_manifest(m, outdir, val.total, train.total, opt.caseops);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("documents: %lld (val %lld, train %lld)\n", (long long)(docs_val + docs_train), (long long)docs_val,
           (long long)docs_train);
    printf("tokens: %lld (val %lld, train %lld), BOS included\n", (long long)(val.total + train.total),
           (long long)val.total, (long long)train.total);
    printf("files: %zu val, %zu train in %s\n", val.written.size(), train.written.size(), outdir.c_str());
    printf("text: %.1f MB in %.2f s, %.2f MB/s with %d thread(s)\n", text_bytes / 1e6, secs,
           text_bytes / 1e6 / (secs > 0 ? secs : 1e-9), threads);
    return 0;
}

static int tokenize_main(int argc, char** argv) {
    if (argc < 3) throw UsageError(argc < 2 ? "expected a subcommand" : "expected a MODEL path after the subcommand");
    std::string cmd = argv[1];
    std::vector<std::string> rest(argv + 3, argv + argc);
    static const char* known[] = {"encode", "decode", "info", "bytes", "charsmap", "shard"};
    if (std::find_if(std::begin(known), std::end(known), [&](const char* k) { return cmd == k; }) == std::end(known))
        throw UsageError("unknown subcommand \"" + cmd + "\"");
    for (const std::string& a : rest)
        if (cmd != "shard" && a.size() > 1 && a[0] == '-') throw UsageError(cmd + ": unknown option \"" + a + "\"");
    if ((cmd == "info" || cmd == "charsmap") && !rest.empty())
        throw UsageError(cmd + ": expected no argument after MODEL");
    ShardOptions opt;
    std::string outdir;
    std::vector<std::string> files = rest;
    if (cmd == "shard") {
        if (rest.empty()) throw UsageError("shard: expected OUTDIR after MODEL");
        outdir = rest[0];
        files.clear();
        bool val_docs_set = false;
        for (size_t k = 1; k < rest.size(); k++) {
            const std::string& a = rest[k];
            if (a.size() < 2 || a.compare(0, 2, "--") != 0) { files.push_back(a); continue; }
            if (k + 1 >= rest.size()) throw UsageError("shard: " + a + " expects a value");
            const char* v = rest[++k].c_str();
            if (a == "--format") {
                std::string f = v;
                if (f == "jsonl") opt.format = FORMAT_JSONL;
                else if (f == "text") opt.format = FORMAT_TEXT;
                else throw UsageError("--format: expected jsonl or text, found \"" + f + "\"");
            } else if (a == "--val-docs") { opt.val_docs = parse_count(a, v, INT64_MAX); val_docs_set = true; }
            else if (a == "--val-tokens") opt.val_tokens = parse_count(a, v, INT64_MAX);
            else if (a == "--shard-tokens") {
                opt.shard_tokens = parse_count(a, v, INT32_MAX);  // the header's N is an int32
                if (opt.shard_tokens == 0) throw UsageError("--shard-tokens: expected at least 1, found 0");
            } else if (a == "--transform") {
                std::string f = v;
                if (f == "caseops") opt.caseops = true;
                else if (f != "none") throw UsageError("--transform: expected none or caseops, found \"" + f + "\"");
            } else if (a == "--threads") {
                opt.threads = (int)parse_count(a, v, 64);
                if (opt.threads == 0) throw UsageError("--threads: expected 1..64, found 0");
            } else throw UsageError("shard: unknown option \"" + a + "\"");
        }
        if (val_docs_set && opt.val_tokens >= 0) throw UsageError("shard: give --val-docs or --val-tokens, not both");
    }
    SpmModel m = spm_load(argv[2]);
    if (cmd == "encode") return cmd_encode(m, files);
    if (cmd == "decode") return cmd_decode(m, files);
    if (cmd == "bytes") return cmd_bytes(m, files);
    if (cmd == "info") return cmd_info(m);
    if (cmd == "charsmap") return cmd_charsmap(m);
    return cmd_shard(m, outdir, opt, files);
}

#ifndef TOKENIZE_NO_MAIN
int main(int argc, char** argv) {
    static const char* usage =
        "usage: tokenize encode MODEL [FILE...]\n"
        "       tokenize decode MODEL [FILE...]\n"
        "       tokenize info MODEL\n"
        "       tokenize bytes MODEL [FILE...]\n"
        "       tokenize charsmap MODEL\n"
        "       tokenize shard MODEL OUTDIR [--format jsonl|text] [--val-docs N | --val-tokens N]\n"
        "                      [--shard-tokens N] [--threads N] [--transform none|caseops] [FILE...]\n";
    if (argc < 2) { fputs(usage, stderr); return 2; }
    try {
        return tokenize_main(argc, argv);
    } catch (const UsageError& e) {
        fprintf(stderr, "tokenize: %s (run without arguments for usage)\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        fprintf(stderr, "tokenize: %s\n", e.what());
        return 1;
    }
}
#endif
