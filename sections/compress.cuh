// Post-training export (shared/spec/eval.md §1): magnitude pruning, per-row quantization with the
// reference's rules (int8 Variant A, mixed int5/int6 Variant B, int6 Variant D, two GPTQ-lite clip
// searches), int5/int6 values bit-packed or in byte containers, zstd, and the artifact file that
// every rank reads back before it is scored. All of it runs on the host, on fp32 arenas.

// --- zstd helpers ------------------------------------------------------------------------------
#define zstdCheck(call, what) zstd_check((call), (what), __FILE__, __LINE__)
static size_t zstd_check(size_t rc, const std::string& what, const char* file, int line) {
    if (ZSTD_isError(rc)) fail("%s: zstd error %s (%s:%d)", what.c_str(), ZSTD_getErrorName(rc), file, line);
    return rc;
}
// One frame, single-threaded, content size in the header: python-zstandard's
// ZstdCompressor(level).compress(), byte for byte (eval.md §1.7).
static std::vector<uint8_t> zstd_compress(const uint8_t* src, size_t n, int level) {
    ZSTD_CCtx* cx = ZSTD_createCCtx();
    if (!cx) fail("zstd: out of memory creating a compression context");
    zstdCheck(ZSTD_CCtx_setParameter(cx, ZSTD_c_compressionLevel, level), "zstd level");
    zstdCheck(ZSTD_CCtx_setParameter(cx, ZSTD_c_contentSizeFlag, 1), "zstd content size flag");
    zstdCheck(ZSTD_CCtx_setParameter(cx, ZSTD_c_nbWorkers, 0), "zstd workers");
    std::vector<uint8_t> out(ZSTD_compressBound(n));
    size_t got = zstdCheck(ZSTD_compress2(cx, out.data(), out.size(), src, n), "zstd compress");
    ZSTD_freeCCtx(cx);
    out.resize(got);
    return out;
}

// --- torch.quantile ('linear') ------------------------------------------------------------------
// pos = q·(n−1) in fp32; lerp between the neighbours with torch's fused formula (its CPU vector and
// CUDA kernels both compute fma(w, hi−lo, lo) for w < ½ and fma(w−1, hi−lo, hi) otherwise).
static float quantile_lerp(float lo, float hi, float w) {
    return w < 0.5f ? fmaf(w, hi - lo, lo) : fmaf(w - 1.0f, hi - lo, hi);
}
static float quantile_sorted(const float* v, size_t n, float q) {
    float pos = q * (float)(n - 1);
    size_t lo = (size_t)pos, hi = std::min((size_t)ceilf(pos), n - 1);
    return quantile_lerp(v[lo], v[hi], pos - (float)lo);
}
// The same on unsorted data (reordered in place): two selections instead of a sort.
static float quantile_select(std::vector<float>& v, float q) {
    size_t n = v.size();
    float pos = q * (float)(n - 1);
    size_t lo = (size_t)pos, hi = std::min((size_t)ceilf(pos), n - 1);
    std::nth_element(v.begin(), v.begin() + lo, v.end());
    float vlo = v[lo], vhi = hi > lo ? *std::min_element(v.begin() + lo + 1, v.end()) : vlo;
    return quantile_lerp(vlo, vhi, pos - (float)lo);
}

// --- Magnitude pruning (eval.md §1.1 step 3) ----------------------------------------------------
// Every 2-D parameter with more than 65,536 elements: zero the entries with |w| strictly below
// the frac-quantile of |W|. Improves compression at a small loss (thwu1: 3%).
static void magnitude_prune(const Config& c, const std::vector<ParamSpec>& t, float* w) {
    if (c.prune_frac <= 0) return;
    for (const ParamSpec& p : t) {
        if (p.shape.size() != 2 || p.numel <= 65536) continue;
        float* x = w + p.offset;
        std::vector<float> a(p.numel);
        for (size_t i = 0; i < p.numel; i++) a[i] = fabsf(x[i]);
        float thr = quantile_select(a, c.prune_frac);
        for (size_t i = 0; i < p.numel; i++) if (fabsf(x[i]) < thr) x[i] = 0.0f;
    }
}

// --- Which tensor is stored how (eval.md §1.2–§1.6) ---------------------------------------------
enum StoreKind { SK_F32, SK_F16, SK_INT8, SK_INT6, SK_INT5, SK_NUM };
static const char* SK_NAMES[] = {"fp32", "fp16", "int8", "int6", "int5"};
static const int SK_BITS[] = {32, 16, 8, 6, 5};
enum QuantRule {
    QR_NONE,
    QR_PERCENTILE,    // Variant A / D: clip rows at quantile 0.9999984, fp32 scale max(c/clip, 1/clip)
    QR_ROW_MAX,       // Variant B: scale fp16(max|row|/clip), q in [−(clip+1), clip]
    QR_ROW_SEARCH,    // PR #456 GPTQ_LITE=1: per row, best of five order statistics as the clip
    QR_MATRIX_SEARCH  // 2026-03-22 record: per matrix, best of five row percentiles; floor 1/clip
};
struct QuantPlan { StoreKind kind; QuantRule rule; int clip, qmin, qmax; };

// Variant B's categories, by substring, in the reference's order.
static bool low_bit_category(const std::string& n, bool* mlp) {
    *mlp = false;
    if (n.find("tok_emb") != std::string::npos || n.find("lm_head") != std::string::npos) return false;
    if (n.find(".mlp.") != std::string::npos) return *mlp = true;
    if (n.find("bigram") != std::string::npos) return true;
    return n.find(".attn.") != std::string::npos || n.find(".proj.") != std::string::npos;
}

// Rules per scheme, first match wins. FP16_KEEP applies in every scheme (empty = the reference's
// int8 and int6 exporters, which have no such list). A tensor that is not 2-D is quantized as one
// row with an fp16 scale (the reference keeps one fp32 scale; no preset has such a tensor).
static QuantPlan quant_plan(const Config& c, const ParamSpec& p) {
    QuantPlan pl = {SK_F16, QR_NONE, 0, 0, 0};
    bool mixed = c.quant_scheme == "mixed", mlp = false;
    if (p.numel <= (mixed ? 8192u : 65536u)) {  // mixed: the size test comes first, so small control tensors are fp16
        if (!mixed && name_matches_any(p.name, c.control_patterns)) pl.kind = SK_F32;
        return pl;
    }
    if (name_matches_any(p.name, c.control_patterns)) { pl.kind = SK_F32; return pl; }
    if (name_matches_any(p.name, c.fp16_keep_patterns)) return pl;
    bool low = c.quant_scheme == "int6" || (mixed && low_bit_category(p.name, &mlp));
    if (!low) return {SK_INT8, QR_PERCENTILE, 127, -127, 127};
    pl.clip = (mlp || c.all_int5) ? 15 : 31;
    pl.kind = pl.clip == 15 ? SK_INT5 : SK_INT6;
    if (c.gptq_lite == 2) { pl.rule = QR_MATRIX_SEARCH; pl.qmin = -pl.clip; pl.qmax = pl.clip; }
    else if (c.gptq_lite == 1 || mixed) { pl.rule = c.gptq_lite == 1 ? QR_ROW_SEARCH : QR_ROW_MAX; pl.qmin = -pl.clip - 1; pl.qmax = pl.clip; }
    else { pl.rule = QR_PERCENTILE; pl.qmin = -pl.clip; pl.qmax = pl.clip - 1; }  // PR #600: [−31, 30]
    return pl;
}

// --- Quantization: one row, one tensor ----------------------------------------------------------
// q = clamp(rint(clamp(x, ±c) / s), qmin, qmax) with a real fp32 division; returns Σ (x − q·s)².
static double quantize_row(const float* x, int n, float c, float s, const QuantPlan& pl, int8_t* q) {
    double err = 0;
    for (int i = 0; i < n; i++) {
        float r = fminf(fmaxf(rintf(fminf(fmaxf(x[i], -c), c) / s), (float)pl.qmin), (float)pl.qmax);
        q[i] = (int8_t)r;
        double d = (double)x[i] - (double)(r * s);
        err += d * d;
    }
    return err;
}
// Variant B's scale: fp16(max(c/clip, 1e−12)), at least fp16's smallest normal 2^−14.
static uint16_t row_max_scale(float c, int clip) {
    return float_to_half(std::max(half_to_float(float_to_half(std::max(c / (float)clip, 1e-12f))), 6.103515625e-05f));
}
static std::vector<float> sorted_abs_row(const float* x, int n) {
    std::vector<float> a(n);
    for (int i = 0; i < n; i++) a[i] = fabsf(x[i]);
    std::sort(a.begin(), a.end());
    return a;
}

struct QTensor {
    QuantPlan plan;
    std::vector<int8_t> q;         // quantized kinds: one value per element
    std::vector<uint16_t> scales;  // quantized kinds: fp16 scale per row
    std::vector<uint16_t> f16;     // SK_F16 values
    std::vector<float> f32;        // SK_F32 values
};

static QTensor quantize_tensor(const Config& c, const ParamSpec& p, const float* w) {
    QTensor t;
    t.plan = quant_plan(c, p);
    const QuantPlan& pl = t.plan;
    if (pl.kind == SK_F32) { t.f32.assign(w, w + p.numel); return t; }
    if (pl.kind == SK_F16) { t.f16.resize(p.numel); for (size_t i = 0; i < p.numel; i++) t.f16[i] = float_to_half(w[i]); return t; }
    int rows = p.rows(), cols = (int)(p.numel / rows);
    t.q.resize(p.numel);
    t.scales.resize(rows);
    if (pl.rule == QR_MATRIX_SEARCH) {
        // One percentile for the whole matrix: the one whose dequantized matrix is closest in MSE
        // (strict <, so the earlier candidate wins ties). Scale floor 1/clip, q in [−clip, clip].
        static const float pcts[] = {0.999f, 0.9995f, 0.9999f, 0.99999f, 1.0f};
        std::vector<float> sorted(p.numel);
        #pragma omp parallel for
        for (int r = 0; r < rows; r++) {
            std::vector<float> a = sorted_abs_row(w + (size_t)r * cols, cols);
            std::copy(a.begin(), a.end(), sorted.begin() + (size_t)r * cols);
        }
        std::vector<int8_t> q(p.numel);
        std::vector<uint16_t> s(rows);
        std::vector<double> row_err(rows);
        double best = INFINITY;
        for (float pct : pcts) {
            #pragma omp parallel for
            for (int r = 0; r < rows; r++) {
                const float* a = sorted.data() + (size_t)r * cols;
                float clipv = pct < 1.0f ? quantile_sorted(a, cols, pct) : a[cols - 1];
                s[r] = float_to_half(std::max(clipv / (float)pl.clip, (float)(1.0 / pl.clip)));
                row_err[r] = quantize_row(w + (size_t)r * cols, cols, INFINITY, half_to_float(s[r]), pl, q.data() + (size_t)r * cols);
            }
            double err = 0;
            for (int r = 0; r < rows; r++) err += row_err[r];  // in row order: deterministic
            if (err < best) { best = err; t.q = q; t.scales = s; }
        }
        return t;
    }
    #pragma omp parallel for
    for (int r = 0; r < rows; r++) {
        const float* x = w + (size_t)r * cols;
        int8_t* q = t.q.data() + (size_t)r * cols;
        if (pl.rule == QR_PERCENTILE) {
            // q is computed with the fp32 scale, the fp16 one is stored: the reference's mismatch.
            std::vector<float> a = sorted_abs_row(x, cols);
            float clipv = quantile_sorted(a.data(), cols, 0.9999984f);
            float s = std::max(clipv / (float)pl.clip, (float)(1.0 / pl.clip));
            quantize_row(x, cols, clipv, s, pl, q);
            t.scales[r] = float_to_half(s);
        } else if (pl.rule == QR_ROW_MAX) {
            float amax = 0;
            for (int i = 0; i < cols; i++) amax = std::max(amax, fabsf(x[i]));
            t.scales[r] = row_max_scale(amax, pl.clip);
            quantize_row(x, cols, INFINITY, half_to_float(t.scales[r]), pl, q);
        } else {  // QR_ROW_SEARCH: clip = the sorted |row| at index int(p·(n−1)), best row MSE wins
            static const double pcts[] = {0.95, 0.975, 0.99, 0.995, 1.0};
            std::vector<float> a = sorted_abs_row(x, cols);
            std::vector<int8_t> tmp(cols);
            double best = INFINITY;
            for (double pct : pcts) {
                size_t idx = std::min((size_t)(pct * (cols - 1)), (size_t)cols - 1);
                uint16_t s = row_max_scale(a[idx], pl.clip);
                double err = quantize_row(x, cols, INFINITY, half_to_float(s), pl, tmp.data());
                if (err < best) { best = err; t.scales[r] = s; std::copy(tmp.begin(), tmp.end(), q); }
            }
        }
    }
    return t;
}

// Dequantized values are exactly float(q)·float(fp16 scale); passthrough fp16 → float(half).
static void dequantize_tensor(const ParamSpec& p, const QTensor& t, float* out) {
    if (t.plan.kind == SK_F32) { std::copy(t.f32.begin(), t.f32.end(), out); return; }
    if (t.plan.kind == SK_F16) { for (size_t i = 0; i < p.numel; i++) out[i] = half_to_float(t.f16[i]); return; }
    size_t cols = p.numel / t.scales.size();
    for (size_t r = 0; r < t.scales.size(); r++) {
        float s = half_to_float(t.scales[r]);
        for (size_t i = r * cols; i < (r + 1) * cols; i++) out[i] = (float)t.q[i] * s;
    }
}

// --- Bit packing (eval.md §1.6, generalized): u = q + 2^(b−1), an LSB-first bit stream ------------
static size_t packed_bytes(size_t n, int bits) { return (n * bits + 7) / 8; }
static void pack_bits(const int8_t* q, size_t n, int bits, uint8_t* out) {
    uint64_t acc = 0;
    int have = 0;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        acc |= (uint64_t)((uint8_t)(q[i] + (1 << (bits - 1))) & ((1u << bits) - 1)) << have;
        have += bits;
        while (have >= 8) { out[o++] = (uint8_t)acc; acc >>= 8; have -= 8; }
    }
    if (have > 0) out[o++] = (uint8_t)acc;  // the last byte is zero-padded
}
static void unpack_bits(const uint8_t* in, size_t n, int bits, int8_t* q) {
    uint64_t acc = 0;
    int have = 0;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        while (have < bits) { acc |= (uint64_t)in[o++] << have; have += 8; }
        q[i] = (int8_t)((int)(acc & ((1u << bits) - 1)) - (1 << (bits - 1)));
        acc >>= bits;
        have -= bits;
    }
}

// --- Whole model: quantize, dequantize ------------------------------------------------------------
static std::vector<QTensor> quantize_model(const Config& c, const std::vector<ParamSpec>& t, const float* w) {
    std::vector<QTensor> qt;
    for (const ParamSpec& p : t) {
        for (size_t i = 0; i < p.numel; i++)
            if (!std::isfinite(w[p.offset + i])) fail("export: %s[%zu] = %g is not finite: cannot quantize (did training diverge?)", p.name.c_str(), i, w[p.offset + i]);
        qt.push_back(quantize_tensor(c, p, w + p.offset));
    }
    return qt;
}
// The weights the artifact will hold, without writing it: artifact_parse(artifact_build(...))
// gives the same floats bit for bit (the same QTensors through the same dequantize_tensor).
[[maybe_unused]] static void quantize_dequantize(Config& c, const std::vector<ParamSpec>& t, const float* w, std::vector<float>* out) {
    std::vector<QTensor> qt = quantize_model(c, t, w);
    out->assign(param_arena_size(t), 0.0f);
    for (size_t i = 0; i < t.size(); i++) dequantize_tensor(t[i], qt[i], out->data() + t[i].offset);
}

// --- The artifact file ----------------------------------------------------------------------------
// Format v1, little-endian. The file is a valid zstd stream (`zstd -d` prints header + groups):
//   16 B        skippable frame 0x184D2A50, size 8: "PGZA", u32 format version
//   zstd frame  header: u32 n + config text (config_to_text); u32 tensor count, then per tensor
//               u16 n + name, u8 ndim, u32 dims[ndim], u8 kind (SK_*), u64 value offset in its
//               group, u64 scale offset in the scale group; then per group u8 packing (PK_*),
//               u64 raw bytes, u64 frame bytes
//   zstd frames one per group, in G_* order (an empty group is an empty frame)
//   16 B        skippable frame 0x184D2A51, size 8: fnv1a64 of every byte before it
// A group holds one kind of data of every tensor, in table order. Offsets count bytes of the
// group's content as the table describes it: one byte per value, or each tensor's bit stream
// starting on a byte; floats before the plane shuffle.
//
// Layouts measured (pr467 shape, synthetic trained-like weights: rows ~ Student-t(6) with
// log-normal row std, 3% pruned, mixed int5/int6, zstd-22; no trained pr467 weights yet), bytes:
//   grouped by kind, one frame per group, float byte planes       13,836,982   <- this format
//   grouped by kind, one frame for everything                     13,844,662
//   grouped, floats not shuffled (planes: fp16 −7%, scales −9%)    13,931,221
//   table order, each tensor's scales then values, one frame      14,239,369
//   table order, one frame per tensor                             14,731,134
//   int5 values 7,094,086 in bytes vs 8,777,444 bit-packed; int6 5,515,549 vs 6,362,481. zstd's
//   literal coder is order-0 over bytes: b-bit values straddling bytes cost more than a byte each.
//   The final format on the tests' weights (Gaussian × e^{0.3·N} rows): 14,466,656 with PACK=auto
//   (= bytes) vs 17,158,634 all bit-packed; on tiny trained 30 steps: 763,155 vs 800,200.
enum ArtifactGroup { G_INT5, G_INT6, G_INT8, G_SCALES, G_FP16, G_FP32, G_NUM };
static const char* G_NAMES[] = {"int5 values", "int6 values", "int8 values", "fp16 scales", "fp16 tensors", "fp32 tensors"};
enum Packing { PK_BYTES, PK_BITS, PK_PLANES };
static const char* PK_NAMES[] = {"bytes", "bits", "planes"};
static const uint32_t ARTIFACT_VERSION = 1;
static const uint32_t ZSTD_SKIP_MAGIC = 0x184D2A50;
static const size_t ARTIFACT_HEADER_CAP = 1 << 22;         // decompressed header (a few KB in practice)
static const size_t ARTIFACT_MAX_PARAMS = (size_t)1 << 28; // 1 GiB of fp32: 10× any model that fits 16 MB

static int value_group(StoreKind k) { return k == SK_INT5 ? G_INT5 : k == SK_INT6 ? G_INT6 : k == SK_INT8 ? G_INT8 : k == SK_F16 ? G_FP16 : G_FP32; }
static int group_width(int g) { return g == G_FP32 ? 4 : g >= G_SCALES ? 2 : 1; }
static bool group_has_bits(int g) { return g == G_INT5 || g == G_INT6; }

// Byte planes: the first byte of every element, then every second byte, …: zstd's order-0
// coders then see sign/exponent bytes and mantissa bytes apart.
static std::vector<uint8_t> planes_split(const std::vector<uint8_t>& x, int w) {
    std::vector<uint8_t> out(x.size());
    size_t n = x.size() / w;
    for (size_t i = 0; i < n; i++) for (int b = 0; b < w; b++) out[b * n + i] = x[i * w + b];
    return out;
}
static std::vector<uint8_t> planes_join(const std::vector<uint8_t>& x, int w) {
    std::vector<uint8_t> out(x.size());
    size_t n = x.size() / w;
    for (size_t i = 0; i < n; i++) for (int b = 0; b < w; b++) out[i * w + b] = x[b * n + i];
    return out;
}

// Each tensor's value and scale offsets, and every group's content size, for given packings.
static void group_layout(const std::vector<ParamSpec>& t, const std::vector<StoreKind>& kinds, const int* packing,
                         std::vector<size_t>* voff, std::vector<size_t>* soff, size_t* group_bytes) {
    std::fill(group_bytes, group_bytes + G_NUM, 0);
    voff->assign(t.size(), 0); soff->assign(t.size(), 0);
    for (size_t i = 0; i < t.size(); i++) {
        int g = value_group(kinds[i]);
        (*voff)[i] = group_bytes[g];
        group_bytes[g] += packing[g] == PK_BITS ? packed_bytes(t[i].numel, SK_BITS[kinds[i]]) : t[i].numel * group_width(g);
        if (kinds[i] >= SK_INT8) { (*soff)[i] = group_bytes[G_SCALES]; group_bytes[G_SCALES] += 2 * (size_t)t[i].rows(); }
    }
}

static std::vector<uint8_t> group_content(int g, int packing, const std::vector<ParamSpec>& t, const std::vector<QTensor>& qt) {
    std::vector<uint8_t> out;
    auto add = [&](const void* src, size_t n) { out.insert(out.end(), (const uint8_t*)src, (const uint8_t*)src + n); };
    for (size_t i = 0; i < t.size(); i++) {
        const QTensor& q = qt[i];
        if (g == G_SCALES) add(q.scales.data(), 2 * q.scales.size());
        else if (value_group(q.plan.kind) != g) continue;
        else if (g == G_FP16) add(q.f16.data(), 2 * q.f16.size());
        else if (g == G_FP32) add(q.f32.data(), 4 * q.f32.size());
        else if (packing == PK_BITS) {
            size_t at = out.size();
            out.resize(at + packed_bytes(q.q.size(), SK_BITS[q.plan.kind]));
            pack_bits(q.q.data(), q.q.size(), SK_BITS[q.plan.kind], out.data() + at);
        } else add(q.q.data(), q.q.size());
    }
    return group_width(g) > 1 ? planes_split(out, group_width(g)) : out;
}

static void put_le(std::vector<uint8_t>& b, uint64_t v, int n) { for (int i = 0; i < n; i++) b.push_back((uint8_t)(v >> (8 * i))); }
static uint64_t get_le(const uint8_t* p, int n) { uint64_t v = 0; for (int i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i); return v; }

// --- Export report: what the challenge counts, and what each packing would have cost -------------
// Per group: bytes_zstd in its primary packing (bytes, or planes for floats), bits_zstd bit-packed
// (the same number for groups that have no bit packing).
struct ExportGroupRow { const char* name; size_t raw_bytes, bytes_zstd, bits_zstd; int packing; };
struct ExportReport {
    size_t artifact_bytes = 0;        // the file (the challenge adds the code bytes)
    size_t raw_bytes = 0;             // what zstd was given: header + groups as stored
    size_t bits_packed_bytes = 0;     // the file had every int5/int6 group been bit-packed
    size_t byte_container_bytes = 0;  // ... and had every one been in byte containers
    size_t overhead_bytes = 0;        // magic, header frame, checksum trailer
    size_t params = 0, params_per_kind[SK_NUM] = {};
    std::string scheme, pack;
    int zstd_level = 0, gptq_lite = 0;
    float prune_frac = 0;
    std::vector<ExportGroupRow> groups;
};

// --- Writing --------------------------------------------------------------------------------------
static std::vector<uint8_t> artifact_build(Config& c, const std::vector<ParamSpec>& t, const float* w, ExportReport* rep) {
    std::vector<ParamSpec> want = build_param_table(c);
    bool same = want.size() == t.size();
    for (size_t i = 0; same && i < t.size(); i++) same = want[i].name == t[i].name && want[i].shape == t[i].shape;
    if (!same) fail("export: the parameter table does not match the config's (CONFIG=%s)", c.preset.c_str());
    std::vector<QTensor> qt = quantize_model(c, t, w);
    // Every group in its primary packing (bytes, or float byte planes); int5/int6 bit-packed too,
    // all compressed at once (independent single-threaded frames: the bytes do not depend on it).
    std::vector<uint8_t> raw[G_NUM][2], zst[G_NUM][2];
    std::vector<int> jobs;
    for (int g = 0; g < G_NUM; g++) {
        raw[g][0] = group_content(g, group_width(g) > 1 ? PK_PLANES : PK_BYTES, t, qt);
        jobs.push_back(2 * g);
        if (group_has_bits(g)) { raw[g][1] = group_content(g, PK_BITS, t, qt); jobs.push_back(2 * g + 1); }
    }
    std::sort(jobs.begin(), jobs.end(), [&](int a, int b) { return raw[a / 2][a % 2].size() > raw[b / 2][b % 2].size(); });
    #pragma omp parallel for schedule(dynamic, 1)
    for (int j = 0; j < (int)jobs.size(); j++) {
        const std::vector<uint8_t>& r = raw[jobs[j] / 2][jobs[j] % 2];
        zst[jobs[j] / 2][jobs[j] % 2] = zstd_compress(r.data(), r.size(), c.zstd_level);
    }
    int packing[G_NUM], slot[G_NUM];
    for (int g = 0; g < G_NUM; g++) {
        slot[g] = group_has_bits(g) && (c.pack == "bits" || (c.pack == "auto" && zst[g][1].size() < zst[g][0].size()));
        packing[g] = slot[g] ? PK_BITS : group_width(g) > 1 ? PK_PLANES : PK_BYTES;
    }
    std::vector<StoreKind> kinds;
    for (const QTensor& q : qt) kinds.push_back(q.plan.kind);
    std::vector<size_t> voff, soff;
    size_t group_bytes[G_NUM];
    group_layout(t, kinds, packing, &voff, &soff, group_bytes);

    std::vector<uint8_t> h;
    std::string text = config_to_text(c);
    put_le(h, text.size(), 4);
    h.insert(h.end(), text.begin(), text.end());
    put_le(h, t.size(), 4);
    for (size_t i = 0; i < t.size(); i++) {
        put_le(h, t[i].name.size(), 2);
        h.insert(h.end(), t[i].name.begin(), t[i].name.end());
        put_le(h, t[i].shape.size(), 1);
        for (int d : t[i].shape) put_le(h, d, 4);
        put_le(h, kinds[i], 1);
        put_le(h, voff[i], 8);
        put_le(h, soff[i], 8);
    }
    for (int g = 0; g < G_NUM; g++) { put_le(h, packing[g], 1); put_le(h, group_bytes[g], 8); put_le(h, zst[g][slot[g]].size(), 8); }
    std::vector<uint8_t> hz = zstd_compress(h.data(), h.size(), c.zstd_level);

    std::vector<uint8_t> f;
    put_le(f, ZSTD_SKIP_MAGIC, 4); put_le(f, 8, 4);
    f.insert(f.end(), {'P', 'G', 'Z', 'A'});
    put_le(f, ARTIFACT_VERSION, 4);
    f.insert(f.end(), hz.begin(), hz.end());
    for (int g = 0; g < G_NUM; g++) f.insert(f.end(), zst[g][slot[g]].begin(), zst[g][slot[g]].end());
    uint64_t sum = fnv1a64(f.data(), f.size());
    put_le(f, ZSTD_SKIP_MAGIC + 1, 4); put_le(f, 8, 4); put_le(f, sum, 8);

    if (rep) {
        ExportReport& r = *rep;
        r = ExportReport();
        r.artifact_bytes = f.size();
        r.overhead_bytes = 32 + hz.size();
        r.raw_bytes = h.size();
        r.bits_packed_bytes = r.byte_container_bytes = r.overhead_bytes;
        for (int g = 0; g < G_NUM; g++) {
            size_t bytes = zst[g][0].size(), bits = group_has_bits(g) ? zst[g][1].size() : bytes;
            r.raw_bytes += raw[g][slot[g]].size();
            r.byte_container_bytes += bytes;
            r.bits_packed_bytes += bits;
            r.groups.push_back({G_NAMES[g], raw[g][slot[g]].size(), bytes, bits, packing[g]});
        }
        for (size_t i = 0; i < t.size(); i++) { r.params += t[i].numel; r.params_per_kind[kinds[i]] += t[i].numel; }
        r.scheme = c.quant_scheme; r.pack = c.pack; r.zstd_level = c.zstd_level; r.gptq_lite = c.gptq_lite; r.prune_frac = c.prune_frac;
    }
    return f;
}

static void print_export_report(const ExportReport& r) {
    log0("export: quant_scheme=%s gptq_lite=%d prune_frac=%g pack=%s zstd_level=%d params=%zu (int5 %zu, int6 %zu, int8 %zu, fp16 %zu, fp32 %zu)\n",
         r.scheme.c_str(), r.gptq_lite, r.prune_frac, r.pack.c_str(), r.zstd_level, r.params, r.params_per_kind[SK_INT5],
         r.params_per_kind[SK_INT6], r.params_per_kind[SK_INT8], r.params_per_kind[SK_F16], r.params_per_kind[SK_F32]);
    for (const ExportGroupRow& g : r.groups) {
        std::string alt = g.bits_zstd != g.bytes_zstd || g.packing == PK_BITS ? fmt(" (bytes %zu, bits %zu)", g.bytes_zstd, g.bits_zstd) : "";
        log0("export: %-12s raw %10zu -> zstd %10zu as %s%s\n", g.name, g.raw_bytes, g.packing == PK_BITS ? g.bits_zstd : g.bytes_zstd,
             PK_NAMES[g.packing], alt.c_str());
    }
    log0("export: header, magic and checksum %zu bytes; raw %zu bytes; all bit-packed %zu bytes, all byte containers %zu bytes\n",
         r.overhead_bytes, r.raw_bytes, r.bits_packed_bytes, r.byte_container_bytes);
    log0("Serialized model %s+zstd: %zu bytes\n", r.scheme == "int8" ? "int8" : "int6", r.artifact_bytes);
}

// --- Reading: every check before anything is allocated from a size the file declares ------------
struct Artifact {
    Config cfg;
    std::vector<ParamSpec> table;     // build_param_table(cfg), checked against the stored table
    std::vector<QTensor> tensors;
    int packing[G_NUM];
    size_t raw_bytes[G_NUM], frame_bytes[G_NUM], header_frame_bytes = 0;
};

// A stored config is data: bound its shape before build_param_table sizes anything from it.
static void artifact_check_config(const Config& c, const char* path) {
    auto in = [&](const char* key, double v, double lo, double hi) {
        if (!(v >= lo && v <= hi)) fail("%s: stored config has %s=%g, expected %g..%g (corrupt artifact)", path, key, v, lo, hi);
    };
    in("VOCAB_SIZE", c.vocab_size, 1, 65536);
    in("NUM_LAYERS", c.num_layers, 1, 1024);
    in("MODEL_DIM", c.model_dim, 1, 65536);
    in("NUM_HEADS", c.num_heads, 1, c.model_dim);
    in("NUM_KV_HEADS", c.num_kv_heads, 1, c.num_heads);
    in("MLP_MULT", c.mlp_mult, 1.0 / c.model_dim, 64);
    in("UNIQUE_LAYERS", c.unique_layers, 0, c.num_layers);
    if (!c.named_cores && c.num_cores() != c.num_layers) fail("%s: stored config has UNIQUE_LAYERS=%d without NAMED_CORES=1 (corrupt artifact)", path, c.unique_layers);
    in("BIGRAM_VOCAB_SIZE", c.bigram_vocab_size, 0, 1 << 24);
    in("BIGRAM_DIM", c.bigram_dim, 0, 65536);
    in("BIGRAM_HASH_SIZE", c.bigram_hash_size, 0, 1 << 24);
    in("GPTQ_LITE", c.gptq_lite, 0, 2);
    if (c.quant_scheme != "int8" && c.quant_scheme != "mixed" && c.quant_scheme != "int6")
        fail("%s: stored config has QUANT_SCHEME=%s, expected int8, mixed or int6 (corrupt artifact)", path, c.quant_scheme.c_str());
}

// The zstd frame at *at (before end). Its declared content size must be exactly `want` (the size
// the tensor table implies; for the header, at most ARTIFACT_HEADER_CAP) before it is allocated.
static std::vector<uint8_t> artifact_frame(const std::vector<uint8_t>& f, size_t* at, size_t end, size_t want, const char* path, const char* what) {
    size_t fs = ZSTD_findFrameCompressedSize(f.data() + *at, end - *at);
    if (ZSTD_isError(fs)) fail("%s: %s: no complete zstd frame at byte %zu (%s): corrupt artifact", path, what, *at, ZSTD_getErrorName(fs));
    unsigned long long n = ZSTD_getFrameContentSize(f.data() + *at, fs);
    if (n == ZSTD_CONTENTSIZE_UNKNOWN || n == ZSTD_CONTENTSIZE_ERROR) fail("%s: %s: zstd frame without a content size: corrupt artifact", path, what);
    size_t cap = want == SIZE_MAX ? ARTIFACT_HEADER_CAP : want;
    if (n > cap) fail("%s: %s declares %llu decompressed bytes where at most %zu are allowed (zstd bomb or corrupt artifact)", path, what, n, cap);
    if (want != SIZE_MAX && n != want) fail("%s: %s holds %llu bytes, the tensor table needs %zu: corrupt artifact", path, what, n, want);
    std::vector<uint8_t> out(n);
    size_t got = ZSTD_decompress(out.data(), out.size(), f.data() + *at, fs);
    if (ZSTD_isError(got) || got != n) fail("%s: %s: zstd cannot decompress it (%s): corrupt artifact", path, what, ZSTD_isError(got) ? ZSTD_getErrorName(got) : "short");
    *at += fs;
    return out;
}

static Artifact artifact_read(const std::vector<uint8_t>& f, const std::string& path_s) {
    const char* path = path_s.c_str();
    size_t n = f.size();
    if (n < 32) fail("%s: %zu bytes is too short for a pgolf artifact (truncated?)", path, n);
    if (get_le(&f[0], 4) != ZSTD_SKIP_MAGIC || get_le(&f[4], 4) != 8 || memcmp(&f[8], "PGZA", 4) != 0)
        fail("%s: not a pgolf artifact (wrong magic)", path);
    uint32_t version = (uint32_t)get_le(&f[12], 4);
    if (version != ARTIFACT_VERSION) fail("%s: artifact format version %u, this build reads version %u", path, version, ARTIFACT_VERSION);
    if (get_le(&f[n - 16], 4) != ZSTD_SKIP_MAGIC + 1 || get_le(&f[n - 12], 4) != 8)
        fail("%s: no checksum trailer at the end: the file is truncated or corrupt", path);
    uint64_t stored = get_le(&f[n - 8], 8), sum = fnv1a64(f.data(), n - 16);
    if (stored != sum) fail("%s: checksum mismatch (stored %016llx, computed %016llx): the file is corrupt or truncated", path,
                            (unsigned long long)stored, (unsigned long long)sum);
    Artifact a;
    size_t at = 16, end = n - 16;
    std::vector<uint8_t> h = artifact_frame(f, &at, end, SIZE_MAX, path, "header");
    a.header_frame_bytes = at - 16;
    size_t hp = 0;
    auto take = [&](size_t k) -> const uint8_t* {
        if (k > h.size() - hp) fail("%s: the artifact header ends early at byte %zu: corrupt artifact", path, hp);
        hp += k;
        return h.data() + hp - k;
    };
    auto le = [&](int k) { return get_le(take(k), k); };
    size_t text_len = le(4);
    std::string text((const char*)take(text_len), text_len);
    a.cfg = config_from_text(text, path_s);
    artifact_check_config(a.cfg, path);
    a.table = build_param_table(a.cfg);
    if (param_arena_size(a.table) > ARTIFACT_MAX_PARAMS)
        fail("%s: stored config describes %zu parameters, more than this reader accepts (%zu)", path, param_arena_size(a.table), ARTIFACT_MAX_PARAMS);
    size_t count = le(4);
    if (count != a.table.size())
        fail("%s: the tensor table lists %zu tensors, the stored config (CONFIG=%s) gives %zu: config contradicts the tensor table", path, count, a.cfg.preset.c_str(), a.table.size());
    std::vector<StoreKind> kinds;
    std::vector<size_t> voff, soff;
    auto shape_str = [](const std::vector<int>& s) { std::string o = "["; for (size_t i = 0; i < s.size(); i++) o += (i ? ", " : "") + std::to_string(s[i]); return o + "]"; };
    for (const ParamSpec& p : a.table) {
        size_t name_len = le(2);
        std::string name((const char*)take(name_len), name_len);
        std::vector<int> shape(le(1));
        for (int& d : shape) d = (int)le(4);
        if (name != p.name || shape != p.shape)
            fail("%s: the tensor table has %s %s where the stored config gives %s %s: config contradicts the tensor table", path,
                 name.c_str(), shape_str(shape).c_str(), p.name.c_str(), shape_str(p.shape).c_str());
        uint64_t kind = le(1);
        StoreKind plan = quant_plan(a.cfg, p).kind;
        if (kind != (uint64_t)plan)
            fail("%s: %s is stored as %s, the stored config (QUANT_SCHEME=%s) gives %s: config contradicts the tensor table", path,
                 p.name.c_str(), kind < SK_NUM ? SK_NAMES[kind] : "an unknown kind", a.cfg.quant_scheme.c_str(), SK_NAMES[plan]);
        kinds.push_back(plan);
        voff.push_back(le(8));
        soff.push_back(le(8));
    }
    for (int g = 0; g < G_NUM; g++) {
        a.packing[g] = (int)le(1);
        a.raw_bytes[g] = le(8);
        a.frame_bytes[g] = le(8);
        bool ok = group_width(g) > 1 ? a.packing[g] == PK_PLANES : a.packing[g] == PK_BYTES || (group_has_bits(g) && a.packing[g] == PK_BITS);
        if (!ok) fail("%s: %s stored with packing %d: corrupt artifact", path, G_NAMES[g], a.packing[g]);
    }
    if (hp != h.size()) fail("%s: %zu unexpected bytes after the artifact header's group table: corrupt artifact", path, h.size() - hp);
    std::vector<size_t> want_voff, want_soff;
    size_t group_bytes[G_NUM];
    group_layout(a.table, kinds, a.packing, &want_voff, &want_soff, group_bytes);
    for (size_t i = 0; i < a.table.size(); i++)
        if (voff[i] != want_voff[i] || soff[i] != want_soff[i])
            fail("%s: %s: stored offsets %zu/%zu, the table implies %zu/%zu: corrupt artifact", path, a.table[i].name.c_str(), voff[i], soff[i], want_voff[i], want_soff[i]);
    std::vector<uint8_t> content[G_NUM];
    for (int g = 0; g < G_NUM; g++) {
        if (a.raw_bytes[g] != group_bytes[g])
            fail("%s: %s: the group table says %zu bytes, the tensor table needs %zu: corrupt artifact", path, G_NAMES[g], a.raw_bytes[g], group_bytes[g]);
        size_t start = at;
        content[g] = artifact_frame(f, &at, end, group_bytes[g], path, G_NAMES[g]);
        if (at - start != a.frame_bytes[g])
            fail("%s: %s: frame of %zu bytes, the group table says %zu: corrupt artifact", path, G_NAMES[g], at - start, a.frame_bytes[g]);
        if (group_width(g) > 1) content[g] = planes_join(content[g], group_width(g));
    }
    if (at != end) fail("%s: %zu unexpected bytes after the last group: corrupt artifact", path, end - at);
    // Unpack each tensor; values outside its quantizer's range, or bad scales, mean corruption.
    for (size_t i = 0; i < a.table.size(); i++) {
        const ParamSpec& p = a.table[i];
        QTensor q;
        q.plan = quant_plan(a.cfg, p);
        const uint8_t* v = content[value_group(q.plan.kind)].data() + voff[i];
        if (q.plan.kind == SK_F32) { q.f32.resize(p.numel); memcpy(q.f32.data(), v, 4 * p.numel); }
        else if (q.plan.kind == SK_F16) { q.f16.resize(p.numel); memcpy(q.f16.data(), v, 2 * p.numel); }
        else {
            q.q.resize(p.numel);
            if (a.packing[value_group(q.plan.kind)] == PK_BITS) unpack_bits(v, p.numel, SK_BITS[q.plan.kind], q.q.data());
            else memcpy(q.q.data(), v, p.numel);
            for (size_t k = 0; k < p.numel; k++)
                if (q.q[k] < q.plan.qmin || q.q[k] > q.plan.qmax)
                    fail("%s: %s[%zu] = %d lies outside [%d, %d]: corrupt artifact", path, p.name.c_str(), k, q.q[k], q.plan.qmin, q.plan.qmax);
            q.scales.resize(p.rows());
            memcpy(q.scales.data(), content[G_SCALES].data() + soff[i], 2 * q.scales.size());
            for (size_t r = 0; r < q.scales.size(); r++) {
                float s = half_to_float(q.scales[r]);
                if (!(s > 0 && std::isfinite(s))) fail("%s: %s: scale of row %zu is %g: corrupt artifact", path, p.name.c_str(), r, s);
            }
        }
        a.tensors.push_back(std::move(q));
    }
    return a;
}

// Verifies the file and dequantizes it into the arena layout of build_param_table(*c).
static void artifact_parse(const std::vector<uint8_t>& file, const std::string& path, Config* c, std::vector<float>* w) {
    Artifact a = artifact_read(file, path);
    w->assign(param_arena_size(a.table), 0.0f);
    for (size_t i = 0; i < a.table.size(); i++) dequantize_tensor(a.table[i], a.tensors[i], w->data() + a.table[i].offset);
    *c = a.cfg;
}

// --- ./train_gpt inspect ARTIFACT [CHECKPOINT] ---------------------------------------------------
// Per tensor: shape, kind, packing, zstd size of the tensor alone (values + scales, at the
// artifact's level: an estimate, the groups share context), scale range; with the full-precision
// checkpoint (safetensors) also the dequantization error, which includes pruning.
#if PGOLF_CPU_REFERENCE
static void load_checkpoint_weights(const std::string& path, const std::vector<ParamSpec>& table, std::vector<float>& w);  // section 11
static size_t zstd_size(const std::vector<uint8_t>& raw, int level) { return zstd_compress(raw.data(), raw.size(), level).size(); }
static int inspect_main(int argc, char** argv) {
    if (argc < 3 || argc > 4) fail("usage: %s inspect ARTIFACT [CHECKPOINT.safetensors]", argv[0]);
    std::string path = argv[2];
    std::vector<uint8_t> file = read_file(path);
    Artifact a = artifact_read(file, path);
    const Config& c = a.cfg;
    std::vector<float> deq(param_arena_size(a.table), 0.0f), ref;
    for (size_t i = 0; i < a.table.size(); i++) dequantize_tensor(a.table[i], a.tensors[i], deq.data() + a.table[i].offset);
    if (argc == 4) load_checkpoint_weights(argv[3], a.table, ref);
    printf("%s: %zu bytes, format v%u, CONFIG=%s QUANT_SCHEME=%s GPTQ_LITE=%d PRUNE_FRAC=%g PACK=%s ZSTD_LEVEL=%d\n", path.c_str(),
           file.size(), ARTIFACT_VERSION, c.preset.c_str(), c.quant_scheme.c_str(), c.gptq_lite, c.prune_frac, c.pack.c_str(), c.zstd_level);
    printf("header frame %zu bytes\n", a.header_frame_bytes);
    for (int g = 0; g < G_NUM; g++)
        printf("group %-13s %-6s raw %10zu  zstd %10zu\n", G_NAMES[g], PK_NAMES[a.packing[g]], a.raw_bytes[g], a.frame_bytes[g]);
    std::vector<size_t> est(a.table.size());
    #pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < (int)a.table.size(); i++) {
        std::vector<ParamSpec> one = {a.table[i]};
        std::vector<QTensor> qone = {a.tensors[i]};
        int g = value_group(a.tensors[i].plan.kind);
        est[i] = zstd_size(group_content(g, a.packing[g], one, qone), c.zstd_level);
        if (!a.tensors[i].scales.empty()) est[i] += zstd_size(group_content(G_SCALES, PK_PLANES, one, qone), c.zstd_level);
    }
    printf("%-32s %-12s %-5s %-6s %10s %11s %11s%s\n", "tensor", "shape", "kind", "pack", "zstd_alone", "scale_min", "scale_max",
           ref.empty() ? "" : "     max_abs_err         rms_err");
    for (size_t i = 0; i < a.table.size(); i++) {
        const ParamSpec& p = a.table[i];
        const QTensor& q = a.tensors[i];
        std::string shape;
        for (size_t d = 0; d < p.shape.size(); d++) shape += (d ? "x" : "") + std::to_string(p.shape[d]);
        float smin = INFINITY, smax = 0;
        for (uint16_t s : q.scales) { smin = std::min(smin, half_to_float(s)); smax = std::max(smax, half_to_float(s)); }
        char scales[64] = "          -           -";
        if (!q.scales.empty()) snprintf(scales, sizeof scales, "%11.4e %11.4e", smin, smax);
        printf("%-32s %-12s %-5s %-6s %10zu %s", p.name.c_str(), shape.empty() ? "scalar" : shape.c_str(), SK_NAMES[q.plan.kind],
               PK_NAMES[a.packing[value_group(q.plan.kind)]], est[i], scales);
        if (!ref.empty()) {
            double mx = 0, ss = 0;
            for (size_t k = 0; k < p.numel; k++) {
                double d = (double)deq[p.offset + k] - ref[p.offset + k];
                mx = std::max(mx, fabs(d)); ss += d * d;
            }
            printf(" %15.6e %15.6e", mx, sqrt(ss / std::max<size_t>(p.numel, 1)));
        }
        printf("\n");
    }
    return 0;
}
#else
static int inspect_main(int, char** argv) { fail("%s inspect: not part of the stripped submission; use the full build", argv[0]); }
#endif
