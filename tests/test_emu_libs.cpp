// The CUDA emulator's library shims (tests/emu/emu_cublaslt.h, emu_cub.h, emu_nccl.h) against
// independent truth: cuBLASLt products against a naive fp64 product and a bit-level bf16 rounding,
// the radix sort against std::stable_sort and an arithmetic digit, NCCL collectives against sums the
// test computes itself. Built with g++ (no CUDA library is linked). Under `mpirun -np 2`
// (tests/test_emu_nccl.sh) the nccl_* tests run over two ranks.
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <functional>
#include <random>
#include <stdexcept>
#include "harness.h"
#include "emu/emu_contract.h"
#include "emu/emu_cublaslt.h"
#include "emu/emu_cub.h"
#include "emu/emu_nccl.h"

// MPI's own allocations outlive MPI_Finalize; only errors and overflows matter here
extern "C" const char* __asan_default_options() { return "detect_leaks=0"; }

// --- the contract, for this test alone: streams are a queue the test runs with flush() -----------------
static std::deque<std::function<void()>> g_queue;
void emu_stream_submit(cudaStream_t, std::function<void()> work) { g_queue.push_back(std::move(work)); }
static void flush() {
    while (!g_queue.empty()) {
        auto w = std::move(g_queue.front());
        g_queue.pop_front();
        w();
    }
}
struct EmuError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
void emu_fail(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    g_queue.clear();
    throw EmuError(buf);
}

// bf16 round-to-nearest-even from the bits (ties to the even mantissa), written apart from cuda_bf16.h
static uint16_t bf16_bits_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    uint32_t lsb = (u >> 16) & 1u;
    return (uint16_t)((u + 0x7fffu + lsb) >> 16);
}
static float bf16_bits_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint16_t bits_of(__nv_bfloat16 x) {
    uint16_t b;
    memcpy(&b, &x, 2);
    return b;
}
static __nv_bfloat16 bf16_of_bits(uint16_t b) {
    __nv_bfloat16_raw r;
    r.x = b;
    return __nv_bfloat16(r);
}

// ======================================= cuBLASLt ===========================================
// A column-major matrix in host memory, 256-byte aligned, with a batch stride.
struct Mat {
    cudaDataType_t type;
    int rows, cols, ld, batch;
    long long stride;
    void* p;
    Mat(cudaDataType_t t, int r, int c, int ld_, int b = 1, long long s = 0)
        : type(t), rows(r), cols(c), ld(ld_), batch(b), stride(s) {
        size_t elems = (size_t)(b - 1) * s + (size_t)ld_ * c + 64;
        p = aligned_alloc(256, (elems * esz() + 255) / 256 * 256);
        memset(p, 0, elems * esz());
    }
    ~Mat() { free(p); }
    size_t esz() const { return type == CUDA_R_16BF ? 2 : 4; }
    size_t idx(int b, int i, int j) const { return (size_t)b * stride + i + (size_t)j * ld; }
    double get(int b, int i, int j) const {
        size_t k = idx(b, i, j);
        return type == CUDA_R_16BF ? (double)__bfloat162float(((__nv_bfloat16*)p)[k]) : (double)((float*)p)[k];
    }
    void set(int b, int i, int j, float v) {
        size_t k = idx(b, i, j);
        if (type == CUDA_R_16BF)
            ((__nv_bfloat16*)p)[k] = bf16_of_bits(bf16_bits_rne(v));
        else
            ((float*)p)[k] = v;
    }
    void fill(std::mt19937& g, float scale) {
        std::normal_distribution<float> nd(0.0f, scale);
        for (int b = 0; b < batch; b++)
            for (int j = 0; j < cols; j++)
                for (int i = 0; i < rows; i++) set(b, i, j, nd(g));
    }
    cublasLtMatrixLayout_t layout() const {
        cublasLtMatrixLayout_t l;
        CHECK(cublasLtMatrixLayoutCreate(&l, type, rows, cols, ld) == CUBLAS_STATUS_SUCCESS);
        if (batch > 1) {
            int32_t bc = batch;
            int64_t st = stride;
            CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &bc, sizeof bc) ==
                  CUBLAS_STATUS_SUCCESS);
            CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &st, sizeof st) ==
                  CUBLAS_STATUS_SUCCESS);
        }
        return l;
    }
};

static uint32_t alignment_of(const void* p) {
    uint32_t al = 256;
    while (al > 1 && (uintptr_t)p % al) al /= 2;
    return al;
}
// One product as train_gpt.cu issues it: descriptor, layouts, preference with workspace and the
// pointers' alignments, heuristic, matmul. C's layout is D's (C may be D).
struct Lt {
    cublasLtHandle_t h;
    std::vector<uint8_t> workspace = std::vector<uint8_t>(1 << 20);
    Lt() { CHECK(cublasLtCreate(&h) == CUBLAS_STATUS_SUCCESS); }
    ~Lt() { cublasLtDestroy(h); }
    void matmul(bool ta, bool tb, float alpha, const Mat& A, const Mat& B, float beta, const void* C, Mat& D,
                bool run = true) {
        cublasLtMatmulDesc_t op;
        CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
        cublasOperation_t a = ta ? CUBLAS_OP_T : CUBLAS_OP_N, b = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
        CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &a, sizeof a) == CUBLAS_STATUS_SUCCESS);
        CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &b, sizeof b) == CUBLAS_STATUS_SUCCESS);
        cublasLtMatrixLayout_t la = A.layout(), lb = B.layout(), ld = D.layout();
        cublasLtMatmulPreference_t pref;
        CHECK(cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS);
        uint64_t ws = workspace.size();
        CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws) ==
              CUBLAS_STATUS_SUCCESS);
        uint32_t al[4] = {alignment_of(A.p), alignment_of(B.p), alignment_of(C ? C : D.p), alignment_of(D.p)};
        const cublasLtMatmulPreferenceAttributes_t attrs[4] = {
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
        for (int i = 0; i < 4; i++)
            CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attrs[i], &al[i], sizeof al[i]) == CUBLAS_STATUS_SUCCESS);
        cublasLtMatmulHeuristicResult_t heur;
        int found = 0;
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, ld, ld, pref, 1, &heur, &found) == CUBLAS_STATUS_SUCCESS);
        CHECK(found == 1 && heur.workspaceSize <= ws);
        cublasLtMatmulPreferenceDestroy(pref);
        if (run)
            CHECK(cublasLtMatmul(h, op, &alpha, A.p, la, B.p, lb, &beta, C ? C : D.p, ld, D.p, ld, &heur.algo,
                                 workspace.data(), workspace.size(), nullptr) == CUBLAS_STATUS_SUCCESS);
        // descriptors may go before the queued product runs: the product holds copies
        cublasLtMatrixLayoutDestroy(la);
        cublasLtMatrixLayoutDestroy(lb);
        cublasLtMatrixLayoutDestroy(ld);
        cublasLtMatmulDescDestroy(op);
    }
};

// D = alpha·op(A)·op(B) + beta·C in fp64 from the stored (already bf16) inputs, checked per element
// with fp32 accumulation's bound (k·2⁻²³ of Σ|a·b|) plus D's rounding (half an ulp: 2⁻⁹ for bf16).
static void check_product(bool ta, bool tb, double alpha, const Mat& A, const Mat& B, double beta, const Mat& Cold,
                          const Mat& D) {
    int m = D.rows, n = D.cols, k = ta ? A.rows : A.cols;
    double out_rel = D.type == CUDA_R_16BF ? std::ldexp(1.0, -8) : std::ldexp(1.0, -23);
    for (int b = 0; b < D.batch; b++)
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                double s = 0, sabs = 0;
                for (int p = 0; p < k; p++) {
                    double x = ta ? A.get(b, p, i) : A.get(b, i, p);
                    double y = tb ? B.get(b, j, p) : B.get(b, p, j);
                    s += x * y;
                    sabs += std::fabs(x * y);
                }
                double c = beta != 0 ? Cold.get(b, i, j) : 0.0;
                double want = alpha * s + beta * c;
                double tol = (k + 4) * std::ldexp(1.0, -23) * (std::fabs(alpha) * sabs + std::fabs(beta * c)) +
                             out_rel * std::fabs(want) + 1e-30;
                double got = D.get(b, i, j);
                CHECK_MSG(std::fabs(got - want) <= tol, "batch %d D(%d,%d): got %.9g want %.9g (tol %.3g; ta %d tb %d)",
                          b, i, j, got, want, tol, ta, tb);
            }
}

// Every transpose pair, bf16 and fp32 output, beta 0 / 1 / ½, padded leading dimensions, k not a multiple of 8:
// the forward (A·Bᵀ), input-gradient (A·B) and weight-gradient (Aᵀ·B) products all come down to these.
TEST(lt_matmul_matches_fp64_all_transposes) {
    std::mt19937 g(1);
    Lt lt;
    const int m = 13, n = 9, k = 37;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (cudaDataType_t dt : {CUDA_R_16BF, CUDA_R_32F})
                for (float beta : {0.0f, 1.0f, 0.5f}) {
                    Mat A(CUDA_R_16BF, ta ? k : m, ta ? m : k, (ta ? k : m) + 3),
                        B(CUDA_R_16BF, tb ? n : k, tb ? k : n, (tb ? n : k) + 5);
                    Mat D(dt, m, n, m + 2), Cold(dt, m, n, m + 2);
                    A.fill(g, 1.0f);
                    B.fill(g, 1.0f);
                    D.fill(g, 1.0f);
                    memcpy(Cold.p, D.p, (size_t)(m + 2) * n * D.esz());
                    // the padding between columns must stay as it was
                    D.set(0, m, 0, 123.0f);
                    float alpha = ta == tb ? 1.0f : -0.75f;
                    lt.matmul(ta, tb, alpha, A, B, beta, nullptr, D);
                    flush();
                    check_product(ta, tb, alpha, A, B, beta, Cold, D);
                    CHECK(D.get(0, m, 0) == 123.0);
                }
}

// Batched Newton–Schulz's pattern: batch count and strides on every matrix, C distinct from D, A and B one buffer.
TEST(lt_matmul_strided_batches) {
    std::mt19937 g(2);
    Lt lt;
    const int m = 12, k = 12, batch = 3;
    Mat X(CUDA_R_16BF, m, k, m, batch, (long long)m * k + 40);
    X.fill(g, 0.5f);
    Mat C(CUDA_R_16BF, m, m, m, batch, (long long)m * m + 8), D(CUDA_R_16BF, m, m, m, batch, (long long)m * m + 8);
    C.fill(g, 1.0f);
    lt.matmul(false, true, 1.5f, X, X, -0.25f, C.p, D);  // D = 1.5·X·Xᵀ − ¼·C per batch
    flush();
    check_product(false, true, 1.5, X, X, -0.25, C, D);
    // batches differ: a product that ignored the strides would repeat batch 0
    CHECK(D.get(1, 0, 0) != D.get(0, 0, 0));
}

// The weight gradient's pattern: fp32 D accumulated in place (C == D, beta = 1) over a long k.
TEST(lt_matmul_accumulates_in_place) {
    std::mt19937 g(3);
    Lt lt;
    const int m = 8, n = 6, k = 1000;
    Mat A(CUDA_R_16BF, k, m, k), B(CUDA_R_16BF, k, n, k), D(CUDA_R_32F, m, n, m), Cold(CUDA_R_32F, m, n, m);
    A.fill(g, 1.0f);
    B.fill(g, 1.0f);
    D.fill(g, 10.0f);
    memcpy(Cold.p, D.p, (size_t)m * n * 4);
    lt.matmul(true, false, 1.0f, A, B, 1.0f, D.p, D);
    flush();
    check_product(true, false, 1.0, A, B, 1.0, Cold, D);
}

// With sums that fp32 holds exactly, the bf16 output is the exact value rounded to nearest even,
// bit for bit: ties between two bf16 numbers included.
TEST(lt_bf16_output_rounds_to_nearest_even) {
    Lt lt;
    const int m = 16, n = 16, k = 2;
    Mat A(CUDA_R_16BF, m, k, m), B(CUDA_R_16BF, k, n, k), D(CUDA_R_16BF, m, n, m);
    // A(i,0)·B(0,j) + A(i,1)·B(1,j) = (1 + i/8)·1 + 2⁻¹⁰·(j − 8): 1 + i/8 needs 3 mantissa bits, the
    // second term lands below, on and above the bf16 rounding point (ulp 2⁻⁷ at 1..2, 2⁻⁶ at 2..4)
    for (int i = 0; i < m; i++) {
        A.set(0, i, 0, 1.0f + i / 8.0f);
        A.set(0, i, 1, std::ldexp(1.0f, -10));
    }
    for (int j = 0; j < n; j++) {
        B.set(0, 0, j, 1.0f);
        B.set(0, 1, j, (float)(j - 8));
    }
    lt.matmul(false, false, 1.0f, A, B, 0.0f, nullptr, D);
    flush();
    int ties = 0;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            float exact = (1.0f + i / 8.0f) + std::ldexp(1.0f, -10) * (j - 8);
            uint16_t want = bf16_bits_rne(exact);
            uint16_t got = bits_of(((__nv_bfloat16*)D.p)[D.idx(0, i, j)]);
            CHECK_MSG(got == want, "D(%d,%d) = %a: got bits %04x, want %04x", i, j, (double)exact, got, want);
            float lo = bf16_bits_to_float(want & 0xfffe ? (uint16_t)(want - 1) : want);
            if (exact - lo == bf16_bits_to_float(want) - exact) ties++;
        }
    CHECK(ties > 0);
}

// beta = 0: C is not read (it may hold NaN); alpha and beta are read when the product is issued.
TEST(lt_scalars_and_beta_zero) {
    std::mt19937 g(4);
    Lt lt;
    Mat A(CUDA_R_16BF, 4, 4, 4), B(CUDA_R_16BF, 4, 4, 4), D(CUDA_R_32F, 4, 4, 4), Cold(CUDA_R_32F, 4, 4, 4);
    A.fill(g, 1.0f);
    B.fill(g, 1.0f);
    for (int i = 0; i < 16; i++) ((float*)D.p)[i] = NAN;
    lt.matmul(false, false, 2.0f, A, B, 0.0f, nullptr, D);
    flush();
    check_product(false, false, 2.0, A, B, 0.0, Cold, D);
    // host scalars: a value changed after the call does not reach the queued product
    cublasLtMatmulDesc_t op;
    cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    cublasLtMatrixLayout_t l = A.layout(), ld = D.layout();
    cublasLtMatmulPreference_t pref;
    cublasLtMatmulPreferenceCreate(&pref);
    uint32_t al = 256;
    for (int i = 5; i <= 8; i++)
        cublasLtMatmulPreferenceSetAttribute(pref, (cublasLtMatmulPreferenceAttributes_t)i, &al, sizeof al);
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    cublasLtMatmulAlgoGetHeuristic(lt.h, op, l, l, ld, ld, pref, 1, &heur, &found);
    CHECK(found == 1 && heur.workspaceSize == 0);  // the preference allowed no workspace
    float alpha = 3.0f, beta = 0.0f;
    CHECK(cublasLtMatmul(lt.h, op, &alpha, A.p, l, B.p, l, &beta, D.p, ld, D.p, ld, &heur.algo, nullptr, 0, nullptr) ==
          CUBLAS_STATUS_SUCCESS);
    alpha = 100.0f;
    flush();
    check_product(false, false, 3.0, A, B, 0.0, Cold, D);
}

// What the emulation does not implement, and misuse a GPU would reject or silently miscompute, fail by name.
TEST(lt_rejects_unemulated_attributes_and_misuse) {
    std::mt19937 g(5);
    Lt lt;
    cublasLtMatmulDesc_t op;
    cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    uint32_t epi = CUBLASLT_EPILOGUE_BIAS;
    CHECK_THROWS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi),
                 "CUBLASLT_MATMUL_DESC_EPILOGUE");
    void* bias = nullptr;
    CHECK_THROWS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias),
                 "CUBLASLT_MATMUL_DESC_BIAS_POINTER");
    cublasOperation_t conj = CUBLAS_OP_C;
    CHECK_THROWS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &conj, sizeof conj),
                 "CUBLASLT_MATMUL_DESC_TRANSA");
    int64_t wrong_size = CUBLAS_OP_T;
    CHECK_THROWS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &wrong_size, sizeof wrong_size),
                 "sizeInBytes 8");
    Mat A(CUDA_R_16BF, 8, 8, 8);
    cublasLtMatrixLayout_t l = A.layout();
    int64_t ld = 16;
    CHECK_THROWS(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_LD, &ld, sizeof ld),
                 "CUBLASLT_MATRIX_LAYOUT_LD");
    int32_t order = CUBLASLT_ORDER_ROW;
    CHECK_THROWS(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_ORDER, &order, sizeof order),
                 "CUBLASLT_MATRIX_LAYOUT_ORDER");
    cublasLtMatrixLayout_t l16;
    CHECK_THROWS(cublasLtMatrixLayoutCreate(&l16, CUDA_R_16F, 8, 8, 8), "CUDA_R_16F");
    cublasLtMatmulPreference_t pref;
    cublasLtMatmulPreferenceCreate(&pref);
    uint32_t mode = 0;
    CHECK_THROWS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_SEARCH_MODE, &mode, sizeof mode),
                 "CUBLASLT_MATMUL_PREF_SEARCH_MODE");
    cublasLtMatmulDesc_t op16;
    cublasLtMatmulDescCreate(&op16, CUBLAS_COMPUTE_16F, CUDA_R_16F);
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    CHECK_THROWS(cublasLtMatmulAlgoGetHeuristic(lt.h, op16, l, l, l, l, pref, 1, &heur, &found), "compute type");
    // shapes that do not chain
    Mat B(CUDA_R_16BF, 7, 8, 8);
    cublasLtMatrixLayout_t lb = B.layout();
    CHECK_THROWS(cublasLtMatmulAlgoGetHeuristic(lt.h, op, l, lb, l, l, pref, 1, &heur, &found), "do not chain");

    // misuse at the product: a pointer less aligned than the preference promised (default 256 bytes)
    Mat D(CUDA_R_16BF, 8, 8, 8);
    uint64_t ws = 1 << 20;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    CHECK(cublasLtMatmulAlgoGetHeuristic(lt.h, op, l, l, l, l, pref, 1, &heur, &found) == CUBLAS_STATUS_SUCCESS &&
          found == 1);
    CHECK(heur.workspaceSize > 0);
    float one = 1.0f, zero = 0.0f;
    std::vector<uint8_t> work(heur.workspaceSize);
    const char* A2 = (const char*)A.p + 2;
    Mat big(CUDA_R_16BF, 80, 8, 80);
    CHECK_THROWS(cublasLtMatmul(lt.h, op, &one, A2, l, A.p, l, &zero, D.p, l, D.p, l, &heur.algo, work.data(),
                                work.size(), nullptr),
                 "MIN_ALIGNMENT_A_BYTES");
    // too small a workspace
    CHECK_THROWS(cublasLtMatmul(lt.h, op, &one, A.p, l, A.p, l, &zero, D.p, l, D.p, l, &heur.algo, work.data(),
                                work.size() - 1, nullptr),
                 "workspace");
    // D overlapping an input
    CHECK_THROWS(cublasLtMatmul(lt.h, op, &one, A.p, l, B.p, l, &zero, A.p, l, A.p, l, &heur.algo, work.data(),
                                work.size(), nullptr),
                 "D overlaps A");
    // an algorithm chosen for other descriptors (the layout changed after the heuristic)
    int32_t bc = 2;
    int64_t st = 64;
    cublasLtMatrixLayout_t lbatch = A.layout();
    CHECK(cublasLtMatmulAlgoGetHeuristic(lt.h, op, lbatch, lbatch, lbatch, lbatch, pref, 1, &heur, &found) ==
          CUBLAS_STATUS_SUCCESS);
    for (auto attr : {CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET})
        attr == CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT ? cublasLtMatrixLayoutSetAttribute(lbatch, attr, &bc, sizeof bc)
                                                   : cublasLtMatrixLayoutSetAttribute(lbatch, attr, &st, sizeof st);
    CHECK_THROWS(cublasLtMatmul(lt.h, op, &one, big.p, lbatch, big.p, lbatch, &zero, D.p, lbatch, D.p, lbatch,
                                &heur.algo, work.data(), work.size(), nullptr),
                 "other descriptors");
    // a batch stride that makes the outputs overlap
    st = 32;
    cublasLtMatrixLayoutSetAttribute(lbatch, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &st, sizeof st);
    CHECK_THROWS(cublasLtMatmulAlgoGetHeuristic(lt.h, op, lbatch, lbatch, lbatch, lbatch, pref, 1, &heur, &found),
                 "overlap");
    CHECK(g_queue.empty());
    (void)g;
}

// ========================================= CUB ==============================================
static void sort_pairs(const std::vector<int32_t>& keys, std::vector<int32_t>& keys_out, std::vector<int32_t>& vals_out,
                       int begin_bit, int end_bit) {
    int n = (int)keys.size();
    std::vector<int32_t> vals(n);
    for (int i = 0; i < n; i++) vals[i] = i;
    size_t bytes = 0;
    CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, (const int32_t*)nullptr, (int32_t*)nullptr,
                                          (const int32_t*)nullptr, (int32_t*)nullptr, n) == cudaSuccess);
    CHECK(bytes >= (size_t)n * 8);
    std::vector<uint8_t> temp(bytes);
    keys_out.assign(n, -1);
    vals_out.assign(n, -1);
    CHECK(cub::DeviceRadixSort::SortPairs(temp.data(), bytes, keys.data(), keys_out.data(), vals.data(),
                                          vals_out.data(), n, begin_bit, end_bit, nullptr) == cudaSuccess);
    CHECK(n == 0 || vals_out[0] == -1);  // queued, not run yet
    flush();
}

// The embedding backward's use: int32 token ids (values: their positions), all 32 bits, many repeats,
// against std::stable_sort by numeric key; negative keys come first, as CUB orders signed keys.
TEST(cub_sort_pairs_stable_by_key) {
    std::mt19937 g(6);
    for (int n : {0, 1, 7, 5000, 100000}) {
        std::vector<int32_t> keys(n);
        for (int i = 0; i < n; i++)
            keys[i] = i % 5 == 0 ? (int32_t)g() : (int32_t)(g() % 37) - 3;  // a few keys thousands of times
        std::vector<int32_t> ko, vo;
        sort_pairs(keys, ko, vo, 0, 32);
        std::vector<int32_t> order(n);
        for (int i = 0; i < n; i++) order[i] = i;
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return keys[a] < keys[b]; });
        for (int i = 0; i < n; i++) {
            CHECK_MSG(vo[i] == order[i], "n %d: position %d holds value %d, want %d", n, i, vo[i], order[i]);
            CHECK(ko[i] == keys[order[i]]);
        }
    }
}

// Only bits [begin, end) order the keys (of the sign-flipped key); ties keep their input order.
TEST(cub_sort_pairs_bit_range) {
    std::mt19937 g(7);
    const int n = 3000;
    std::vector<int32_t> keys(n);
    for (int i = 0; i < n; i++) keys[i] = (int32_t)g();
    for (auto range : {std::pair<int, int>{4, 12}, {28, 32}, {0, 1}, {9, 9}}) {
        std::vector<int32_t> ko, vo;
        sort_pairs(keys, ko, vo, range.first, range.second);
        auto digit = [&](int32_t k) {  // arithmetic: offset binary of the signed key, then the bits
            int64_t u = (int64_t)k + (int64_t(1) << 31);
            return (u >> range.first) & ((int64_t(1) << (range.second - range.first)) - 1);
        };
        std::vector<int> seen(n, 0);
        for (int i = 0; i < n; i++) {
            CHECK(vo[i] >= 0 && vo[i] < n && !seen[vo[i]]);
            seen[vo[i]] = 1;
            CHECK(ko[i] == keys[vo[i]]);
            if (i > 0) {
                CHECK_MSG(digit(ko[i - 1]) <= digit(ko[i]), "bits [%d,%d): not ascending at %d", range.first,
                          range.second, i);
                if (digit(ko[i - 1]) == digit(ko[i]))
                    CHECK_MSG(vo[i - 1] < vo[i], "bits [%d,%d): not stable at %d", range.first, range.second, i);
            }
        }
    }
}

TEST(cub_sort_pairs_rejects_misuse) {
    const int n = 100;
    std::vector<int32_t> k(n, 1), v(n, 0), ko(n), vo(n);
    size_t bytes = 0;
    cub::DeviceRadixSort::SortPairs(nullptr, bytes, k.data(), ko.data(), v.data(), vo.data(), n);
    std::vector<uint8_t> temp(bytes);
    size_t small = bytes - 1;
    CHECK_THROWS(cub::DeviceRadixSort::SortPairs(temp.data(), small, k.data(), ko.data(), v.data(), vo.data(), n),
                 "size query asks");
    CHECK_THROWS(cub::DeviceRadixSort::SortPairs(temp.data(), bytes, k.data(), k.data(), v.data(), vo.data(), n),
                 "overlap");
    CHECK_THROWS(
        cub::DeviceRadixSort::SortPairs(temp.data(), bytes, k.data(), ko.data(), v.data(), vo.data(), n, 8, 40),
        "bit range");
}

// ========================================= NCCL =============================================
static int g_rank = 0, g_world = 1;
static ncclComm_t nccl_comm() {
    static ncclComm_t comm = nullptr;
    if (!comm) {
        ncclUniqueId id;
        if (g_rank == 0) CHECK(ncclGetUniqueId(&id) == ncclSuccess);
#ifdef PGOLF_MPI
        MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
#endif
        CHECK(ncclCommInitRank(&comm, g_world, id, g_rank) == ncclSuccess);
    }
    return comm;
}
// Rank r's element i: a multiple of 1/64 below 64, so fp32 sums over ranks are exact.
static float contribution(int r, size_t i) {
    return (float)((int)((i * 37 + (size_t)r * 11) % 97) - 48) / 64.0f * (r + 1);
}

TEST(nccl_all_reduce_sum_and_avg) {
    ncclComm_t c = nccl_comm();
    int n_ranks = 0, rank = -1;
    ncclCommCount(c, &n_ranks);
    ncclCommUserRank(c, &rank);
    CHECK(n_ranks == g_world && rank == g_rank);
    const size_t n = 1000;
    for (ncclDataType_t t : {ncclFloat32, ncclBfloat16})
        for (ncclRedOp_t op : {ncclSum, ncclAvg})
            for (bool in_place : {true, false}) {
                std::vector<float> xf(n), yf(n, -1.0f);
                std::vector<__nv_bfloat16> xb(n), yb(n);
                for (size_t i = 0; i < n; i++) {
                    xf[i] = contribution(g_rank, i);
                    xb[i] = bf16_of_bits(bf16_bits_rne(xf[i]));
                }
                void* send = t == ncclFloat32 ? (void*)xf.data() : (void*)xb.data();
                void* recv = in_place ? send : t == ncclFloat32 ? (void*)yf.data() : (void*)yb.data();
                CHECK(ncclGroupStart() == ncclSuccess);
                CHECK(ncclAllReduce(send, recv, n, t, op, c, nullptr) == ncclSuccess);
                CHECK(ncclGroupEnd() == ncclSuccess);
                flush();
                for (size_t i = 0; i < n; i++) {
                    double sum = 0;
                    for (int r = 0; r < g_world; r++) sum += bf16_bits_to_float(bf16_bits_rne(contribution(r, i)));
                    float want = op == ncclAvg ? (float)sum * (1.0f / (float)g_world) : (float)sum;
                    float got = t == ncclFloat32 ? ((float*)recv)[i] : __bfloat162float(((__nv_bfloat16*)recv)[i]);
                    if (t == ncclBfloat16) want = bf16_bits_to_float(bf16_bits_rne(want));
                    CHECK_MSG(got == want, "type %d op %d in_place %d: [%zu] got %g want %g", (int)t, (int)op, in_place,
                              i, got, want);
                }
            }
}

TEST(nccl_broadcast_all_gather_reduce_scatter) {
    ncclComm_t c = nccl_comm();
    const size_t n = 257;
    int root = g_world - 1;
    std::vector<int32_t> b(n);
    for (size_t i = 0; i < n; i++) b[i] = g_rank == root ? (int32_t)(i * 3 + 1) : -7;
    CHECK(ncclBroadcast(b.data(), b.data(), n, ncclInt32, root, c, nullptr) == ncclSuccess);
    // all-gather in place: this rank's block already sits at its offset
    std::vector<float> gathered(n * g_world, -1.0f);
    for (size_t i = 0; i < n; i++) gathered[g_rank * n + i] = contribution(g_rank, i);
    CHECK(ncclAllGather(gathered.data() + g_rank * n, gathered.data(), n, ncclFloat32, c, nullptr) == ncclSuccess);
    std::vector<float> send(n * g_world), recv(n, -1.0f);
    for (size_t i = 0; i < send.size(); i++) send[i] = contribution(g_rank, i);
    CHECK(ncclReduceScatter(send.data(), recv.data(), n, ncclFloat32, ncclSum, c, nullptr) == ncclSuccess);
    flush();
    for (size_t i = 0; i < n; i++) CHECK(b[i] == (int32_t)(i * 3 + 1));
    for (int r = 0; r < g_world; r++)
        for (size_t i = 0; i < n; i++) CHECK(gathered[r * n + i] == contribution(r, i));
    for (size_t i = 0; i < n; i++) {
        float want = 0;
        for (int r = 0; r < g_world; r++) want += contribution(r, g_rank * n + i);
        CHECK_MSG(recv[i] == want, "reduce-scatter [%zu]: got %g want %g", i, recv[i], want);
    }
}

// Misuse that on GPUs hangs or corrupts fails with the reason: with one rank, a communicator for more
// ranks than MPI has; with two, ranks that issue different collectives, or ids not broadcast.
TEST(nccl_refuses_inconsistent_ranks) {
    ncclComm_t c = nccl_comm();
    float x[16] = {0};
    CHECK_THROWS(ncclAllReduce(x, x, 16, ncclInt32, ncclSum, c, nullptr), "ncclInt32");
    CHECK_THROWS(ncclAllReduce(x, x, 16, ncclFloat32, ncclMax, c, nullptr), "op 2");
    CHECK_THROWS(ncclGroupEnd(), "without ncclGroupStart");
    ncclUniqueId zero;
    memset(&zero, 0, sizeof zero);
    ncclComm_t other = nullptr;
    CHECK_THROWS(ncclCommInitRank(&other, g_world, zero, g_rank), "ncclGetUniqueId");
    if (g_world == 1) {
        ncclUniqueId id;
        ncclGetUniqueId(&id);
        CHECK_THROWS(ncclCommInitRank(&other, 2, id, 0), "rank 0 of 2");
        return;
    }
    CHECK(ncclAllReduce(x, x, g_rank == 0 ? 16 : 8, ncclFloat32, ncclSum, c, nullptr) == ncclSuccess);
    CHECK_THROWS(flush(), "rank 0 calls ncclAllReduce(count 16");
    ncclUniqueId own;
    ncclGetUniqueId(&own);  // every rank draws its own: not broadcast
    CHECK_THROWS(ncclCommInitRank(&other, g_world, own, g_rank), "different ids");
}

int main(int argc, char** argv) {
#ifdef PGOLF_MPI
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_world);
    if (g_world > 1 && argc < 2) {
        fprintf(stderr, "with several ranks, run only the nccl_ tests: %s nccl_\n", argv[0]);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
#endif
    int rc = test_main(argc, argv);
#ifdef PGOLF_MPI
    MPI_Finalize();
#endif
    return rc;
}
