// The CUDA emulator itself (tests/emu): the fidelity of the emulated instructions, and each check a
// GPU does not give, shown to catch a defect planted in a small kernel written for it. A planted
// defect ends the program (as it must in the real tests), so each runs in a child process whose
// exit status and message are checked.
#ifdef PGOLF_EMU
#include <sys/wait.h>

// Runs `f` in a child process; returns its exit status (or 128 + signal) and everything it printed.
static int emu_run_child(const std::function<void()>& f, std::string* out) {
    fflush(stdout);
    fflush(stderr);
    int fd[2];
    if (pipe(fd)) throw TestFailure("pipe failed");
    pid_t pid = fork();
    if (pid < 0) throw TestFailure("fork failed");
    if (pid == 0) {
        dup2(fd[1], 1);
        dup2(fd[1], 2);
        close(fd[0]);
        f();
        fflush(stdout);
        _exit(0);
    }
    close(fd[1]);
    char buf[4096];
    ssize_t k;
    out->clear();
    while ((k = read(fd[0], buf, sizeof buf)) > 0) out->append(buf, (size_t)k);
    close(fd[0]);
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}
// `f` must end the program with a message containing every one of `needles`.
static void emu_expect_caught(const char* what, const std::function<void()>& f,
                              std::initializer_list<const char*> needles) {
    std::string out;
    int st = emu_run_child(f, &out);
    CHECK_MSG(st != 0, "%s: not caught (exit 0), output: %s", what, out.c_str());
    for (const char* n : needles)
        CHECK_MSG(out.find(n) != std::string::npos, "%s: message lacks \"%s\": %s", what, n, out.c_str());
}
// `f` must run cleanly (the same kernel without its defect: no false alarm).
static void emu_expect_clean(const char* what, const std::function<void()>& f) {
    std::string out;
    int st = emu_run_child(f, &out);
    CHECK_MSG(st == 0, "%s: exit %d without a defect: %s", what, st, out.c_str());
}
static void emu_sync() { cudaCheck(cudaStreamSynchronize(cuda_ctx().stream)); }

// --- fidelity: mma.sync m16n8k16 and ldmatrix against the PTX ISA fragment figures ----------------------
// The figures ("Matrix Fragments for mma.m16n8k16 with floating point type", "ldmatrix fragment
// layout"), as a table: each register of each lane holds two 16-bit elements (lower column in the
// low half); groupID = lane >> 2, threadID_in_group = lane % 4.
//   A (row-major 16×16): register i at row groupID + A_ROW[i], cols threadID_in_group·2 + A_COL[i] + {0,1}
//   B (16×8, "col"):     register i at rows (k) threadID_in_group·2 + B_ROW[i] + {0,1}, col groupID
//   C/D (16×8 fp32):     element e at row groupID + C_ROW[e], col threadID_in_group·2 + C_COL[e]
//   ldmatrix .x4: matrix i, lane l holds row l/4, cols 2·(l%4) + {0,1}; .trans: the transpose's
static const int A_ROW[4] = {0, 8, 0, 8}, A_COL[4] = {0, 0, 8, 8};
static const int B_ROW[2] = {0, 8};
static const int C_ROW[4] = {0, 0, 8, 8}, C_COL[4] = {0, 1, 0, 1};

__global__ void emu_mma_kernel(float* d, const uint32_t* a, const uint32_t* b) {
    int l = threadIdx.x;
    uint32_t ar[4] = {a[l * 4], a[l * 4 + 1], a[l * 4 + 2], a[l * 4 + 3]};
    float acc[4] = {d[l * 4], d[l * 4 + 1], d[l * 4 + 2], d[l * 4 + 3]};
    mma_bf16_16816(acc, ar, b[l * 2], b[l * 2 + 1]);
    for (int e = 0; e < 4; e++) d[l * 4 + e] = acc[e];
}
TEST(emu_mma_fragments_match_ptx_figure) {
    Rng rng(5);
    float A[16][16], B[16][8], C[16][8];
    std::vector<uint32_t> a(128), b(64);
    std::vector<float> d(128);
    for (auto& r : A) for (float& x : r) x = round_to_bf16((float)rng.normal());
    for (auto& r : B) for (float& x : r) x = round_to_bf16((float)rng.normal());
    for (auto& r : C) for (float& x : r) x = (float)rng.normal();
    for (int l = 0; l < 32; l++) {
        int g = l >> 2, t = l % 4;
        for (int i = 0; i < 4; i++)
            a[l * 4 + i] = float_to_bf16(A[g + A_ROW[i]][2 * t + A_COL[i]]) |
                           (uint32_t)float_to_bf16(A[g + A_ROW[i]][2 * t + A_COL[i] + 1]) << 16;
        for (int i = 0; i < 2; i++)
            b[l * 2 + i] = float_to_bf16(B[2 * t + B_ROW[i]][g]) | (uint32_t)float_to_bf16(B[2 * t + B_ROW[i] + 1][g])
                                                                       << 16;
        for (int e = 0; e < 4; e++) d[l * 4 + e] = C[g + C_ROW[e]][2 * t + C_COL[e]];
    }
    GpuBuf gd(512), ga(512), gb(256);
    to_device(Cuda{}, gd.f(), d.data(), 128);
    to_device(Cuda{}, (uint32_t*)ga.p, a.data(), 128);
    to_device(Cuda{}, (uint32_t*)gb.p, b.data(), 64);
    PGOLF_LAUNCH(1, 32, 0, cuda_ctx().stream, emu_mma_kernel)(gd.f(), (const uint32_t*)ga.p, (const uint32_t*)gb.p);
    std::vector<float> got(128);
    to_host(Cuda{}, got.data(), gd.f(), 128);
    for (int l = 0; l < 32; l++)
        for (int e = 0; e < 4; e++) {
            int r = (l >> 2) + C_ROW[e], c = 2 * (l % 4) + C_COL[e];
            double want = C[r][c];
            for (int k = 0; k < 16; k++) want += (double)A[r][k] * B[k][c];
            CHECK_CLOSE(got[l * 4 + e], want, 1e-5, 1e-5);
            // and train_gpt.cu's own accumulator layout helpers agree with the figure
            CHECK(mma_acc_row(l, e) == r && mma_acc_col(l, e) == c);
        }
}

__global__ void emu_ldmatrix_kernel(uint32_t* out, const __nv_bfloat16* src, bool trans) {
    __nv_bfloat16* sh = dynamic_smem<__nv_bfloat16>();  // 4 matrices 8×8, row stride 8 (16 bytes)
    for (int i = threadIdx.x; i < 256; i += 32) sh[i] = src[i];
    __syncwarp();
    uint32_t r[4];
    const __nv_bfloat16* row = sh + (threadIdx.x / 8) * 64 + (threadIdx.x % 8) * 8;  // lane l: row l%8 of matrix l/8
    if (trans) ldmatrix_x4_trans(r, row);
    else ldmatrix_x4(r, row);
    for (int i = 0; i < 4; i++) out[threadIdx.x * 4 + i] = r[i];
}
TEST(emu_ldmatrix_fragments_match_ptx_figure) {
    std::vector<uint16_t> m(256);
    for (int i = 0; i < 256; i++) m[i] = (uint16_t)(i + 1);  // element (matrix q, row r, col c) = 64q + 8r + c + 1
    GpuBuf src(512), out(512);
    to_device(Cuda{}, (uint16_t*)src.p, m.data(), 256);
    for (int trans = 0; trans < 2; trans++) {
        PGOLF_LAUNCH(1, 32, 512, cuda_ctx().stream, emu_ldmatrix_kernel)((uint32_t*)out.p, src.b(), trans != 0);
        std::vector<uint32_t> got(128);
        to_host(Cuda{}, got.data(), (uint32_t*)out.p, 128);
        for (int l = 0; l < 32; l++)
            for (int q = 0; q < 4; q++)
                for (int h = 0; h < 2; h++) {
                    int r = l / 4, c = 2 * (l % 4) + h;
                    int want = trans ? 64 * q + 8 * c + r + 1 : 64 * q + 8 * r + c + 1;
                    CHECK_MSG((int)(got[l * 4 + q] >> 16 * h & 0xffff) == want,
                              "ldmatrix%s lane %d matrix %d half %d: got %u want %d", trans ? ".trans" : "", l, q, h,
                              got[l * 4 + q] >> 16 * h & 0xffff, want);
                }
    }
}

TEST(emu_bf16_rounding_matches_cuda_bf16_h) {
    // the emulated kernels convert with cuda_bf16.h's own host code: round to nearest, ties to even
    uint32_t cases[] = {0x3f808000u, 0x3f818000u, 0x3f80ffffu, 0x7f7fffffu, 0x00000001u, 0xff800000u};
    for (uint32_t u : cases) {
        float f;
        memcpy(&f, &u, 4);
        CHECK(__bfloat16_as_ushort(__float2bfloat16(f)) == float_to_bf16(f));
    }
}

// --- planted defects --------------------------------------------------------------------------------------
// Two threads touch the same shared byte between barriers, one writing (fixed: a barrier between).
__global__ void emu_planted_race_kernel(float* out, bool barrier) {
    float* sh = dynamic_smem<float>();
    if (threadIdx.x == 0) sh[3] = 0.0f;  // dynamic shared offset 12
    __syncthreads();
    if (threadIdx.x == 33) sh[3] = 1.0f;
    if (barrier) __syncthreads();
    if (threadIdx.x == 70) out[0] = sh[3];  // before or after thread 33's write: a race either way
}
TEST(emu_catches_shared_race) {
    GpuBuf out(4);
    auto run = [&](bool barrier) {
        return [&, barrier]() {
            PGOLF_LAUNCH(1, 96, 16, cuda_ctx().stream, emu_planted_race_kernel)(out.f(), barrier);
            emu_sync();
        };
    };
    emu_expect_caught("race", run(false),
                      {"emu_planted_race_kernel", "dynamic shared offset 12", "thread 33", "thread 70", "race"});
    emu_expect_clean("race with a barrier", run(true));
}
// Within one warp: lane 1 reads what lane 0 wrote, ordered only by __syncwarp (fixed: with it).
__global__ void emu_planted_warp_race_kernel(float* out, bool sync) {
    __shared__ float sh[32];
    sh[threadIdx.x] = 0.0f;
    __syncthreads();
    sh[threadIdx.x] = (float)threadIdx.x;
    if (sync) __syncwarp();
    out[threadIdx.x] = sh[threadIdx.x ^ 1];
}
TEST(emu_catches_warp_race) {
    GpuBuf out(128);
    auto run = [&](bool sync) {
        return [&, sync]() {
            PGOLF_LAUNCH(1, 32, 0, cuda_ctx().stream, emu_planted_warp_race_kernel)(out.f(), sync);
            emu_sync();
        };
    };
    emu_expect_caught("warp race", run(false), {"emu_planted_warp_race_kernel", "static shared offset", "race"});
    emu_expect_clean("warp race with __syncwarp", run(true));
}
// Reads a shared value no thread of this block wrote (block 1 reads what only block 0 wrote).
__global__ void emu_planted_uninit_kernel(float* out, bool init) {
    __shared__ float sh[64];
    if (blockIdx.x == 0 || init) sh[threadIdx.x] = 2.0f;
    __syncthreads();
    out[blockIdx.x * 64 + threadIdx.x] = sh[63 - threadIdx.x];
}
TEST(emu_catches_uninitialized_shared_read) {
    GpuBuf out(512);
    auto run = [&](bool init) {
        return [&, init]() {
            PGOLF_LAUNCH(2, 64, 0, cuda_ctx().stream, emu_planted_uninit_kernel)(out.f(), init);
            emu_sync();
        };
    };
    emu_expect_caught("uninitialized read", run(false),
                      {"emu_planted_uninit_kernel", "block (1,0,0)", "never written in this block"});
    emu_expect_clean("initialized read", run(true));
}
// __syncthreads skipped by the threads that returned early.
__global__ void emu_planted_barrier_kernel(float* out, int active) {
    if ((int)threadIdx.x >= active) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}
TEST(emu_catches_barrier_not_reached) {
    GpuBuf out(256);
    auto run = [&](int active) {
        return [&, active]() {
            PGOLF_LAUNCH(1, 64, 0, cuda_ctx().stream, emu_planted_barrier_kernel)(out.f(), active);
            emu_sync();
        };
    };
    emu_expect_caught("barrier", run(40),
                      {"emu_planted_barrier_kernel", "__syncthreads", "every thread of the block must reach it"});
    emu_expect_clean("barrier reached by all", run(64));
}
// A full-mask shuffle that only half the warp executes; and two halves with different masks.
__global__ void emu_planted_mask_kernel(float* out, int mode) {
    float v = (float)threadIdx.x;
    if (mode == 0 && threadIdx.x >= 16) return;
    unsigned mask = mode == 1 && threadIdx.x < 16 ? 0x0000ffffu : 0xffffffffu;
    out[threadIdx.x] = __shfl_xor_sync(mask, v, 1);
}
TEST(emu_catches_collective_mask_mismatch) {
    GpuBuf out(128);
    auto run = [&](int mode) {
        return [&, mode]() {
            PGOLF_LAUNCH(1, 32, 0, cuda_ctx().stream, emu_planted_mask_kernel)(out.f(), mode);
            emu_sync();
        };
    };
    emu_expect_caught("exited lanes in the mask", run(0), {"emu_planted_mask_kernel", "__shfl_xor_sync", "0xffffffff"});
    emu_expect_caught("different masks", run(1), {"emu_planted_mask_kernel", "__shfl_xor_sync with mask"});
    emu_expect_clean("full warp", run(2));
}
// Warp 0 waits in __syncwarp for lanes that wait at __syncthreads: a deadlock.
__global__ void emu_planted_deadlock_kernel(float* out) {
    if (threadIdx.x < 16) __syncwarp();
    else __syncthreads();
    out[threadIdx.x] = 1.0f;
}
TEST(emu_catches_deadlock) {
    GpuBuf out(256);
    emu_expect_caught("deadlock", [&]() {
        PGOLF_LAUNCH(1, 64, 0, cuda_ctx().stream, emu_planted_deadlock_kernel)(out.f());
        emu_sync();
    }, {"emu_planted_deadlock_kernel", "__syncwarp"});
}
// Reads a cp.async destination before cp.async.wait_group.
__global__ void emu_planted_cp_async_kernel(float* out, const float* in, bool wait) {
    float* sh = dynamic_smem<float>();
    cp_async_16(sh + threadIdx.x * 4, in + threadIdx.x * 4, true);
    cp_async_commit();
    if (wait) cp_async_wait<0>();
    out[threadIdx.x] = sh[threadIdx.x * 4];
}
TEST(emu_catches_cp_async_without_wait) {
    GpuBuf out(128), in(512);
    auto run = [&](bool wait) {
        return [&, wait]() {
            PGOLF_LAUNCH(1, 32, 512, cuda_ctx().stream, emu_planted_cp_async_kernel)(out.f(), in.f(), wait);
            emu_sync();
        };
    };
    emu_expect_caught("cp.async", run(false), {"emu_planted_cp_async_kernel", "cp.async.wait_group missing"});
    emu_expect_clean("cp.async waited", run(true));
}
// One element past a cudaMalloc'd buffer: AddressSanitizer over the emulated build.
__global__ void emu_planted_oob_kernel(float* out, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = 1.0f;
}
TEST(emu_catches_global_out_of_bounds) {
    auto run = [](int n) {
        return [n]() {
            GpuBuf out(100 * sizeof(float));
            PGOLF_LAUNCH(1, 64, 0, cuda_ctx().stream, emu_planted_oob_kernel)(out.f(), n);
            emu_sync();
        };
    };
    emu_expect_caught("global out of bounds", run(101), {"heap-buffer-overflow"});
    emu_expect_clean("in bounds", run(100));
}

// --- the attention kernels run on the context stream, with scratch from the memory plan --------------------
// Captured into a CUDA graph (which refuses work on the legacy stream and allocations while capturing:
// cudaErrorStreamCaptureImplicit / cudaErrorStreamCaptureUnsupported on a GPU), then replayed: same bits.
TEST(emu_attention_runs_on_context_stream_with_planned_scratch) {
    const int B = 2, T = 70, H = 4, Hk = 2, hd = 32;
    size_t nq = (size_t)B * T * H * hd, nk = (size_t)B * T * Hk * hd, nl = (size_t)B * H * T;
    Rng rng(11);
    std::vector<double> q = cu_randn(nq, rng), k = cu_randn(nk, rng), v = cu_randn(nk, rng), dout = cu_randn(nq, rng);
    CU_UP(gq, bf16, q); CU_UP(gk, bf16, k); CU_UP(gv, bf16, v); CU_UP(gdo, bf16, dout);
    GpuBuf out(nq * 2), lse(nl * 4), dq(nq * 2), dk(nk * 2), dv(nk * 2);
    emu_expect_clean("attention captured in a graph", [&]() {
        auto step = [&]() {
            attention_forward(Cuda{}, out.b(), lse.f(), gq->b(), gk->b(), gv->b(), B, T, H, Hk, hd);
            attention_backward(Cuda{}, dq.b(), dk.b(), dv.b(), gdo->b(), gq->b(), gk->b(), gv->b(), out.b(), lse.f(), B,
                               T, H, Hk, hd);
        };
        auto grads = [&]() {
            std::vector<uint16_t> g(2 * nq + 2 * nk);
            to_host(Cuda{}, g.data(), (uint16_t*)out.p, nq);
            to_host(Cuda{}, g.data() + nq, (uint16_t*)dq.p, nq);
            to_host(Cuda{}, g.data() + 2 * nq, (uint16_t*)dk.p, nk);
            to_host(Cuda{}, g.data() + 2 * nq + nk, (uint16_t*)dv.p, nk);
            return g;
        };
        auto zero = [&]() { for (GpuBuf* b : {&out, &lse, &dq, &dk, &dv}) device_zero(Cuda{}, b->p, b->bytes); };
        Arena plan;  // run_cuda reserves the planned scratch before training (cuda_memory_plan carves the same)
        AttnBackwardScratch planned;
        carve_attention_backward_scratch(plan, planned, B, T, H, Hk, hd);
        cuda_scratch(plan.used);
        zero();
        size_t held = emu::allocated_bytes();
        step();
        if (emu::allocated_bytes() != held) { printf("attention outgrew its planned scratch\n"); _exit(1); }
        std::vector<uint16_t> direct = grads();
        cudaStream_t st = cuda_ctx().stream;
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        cudaCheck(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
        step();
        cudaCheck(cudaStreamEndCapture(st, &graph));
        cudaCheck(cudaGraphInstantiate(&exec, graph, 0));
        if (emu::allocated_bytes() != held) { printf("attention allocated device memory per call\n"); _exit(1); }
        zero();
        cudaCheck(cudaGraphLaunch(exec, st));
        cudaCheck(cudaStreamSynchronize(st));
        if (grads() != direct) { printf("the replayed graph gave other bits than the direct calls\n"); _exit(1); }
    });
}

// --- launch limits per target ------------------------------------------------------------------------
__global__ void emu_planted_launch_kernel(float* out) {
    if (threadIdx.x == 0) out[0] = dynamic_smem<float>()[0] = 1.0f;
}
TEST(emu_launch_limits_per_target) {
    GpuBuf out(4);
    auto launch = [&](const char* arch, unsigned threads, size_t smem, int optin) {
        return [&, arch, threads, smem, optin]() {
            emu::set_target(arch);
            if (optin)
                cudaCheck(cudaFuncSetAttribute(emu_planted_launch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               optin));
            PGOLF_LAUNCH(1, threads, smem, cuda_ctx().stream, emu_planted_launch_kernel)(out.f());
            emu_sync();
        };
    };
    emu_expect_caught("1025 threads", launch("sm_90a", 1025, 0, 0), {"emu_planted_launch_kernel", "block (1025,1,1)"});
    emu_expect_caught("over 48 KB without opt-in", launch("sm_90a", 32, 49153, 0),
                      {"emu_planted_launch_kernel", "49152 default"});
    emu_expect_clean("48 KB", launch("sm_80", 32, 49152, 0));
    emu_expect_clean("opt-in 200 KB on sm_90a", launch("sm_90a", 32, 200000, 200000));
    emu_expect_caught("opt-in 200 KB on sm_80", launch("sm_80", 32, 200000, 200000),
                      {"cudaFuncSetAttribute", "invalid argument"});
    emu_expect_caught("over sm_89's 99 KB", launch("sm_89", 32, 101377, 0),
                      {"emu_planted_launch_kernel", "101376", "sm_89"});
    emu_expect_clean("sm_89's 99 KB", launch("sm_89", 32, 101376, 101376));
}
#endif  // PGOLF_EMU
