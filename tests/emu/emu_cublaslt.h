// cuBLASLt for the CUDA emulator: exactly the part of the API train_gpt.cu uses, written from the
// cuBLAS documentation (cublasLtMatmul, cublasLtMatmulDescAttributes_t, cublasLtMatrixLayoutAttribute_t,
// cublasLtMatmulPreferenceAttributes_t). Test infrastructure only: never part of ./train_gpt.
//
// What is emulated: D = alpha·op(A)·op(B) + beta·C, column-major, op = N or T, A and B bf16, C and D
// both bf16 or both fp32, compute CUBLAS_COMPUTE_32F with fp32 scale (host pointers), strided
// batches, the heuristic with a workspace limit and minimum pointer alignments. The products of bf16
// inputs are exact in fp32; they are summed in fp32 and the result is rounded once to D's type with
// cuda_bf16.h's round-to-nearest-even. Any attribute or value outside that set ends the program through
// emu_fail naming it: nothing falls back to a default silently.
//
// Stricter than the library: an algorithm remembers the descriptors it was chosen for and the
// alignments it was promised, and a product run with other descriptors, misaligned pointers, too
// small a workspace, or D overlapping A, B or (other than exactly) C fails.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublasLt.h>
#include "emu_contract.h"

namespace emu_lt {

const uint32_t HANDLE_MAGIC = 0x4c74486e, DESC_MAGIC = 0x4c744465, LAYOUT_MAGIC = 0x4c744c61, PREF_MAGIC = 0x4c745072;
const uint64_t ALGO_MAGIC = 0x454d554c54414c47ull;  // "EMULTALG"
// The workspace an emulated algorithm asks for (at most the preference's limit): the product fills it
// with a pattern, so a workspace smaller than promised, or freed, shows up under AddressSanitizer.
const size_t ALGO_WORKSPACE_BYTES = 64u << 10;

struct Handle {
    uint32_t magic;
};
struct Desc {
    uint32_t magic;
    cublasComputeType_t compute;
    cudaDataType_t scale;
    cublasOperation_t trans_a, trans_b;
};
struct Layout {
    uint32_t magic;
    cudaDataType_t type;
    uint64_t rows, cols;
    int64_t ld;
    int32_t batch;
    int64_t stride;  // elements between batches
};
struct Pref {
    uint32_t magic;
    uint64_t max_workspace;
    uint32_t align[4];  // minimum alignment of A, B, C, D in bytes
};

inline const char* desc_attr_name(int a) {
    switch (a) {
    case CUBLASLT_MATMUL_DESC_COMPUTE_TYPE: return "CUBLASLT_MATMUL_DESC_COMPUTE_TYPE";
    case CUBLASLT_MATMUL_DESC_SCALE_TYPE: return "CUBLASLT_MATMUL_DESC_SCALE_TYPE";
    case CUBLASLT_MATMUL_DESC_POINTER_MODE: return "CUBLASLT_MATMUL_DESC_POINTER_MODE";
    case CUBLASLT_MATMUL_DESC_TRANSA: return "CUBLASLT_MATMUL_DESC_TRANSA";
    case CUBLASLT_MATMUL_DESC_TRANSB: return "CUBLASLT_MATMUL_DESC_TRANSB";
    case CUBLASLT_MATMUL_DESC_TRANSC: return "CUBLASLT_MATMUL_DESC_TRANSC";
    case CUBLASLT_MATMUL_DESC_FILL_MODE: return "CUBLASLT_MATMUL_DESC_FILL_MODE";
    case CUBLASLT_MATMUL_DESC_EPILOGUE: return "CUBLASLT_MATMUL_DESC_EPILOGUE";
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return "CUBLASLT_MATMUL_DESC_BIAS_POINTER";
    case CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE: return "CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE";
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER: return "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER";
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD: return "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD";
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE: return "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE";
    case CUBLASLT_MATMUL_DESC_ALPHA_VECTOR_BATCH_STRIDE: return "CUBLASLT_MATMUL_DESC_ALPHA_VECTOR_BATCH_STRIDE";
    case CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET: return "CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET";
    case CUBLASLT_MATMUL_DESC_A_SCALE_POINTER: return "CUBLASLT_MATMUL_DESC_A_SCALE_POINTER";
    case CUBLASLT_MATMUL_DESC_B_SCALE_POINTER: return "CUBLASLT_MATMUL_DESC_B_SCALE_POINTER";
    case CUBLASLT_MATMUL_DESC_C_SCALE_POINTER: return "CUBLASLT_MATMUL_DESC_C_SCALE_POINTER";
    case CUBLASLT_MATMUL_DESC_D_SCALE_POINTER: return "CUBLASLT_MATMUL_DESC_D_SCALE_POINTER";
    case CUBLASLT_MATMUL_DESC_AMAX_D_POINTER: return "CUBLASLT_MATMUL_DESC_AMAX_D_POINTER";
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE: return "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE";
    case CUBLASLT_MATMUL_DESC_FAST_ACCUM: return "CUBLASLT_MATMUL_DESC_FAST_ACCUM";
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: return "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE";
    default: return "(a cublasLtMatmulDescAttributes_t value)";
    }
}
inline const char* layout_attr_name(int a) {
    switch (a) {
    case CUBLASLT_MATRIX_LAYOUT_TYPE: return "CUBLASLT_MATRIX_LAYOUT_TYPE";
    case CUBLASLT_MATRIX_LAYOUT_ORDER: return "CUBLASLT_MATRIX_LAYOUT_ORDER";
    case CUBLASLT_MATRIX_LAYOUT_ROWS: return "CUBLASLT_MATRIX_LAYOUT_ROWS";
    case CUBLASLT_MATRIX_LAYOUT_COLS: return "CUBLASLT_MATRIX_LAYOUT_COLS";
    case CUBLASLT_MATRIX_LAYOUT_LD: return "CUBLASLT_MATRIX_LAYOUT_LD";
    case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT: return "CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT";
    case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET: return "CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET";
    case CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET: return "CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET";
    case CUBLASLT_MATRIX_LAYOUT_BATCH_MODE: return "CUBLASLT_MATRIX_LAYOUT_BATCH_MODE";
    default: return "(a cublasLtMatrixLayoutAttribute_t value)";
    }
}
inline const char* pref_attr_name(int a) {
    switch (a) {
    case CUBLASLT_MATMUL_PREF_SEARCH_MODE: return "CUBLASLT_MATMUL_PREF_SEARCH_MODE";
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES";
    case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK: return "CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK";
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: return "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES";
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: return "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES";
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: return "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES";
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: return "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES";
    case CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT: return "CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT";
    case CUBLASLT_MATMUL_PREF_IMPL_MASK: return "CUBLASLT_MATMUL_PREF_IMPL_MASK";
    default: return "(a cublasLtMatmulPreferenceAttributes_t value)";
    }
}
inline const char* type_name(cudaDataType_t t) {
    switch (t) {
    case CUDA_R_16BF: return "CUDA_R_16BF";
    case CUDA_R_32F: return "CUDA_R_32F";
    case CUDA_R_16F: return "CUDA_R_16F";
    case CUDA_R_64F: return "CUDA_R_64F";
    case CUDA_R_8I: return "CUDA_R_8I";
    case CUDA_R_32I: return "CUDA_R_32I";
    default: return "(another cudaDataType_t)";
    }
}
inline size_t type_bytes(cudaDataType_t t) { return t == CUDA_R_16BF ? 2 : 4; }

inline Handle* handle(cublasLtHandle_t h) {
    Handle* p = reinterpret_cast<Handle*>(h);
    if (!p || p->magic != HANDLE_MAGIC) emu_fail("cuBLASLt: a handle that cublasLtCreate did not make (or destroyed)");
    return p;
}
inline Desc* desc(cublasLtMatmulDesc_t d) {
    Desc* p = reinterpret_cast<Desc*>(d);
    if (!p || p->magic != DESC_MAGIC)
        emu_fail("cuBLASLt: a matmul descriptor that cublasLtMatmulDescCreate did not make (or destroyed)");
    return p;
}
inline Layout* layout(cublasLtMatrixLayout_t l) {
    Layout* p = reinterpret_cast<Layout*>(l);
    if (!p || p->magic != LAYOUT_MAGIC)
        emu_fail("cuBLASLt: a matrix layout that cublasLtMatrixLayoutCreate did not make (or destroyed)");
    return p;
}
inline Pref* pref(cublasLtMatmulPreference_t q) {
    Pref* p = reinterpret_cast<Pref*>(q);
    if (!p || p->magic != PREF_MAGIC)
        emu_fail("cuBLASLt: a preference that cublasLtMatmulPreferenceCreate did not make (or destroyed)");
    return p;
}
// Copies an attribute's value after checking the size the caller declared against the documented type.
template <class T>
inline T attr_value(const char* name, const void* buf, size_t size) {
    if (!buf) emu_fail("cuBLASLt: %s set from a null buffer", name);
    if (size != sizeof(T))
        emu_fail("cuBLASLt: %s set with sizeInBytes %zu, the attribute is %zu bytes", name, size, sizeof(T));
    T v;
    memcpy(&v, buf, sizeof v);
    return v;
}

// FNV-1a over the fields that define a product: an algorithm is valid only for the descriptors it was chosen for.
inline uint64_t fingerprint(const Desc& d, const Layout* const ls[4]) {
    uint64_t h = 1469598103934665603ull;
    auto mix = [&](const void* p, size_t n) {
        for (size_t i = 0; i < n; i++) h = (h ^ ((const unsigned char*)p)[i]) * 1099511628211ull;
    };
    mix(&d.compute, sizeof d.compute);
    mix(&d.scale, sizeof d.scale);
    mix(&d.trans_a, sizeof d.trans_a);
    mix(&d.trans_b, sizeof d.trans_b);
    for (int i = 0; i < 4; i++) {
        mix(&ls[i]->type, sizeof ls[i]->type);
        mix(&ls[i]->rows, sizeof ls[i]->rows);
        mix(&ls[i]->cols, sizeof ls[i]->cols);
        mix(&ls[i]->ld, sizeof ls[i]->ld);
        mix(&ls[i]->batch, sizeof ls[i]->batch);
        mix(&ls[i]->stride, sizeof ls[i]->stride);
    }
    return h;
}

// The shape of a product, checked: everything cuBLASLt requires of the descriptors, and the type
// combination this emulation implements (compute 32F, scale 32F, A/B bf16, C/D bf16 or fp32).
struct Shape {
    uint64_t m, n, k;
    int32_t batch;
};
inline Shape check_product(const Desc& d, const Layout& a, const Layout& b, const Layout& c, const Layout& dd) {
    if (d.compute != CUBLAS_COMPUTE_32F)
        emu_fail("cuBLASLt: compute type %d is not emulated (only CUBLAS_COMPUTE_32F)", (int)d.compute);
    if (d.scale != CUDA_R_32F)
        emu_fail("cuBLASLt: scale type %s is not emulated (only CUDA_R_32F)", type_name(d.scale));
    if (a.type != CUDA_R_16BF || b.type != CUDA_R_16BF)
        emu_fail("cuBLASLt: A is %s and B is %s; only CUDA_R_16BF inputs are emulated", type_name(a.type),
                 type_name(b.type));
    if (c.type != dd.type)
        emu_fail("cuBLASLt: C is %s but D is %s; they must have one type", type_name(c.type), type_name(dd.type));
    const Layout* all[4] = {&a, &b, &c, &dd};
    const char* names = "ABCD";
    for (int i = 0; i < 4; i++)
        if (all[i]->ld < (int64_t)std::max<uint64_t>(all[i]->rows, 1))
            emu_fail("cuBLASLt: %c's leading dimension %lld is below its %llu rows (column order)", names[i],
                     (long long)all[i]->ld, (unsigned long long)all[i]->rows);
    uint64_t m = dd.rows, n = dd.cols;
    uint64_t a_rows = d.trans_a == CUBLAS_OP_N ? a.rows : a.cols, k = d.trans_a == CUBLAS_OP_N ? a.cols : a.rows;
    uint64_t b_rows = d.trans_b == CUBLAS_OP_N ? b.rows : b.cols, b_cols = d.trans_b == CUBLAS_OP_N ? b.cols : b.rows;
    if (c.rows != m || c.cols != n)
        emu_fail("cuBLASLt: C is %llux%llu but D is %llux%llu", (unsigned long long)c.rows, (unsigned long long)c.cols,
                 (unsigned long long)m, (unsigned long long)n);
    if (a_rows != m || b_cols != n || b_rows != k)
        emu_fail("cuBLASLt: op(A) is %llux%llu, op(B) %llux%llu, D %llux%llu: the shapes do not chain",
                 (unsigned long long)a_rows, (unsigned long long)k, (unsigned long long)b_rows,
                 (unsigned long long)b_cols, (unsigned long long)m, (unsigned long long)n);
    for (int i = 0; i < 3; i++)
        if (all[i]->batch != dd.batch)
            emu_fail("cuBLASLt: %c has batch count %d but D has %d", names[i], all[i]->batch, dd.batch);
    for (int i = 0; i < 4; i++)
        if (all[i]->stride < 0)
            emu_fail("cuBLASLt: %c has a negative batch stride %lld", names[i], (long long)all[i]->stride);
    if (dd.batch > 1 && dd.stride < dd.ld * (int64_t)(n - 1) + (int64_t)m)
        emu_fail("cuBLASLt: D's batch stride %lld makes the %d outputs overlap (each spans %lld elements)",
                 (long long)dd.stride, dd.batch, (long long)(dd.ld * (int64_t)(n - 1) + (int64_t)m));
    return {m, n, k, dd.batch};
}
// Bytes from a matrix's first element to one past its last, over all batches.
inline size_t span_bytes(const Layout& l) {
    if (l.rows == 0 || l.cols == 0) return 0;
    uint64_t elems = (uint64_t)(l.batch - 1) * (uint64_t)l.stride + (l.cols - 1) * (uint64_t)l.ld + l.rows;
    return elems * type_bytes(l.type);
}
inline bool overlap(const void* p, size_t pn, const void* q, size_t qn) {
    uintptr_t a = (uintptr_t)p, b = (uintptr_t)q;
    return pn && qn && a < b + qn && b < a + pn;
}
inline float load(const void* base, cudaDataType_t t, size_t i) {
    if (t == CUDA_R_16BF) return __bfloat162float(((const __nv_bfloat16*)base)[i]);
    return ((const float*)base)[i];
}

// Σ_p a[p]·b[p] in fp32, in 8 interleaved partial sums (a tensor core's k-split is no more ordered).
// It reads only the packed copies below (the packing read the caller's matrices, under AddressSanitizer
// when it is on), so it is left uninstrumented and vectorized: the emulated products stay usable.
__attribute__((no_sanitize_address)) static float dot_fp32(const float* a, const float* b, size_t k) {
    typedef float v4 __attribute__((vector_size(16)));  // partial sums 0-3 and 4-7
    v4 s0 = {0, 0, 0, 0}, s1 = {0, 0, 0, 0};
    size_t p = 0;
    for (; p + 8 <= k; p += 8) {
        v4 a0, a1, b0, b1;
        memcpy(&a0, a + p, 16);
        memcpy(&a1, a + p + 4, 16);
        memcpy(&b0, b + p, 16);
        memcpy(&b1, b + p + 4, 16);
        s0 += a0 * b0;
        s1 += a1 * b1;
    }
    float part[8] = {s0[0], s0[1], s0[2], s0[3], s1[0], s1[1], s1[2], s1[3]};
    for (int u = 0; p + u < k; u++) part[u] += a[p + u] * b[p + u];
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// One product, all batches: what the stream runs.
inline void run_product(Desc d, Layout la, Layout lb, Layout lc, Layout ld, Shape s, float alpha, float beta,
                        const void* A, const void* B, const void* C, void* D) {
    size_t m = s.m, n = s.n, k = s.k;
    std::vector<float> ap(m * k), bp(n * k), prod(m * n);
    const size_t JB = 64;  // columns of op(B) per block: that block of bp stays in cache while the rows of op(A) pass
    for (int32_t bi = 0; bi < s.batch; bi++) {
        const char* a = (const char*)A + (size_t)bi * la.stride * 2;
        const char* b = (const char*)B + (size_t)bi * lb.stride * 2;
        const char* c = C ? (const char*)C + (size_t)bi * lc.stride * type_bytes(lc.type) : nullptr;
        char* dst = (char*)D + (size_t)bi * ld.stride * type_bytes(ld.type);
        // ap[i][p] = op(A)(i,p), bp[j][p] = op(B)(p,j): both rows contiguous along k
        for (size_t i = 0; i < m; i++)
            for (size_t p = 0; p < k; p++)
                ap[i * k + p] = load(a, CUDA_R_16BF, d.trans_a == CUBLAS_OP_N ? i + p * la.ld : p + i * la.ld);
        for (size_t j = 0; j < n; j++)
            for (size_t p = 0; p < k; p++)
                bp[j * k + p] = load(b, CUDA_R_16BF, d.trans_b == CUBLAS_OP_N ? p + j * lb.ld : j + p * lb.ld);
        for (size_t j0 = 0; j0 < n; j0 += JB) {
            size_t j1 = std::min(n, j0 + JB);
            for (size_t i = 0; i < m; i++)
                for (size_t j = j0; j < j1; j++) prod[i * n + j] = dot_fp32(&ap[i * k], &bp[j * k], k);
        }
        for (size_t j = 0; j < n; j++)
            for (size_t i = 0; i < m; i++) {
                float v = alpha * prod[i * n + j];
                if (beta != 0.0f) v += beta * load(c, lc.type, i + j * lc.ld);  // beta = 0: C is not read (may be NaN)
                size_t o = i + j * ld.ld;
                if (ld.type == CUDA_R_16BF)
                    ((__nv_bfloat16*)dst)[o] = __float2bfloat16(v);
                else
                    ((float*)dst)[o] = v;
            }
    }
}

}  // namespace emu_lt

inline const char* cublasLtGetStatusString(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_UNKNOWN";
    }
}

inline cublasStatus_t cublasLtCreate(cublasLtHandle_t* h) {
    if (!h) emu_fail("cublasLtCreate: null handle pointer");
    *h = reinterpret_cast<cublasLtHandle_t>(new emu_lt::Handle{emu_lt::HANDLE_MAGIC});
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
    emu_lt::handle(h)->magic = 0;
    delete reinterpret_cast<emu_lt::Handle*>(h);
    return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t compute,
                                               cudaDataType_t scale) {
    if (!d) emu_fail("cublasLtMatmulDescCreate: null descriptor pointer");
    *d = reinterpret_cast<cublasLtMatmulDesc_t>(
        new emu_lt::Desc{emu_lt::DESC_MAGIC, compute, scale, CUBLAS_OP_N, CUBLAS_OP_N});
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    emu_lt::desc(d)->magic = 0;
    delete reinterpret_cast<emu_lt::Desc*>(d);
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                                     const void* buf, size_t size) {
    emu_lt::Desc* p = emu_lt::desc(d);
    const char* name = emu_lt::desc_attr_name(attr);
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
    case CUBLASLT_MATMUL_DESC_TRANSB: {
        int32_t v = emu_lt::attr_value<int32_t>(name, buf, size);
        if (v != CUBLAS_OP_N && v != CUBLAS_OP_T)
            emu_fail("cuBLASLt: %s = %d is not emulated (only CUBLAS_OP_N, CUBLAS_OP_T)", name, v);
        (attr == CUBLASLT_MATMUL_DESC_TRANSA ? p->trans_a : p->trans_b) = (cublasOperation_t)v;
        return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATMUL_DESC_EPILOGUE: {
        uint32_t v = emu_lt::attr_value<uint32_t>(name, buf, size);
        if (v != CUBLASLT_EPILOGUE_DEFAULT)
            emu_fail("cuBLASLt: %s = %u is not emulated (only CUBLASLT_EPILOGUE_DEFAULT)", name, v);
        return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATMUL_DESC_POINTER_MODE: {
        int32_t v = emu_lt::attr_value<int32_t>(name, buf, size);
        if (v != CUBLASLT_POINTER_MODE_HOST)
            emu_fail("cuBLASLt: %s = %d is not emulated (only CUBLASLT_POINTER_MODE_HOST)", name, v);
        return CUBLAS_STATUS_SUCCESS;
    }
    default: emu_fail("cuBLASLt: matmul descriptor attribute %s (%d) is not emulated", name, (int)attr);
    }
}

inline cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType type, uint64_t rows,
                                                 uint64_t cols, int64_t ld) {
    if (!l) emu_fail("cublasLtMatrixLayoutCreate: null layout pointer");
    if (type != CUDA_R_16BF && type != CUDA_R_32F)
        emu_fail("cublasLtMatrixLayoutCreate: type %s is not emulated (only CUDA_R_16BF, CUDA_R_32F)",
                 emu_lt::type_name(type));
    *l = reinterpret_cast<cublasLtMatrixLayout_t>(new emu_lt::Layout{emu_lt::LAYOUT_MAGIC, type, rows, cols, ld, 1, 0});
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    emu_lt::layout(l)->magic = 0;
    delete reinterpret_cast<emu_lt::Layout*>(l);
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t attr,
                                                       const void* buf, size_t size) {
    emu_lt::Layout* p = emu_lt::layout(l);
    const char* name = emu_lt::layout_attr_name(attr);
    switch (attr) {
    case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT: {
        int32_t v = emu_lt::attr_value<int32_t>(name, buf, size);
        if (v < 1) emu_fail("cuBLASLt: %s = %d (must be at least 1)", name, v);
        p->batch = v;
        return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET:
        p->stride = emu_lt::attr_value<int64_t>(name, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATRIX_LAYOUT_ORDER: {
        int32_t v = emu_lt::attr_value<int32_t>(name, buf, size);
        if (v != CUBLASLT_ORDER_COL) emu_fail("cuBLASLt: %s = %d is not emulated (only CUBLASLT_ORDER_COL)", name, v);
        return CUBLAS_STATUS_SUCCESS;
    }
    default: emu_fail("cuBLASLt: matrix layout attribute %s (%d) is not emulated", name, (int)attr);
    }
}

inline cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* q) {
    if (!q) emu_fail("cublasLtMatmulPreferenceCreate: null preference pointer");
    // documented defaults: no workspace, 256-byte alignment of every matrix
    *q = reinterpret_cast<cublasLtMatmulPreference_t>(new emu_lt::Pref{emu_lt::PREF_MAGIC, 0, {256, 256, 256, 256}});
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t q) {
    emu_lt::pref(q)->magic = 0;
    delete reinterpret_cast<emu_lt::Pref*>(q);
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t q,
                                                           cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
                                                           size_t size) {
    emu_lt::Pref* p = emu_lt::pref(q);
    const char* name = emu_lt::pref_attr_name(attr);
    switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES:
        p->max_workspace = emu_lt::attr_value<uint64_t>(name, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: {
        uint32_t v = emu_lt::attr_value<uint32_t>(name, buf, size);
        if (v == 0 || (v & (v - 1))) emu_fail("cuBLASLt: %s = %u (must be a power of two)", name, v);
        p->align[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES] = v;
        return CUBLAS_STATUS_SUCCESS;
    }
    default: emu_fail("cuBLASLt: preference attribute %s (%d) is not emulated", name, (int)attr);
    }
}

// One algorithm per product. It records, in cublasLtMatmulAlgo_t's opaque words, the descriptors it
// was chosen for (a fingerprint), the pointer alignments the preference promised, and its workspace.
inline cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t op,
                                                     cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                                     cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                                     cublasLtMatmulPreference_t q, int requested,
                                                     cublasLtMatmulHeuristicResult_t results[], int* returned) {
    emu_lt::handle(h);
    const emu_lt::Layout* ls[4] = {emu_lt::layout(a), emu_lt::layout(b), emu_lt::layout(c), emu_lt::layout(d)};
    emu_lt::Desc* dp = emu_lt::desc(op);
    emu_lt::Pref* p = emu_lt::pref(q);
    if (requested < 1 || !results || !returned)
        emu_fail("cublasLtMatmulAlgoGetHeuristic: requested %d results into %p/%p", requested, (void*)results,
                 (void*)returned);
    emu_lt::check_product(*dp, *ls[0], *ls[1], *ls[2], *ls[3]);
    cublasLtMatmulHeuristicResult_t r;
    memset(&r, 0, sizeof r);
    r.algo.data[0] = emu_lt::ALGO_MAGIC;
    r.algo.data[1] = emu_lt::fingerprint(*dp, ls);
    for (int i = 0; i < 4; i++) r.algo.data[2 + i] = p->align[i];
    r.workspaceSize = std::min<uint64_t>(p->max_workspace, emu_lt::ALGO_WORKSPACE_BYTES);
    r.algo.data[6] = r.workspaceSize;
    r.state = CUBLAS_STATUS_SUCCESS;
    r.wavesCount = 1.0f;
    results[0] = r;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t op, const void* alpha, const void* A,
                                     cublasLtMatrixLayout_t a_desc, const void* B, cublasLtMatrixLayout_t b_desc,
                                     const void* beta, const void* C, cublasLtMatrixLayout_t c_desc, void* D,
                                     cublasLtMatrixLayout_t d_desc, const cublasLtMatmulAlgo_t* algo, void* workspace,
                                     size_t workspace_bytes, cudaStream_t stream) {
    using namespace emu_lt;
    handle(h);
    const Layout* ls[4] = {layout(a_desc), layout(b_desc), layout(c_desc), layout(d_desc)};
    Desc dsc = *desc(op);
    Shape s = check_product(dsc, *ls[0], *ls[1], *ls[2], *ls[3]);
    if (!algo)
        emu_fail("cublasLtMatmul: no algorithm (the emulator needs the heuristic's choice, as train_gpt passes it)");
    if (algo->data[0] != ALGO_MAGIC)
        emu_fail("cublasLtMatmul: the algorithm did not come from cublasLtMatmulAlgoGetHeuristic");
    if (algo->data[1] != fingerprint(dsc, ls))
        emu_fail("cublasLtMatmul: the algorithm was chosen for other descriptors than these (a stale plan?)");
    if (!alpha || !beta) emu_fail("cublasLtMatmul: null alpha or beta");
    float al = *(const float*)alpha, be = *(const float*)beta;  // host pointer mode: read at the call
    const void* ptrs[4] = {A, B, C, D};
    const char* names = "ABCD";
    for (int i = 0; i < 4; i++) {
        if (!ptrs[i] && !(i == 2 && be == 0.0f)) emu_fail("cublasLtMatmul: %c is null", names[i]);
        if (ptrs[i] && (uintptr_t)ptrs[i] % algo->data[2 + i])
            emu_fail(
                "cublasLtMatmul: %c at %p is not aligned to the %llu bytes the algorithm was chosen for "
                "(MIN_ALIGNMENT_%c_BYTES)",
                names[i], ptrs[i], (unsigned long long)algo->data[2 + i], names[i]);
    }
    if (C == D && ls[2]->ld != ls[3]->ld)
        emu_fail("cublasLtMatmul: in-place (C == D) with different leading dimensions");
    size_t spans[4];
    for (int i = 0; i < 4; i++) spans[i] = span_bytes(*ls[i]);
    for (int i = 0; i < 2; i++)
        if (overlap(D, spans[3], ptrs[i], spans[i])) emu_fail("cublasLtMatmul: D overlaps %c", names[i]);
    if (C && C != D && overlap(C, spans[2], D, spans[3]))
        emu_fail("cublasLtMatmul: C and D overlap without being the same matrix");
    size_t ws_needed = algo->data[6];
    if (workspace_bytes < ws_needed)
        emu_fail("cublasLtMatmul: workspace of %zu bytes, the algorithm needs %zu", workspace_bytes, ws_needed);
    if (ws_needed && !workspace) emu_fail("cublasLtMatmul: null workspace, the algorithm needs %zu bytes", ws_needed);
    Layout la = *ls[0], lb = *ls[1], lc = *ls[2], ld = *ls[3];
    emu_counts().gemms++;
    emu_stream_submit(stream, [=] {
        if (ws_needed)
            memset(workspace, 0xa5, ws_needed);  // the algorithm's scratch: any other user of it sees garbage
        run_product(dsc, la, lb, lc, ld, s, al, be, A, B, be != 0.0f ? C : nullptr, D);
    });
    return CUBLAS_STATUS_SUCCESS;
}
