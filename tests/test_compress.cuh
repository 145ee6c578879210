// Compression (section 9): packing, quantizers, pruning, the artifact and its reader.
#include <fcntl.h>

// --- helpers --------------------------------------------------------------------------------------

// Trained-like weights: each row ~ N(0, σ_r²)·exp(0.3·N) (heavy-ish tails), σ_r log-normal around
// 1/√cols (tables around 0.1, the tied embedding 0.3); small tensors near 1 like gains and mixes.
static std::vector<float> compress_fake_weights(const std::vector<ParamSpec>& t, uint64_t seed) {
    std::vector<float> w(param_arena_size(t), 0.0f);
    for (size_t k = 0; k < t.size(); k++) {
        const ParamSpec& p = t[k];
        float* x = w.data() + p.offset;
        int rows = p.rows(), cols = (int)(p.numel / std::max(rows, 1));
        bool matrix = p.shape.size() == 2 && p.numel > 8192;
        double base = p.role == P_TOK_EMB ? 0.3 : p.role == P_BIGRAM_EMBED ? 0.1 : 1.0 / std::sqrt((double)cols);
        #pragma omp parallel for
        for (int r = 0; r < rows; r++) {
            Rng rng(seed * 1000003 + k * 65537 + r);
            double sd = base * std::exp(0.35 * rng.normal());
            for (int i = 0; i < cols; i++) {
                double v = matrix ? sd * rng.normal() * std::exp(0.3 * rng.normal()) : 1.0 + 0.1 * rng.normal();
                x[(size_t)r * cols + i] = (float)v;
            }
        }
    }
    return w;
}

// A small pr467-like config whose mixed export has int5, int6, int8 and fp16 tensors.
static Config compress_micro_config() {
    Config c;
    preset_tiny(c);
    c.vocab_size = 512; c.num_layers = 2; c.model_dim = 64; c.num_heads = 2; c.num_kv_heads = 1;
    c.bigram_vocab_size = 1024; c.bigram_dim = 16;
    c.fp16_keep_patterns = "blocks.1.attn.c_k";  // tok_emb (512×64) then falls to int8
    c.zstd_level = 3;
    return c;
}

// An artifact taken apart: the decompressed header, the group frames; and put back together with
// a fresh header frame, group-table frame sizes and checksum, so tests reach the inner checks.
struct ArtParts { std::vector<uint8_t> head, header; std::vector<std::vector<uint8_t>> frames; };
static ArtParts art_split(const std::vector<uint8_t>& f) {
    ArtParts p;
    p.head.assign(f.begin(), f.begin() + 16);
    size_t at = 16;
    for (int i = 0; i <= G_NUM; i++) {
        size_t fs = ZSTD_findFrameCompressedSize(f.data() + at, f.size() - 16 - at);
        if (ZSTD_isError(fs)) throw TestFailure("art_split: bad frame");
        std::vector<uint8_t> fr(f.begin() + at, f.begin() + at + fs);
        if (i == 0) {
            p.header.resize(ZSTD_getFrameContentSize(fr.data(), fr.size()));
            ZSTD_decompress(p.header.data(), p.header.size(), fr.data(), fr.size());
        } else p.frames.push_back(fr);
        at += fs;
    }
    return p;
}
static std::vector<uint8_t> art_join(ArtParts p, bool fix_frame_sizes = true) {
    if (fix_frame_sizes && p.header.size() >= (size_t)G_NUM * 17)
        for (int g = 0; g < G_NUM; g++) {
            uint8_t* e = p.header.data() + p.header.size() - (G_NUM - g) * 17;  // u8 packing, u64 raw, u64 frame
            for (int b = 0; b < 8; b++) e[9 + b] = (uint8_t)((uint64_t)p.frames[g].size() >> (8 * b));
        }
    std::vector<uint8_t> f = p.head, hz = zstd_compress(p.header.data(), p.header.size(), 1);
    f.insert(f.end(), hz.begin(), hz.end());
    for (auto& fr : p.frames) f.insert(f.end(), fr.begin(), fr.end());
    uint64_t sum = fnv1a64(f.data(), f.size());
    put_le(f, ZSTD_SKIP_MAGIC + 1, 4); put_le(f, 8, 4); put_le(f, sum, 8);
    return f;
}
static std::string art_config_text(const ArtParts& p) {
    return std::string((const char*)p.header.data() + 4, get_le(p.header.data(), 4));
}
static void art_set_config_text(ArtParts& p, const std::string& text) {
    size_t old = get_le(p.header.data(), 4);
    std::vector<uint8_t> h;
    put_le(h, text.size(), 4);
    h.insert(h.end(), text.begin(), text.end());
    h.insert(h.end(), p.header.begin() + 4 + old, p.header.end());
    p.header = h;
}
static std::string replace_once(std::string s, const std::string& from, const std::string& to) {
    size_t i = s.find(from);
    if (i == std::string::npos) throw TestFailure("replace_once: \"" + from + "\" not found");
    return s.replace(i, from.size(), to);
}

// Runs fn with stdout going to a string.
template <class F> static std::string capture_stdout(F fn) {
    fflush(stdout);
    char path[] = "/tmp/pgolf_test_stdout_XXXXXX";
    int fd = mkstemp(path), saved = dup(1);
    dup2(fd, 1);
    try { fn(); } catch (...) { fflush(stdout); dup2(saved, 1); close(saved); close(fd); unlink(path); throw; }
    fflush(stdout);
    dup2(saved, 1); close(saved); close(fd);
    std::vector<uint8_t> b = read_file(path);
    unlink(path);
    return std::string(b.begin(), b.end());
}

static bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && memcmp(a.data(), b.data(), 4 * a.size()) == 0;
}

// --- packing --------------------------------------------------------------------------------------

// Independent bit-by-bit writer of PR #600's bit stream: value i occupies stream bits
// [i·b, (i+1)·b), LSB first; stream bit k is bit k%8 of byte k/8.
static std::vector<uint8_t> pack_reference(const std::vector<int8_t>& q, int bits) {
    std::vector<uint8_t> out((q.size() * bits + 7) / 8, 0);
    for (size_t i = 0; i < q.size(); i++) {
        unsigned u = (unsigned)(q[i] + (1 << (bits - 1)));
        for (int b = 0; b < bits; b++) if (u >> b & 1) out[(i * bits + b) / 8] |= (uint8_t)(1 << ((i * bits + b) % 8));
    }
    return out;
}

TEST(compress_pack_every_value_every_width) {
    Rng rng(7);
    for (int bits = 1; bits <= 8; bits++) {
        int lo = -(1 << (bits - 1)), hi = (1 << (bits - 1)) - 1;
        for (size_t n : {0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 63, 64, 65, 127, 255, 256, 257, 1001, 1536}) {
            std::vector<int8_t> q(n);
            for (size_t i = 0; i < n; i++)
                q[i] = (int8_t)(i < (size_t)(hi - lo + 1) ? lo + (int)i : lo + (int)(rng.uniform() * (hi - lo + 1)));
            std::vector<uint8_t> packed(packed_bytes(n, bits));
            CHECK(packed.size() == (n * bits + 7) / 8);
            pack_bits(q.data(), n, bits, packed.data());
            CHECK(packed == pack_reference(q, bits));
            std::vector<int8_t> back(n);
            unpack_bits(packed.data(), n, bits, back.data());
            CHECK(back == q);
        }
    }
    // PR #600's int6 group formula: b0 = u0 | (u1&3)<<6, b1 = u1>>2 | (u2&15)<<4, b2 = u2>>4 | u3<<2
    std::vector<int8_t> q = {-32, 31, 5, -7};
    uint8_t u[4], out[3];
    for (int i = 0; i < 4; i++) u[i] = (uint8_t)(q[i] + 32);
    pack_bits(q.data(), 4, 6, out);
    CHECK(out[0] == (uint8_t)(u[0] | (u[1] & 3) << 6));
    CHECK(out[1] == (uint8_t)(u[1] >> 2 | (u[2] & 15) << 4));
    CHECK(out[2] == (uint8_t)(u[2] >> 4 | u[3] << 2));
}

// --- quantile, pruning ------------------------------------------------------------------------------

TEST(compress_quantile_torch_semantics) {
    // torch.quantile([0,1,2,3], 0.5) = 1.5; ([1..5], 0.3) = 2.2; q = 0 → min, q = 1 → max
    std::vector<float> a = {0, 1, 2, 3}, b = {1, 2, 3, 4, 5};
    CHECK(quantile_sorted(a.data(), 4, 0.5f) == 1.5f);
    CHECK_CLOSE(quantile_sorted(b.data(), 5, 0.3f), 2.2, 0, 1e-6);
    CHECK(quantile_sorted(b.data(), 5, 0.0f) == 1.0f && quantile_sorted(b.data(), 5, 1.0f) == 5.0f);
    CHECK(quantile_sorted(b.data(), 1, 0.7f) == 1.0f);
    // selection on unsorted data = the sorted formula
    Rng rng(3);
    for (int trial = 0; trial < 50; trial++) {
        size_t n = 1 + (size_t)(rng.uniform() * 3000);
        std::vector<float> v(n);
        for (float& x : v) x = (float)std::fabs(rng.normal());
        std::vector<float> s = v;
        std::sort(s.begin(), s.end());
        float q = (float)rng.uniform();
        CHECK(quantile_select(v, q) == quantile_sorted(s.data(), n, q));
    }
}

TEST(compress_prune_fraction_and_threshold) {
    // |W| = 1..90000 with random signs, shuffled: thr = quantile(|W|, 0.03) at pos 0.03·89999 =
    // 2699.97 → 2700.97, so exactly the 2,700 entries 1..2700 become zero (strict <).
    std::vector<ParamSpec> t(3);
    t[0].name = "big"; t[0].shape = {300, 300}; t[0].numel = 90000; t[0].offset = 0;
    t[1].name = "small2d"; t[1].shape = {256, 256}; t[1].numel = 65536; t[1].offset = 90000;  // not > 65,536: untouched
    t[2].name = "vec"; t[2].shape = {70000}; t[2].numel = 70000; t[2].offset = 90000 + 65536;  // not 2-D: untouched
    std::vector<float> w(90000 + 65536 + 70000);
    Rng rng(11);
    for (size_t i = 0; i < 90000; i++) w[i] = (float)(i + 1) * (rng.uniform() < 0.5 ? -1.0f : 1.0f);
    for (size_t i = 89999; i > 0; i--) std::swap(w[i], w[(size_t)(rng.uniform() * (i + 1))]);
    for (size_t i = 90000; i < w.size(); i++) w[i] = (float)(rng.uniform() * 1e-3);
    std::vector<float> orig = w;
    Config c;
    c.prune_frac = 0.03f;
    magnitude_prune(c, t, w.data());
    size_t zeros = 0;
    for (size_t i = 0; i < 90000; i++) {
        bool small = std::fabs(orig[i]) <= 2700.0f;
        CHECK(small ? w[i] == 0.0f : w[i] == orig[i]);
        zeros += w[i] == 0.0f;
    }
    CHECK(zeros == 2700);
    CHECK(std::equal(w.begin() + 90000, w.end(), orig.begin() + 90000));
    // ties at the threshold stay (strict <): 100,000 entries, |w| ∈ {1, 2}, 50/50; the 0.3 quantile is 1.0
    std::vector<ParamSpec> t2(1);
    t2[0].name = "tie"; t2[0].shape = {100, 1000}; t2[0].numel = 100000;
    std::vector<float> w2(100000);
    for (size_t i = 0; i < w2.size(); i++) w2[i] = i % 2 ? 1.0f : -2.0f;
    c.prune_frac = 0.3f;
    magnitude_prune(c, t2, w2.data());
    for (size_t i = 0; i < w2.size(); i++) CHECK(w2[i] == (i % 2 ? 1.0f : -2.0f));
    // Gaussian: the fraction zeroed is frac within 1/n
    for (float frac : {0.01f, 0.03f, 0.25f}) {
        std::vector<float> g(200 * 700);
        for (float& x : g) x = (float)rng.normal();
        std::vector<ParamSpec> tg(1);
        tg[0].name = "g"; tg[0].shape = {200, 700}; tg[0].numel = g.size();
        c.prune_frac = frac;
        magnitude_prune(c, tg, g.data());
        size_t z = 0;
        for (float x : g) z += x == 0.0f;
        CHECK_CLOSE((double)z / g.size(), frac, 0, 2.0 / g.size());
    }
}

// --- quantizers -----------------------------------------------------------------------------------

// What each preset's reference exporter stores.
TEST(compress_plans_follow_the_reference_tables) {
    Config c;
    preset_pr467(c);
    for (const ParamSpec& p : build_param_table(c)) {
        QuantPlan pl = quant_plan(c, p);
        StoreKind want = p.numel <= 8192 ? SK_F16
                       : p.name == "tok_emb.weight" || p.name == "blocks.8.attn.c_k.weight" ? SK_F16
                       : p.name.find(".mlp.") != std::string::npos ? SK_INT5 : SK_INT6;
        CHECK_MSG(pl.kind == want, "pr467 %s: %s, want %s", p.name.c_str(), SK_NAMES[pl.kind], SK_NAMES[want]);
        if (want == SK_INT5) CHECK(pl.rule == QR_ROW_MAX && pl.qmin == -16 && pl.qmax == 15);
        if (want == SK_INT6) CHECK(pl.rule == QR_ROW_MAX && pl.qmin == -32 && pl.qmax == 31);
    }
    CHECK(quant_plan(c, *find_param(build_param_table(c), P_BIGRAM_PROJ)).kind == SK_INT6);  // 512×128 > 8,192
    Config d;
    preset_pr600(d);
    for (const ParamSpec& p : build_param_table(d)) {
        QuantPlan pl = quant_plan(d, p);
        bool ctrl = name_matches_any(p.name, d.control_patterns);
        StoreKind want = p.numel > 65536 ? SK_INT6 : ctrl ? SK_F32 : SK_F16;
        CHECK_MSG(pl.kind == want, "pr600 %s: %s, want %s", p.name.c_str(), SK_NAMES[pl.kind], SK_NAMES[want]);
        if (want == SK_INT6) CHECK(pl.rule == QR_PERCENTILE && pl.qmin == -31 && pl.qmax == 30);
    }
    d.all_int5 = 1;
    CHECK(quant_plan(d, build_param_table(d)[1]).kind == SK_INT5 && quant_plan(d, build_param_table(d)[1]).qmax == 14);
    Config b;  // baseline: int8 for every matrix, including tok_emb
    for (const ParamSpec& p : build_param_table(b)) {
        bool ctrl = name_matches_any(p.name, b.control_patterns);
        StoreKind want = p.numel > 65536 ? SK_INT8 : ctrl ? SK_F32 : SK_F16;
        CHECK_MSG(quant_plan(b, p).kind == want, "baseline %s", p.name.c_str());
    }
    Config s;
    preset_pr456(s);
    s.gptq_lite = 1;
    QuantPlan fc = quant_plan(s, *find_param(build_param_table(s), P_FC, 0));
    CHECK(fc.kind == SK_INT5 && fc.rule == QR_ROW_SEARCH);
    CHECK(quant_plan(s, *find_param(build_param_table(s), P_C_K, 2)).kind == SK_F16);  // cores.2.attn.c_k kept
    s.gptq_lite = 2;
    QuantPlan cq = quant_plan(s, *find_param(build_param_table(s), P_C_Q, 0));
    CHECK(cq.kind == SK_INT6 && cq.rule == QR_MATRIX_SEARCH && cq.qmin == -31 && cq.qmax == 31);
}

// Hand-computed rows for each rule.
TEST(compress_quantizer_hand_examples) {
    ParamSpec p;
    p.name = "blocks.0.attn.c_q.weight"; p.shape = {1, 4}; p.numel = 4;
    float row[4] = {0.1f, -0.2f, 0.3f, -1.0f};
    // thwu1's mixed scheme, int6: s = fp16(1.0/31); q = rint(x/s), clamp [−32, 31]
    QuantPlan b = {SK_INT6, QR_ROW_MAX, 31, -32, 31};
    float s = round_to_half(1.0f / 31.0f);
    std::vector<int8_t> q(4);
    quantize_row(row, 4, INFINITY, s, b, q.data());
    CHECK(row_max_scale(1.0f, 31) == float_to_half(1.0f / 31.0f));
    CHECK(q[0] == (int8_t)rintf(0.1f / s) && q[1] == (int8_t)rintf(-0.2f / s) && q[3] == -31);
    CHECK(q[0] == 3 && q[1] == -6 && q[2] == 9);
    // tiny rows: the scale is floored at fp16's smallest normal 2^−14
    CHECK(half_to_float(row_max_scale(1e-9f, 15)) == 6.103515625e-05f);
    // round half to even: 2.5 → 2, 3.5 → 4, −2.5 → −2
    float halves[3] = {2.5f, 3.5f, -2.5f};
    quantize_row(halves, 3, INFINITY, 1.0f, b, q.data());
    CHECK(q[0] == 2 && q[1] == 4 && q[2] == -2);
    // The baseline's int8 on 4 values: c = quantile(|x|, 0.9999984): pos = 2.9999952, c = 1.0 − 4.8e−6·0.7;
    // x clamped to ±c; s = c/127 (fp32) for q, stored fp16
    Config c;
    QTensor t = quantize_tensor(c, p, row);  // baseline: 4 elements → passthrough fp16
    CHECK(t.plan.kind == SK_F16 && t.f16[2] == float_to_half(0.3f));
    p.shape = {1, 70000}; p.numel = 70000;
    std::vector<float> big(70000, 0.0f);
    big[0] = 0.1f; big[1] = -0.2f; big[2] = 0.3f; big[3] = -1.0f; big[4] = 0.5f;
    t = quantize_tensor(c, p, big.data());
    float pos = 0.9999984f * 69999.0f;
    float w = pos - floorf(pos);
    float clipv = fmaf(w - 1.0f, 1.0f - 0.5f, 1.0f);  // between the two largest, 0.5 and 1.0
    float sa = std::max(clipv / 127.0f, 1.0f / 127.0f);
    CHECK(t.plan.kind == SK_INT8 && t.scales[0] == float_to_half(sa));
    CHECK(t.q[3] == (int8_t)rintf(-clipv / sa) && t.q[4] == (int8_t)rintf(0.5f / sa) &&
          t.q[2] == (int8_t)rintf(0.3f / sa));
    CHECK(t.q[5] == 0);
}

static void check_error_bound(const Config& c, const ParamSpec& p, const float* w) {
    QTensor t = quantize_tensor(c, p, w);
    std::vector<float> d(p.numel);
    dequantize_tensor(p, t, d.data());
    size_t cols = p.numel / t.scales.size();
    for (size_t i = 0; i < p.numel; i++) {
        int q = t.q[i];
        CHECK(q >= t.plan.qmin && q <= t.plan.qmax);
        float s = half_to_float(t.scales[i / cols]);
        CHECK(d[i] == (float)q * s);
        if (q == t.plan.qmin || q == t.plan.qmax) continue;  // maybe clipped
        // q came from the fp32 scale in the int8 and PR #600 int6 schemes, while the fp16 one is stored: allow the
        // mismatch
        double bound =
            t.plan.rule == QR_PERCENTILE ? s * (0.5 + (std::abs(q) + 1) * std::ldexp(1.0, -11)) : 0.5 * s * (1 + 1e-6);
        CHECK_MSG(std::fabs((double)w[i] - d[i]) <= bound, "%s rule %d: |%g − %g| > %g (q %d, s %g)", p.name.c_str(),
                  t.plan.rule, w[i], d[i], bound, q, s);
    }
}

TEST(compress_dequantization_error_at_most_half_a_step) {
    Rng rng(5);
    std::vector<float> w(128 * 513);  // odd row length; > 65,536 elements, so every scheme quantizes it
    for (float& x : w) x = (float)(0.02 * rng.normal() * std::exp(0.5 * rng.normal()));
    for (const char* scheme : {"int8", "mixed", "int6"})
        for (int gptq = 0; gptq <= 2; gptq++)
            for (const char* name : {"blocks.0.mlp.fc.weight", "blocks.0.attn.c_q.weight"}) {
                Config c;
                c.quant_scheme = scheme; c.gptq_lite = gptq;
                ParamSpec p;
                p.name = name; p.shape = {128, 513}; p.numel = w.size();
                check_error_bound(c, p, w.data());
            }
}

// The searches keep the no-clipping candidate (p = 1.0) among theirs, so they never do worse.
TEST(compress_clip_search_never_worse_than_no_clipping) {
    Rng rng(9);
    ParamSpec p;
    p.name = "blocks.0.attn.c_q.weight"; p.shape = {96, 512}; p.numel = 96 * 512;
    std::vector<float> w(p.numel);
    for (float& x : w) {  // heavy tails
        double z = rng.normal();
        x = (float)(0.02 * z * std::exp(0.6 * rng.normal()));
    }
    Config c;
    c.quant_scheme = "mixed";
    auto row_err = [&](const std::vector<float>& d, int r) {
        double e = 0;
        for (int i = 0; i < 512; i++) { double x = (double)w[r * 512 + i] - d[r * 512 + i]; e += x * x; }
        return e;
    };
    // gptq_lite=1 vs thwu1's plain rule (its p = 1.0 candidate), row by row
    std::vector<float> base(p.numel), srch(p.numel);
    dequantize_tensor(p, quantize_tensor(c, p, w.data()), base.data());
    c.gptq_lite = 1;
    dequantize_tensor(p, quantize_tensor(c, p, w.data()), srch.data());
    int better = 0;
    for (int r = 0; r < 96; r++) {
        CHECK(row_err(srch, r) <= row_err(base, r));
        better += row_err(srch, r) < row_err(base, r);
    }
    CHECK(better > 0);  // heavy tails: clipping pays on some rows
    // gptq_lite=2 vs its own p = 1.0 candidate, recomputed here: s = fp16(max(amax/31, 1/31)), q ∈ [−31, 31]
    c.gptq_lite = 2;
    dequantize_tensor(p, quantize_tensor(c, p, w.data()), srch.data());
    double e_search = 0, e_amax = 0;
    for (int r = 0; r < 96; r++) {
        float amax = 0;
        for (int i = 0; i < 512; i++) amax = std::max(amax, std::fabs(w[r * 512 + i]));
        float s = round_to_half(std::max(amax / 31.0f, (float)(1.0 / 31)));
        for (int i = 0; i < 512; i++) {
            float q = std::min(std::max(rintf(w[r * 512 + i] / s), -31.0f), 31.0f);
            double d = (double)w[r * 512 + i] - q * s;
            e_amax += d * d;
        }
        e_search += row_err(srch, r);
    }
    CHECK(e_search <= e_amax);
}

// --- the artifact ---------------------------------------------------------------------------------

TEST(compress_artifact_roundtrip_every_scheme) {
    struct Case { const char* scheme; int all_int5, gptq; const char* pack; float prune; };
    Case cases[] = {{"int8", 0, 0, "auto", 0}, {"mixed", 0, 0, "bytes", 0.03f}, {"mixed", 0, 0, "bits", 0},
                    {"mixed", 1, 0, "auto", 0}, {"int6", 0, 0, "bits", 0}, {"int6", 1, 0, "auto", 0.03f},
                    {"mixed", 0, 1, "auto", 0}, {"mixed", 0, 2, "auto", 0}, {"int6", 0, 2, "bytes", 0}};
    for (const Case& k : cases) {
        Config c = compress_micro_config();
        c.quant_scheme = k.scheme;
        c.all_int5 = k.all_int5;
        c.gptq_lite = k.gptq;
        c.pack = k.pack;
        c.prune_frac = k.prune;
        if (strcmp(k.scheme, "mixed")) c.vocab_size = 2048;  // some tensor above 65,536 elements
        std::vector<ParamSpec> t = build_param_table(c);
        std::vector<float> w = compress_fake_weights(t, 42);
        magnitude_prune(c, t, w.data());
        ExportReport rep;
        std::vector<uint8_t> art = artifact_build(c, t, w.data(), &rep);
        CHECK(rep.artifact_bytes == art.size());
        Config back;
        std::vector<float> got, want;
        artifact_parse(art, "mem.pgz", &back, &got);
        quantize_dequantize(c, t, w.data(), &want);
        CHECK_MSG(same_bits(got, want), "%s all_int5=%d gptq=%d pack=%s: parse(build) differs from quantize_dequantize",
                  k.scheme, k.all_int5, k.gptq, k.pack);
        CHECK(artifact_config_text(back) == artifact_config_text(c));
        // the kinds the scheme should produce are there, and the weights are close to the originals
        Artifact a = artifact_read(art, "mem.pgz");
        bool seen[SK_NUM] = {};
        for (size_t i = 0; i < t.size(); i++) {
            seen[a.tensors[i].plan.kind] = true;
            double num = 0, den = 0;
            for (size_t j = 0; j < t[i].numel; j++) {
                double d = got[t[i].offset + j] - w[t[i].offset + j];
                num += d * d;
                den += (double)w[t[i].offset + j] * w[t[i].offset + j];
            }
            CHECK_MSG(num <= 0.05 * den + 1e-12, "%s: relative error %g", t[i].name.c_str(), std::sqrt(num / den));
        }
        bool mixed = !strcmp(k.scheme, "mixed");
        CHECK(seen[SK_INT5] == (mixed || k.all_int5) && seen[SK_INT6] == (!k.all_int5 && strcmp(k.scheme, "int8")));
        CHECK(seen[SK_INT8] == (mixed || !strcmp(k.scheme, "int8")));
        CHECK(seen[SK_F32] == !mixed);  // control tensors stay fp32 when the size test comes second
        for (int g = G_INT5; g <= G_INT6; g++)
            if (rep.groups[g].raw_bytes > 0) {
                int want_pk = !strcmp(k.pack, "bits") ? PK_BITS : !strcmp(k.pack, "bytes") ? PK_BYTES
                            : rep.groups[g].bits_zstd < rep.groups[g].bytes_zstd ? PK_BITS : PK_BYTES;
                CHECK(a.packing[g] == want_pk);
            }
    }
}

// The file is a valid zstd stream: concatenated frames that decompress to header + groups.
TEST(compress_artifact_is_a_zstd_stream) {
    Config c = compress_micro_config();
    std::vector<ParamSpec> t = build_param_table(c);
    std::vector<float> w = compress_fake_weights(t, 1);
    std::vector<uint8_t> art = artifact_build(c, t, w.data(), nullptr);
    ArtParts p = art_split(art);
    size_t total = p.header.size();
    for (auto& fr : p.frames) total += ZSTD_getFrameContentSize(fr.data(), fr.size());
    std::vector<uint8_t> out(total + 1);
    size_t got = ZSTD_decompress(out.data(), out.size(), art.data(), art.size());  // skips the skippable frames
    CHECK(!ZSTD_isError(got) && got == total);
    CHECK(memcmp(out.data(), p.header.data(), p.header.size()) == 0);
    std::string text((const char*)out.data() + 4, get_le(out.data(), 4));
    CHECK(text == artifact_config_text(c));
}

TEST(compress_reader_rejects_corrupt_files) {
    Config c = compress_micro_config();
    std::vector<ParamSpec> t = build_param_table(c);
    std::vector<float> w = compress_fake_weights(t, 2);
    const std::vector<uint8_t> art = artifact_build(c, t, w.data(), nullptr);
    Config out;
    std::vector<float> wo;
    auto parse = [&](const std::vector<uint8_t>& f) { artifact_parse(f, "bad.pgz", &out, &wo); };
    // every message names the file
    std::vector<uint8_t> f = art;
    f.resize(10);
    CHECK_THROWS(parse(f), "bad.pgz: 10 bytes is too short");
    for (size_t n = 0; n < art.size(); n += (n < 64 ? 1 : n < art.size() - 64 ? 97 : 1)) {
        f.assign(art.begin(), art.begin() + n);
        CHECK_THROWS(parse(f), "truncated");
    }
    Rng rng(4);
    for (int k = 0; k < 300; k++) {  // flipped bytes anywhere between the magic and the trailer
        f = art;
        size_t i = 16 + (size_t)(rng.uniform() * (art.size() - 32));
        f[i] ^= (uint8_t)(1 + rng.uniform() * 255);
        CHECK_THROWS(parse(f), "checksum mismatch");
    }
    f = art; f[art.size() - 1] ^= 1;  // in the stored checksum
    CHECK_THROWS(parse(f), "checksum mismatch");
    f = art; f[art.size() - 14] ^= 1;  // in the trailer's frame header
    CHECK_THROWS(parse(f), "truncated or corrupt");
    f = art; f[9] = 'X';
    CHECK_THROWS(parse(f), "bad.pgz: not a pgolf artifact (wrong magic)");
    f = art; f[0] ^= 0x40;
    CHECK_THROWS(parse(f), "wrong magic");
    f = art; f[12] = 3;
    CHECK_THROWS(parse(f), "artifact format version 3, this build reads version 2");
    // the stored config contradicts the stored tensor table
    ArtParts p = art_split(art);
    parse(art_join(p));  // the tools themselves keep a valid file valid
    ArtParts q = p;
    art_set_config_text(q, replace_once(art_config_text(p), "NUM_LAYERS=2\n", "NUM_LAYERS=3\n"));
    CHECK_THROWS(parse(art_join(q)), "config contradicts the tensor table");
    q = p;
    art_set_config_text(q, replace_once(art_config_text(p), "MODEL_DIM=64\n", "MODEL_DIM=128\n"));
    CHECK_THROWS(parse(art_join(q)), "config contradicts the tensor table");
    q = p;
    art_set_config_text(q, replace_once(art_config_text(p), "QUANT_SCHEME=mixed\n", "QUANT_SCHEME=int6\n"));
    CHECK_THROWS(parse(art_join(q)), "config contradicts the tensor table");
    q = p;
    art_set_config_text(q, replace_once(art_config_text(p), "ALL_INT5=0\n", "ALL_INT5=1\n"));
    CHECK_THROWS(parse(art_join(q)), "is stored as int6, the stored config (QUANT_SCHEME=mixed) gives int5");
    q = p;
    art_set_config_text(q, replace_once(art_config_text(p), "MODEL_DIM=64\n", "MODEL_DIM=5000000\n"));
    CHECK_THROWS(parse(art_join(q)), "MODEL_DIM=5e+06");
    q = p;
    art_set_config_text(q, art_config_text(p) + "NO_SUCH_KEY=1\n");
    CHECK_THROWS(parse(art_join(q)), "unknown config key NO_SUCH_KEY");
    // zstd bombs: frames declaring far more than the tensor table (or the header cap) allows
    std::vector<uint8_t> zeros((size_t)64 << 20, 0);
    std::vector<uint8_t> bomb = zstd_compress(zeros.data(), zeros.size(), 1);
    CHECK(bomb.size() < 65536);
    q = p;
    q.frames[G_INT5] = bomb;
    CHECK_THROWS(parse(art_join(q)), "int5 values declares 67108864 decompressed bytes where at most");
    CHECK_THROWS(parse(art_join(q)), "zstd bomb");
    {
        std::vector<uint8_t> g = art_join(p), hz;
        size_t hs = ZSTD_findFrameCompressedSize(g.data() + 16, g.size() - 16);
        std::vector<uint8_t> b2(g.begin(), g.begin() + 16);
        b2.insert(b2.end(), bomb.begin(), bomb.end());
        b2.insert(b2.end(), g.begin() + 16 + hs, g.end() - 16);
        uint64_t sum = fnv1a64(b2.data(), b2.size());
        put_le(b2, ZSTD_SKIP_MAGIC + 1, 4); put_le(b2, 8, 4); put_le(b2, sum, 8);
        CHECK_THROWS(parse(b2), "bad.pgz: header declares 67108864 decompressed bytes");
    }
    // group contents that no export writes
    q = p;
    {
        std::vector<uint8_t> raw(ZSTD_getFrameContentSize(q.frames[G_INT5].data(), q.frames[G_INT5].size()));
        ZSTD_decompress(raw.data(), raw.size(), q.frames[G_INT5].data(), q.frames[G_INT5].size());
        CHECK(!raw.empty());
        raw[raw.size() / 2] = 100;
        q.frames[G_INT5] = zstd_compress(raw.data(), raw.size(), 1);
        CHECK_THROWS(parse(art_join(q)), "lies outside [-16, 15]");
        raw.pop_back();
        q.frames[G_INT5] = zstd_compress(raw.data(), raw.size(), 1);
        CHECK_THROWS(parse(art_join(q)), "the tensor table needs");
    }
    q = p;
    {
        std::vector<uint8_t> raw(ZSTD_getFrameContentSize(q.frames[G_SCALES].data(), q.frames[G_SCALES].size()));
        ZSTD_decompress(raw.data(), raw.size(), q.frames[G_SCALES].data(), q.frames[G_SCALES].size());
        raw[raw.size() / 2 + 3] = 0xFC;  // high-byte plane: a row scale becomes −inf or negative
        q.frames[G_SCALES] = zstd_compress(raw.data(), raw.size(), 1);
        CHECK_THROWS(parse(art_join(q)), "scale of row");
    }
    q = p;
    q.header.back() ^= 1;  // group table's last frame size
    CHECK_THROWS(parse(art_join(q, false)), "the group table says");
    q = p;
    q.header.push_back(0);
    CHECK_THROWS(parse(art_join(q, false)), "unexpected bytes after the artifact header");
    q = p;
    std::vector<uint8_t> extra = art_join(q);  // a stray byte after the last group
    extra.insert(extra.end() - 16, 0x00);
    uint64_t sum = fnv1a64(extra.data(), extra.size() - 16);
    for (int b = 0; b < 8; b++) extra[extra.size() - 8 + b] = (uint8_t)(sum >> (8 * b));
    CHECK_THROWS(parse(extra), "bad.pgz: 1 unexpected bytes after the last group");
}

// Thousands of mutated artifacts: the reader may accept a harmless change but never crash.
TEST(compress_fuzz_reader) {
    Config c = compress_micro_config();
    std::vector<ParamSpec> t = build_param_table(c);
    std::vector<float> w = compress_fake_weights(t, 3);
    const std::vector<uint8_t> art = artifact_build(c, t, w.data(), nullptr);
    const ArtParts parts = art_split(art);
    Rng rng(2024);
    auto mutate = [&](std::vector<uint8_t>& b, int edits) {
        for (int e = 0; e < edits && !b.empty(); e++) {
            size_t i = (size_t)(rng.uniform() * b.size());
            double r = rng.uniform();
            if (r < 0.5) b[i] ^= (uint8_t)(1 << (int)(rng.uniform() * 8));
            else if (r < 0.7) b[i] = (uint8_t)(rng.uniform() * 256);
            else if (r < 0.8) b[i] = r < 0.75 ? 0 : 0xFF;
            else if (r < 0.9) b.erase(b.begin() + i);
            else b.insert(b.begin() + i, (uint8_t)(rng.uniform() * 256));
        }
    };
    int accepted = 0, rejected = 0;
    for (int it = 0; it < 3000; it++) {
        std::vector<uint8_t> f;
        int mode = it % 4, edits = 1 + (int)(rng.uniform() * 4);
        if (mode == 0) { f = art; mutate(f, edits); }  // raw bytes (the checksum catches these)
        else if (mode == 1) {                          // raw bytes with the checksum fixed: zstd sees the damage
            f = art; f.resize(f.size() - 16);
            mutate(f, edits);
            uint64_t sum = fnv1a64(f.data(), f.size());
            put_le(f, ZSTD_SKIP_MAGIC + 1, 4); put_le(f, 8, 4); put_le(f, sum, 8);
        } else if (mode == 2) {                        // the decompressed header: config text, tensor and group tables
            ArtParts q = parts;
            if (rng.uniform() < 0.5) mutate(q.header, edits);
            else
                for (int e = 0; e < edits; e++)
                    q.header[4 + (size_t)(rng.uniform() * (q.header.size() - 4))] ^=
                        (uint8_t)(1 << (int)(rng.uniform() * 8));
            f = art_join(q, rng.uniform() < 0.5);
        } else {                                       // one group's content
            ArtParts q = parts;
            int g = (int)(rng.uniform() * G_NUM);
            std::vector<uint8_t> raw(ZSTD_getFrameContentSize(q.frames[g].data(), q.frames[g].size()));
            ZSTD_decompress(raw.data(), raw.size(), q.frames[g].data(), q.frames[g].size());
            mutate(raw, edits);
            q.frames[g] = zstd_compress(raw.data(), raw.size(), 1);
            f = art_join(q);
        }
        Config oc;
        std::vector<float> ow;
        try { artifact_parse(f, "fuzz.pgz", &oc, &ow); accepted++; }
        catch (const TestFailure&) { throw;
        } catch (const std::runtime_error& e) {
            rejected++;
            CHECK_MSG(strstr(e.what(), "fuzz.pgz") || strstr(e.what(), "="), "message without the file: %s", e.what());
        }
    }
    CHECK(rejected > 2000);
    CHECK(accepted + rejected == 3000);
}

// The pr467 shape with trained-like weights: size, accounting, both packings measured.
TEST(compress_size_pr467_shape) {
    Config c;
    preset_pr467(c);
    c.zstd_level = 3;  // level 22 takes ~30 CPU-seconds here; the layout and accounting are the same
    std::vector<ParamSpec> t = build_param_table(c);
    std::vector<float> w = compress_fake_weights(t, 467);
    magnitude_prune(c, t, w.data());
    ExportReport rep;
    c.pack = "auto";
    std::vector<uint8_t> art = artifact_build(c, t, w.data(), &rep);
    CHECK(rep.artifact_bytes == art.size());
    size_t sum = rep.overhead_bytes, bits = rep.overhead_bytes, bytes = rep.overhead_bytes;
    for (int g = 0; g < G_NUM; g++) {
        const ExportGroupRow& r = rep.groups[g];
        sum += r.packing == PK_BITS ? r.bits_zstd : r.bytes_zstd;
        bits += r.bits_zstd; bytes += r.bytes_zstd;
        if (g == G_INT5 || g == G_INT6) {  // both packings measured, auto kept the smaller
            CHECK(r.bits_zstd > 0 && r.bytes_zstd > 0 && r.bits_zstd != r.bytes_zstd);
            CHECK(r.packing == (r.bits_zstd < r.bytes_zstd ? PK_BITS : PK_BYTES));
        }
    }
    CHECK(sum == rep.artifact_bytes && bits == rep.bits_packed_bytes && bytes == rep.byte_container_bytes);
    CHECK(rep.artifact_bytes <= std::min(rep.bits_packed_bytes, rep.byte_container_bytes));
    CHECK(rep.params == 25517137);  // thwu1's logged model_params for the 10L preset
    CHECK(rep.params_per_kind[SK_INT5] == 10u * 2 * 1536 * 512);
    CHECK(rep.artifact_bytes < 16000000);
    // with the counted code (make submission's self-extracting form; the full source when it is not built)
    struct stat st;
    long code = stat("build/submission/train_gpt.sh", &st) == 0 ? (long)st.st_size : (long)PGOLF_CODE_BYTES;
    CHECK_MSG((long)rep.artifact_bytes + code < ARTIFACT_LIMIT_BYTES, "artifact %zu + code %ld bytes",
              rep.artifact_bytes, code);
    bool quiet = g_quiet;
    g_quiet = false;  // the report goes through log0
    std::string log = capture_stdout([&] { print_export_report(rep); });
    g_quiet = quiet;
    // thwu1's mixed scheme: int5 MLP, int6 attention and bigram, nothing in int8 at this shape
    CHECK(rep.params_per_kind[SK_INT8] == 0);
    CHECK(log.find(fmt("Serialized model int5/int6+zstd: %zu bytes", rep.artifact_bytes)) != std::string::npos);
    CHECK(log.find(fmt("all bit-packed %zu bytes, all byte containers %zu bytes", rep.bits_packed_bytes,
                       rep.byte_container_bytes)) != std::string::npos);
    Config back;
    std::vector<float> got, want;
    artifact_parse(art, "pr467.pgz", &back, &got);
    quantize_dequantize(c, t, w.data(), &want);
    CHECK(same_bits(got, want));
    log0("  pr467 shape, zstd-%d: artifact %zu bytes (bit-packed %zu, byte containers %zu)\n", c.zstd_level,
           rep.artifact_bytes, rep.bits_packed_bytes, rep.byte_container_bytes);
}

TEST(compress_inspect_table) {
    Config c = compress_micro_config();
    std::vector<ParamSpec> t = build_param_table(c);
    std::vector<float> w = compress_fake_weights(t, 8);
    std::string dir = "/tmp/pgolf_test_inspect_" + std::to_string(getpid());
    make_dirs(dir);
    std::vector<uint8_t> art = artifact_build(c, t, w.data(), nullptr);
    write_file_atomic(dir + "/m.pgz", art.data(), art.size());
    std::vector<TensorBlob> blobs;
    for (const ParamSpec& p : t) blobs.push_back({p.name, p.shape, w.data() + p.offset, p.numel});
    safetensors_write(dir + "/m.safetensors", blobs, {});
    std::string a0 = "train_gpt", a1 = "inspect", a2 = dir + "/m.pgz", a3 = dir + "/m.safetensors";
    char* argv[] = {&a0[0], &a1[0], &a2[0], &a3[0]};
    std::string out = capture_stdout([&] { CHECK(inspect_main(4, argv) == 0); });
    CHECK_THROWS(inspect_main(2, argv), "usage");
    unlink(a2.c_str()); unlink(a3.c_str()); rmdir(dir.c_str());
    Artifact a = artifact_read(art, "m");
    // one row per tensor; quantized ones show a scale range and a bounded error
    for (size_t i = 0; i < t.size(); i++) {
        size_t at = out.find("\n" + t[i].name + " ");
        CHECK_MSG(at != std::string::npos, "no row for %s", t[i].name.c_str());
        std::string line = out.substr(at + 1, out.find('\n', at + 1) - at - 1);
        char name[128], shape[64], kind[16], pack[16], smin[32], smax[32];
        size_t z;
        double mx, rms;
        CHECK(sscanf(line.c_str(), "%127s %63s %15s %15s %zu %31s %31s %lf %lf", name, shape, kind, pack, &z, smin,
                     smax, &mx, &rms) == 9);
        CHECK(std::string(kind) == SK_NAMES[a.tensors[i].plan.kind] && z > 0 && rms <= mx);
        if (a.tensors[i].plan.kind >= SK_INT8) CHECK(mx <= 0.5625 * atof(smax));
        else CHECK(mx <= std::ldexp(1.0, -11) * 4.0);  // fp16 rounding of values below ~4
    }
}
