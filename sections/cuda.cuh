// ============================================================================================
// CUDA: the GPU device tag, its memory, every operation's kernels, optimizers, NCCL, run_cuda
// ============================================================================================
// The generic model, optimizer and driver templates reach these overloads through the `Cuda`
// tag (argument-dependent lookup when they are instantiated), so this file sits after section 8:
// its model, optimizer and distributed parts use the types and constants of sections 6–8.
// Storage: activations and the matrix weights the forward reads are bf16; vector weights,
// gradients, master weights, optimizer state and statistics are fp32. Arithmetic is fp32 in
// registers. One stream orders all work, so no op needs a device-wide synchronize.
// Determinism: no float atomics. Sums over tokens (parameter gradients of gains, scales, mixes,
// gates, embedding rows) are cut into fixed row chunks, each summed in order by one block, then
// the chunk partials are added in chunk order: two identical runs give identical bits.

// --- Basics: the tag, error checks, the device context ----------------------------------------

#define PGOLF_CUDA 1  // this build has the GPU path (tests/test_cuda.cuh compiles only then)
using bf16 = __nv_bfloat16;
struct Cuda {
    using act = bf16;   // activations
    using mat = bf16;   // matrix weights as the forward reads them (bf16 copies of the master)
    using vec = float;  // gains, scales, mixes, gates: read straight from the fp32 master arena
    using grad = float; // gradients and the master weights they update
    using stat = float; // rstd, lse, losses
    static constexpr bool is_cuda = true;
};

#define cudaCheck(call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) \
    fail("CUDA error at %s:%d: %s (%s)", __FILE__, __LINE__, cudaGetErrorString(e_), #call); } while (0)
#define cublasCheck(call) do { cublasStatus_t s_ = (call); if (s_ != CUBLAS_STATUS_SUCCESS) \
    fail("cuBLAS error at %s:%d: %s (%s)", __FILE__, __LINE__, cublasLtGetStatusString(s_), #call); } while (0)
#ifdef PGOLF_NCCL
#define ncclCheck(call) do { ncclResult_t r_ = (call); if (r_ != ncclSuccess) \
    fail("NCCL error at %s:%d: %s (%s)", __FILE__, __LINE__, ncclGetErrorString(r_), #call); } while (0)
#endif
// after every kernel launch: a bad configuration shows up here, at its call
#define launchCheck() cudaCheck(cudaGetLastError())

// No driver, no device, or a broken install all mean "no GPU here", never an abort.
static bool cuda_available() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); return false; }
    return n > 0;
}

struct CudaContext {
    bool ready = false;
    int device = -1;
    cudaDeviceProp prop;
    cudaStream_t stream = nullptr;       // every kernel, copy, cuBLASLt call and collective runs here
    cublasLtHandle_t lt = nullptr;
    void* lt_workspace = nullptr;        // one cuBLASLt workspace, created once
    size_t lt_workspace_bytes = 0;
    uint8_t* scratch = nullptr;          // grow-only scratch shared by the ops (see cuda_scratch)
    size_t scratch_bytes = 0;
    float2* rope = nullptr;              // (cos, sin) per (position, pair) for one (rd, base)
    int rope_rows = 0, rope_rd = 0;
    float rope_base = 0;
#ifdef PGOLF_NCCL
    ncclComm_t nccl = nullptr;
#endif
};
static CudaContext g_cuda;
static const size_t CUBLASLT_WORKSPACE_BYTES = 32u << 20;  // what cuBLAS asks for on Hopper

__global__ void cast_params_kernel(bf16* dst, const float* src, size_t n);

// The device of this rank (its local rank), its stream and cuBLASLt handle: made once, on first
// use, before any allocation. run_cuda calls it first; the tests simply start using ops.
static CudaContext& cuda_ctx() {
    if (g_cuda.ready) return g_cuda;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) { cudaGetLastError(); fail("no usable CUDA device: %s", cudaGetErrorString(e)); }
    if (count == 0) fail("no usable CUDA device: 0 devices visible");
    if (g_local_rank >= count)
        fail("local rank %d needs GPU %d, but this node shows %d GPU(s): run at most %d ranks per node (check CUDA_VISIBLE_DEVICES)",
             g_local_rank, g_local_rank, count, count);
    g_cuda.device = g_local_rank;
    cudaCheck(cudaSetDevice(g_cuda.device));
    cudaCheck(cudaGetDeviceProperties(&g_cuda.prop, g_cuda.device));
    cudaFuncAttributes fa;  // does this binary carry code this GPU can run?
    if (cudaFuncGetAttributes(&fa, cast_params_kernel) != cudaSuccess) {
        cudaGetLastError();
        fail("GPU %d (%s) has compute capability %d.%d, but this train_gpt has no code for it: rebuild with GPU_ARCH=sm_%d%d",
             g_cuda.device, g_cuda.prop.name, g_cuda.prop.major, g_cuda.prop.minor, g_cuda.prop.major, g_cuda.prop.minor);
    }
    cudaCheck(cudaStreamCreate(&g_cuda.stream));  // a blocking stream: it also orders against legacy-stream copies
    cublasCheck(cublasLtCreate(&g_cuda.lt));
    g_cuda.lt_workspace_bytes = CUBLASLT_WORKSPACE_BYTES;
    cudaCheck(cudaMalloc(&g_cuda.lt_workspace, g_cuda.lt_workspace_bytes));
    g_cuda.ready = true;
    return g_cuda;
}

// --- Launch geometry and deterministic reductions ----------------------------------------------

static const int BLOCK = 256;        // threads of the elementwise kernels
static const int RED_ROWS = 8;       // row lanes of the column-reduction blocks (32 columns × 8 rows)
static const int NORM_BLOCKS = 256;  // fixed grid of the whole-tensor sums (fixed, so the sum order is too)

// Blocks of a grid-stride loop over n items: enough to fill any GPU many times, at most what the
// loop needs (0 for n = 0: launchers return before launching).
static unsigned grid_for(size_t n, int block = BLOCK) {
    size_t g = (n + block - 1) / block;
    return (unsigned)std::min<size_t>(g, (size_t)1 << 16);
}
static unsigned ceil_div(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }

// Rows cut into `chunks` runs of `rows_per_chunk` (the last may be shorter, none empty). One block
// sums each run in row order; the chunk partials are then added in chunk order.
struct RowChunks { int chunks; long rows_per_chunk; };
static const long CHUNK_MIN_ROWS = 64;
static const int CHUNK_MAX = 512;
static RowChunks row_chunks(long rows) {
    if (rows <= 0) return {0, 0};
    long per = std::max(CHUNK_MIN_ROWS, (rows + CHUNK_MAX - 1) / CHUNK_MAX);
    return {(int)((rows + per - 1) / per), per};
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
template <class X> __device__ __forceinline__ X from_f32(float f);
template <> __device__ __forceinline__ float from_f32<float>(float f) { return f; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float f) { return __float2bfloat16(f); }  // round to nearest even
__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }  // as the CPU's sigmoid

// Butterfly sums: every lane ends with the same bits (a + b == b + a exactly), in a fixed order.
template <class X> __device__ __forceinline__ X warp_sum(X v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Block-wide sum (blockDim a multiple of 32, at most 1024), returned to every thread. `red` holds 32 values.
template <class X> __device__ X block_sum(X v, X* red) {
    v = warp_sum(v);
    __syncthreads();  // red may still be read by a previous call
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    int lane = threadIdx.x % 32;  // every warp re-reads the per-warp sums, so every thread gets the total
    X t = lane < (int)blockDim.x / 32 ? red[lane] : X(0);
    return warp_sum(t);
}
__device__ float block_max(float v, float* red) {
    v = warp_max(v);
    __syncthreads();
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    int lane = threadIdx.x % 32;
    float t = lane < (int)blockDim.x / 32 ? red[lane] : -INFINITY;
    return warp_max(t);
}
// Sum over the RED_ROWS row lanes of a 32×RED_ROWS block, in lane order; valid where threadIdx.y == 0.
__device__ float column_reduce(float v, float* sh /* RED_ROWS·32 */) {
    sh[threadIdx.y * 32 + threadIdx.x] = v;
    __syncthreads();
    float s = 0.0f;
    if (threadIdx.y == 0)
        for (int r = 0; r < RED_ROWS; r++) s += sh[r * 32 + threadIdx.x];
    __syncthreads();  // sh may be reused by the next call
    return s;
}

// Second pass: out[c] += Σ_p partial[p, c], p in order.
__global__ void column_sums_add_kernel(float* out, const float* partial, int P, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.0f;
    for (int p = 0; p < P; p++) s += partial[(size_t)p * C + c];
    out[c] += s;
}
// out[0] += Σ v (one block; each thread sums a fixed stride, then a fixed tree).
__global__ void total_sum_add_kernel(float* out, const float* v, size_t n) {
    __shared__ float red[32];
    float s = 0.0f;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) s += v[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) out[0] += s;
}
// First pass for a plain fp32 matrix [R, C]: partial[chunk, c] = Σ of the chunk's rows.
__global__ void column_partial_sums_kernel(float* partial, const float* in, int R, int C, long rows_per_chunk) {
    __shared__ float sh[RED_ROWS * 32];
    int c = blockIdx.x * 32 + threadIdx.x;
    long n0 = blockIdx.y * rows_per_chunk, n1 = min(n0 + rows_per_chunk, (long)R);
    float acc = 0.0f;
    if (c < C)
        for (long n = n0 + threadIdx.y; n < n1; n += RED_ROWS) acc += in[n * C + c];
    acc = column_reduce(acc, sh);
    if (threadIdx.y == 0 && c < C) partial[(size_t)blockIdx.y * C + c] = acc;
}
static void column_sums_add(float* out, const float* partial, int P, int C) {
    if (C <= 0) return;
    column_sums_add_kernel<<<ceil_div(C, BLOCK), BLOCK, 0, g_cuda.stream>>>(out, partial, P, C);
    launchCheck();
}
static void total_sum_add(float* out, const float* partial, size_t n) {
    total_sum_add_kernel<<<1, 1024, 0, g_cuda.stream>>>(out, partial, n);
    launchCheck();
}
static dim3 reduce_grid(int C, const RowChunks& rc) { return dim3(ceil_div(C, 32), rc.chunks); }
static const dim3 REDUCE_BLOCK(32, RED_ROWS);

// --- Memory: allocations, copies, the shared scratch --------------------------------------------

static void* cuda_malloc_checked(size_t bytes, const char* what) {
    cuda_ctx();
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();  // an allocation failure is not sticky: clear it
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        fail("out of GPU memory allocating %.1f MiB (%s) with %.1f MiB free of %.1f MiB: lower the per-rank batch "
             "(TRAIN_BATCH_TOKENS, or raise GRAD_ACCUM_STEPS)", bytes / 1048576.0, what, fr / 1048576.0, tot / 1048576.0);
    }
    cudaCheck(e);
    return p;
}
// Zero-filled, like the CPU's calloc: the optimizer moments rely on starting at zero.
static void* device_alloc(Cuda, size_t bytes) {
    void* p = cuda_malloc_checked(bytes, "device_alloc");
    if (bytes) cudaCheck(cudaMemsetAsync(p, 0, bytes, g_cuda.stream));
    return p;
}
static void device_free(Cuda, void* p) { if (p) cudaCheck(cudaFree(p)); }
static void device_zero(Cuda, void* p, size_t bytes) { if (bytes) cudaCheck(cudaMemsetAsync(p, 0, bytes, cuda_ctx().stream)); }
// Host copies wait for the stream: the host side is pageable memory the caller may reuse at once.
template <class X> static void to_device(Cuda, X* dst, const X* src, size_t n) {
    if (!n) return;
    cudaCheck(cudaMemcpyAsync(dst, src, n * sizeof(X), cudaMemcpyHostToDevice, cuda_ctx().stream));
    cudaCheck(cudaStreamSynchronize(g_cuda.stream));
}
template <class X> static void to_host(Cuda, X* dst, const X* src, size_t n) {
    if (!n) return;
    cudaCheck(cudaMemcpyAsync(dst, src, n * sizeof(X), cudaMemcpyDeviceToHost, cuda_ctx().stream));
    cudaCheck(cudaStreamSynchronize(g_cuda.stream));
}
template <class X> static void device_copy(Cuda, X* dst, const X* src, size_t n) {
    if (n && dst != src) cudaCheck(cudaMemcpyAsync(dst, src, n * sizeof(X), cudaMemcpyDeviceToDevice, cuda_ctx().stream));
}

// One grow-only scratch buffer for the ops (chunk partials, sort buffers, Newton–Schulz iterates).
// Work is ordered on one stream, so each op may reuse what the previous one left behind. run_cuda
// reserves the planned size before training; growing later frees the old buffer first (cudaFree
// waits for the device, so no kernel still reads it).
static uint8_t* cuda_scratch(size_t bytes) {
    CudaContext& cx = cuda_ctx();
    if (bytes > cx.scratch_bytes) {
        if (cx.scratch) cudaCheck(cudaFree(cx.scratch));
        cx.scratch = nullptr; cx.scratch_bytes = 0;
        cx.scratch = (uint8_t*)cuda_malloc_checked(bytes, "scratch");
        cx.scratch_bytes = bytes;
    }
    return cx.scratch;
}
// An op lays out its scratch with an Arena: measure (base null), then point into the scratch.
template <class F> static void scratch_carve(F&& carve) {
    Arena a;
    carve(a);
    a.base = cuda_scratch(a.used); a.cap = a.used; a.used = 0;
    carve(a);
}

// master weights (fp32) → the bf16 copy the forward reads
__global__ void cast_params_kernel(bf16* dst, const float* src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16(src[i]);
}
static void cast_params(Cuda, bf16* dst, const float* src, size_t n) {
    if (!n) return;
    cast_params_kernel<<<grid_for(n), BLOCK, 0, cuda_ctx().stream>>>(dst, src, n);
    launchCheck();
}

// --- Embedding: out[n] = table[idx[n]] -----------------------------------------------------------
__global__ void embedding_forward_kernel(bf16* out, const int32_t* idx, const bf16* table, size_t N, int C) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < N * C; i += (size_t)gridDim.x * blockDim.x) {
        size_t n = i / C, c = i % C;
        out[i] = table[(size_t)idx[n] * C + c];
    }
}
static void embedding_forward(Cuda, bf16* out, const int32_t* idx, const bf16* table, int N, int C) {
    size_t n = (size_t)N * C;
    if (!n) return;
    embedding_forward_kernel<<<grid_for(n), BLOCK, 0, cuda_ctx().stream>>>(out, idx, table, N, C);
    launchCheck();
}

// Backward without atomics: a stable radix sort of (index, position) pairs groups the positions of
// each table row in increasing position order (the CPU's order); every run of equal indices is
// then summed in that order by one block and added to its row once.
__global__ void iota_kernel(int32_t* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = i;
}
static const int EMB_RUNS_PER_BLOCK = 32;  // sorted entries whose run starts each block owns
// Block b owns sorted entries [b·S, (b+1)·S); it sums every run that starts there, following a
// run past its range when the run is longer.
__global__ void embedding_backward_kernel(float* dtable, const bf16* dout, const int32_t* keys, const int32_t* pos, int N, int C) {
    int i0 = blockIdx.x * EMB_RUNS_PER_BLOCK, i1 = min(i0 + EMB_RUNS_PER_BLOCK, N);
    for (int i = i0; i < i1; i++) {
        int key = keys[i];
        if (i > 0 && keys[i - 1] == key) continue;  // not a run start (the same for every thread)
        int end = i + 1;
        while (end < N && keys[end] == key) end++;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float acc = 0.0f;
            for (int j = i; j < end; j++) acc += to_f32(dout[(size_t)pos[j] * C + c]);
            dtable[(size_t)key * C + c] += acc;
        }
    }
}
struct SortScratch { int32_t *keys, *pos_in, *pos; void* temp; size_t temp_bytes; };
// cub's temporary storage for sorting N pairs (a host-side size query; needs the device context)
static size_t radix_sort_temp_bytes(int N) {
    cuda_ctx();
    size_t bytes = 0;
    cudaCheck(cub::DeviceRadixSort::SortPairs(nullptr, bytes, (const int32_t*)nullptr, (int32_t*)nullptr,
                                              (const int32_t*)nullptr, (int32_t*)nullptr, N));
    return bytes;
}
static void carve_sort_scratch(Arena& a, SortScratch& s, int N, size_t temp_bytes) {
    s.keys = a.take<int32_t>(N); s.pos_in = a.take<int32_t>(N); s.pos = a.take<int32_t>(N);
    s.temp = a.take<uint8_t>(temp_bytes); s.temp_bytes = temp_bytes;
}
// (perf: the table's row count is not an argument, so the sort uses all 32 key bits — passing it
//  would cut the passes from 4 to 2; and one block sums a whole run, so a token at 4% of a 98k-token
//  batch is ~4,000 rows for one block: cut long runs into fixed segments, then add the segment sums
//  in order — still deterministic)
static void embedding_backward(Cuda, float* dtable, const bf16* dout, const int32_t* idx, int N, int C) {
    if (N <= 0 || C <= 0 || !dtable) return;
    size_t temp_bytes = radix_sort_temp_bytes(N);
    SortScratch s;
    scratch_carve([&](Arena& a) { carve_sort_scratch(a, s, N, temp_bytes); });
    cudaStream_t st = g_cuda.stream;
    iota_kernel<<<grid_for(N), BLOCK, 0, st>>>(s.pos_in, N);
    launchCheck();
    cudaCheck(cub::DeviceRadixSort::SortPairs(s.temp, s.temp_bytes, idx, s.keys, s.pos_in, s.pos, N, 0, 32, st));
    embedding_backward_kernel<<<ceil_div(N, EMB_RUNS_PER_BLOCK), 128, 0, st>>>(dtable, dout, s.keys, s.pos, N, C);
    launchCheck();
}

// --- BigramHash indices ----------------------------------------------------------------------------
__global__ void bigram_lookup_kernel(int32_t* out, const int32_t* idx, int N, int T, int buckets, int vocab, bool pr600_hash) {
    for (int n = blockIdx.x * blockDim.x + threadIdx.x; n < N; n += gridDim.x * blockDim.x)
        out[n] = bigram_bucket(idx[n], n % T ? idx[n - 1] : 0, n % T, buckets, vocab, pr600_hash);
}
static void bigram_lookup(Cuda, int32_t* out, const int32_t* idx, int B, int T_, int buckets, int vocab, bool pr600_hash) {
    int N = B * T_;
    if (N <= 0) return;
    bigram_lookup_kernel<<<grid_for(N), BLOCK, 0, cuda_ctx().stream>>>(out, idx, N, T_, buckets, vocab, pr600_hash);
    launchCheck();
}

// --- RMSNorm (no weight): one warp per row, fp32 sums ---------------------------------------------
__global__ void rmsnorm_forward_kernel(bf16* out, float* rstd, const bf16* inp, int N, int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const bf16* x = inp + (size_t)row * C;
    float ss = 0.0f;
    for (int c = lane; c < C; c += 32) { float v = to_f32(x[c]); ss += v * v; }
    ss = warp_sum(ss);
    float r = 1.0f / sqrtf(ss / C + eps);
    if (lane == 0) rstd[row] = r;
    for (int c = lane; c < C; c += 32) out[(size_t)row * C + c] = from_f32<bf16>(to_f32(x[c]) * r);
}
// dx += r·dy − r³·x·(dy·x)/C
__global__ void rmsnorm_backward_kernel(bf16* dinp, const bf16* dout, const bf16* inp, const float* rstd, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const bf16 *x = inp + (size_t)row * C, *dy = dout + (size_t)row * C;
    float dot = 0.0f;
    for (int c = lane; c < C; c += 32) dot += to_f32(dy[c]) * to_f32(x[c]);
    dot = warp_sum(dot);
    float r = rstd[row], k = r * r * r * dot / C;
    bf16* dx = dinp + (size_t)row * C;
    for (int c = lane; c < C; c += 32) dx[c] = from_f32<bf16>(to_f32(dx[c]) + r * to_f32(dy[c]) - k * to_f32(x[c]));
}
static const int ROWS_PER_BLOCK = 8;  // warps per block of the warp-per-row kernels
static void rmsnorm_forward(Cuda, bf16* out, float* rstd, const bf16* inp, int N, int C) {
    if (N <= 0) return;
    rmsnorm_forward_kernel<<<ceil_div(N, ROWS_PER_BLOCK), 32 * ROWS_PER_BLOCK, 0, cuda_ctx().stream>>>(out, rstd, inp, N, C, (float)RMSNORM_EPS);
    launchCheck();
}
static void rmsnorm_backward(Cuda, bf16* dinp, const bf16* dout, const bf16* inp, const float* rstd, int N, int C) {
    if (N <= 0) return;
    rmsnorm_backward_kernel<<<ceil_div(N, ROWS_PER_BLOCK), 32 * ROWS_PER_BLOCK, 0, cuda_ctx().stream>>>(dinp, dout, inp, rstd, N, C);
    launchCheck();
}

// --- Linear layer through cuBLASLt -----------------------------------------------------------------
// cuBLAS is column-major; our matrices are row-major. A row-major X [r, c] is, byte for byte, the
// column-major matrix Xᵀ (c × r, leading dimension c). So the row-major product C = op(A)·op(B)
// (C: M×N, op(A): M×K, op(B): K×N) is the column-major product Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLAS's first
// operand is our B and its second our A, with m = N, n = M, and each operand keeps its own
// transpose flag (B stored [K,N] reads as the column-major Bᵀ, which is what op(B)ᵀ needs: no
// transpose; B stored [N,K] reads as B: transpose). Leading dimensions are the stored row lengths.
struct RowMajorGemm { int M, N, K; bool a_trans, b_trans; };  // D[M,N] = op(A)[M,K]·op(B)[K,N], row-major
struct GemmDesc { bool ta, tb; int m, n, k, lda, ldb, ldc; };  // cuBLAS: C(m×n) = op(A)·op(B), column-major
// A is stored row-major [M,K] ([K,M] when a_trans), B [K,N] ([N,K] when b_trans), C [M,N].
static GemmDesc gemm_row_major(int M, int N, int K, bool a_trans, bool b_trans) {
    GemmDesc g;
    g.ta = b_trans; g.tb = a_trans;
    g.m = N; g.n = M; g.k = K;
    g.lda = b_trans ? K : N;
    g.ldb = a_trans ? M : K;
    g.ldc = N;
    return g;
}
// Largest power of two (≤ 256) dividing the address: cuBLASLt assumes 256-byte alignment unless told.
static uint32_t pointer_alignment(const void* p) {
    uintptr_t a = (uintptr_t)p;
    uint32_t al = 256;
    while (al > 1 && a % al) al /= 2;
    return al;
}
// A cuBLASLt plan: descriptors and the heuristic's algorithm for one shape, made once and kept.
// Everything that shapes the descriptors or restricts the algorithm is in the key; alpha, beta and
// the pointers are passed per call. (Each call once built and dropped 6 descriptors and re-ran the
// heuristic: ~1,100 products a pr467 step, Newton–Schulz included, made that host time count.)
struct GemmKey {
    int M, N, K, batch;
    bool a_trans, b_trans;
    cudaDataType_t d_type;
    long long stride_a, stride_b, stride_cd;
    uint32_t align[4];  // cuBLAS A, B, C, D
    bool operator<(const GemmKey& o) const {
        return std::tie(M, N, K, batch, a_trans, b_trans, d_type, stride_a, stride_b, stride_cd, align[0], align[1], align[2], align[3]) <
               std::tie(o.M, o.N, o.K, o.batch, o.a_trans, o.b_trans, o.d_type, o.stride_a, o.stride_b, o.stride_cd, o.align[0], o.align[1],
                        o.align[2], o.align[3]);
    }
};
struct GemmPlan { cublasLtMatmulDesc_t op; cublasLtMatrixLayout_t la, lb, lc; cublasLtMatmulAlgo_t algo; };
static std::map<GemmKey, GemmPlan> g_gemm_plans;

static GemmPlan gemm_plan_create(const GemmKey& key) {
    CudaContext& cx = cuda_ctx();
    GemmDesc g = gemm_row_major(key.M, key.N, key.K, key.a_trans, key.b_trans);
    GemmPlan p;
    cublasCheck(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = g.ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasCheck(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    cublasCheck(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    // cuBLAS's A is our b, its B our a (see above); layouts describe the stored column-major matrices
    cublasCheck(cublasLtMatrixLayoutCreate(&p.la, CUDA_R_16BF, g.ta ? g.k : g.m, g.ta ? g.m : g.k, g.lda));
    cublasCheck(cublasLtMatrixLayoutCreate(&p.lb, CUDA_R_16BF, g.tb ? g.n : g.k, g.tb ? g.k : g.n, g.ldb));
    cublasCheck(cublasLtMatrixLayoutCreate(&p.lc, key.d_type, g.m, g.n, g.ldc));
    if (key.batch > 1) {
        int32_t bc = key.batch;
        int64_t strides[3] = {key.stride_b, key.stride_a, key.stride_cd};
        cublasLtMatrixLayout_t ls[3] = {p.la, p.lb, p.lc};
        for (int i = 0; i < 3; i++) {
            cublasCheck(cublasLtMatrixLayoutSetAttribute(ls[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &bc, sizeof bc));
            cublasCheck(cublasLtMatrixLayoutSetAttribute(ls[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &strides[i], sizeof strides[i]));
        }
    }
    cublasLtMatmulPreference_t pref;
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = cx.lt_workspace_bytes;
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; i++) cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &key.align[i], sizeof key.align[i]));
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    cublasCheck(cublasLtMatmulAlgoGetHeuristic(cx.lt, p.op, p.la, p.lb, p.lc, p.lc, pref, 1, &heur, &found));
    cublasCheck(cublasLtMatmulPreferenceDestroy(pref));
    if (found == 0)
        fail("cuBLASLt has no algorithm for the bf16 product [%d×%d]·[%d×%d]%s%s (batch %d, output %s, alignments %u/%u/%u/%u bytes)",
             key.M, key.K, key.K, key.N, key.a_trans ? " (A transposed)" : "", key.b_trans ? " (B transposed)" : "", key.batch,
             key.d_type == CUDA_R_32F ? "fp32" : "bf16", key.align[0], key.align[1], key.align[2], key.align[3]);
    p.algo = heur.algo;
    return p;
}
// Row-major D[M,N] = alpha·op(A)·op(B) + beta·C (C = D when null), A and B bf16, fp32 compute, D bf16 or
// fp32. `batch` same-shaped products with element strides between them (batched Newton–Schulz).
static void gemm_bf16(void* d, cudaDataType_t d_type, const void* c, const bf16* a, const bf16* b, int M, int N, int K,
                      bool a_trans, bool b_trans, float alpha, float beta, int batch = 1,
                      long long stride_a = 0, long long stride_b = 0, long long stride_cd = 0) {
    if (M <= 0 || N <= 0 || K <= 0 || batch <= 0) return;
    CudaContext& cx = cuda_ctx();
    if (!c) c = d;
    GemmKey key{M, N, K, batch, a_trans, b_trans, d_type, batch > 1 ? stride_a : 0, batch > 1 ? stride_b : 0, batch > 1 ? stride_cd : 0,
                {pointer_alignment(b), pointer_alignment(a), pointer_alignment(c), pointer_alignment(d)}};
    auto it = g_gemm_plans.find(key);
    if (it == g_gemm_plans.end()) it = g_gemm_plans.emplace(key, gemm_plan_create(key)).first;
    const GemmPlan& p = it->second;
    cublasCheck(cublasLtMatmul(cx.lt, p.op, &alpha, b, p.la, a, p.lb, &beta, c, p.lc, d, p.lc, &p.algo,
                               cx.lt_workspace, cx.lt_workspace_bytes, cx.stream));
}
// The three products of a linear layer (W is [OC, IC]):
static RowMajorGemm linear_forward_gemm(int N, int IC, int OC) { return {N, OC, IC, false, true}; }   // out = inp·Wᵀ
static RowMajorGemm linear_dinp_gemm(int N, int IC, int OC) { return {N, IC, OC, false, false}; }     // dinp += dout·W
static RowMajorGemm linear_dweight_gemm(int N, int IC, int OC) { return {OC, IC, N, true, false}; }   // dW += doutᵀ·inp
static void gemm_bf16(void* d, cudaDataType_t d_type, const bf16* a, const bf16* b, const RowMajorGemm& g, float alpha, float beta) {
    gemm_bf16(d, d_type, nullptr, a, b, g.M, g.N, g.K, g.a_trans, g.b_trans, alpha, beta);
}
// out[N,OC] (+)= inp[N,IC]·W[OC,IC]ᵀ, bf16 out
// (perf: fuse the consumer into the epilogue: relu² after fc, the scaled residual add after proj)
static void matmul_forward(Cuda, bf16* out, const bf16* inp, const bf16* w, int N, int IC, int OC, bool accumulate = false) {
    gemm_bf16(out, CUDA_R_16BF, inp, w, linear_forward_gemm(N, IC, OC), 1.0f, accumulate ? 1.0f : 0.0f);
}
// dinp[N,IC] += dout[N,OC]·W[OC,IC] (bf16); dW[OC,IC] += dout[N,OC]ᵀ·inp[N,IC] (fp32 grads, beta = 1)
static void matmul_backward(Cuda, bf16* dinp, float* dw, const bf16* dout, const bf16* inp, const bf16* w, int N, int IC, int OC) {
    if (dinp) gemm_bf16(dinp, CUDA_R_16BF, dout, w, linear_dinp_gemm(N, IC, OC), 1.0f, 1.0f);
    if (dw) gemm_bf16(dw, CUDA_R_32F, dout, inp, linear_dweight_gemm(N, IC, OC), 1.0f, 1.0f);
}

// --- Query/key preparation: per-head RMSNorm, partial RoPE, per-head gain (fused) ------------------
// (cos, sin) of each (position, pair), computed on the host exactly as the CPU reference's rope_table
// (fp32 inv_freq from rope_inv_freq, the angle rounded to fp32, then std::cos/std::sin).
static void rope_table_host(std::vector<float2>& t, int rows, int rd, float base) {
    int half = rd / 2;
    t.resize((size_t)rows * half);
    for (int pos = 0; pos < rows; pos++)
        for (int i = 0; i < half; i++) {
            float ang = (float)(pos * rope_inv_freq(i, rd, base));
            t[(size_t)pos * half + i] = make_float2(std::cos(ang), std::sin(ang));
        }
}
// Device copy of the table for at least T positions; rebuilt only when (rd, base) change or T grows.
static const float2* rope_table_device(int T, int rd, float base) {
    CudaContext& cx = cuda_ctx();
    if (cx.rope && cx.rope_rd == rd && cx.rope_base == base && cx.rope_rows >= T) return cx.rope;
    int rows = (cx.rope && cx.rope_rd == rd && cx.rope_base == base) ? std::max(T, 2 * cx.rope_rows) : T;
    std::vector<float2> host;
    rope_table_host(host, rows, rd, base);
    if (cx.rope) cudaCheck(cudaFree(cx.rope));
    cx.rope = nullptr;
    cx.rope = (float2*)cuda_malloc_checked(std::max<size_t>(host.size(), 1) * sizeof(float2), "rope table");
    if (!host.empty()) to_device(Cuda{}, cx.rope, host.data(), host.size());
    cx.rope_rows = rows; cx.rope_rd = rd; cx.rope_base = base;
    return cx.rope;
}
static const int MAX_HEAD_DIM = 256;  // per-lane register arrays of the warp-per-head kernels hold hd/32 values

// One warp per (token, head); the head sits in shared memory so a lane can read its rotation partner.
// out = g·rope(x·r): x1 = x[i]·r, x2 = x[i+half]·r → (x1 cos + x2 sin, −x1 sin + x2 cos).
__global__ void qk_norm_rope_forward_kernel(bf16* out, float* rstd, const bf16* x, const float* gain, const float2* rope,
                                            int rows, int T, int nh, int hd, int rd, float eps) {
    extern __shared__ float qk_sh[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + warp;  // row = n·nh + h
    if (row >= rows) return;
    float* xs = qk_sh + warp * hd;
    int n = row / nh, h = row % nh, pos = n % T, half = rd / 2;
    const bf16* xi = x + (size_t)row * hd;
    float ss = 0.0f;
    for (int d = lane; d < hd; d += 32) { float v = to_f32(xi[d]); xs[d] = v; ss += v * v; }
    ss = warp_sum(ss);
    float r = 1.0f / sqrtf(ss / hd + eps);
    if (lane == 0) rstd[row] = r;
    __syncwarp();
    float g = gain ? gain[h] : 1.0f;
    const float2* cs = rope + (size_t)pos * half;
    bf16* yo = out + (size_t)row * hd;
    for (int d = lane; d < hd; d += 32) {
        float y;
        if (d < half) { float x1 = xs[d] * r, x2 = xs[d + half] * r; y = g * (x1 * cs[d].x + x2 * cs[d].y); }
        else if (d < rd) { int i = d - half; float x1 = xs[i] * r, x2 = xs[d] * r; y = g * (-x1 * cs[i].y + x2 * cs[i].x); }
        else y = g * xs[d] * r;
        yo[d] = from_f32<bf16>(y);
    }
}
// dn = g·Rᵀ·dy; dgain = dy·R(n); dx += r·dn − r³·x·(dn·x)/hd. Each (token, head) writes its dgain
// term to dgain_rows, summed over tokens afterwards in a fixed order.
__global__ void qk_norm_rope_backward_kernel(bf16* dx, float* dgain_rows, const bf16* dout, const bf16* x, const float* rstd,
                                             const float* gain, const float2* rope, int rows, int T, int nh, int hd, int rd) {
    extern __shared__ float qk_sh[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + warp;
    if (row >= rows) return;
    float *xs = qk_sh + warp * 2 * hd, *dys = xs + hd;
    int n = row / nh, h = row % nh, pos = n % T, half = rd / 2;
    for (int d = lane; d < hd; d += 32) { xs[d] = to_f32(x[(size_t)row * hd + d]); dys[d] = to_f32(dout[(size_t)row * hd + d]); }
    __syncwarp();
    float r = rstd[row], g = gain ? gain[h] : 1.0f, dg = 0.0f, dot = 0.0f;
    const float2* cs = rope + (size_t)pos * half;
    float dn[MAX_HEAD_DIM / 32];
    #pragma unroll
    for (int j = 0; j < MAX_HEAD_DIM / 32; j++) {
        int d = lane + 32 * j;
        dn[j] = 0.0f;
        if (d >= hd) continue;
        if (d < half) {
            float c = cs[d].x, s = cs[d].y, x1 = xs[d] * r, x2 = xs[d + half] * r;
            dg += dys[d] * (x1 * c + x2 * s) + dys[d + half] * (-x1 * s + x2 * c);
            dn[j] = g * (dys[d] * c - dys[d + half] * s);
        } else if (d < rd) {
            int i = d - half;
            dn[j] = g * (dys[i] * cs[i].y + dys[d] * cs[i].x);
        } else {
            dg += dys[d] * xs[d] * r;
            dn[j] = g * dys[d];
        }
        dot += dn[j] * xs[d];
    }
    dg = warp_sum(dg);
    dot = warp_sum(dot);
    float k = r * r * r * dot / hd;
    bf16* dxo = dx + (size_t)row * hd;
    #pragma unroll
    for (int j = 0; j < MAX_HEAD_DIM / 32; j++) {
        int d = lane + 32 * j;
        if (d < hd) dxo[d] = from_f32<bf16>(to_f32(dxo[d]) + r * dn[j] - k * xs[d]);
    }
    if (dgain_rows && lane == 0) dgain_rows[row] = dg;
}
static void check_head_dim(int hd, const char* op) {
    if (hd <= 0 || hd > MAX_HEAD_DIM || hd % 2) fail("%s: head dim %d unsupported by the CUDA kernels (even, at most %d)", op, hd, MAX_HEAD_DIM);
}
static const int HEADS_PER_BLOCK = 4;  // warps per block of the warp-per-head kernels
static void qk_norm_rope_forward(Cuda, bf16* out, float* rstd, const bf16* x, const float* gain, int N, int T_, int nh, int hd, int rd, float base) {
    int rows = N * nh;
    if (rows <= 0) return;
    check_head_dim(hd, "qk_norm_rope_forward");
    const float2* rope = rope_table_device(T_, rd, base);
    size_t sh = HEADS_PER_BLOCK * hd * sizeof(float);
    qk_norm_rope_forward_kernel<<<ceil_div(rows, HEADS_PER_BLOCK), 32 * HEADS_PER_BLOCK, sh, g_cuda.stream>>>(
        out, rstd, x, gain, rope, rows, T_, nh, hd, rd, (float)RMSNORM_EPS);
    launchCheck();
}
static void qk_norm_rope_backward(Cuda, bf16* dx, float* dgain, const bf16* dout, const bf16* x, const float* rstd,
                                  const float* gain, int N, int T_, int nh, int hd, int rd, float base) {
    int rows = N * nh;
    if (rows <= 0) return;
    check_head_dim(hd, "qk_norm_rope_backward");
    const float2* rope = rope_table_device(T_, rd, base);
    RowChunks rc = row_chunks(N);
    float *drows = nullptr, *partial = nullptr;
    if (dgain) scratch_carve([&](Arena& a) { drows = a.take<float>(rows); partial = a.take<float>((size_t)rc.chunks * nh); });
    size_t sh = HEADS_PER_BLOCK * 2 * hd * sizeof(float);
    qk_norm_rope_backward_kernel<<<ceil_div(rows, HEADS_PER_BLOCK), 32 * HEADS_PER_BLOCK, sh, g_cuda.stream>>>(
        dx, drows, dout, x, rstd, gain, rope, rows, T_, nh, hd, rd);
    launchCheck();
    if (dgain) {  // [N, nh] → [nh], in a fixed order
        column_partial_sums_kernel<<<reduce_grid(nh, rc), REDUCE_BLOCK, 0, g_cuda.stream>>>(partial, drows, N, nh, rc.rows_per_chunk);
        launchCheck();
        column_sums_add(dgain, partial, rc.chunks, nh);
    }
}

// --- XSA: remove from each head's output its component along the token's own value vector ---------
// One warp per (token, kv group): v̂ is computed once and serves the group's query heads.
__global__ void xsa_forward_kernel(bf16* out, const bf16* a, const bf16* v, int rows, int H, int Hk, int hd, float eps) {
    extern __shared__ float xsa_sh[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + warp;  // row = n·Hk + g
    if (row >= rows) return;
    float* vs = xsa_sh + warp * hd;
    int n = row / Hk, g = row % Hk, group = H / Hk;
    float nrm = 0.0f;
    for (int d = lane; d < hd; d += 32) { float x = to_f32(v[(size_t)row * hd + d]); vs[d] = x; nrm += x * x; }
    nrm = warp_sum(nrm);
    float inv = 1.0f / fmaxf(sqrtf(nrm), eps);
    __syncwarp();
    for (int h = g * group; h < (g + 1) * group; h++) {
        const bf16* ah = a + ((size_t)n * H + h) * hd;
        float s = 0.0f;
        for (int d = lane; d < hd; d += 32) s += to_f32(ah[d]) * vs[d] * inv;
        s = warp_sum(s);
        for (int d = lane; d < hd; d += 32) out[((size_t)n * H + h) * hd + d] = from_f32<bf16>(to_f32(ah[d]) - s * vs[d] * inv);
    }
}
// u = v̂: da += dy − (dy·u)u; du = −Σ_heads [(a·u)dy + (dy·u)a]; dv += (du − (du·u)u)/|v| (or du/eps below eps)
__global__ void xsa_backward_kernel(bf16* da, bf16* dv, const bf16* dout, const bf16* a, const bf16* v, int rows, int H, int Hk,
                                    int hd, float eps, double eps_d) {
    extern __shared__ float xsa_sh[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + warp;
    if (row >= rows) return;
    float* us = xsa_sh + warp * hd;
    int n = row / Hk, g = row % Hk, group = H / Hk;
    float nrm = 0.0f;
    for (int d = lane; d < hd; d += 32) { float x = to_f32(v[(size_t)row * hd + d]); us[d] = x; nrm += x * x; }
    nrm = sqrtf(warp_sum(nrm));
    float inv = 1.0f / fmaxf(nrm, eps);
    for (int d = lane; d < hd; d += 32) us[d] *= inv;
    __syncwarp();
    float du[MAX_HEAD_DIM / 32];
    #pragma unroll
    for (int j = 0; j < MAX_HEAD_DIM / 32; j++) du[j] = 0.0f;
    for (int h = g * group; h < (g + 1) * group; h++) {
        size_t base = ((size_t)n * H + h) * hd;
        float au = 0.0f, dyu = 0.0f;
        for (int d = lane; d < hd; d += 32) { au += to_f32(a[base + d]) * us[d]; dyu += to_f32(dout[base + d]) * us[d]; }
        au = warp_sum(au);
        dyu = warp_sum(dyu);
        #pragma unroll
        for (int j = 0; j < MAX_HEAD_DIM / 32; j++) {
            int d = lane + 32 * j;
            if (d >= hd) continue;
            float dy = to_f32(dout[base + d]), ah = to_f32(a[base + d]);
            da[base + d] = from_f32<bf16>(to_f32(da[base + d]) + dy - dyu * us[d]);
            du[j] -= au * dy + dyu * ah;
        }
    }
    float duu = 0.0f;
    #pragma unroll
    for (int j = 0; j < MAX_HEAD_DIM / 32; j++) { int d = lane + 32 * j; if (d < hd) duu += du[j] * us[d]; }
    duu = warp_sum(duu);
    bool normalized = (double)nrm > eps_d;  // below eps the normalization is a constant scale 1/eps
    #pragma unroll
    for (int j = 0; j < MAX_HEAD_DIM / 32; j++) {
        int d = lane + 32 * j;
        if (d >= hd) continue;
        float add = normalized ? (du[j] - duu * us[d]) * inv : du[j] * inv;
        dv[(size_t)row * hd + d] = from_f32<bf16>(to_f32(dv[(size_t)row * hd + d]) + add);
    }
}
static void xsa_forward(Cuda, bf16* out, const bf16* a, const bf16* v, int N, int H, int Hk, int hd) {
    int rows = N * Hk;
    if (rows <= 0) return;
    check_head_dim(hd, "xsa_forward");
    xsa_forward_kernel<<<ceil_div(rows, HEADS_PER_BLOCK), 32 * HEADS_PER_BLOCK, HEADS_PER_BLOCK * hd * sizeof(float), cuda_ctx().stream>>>(
        out, a, v, rows, H, Hk, hd, (float)XSA_EPS);
    launchCheck();
}
static void xsa_backward(Cuda, bf16* da, bf16* dv, const bf16* dout, const bf16* a, const bf16* v, int N, int H, int Hk, int hd) {
    int rows = N * Hk;
    if (rows <= 0) return;
    check_head_dim(hd, "xsa_backward");
    xsa_backward_kernel<<<ceil_div(rows, HEADS_PER_BLOCK), 32 * HEADS_PER_BLOCK, HEADS_PER_BLOCK * hd * sizeof(float), cuda_ctx().stream>>>(
        da, dv, dout, a, v, rows, H, Hk, hd, (float)XSA_EPS, XSA_EPS);
    launchCheck();
}

// --- Residual lanes: out = mix[0]⊙x + mix[1]⊙x0 ---------------------------------------------------
// (perf: fuse into the rmsnorm that follows it, and its backward into the rmsnorm backward)
__global__ void resid_mix_forward_kernel(bf16* out, const bf16* x, const bf16* x0, const float* mix, size_t n, int C) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        int c = i % C;
        out[i] = from_f32<bf16>(mix[c] * to_f32(x[i]) + mix[C + c] * to_f32(x0[i]));
    }
}
// Block (column tile, row chunk): elementwise input gradients, and the chunk's dmix partials [chunk, 2C].
__global__ void resid_mix_backward_kernel(bf16* dx, bf16* dx0, float* partial, const bf16* dout, const bf16* x, const bf16* x0,
                                          const float* mix, int N, int C, long rows_per_chunk) {
    __shared__ float sh[RED_ROWS * 32];
    int c = blockIdx.x * 32 + threadIdx.x;
    long n0 = blockIdx.y * rows_per_chunk, n1 = min(n0 + rows_per_chunk, (long)N);
    float a0 = 0.0f, a1 = 0.0f;
    if (c < C) {
        float m0 = mix[c], m1 = mix[C + c];
        for (long n = n0 + threadIdx.y; n < n1; n += RED_ROWS) {
            size_t i = (size_t)n * C + c;
            float d = to_f32(dout[i]);
            dx[i] = from_f32<bf16>(to_f32(dx[i]) + m0 * d);
            dx0[i] = from_f32<bf16>(to_f32(dx0[i]) + m1 * d);
            a0 += d * to_f32(x[i]);
            a1 += d * to_f32(x0[i]);
        }
    }
    a0 = column_reduce(a0, sh);
    a1 = column_reduce(a1, sh);
    if (partial && threadIdx.y == 0 && c < C) {
        partial[(size_t)blockIdx.y * 2 * C + c] = a0;
        partial[(size_t)blockIdx.y * 2 * C + C + c] = a1;
    }
}
static void resid_mix_forward(Cuda, bf16* out, const bf16* x, const bf16* x0, const float* mix, int N, int C) {
    size_t n = (size_t)N * C;
    if (!n) return;
    resid_mix_forward_kernel<<<grid_for(n), BLOCK, 0, cuda_ctx().stream>>>(out, x, x0, mix, n, C);
    launchCheck();
}
static void resid_mix_backward(Cuda, bf16* dx, bf16* dx0, float* dmix, const bf16* dout, const bf16* x, const bf16* x0,
                               const float* mix, int N, int C) {
    if (N <= 0 || C <= 0) return;
    RowChunks rc = row_chunks(N);
    float* partial = nullptr;
    if (dmix) scratch_carve([&](Arena& a) { partial = a.take<float>((size_t)rc.chunks * 2 * C); });
    resid_mix_backward_kernel<<<reduce_grid(C, rc), REDUCE_BLOCK, 0, cuda_ctx().stream>>>(dx, dx0, partial, dout, x, x0, mix, N, C, rc.rows_per_chunk);
    launchCheck();
    if (dmix) column_sums_add(dmix, partial, rc.chunks, 2 * C);
}

// --- Scaled branch: out = res + scale ⊙ σ(gate) ⊙ branch --------------------------------------------
// scale_stride 0: one scalar scale (BigramHash); gate optional.
// (perf: fuse into the epilogue of the matmul that produces `branch`)
__global__ void branch_add_forward_kernel(bf16* out, const bf16* res, const bf16* branch, const float* scale, const float* gate,
                                          size_t n, int C, int scale_stride) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        int c = i % C;
        float s = scale[c * scale_stride] * (gate ? sigmoidf_(gate[c]) : 1.0f);
        out[i] = from_f32<bf16>(to_f32(res[i]) + s * to_f32(branch[i]));
    }
}
__global__ void branch_add_backward_kernel(bf16* dres, bf16* dbranch, float* pscale, float* pgate, const bf16* dout, const bf16* branch,
                                           const float* scale, const float* gate, int N, int C, int scale_stride, long rows_per_chunk) {
    __shared__ float sh[RED_ROWS * 32];
    int c = blockIdx.x * 32 + threadIdx.x;
    long n0 = blockIdx.y * rows_per_chunk, n1 = min(n0 + rows_per_chunk, (long)N);
    float as = 0.0f, ag = 0.0f;
    if (c < C) {
        float sg = gate ? sigmoidf_(gate[c]) : 1.0f, sc = scale[c * scale_stride];
        for (long n = n0 + threadIdx.y; n < n1; n += RED_ROWS) {
            size_t i = (size_t)n * C + c;
            float d = to_f32(dout[i]), br = to_f32(branch[i]);
            if (dres) dres[i] = from_f32<bf16>(to_f32(dres[i]) + d);
            if (dbranch) dbranch[i] = from_f32<bf16>(to_f32(dbranch[i]) + sc * sg * d);
            as += d * sg * br;
            ag += d * sc * br * sg * (1.0f - sg);
        }
    }
    as = column_reduce(as, sh);
    ag = column_reduce(ag, sh);
    if (threadIdx.y == 0 && c < C) {
        if (pscale) pscale[(size_t)blockIdx.y * C + c] = as;
        if (pgate) pgate[(size_t)blockIdx.y * C + c] = ag;
    }
}
static void branch_add_forward(Cuda, bf16* out, const bf16* res, const bf16* branch, const float* scale, const float* gate,
                               int N, int C, int scale_stride = 1) {
    size_t n = (size_t)N * C;
    if (!n) return;
    branch_add_forward_kernel<<<grid_for(n), BLOCK, 0, cuda_ctx().stream>>>(out, res, branch, scale, gate, n, C, scale_stride);
    launchCheck();
}
static void branch_add_backward(Cuda, bf16* dres, bf16* dbranch, float* dscale, float* dgate, const bf16* dout, const bf16* branch,
                                const float* scale, const float* gate, int N, int C, int scale_stride = 1) {
    if (N <= 0 || C <= 0) return;
    RowChunks rc = row_chunks(N);
    float *pscale = nullptr, *pgate = nullptr;
    if (dscale || (dgate && gate))
        scratch_carve([&](Arena& a) {
            pscale = dscale ? a.take<float>((size_t)rc.chunks * C) : nullptr;
            pgate = dgate && gate ? a.take<float>((size_t)rc.chunks * C) : nullptr;
        });
    branch_add_backward_kernel<<<reduce_grid(C, rc), REDUCE_BLOCK, 0, cuda_ctx().stream>>>(
        dres, dbranch, pscale, pgate, dout, branch, scale, gate, N, C, scale_stride, rc.rows_per_chunk);
    launchCheck();
    if (pscale) {
        if (scale_stride == 0) total_sum_add(dscale, pscale, (size_t)rc.chunks * C);  // one scalar: every term in one sum
        else column_sums_add(dscale, pscale, rc.chunks, C);
    }
    if (pgate) column_sums_add(dgate, pgate, rc.chunks, C);
}

// --- SmearGate: out[t] = (1−g)⊙x[t] + g⊙x[t−1], g = σ(gate), x[−1] = 0 within each sequence ---------
__global__ void smear_forward_kernel(bf16* out, const bf16* x, const float* gate, size_t n, int T, int C) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i / C;
        int c = i % C;
        float g = sigmoidf_(gate[c]), prev = row % T ? to_f32(x[i - C]) : 0.0f;
        out[i] = from_f32<bf16>((1.0f - g) * to_f32(x[i]) + g * prev);
    }
}
// dx[t] += (1−g)·d[t] + g·d[t+1] (gathered, so no two threads write one element); dgate per chunk.
__global__ void smear_backward_kernel(bf16* dx, float* partial, const bf16* dout, const bf16* x, const float* gate, int N, int T, int C,
                                      long rows_per_chunk) {
    __shared__ float sh[RED_ROWS * 32];
    int c = blockIdx.x * 32 + threadIdx.x;
    long n0 = blockIdx.y * rows_per_chunk, n1 = min(n0 + rows_per_chunk, (long)N);
    float ag = 0.0f;
    if (c < C) {
        float g = sigmoidf_(gate[c]);
        for (long n = n0 + threadIdx.y; n < n1; n += RED_ROWS) {
            size_t i = (size_t)n * C + c;
            float d = to_f32(dout[i]), xv = to_f32(x[i]);
            float add = (1.0f - g) * d;
            if ((n + 1) % T != 0 && n + 1 < N) add += g * to_f32(dout[i + C]);
            dx[i] = from_f32<bf16>(to_f32(dx[i]) + add);
            float prev = n % T ? to_f32(x[i - C]) : 0.0f;
            ag += d * (prev - xv) * g * (1.0f - g);
        }
    }
    ag = column_reduce(ag, sh);
    if (partial && threadIdx.y == 0 && c < C) partial[(size_t)blockIdx.y * C + c] = ag;
}
static void smear_forward(Cuda, bf16* out, const bf16* x, const float* gate, int N, int T_, int C) {
    size_t n = (size_t)N * C;
    if (!n) return;
    smear_forward_kernel<<<grid_for(n), BLOCK, 0, cuda_ctx().stream>>>(out, x, gate, n, T_, C);
    launchCheck();
}
static void smear_backward(Cuda, bf16* dx, float* dgate, const bf16* dout, const bf16* x, const float* gate, int N, int T_, int C) {
    if (N <= 0 || C <= 0) return;
    RowChunks rc = row_chunks(N);
    float* partial = nullptr;
    if (dgate) scratch_carve([&](Arena& a) { partial = a.take<float>((size_t)rc.chunks * C); });
    smear_backward_kernel<<<reduce_grid(C, rc), REDUCE_BLOCK, 0, cuda_ctx().stream>>>(dx, partial, dout, x, gate, N, T_, C, rc.rows_per_chunk);
    launchCheck();
    if (dgate) column_sums_add(dgate, partial, rc.chunks, C);
}

// --- MLP activation: relu(h)² or leaky_relu(h, 0.5)² ------------------------------------------------
// (perf: the forward belongs in the fc matmul's epilogue, the backward in the proj dinp epilogue)
__global__ void mlp_act_forward_kernel(bf16* out, const bf16* h, size_t n, float slope) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = to_f32(h[i]), a = v > 0.0f ? v : slope * v;
        out[i] = from_f32<bf16>(a * a);
    }
}
__global__ void mlp_act_backward_kernel(bf16* dh, const bf16* dout, const bf16* h, size_t n, float slope_neg) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = to_f32(h[i]), slope = v > 0.0f ? 1.0f : slope_neg;
        dh[i] = from_f32<bf16>(to_f32(dh[i]) + to_f32(dout[i]) * 2.0f * slope * slope * v);  // d/dh (slope·h)² = 2·slope²·h
    }
}
static void mlp_act_forward(Cuda, bf16* out, const bf16* h, size_t n, bool leaky) {
    if (!n) return;
    mlp_act_forward_kernel<<<grid_for(n), BLOCK, 0, cuda_ctx().stream>>>(out, h, n, leaky ? LEAKY_SLOPE : 0.0f);
    launchCheck();
}
static void mlp_act_backward(Cuda, bf16* dh, const bf16* dout, const bf16* h, size_t n, bool leaky) {
    if (!n) return;
    mlp_act_backward_kernel<<<grid_for(n), BLOCK, 0, cuda_ctx().stream>>>(dh, dout, h, n, leaky ? LEAKY_SLOPE : 0.0f);
    launchCheck();
}

// --- Soft-capped cross-entropy (fused): z = cap·tanh(l/cap), loss = logsumexp(z) − z[y] ------------
// One block per row reads the bf16 logits and keeps everything else in fp32 registers: no fp32
// logits are ever written. With weights, the row is overwritten with bf16
// dlogits = w·(softmax(z) − onehot(y))·(1 − (z/cap)²). Each element is read and rewritten by the
// same thread, so the overwrite needs no barrier.
__global__ void softcap_ce_kernel(float* losses, bf16* logits, const int32_t* targets, const float* weights, int V, float cap) {
    __shared__ float red[32];
    __shared__ float zy;
    int n = blockIdx.x, y = targets[n];
    bf16* l = logits + (size_t)n * V;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float z = cap * tanhf(to_f32(l[i]) / cap);
        mx = fmaxf(mx, z);
        if (i == y) zy = z;
    }
    mx = block_max(mx, red);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(cap * tanhf(to_f32(l[i]) / cap) - mx);
    sum = block_sum(sum, red);  // (its barriers also publish zy)
    float lse = mx + logf(sum);
    if (threadIdx.x == 0) losses[n] = (y >= 0 && y < V) ? lse - zy : NAN;
    if (!weights) return;
    float w = weights[n];
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float z = cap * tanhf(to_f32(l[i]) / cap), th = z / cap, p = expf(z - lse);
        l[i] = from_f32<bf16>(w * (p - (i == y ? 1.0f : 0.0f)) * (1.0f - th * th));
    }
}
static void softcap_ce(Cuda, float* losses, bf16* logits, const int32_t* targets, const float* weights, int N, int V, float cap) {
    if (N <= 0) return;
    softcap_ce_kernel<<<N, 256, 0, cuda_ctx().stream>>>(losses, logits, targets, weights, V, cap);
    launchCheck();
}

// --- Elementwise helpers of the model's data flow (bf16 activations or fp32 buffers) ---------------
template <class X> __global__ void scale_inplace_kernel(X* x, size_t n, float s) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = from_f32<X>(to_f32(x[i]) * s);
}
template <class X> __global__ void add_forward_kernel(X* out, const X* x, const X* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = from_f32<X>(to_f32(x[i]) + to_f32(y[i]));
}
template <class X> static void scale_inplace(Cuda, X* x, size_t n, float s) {
    if (!n) return;
    scale_inplace_kernel<<<grid_for(n), BLOCK, 0, cuda_ctx().stream>>>(x, n, s);
    launchCheck();
}
template <class X> static void add_forward(Cuda, X* out, const X* x, const X* y, size_t n) {
    if (!n) return;
    add_forward_kernel<<<grid_for(n), BLOCK, 0, cuda_ctx().stream>>>(out, x, y, n);
    launchCheck();
}
template <class X> static void add_inplace(Cuda dev, X* x, const X* y, size_t n) { add_forward(dev, x, x, y, n); }
template <class X> static void copy_forward(Cuda dev, X* out, const X* x, size_t n) { device_copy(dev, out, x, n); }

// --- Model: the bf16 copy of the weights the forward reads ------------------------------------------
// The whole parameter arena gets one bf16 twin with the same offsets (each tensor starts at a
// multiple of 16 elements: 32-byte aligned in bf16); vectors are read from the fp32 master.
static void model_bind_compute(Cuda dev, Model<Cuda>& m) {
    if (!m.compute_mat) m.compute_mat = (bf16*)device_alloc(dev, m.nparams * sizeof(bf16));
    m.compute_vec = m.params;
    m.w = point_weights(m.cfg, m.table, m.compute_mat, m.compute_vec);
    cast_params(dev, m.compute_mat, m.params, m.nparams);
}

// --- Optimizers: AdamW, SGD, Muon, clipping, averaging, QAT ------------------------------------------
// Elementwise updates mirror the CPU reference's fp32 formulas term by term.
__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, size_t n, float lr, float b1, float b2, float eps, float wd,
                             float step_size, float bc2_sqrt) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float pi = p[i], gi = g[i];
        if (wd != 0.0f) pi *= 1.0f - lr * wd;
        float mi = b1 * m[i] + (1.0f - b1) * gi, vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi; v[i] = vi;
        p[i] = pi - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}
static void adamw_update(Cuda, float* p, const float* g, float* m, float* v, size_t n, float lr, float b1, float b2, float eps, float wd, int t) {
    if (!n) return;
    double bc1 = 1.0 - std::pow((double)b1, t), bc2 = 1.0 - std::pow((double)b2, t);
    adamw_kernel<<<grid_for(n), BLOCK, 0, cuda_ctx().stream>>>(p, g, m, v, n, lr, b1, b2, eps, wd, (float)(lr / bc1), (float)std::sqrt(bc2));
    launchCheck();
}
__global__ void sgd_kernel(float* p, const float* g, float* buf, size_t n, float lr, float momentum, float wd, bool first) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gi = g[i] + wd * p[i], b = first ? gi : momentum * buf[i] + gi;
        buf[i] = b;
        p[i] -= lr * b;
    }
}
static void sgd_update(Cuda, float* p, const float* g, float* buf, size_t n, float lr, float momentum, float wd, bool first) {
    if (!n) return;
    sgd_kernel<<<grid_for(n), BLOCK, 0, cuda_ctx().stream>>>(p, g, buf, n, lr, momentum, wd, first);
    launchCheck();
}
__global__ void apply_update_kernel(float* p, const float* u, size_t n, float lr, float wd) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = p[i] * (1.0f - lr * wd) - lr * u[i];
}
static void apply_update(Cuda, float* p, const float* update, size_t n, float lr, float wd) {
    if (!n) return;
    apply_update_kernel<<<grid_for(n), BLOCK, 0, cuda_ctx().stream>>>(p, update, n, lr, wd);
    launchCheck();
}
__global__ void average_kernel(float* avg, const float* w, size_t n, float decay, bool first) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        avg[i] = first ? w[i] : (decay < 0.0f ? avg[i] + w[i] : decay * avg[i] + (1.0f - decay) * w[i]);
}
static void average_accumulate(Cuda, float* avg, const float* w, size_t n, float decay, bool first) {
    if (!n) return;
    average_kernel<<<grid_for(n), BLOCK, 0, cuda_ctx().stream>>>(avg, w, n, decay, first);
    launchCheck();
}
static void scale_grads(Cuda dev, float* x, size_t n, float s) { scale_inplace(dev, x, n, s); }

// Σ x² in fp64: NORM_BLOCKS fixed blocks, each a fixed stride then a fixed tree; partials added in
// block order (on the host for sum_squares, on the device inside Muon).
__global__ void sum_squares_kernel(double* partial, const float* x, size_t n) {
    __shared__ double red[32];
    double s = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) s += (double)x[i] * x[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
static double sum_squares(Cuda dev, const float* x, size_t n) {
    if (!n) return 0.0;
    double* partial = nullptr;
    scratch_carve([&](Arena& a) { partial = a.take<double>(NORM_BLOCKS); });
    sum_squares_kernel<<<NORM_BLOCKS, BLOCK, 0, g_cuda.stream>>>(partial, x, n);
    launchCheck();
    double host[NORM_BLOCKS], s = 0.0;
    to_host(dev, host, partial, NORM_BLOCKS);
    for (int b = 0; b < NORM_BLOCKS; b++) s += host[b];
    return s;
}

// Per row: s = max(rowmax/clip, floor); out = bf16(clamp(round(w/s), −(clip+1), clip)·s). One block per row.
__global__ void fake_quant_rows_kernel(bf16* out, const float* w, int cols, int clip, float floor) {
    __shared__ float red[32];
    const float* wr = w + (size_t)blockIdx.x * cols;
    float mx = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) mx = fmaxf(mx, fabsf(wr[c]));
    mx = block_max(mx, red);
    float s = fmaxf(mx / clip, floor);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(size_t)blockIdx.x * cols + c] = __float2bfloat16(fake_quant_value(wr[c], s, clip));
}
static void fake_quant_rows(Cuda, bf16* out, const float* w, int rows, int cols, int clip, float floor) {
    if (rows <= 0 || cols <= 0) return;
    fake_quant_rows_kernel<<<rows, BLOCK, 0, cuda_ctx().stream>>>(out, w, cols, clip, floor);
    launchCheck();
}
// The weights the forward reads: bf16 casts of the master, fake-quantized (QAT) where qat_applies.
static void refresh_compute_weights(Cuda dev, Model<Cuda>& m, bool qat) {
    const Config& c = m.cfg;
    cast_params(dev, m.compute_mat, m.params, m.nparams);
    if (qat) {
        int clip = qat_clip(c);  // as the CPU reference (config_validate ensures QAT_BITS is set)
        for (const ParamSpec& p : m.table)
            if (qat_applies(p)) fake_quant_rows(dev, m.compute_mat + p.offset, m.params + p.offset, p.rows(), p.cols(), clip, c.qat_scale_floor);
    }
    m.qat_active = qat;
}

// Muon on the GPU: momentum and Nesterov in fp32, Newton–Schulz in bf16 (bf16 operands, fp32
// accumulation, bf16 results, as the reference runs it), Frobenius normalization, shape scale.
// Tall matrices need no transpose: with Y = G = Xᵀ, A = YᵀY equals XXᵀ and the update
// Y ← aY + Y·B is (aX + B·X)ᵀ because B = bA + cA² is symmetric.
struct NsPlan {
    bool tall;                 // rows > cols: iterate on Y = G (= Xᵀ)
    int r, k;                  // X is r×k with r ≤ k
    RowMajorGemm gram;         // A = X·Xᵀ  (tall: Yᵀ·Y); both operands are the iterate
    RowMajorGemm square;       // B = b·A + c·A·A
    RowMajorGemm update;       // X ← a·X + B·X  (tall: Y ← a·Y + Y·B, the iterate is the left operand)
};
static NsPlan ns_plan(int rows, int cols) {
    NsPlan p;
    p.tall = rows > cols;
    p.r = p.tall ? cols : rows; p.k = p.tall ? rows : cols;
    p.gram = p.tall ? RowMajorGemm{p.r, p.r, p.k, true, false} : RowMajorGemm{p.r, p.r, p.k, false, true};
    p.square = {p.r, p.r, p.r, false, false};
    p.update = p.tall ? RowMajorGemm{p.k, p.r, p.r, false, false} : RowMajorGemm{p.r, p.k, p.r, false, false};
    return p;
}
struct NsScratch { bf16 *x, *x2, *a, *b; double* partial; };
static void carve_ns_scratch(Arena& ar, NsScratch& s, int rows, int cols) {
    size_t n = (size_t)rows * cols, r = std::min(rows, cols);
    s.x = ar.take<bf16>(n); s.x2 = ar.take<bf16>(n); s.a = ar.take<bf16>(r * r); s.b = ar.take<bf16>(r * r);
    s.partial = ar.take<double>(NORM_BLOCKS);
}
// buf ← μ·buf + g; nest = g + μ·buf, with its Σ nest² per block (fp64)
__global__ void muon_momentum_kernel(float* nest, float* buf, const float* g, size_t n, float mu, double* partial) {
    __shared__ double red[32];
    double ss = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float b = mu * buf[i] + g[i], v = g[i] + mu * b;
        buf[i] = b; nest[i] = v;
        ss += (double)v * v;
    }
    ss = block_sum(ss, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = ss;
}
// X = bf16(nest / (‖nest‖_F + 1e−7)); every block adds the NORM_BLOCKS partials in the same order.
__global__ void ns_normalize_kernel(bf16* X, const float* nest, const double* partial, size_t n) {
    __shared__ double red[32];
    double t = 0.0;
    for (int b = threadIdx.x; b < NORM_BLOCKS; b += blockDim.x) t += partial[b];
    t = block_sum(t, red);
    float inv = (float)(1.0 / (sqrt(t) + 1e-7));
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        X[i] = __float2bfloat16(nest[i] * inv);
}
__global__ void muon_finish_kernel(float* update, const bf16* X, size_t n, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        update[i] = __bfloat162float(X[i]) * scale;
}
// `steps` Newton–Schulz iterations on `batch` same-shaped rows×cols matrices stored back to back in x
// (x2, a, b: same-sized scratch); returns the buffer holding the result (x or x2).
static bf16* newton_schulz_bf16(bf16* x, bf16* x2, bf16* a, bf16* b, int rows, int cols, int steps, int batch = 1) {
    NsPlan p = ns_plan(rows, cols);
    long long sx = (long long)rows * cols, sa = (long long)p.r * p.r;
    for (int s = 0; s < steps; s++) {
        const RowMajorGemm &G = p.gram, &S = p.square, &U = p.update;
        gemm_bf16(a, CUDA_R_16BF, nullptr, x, x, G.M, G.N, G.K, G.a_trans, G.b_trans, 1.0f, 0.0f, batch, sx, sx, sa);
        gemm_bf16(b, CUDA_R_16BF, a, a, a, S.M, S.N, S.K, false, false, NS_C, NS_B, batch, sa, sa, sa);  // c·A·A + b·A
        if (p.tall) gemm_bf16(x2, CUDA_R_16BF, x, x, b, U.M, U.N, U.K, false, false, 1.0f, NS_A, batch, sx, sa, sx);  // Y·B + a·Y
        else gemm_bf16(x2, CUDA_R_16BF, x, b, x, U.M, U.N, U.K, false, false, 1.0f, NS_A, batch, sa, sx, sx);       // B·X + a·X
        std::swap(x, x2);
    }
    return x;
}
// One matrix: buf ← μ·buf + g; update = NS(g + μ·buf)·√max(1, rows/cols). `update` holds the
// Nesterov gradient until the result overwrites it.
// (perf: batch the same-shaped matrices of all layers into one strided-batched NS per shape)
static void muon_direction(Cuda, float* update, const float* g, float* buf, int rows, int cols, float momentum, int steps) {
    size_t n = (size_t)rows * cols;
    if (!n) return;
    NsScratch s;
    scratch_carve([&](Arena& a) { carve_ns_scratch(a, s, rows, cols); });
    cudaStream_t st = g_cuda.stream;
    muon_momentum_kernel<<<NORM_BLOCKS, BLOCK, 0, st>>>(update, buf, g, n, momentum, s.partial);
    launchCheck();
    ns_normalize_kernel<<<grid_for(n), BLOCK, 0, st>>>(s.x, update, s.partial, n);
    launchCheck();
    bf16* X = newton_schulz_bf16(s.x, s.x2, s.a, s.b, rows, cols, steps);
    muon_finish_kernel<<<grid_for(n), BLOCK, 0, st>>>(update, X, n, (float)std::sqrt(std::max(1.0, (double)rows / cols)));
    launchCheck();
}

// --- Distributed: NCCL over the ranks MPI launched --------------------------------------------------
// The communicator is made once (run_cuda): rank 0 draws the id, MPI broadcasts it. Built without
// NCCL or MPI, this is a single-GPU program and more ranks are refused.
static void nccl_init() {
    if (g_world == 1) return;
#if defined(PGOLF_NCCL) && defined(PGOLF_MPI)
    if (g_cuda.nccl) return;
    cuda_ctx();  // the rank's device must be current
    ncclUniqueId id;
    if (g_rank == 0) ncclCheck(ncclGetUniqueId(&id));
    mpiCheck(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD));
    ncclCheck(ncclCommInitRank(&g_cuda.nccl, g_world, id, g_rank));
#else
    fail("%d ranks need NCCL and MPI, but this train_gpt was built without %s: rebuild with USE_NCCL=1 USE_MPI=1", g_world,
#ifdef PGOLF_NCCL
         "MPI"
#else
         "NCCL"
#endif
    );
#endif
}
#if defined(PGOLF_NCCL) && defined(PGOLF_MPI)
// A collective whose peer failed can block forever. Poll the stream and NCCL's asynchronous error
// so a failure ends this rank through fail(), whose MPI_Abort ends the others: no hang.
// (perf: this waits for the whole backward; with bucketed all-reduce overlap, poll from a watchdog)
static void nccl_wait(const char* what) {
    for (;;) {
        cudaError_t e = cudaStreamQuery(g_cuda.stream);
        if (e == cudaSuccess) return;
        if (e != cudaErrorNotReady) cudaCheck(e);
        ncclResult_t r = ncclSuccess;
        ncclCheck(ncclCommGetAsyncError(g_cuda.nccl, &r));
        if (r != ncclSuccess && r != ncclInProgress) {
            ncclCommAbort(g_cuda.nccl);
            g_cuda.nccl = nullptr;
            fail("NCCL %s failed on rank %d: %s", what, g_rank, ncclGetErrorString(r));
        }
    }
}
#endif
// Sum of a device array over ranks, in place.
// (perf: bucket the gradient arena by layer and all-reduce each bucket as the backward finishes it)
static void allreduce_sum(Cuda, float* x, size_t n) {
    if (g_world == 1 || n == 0) return;
#if defined(PGOLF_NCCL) && defined(PGOLF_MPI)
    if (!g_cuda.nccl) fail("internal: allreduce_sum before the NCCL communicator exists (run_cuda creates it)");
    ncclCheck(ncclAllReduce(x, x, n, ncclFloat, ncclSum, g_cuda.nccl, g_cuda.stream));
    nccl_wait("all-reduce");
#else
    (void)x;
    fail("allreduce_sum over %d ranks: this train_gpt was built without NCCL/MPI (rebuild with USE_NCCL=1 USE_MPI=1)", g_world);
#endif
}

// --- Driver: the memory plan and the CUDA entry point -----------------------------------------------
// Everything the run allocates up front, printed before allocating and checked against free memory.
struct CudaMemoryPlan {
    size_t params = 0, compute = 0, grads = 0, optimizer = 0, activations = 0, scratch = 0, workspace = 0;
    long act_tokens = 0, act_rows = 0;  // tokens the activations must hold; rows allocated (B·T ≥ tokens)
    int act_t = 0;
    const char* act_setting = "";  // the setting that sets the activation capacity
    size_t total() const { return params + compute + grads + optimizer + activations + scratch + workspace; }
};
static const size_t MEMORY_HEADROOM = 512u << 20;  // CUDA/cuBLASLt/NCCL internals and the eval modes' extras

// sort_temp_bytes: cub's sort storage for the capacity's tokens (a device query; 0 in host-only tests)
static CudaMemoryPlan cuda_memory_plan(const Config& c, int world, size_t sort_temp_bytes) {
    CudaMemoryPlan p;
    std::vector<ParamSpec> table = build_param_table(c);
    size_t n = param_arena_size(table);
    p.params = n * sizeof(float);
    p.compute = n * sizeof(bf16);
    p.grads = n * sizeof(float);
    bool avg = c.swa_enabled || c.swa_steps > 0 || c.ema_decay > 0;
    p.optimizer = (3 + (avg ? 1 : 0)) * n * sizeof(float);  // Adam m, v, Muon updates, [weight average]
    // the same capacity as the driver's activation_capacity, naming the setting that sets it
    long micro = c.train_batch_tokens / ((long)world * grad_accum_steps(c, world));
    struct { long tokens; const char* setting; } cand[] = {
        {micro, "TRAIN_BATCH_TOKENS (or raise GRAD_ACCUM_STEPS)"},
        {(long)c.eval_batch_seqs * c.eval_len(), "EVAL_BATCH_SEQS"},
        {(long)c.ttt_batch_size * c.ttt_eval_seq_len, "TTT_BATCH_SIZE"},
        {(long)c.ttt_batch_seqs * c.eval_len(), "TTT_BATCH_SEQS"},
        {(long)c.train_seq_len, "TRAIN_SEQ_LEN"},
    };
    p.act_tokens = 0;
    for (auto& k : cand) if (k.tokens > p.act_tokens) { p.act_tokens = k.tokens; p.act_setting = k.setting; }
    p.act_t = std::max({c.train_seq_len, c.eval_len(), c.ttt_eval_seq_len});
    int B = (int)((p.act_tokens + p.act_t - 1) / p.act_t);
    Arena ar;
    Acts<Cuda> acts;
    carve_acts(ar, acts, c, B, p.act_t);
    p.activations = ar.used;
    // scratch: the largest single op's need (each op lays its scratch out from the same start)
    long N = p.act_rows = (long)B * p.act_t;
    RowChunks rc = row_chunks(N);
    int widest = std::max({c.model_dim, c.bigram_dim, c.num_heads});
    size_t need = 0;
    {
        Arena a; SortScratch s;
        carve_sort_scratch(a, s, (int)N, sort_temp_bytes);
        need = std::max(need, a.used);
    }
    {
        Arena a;  // branch_add: scale and gate partials; resid_mix: 2C partials; qk dgain rows + partials
        a.take<float>((size_t)rc.chunks * widest); a.take<float>((size_t)rc.chunks * widest);
        need = std::max(need, a.used);
        Arena b; b.take<float>((size_t)rc.chunks * 2 * c.model_dim);
        need = std::max(need, b.used);
        Arena q; q.take<float>((size_t)N * c.num_heads); q.take<float>((size_t)rc.chunks * c.num_heads);
        need = std::max(need, q.used);
    }
    for (const ParamSpec& s : table)
        if (s.group == GROUP_MATRIX) { Arena a; NsScratch ns; carve_ns_scratch(a, ns, s.rows(), s.cols()); need = std::max(need, a.used); }
    p.scratch = need;
    p.workspace = CUBLASLT_WORKSPACE_BYTES;
    return p;
}
static void cuda_memory_plan_print(const CudaMemoryPlan& p) {
    auto mib = [](size_t b) { return b / 1048576.0; };
    log0("cuda_memory_plan: params %.1f MiB (fp32 master) + bf16 copy %.1f + grads %.1f + optimizer %.1f + activations %.1f "
         "(%ld tokens × up to %d, set by %s) + scratch %.1f + cuBLASLt workspace %.1f = %.1f MiB\n",
         mib(p.params), mib(p.compute), mib(p.grads), mib(p.optimizer), mib(p.activations), p.act_tokens, p.act_t, p.act_setting,
         mib(p.scratch), mib(p.workspace), mib(p.total()));
}
// Refuses a plan that cannot fit, before any allocation, naming the setting to lower.
static void cuda_memory_plan_check(const CudaMemoryPlan& p, size_t free_bytes, size_t total_bytes) {
    size_t need = p.total() + MEMORY_HEADROOM;
    if (need > free_bytes)
        fail("GPU memory: this run needs %.0f MiB (%.0f MiB planned + %.0f MiB headroom) but the GPU has %.0f MiB free of %.0f MiB; "
             "activations take %.0f MiB for %ld tokens: lower %s",
             need / 1048576.0, p.total() / 1048576.0, MEMORY_HEADROOM / 1048576.0, free_bytes / 1048576.0, total_bytes / 1048576.0,
             p.activations / 1048576.0, p.act_tokens, p.act_setting);
}

template <class D> static void run(D dev, Config& c, const char* device_name);  // section 12

// (perf: a training step is ~600 launches plus ~1,100 cuBLASLt calls at pr467's shape; once the
//  kernels are settled, capture forward+backward of a micro-batch and the optimizer step as CUDA
//  graphs on g_cuda.stream — every op already runs there, scratch and rope tables are reserved
//  before the first step, and host copies happen only at the step's edges)

// DEVICE=cuda: this rank's GPU (its local rank), what it is, the NCCL communicator, the memory plan.
static void run_cuda(Config& c) {
    CudaContext& cx = cuda_ctx();
    int drv = 0, rt = 0;
    cudaCheck(cudaDriverGetVersion(&drv));
    cudaCheck(cudaRuntimeGetVersion(&rt));
    size_t fr = 0, tot = 0;
    cudaCheck(cudaMemGetInfo(&fr, &tot));
    log0("cuda: rank %d → GPU %d: %s, compute capability %d.%d, %d SMs, %.1f GiB (%.1f GiB free), driver %d.%d, runtime %d.%d\n",
         g_rank, cx.device, cx.prop.name, cx.prop.major, cx.prop.minor, cx.prop.multiProcessorCount, tot / 1073741824.0,
         fr / 1073741824.0, drv / 1000, drv % 1000 / 10, rt / 1000, rt % 1000 / 10);
    nccl_init();
    CudaMemoryPlan plan = cuda_memory_plan(c, g_world, 0);
    plan = cuda_memory_plan(c, g_world, radix_sort_temp_bytes((int)plan.act_rows));  // now with cub's sort storage
    cuda_memory_plan_print(plan);
    cudaCheck(cudaMemGetInfo(&fr, &tot));
    cuda_memory_plan_check(plan, fr, tot);
    cuda_scratch(plan.scratch);  // reserved now, so training never grows it
    run(Cuda{}, c, "cuda");
}
