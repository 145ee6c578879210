// --- Causal attention on the GPU: fused FlashAttention-2 style forward and backward -------------
// The same function as attention_forward/backward(Cpu<T>, ...) above, without a T×T matrix in
// memory: a block keeps one tile of rows in shared memory and streams the other side through it
// in tiles, with the softmax statistics in fp32 registers (online softmax, FlashAttention-2).
//
// Every kernel: 4 warps, 16 tile rows per warp, bf16 mma.sync.m16n8k16 with fp32 accumulators
// (the tensor-core instruction common to sm_80..sm_90, through inline PTX so that the fragment
// layouts are explicit and checked on the CPU below), operands loaded from shared memory with
// ldmatrix, tiles copied in with cp.async, double-buffered.
//   forward  block = one tile of 64 packed query rows; visits 64-key tiles up to the diagonal;
//            out = P·V / l and lse = max + log l, kept online.
//   backward (1) D = rowsum(dO ⊙ O) per (b, h, t) into a scratch buffer;
//            (2) dQ: block = 64 packed query rows; visits key tiles, recomputes S and dP;
//            (3) dK, dV: block = 64 keys of one kv head; visits the packed query tiles that see
//                them. Each output element belongs to one thread and sums its terms in a fixed
//                order: no atomics, so two runs give bit-identical gradients.
// GQA packing: a query tile holds all `group = H/Hk` query heads of one kv head for 64/group
// consecutive positions, packed row m = (position t0 + m/group, head g·group + m%group). The
// heads of a group are adjacent in q's [B,T,H,hd] layout; the group's K/V tiles are loaded once
// for all its heads, and dK/dV sum over the heads inside one accumulator.
//
// Performance, hd 64, per GPU at the thwu1 shape (B·T = 98,304 tokens, H 8, Hk 4, T 2048, 10
// layers): the causal forward is 2 products of B·H·T²·hd FLOPs each ≈ 0.21 TFLOP a layer; the
// backward does 7 such products where FlashAttention-2 does 5 (the dQ pass recomputes S and dP:
// the price of determinism without atomics) ≈ 0.72 TFLOP. Unmeasured estimate: mma.sync kernels
// of this shape run at roughly 250–350 TFLOP/s on an H100 (FlashAttention-2's range; wgmma-based
// FlashAttention-3 passes 500), so at 250 a layer costs ≈ 0.8 ms forward + 2.9 ms backward, ≈ 37
// ms a step, most of a 45 ms step at 45% MFU. Next, in order: (a) measure; try 128-row query
// tiles with 8 warps (half the shared-memory reads of K and V per FLOP) and the dK/dV kernel at
// 3 blocks per SM; (b) a deterministic dQ without the second pass: the dK/dV kernel adds each key
// tile's share of dQ into an fp32 buffer in key-tile order, serialized by a per-query-tile counter
// (FlashAttention-3's deterministic mode): 5 products instead of 7; (c) Hopper wgmma fed by TMA
// with a producer warp (FlashAttention-3's design), the way past 500 TFLOP/s.

static constexpr int ATTN_TILE = 64;      // packed query rows per query tile, keys per key tile
static constexpr int ATTN_THREADS = 128;  // 4 warps × 16 rows
static constexpr int ATTN_PAD = 8;        // bf16 of padding per shared-memory row (see below)
static constexpr float ATTN_LOG2E = 1.4426950408889634f, ATTN_LN2 = 0.6931471805599453f;
// Shared tiles are row-major with rows of hd + 8 bf16: an ldmatrix phase reads 8 rows of 16 bytes,
// and the 16-byte pad puts those rows on 8 different 4-bank groups for every hd in {16,...,128}.

// Packed query tiles: positions per tile, and how many tiles cover a sequence.
HD static inline int attn_tile_positions(int rows, int group) { return rows / group; }
HD static inline int attn_query_tiles(int T, int positions) { return (T + positions - 1) / positions; }
// Packed row m of query tile i: its position *t and head offset *hoff within the group; false for
// a padding row (position ≥ T, or one of the rows % group rows left over when group ∤ rows).
HD static inline bool attn_packed_row(int i, int m, int positions, int group, int T, int* t, int* hoff) {
    *t = i * positions + m / group;
    *hoff = m % group;
    return m < positions * group && *t < T;
}
// Positions [*lo, *hi] spanned by packed rows r0 .. r0+n−1 of query tile i (padding rows may widen
// the range, which only costs work: a wider range never skips or unmasks a needed pair).
HD static inline void attn_row_positions(int i, int r0, int n, int positions, int group, int* lo, int* hi) {
    *lo = i * positions + r0 / group;
    *hi = i * positions + (r0 + n - 1) / group;
}
// Key tiles that query tile i visits: 0 .. n−1, the last one holding its last position's key.
HD static inline int attn_key_tiles(int i, int positions, int T, int keys) {
    int last = (i + 1) * positions < T ? (i + 1) * positions - 1 : T - 1;
    return last / keys + 1;
}
// The first query tile whose positions reach key tile j: earlier tiles see none of its keys.
HD static inline int attn_first_query_tile(int j, int keys, int positions) { return j * keys / positions; }
// Causal mask between keys [key_lo, key_hi] and positions [t_lo, t_hi]: a key is hidden from
// position t when key > t. All hidden: the pair of tiles is skipped. None hidden: no mask needed.
HD static inline bool attn_all_masked(int key_lo, int t_hi) { return key_lo > t_hi; }
HD static inline bool attn_any_masked(int key_hi, int t_lo) { return key_hi > t_lo; }
// Element offsets: q, out, dout [B,T,H,hd] and k, v [B,T,Hk,hd] (nh heads); lse, D [B,H,T].
HD static inline size_t attn_index(int b, int t, int h, int T, int nh, int hd) { return (((size_t)b * T + t) * nh + h) * hd; }
HD static inline size_t attn_lse_index(int b, int h, int t, int T, int H) { return ((size_t)b * H + h) * T + t; }
// Row r of a [B,T,H,hd] tensor, r = (b·T + t)·H + h, as its [B,H,T] statistics index.
HD static inline size_t attn_row_lse_index(size_t r, int T, int H) {
    size_t h = r % H, bt = r / H;
    return (bt / T * H + h) * T + bt % T;
}

// mma.sync.m16n8k16 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"): lane l holds the
// accumulator elements e = 0..3 at row l/4 + 8·(e/2), column 2·(l%4) + e%2 of the 16×8 tile.
HD static inline int mma_acc_row(int lane, int e) { return (lane >> 2) + (e >> 1) * 8; }
HD static inline int mma_acc_col(int lane, int e) { return (lane & 3) * 2 + (e & 1); }
// ldmatrix.x4: lane l gives the address of row l%8 of 8×8 matrix l/8, and receives register j from
// matrix j. Row r, column c of the 16×16 block each lane points at:
// - A operand (row-major [m][k]), and B stored [k][n] read with .trans: matrices (rows 0–7, cols
//   0–7), (8–15, 0–7), (0–7, 8–15), (8–15, 8–15) → registers a0..a3, or b0,b1 of n-tile 0 and
//   b0,b1 of n-tile 1.
HD static inline int ldsm_a_row(int lane) { return lane & 15; }
HD static inline int ldsm_a_col(int lane) { return (lane >> 4) * 8; }
// - B stored [n][k] (K for S = Q·Kᵀ): matrices (n 0–7, k 0–7), (0–7, 8–15), (8–15, 0–7), (8–15,
//   8–15) → b0,b1 of n-tile 0 and b0,b1 of n-tile 1.
HD static inline int ldsm_b_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
HD static inline int ldsm_b_col(int lane) { return ((lane >> 3) & 1) * 8; }

// Two floats as a bf16 pair, the first in the low half (the lower column of an mma fragment).
HD static inline uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return (uint32_t)__bfloat16_as_ushort(v.x) | ((uint32_t)__bfloat16_as_ushort(v.y) << 16);
}
// The accumulators of two adjacent n-tiles (16 columns of a 16×16 block) as the A operand of the
// next product: a0 = (row g, cols of tile 0), a1 = (row g+8, tile 0), a2/a3 the same in tile 1.
HD static inline void acc_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = pack_bf16(c0[0], c0[1]);
    a[1] = pack_bf16(c0[2], c0[3]);
    a[2] = pack_bf16(c1[0], c1[1]);
    a[3] = pack_bf16(c1[2], c1[3]);
}

__device__ static inline uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ static inline void ldmatrix_x4(uint32_t r[4], const __nv_bfloat16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
__device__ static inline void ldmatrix_x4_trans(uint32_t r[4], const __nv_bfloat16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
// d += a·b for one 16×8 tile: a 16×16 bf16 (4 registers), b 16×8 bf16 (2 registers), d fp32.
__device__ static inline void mma_bf16_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 16 bytes global → shared without passing through registers; valid = false reads nothing and
// writes zeros (src must still be a global address).
__device__ static inline void cp_async_16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ static inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ static inline void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory"); }

// One tile of `ROWS` packed query rows (of q or dout) of query tile i into shared memory;
// padding rows become zeros, which every product below turns into exact zeros.
template <int ROWS, int HDIM>
__device__ static inline void attn_load_query_tile(__nv_bfloat16* dst, const __nv_bfloat16* src, int b, int i, int g,
                                                   int positions, int group, int T, int H) {
    constexpr int CHUNKS = HDIM / 8;  // 16-byte pieces per row
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += ATTN_THREADS) {
        int m = c / CHUNKS, t, hoff;
        bool valid = attn_packed_row(i, m, positions, group, T, &t, &hoff);
        cp_async_16(dst + m * (HDIM + ATTN_PAD) + c % CHUNKS * 8,
                    valid ? src + attn_index(b, t, g * group + hoff, T, H, HDIM) + c % CHUNKS * 8 : src, valid);
    }
}
// Keys key0 .. key0+63 of kv head g (of k or v) into shared memory; keys ≥ T become zeros.
template <int HDIM>
__device__ static inline void attn_load_key_tile(__nv_bfloat16* dst, const __nv_bfloat16* src, int b, int key0, int g, int T, int Hk) {
    constexpr int CHUNKS = HDIM / 8;
    for (int c = threadIdx.x; c < ATTN_TILE * CHUNKS; c += ATTN_THREADS) {
        int r = c / CHUNKS, key = key0 + r;
        cp_async_16(dst + r * (HDIM + ATTN_PAD) + c % CHUNKS * 8,
                    key < T ? src + attn_index(b, key, g, T, Hk, HDIM) + c % CHUNKS * 8 : src, key < T);
    }
}

// Forward. Grid (query tiles, Hk, B). Shared: Q tile, two stages of K and V tiles.
template <int HDIM>
__global__ void __launch_bounds__(ATTN_THREADS) attention_forward_kernel(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q,
                                                                         const __nv_bfloat16* k, const __nv_bfloat16* v,
                                                                         int T, int H, int Hk, float scale_log2) {
    constexpr int LD = HDIM + ATTN_PAD, KS = HDIM / 16, NT = ATTN_TILE / 8, TILE = ATTN_TILE * LD;
    extern __shared__ uint4 attn_smem[];  // uint4: 16-byte aligned for cp.async and ldmatrix
    __nv_bfloat16* sQ = (__nv_bfloat16*)attn_smem;
    __nv_bfloat16* sK = sQ + TILE;      // stage s at sK + s·TILE
    __nv_bfloat16* sV = sK + 2 * TILE;
    const int group = H / Hk, positions = attn_tile_positions(ATTN_TILE, group);
    const int i = gridDim.x - 1 - blockIdx.x;  // the longest (last) query tiles start first
    const int g = blockIdx.y, b = blockIdx.z, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n_kt = attn_key_tiles(i, positions, T, ATTN_TILE);
    int w_lo, w_hi;  // positions of this warp's 16 rows
    attn_row_positions(i, warp * 16, 16, positions, group, &w_lo, &w_hi);
    int t_row[2], hoff[2];  // this thread's two rows: accumulator elements 0,1 and 2,3
    bool valid[2];
#pragma unroll
    for (int r = 0; r < 2; r++) valid[r] = attn_packed_row(i, warp * 16 + mma_acc_row(lane, 2 * r), positions, group, T, &t_row[r], &hoff[r]);

    attn_load_query_tile<ATTN_TILE, HDIM>(sQ, q, b, i, g, positions, group, T, H);
    attn_load_key_tile<HDIM>(sK, k, b, 0, g, T, Hk);
    attn_load_key_tile<HDIM>(sV, v, b, 0, g, T, Hk);
    cp_async_commit();

    uint32_t qf[KS][4];                       // this warp's 16 query rows as A operands
    float o[HDIM / 8][4] = {};                  // unnormalized output rows
    float m_run[2] = {-INFINITY, -INFINITY};  // running max of the scaled scores (log2 units)
    float l_run[2] = {0.f, 0.f};              // running Σ exp2(s − m), this thread's columns only
    for (int j = 0; j < n_kt; j++) {
        if (j + 1 < n_kt) {  // prefetch the next key tile into the other stage
            attn_load_key_tile<HDIM>(sK + ((j + 1) & 1) * TILE, k, b, (j + 1) * ATTN_TILE, g, T, Hk);
            attn_load_key_tile<HDIM>(sV + ((j + 1) & 1) * TILE, v, b, (j + 1) * ATTN_TILE, g, T, Hk);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (j == 0)
#pragma unroll
            for (int kk = 0; kk < KS; kk++) ldmatrix_x4(qf[kk], sQ + (warp * 16 + ldsm_a_row(lane)) * LD + kk * 16 + ldsm_a_col(lane));
        const __nv_bfloat16* cK = sK + (j & 1) * TILE;
        const __nv_bfloat16* cV = sV + (j & 1) * TILE;
        const int key0 = j * ATTN_TILE;
        if (!attn_all_masked(key0, w_hi)) {  // warp-uniform: a wholly hidden tile changes nothing
            float s[NT][4] = {};
#pragma unroll
            for (int kk = 0; kk < KS; kk++)
#pragma unroll
                for (int np = 0; np < NT / 2; np++) {  // S = Q·Kᵀ, 16 keys at a time
                    uint32_t kb[4];
                    ldmatrix_x4(kb, cK + (np * 16 + ldsm_b_row(lane)) * LD + kk * 16 + ldsm_b_col(lane));
                    mma_bf16_16816(s[2 * np], qf[kk], kb[0], kb[1]);
                    mma_bf16_16816(s[2 * np + 1], qf[kk], kb[2], kb[3]);
                }
            const bool mask = attn_any_masked(key0 + ATTN_TILE - 1, w_lo);
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float x = s[n][e] * scale_log2;
                    if (mask && key0 + n * 8 + mma_acc_col(lane, e) > t_row[e >> 1]) x = -INFINITY;
                    s[n][e] = x;
                    mx[e >> 1] = fmaxf(mx[e >> 1], x);
                }
            float corr[2], m_use[2];
#pragma unroll
            for (int r = 0; r < 2; r++) {  // the 4 lanes of a quad share a row
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                float m_new = fmaxf(m_run[r], mx[r]);
                m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet stays at 0
                corr[r] = exp2f(m_run[r] - m_use[r]);
                m_run[r] = m_new;
                l_run[r] *= corr[r];
            }
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    s[n][e] = exp2f(s[n][e] - m_use[e >> 1]);
                    l_run[e >> 1] += s[n][e];
                }
#pragma unroll
            for (int n = 0; n < HDIM / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) o[n][e] *= corr[e >> 1];
#pragma unroll
            for (int kk = 0; kk < NT / 2; kk++) {  // O += P·V, 16 keys at a time
                uint32_t pa[4];
                acc_to_a(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
                for (int dp = 0; dp < HDIM / 16; dp++) {
                    uint32_t vb[4];
                    ldmatrix_x4_trans(vb, cV + (kk * 16 + ldsm_a_row(lane)) * LD + dp * 16 + ldsm_a_col(lane));
                    mma_bf16_16816(o[2 * dp], pa, vb[0], vb[1]);
                    mma_bf16_16816(o[2 * dp + 1], pa, vb[2], vb[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
        l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
        if (!valid[r]) continue;
        int h = g * group + hoff[r];
        float inv = 1.f / l_run[r];  // ≥ 1: the row's maximum contributes exp2(0)
        __nv_bfloat16* orow = out + attn_index(b, t_row[r], h, T, H, HDIM);
#pragma unroll
        for (int n = 0; n < HDIM / 8; n++)
            *(uint32_t*)(orow + n * 8 + mma_acc_col(lane, 0)) = pack_bf16(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        if ((lane & 3) == 0) lse[attn_lse_index(b, h, t_row[r], T, H)] = (m_run[r] + log2f(l_run[r])) * ATTN_LN2;
    }
}

// Backward (1): D[b,h,t] = Σ_i dO·O, one row per HDIM/8 lanes, 16 bytes each, reduced by shuffles.
template <int HDIM>
__global__ void attention_backward_rowdot_kernel(float* D, const __nv_bfloat16* dout, const __nv_bfloat16* out, size_t rows, int T, int H) {
    constexpr int LANES = HDIM / 8;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x, row = idx / LANES;
    float s = 0.f;
    if (row < rows) {
        uint4 a = *(const uint4*)(dout + idx * 8), c = *(const uint4*)(out + idx * 8);
        const __nv_bfloat162* a2 = (const __nv_bfloat162*)&a;
        const __nv_bfloat162* c2 = (const __nv_bfloat162*)&c;
#pragma unroll
        for (int x = 0; x < 4; x++) {
            float2 fa = __bfloat1622float2(a2[x]), fc = __bfloat1622float2(c2[x]);
            s += fa.x * fc.x + fa.y * fc.y;
        }
    }
    for (int off = LANES / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (row < rows && idx % LANES == 0) D[attn_row_lse_index(row, T, H)] = s;
}

// Backward (2): dQ += (P ⊙ (dP − D))·K/√hd with P = exp(S/√hd − lse), dP = dO·Vᵀ, over the key
// tiles up to the diagonal. Grid (query tiles, Hk, B). Shared: Q, dO tiles, two stages of K, V.
template <int HDIM>
__global__ void __launch_bounds__(ATTN_THREADS) attention_backward_dq_kernel(__nv_bfloat16* dq, const __nv_bfloat16* dout,
                                                                             const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                                             const __nv_bfloat16* v, const float* lse, const float* D,
                                                                             int T, int H, int Hk, float scale_log2, float scale) {
    constexpr int LD = HDIM + ATTN_PAD, KS = HDIM / 16, NT = ATTN_TILE / 8, TILE = ATTN_TILE * LD;
    extern __shared__ uint4 attn_smem[];
    __nv_bfloat16* sQ = (__nv_bfloat16*)attn_smem;
    __nv_bfloat16* sdO = sQ + TILE;
    __nv_bfloat16* sK = sdO + TILE;     // stage s at sK + s·TILE
    __nv_bfloat16* sV = sK + 2 * TILE;
    const int group = H / Hk, positions = attn_tile_positions(ATTN_TILE, group);
    const int i = gridDim.x - 1 - blockIdx.x;
    const int g = blockIdx.y, b = blockIdx.z, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n_kt = attn_key_tiles(i, positions, T, ATTN_TILE);
    int w_lo, w_hi;
    attn_row_positions(i, warp * 16, 16, positions, group, &w_lo, &w_hi);
    int t_row[2];
    float lse2[2], dsum[2];  // padding rows: lse = +∞ makes P = 0
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int hoff;
        bool valid = attn_packed_row(i, warp * 16 + mma_acc_row(lane, 2 * r), positions, group, T, &t_row[r], &hoff);
        size_t at = valid ? attn_lse_index(b, g * group + hoff, t_row[r], T, H) : 0;
        lse2[r] = valid ? lse[at] * ATTN_LOG2E : INFINITY;
        dsum[r] = valid ? D[at] : 0.f;
    }

    attn_load_query_tile<ATTN_TILE, HDIM>(sQ, q, b, i, g, positions, group, T, H);
    attn_load_query_tile<ATTN_TILE, HDIM>(sdO, dout, b, i, g, positions, group, T, H);
    attn_load_key_tile<HDIM>(sK, k, b, 0, g, T, Hk);
    attn_load_key_tile<HDIM>(sV, v, b, 0, g, T, Hk);
    cp_async_commit();

    uint32_t qf[KS][4];  // this warp's Q rows as A operands (its dO rows are read per use: fewer registers)
    float acc[HDIM / 8][4] = {};
    for (int j = 0; j < n_kt; j++) {
        if (j + 1 < n_kt) {
            attn_load_key_tile<HDIM>(sK + ((j + 1) & 1) * TILE, k, b, (j + 1) * ATTN_TILE, g, T, Hk);
            attn_load_key_tile<HDIM>(sV + ((j + 1) & 1) * TILE, v, b, (j + 1) * ATTN_TILE, g, T, Hk);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (j == 0)
#pragma unroll
            for (int kk = 0; kk < KS; kk++) ldmatrix_x4(qf[kk], sQ + (warp * 16 + ldsm_a_row(lane)) * LD + kk * 16 + ldsm_a_col(lane));
        const __nv_bfloat16* cK = sK + (j & 1) * TILE;
        const __nv_bfloat16* cV = sV + (j & 1) * TILE;
        const int key0 = j * ATTN_TILE;
        if (!attn_all_masked(key0, w_hi)) {
            float s[NT][4] = {}, dp[NT][4] = {};
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                uint32_t df[4];
                ldmatrix_x4(df, sdO + (warp * 16 + ldsm_a_row(lane)) * LD + kk * 16 + ldsm_a_col(lane));
#pragma unroll
                for (int np = 0; np < NT / 2; np++) {  // S = Q·Kᵀ and dP = dO·Vᵀ
                    uint32_t kb[4], vb[4];
                    ldmatrix_x4(kb, cK + (np * 16 + ldsm_b_row(lane)) * LD + kk * 16 + ldsm_b_col(lane));
                    ldmatrix_x4(vb, cV + (np * 16 + ldsm_b_row(lane)) * LD + kk * 16 + ldsm_b_col(lane));
                    mma_bf16_16816(s[2 * np], qf[kk], kb[0], kb[1]);
                    mma_bf16_16816(s[2 * np + 1], qf[kk], kb[2], kb[3]);
                    mma_bf16_16816(dp[2 * np], df, vb[0], vb[1]);
                    mma_bf16_16816(dp[2 * np + 1], df, vb[2], vb[3]);
                }
            }
            const bool mask = attn_any_masked(key0 + ATTN_TILE - 1, w_lo);
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {  // s becomes dS·√hd = P ⊙ (dP − D)
                    bool hidden = mask && key0 + n * 8 + mma_acc_col(lane, e) > t_row[e >> 1];
                    float p = hidden ? 0.f : exp2f(s[n][e] * scale_log2 - lse2[e >> 1]);
                    s[n][e] = p * (dp[n][e] - dsum[e >> 1]);
                }
#pragma unroll
            for (int kk = 0; kk < NT / 2; kk++) {  // dQ += dS·K, 16 keys at a time
                uint32_t sa[4];
                acc_to_a(sa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
                for (int dd = 0; dd < HDIM / 16; dd++) {
                    uint32_t kb[4];
                    ldmatrix_x4_trans(kb, cK + (kk * 16 + ldsm_a_row(lane)) * LD + dd * 16 + ldsm_a_col(lane));
                    mma_bf16_16816(acc[2 * dd], sa, kb[0], kb[1]);
                    mma_bf16_16816(acc[2 * dd + 1], sa, kb[2], kb[3]);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int t, hoff;
        if (!attn_packed_row(i, warp * 16 + mma_acc_row(lane, 2 * r), positions, group, T, &t, &hoff)) continue;
        __nv_bfloat16* row = dq + attn_index(b, t, g * group + hoff, T, H, HDIM);
#pragma unroll
        for (int n = 0; n < HDIM / 8; n++) {  // add into dq: this thread owns these two elements
            uint32_t* p = (uint32_t*)(row + n * 8 + mma_acc_col(lane, 0));
            float2 old = __bfloat1622float2(*(const __nv_bfloat162*)p);
            *p = pack_bf16(old.x + acc[n][2 * r] * scale, old.y + acc[n][2 * r + 1] * scale);
        }
    }
}

// Backward (3): dV += Pᵀ·dO and dK += dSᵀ·Q/√hd for one tile of 64 keys of kv head g, summed over
// every packed query row (all heads of the group) at or after the keys. Each warp owns 16 keys and
// works on transposed tiles (Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ), so its sums stay in its own registers.
// Grid (key tiles, Hk, B). Shared: K, V tiles, two stages of Q, dO tiles and their lse, D.
template <int HDIM, int BQ>
__global__ void __launch_bounds__(ATTN_THREADS) attention_backward_dkdv_kernel(__nv_bfloat16* dk, __nv_bfloat16* dv,
                                                                               const __nv_bfloat16* dout, const __nv_bfloat16* q,
                                                                               const __nv_bfloat16* k, const __nv_bfloat16* v,
                                                                               const float* lse, const float* D,
                                                                               int T, int H, int Hk, float scale_log2, float scale) {
    constexpr int LD = HDIM + ATTN_PAD, KS = HDIM / 16, NT = BQ / 8, KTILE = ATTN_TILE * LD, QTILE = BQ * LD;
    extern __shared__ uint4 attn_smem[];
    __nv_bfloat16* sK = (__nv_bfloat16*)attn_smem;
    __nv_bfloat16* sV = sK + KTILE;
    __nv_bfloat16* sQ = sV + KTILE;     // stage s at sQ + s·QTILE
    __nv_bfloat16* sdO = sQ + 2 * QTILE;
    float* sL = (float*)(sdO + 2 * QTILE);  // stage s at sL + s·BQ: lse·log2(e) of the packed rows
    float* sD = sL + 2 * BQ;                // stage s at sD + s·BQ
    const int group = H / Hk, positions = attn_tile_positions(BQ, group);
    const int j = blockIdx.x;  // key tile: the first ones see the most query tiles, so start first
    const int g = blockIdx.y, b = blockIdx.z, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n_qt = attn_query_tiles(T, positions), i0 = attn_first_query_tile(j, ATTN_TILE, positions);
    const int kw0 = j * ATTN_TILE + warp * 16;  // this warp's first key

    // lse and D of query tile i's packed rows; padding rows get lse = +∞ (so P = 0) and D = 0
    auto load_stats = [&](float* dl, float* dd, int i) {
        for (int m = threadIdx.x; m < BQ; m += ATTN_THREADS) {
            int t, hoff;
            bool ok = attn_packed_row(i, m, positions, group, T, &t, &hoff);
            size_t at = ok ? attn_lse_index(b, g * group + hoff, t, T, H) : 0;
            dl[m] = ok ? lse[at] * ATTN_LOG2E : INFINITY;
            dd[m] = ok ? D[at] : 0.f;
        }
    };
    attn_load_key_tile<HDIM>(sK, k, b, j * ATTN_TILE, g, T, Hk);
    attn_load_key_tile<HDIM>(sV, v, b, j * ATTN_TILE, g, T, Hk);
    attn_load_query_tile<BQ, HDIM>(sQ, q, b, i0, g, positions, group, T, H);
    attn_load_query_tile<BQ, HDIM>(sdO, dout, b, i0, g, positions, group, T, H);
    load_stats(sL, sD, i0);
    cp_async_commit();

    float dka[HDIM / 8][4] = {}, dva[HDIM / 8][4] = {};
    for (int i = i0; i < n_qt; i++) {
        const int st = (i - i0) & 1;
        if (i + 1 < n_qt) {
            attn_load_query_tile<BQ, HDIM>(sQ + (st ^ 1) * QTILE, q, b, i + 1, g, positions, group, T, H);
            attn_load_query_tile<BQ, HDIM>(sdO + (st ^ 1) * QTILE, dout, b, i + 1, g, positions, group, T, H);
            load_stats(sL + (st ^ 1) * BQ, sD + (st ^ 1) * BQ, i + 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const __nv_bfloat16* cQ = sQ + st * QTILE;
        const __nv_bfloat16* cdO = sdO + st * QTILE;
        const float* cL = sL + st * BQ;
        const float* cD = sD + st * BQ;
        int t_lo, t_hi;
        attn_row_positions(i, 0, BQ, positions, group, &t_lo, &t_hi);
        if (!attn_all_masked(kw0, t_hi)) {
            float s[NT][4] = {}, dp[NT][4] = {};
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {  // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ, A operands straight from shared memory
                uint32_t ka[4], va[4];
                ldmatrix_x4(ka, sK + (warp * 16 + ldsm_a_row(lane)) * LD + kk * 16 + ldsm_a_col(lane));
                ldmatrix_x4(va, sV + (warp * 16 + ldsm_a_row(lane)) * LD + kk * 16 + ldsm_a_col(lane));
#pragma unroll
                for (int np = 0; np < NT / 2; np++) {
                    uint32_t qb[4], ob[4];
                    ldmatrix_x4(qb, cQ + (np * 16 + ldsm_b_row(lane)) * LD + kk * 16 + ldsm_b_col(lane));
                    ldmatrix_x4(ob, cdO + (np * 16 + ldsm_b_row(lane)) * LD + kk * 16 + ldsm_b_col(lane));
                    mma_bf16_16816(s[2 * np], ka, qb[0], qb[1]);
                    mma_bf16_16816(s[2 * np + 1], ka, qb[2], qb[3]);
                    mma_bf16_16816(dp[2 * np], va, ob[0], ob[1]);
                    mma_bf16_16816(dp[2 * np + 1], va, ob[2], ob[3]);
                }
            }
            const bool mask = attn_any_masked(kw0 + 15, t_lo);
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {  // rows are keys, columns packed query rows
                    int c = n * 8 + mma_acc_col(lane, e);
                    bool hidden = mask && kw0 + mma_acc_row(lane, e) > i * positions + c / group;
                    float p = hidden ? 0.f : exp2f(s[n][e] * scale_log2 - cL[c]);
                    s[n][e] = p;                      // Pᵀ
                    dp[n][e] = p * (dp[n][e] - cD[c]);  // dSᵀ·√hd
                }
#pragma unroll
            for (int kk = 0; kk < NT / 2; kk++) {  // dV += Pᵀ·dO and dK += dSᵀ·Q, 16 query rows at a time
                uint32_t pa[4], sa[4];
                acc_to_a(pa, s[2 * kk], s[2 * kk + 1]);
                acc_to_a(sa, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
                for (int dd = 0; dd < HDIM / 16; dd++) {
                    uint32_t ob[4], qb[4];
                    ldmatrix_x4_trans(ob, cdO + (kk * 16 + ldsm_a_row(lane)) * LD + dd * 16 + ldsm_a_col(lane));
                    ldmatrix_x4_trans(qb, cQ + (kk * 16 + ldsm_a_row(lane)) * LD + dd * 16 + ldsm_a_col(lane));
                    mma_bf16_16816(dva[2 * dd], pa, ob[0], ob[1]);
                    mma_bf16_16816(dva[2 * dd + 1], pa, ob[2], ob[3]);
                    mma_bf16_16816(dka[2 * dd], sa, qb[0], qb[1]);
                    mma_bf16_16816(dka[2 * dd + 1], sa, qb[2], qb[3]);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int key = kw0 + mma_acc_row(lane, 2 * r);
        if (key >= T) continue;
        __nv_bfloat16* krow = dk + attn_index(b, key, g, T, Hk, HDIM);
        __nv_bfloat16* vrow = dv + attn_index(b, key, g, T, Hk, HDIM);
#pragma unroll
        for (int n = 0; n < HDIM / 8; n++) {  // add into dk, dv: this thread owns these elements
            uint32_t* pk = (uint32_t*)(krow + n * 8 + mma_acc_col(lane, 0));
            uint32_t* pv = (uint32_t*)(vrow + n * 8 + mma_acc_col(lane, 0));
            float2 ok = __bfloat1622float2(*(const __nv_bfloat162*)pk), ov = __bfloat1622float2(*(const __nv_bfloat162*)pv);
            *pk = pack_bf16(ok.x + dka[n][2 * r] * scale, ok.y + dka[n][2 * r + 1] * scale);
            *pv = pack_bf16(ov.x + dva[n][2 * r], ov.y + dva[n][2 * r + 1]);
        }
    }
}

// Query rows per dK/dV query tile: 64, or 32 at hd 128 to keep dK, dV, Sᵀ, dPᵀ in registers.
template <int HDIM> static constexpr int attn_dkdv_rows() { return HDIM <= 64 ? 64 : 32; }
template <int HDIM> static size_t attn_forward_smem() { return 5 * (size_t)ATTN_TILE * (HDIM + ATTN_PAD) * sizeof(__nv_bfloat16); }
template <int HDIM> static size_t attn_dq_smem() { return 6 * (size_t)ATTN_TILE * (HDIM + ATTN_PAD) * sizeof(__nv_bfloat16); }
template <int HDIM> static size_t attn_dkdv_smem() {
    return (2 * (size_t)ATTN_TILE + 4 * (size_t)attn_dkdv_rows<HDIM>()) * (HDIM + ATTN_PAD) * sizeof(__nv_bfloat16) +
           4 * (size_t)attn_dkdv_rows<HDIM>() * sizeof(float);
}

// Shapes the kernels handle, checked at every call (cheap next to the launch).
static void attention_check(const char* op, const void* const* ptrs, const char* const* names, int n_ptrs, int B, int T, int H, int Hk, int hd) {
    if (hd != 16 && hd != 32 && hd != 64 && hd != 128) fail("%s: head dim %d, expected 16, 32, 64 or 128", op, hd);
    if (B < 0 || T < 0 || H < 1 || Hk < 1 || H % Hk) fail("%s: B=%d T=%d H=%d Hk=%d, expected H a multiple of Hk", op, B, T, H, Hk);
    if (H / Hk > (hd == 128 ? 32 : ATTN_TILE)) fail("%s: %d query heads per kv head, at most %d fit a query tile", op, H / Hk, hd == 128 ? 32 : ATTN_TILE);
    if (B > 65535 || Hk > 65535) fail("%s: B=%d Hk=%d, at most 65535 (grid dimensions)", op, B, Hk);
    for (int p = 0; p < n_ptrs; p++)
        if ((uintptr_t)ptrs[p] % 16) fail("%s: %s is not 16-byte aligned (cp.async and vector loads need it)", op, names[p]);
}

template <int HDIM>
static void attention_forward_hd(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                 const __nv_bfloat16* v, int B, int T, int H, int Hk) {
    size_t smem = attn_forward_smem<HDIM>();
    static bool smem_set = false;  // beyond 48 KB a kernel must opt in, once per process
    if (!smem_set) {
        cudaCheck(cudaFuncSetAttribute(attention_forward_kernel<HDIM>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        smem_set = true;
    }
    dim3 grid(attn_query_tiles(T, attn_tile_positions(ATTN_TILE, H / Hk)), Hk, B);
    attention_forward_kernel<HDIM><<<grid, ATTN_THREADS, smem>>>(out, lse, q, k, v, T, H, Hk, ATTN_LOG2E / sqrtf((float)HDIM));
    cudaCheck(cudaGetLastError());
}
static void attention_forward(Cuda, __nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                              const __nv_bfloat16* v, int B, int T, int H, int Hk, int hd) {
    const void* ptrs[] = {out, q, k, v};
    const char* names[] = {"out", "q", "k", "v"};
    attention_check("attention_forward", ptrs, names, 4, B, T, H, Hk, hd);
    if (B == 0 || T == 0) return;
    switch (hd) {
        case 16: attention_forward_hd<16>(out, lse, q, k, v, B, T, H, Hk); break;
        case 32: attention_forward_hd<32>(out, lse, q, k, v, B, T, H, Hk); break;
        case 64: attention_forward_hd<64>(out, lse, q, k, v, B, T, H, Hk); break;
        default: attention_forward_hd<128>(out, lse, q, k, v, B, T, H, Hk); break;
    }
}

// D = rowsum(dO ⊙ O), [B,H,T]: scratch grown on demand and kept for the process (as llm.c keeps
// its cuDNN workspace). Growing frees and allocates, so the first call must precede graph capture.
static float* g_attention_D = nullptr;
static size_t g_attention_D_cap = 0;

template <int HDIM>
static void attention_backward_hd(__nv_bfloat16* dq, __nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout,
                                  const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                  const __nv_bfloat16* out, const float* lse, int B, int T, int H, int Hk) {
    constexpr int BQ = attn_dkdv_rows<HDIM>();
    size_t smem_dq = attn_dq_smem<HDIM>(), smem_kv = attn_dkdv_smem<HDIM>();
    static bool smem_set = false;
    if (!smem_set) {
        cudaCheck(cudaFuncSetAttribute(attention_backward_dq_kernel<HDIM>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_dq));
        cudaCheck(cudaFuncSetAttribute(attention_backward_dkdv_kernel<HDIM, BQ>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_kv));
        smem_set = true;
    }
    float scale = 1.f / sqrtf((float)HDIM), scale_log2 = ATTN_LOG2E * scale;
    size_t rows = (size_t)B * T * H, threads = rows * (HDIM / 8);
    attention_backward_rowdot_kernel<HDIM><<<(unsigned)((threads + 255) / 256), 256>>>(g_attention_D, dout, out, rows, T, H);
    cudaCheck(cudaGetLastError());
    int group = H / Hk;
    dim3 grid_q(attn_query_tiles(T, attn_tile_positions(ATTN_TILE, group)), Hk, B);
    attention_backward_dq_kernel<HDIM><<<grid_q, ATTN_THREADS, smem_dq>>>(dq, dout, q, k, v, lse, g_attention_D, T, H, Hk, scale_log2, scale);
    cudaCheck(cudaGetLastError());
    dim3 grid_k((T + ATTN_TILE - 1) / ATTN_TILE, Hk, B);
    attention_backward_dkdv_kernel<HDIM, BQ><<<grid_k, ATTN_THREADS, smem_kv>>>(dk, dv, dout, q, k, v, lse, g_attention_D, T, H, Hk, scale_log2, scale);
    cudaCheck(cudaGetLastError());
}
static void attention_backward(Cuda, __nv_bfloat16* dq, __nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout,
                               const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                               const __nv_bfloat16* out, const float* lse, int B, int T, int H, int Hk, int hd) {
    const void* ptrs[] = {dq, dk, dv, dout, q, k, v, out};
    const char* names[] = {"dq", "dk", "dv", "dout", "q", "k", "v", "out"};
    attention_check("attention_backward", ptrs, names, 8, B, T, H, Hk, hd);
    if (B == 0 || T == 0) return;
    size_t need = (size_t)B * H * T;
    if (need > g_attention_D_cap) {
        if (g_attention_D) cudaCheck(cudaFree(g_attention_D));
        cudaCheck(cudaMalloc(&g_attention_D, need * sizeof(float)));
        g_attention_D_cap = need;
    }
    switch (hd) {
        case 16: attention_backward_hd<16>(dq, dk, dv, dout, q, k, v, out, lse, B, T, H, Hk); break;
        case 32: attention_backward_hd<32>(dq, dk, dv, dout, q, k, v, out, lse, B, T, H, Hk); break;
        case 64: attention_backward_hd<64>(dq, dk, dv, dout, q, k, v, out, lse, B, T, H, Hk); break;
        default: attention_backward_hd<128>(dq, dk, dv, dout, q, k, v, out, lse, B, T, H, Hk); break;
    }
}
