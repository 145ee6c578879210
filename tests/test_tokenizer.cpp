// Tests of the SentencePiece loader, byte tables, encoder, decoder and JSONL reader.
// Expected values are facts decoded from the model files and checked against the sentencepiece
// library (pgolf's data spec), hand-worked BPE examples, and published FNV test vectors.
// Parity with spm_encode on real text is tests/test_tokenizer_parity.sh.
//
// Build: g++ -O2 -std=c++17 -Wall -Wextra -Itests -o tests/test_tokenizer tests/test_tokenizer.cpp
#include "harness.h"

#define TOKENIZE_NO_MAIN
#include "../tokenizer/tokenize.cpp"

#include <map>
#include <random>

// --- helpers ---------------------------------------------------------------------------------------

static std::string model_path(int vocab) {
    std::string name = "data/tokenizers/fineweb_" + std::to_string(vocab) + "_bpe.model";
    for (const char* prefix : {"", "../"}) {
        std::string p = prefix + name;
        if (FILE* f = fopen(p.c_str(), "rb")) { fclose(f); return p; }
    }
    return "";
}

static const SpmModel& model(int vocab) {  // loaded once per test binary
    static std::map<int, SpmModel> cache;
    auto it = cache.find(vocab);
    if (it != cache.end()) return it->second;
    std::string p = model_path(vocab);
    if (p.empty()) {
        if (vocab == 1024 || vocab == 8192)
            throw TestFailure("data/tokenizers/fineweb_" + std::to_string(vocab) + "_bpe.model is missing");
        SKIP("data/tokenizers/fineweb_" + std::to_string(vocab) + "_bpe.model not present");
    }
    return cache.emplace(vocab, spm_load(p)).first->second;
}

static const SpmEncoder& encoder(int vocab) {
    static std::map<int, SpmEncoder> cache;
    auto it = cache.find(vocab);
    if (it != cache.end()) return it->second;
    return cache.emplace(vocab, spm_encoder_build(model(vocab))).first->second;
}

static std::vector<int> enc(const SpmEncoder& e, const std::string& text) {
    SpmScratch sc;
    std::vector<int> ids;
    spm_encode(e, text.data(), text.size(), &ids, &sc);
    return ids;
}

static std::string read_file(const std::string& path) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) throw TestFailure("cannot open " + path);
    std::string s;
    char buf[65536];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, got);
    fclose(f);
    return s;
}

static std::string show(const std::vector<int>& ids) {
    std::string s = "[";
    for (size_t i = 0; i < ids.size(); i++) s += (i ? " " : "") + std::to_string(ids[i]);
    return s + "]";
}

#define CHECK_IDS(got, ...) do { std::vector<int> g_ = (got), w_ = {__VA_ARGS__}; \
    CHECK_MSG(g_ == w_, "got %s, want %s", show(g_).c_str(), show(w_).c_str()); } while (0)

// A protobuf writer, independent of the reader under test, to build small models.
static std::string pb_varint_bytes(uint64_t v) {
    std::string s;
    while (v >= 0x80) { s.push_back((char)((v & 0x7F) | 0x80)); v >>= 7; }
    s.push_back((char)v);
    return s;
}
static std::string pb_key_bytes(int field, int wire) { return pb_varint_bytes((uint64_t)field << 3 | (uint64_t)wire); }
static std::string pb_len_field(int field, const std::string& payload) {
    return pb_key_bytes(field, 2) + pb_varint_bytes(payload.size()) + payload;
}
static std::string pb_int_field(int field, int64_t v) { return pb_key_bytes(field, 0) + pb_varint_bytes((uint64_t)v); }
static std::string pb_float_field(int field, float f) {
    std::string s = pb_key_bytes(field, 5);
    char b[4];
    memcpy(b, &f, 4);
    return s + std::string(b, 4);
}

struct TinyPiece { std::string piece; float score; int type; };

static std::string tiny_piece_bytes(const TinyPiece& p) {
    std::string s = pb_len_field(1, p.piece) + pb_float_field(2, p.score);
    if (p.type != SPM_NORMAL) s += pb_int_field(3, p.type);
    return pb_len_field(1, s);
}

// A BPE model like the challenge's (specials 0-3, identity normalizer, no dummy prefix) over `normal`.
static std::string tiny_model_bytes(const std::vector<TinyPiece>& normal, bool byte_fallback = false,
                                    bool byte_pieces = false) {
    std::vector<TinyPiece> all = {
        {"<pad>", 0, SPM_CONTROL}, {"<s>", 0, SPM_CONTROL}, {"</s>", 0, SPM_CONTROL}, {"<unk>", 0, SPM_UNKNOWN}};
    if (byte_pieces)
        for (int b = 0; b < 256; b++) {
            char name[8];
            snprintf(name, sizeof name, "<0x%02X>", b);
            all.push_back({name, 0, SPM_BYTE});
        }
    all.insert(all.end(), normal.begin(), normal.end());
    std::string s;
    for (auto& p : all) s += tiny_piece_bytes(p);
    std::string trainer = pb_int_field(3, SPM_BPE) + pb_int_field(4, (int64_t)all.size()) +
                          pb_int_field(35, byte_fallback) + pb_int_field(40, 3) + pb_int_field(41, 1) +
                          pb_int_field(42, 2) + pb_int_field(43, 0);
    s += pb_len_field(2, trainer);
    s += pb_len_field(3, pb_len_field(1, "identity") + pb_int_field(3, 0));
    return s;
}

// table: the pieces of the tiny model, rows of data
static std::vector<TinyPiece> tiny_vocab() {
    return {{"ab", -1, SPM_NORMAL}, {"bc", -0.5f, SPM_NORMAL}, {"aa", -2, SPM_NORMAL}, {"\xE2\x96\x81" "a", -3, SPM_NORMAL},
            {"a", -10, SPM_NORMAL}, {"b", -11, SPM_NORMAL}, {"c", -12, SPM_NORMAL},
            {"\xE2\x96\x81", -13, SPM_NORMAL}, {"\xC3\xA9", -14, SPM_NORMAL}};
}
// end table

// --- checksum ----------------------------------------------------------------------------------------

TEST(fnv1a64_published_vectors) {
    CHECK(fnv1a64("", 0) == 0xcbf29ce484222325ull);
    CHECK(fnv1a64("a", 1) == 0xaf63dc4c8601ec8cull);
    CHECK(fnv1a64("foobar", 6) == 0x85944171f73967e8ull);
}

// --- model facts -------------------------------------------------------------------

// table: the 84 single-character pieces of the 1024 model, in id order
static const char* SINGLE_CHARS[84] = {
    "\xE2\x96\x81", "e", "t", "a", "o", "i", "n", "s", "r", "h", "l", "d", "c", "u", "m", "p", "g", "f", "y", "w", "b", ".", "v", ",",
    "k", "T", "I", "S", "A", "-", "C", "0", "1", "M", "P", "B", "x", "2", "W", "D", "R", "E", "H", "F", "L", "O", "N",
    "\xE2\x80\x99", "'", ":", "G", "j", ")", "3", "(", "z", "5", "q", "\"", "U", "4", "J", "9", "6", "8", "V", "Y", "K", "7",
    "!", "|", "/", "?", "\xE2\x80\x9C", "\xE2\x80\x9D", ";", "\xE2\x80\x93", "&", "$", "\xE2\x80\x94", "Q", "X", "%", "Z"};
// end table

TEST(model_1024_facts) {
    const SpmModel& m = model(1024);
    CHECK(m.pieces.size() == 1024 && m.scores.size() == 1024 && m.types.size() == 1024);
    CHECK(m.file_bytes == 253847);
    std::string bytes = read_file(m.path);
    CHECK(m.checksum == fnv1a64(bytes.data(), bytes.size()));
    CHECK(m.model_type == SPM_BPE && m.trainer_vocab_size == 1024);
    CHECK(!m.byte_fallback && !m.treat_whitespace_as_suffix);
    CHECK(m.unk_id == 3 && m.bos_id == 1 && m.eos_id == 2 && m.pad_id == 0);
    CHECK(m.unk_surface == " \xE2\x81\x87 ");
    CHECK(m.pieces[0] == "<pad>" && m.pieces[1] == "<s>" && m.pieces[2] == "</s>" && m.pieces[3] == "<unk>");
    CHECK(m.types[0] == SPM_CONTROL && m.types[1] == SPM_CONTROL && m.types[2] == SPM_CONTROL &&
          m.types[3] == SPM_UNKNOWN);
    for (int i = 0; i < 4; i++) CHECK(m.scores[i] == 0.0f);
    for (int i = 4; i < 1024; i++) {
        CHECK_MSG(m.types[i] == SPM_NORMAL, "id %d type %d", i, m.types[i]);
        CHECK_MSG(m.scores[i] == -(float)(i - 4), "id %d score %g", i, m.scores[i]);
    }
    for (int i = 0; i < 84; i++)
        CHECK_MSG(m.pieces[940 + i] == SINGLE_CHARS[i], "id %d is \"%s\"", 940 + i, m.pieces[940 + i].c_str());
    int lead = 0, space_inside = 0;
    for (int i = 4; i < 1024; i++) {
        if (m.pieces[i].compare(0, 3, SPM_SPACE) == 0) lead++;
        if (m.pieces[i].find(SPM_SPACE, 1) != std::string::npos) space_inside++;
    }
    CHECK(lead == 476 && space_inside == 0);
    CHECK(m.pieces[4] == "\xE2\x96\x81t" && m.pieces[11] == "\xE2\x96\x81the" && m.pieces[23] == "ing" &&
          m.pieces[97] == "\xE2\x96\x81The");
    CHECK(m.pieces[650] == "\xE2\x96\x81information" && m.pieces[939] == "\xE2\x96\x81water" &&
          m.pieces[255] == "\xE2\x96\x81\xE2\x80\x9C");
    CHECK(m.normalizer.name == "nmt_nfkc" && m.normalizer.precompiled_charsmap.size() == 240007);
    CHECK(!m.normalizer.add_dummy_prefix && m.normalizer.remove_extra_whitespaces && m.normalizer.escape_whitespaces);
    CHECK(!m.has_denormalizer);
}

TEST(model_8192_facts) {
    const SpmModel& m = model(8192);
    CHECK(m.pieces.size() == 8192 && m.file_bytes == 370917);
    CHECK(m.byte_fallback && m.model_type == SPM_BPE);
    CHECK(m.unk_id == 3 && m.bos_id == 1 && m.eos_id == 2 && m.pad_id == 0);
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        CHECK_MSG(m.pieces[4 + b] == name && m.types[4 + b] == SPM_BYTE, "id %d is \"%s\"", 4 + b,
                  m.pieces[4 + b].c_str());
    }
    for (int i = 260; i < 8192; i++)
        CHECK_MSG(m.types[i] == SPM_NORMAL && m.scores[i] == -(float)(i - 260), "id %d", i);
    for (int i = 0; i < 84; i++) CHECK(m.pieces[8108 + i] == SINGLE_CHARS[i]);
    CHECK(m.normalizer.precompiled_charsmap == model(1024).normalizer.precompiled_charsmap);
}

TEST(model_2048_4096_facts) {
    for (int v : {2048, 4096}) {
        const SpmModel& m = model(v);
        CHECK(m.pieces.size() == (size_t)v && !m.byte_fallback);
        for (int i = 0; i < 84; i++) CHECK(m.pieces[v - 84 + i] == SINGLE_CHARS[i]);
        CHECK(m.normalizer.precompiled_charsmap == model(1024).normalizer.precompiled_charsmap);
    }
}

// --- byte tables (the reference's build_sentencepiece_luts)
// -------------------------------------------------------------------

TEST(byte_luts_1024) {
    const SpmModel& m = model(1024);
    ByteLuts t = spm_byte_luts(m, 1024);
    CHECK(t.base_bytes.size() == 1024 && t.has_leading_space.size() == 1024 && t.is_boundary.size() == 1024);
    long sum = 0, lead = 0;
    std::map<int, int> hist;
    for (int i = 0; i < 1024; i++) { sum += t.base_bytes[i]; lead += t.has_leading_space[i]; hist[t.base_bytes[i]]++; }
    CHECK(sum == 3058 && lead == 476);
    std::map<int, int> want = {{0, 1 + 4}, {1, 129}, {2, 247}, {3, 327}, {4, 194}, {5, 83},
                               {6, 23},    {7, 10},  {8, 1},   {9, 4},   {11, 1}};
    CHECK(hist == want);  // the spec's histogram covers the 1020 NORMAL pieces; the 4 specials add 4 zeros
    CHECK(t.base_bytes[940] == 0 && t.has_leading_space[940] && !t.is_boundary[940]);
    for (int i = 0; i < 4; i++) CHECK(t.is_boundary[i] && t.base_bytes[i] == 0 && !t.has_leading_space[i]);
    CHECK(t.base_bytes[650] == 11 && t.has_leading_space[650]);  // "▁information"
    CHECK(t.base_bytes[1019] == 3 && !t.has_leading_space[1019]); // "—" is 3 UTF-8 bytes
    ByteLuts big = spm_byte_luts(m, 1100);  // ids past the vocabulary: 0-byte boundaries
    CHECK(big.base_bytes.size() == 1100);
    for (int i = 1024; i < 1100; i++) CHECK(big.is_boundary[i] && big.base_bytes[i] == 0 && !big.has_leading_space[i]);
    CHECK(spm_byte_luts(m, 10).base_bytes.size() == 1024);
}

TEST(byte_luts_8192) {
    ByteLuts t = spm_byte_luts(model(8192), 8192);
    for (int i = 4; i < 260; i++) CHECK(t.base_bytes[i] == 1 && !t.is_boundary[i] && !t.has_leading_space[i]);
    CHECK(t.base_bytes[8108] == 0 && t.has_leading_space[8108]);
    for (int i = 0; i < 4; i++) CHECK(t.is_boundary[i]);
}

// --- charsmap (nmt_nfkc) ---------------------------------------------------------------------

static std::string normalize(int vocab, const std::string& s) {
    std::string out;
    spm_normalize(encoder(vocab).normalizer, s.data(), s.size(), &out);
    return out;
}

TEST(charsmap_rules) {
    const SpmModel& m = model(1024);
    SpmCharsmap cm = spm_charsmap_parse(m.normalizer.precompiled_charsmap, m.path);
    CHECK(cm.units.size() == 44800 && cm.pool.size() == 60803);
    auto rules = spm_charsmap_rules(cm);
    CHECK_MSG(rules.size() == 225262, "%zu rules", rules.size());
    std::map<std::string, std::string> r(rules.begin(), rules.end());
    CHECK(r.size() == rules.size());
    CHECK(r["\n"] == " " && r["\t"] == " " && r["\r"] == " ");
    CHECK(r["\xEF\xAC\x81"] == "fi");                  // ﬁ
    CHECK(r["e\xCC\x81"] == "\xC3\xA9");               // e + U+0301 -> é
    CHECK(r["\xC2\xBD"] == "1\xE2\x81\x84" "2");       // ½ -> 1⁄2
    CHECK(r["\xE2\x96\x81"] == " " && r["\xEF\xBF\xBD"] == " " && r["\xC2\xA0"] == " ");
    CHECK(r.count("\x01") && r["\x01"].empty() && r["\x7F"].empty());
    int to_space = 0, with_space = 0, ends_space = 0;
    size_t max_key = 0, max_repl = 0;
    for (auto& kv : rules) {
        to_space += kv.second == " ";
        with_space += kv.second.find(' ') != std::string::npos;
        ends_space += !kv.second.empty() && kv.second.back() == ' ';
        max_key = std::max(max_key, kv.first.size());
        max_repl = std::max(max_repl, kv.second.size());
    }
    CHECK_MSG(to_space == 29, "%d rules map to a single space", to_space);
    CHECK_MSG(with_space == 29 + 52, "%d rules contain a space", with_space);
    CHECK(ends_space == 29);
    CHECK(max_key == 12 && max_repl == 33);
}

TEST(normalize_rules) {
    CHECK(normalize(1024, "  Hello \t\n world  ") == "Hello\xE2\x96\x81world");
    CHECK(normalize(1024, " \t\r\n\xC2\xA0 ").empty());
    CHECK(normalize(1024, "").empty());
    CHECK(normalize(1024, "\x01\x02").empty());
    CHECK(normalize(1024, "A\x01" "B") == "AB");
    CHECK(normalize(1024, "a \x01 b") == "a\xE2\x96\x81" "b");               // deleted char keeps the space state
    CHECK(normalize(1024, "\xEF\xAC\x81ne") == "fine");
    CHECK(normalize(1024, "caf" "e\xCC\x81") == "caf\xC3\xA9");
    CHECK(normalize(1024, "a\xC2\xB4" "b") == "a\xE2\x96\x81\xCC\x81" "b");   // ´ -> space + combining acute
    CHECK(normalize(1024, "\xFF" "a") == "\xEF\xBF\xBD" "a");                 // invalid byte -> U+FFFD
    CHECK(normalize(1024, "\xE2\x96") == "\xEF\xBF\xBD\xEF\xBF\xBD");         // truncated: one U+FFFD per byte
    CHECK(normalize(1024, "x\xEF\xBF\xBDy") == "x\xE2\x96\x81y");             // a real U+FFFD is a space
    CHECK(normalize(1024, std::string("a\0b", 3)) == std::string("a\0b", 3)); // NUL matches no rule
}

// --- encoding ------------------------------------------------------------------------

TEST(encode_examples_1024) {
    const SpmEncoder& e = encoder(1024);
    CHECK_IDS(enc(e, "Hello world"), 982, 211, 944, 706);
    CHECK_IDS(enc(e, "Hello\n\nworld"), 982, 211, 944, 706);
    CHECK_IDS(enc(e, "A\x01" "B"), 968, 975);
    // 日本語のテキスト
    CHECK_IDS(
        enc(e, "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E\xE3\x81\xAE\xE3\x83\x86\xE3\x82\xAD\xE3\x82\xB9\xE3\x83\x88"), 3);
    CHECK_IDS(enc(e, "\xF0\x9F\x98\x80\xF0\x9F\x98\x80"), 3);  // two emoji: one <unk>
    CHECK_IDS(enc(e, "\xC3\xA9"), 3);
    CHECK(enc(e, "").empty() && enc(e, "   \n ").empty());
    const SpmModel& m = model(1024);
    auto pieces = [&](const std::vector<int>& ids) {
        std::vector<std::string> p;
        for (int id : ids) p.push_back(m.pieces[id]);
        return p;
    };
    const std::string S = SPM_SPACE;
    CHECK(pieces(enc(e, "  leading")) == (std::vector<std::string>{"le", "ad", "ing"}));
    CHECK(pieces(enc(e, "In 2024,")) == (std::vector<std::string>{"I", "n", S, "2", "0", "2", "4", ","}));
    for (const char* s : {"x\xC2\xA0y", "x\xEF\xBF\xBDy", "x\xE2\x96\x81y"})
        CHECK(pieces(enc(e, s)) == (std::vector<std::string>{"x", S + "y"}));
    CHECK(pieces(enc(e, "a\xC2\xB4" "b")) == (std::vector<std::string>{"a", S, "<unk>", "b"}));
    // unk runs stop at known pieces
    CHECK(pieces(enc(e, "a # b")) == (std::vector<std::string>{"a", S, "<unk>", S + "b"}));
}

TEST(encode_byte_fallback_8192) {
    const SpmEncoder& e = encoder(8192);
    CHECK_IDS(enc(e, "\xC3\xA9"), 0xC3 + 4, 0xA9 + 4);
    CHECK_IDS(enc(e, "\xF0\x9F\x98\x80\xF0\x9F\x98\x80"), 0xF4, 0x9F + 4, 0x98 + 4, 0x84, 0xF4, 0x9F + 4, 0x98 + 4,
              0x84);
    std::vector<int> ids = enc(e, "\xFF");  // invalid byte -> U+FFFD -> its three bytes
    CHECK_IDS(ids, 0xEF + 4, 0xBF + 4, 0xBD + 4);
}

TEST(encode_hand_worked_bpe) {
    SpmModel m = spm_load_bytes(tiny_model_bytes(tiny_vocab()), "tiny.model");
    SpmEncoder e = spm_encoder_build(m);
    auto id = [&](const std::string& p) {
        for (size_t i = 0; i < m.pieces.size(); i++)
            if (m.pieces[i] == p) return (int)i;
        return -1;
    };
    // "abc": bc (-0.5) is merged before ab (-1), so ab never forms
    CHECK_IDS(enc(e, "abc"), id("a"), id("bc"));
    // "b aa": aa (-2) is merged before ▁a (-3)
    CHECK_IDS(enc(e, "b aa"), id("b"), id("\xE2\x96\x81"), id("aa"));
    CHECK_IDS(enc(e, "abab"), id("ab"), id("ab"));
    // "aaa": two equal "aa" candidates, the leftmost wins
    CHECK_IDS(enc(e, "aaa"), id("aa"), id("a"));
    // "ab a": ab (-1) first, then ▁a (-3)
    CHECK_IDS(enc(e, "ab a"), id("ab"), id("\xE2\x96\x81" "a"));
    // unknown characters: one <unk> per run
    CHECK_IDS(enc(e, "xyz"), 3);
    CHECK_IDS(enc(e, "axyb"), id("a"), 3, id("b"));
    CHECK_IDS(enc(e, "x y"), 3, id("\xE2\x96\x81"), 3);
    // identity normalizer: é stays é
    CHECK_IDS(enc(e, "\xC3\xA9"), id("\xC3\xA9"));
    // the same vocabulary with byte fallback: unknown characters become bytes, runs are not merged
    SpmModel mb = spm_load_bytes(tiny_model_bytes(tiny_vocab(), true, true), "tiny_bytes.model");
    SpmEncoder eb = spm_encoder_build(mb);
    CHECK_IDS(enc(eb, "xy"), 'x' + 4, 'y' + 4);
    CHECK_IDS(enc(eb, "\xC3\xA8"), 0xC3 + 4, 0xA8 + 4);
}

// --- decoding -------------------------------------------------------------------------

TEST(decode_rules) {
    const SpmModel& m = model(1024);
    auto dec = [&](const SpmModel& mm, std::vector<int> ids) { return spm_decode(mm, ids.data(), ids.size()); };
    CHECK(dec(m, {940, 63}) == "you");                     // leading ▁ dropped while the output is empty
    CHECK(dec(m, {63, 940, 3}) == "you  \xE2\x81\x87 ");    // later ▁ is a space; <unk> is " ⁇ "
    CHECK(dec(m, {1, 982, 211, 944, 706, 2, 0}) == "Hello world");
    CHECK(dec(m, {1, 940, 940, 63}) == "you");             // control pieces print nothing
    CHECK(dec(m, {}).empty());
    CHECK_THROWS(dec(m, {5, 1024}), "outside the vocabulary");
    CHECK_THROWS(dec(m, {-1}), "outside the vocabulary");
    const SpmModel& b = model(8192);
    CHECK(dec(b, {0xC3 + 4, 0xA9 + 4}) == "\xC3\xA9");
    CHECK(dec(b, {0xC3 + 4}) == "\xEF\xBF\xBD");            // an incomplete character: U+FFFD per byte
    CHECK(dec(b, {0xC3 + 4, 'a' + 4}) == "\xEF\xBF\xBD" "a");
    CHECK(dec(b, {0xC3 + 4, 1, 0xA9 + 4}) == "\xEF\xBF\xBD\xEF\xBF\xBD");  // a control piece ends the byte run
}

TEST(decode_inverts_encode_on_unk_free_text) {
    const std::string S = SPM_SPACE;
    for (int v : {1024, 8192}) {
        for (const char* text : {"The  quick\tbrown fox, 1999 “quoted” — dash.",
                                 "  \xEF\xAC\x81ne caf"
                                 "e\xCC\x81 ",
                                 "x\xC2\xA0y"}) {
            std::vector<int> ids = enc(encoder(v), text);
            if (v == 1024 && std::find(ids.begin(), ids.end(), 3) != ids.end()) continue;
            std::string want = normalize(v, text);
            for (size_t k; (k = want.find(S)) != std::string::npos;) want.replace(k, 3, " ");
            CHECK_MSG(spm_decode(model(v), ids.data(), ids.size()) == want, "vocab %d text \"%s\"", v, text);
        }
    }
}

// --- JSONL documents ---------------------------------------------------------------------------------

static std::string json_text(const std::string& line) {
    std::string text, err;
    if (!json_text_field(line, &text, &err)) throw std::runtime_error(err);
    return text;
}

TEST(json_text_field_parses) {
    CHECK(json_text("{\"text\": \"hello\"}") == "hello");
    CHECK(
        json_text(
            "  {\"id\":7,\"text\":\"a\",\"meta\":{\"x\":[1,-2.5e-3,0,true,false,null,{\"y\":\"z\"},[]],\"e\":{}}}  ") ==
        "a");
    CHECK(json_text("{\"text\":\"q\\\"\\\\\\/\\b\\f\\n\\r\\t\"}") == "q\"\\/\b\f\n\r\t");
    CHECK(json_text("{\"text\":\"\\u00e9\\u20AC\\ud83d\\ude00\"}") == "\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80");
    CHECK(json_text("{\"text\":\"\\u0000x\"}") == std::string("\0x", 2));
    CHECK(json_text("{\"text\":\"first\",\"text\":\"last\"}") == "last");
    CHECK(json_text("{\"text\":\"\xC3\xA9 raw UTF-8\"}") == "\xC3\xA9 raw UTF-8");
    CHECK(json_text("{\"text\":\"\"}").empty());
    CHECK(json_text("{\"texts\":1,\"text\":\"t\"}") == "t");
}

TEST(json_text_field_rejects) {
    CHECK_THROWS(json_text(""), "expected a JSON object");
    CHECK_THROWS(json_text("[\"text\"]"), "expected a JSON object");
    CHECK_THROWS(json_text("{\"id\": 1}"), "member \"text\"");
    CHECK_THROWS(json_text("{\"text\": 5}"), "to be a string");
    CHECK_THROWS(json_text("{\"text\": \"a\"} x"), "end of the line");
    CHECK_THROWS(json_text("{\"text\": \"a}"), "closing");
    CHECK_THROWS(json_text("{\"text\": \"a\tb\"}"), "control character");
    CHECK_THROWS(json_text("{\"text\": \"\\x41\"}"), "expected an escape");
    CHECK_THROWS(json_text("{\"text\": \"\\u12\"}"), "hex digits");
    CHECK_THROWS(json_text("{\"text\": \"\\ud83d\"}"), "low surrogate");
    CHECK_THROWS(json_text("{\"text\": \"\\ud83dx\"}"), "low surrogate");
    CHECK_THROWS(json_text("{\"text\": \"\\ude00\"}"), "high surrogate");
    CHECK_THROWS(json_text("{\"text\": \"a\", \"n\": 01}"), "expected ','");
    CHECK_THROWS(json_text("{\"text\": \"a\", \"n\": -}"), "expected a digit");
    CHECK_THROWS(json_text("{\"text\": \"a\", \"n\": 1.}"), "after '.'");
    CHECK_THROWS(json_text("{\"text\": \"a\", \"n\": tru}"), "expected a value");
    CHECK_THROWS(json_text("{\"text\": \"a\",}"), "expected '\"'");
    CHECK_THROWS(json_text("{\"text\" \"a\"}"), "expected ':'");
    CHECK_THROWS(json_text("{\"text\": \"a\""), "expected ',' or '}'");
    CHECK_THROWS(json_text("{\"a\": [1 2], \"text\": \"a\"}"), "expected ',' or ']'");
    CHECK_THROWS(json_text("{\"a\": " + std::string(100000, '[') + "}"), "depth");
}

static std::string write_temp(const std::string& name, const std::string& content) {
    std::string path = "/tmp/pgolf_test_tokenizer_" + std::to_string(getpid()) + "_" + name;
    FILE* f = fopen(path.c_str(), "wb");
    if (!f) throw TestFailure("cannot write " + path);
    fwrite(content.data(), 1, content.size(), f);
    fclose(f);
    return path;
}

static std::vector<std::string> read_docs(const std::vector<std::string>& files, DocFormat format = FORMAT_AUTO) {
    DocReader d;
    d.inputs = files;
    d.requested = format;
    std::vector<std::string> docs;
    std::string doc;
    while (doc_reader_next(d, &doc)) docs.push_back(doc);
    return docs;
}

TEST(document_reader) {
    std::string text = write_temp("a.txt", "\n  \nfirst line\nsecond line\n\n\n \t\nthird\r\n\nfourth");
    std::string jsonl = write_temp("b.jsonl", "{\"text\": \"j1\"}\n\n{\"text\": \"j2\\nx\"}\n");
    std::string sniffed = write_temp("c.data", "\n   {\"text\": \"s1\"}\n{\"text\": \"s2\"}");
    std::string bad = write_temp("d.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{\"text\": oops}\n");
    auto docs = read_docs({text, jsonl, sniffed});
    std::vector<std::string> want = {"first line\nsecond line", "third\r", "fourth", "j1", "j2\nx", "s1", "s2"};
    CHECK(docs == want);
    CHECK(read_docs({jsonl}, FORMAT_TEXT) ==
          (std::vector<std::string>{"{\"text\": \"j1\"}", "{\"text\": \"j2\\nx\"}"}));
    CHECK_THROWS(read_docs({bad}), bad + ":3: malformed JSONL");
    CHECK_THROWS(read_docs({"/nonexistent/file.txt"}), "/nonexistent/file.txt: cannot open");
    for (auto& p : {text, jsonl, sniffed, bad}) remove(p.c_str());
}

// --- corrupt models: errors name the file and offset, never a crash ------------------------------------------

// Loads bytes that may be corrupt; the load must succeed or throw a runtime_error naming `path`.
// When it loads, building an encoder and encoding must not crash either.
static bool load_or_clean_error(const std::string& bytes, const std::string& path) {
    SpmModel m;
    try {
        m = spm_load_bytes(bytes, path);
    } catch (const std::runtime_error& e) {
        std::string msg = e.what();
        if (msg.find(path) == std::string::npos) throw TestFailure("error lacks the path: " + msg);
        if (msg.find("byte offset") == std::string::npos) throw TestFailure("error lacks the offset: " + msg);
        return false;
    }
    try {
        SpmEncoder e = spm_encoder_build(m);
        std::vector<int> ids =
            enc(e, "Hello w\xC3\xB6rld \xEF\xAC\x81 e\xCC\x81 \xFF\xE2\x96\x81 \xF0\x9F\x98\x80 abc");
        for (int id : ids) if (id < 0 || id >= (int)m.pieces.size()) throw TestFailure("encoded id out of range");
        spm_decode(m, ids.data(), ids.size());
        spm_byte_luts(m, 1024);
    } catch (const TestFailure&) {
        throw;
    } catch (const std::runtime_error& e) {
        if (std::string(e.what()).find(path) == std::string::npos)
            throw TestFailure(std::string("error lacks the path: ") + e.what());
    }
    return true;
}

TEST(corrupt_model_truncations) {
    std::string tiny = tiny_model_bytes(tiny_vocab());
    CHECK(load_or_clean_error(tiny, "tiny.model"));
    for (size_t cut = 0; cut < tiny.size(); cut++)
        CHECK_MSG(!load_or_clean_error(tiny.substr(0, cut), "tiny.model"), "prefix of %zu bytes loaded", cut);
    std::string real = read_file(model(1024).path);
    std::mt19937 rng(1);
    for (int k = 0; k < 300; k++) {
        size_t cut = rng() % real.size();
        CHECK_MSG(!load_or_clean_error(real.substr(0, cut), "real.model"), "prefix of %zu bytes loaded", cut);
    }
    CHECK_THROWS(spm_load_bytes(tiny.substr(0, tiny.size() - 1), "tiny.model"), "tiny.model: byte offset");
}

TEST(corrupt_model_byte_flips) {
    std::mt19937 rng(2);
    std::string tiny = tiny_model_bytes(tiny_vocab(), true, true);
    for (int k = 0; k < 3000; k++) {
        std::string b = tiny;
        for (int f = 0, n = 1 + (int)(rng() % 3); f < n; f++) b[rng() % b.size()] ^= (char)(1 + rng() % 255);
        load_or_clean_error(b, "flip.model");
    }
    std::string real = read_file(model(1024).path);
    for (int k = 0; k < 200; k++) {
        std::string b = real;
        // half of the flips land in the charsmap, so the trie and replacement pool get corrupted too
        size_t at = k % 2 ? real.size() - 1 - rng() % 240000 : rng() % real.size();
        b[at] ^= (char)(1 + rng() % 255);
        load_or_clean_error(b, "flip.model");
    }
}

TEST(corrupt_model_specific_errors) {
    std::vector<TinyPiece> v = tiny_vocab();
    std::string base = tiny_model_bytes(v);
    CHECK_THROWS(spm_load_bytes(pb_key_bytes(1, 3) + base, "m"), "group wire type 3");
    CHECK_THROWS(spm_load_bytes(pb_key_bytes(9, 4) + base, "m"), "group wire type 4");
    CHECK_THROWS(spm_load_bytes(pb_key_bytes(9, 7) + base, "m"), "found 7");
    CHECK_THROWS(spm_load_bytes(pb_int_field(1, 5) + base, "m"), "expected wire type 2, found 0");
    CHECK_THROWS(spm_load_bytes(pb_key_bytes(0, 0) + base, "m"), "field number");
    CHECK_THROWS(spm_load_bytes(pb_key_bytes(1, 2) + pb_varint_bytes(1u << 30) + base, "m"),
                 "expected a length within");
    CHECK_THROWS(spm_load_bytes(pb_key_bytes(9, 0) + std::string(11, '\xFF') + base, "m"), "at most 10 bytes");
    CHECK_THROWS(spm_load_bytes("", "empty.model"), "empty.model: byte offset 0: expected a trainer_spec");
    // unknown fields of every wire type are skipped
    SpmModel ok = spm_load_bytes(pb_int_field(99, 7) + pb_len_field(98, "xyz") + pb_key_bytes(97, 1) + "12345678" +
                                 pb_key_bytes(96, 5) + "1234" + base, "m");
    CHECK(ok.pieces.size() == v.size() + 4);
    // a negative int32 is a 10-byte varint
    CHECK(spm_load_bytes(base + pb_len_field(2, pb_int_field(43, -1)), "m").pad_id == -1);
    // vocabulary rules
    auto with = [&](std::vector<TinyPiece> extra, bool bf = false, bool bytes = false) {
        std::vector<TinyPiece> all = v;
        all.insert(all.end(), extra.begin(), extra.end());
        return tiny_model_bytes(all, bf, bytes);
    };
    CHECK_THROWS(spm_load_bytes(with({{"ab", 0, SPM_NORMAL}}), "m"), "unique pieces");
    CHECK_THROWS(spm_load_bytes(with({{"<unk2>", 0, SPM_UNKNOWN}}), "m"), "exactly one UNKNOWN piece, found 2");
    CHECK_THROWS(spm_load_bytes(with({{"", 0, SPM_NORMAL}}), "m"), "non-empty piece");
    CHECK_THROWS(spm_load_bytes(with({{"z", 0, 9}}), "m"), "piece type in 1..6");
    CHECK_THROWS(spm_load_bytes(with({{"<0x41>", 0, SPM_BYTE}}), "m"),
                 "byte_fallback is false: expected 0 BYTE pieces, found 1");
    CHECK_THROWS(spm_load_bytes(with({}, true, false), "m"), "expected 256 BYTE pieces, found 0");
    CHECK_THROWS(spm_load_bytes(with({{"<0xZZ>", 0, SPM_BYTE}}, true, true), "m"), "named <0xXX>");
    std::string no_unknown;
    for (auto& p : std::vector<TinyPiece>{
             {"<pad>", 0, SPM_CONTROL}, {"<s>", 0, SPM_CONTROL}, {"</s>", 0, SPM_CONTROL}, {"a", 0, SPM_NORMAL}})
        no_unknown += tiny_piece_bytes(p);
    no_unknown += pb_len_field(2, pb_int_field(3, 2)) + pb_len_field(3, "");
    CHECK_THROWS(spm_load_bytes(no_unknown, "m"), "exactly one UNKNOWN piece, found 0");
    std::string three = tiny_piece_bytes({"<unk>", 0, SPM_UNKNOWN}) + pb_len_field(2, "") + pb_len_field(3, "");
    CHECK_THROWS(spm_load_bytes(three, "m"), "at least 4 pieces");
    CHECK_THROWS(spm_load("/nonexistent/x.model"), "/nonexistent/x.model: cannot open");
    // a charsmap whose header claims more than it holds
    std::string bad_map = base + pb_len_field(3, pb_len_field(2, std::string("\xFF\xFF\x00\x00" "abcd", 8)));
    CHECK_THROWS(spm_encoder_build(spm_load_bytes(bad_map, "m")), "precompiled_charsmap");
}

// --- command line ---------------------------------------------------------------------------------

static void run_cli(std::vector<std::string> args) {
    args.insert(args.begin(), "tokenize");
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(&a[0]);
    tokenize_main((int)argv.size(), argv.data());
}

TEST(cli_usage_errors) {
    std::string m = model_path(1024);
    CHECK_THROWS(run_cli({"frobnicate", m}), "unknown subcommand \"frobnicate\"");
    CHECK_THROWS(run_cli({"encode"}), "expected a MODEL");
    CHECK_THROWS(run_cli({"info", m, "extra"}), "expected no argument");
    CHECK_THROWS(run_cli({"encode", m, "--bogus"}), "unknown option");
    CHECK_THROWS(run_cli({"shard", m}), "expected OUTDIR");
    CHECK_THROWS(run_cli({"shard", m, "/tmp/x", "--format", "xml"}), "expected jsonl or text");
    CHECK_THROWS(run_cli({"shard", m, "/tmp/x", "--shard-tokens", "2147483648"}),
                 "--shard-tokens: expected an integer in 0..2147483647");
    CHECK_THROWS(run_cli({"shard", m, "/tmp/x", "--shard-tokens", "0"}), "at least 1");
    CHECK_THROWS(run_cli({"shard", m, "/tmp/x", "--val-docs", "-3"}), "--val-docs");
    CHECK_THROWS(run_cli({"shard", m, "/tmp/x", "--val-docs", "1", "--val-tokens", "5"}), "not both");
    CHECK_THROWS(run_cli({"shard", m, "/tmp/x", "--threads"}), "expects a value");
    CHECK_THROWS(run_cli({"encode", "/nonexistent.model"}), "/nonexistent.model: cannot open");
    CHECK_THROWS(run_cli({"encode", m, "/nonexistent.txt"}), "/nonexistent.txt: cannot open");
}

// --- CaseOps (PR #1729's lossless case transform) and the per-token byte sidecar ------------------------

static std::string co_enc(const std::string& s) { std::string o; caseops_encode(s.data(), s.size(), &o); return o; }
static const std::string CT = "\xEE\x80\x81", CA = "\xEE\x80\x82", CN = "\xEE\x80\x83", CE = "\xEE\x80\x84";

// Hand-worked examples of every rule, from the rules of lossless_caps_caseops_v1.
TEST(caseops_examples) {
    CHECK(co_enc("The NASA Launch") == CT + "the " + CA + "nasa " + CT + "launch");
    CHECK(co_enc("a I x") == "a " + CT + "i x");                                   // one capital: Title
    CHECK(co_enc("iPhone McDonald") == "i" + CN + "phone " + CT + "mc" + CN + "donald");
    CHECK(co_enc("ABc") == CT + "a" + CN + "bc");                                  // not ALLCAPS: mixed
    // non-ASCII splits words
    CHECK(co_enc("caf\xC3\xA9 \xC3\x89T\xC3\x89") == "caf\xC3\xA9 \xC3\x89" + CT + "t\xC3\x89");
    CHECK(co_enc("x" + CT + "Y") == "x" + CE + CT + CT + "y");                     // a literal operator is escaped
    CHECK(co_enc("AB1cd") == CA + "ab1cd");
    std::string out, err;
    CHECK(!caseops_decode("A", 1, &out, &err) && err.find("upper-case") != std::string::npos);
    std::string bad = CT + "1";
    CHECK(!caseops_decode(bad.data(), bad.size(), &out, &err) &&
          err.find("not followed by a letter") != std::string::npos);
    bad = "ab" + CA;
    CHECK(!caseops_decode(bad.data(), bad.size(), &out, &err));
    bad = CT + "a" + CN + "b";  // decodes to "AB", whose canonical form is ALLCAPS + "ab"
    CHECK(!caseops_decode(bad.data(), bad.size(), &out, &err) && err.find("canonical") != std::string::npos);
    bad = CE + "x";
    CHECK(!caseops_decode(bad.data(), bad.size(), &out, &err));
}

// Random byte strings over an alphabet rich in letters, operator bytes and broken UTF-8: decode(encode(x))
// is x, and decode accepts encode's output only (a mutated output is either rejected or re-encodes to itself).
TEST(caseops_fuzz_round_trip) {
    std::mt19937_64 rng(20240520);
    const std::vector<std::string> atoms = {"a",
                                            "z",
                                            "A",
                                            "Z",
                                            "q",
                                            "Q",
                                            " ",
                                            "1",
                                            "\n",
                                            "\xEE",
                                            "\x80",
                                            "\x81",
                                            "\x84",
                                            "\xEE\x80",
                                            CT,
                                            CA,
                                            CN,
                                            CE,
                                            "\xEE\x80\x85",
                                            "\xC3\xA9",
                                            "\xFF",
                                            std::string(1, '\0')};
    long rejected = 0;
    for (int it = 0; it < 20000; it++) {
        std::string x;
        int len = (int)(rng() % 24);
        for (int k = 0; k < len; k++) {
            if (rng() % 4 == 0) x.push_back((char)(rng() & 0xFF));
            else x += atoms[rng() % atoms.size()];
        }
        std::string y = co_enc(x), back, err;
        CHECK_MSG(caseops_decode(y.data(), y.size(), &back, &err), "iteration %d: decode failed: %s", it, err.c_str());
        CHECK_MSG(back == x, "iteration %d: round trip changed the text", it);
        std::vector<uint8_t> w;
        caseops_byte_weights(y.data(), y.size(), &w);
        size_t sum = 0;
        for (uint8_t v : w) sum += v;
        CHECK_MSG(sum == x.size(), "iteration %d: weights sum to %zu, the original has %zu bytes", it, sum, x.size());
        // mutate one byte of the transformed text: whatever decodes must be canonical
        if (y.empty()) continue;
        std::string z = y;
        z[rng() % z.size()] = (char)atoms[rng() % atoms.size()][0];
        if (caseops_decode(z.data(), z.size(), &back, &err)) CHECK(co_enc(back) == z);
        else rejected++;
    }
    CHECK(rejected > 100);  // the strict decoder is exercised
}

// Token surfaces tile the input: every original byte lands in exactly one token, in order.
static std::vector<int64_t> caseops_doc_bytes(const SpmEncoder& e, const std::string& doc, std::vector<int>* ids) {
    std::vector<int64_t> nb;
    SpmScratch sc;
    caseops_token_bytes(e, co_enc(doc), ids, &nb, &sc);
    return nb;
}

// The sidecar of a document sums to the document's UTF-8 length (every original byte charged once), with
// the CaseOps model (operators are user-defined pieces) and with the plain one; spans do not change ids.
TEST(caseops_sidecar_sums_to_original_bytes) {
    std::string path = "data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model";
    if (access(path.c_str(), R_OK) != 0) throw TestFailure(path + " is missing");
    SpmModel cm = spm_load(path);
    SpmEncoder ce = spm_encoder_build(cm);
    int ops = 0;
    for (const std::string& p : {CT, CA, CN, CE})
        for (size_t i = 0; i < cm.pieces.size(); i++) ops += cm.pieces[i] == p && cm.types[i] == SPM_USER_DEFINED;
    CHECK_MSG(ops == 4, "the CaseOps model has %d of the 4 operators as user-defined pieces", ops);
    std::vector<std::string> docs = {"The NASA Launch, said Dr. McDonald (iPhone 15).",
                                     "  leading and trailing  \t",
                                     "Caf\xC3\xA9 \xEF\xAC\x81ne \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80 x" + CT +
                                         "Y",
                                     "a\n\n\nb    c",
                                     "\xFF\xFE broken \xE2\x96 utf8",
                                     "ALLCAPS WORDS EVERYWHERE"};
    std::mt19937_64 rng(7);
    const char* atoms[] = {"The", " ", "  ", "quick", "BROWN", "fOx", "\n", "\xC3\xA9", "\xEF\xAC\x81", "\xEE\x80\x82",
                           "\xFF", "42", ".", "\xE2\x80\x99", "\t", "McX"};
    for (int i = 0; i < 300; i++) {
        std::string d;
        for (int k = (int)(rng() % 30); k > 0; k--) d += atoms[rng() % 16];
        docs.push_back(d);
    }
    for (const SpmEncoder* e : {(const SpmEncoder*)&ce, &encoder(8192)}) {
        for (const std::string& d : docs) {
            std::vector<int> ids;
            std::vector<int64_t> nb = caseops_doc_bytes(*e, d, &ids);
            CHECK(nb.size() == ids.size());
            int64_t sum = 0;
            for (int64_t b : nb) { CHECK(b >= 0); sum += b; }
            if (ids.empty()) continue;  // whitespace only: no token to charge
            CHECK_MSG(sum == (int64_t)d.size(), "document \"%s\": sidecar sums to %lld, UTF-8 length %zu", d.c_str(),
                      (long long)sum, d.size());
            std::string t = co_enc(d);
            CHECK(enc(*e, t) == ids);
        }
    }
    // a title-case word: the operator piece carries 0 bytes, the word its letters
    std::vector<int> ids;
    std::vector<int64_t> nb = caseops_doc_bytes(ce, "Hello", &ids);
    CHECK(ids.size() >= 2 && cm.pieces[ids[0]] == CT && nb[0] == 0);
}

// The shard writer: a val sidecar beside each val shard, headed by its token file's checksum; train gets none.
TEST(caseops_shard_writes_sidecar) {
    std::string path = "data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model";
    if (access(path.c_str(), R_OK) != 0) throw TestFailure(path + " is missing");
    char dir[] = "/tmp/pgolf_caseops_XXXXXX";
    if (!mkdtemp(dir)) throw TestFailure("mkdtemp failed");
    std::string in = std::string(dir) + "/docs.jsonl", out = std::string(dir) + "/out";
    std::vector<std::string> docs = {"The NASA Launch", "  iPhone  ", "caf\xC3\xA9 ALLCAPS", "plain text", "Train Doc"};
    FILE* f = fopen(in.c_str(), "wb");
    for (auto& d : docs) fprintf(f, "{\"text\": \"%s\"}\n", d.c_str());
    fclose(f);
    run_cli({"shard", path, out, "--val-docs", "4", "--shard-tokens", "9", "--transform", "caseops", in});
    auto read_shard = [](const std::string& p, int32_t* header) {
        std::string b = read_file(p);
        memcpy(header, b.data(), 1024);
        std::vector<uint16_t> v((b.size() - 1024) / 2);
        memcpy(v.data(), b.data() + 1024, v.size() * 2);
        return v;
    };
    size_t total = 0, orig = 0;
    for (int k = 0; k < 4; k++) orig += docs[k].size();
    int files = 0;
    for (int k = 0;; k++) {
        char name[64];
        snprintf(name, sizeof name, "/fineweb_val_%06d.bin", k);
        if (access((out + name).c_str(), R_OK) != 0) break;
        files++;
        int32_t ht[256], hb[256];
        std::vector<uint16_t> t = read_shard(out + name, ht);
        snprintf(name, sizeof name, "/fineweb_val_bytes_%06d.bin", k);
        std::vector<uint16_t> b = read_shard(out + name, hb);
        CHECK(t.size() == b.size() && hb[2] == ht[2] && (uint32_t)hb[3] == SIDECAR_KIND);
        uint64_t h = fnv1a64(t.data(), t.size() * 2);
        CHECK(((uint64_t)(uint32_t)hb[5] << 32 | (uint32_t)hb[4]) == h);
        for (size_t i = 0; i < t.size(); i++) {
            if (t[i] == 1) CHECK(b[i] == 0);
            total += b[i];
        }
    }
    CHECK(files >= 2);
    CHECK_MSG(total == orig, "val sidecars sum to %zu bytes, the 4 val documents hold %zu", total, orig);
    CHECK(access((out + "/fineweb_train_bytes_000000.bin").c_str(), F_OK) != 0);
    CHECK(read_file(out + "/manifest.txt").find("transform=caseops\n") != std::string::npos);
    CHECK_THROWS(run_cli({"shard", path, out + "2", "--transform", "upper"}), "expected none or caseops");
    std::string cmd = std::string("rm -rf ") + dir;
    CHECK(system(cmd.c_str()) == 0);
}

int main(int c, char** v) { return test_main(c, v); }
