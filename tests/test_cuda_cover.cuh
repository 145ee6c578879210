// The CUDA path's edge paths that the per-op tests in test_cuda.cuh do not reach at their shapes:
// grid-stride loops that go round their grid more than once, column reductions whose chunk count
// saturates at CHUNK_MAX, an embedding backward with one very long run — each against the CPU
// reference. Metrics as in test_cuda.cuh (band(tol)).

#ifdef PGOLF_CUDA

// Every grid-stride kernel (those launched with grid_for) with element counts larger than grid × block:
// the grid is capped at 2 blocks, then the per-op tests run again — each compares with the CPU reference.
struct GridCap {
    size_t saved = g_grid_max_blocks;
    explicit GridCap(size_t blocks) { g_grid_max_blocks = blocks; }
    ~GridCap() { g_grid_max_blocks = saved; }
};
TEST(cuda_grid_stride_loops_go_round) {
    REQUIRE_GPU();
    GridCap cap(2);
    CHECK(grid_for(2 * BLOCK + 1) == 2);  // the ops below then loop: their tensors exceed 2·BLOCK elements
    test_cuda_embedding();                // embedding_forward, iota (embedding_backward)
    test_cuda_bigram_lookup();
    test_cuda_resid_mix();
    test_cuda_branch_add();
    test_cuda_smear();
    test_cuda_mlp_act();
    test_cuda_elementwise_helpers();      // add, scale, copy
    test_cuda_optimizer_updates();        // adamw, sgd, average
    test_cuda_refresh_compute_weights_qat();  // cast_params
    Rng rng(61);
    size_t n = 5 * BLOCK + 3;
    std::vector<double> x = cu_randn(n, rng, 1.0, false);
    CU_UP(gx, f32, x);
    round_to_bf16(Cuda{}, gx->f(), n);
    std::vector<double> got = down_f32(gx->p, n);
    for (size_t i = 0; i < n; i++) CHECK_MSG(got[i] == round_to_bf16((float)x[i]), "round_to_bf16[%zu]", i);
}

// The column reductions with more rows than CHUNK_MAX · CHUNK_MIN_ROWS: the chunk count saturates,
// chunks grow past CHUNK_MIN_ROWS rows and the last one is ragged.
TEST(cuda_column_reductions_saturated_chunks) {
    REQUIRE_GPU();
    Rng rng(62);
    const int T = 40001, N = T, C = 8;  // one sequence (smear), one column block
    RowChunks rc = row_chunks(N);
    CHECK_MSG(rc.chunks > CHUNK_MAX - 8 && rc.rows_per_chunk > CHUNK_MIN_ROWS &&
                  (long)rc.chunks * rc.rows_per_chunk > N,
              "%d chunks of %ld rows", rc.chunks, rc.rows_per_chunk);
    size_t n = (size_t)N * C;
    std::vector<double> x = cu_randn(n, rng), x0 = cu_randn(n, rng), dy = cu_randn(n, rng);
    std::vector<double> mix = cu_randn(2 * C, rng, 1.0, false), gate = cu_randn(C, rng, 1.0, false);
    std::vector<double> dmix0 = cu_randn(2 * C, rng, 1.0, false), dvec0 = cu_randn(C, rng, 1.0, false);
    CU_UP(gx, bf16, x); CU_UP(gx0, bf16, x0); CU_UP(gdy, bf16, dy); CU_UP(gmix, f32, mix); CU_UP(ggate, f32, gate);
    {  // resid_mix: dmix[2C]
        std::vector<double> dx(n, 0.0), dx0(n, 0.0), dmix = dmix0;
        resid_mix_backward(Cpu<double>{}, dx.data(), dx0.data(), dmix.data(), dy.data(), x.data(), x0.data(),
                           mix.data(), N, C, ACCUMULATE, ACCUMULATE, ACCUMULATE);
        GpuBuf gdx(n * 2), gdx0(n * 2);
        cudaCheck(cudaMemset(gdx.p, 0, n * 2));
        cudaCheck(cudaMemset(gdx0.p, 0, n * 2));
        CU_UP(gdmix, f32, dmix0);
        resid_mix_backward(Cuda{}, gdx.b(), gdx0.b(), gdmix->f(), gdy->b(), gx->b(), gx0->b(), gmix->f(), N, C,
                           ACCUMULATE, ACCUMULATE, ACCUMULATE);
        check_band("resid_mix dmix (saturated chunks)", down_f32(gdmix->p, 2 * C), dmix, F32_TOL);
        check_band("resid_mix dx (saturated chunks)", down_bf16(gdx.p, n), dx, BF16_TOL);
    }
    {  // branch_add: dscale[C], dgate[C]
        std::vector<double> dbr(n, 0.0), dscale = dvec0, dgate = dmix0;
        dgate.resize(C);
        branch_add_backward(Cpu<double>{}, (double*)nullptr, dbr.data(), dscale.data(), dgate.data(), dy.data(),
                            x.data(), gate.data(), gate.data(), N, C, 1, ACCUMULATE, ACCUMULATE, ACCUMULATE);
        GpuBuf gdbr(n * 2);
        cudaCheck(cudaMemset(gdbr.p, 0, n * 2));
        CU_UP(gdscale, f32, dvec0);
        CU_UP(gdgate, f32, std::vector<double>(dmix0.begin(), dmix0.begin() + C));
        branch_add_backward(Cuda{}, nullptr, gdbr.b(), gdscale->f(), gdgate->f(), gdy->b(), gx->b(), ggate->f(),
                            ggate->f(), N, C, 1, ACCUMULATE, ACCUMULATE, ACCUMULATE);
        check_band("branch_add dscale (saturated chunks)", down_f32(gdscale->p, C), dscale, F32_TOL);
        check_band("branch_add dgate (saturated chunks)", down_f32(gdgate->p, C), dgate, F32_TOL);
    }
    {  // smear: dgate[C]
        std::vector<double> dx(n, 0.0), dgate = dvec0;
        smear_backward(Cpu<double>{}, dx.data(), dgate.data(), dy.data(), x.data(), gate.data(), N, T, C, ACCUMULATE,
                       ACCUMULATE);
        GpuBuf gdx(n * 2);
        cudaCheck(cudaMemset(gdx.p, 0, n * 2));
        CU_UP(gdgate, f32, dvec0);
        smear_backward(Cuda{}, gdx.b(), gdgate->f(), gdy->b(), gx->b(), ggate->f(), N, T, C, ACCUMULATE, ACCUMULATE);
        check_band("smear dgate (saturated chunks)", down_f32(gdgate->p, C), dgate, F32_TOL);
    }
}

// The GPU's summation order of the embedding backward, on the host: the (index, position) pairs sorted
// stably, cut into windows of EMB_WINDOW entries; each run's pieces (its entries in one window) summed in
// position order from 0, the pieces added in window order, the total added to the row once.
static std::vector<float> embedding_backward_window_order(const std::vector<double>& dtab0,
                                                          const std::vector<double>& dout,
                                                          const std::vector<int32_t>& idx, int C) {
    int N = (int)idx.size();
    std::vector<int> order(N);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return idx[a] < idx[b]; });
    std::vector<float> out(dtab0.begin(), dtab0.end());
    for (int i = 0; i < N;) {
        int key = idx[order[i]], end = i + 1;
        while (end < N && idx[order[end]] == key) end++;
        for (int c = 0; c < C; c++) {
            float acc = 0.0f, piece = 0.0f;
            bool first = true;
            for (int j = i; j < end; j++) {
                if (j > i && j % EMB_WINDOW == 0) {
                    acc = first ? piece : acc + piece;
                    first = false;
                    piece = 0.0f;
                }
                piece += (float)dout[(size_t)order[j] * C + c];
            }
            acc = first ? piece : acc + piece;
            out[(size_t)key * C + c] += acc;
        }
        i = end;
    }
    return out;
}

// One token thousands of times: a single sorted run spanning many windows, split across blocks; and
// runs that begin mid-window and cross one boundary, or end on one. Against the CPU reference, and bit
// for bit against the windowed order; accumulating, and overwriting a poisoned table (rows 2 and 9 have
// no entries: zeroed between runs and after the last).
TEST(cuda_embedding_backward_hot_token) {
    REQUIRE_GPU();
    Rng rng(63);
    const int N = 6000, C = 24, V = 10, hot = 4;
    std::vector<int32_t> hot_idx = cu_randint(N, rng, V);
    for (int n = 0; n < N; n++)
        if (n % 50) hot_idx[n] = hot;  // 5880 of 6000 positions: ~46 windows
    // entries per row (positions shuffled); sorted, with windows of 128: row 1 begins mid-window 0 and ends
    // on window 1's end, row 3 is window 2 exactly, row 6 spans parts of three windows
    std::vector<int32_t> mixed;
    int counts[V] = {100, 156, 0, 128, 7, 1, 250, 2, 40, 0};
    for (int v = 0; v < V; v++)
        for (int k = 0; k < counts[v]; k++) mixed.push_back(v);
    for (size_t k = mixed.size() - 1; k > 0; k--) std::swap(mixed[k], mixed[(size_t)(rng.uniform() * (k + 1))]);
    for (const std::vector<int32_t>& idx : {hot_idx, mixed}) {
        int n = (int)idx.size();
        std::vector<double> dout = cu_randn((size_t)n * C, rng), dtab0 = cu_randn((size_t)V * C, rng, 5.0, false);
        CU_UP(di, i32, idx); CU_UP(ddo, bf16, dout);
        for (GradWrite w : GRAD_WRITES) {
            std::vector<double> start = w == ACCUMULATE ? dtab0 : std::vector<double>(dtab0.size(), 0.0);
            std::vector<double> dref = dtab0;
            embedding_backward(Cpu<double>{}, dref.data(), dout.data(), idx.data(), n, C, V, w);
            std::unique_ptr<GpuBuf> dtab(up_grad_f32(dtab0, w));
            embedding_backward(Cuda{}, dtab->f(), ddo->b(), di->i(), n, C, V, w);
            std::string tag = test_format("embedding_backward long runs, %d positions%s", n, grad_write_name(w));
            check_band(tag.c_str(), down_f32(dtab->p, dtab0.size()), dref, F32_TOL);
            std::vector<double> got = down_f32(dtab->p, dtab0.size());
            std::vector<float> want = embedding_backward_window_order(start, dout, idx, C);
            for (size_t i = 0; i < want.size(); i++)
                CHECK_MSG(got[i] == (double)want[i], "%s, row %zu col %zu: %.9g, windowed order %.9g", tag.c_str(),
                          i / C, i % C, got[i], (double)want[i]);
        }
    }
}

// Device memory in use (total − free: the emulator counts its cudaMalloc bytes the same way).
static size_t device_bytes_held() {
    size_t fr = 0, tot = 0;
    cudaCheck(cudaMemGetInfo(&fr, &tot));
    return tot - fr;
}

// One training step (zero the gradients, forward, backward, optimizer with gradient clipping, bf16
// weight refresh) captured into a CUDA graph and replayed: the same bits as the step run directly. The
// tokens are uploaded before (to_device waits for the host). The clip binds (its norm is far above
// GRAD_CLIP_NORM): its coefficient is computed on the device, which a graph can hold.
TEST(cuda_train_step_graph_replay_bitwise) {
    REQUIRE_GPU();
    Config c; preset_tiny(c);
    int T = EMU_OR(c.train_seq_len, 64), B = 2, N = B * T;
    c.train_seq_len = T; c.train_batch_tokens = (long)N; c.grad_accum_steps = 1; c.grad_clip_norm = 1e-3f;
    config_validate(c, 1);
    std::vector<int32_t> tok = synthetic_tokens((size_t)N + 1, c.vocab_size, 11);
    std::vector<float> w = perturbed_init(c, 80);
    struct Run { Model<Cuda> m; TrainState<Cuda> s; } runs[2];
    for (Run& r : runs) {
        model_init(Cuda{}, r.m, c, B, T);
        to_device(Cuda{}, r.m.params, w.data(), w.size());
        refresh_compute_weights(Cuda{}, r.m, false);
        train_state_init(Cuda{}, r.s, r.m);
        std::vector<int32_t> x(tok.begin(), tok.begin() + N), y(tok.begin() + 1, tok.begin() + N + 1);
        std::vector<float> lw(N, 1.0f / N);
        to_device(Cuda{}, r.m.acts.inputs, x.data(), N);
        to_device(Cuda{}, r.m.acts.targets, y.data(), N);
        to_device(Cuda{}, r.m.acts.loss_weights, lw.data(), N);
    }
    auto step = [&](Run& r) {
        device_zero(Cuda{}, r.m.grads, r.m.nparams * sizeof(float));
        gpt_forward(Cuda{}, r.m, B, T, true);
        gpt_backward(Cuda{}, r.m, B, T);
        optimizer_step(Cuda{}, r.m, r.s, lr_multiplier(c, r.s.step, 0), (float)muon_momentum_at(c, r.s.step));
        refresh_compute_weights(Cuda{}, r.m, r.s.qat_active);
    };
    step(runs[0]);  // directly (this also grows the shared scratch to the step's size)
    cudaStream_t st = cuda_ctx().stream;
    size_t held = device_bytes_held();
    std::vector<uint32_t> initial = down_bits(runs[1].m.params, runs[1].m.nparams);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    cudaCheck(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    try {
        step(runs[1]);
    } catch (...) {
        cudaStreamEndCapture(st, &graph);
        throw;
    }
    cudaCheck(cudaStreamEndCapture(st, &graph));
    CHECK_MSG(device_bytes_held() == held, "the captured step allocated %zu bytes", device_bytes_held() - held);
    cudaCheck(cudaGraphInstantiate(&exec, graph, 0));
    CHECK_MSG(down_bits(runs[1].m.params, runs[1].m.nparams) == initial, "capturing the step ran it");
    CHECK_MSG(down_bits(runs[0].m.params, runs[0].m.nparams) != initial, "the step changed no weight");
    cudaCheck(cudaGraphLaunch(exec, st));
    cudaCheck(cudaStreamSynchronize(st));
    size_t np = runs[0].m.nparams;
    CHECK_MSG(down_bits(runs[1].m.acts.losses, N) == down_bits(runs[0].m.acts.losses, N),
              "replayed step: losses differ");
    CHECK_MSG(down_bits(runs[1].m.grads, np) == down_bits(runs[0].m.grads, np), "replayed step: gradients differ");
    CHECK_MSG(down_bits(runs[1].m.params, np) == down_bits(runs[0].m.params, np), "replayed step: weights differ");
    CHECK_MSG(down_bits(runs[1].s.adam_m, np) == down_bits(runs[0].s.adam_m, np),
              "replayed step: Adam/Muon moments differ");
    CHECK_MSG(down_bits(runs[1].s.adam_v, np) == down_bits(runs[0].s.adam_v, np),
              "replayed step: Adam second moments differ");
    cudaCheck(cudaGraphExecDestroy(exec));
    cudaCheck(cudaGraphDestroy(graph));
    for (Run& r : runs) {
        cuda_train_state_free(r.s);
        model_free(Cuda{}, r.m);
    }
}

// train_step on the GPU as train() runs it, with CUDA graphs (the default: the first step runs directly,
// the second captures the micro-batches and the optimizer, the later ones replay them) against the same
// steps with every kernel launched directly (CUDA_GRAPHS=0): three steps on new tokens each, two
// micro-batches, a binding gradient clip, lr and momentum changing per step (the optimizer's graph reads
// them from the device): the same losses, gradients, weights and moments, bit for bit; both graphs
// replay; and train_state_free gives back the page-locked buffers and the graphs (the emulator counts them).
TEST(cuda_train_step_graphs_match_direct_launches) {
    REQUIRE_GPU();
    Config c; preset_tiny(c);
    c.num_layers = 2; c.model_dim = 64; c.num_heads = 2; c.num_kv_heads = 1; c.bigram_dim = 32;
    int T = 32, B = 1, N = B * T, steps = 3;
    c.train_seq_len = T;
    c.eval_stride = 16;
    c.train_batch_tokens = 2L * N;
    c.grad_accum_steps = 2;
    c.grad_clip_norm = 1e-3f;
    config_validate(c, 1);
    std::vector<int32_t> tok = synthetic_tokens((size_t)steps * 2 * (N + 1), c.vocab_size, 13);
    std::vector<float> w = perturbed_init(c, 82);
    struct Run { Model<Cuda> m; TrainState<Cuda> s; std::vector<double> losses; long graph_launches = 0; } runs[2];
    int saved = g_cuda_graphs;
#ifdef PGOLF_EMU
    size_t pinned0 = emu::host_allocated_bytes();
    long execs0 = emu::graph_execs();
#endif
    for (int r = 0; r < 2; r++) {
        Run& run = runs[r];
        g_cuda_graphs = r == 0;
        model_init(Cuda{}, run.m, c, B, T);
        to_device(Cuda{}, run.m.params, w.data(), w.size());
        train_state_init(Cuda{}, run.s, run.m);
        refresh_compute_weights(Cuda{}, run.m, false);
        train_loss_weights_upload(Cuda{}, run.m, run.s);
#ifdef PGOLF_EMU
        emu::reset_counts();
#endif
        for (int k = 0; k < steps; k++) {
            for (int micro = 0; micro < 2; micro++) {  // micro-batch j: tokens [j·(N+1), j·(N+1) + N]
                const int32_t* t = tok.data() + (size_t)(2 * k + micro) * (N + 1);
                std::copy(t, t + N, run.s.batch + micro * 2 * N);
                std::copy(t + 1, t + N + 1, run.s.batch + micro * 2 * N + N);
            }
            train_step(Cuda{}, run.m, run.s, 1.0 - 0.25 * k, (float)muon_momentum_at(c, k) - 0.01f * k);
            run.losses.push_back(train_step_loss(Cuda{}, run.s));
            refresh_compute_weights(Cuda{}, run.m, false);
            run.s.step++;
        }
#ifdef PGOLF_EMU
        run.graph_launches = emu::counts().graph_launches;
#else
        run.graph_launches = ((run.s.gpu->exec != nullptr) + (run.s.gpu->opt_exec != nullptr)) * (steps - 1);
#endif
    }
    g_cuda_graphs = saved;
    CHECK_MSG(runs[0].graph_launches == 2 * (steps - 1) && runs[1].graph_launches == 0, "graph launches %ld "
              "(graphs), %ld (direct)", runs[0].graph_launches, runs[1].graph_launches);
    size_t np = runs[0].m.nparams;
    for (int k = 0; k < steps; k++)
        CHECK_MSG(runs[0].losses[k] == runs[1].losses[k], "step %d: loss %.9g with graphs, %.9g without", k + 1,
                  runs[0].losses[k], runs[1].losses[k]);
    CHECK(runs[0].losses[0] > 0 && std::isfinite(runs[0].losses[steps - 1]));
    CHECK_MSG(down_bits(runs[0].m.grads, np) == down_bits(runs[1].m.grads, np), "gradients differ");
    CHECK_MSG(down_bits(runs[0].m.params, np) == down_bits(runs[1].m.params, np), "weights differ");
    CHECK_MSG(down_bits(runs[0].s.adam_m, np) == down_bits(runs[1].s.adam_m, np), "Adam/Muon moments differ");
    CHECK_MSG(down_bits(runs[0].s.adam_v, np) == down_bits(runs[1].s.adam_v, np), "Adam second moments differ");
    std::vector<float> trained(np);
    to_host(Cuda{}, trained.data(), runs[0].m.params, np);
    CHECK_MSG(trained != w, "the steps changed no weight");
    for (Run& r : runs) {
        cuda_train_state_free(r.s);
        model_free(Cuda{}, r.m);
        CHECK(r.s.gpu == nullptr && r.s.batch == nullptr && r.s.adam_m == nullptr);
    }
#ifdef PGOLF_EMU
    CHECK_MSG(emu::host_allocated_bytes() == pinned0 && emu::graph_execs() == execs0, "after train_state_free: "
              "%zu page-locked bytes and %ld graph executables more than before", emu::host_allocated_bytes() - pinned0,
              emu::graph_execs() - execs0);
#endif
}

// Bytes of the device's RoPE table (grown on demand, outside the memory plan's arrays: its headroom).
static size_t rope_table_bytes() {
    CudaContext& cx = cuda_ctx();
    return cx.rope ? std::max<size_t>((size_t)cx.rope_rows * (cx.rope_rd / 2), 1) * sizeof(float2) : 0;
}
static void drop_scratch() {
    CudaContext& cx = cuda_ctx();
    cudaCheck(cudaFree(cx.scratch));
    cx.scratch = nullptr; cx.scratch_bytes = 0;
}

// The memory plan against what run_cuda's allocations take (cudaMalloc bytes), array by array, and a
// training step at the plan's capacity (with gradient clipping and Muon, the largest scratch users)
// that allocates nothing more: the reserved scratch never grows.
TEST(cuda_memory_plan_matches_allocations) {
    REQUIRE_GPU();
    Config c; preset_tiny(c);
    c.train_seq_len = 64; c.train_batch_tokens = 256; c.grad_accum_steps = 1;
    c.eval_batch_seqs = 2; c.ttt_batch_size = 2; c.ttt_eval_seq_len = 64; c.ttt_batch_seqs = 2;
    config_validate(c, 1);
    CHECK(c.grad_clip_norm > 0 && c.swa_enabled);  // the clip's sum_squares and the SWA sum take part
    drop_scratch();
    CudaMemoryPlan plan = cuda_memory_plan(c, 1, 0);
    plan = cuda_memory_plan(c, 1, radix_sort_temp_bytes((int)plan.act_rows));
    size_t held0 = device_bytes_held();
    Model<Cuda> m; TrainState<Cuda> s;
    model_init_for_run(Cuda{}, m, c);
    size_t held_model = device_bytes_held() - held0;
    CHECK_MSG(m.act_bytes == plan.activations, "activations: %zu bytes allocated, %zu planned", m.act_bytes,
              plan.activations);
    CHECK_MSG(held_model == plan.params + plan.compute + plan.grads + plan.activations,
              "model_init_for_run allocated %zu bytes, the plan says %zu", held_model,
              plan.params + plan.compute + plan.grads + plan.activations);
    train_state_init(Cuda{}, s, m);
    CHECK_MSG(device_bytes_held() - held0 - held_model == plan.optimizer, "optimizer state %zu bytes, %zu planned",
              device_bytes_held() - held0 - held_model, plan.optimizer);
    cuda_scratch(plan.scratch);
    size_t held = device_bytes_held(), rope0 = rope_table_bytes();
    CHECK_MSG(held - held0 ==
                  plan.params + plan.compute + plan.grads + plan.optimizer + plan.activations + plan.scratch,
              "run_cuda's arrays take %zu bytes, the plan %zu", held - held0,
              plan.params + plan.compute + plan.grads + plan.optimizer + plan.activations + plan.scratch);
    int T = plan.act_t, B = (int)(plan.act_rows / T);
    std::vector<int32_t> tok = synthetic_tokens((size_t)B * T + 1, c.vocab_size, 12);
    train_step(Cuda{}, m, s, tok, B, T);
    CHECK_MSG(cuda_ctx().scratch_bytes == plan.scratch,
              "a step at the plan's capacity (%d×%d) grew the scratch to %zu bytes "
              "(planned %zu)",
              B, T, cuda_ctx().scratch_bytes, plan.scratch);
    CHECK_MSG(device_bytes_held() - held == rope_table_bytes() - rope0, "the step allocated %zu bytes",
              device_bytes_held() - held);
    cuda_train_state_free(s);
    model_free(Cuda{}, m);
    CHECK_MSG(device_bytes_held() - held0 == plan.scratch + rope_table_bytes() - rope0, "freeing left %zu bytes",
              device_bytes_held() - held0);
}

// The grow-only buffers: the ops' scratch grows (freeing the old buffer first), never shrinks, and the
// op that grew it computes the CPU's result; the RoPE table grows for longer sequences, equal to the host's.
TEST(cuda_grow_only_buffers) {
    REQUIRE_GPU();
    Rng rng(64);
    drop_scratch();
    size_t held0 = device_bytes_held();
    size_t last = 0;
    for (int N : {100, 3000, 40}) {  // resid_mix's partials: 2C floats per chunk, chunks from N
        const int C = 16;
        size_t n = (size_t)N * C;
        std::vector<double> x = cu_randn(n, rng), x0 = cu_randn(n, rng), dy = cu_randn(n, rng);
        std::vector<double> mix = cu_randn(2 * C, rng, 1.0, false), dmix0 = cu_randn(2 * C, rng, 1.0, false);
        std::vector<double> dx(n, 0.0), dx0(n, 0.0), dmix = dmix0;
        resid_mix_backward(Cpu<double>{}, dx.data(), dx0.data(), dmix.data(), dy.data(), x.data(), x0.data(),
                           mix.data(), N, C, ACCUMULATE, ACCUMULATE, ACCUMULATE);
        CU_UP(gx, bf16, x); CU_UP(gx0, bf16, x0); CU_UP(gdy, bf16, dy); CU_UP(gmix, f32, mix); CU_UP(gdmix, f32, dmix0);
        GpuBuf gdx(n * 2), gdx0(n * 2);
        device_zero(Cuda{}, gdx.p, n * 2);
        device_zero(Cuda{}, gdx0.p, n * 2);
        size_t before = device_bytes_held();
        resid_mix_backward(Cuda{}, gdx.b(), gdx0.b(), gdmix->f(), gdy->b(), gx->b(), gx0->b(), gmix->f(), N, C,
                           ACCUMULATE, ACCUMULATE, ACCUMULATE);
        size_t need = (size_t)row_chunks(N).chunks * 2 * C * sizeof(float), now = cuda_ctx().scratch_bytes;
        CHECK_MSG(now == std::max(last, need), "N=%d: scratch %zu bytes, expected max(%zu, %zu)", N, now, last, need);
        CHECK_MSG(device_bytes_held() - before == now - last, "N=%d: growing the scratch %zu → %zu took %zu bytes", N,
                  last, now, device_bytes_held() - before);
        check_band(test_format("resid_mix dmix N=%d (scratch %zu → %zu)", N, last, now).c_str(),
                   down_f32(gdmix->p, 2 * C), dmix, F32_TOL);
        last = now;
    }
    CHECK(device_bytes_held() - held0 == last);
    for (int T : {48, 200, 300}) {
        const float2* d = rope_table_device(T, 16, 777.0f);  // a base no model uses: a fresh table, then growth
        CudaContext& cx = cuda_ctx();
        CHECK(cx.rope_rows >= T);
        std::vector<float2> want, got((size_t)cx.rope_rows * 8);
        rope_table_host(want, cx.rope_rows, 16, 777.0f);
        to_host(Cuda{}, got.data(), d, got.size());
        CHECK_MSG(memcmp(got.data(), want.data(), got.size() * sizeof(float2)) == 0, "rope table for T=%d (%d rows)", T,
                  cx.rope_rows);
    }
    CHECK_MSG(cuda_ctx().rope_rows == 400, "rope rows %d: expected 48, then max(200, 2·48), then max(300, 2·200)",
              cuda_ctx().rope_rows);
}

#endif  // PGOLF_CUDA
