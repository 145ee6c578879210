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
    test_cuda_optimizer_updates();        // adamw, sgd, apply_update, average
    test_cuda_muon_direction();           // ns_normalize, muon_finish
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
    CHECK_MSG(rc.chunks > CHUNK_MAX - 8 && rc.rows_per_chunk > CHUNK_MIN_ROWS && (long)rc.chunks * rc.rows_per_chunk > N,
              "%d chunks of %ld rows", rc.chunks, rc.rows_per_chunk);
    size_t n = (size_t)N * C;
    std::vector<double> x = cu_randn(n, rng), x0 = cu_randn(n, rng), dy = cu_randn(n, rng);
    std::vector<double> mix = cu_randn(2 * C, rng, 1.0, false), gate = cu_randn(C, rng, 1.0, false);
    std::vector<double> dmix0 = cu_randn(2 * C, rng, 1.0, false), dvec0 = cu_randn(C, rng, 1.0, false);
    CU_UP(gx, bf16, x); CU_UP(gx0, bf16, x0); CU_UP(gdy, bf16, dy); CU_UP(gmix, f32, mix); CU_UP(ggate, f32, gate);
    {  // resid_mix: dmix[2C]
        std::vector<double> dx(n, 0.0), dx0(n, 0.0), dmix = dmix0;
        resid_mix_backward(Cpu<double>{}, dx.data(), dx0.data(), dmix.data(), dy.data(), x.data(), x0.data(), mix.data(), N, C);
        GpuBuf gdx(n * 2), gdx0(n * 2);
        cudaCheck(cudaMemset(gdx.p, 0, n * 2));
        cudaCheck(cudaMemset(gdx0.p, 0, n * 2));
        CU_UP(gdmix, f32, dmix0);
        resid_mix_backward(Cuda{}, gdx.b(), gdx0.b(), gdmix->f(), gdy->b(), gx->b(), gx0->b(), gmix->f(), N, C);
        check_band("resid_mix dmix (saturated chunks)", down_f32(gdmix->p, 2 * C), dmix, F32_TOL);
        check_band("resid_mix dx (saturated chunks)", down_bf16(gdx.p, n), dx, BF16_TOL);
    }
    {  // branch_add: dscale[C], dgate[C]
        std::vector<double> dbr(n, 0.0), dscale = dvec0, dgate = dmix0;
        dgate.resize(C);
        branch_add_backward(Cpu<double>{}, (double*)nullptr, dbr.data(), dscale.data(), dgate.data(), dy.data(), x.data(),
                            gate.data(), gate.data(), N, C, 1);
        GpuBuf gdbr(n * 2);
        cudaCheck(cudaMemset(gdbr.p, 0, n * 2));
        CU_UP(gdscale, f32, dvec0);
        CU_UP(gdgate, f32, std::vector<double>(dmix0.begin(), dmix0.begin() + C));
        branch_add_backward(Cuda{}, nullptr, gdbr.b(), gdscale->f(), gdgate->f(), gdy->b(), gx->b(), ggate->f(), ggate->f(), N, C, 1);
        check_band("branch_add dscale (saturated chunks)", down_f32(gdscale->p, C), dscale, F32_TOL);
        check_band("branch_add dgate (saturated chunks)", down_f32(gdgate->p, C), dgate, F32_TOL);
    }
    {  // smear: dgate[C]
        std::vector<double> dx(n, 0.0), dgate = dvec0;
        smear_backward(Cpu<double>{}, dx.data(), dgate.data(), dy.data(), x.data(), gate.data(), N, T, C);
        GpuBuf gdx(n * 2);
        cudaCheck(cudaMemset(gdx.p, 0, n * 2));
        CU_UP(gdgate, f32, dvec0);
        smear_backward(Cuda{}, gdx.b(), gdgate->f(), gdy->b(), gx->b(), ggate->f(), N, T, C);
        check_band("smear dgate (saturated chunks)", down_f32(gdgate->p, C), dgate, F32_TOL);
    }
}

// One token thousands of times: a single sorted run spanning many blocks' ranges, summed in position order.
TEST(cuda_embedding_backward_hot_token) {
    REQUIRE_GPU();
    Rng rng(63);
    const int N = 6000, C = 24, V = 9, hot = 4;
    std::vector<int32_t> idx = cu_randint(N, rng, V);
    for (int n = 0; n < N; n++)
        if (n % 50) idx[n] = hot;  // 5880 of 6000 positions
    std::vector<double> dout = cu_randn((size_t)N * C, rng), dtab0 = cu_randn((size_t)V * C, rng, 5.0, false);
    std::vector<double> dref = dtab0;
    embedding_backward(Cpu<double>{}, dref.data(), dout.data(), idx.data(), N, C);
    CU_UP(di, i32, idx); CU_UP(ddo, bf16, dout); CU_UP(dtab, f32, dtab0);
    embedding_backward(Cuda{}, dtab->f(), ddo->b(), di->i(), N, C);
    check_band("embedding_backward hot token", down_f32(dtab->p, dtab0.size()), dref, F32_TOL);
    // the kernel sums a run in position order in fp32, then adds it to the row once: equal bit for bit
    std::vector<double> got = down_f32(dtab->p, dtab0.size());
    for (int c = 0; c < C; c++) {
        float acc = 0.0f;
        for (int n = 0; n < N; n++)
            if (idx[n] == hot) acc += (float)dout[(size_t)n * C + c];
        float want = (float)dtab0[(size_t)hot * C + c] + acc;
        CHECK_MSG(got[(size_t)hot * C + c] == (double)want, "hot row col %d: %.9g, position-order fp32 sum %.9g",
                  c, got[(size_t)hot * C + c], (double)want);
    }
}

// Device memory in use (total − free: the emulator counts its cudaMalloc bytes the same way).
static size_t device_bytes_held() {
    size_t fr = 0, tot = 0;
    cudaCheck(cudaMemGetInfo(&fr, &tot));
    return tot - fr;
}

// One training step (zero the gradients, forward, backward, optimizer, bf16 weight refresh) captured
// into a CUDA graph and replayed: the same bits as the step run directly. The tokens are uploaded
// before (to_device waits for the host). Gradient clipping is off: it reads the gradient norm on the
// host (sum_squares → to_host), which a graph cannot hold.
TEST(cuda_train_step_graph_replay_bitwise) {
    REQUIRE_GPU();
    Config c; preset_tiny(c);
    int T = EMU_OR(c.train_seq_len, 64), B = 2, N = B * T;
    c.train_seq_len = T; c.train_batch_tokens = (long)N; c.grad_accum_steps = 1; c.grad_clip_norm = 0.0f;
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
    CHECK_MSG(down_bits(runs[1].m.acts.losses, N) == down_bits(runs[0].m.acts.losses, N), "replayed step: losses differ");
    CHECK_MSG(down_bits(runs[1].m.grads, np) == down_bits(runs[0].m.grads, np), "replayed step: gradients differ");
    CHECK_MSG(down_bits(runs[1].m.params, np) == down_bits(runs[0].m.params, np), "replayed step: weights differ");
    CHECK_MSG(down_bits(runs[1].s.adam_m, np) == down_bits(runs[0].s.adam_m, np), "replayed step: Adam/Muon moments differ");
    CHECK_MSG(down_bits(runs[1].s.adam_v, np) == down_bits(runs[0].s.adam_v, np), "replayed step: Adam second moments differ");
    cudaCheck(cudaGraphExecDestroy(exec));
    cudaCheck(cudaGraphDestroy(graph));
    for (Run& r : runs) {
        cuda_train_state_free(r.s);
        model_free(Cuda{}, r.m);
    }
}

#endif  // PGOLF_CUDA
