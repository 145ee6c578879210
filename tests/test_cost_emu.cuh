// The cost model's launch list (section 13) against what the CUDA path really issues: one training
// step runs on the emulated GPU while the emulated runtime and its library shims count the kernel
// launches, memsets, copies, cuBLASLt matmuls and NCCL collectives (emu::counts(), tests/emu), and
// each count must equal the cost model's for the same config. Emulated build only.
#ifdef PGOLF_EMU

struct CallCounts { long launches = 0, memsets = 0, copies = 0, gemms = 0, collectives = 0, graphs = 0; };
// The cost model's entries by the call each stands for (see cost_step_launches): host waits are no calls
// to the device. host_only: only the calls the host issues in a replayed step (not the graph's nodes).
static CallCounts cost_call_counts(const std::vector<CostEntry>& list, bool host_only = false) {
    CallCounts n;
    for (const CostEntry& e : list) {
        std::string op = e.op;
        if (host_only && e.in_graph) continue;
        if (op == "cudaGraphLaunch") n.graphs++;
        else if (op == "gemm_bf16") n.gemms++;
        else if (op == "cudaMemsetAsync") n.memsets++;
        else if (op == "to_device" || op == "to_host" || op == "cudaMemcpyAsync") n.copies++;
        else if (op.rfind("nccl", 0) == 0 && op != "nccl_wait") n.collectives++;  // all-reduce, reduce-scatter, …
        else if (op != "nccl_wait") n.launches++;
    }
    return n;
}
static CallCounts emu_call_counts_of(const EmuCounts& e) {
    CallCounts n;
    n.launches = e.launches;
    n.memsets = e.memsets;
    n.copies = e.copies;
    n.gemms = e.gemms;
    n.collectives = e.collectives;
    n.graphs = e.graph_launches;
    return n;
}
// The emulator's launches by kernel, for the message when the counts differ.
static std::string emu_kernel_list(const EmuCounts& e) {
    std::string s;
    for (auto& k : e.kernels) s += test_format("\n    %4ld %s", k.second, k.first);
    return s;
}
static void check_call_counts(const std::string& what, const CallCounts& cost, const CallCounts& emu,
                              const EmuCounts& e) {
    bool same = cost.launches == emu.launches && cost.memsets == emu.memsets && cost.copies == emu.copies &&
                cost.gemms == emu.gemms && cost.collectives == emu.collectives && cost.graphs == emu.graphs;
    CHECK_MSG(same,
              "%s: cost model / emulator: kernel launches %ld / %ld, memsets %ld / %ld, copies %ld / %ld, "
              "GEMMs %ld / %ld, collectives %ld / %ld, graph launches %ld / %ld; the emulator's kernels:%s",
              what.c_str(), cost.launches, emu.launches, cost.memsets, emu.memsets, cost.copies, emu.copies, cost.gemms,
              emu.gemms, cost.collectives, emu.collectives, cost.graphs, emu.graphs, emu_kernel_list(e).c_str());
}

// One iteration of train()'s loop on one rank with one micro-batch (its device work in its order, as
// cost_step_launches prices it), run on the emulated GPU and counted, against cost_step_launches(c, 1).
static void cost_matches_emulated_step(Config c, int B, bool looping = false) {
    c.train_batch_tokens = (long)B * c.train_seq_len; c.grad_accum_steps = 1;
    if (c.grad_clip_norm > 0) c.grad_clip_norm = 1e-6f;  // the cost model assumes the clip binds: make it bind
    config_validate(c, 1);
    int T = c.train_seq_len, N = B * T;
    std::vector<float> w = perturbed_init(c, 77);
    std::vector<int32_t> tok = synthetic_tokens((size_t)N + 1, c.vocab_size, 5);
    Cuda dev;
    Model<Cuda> m;
    TrainState<Cuda> s;
    model_init(dev, m, c, B, T);
    m.looping = looping;
    to_device(dev, m.params, w.data(), w.size());
    refresh_compute_weights(dev, m, false);
    train_state_init(dev, s, m);
    std::copy(tok.begin(), tok.begin() + N, s.batch);
    std::copy(tok.begin() + 1, tok.end(), s.batch + N);
    train_loss_weights_upload(dev, m, s);
    auto step = [&]() {
        train_step(dev, m, s, 1.0, (float)muon_momentum_at(c, 0));
        if (c.ema_decay > 0) average_accumulate(dev, s.avg, m.params, m.nparams, c.ema_decay, false);
        if (c.ema_decay > 0) round_bf16_tables(dev, m, s.avg);
        refresh_compute_weights(dev, m, false);
    };
    // the first step runs directly (and uploads the rope table, once per run); the second captures the
    // two graphs, micro-batches and optimizer (their nodes are counted as they are captured) and launches
    // them; the third replays them
    step();
    emu::reset_counts();
    step();
    EmuCounts e = emu::counts();
    emu::reset_counts();
    step();
    EmuCounts replay = emu::counts();
    std::vector<float> p(m.nparams);
    to_host(dev, p.data(), m.params, m.nparams);
    double loss = train_step_loss(dev, s);
    model_free(dev, m);
    cuda_train_state_free(s);
    CHECK_MSG(std::isfinite(loss) && loss > 0, "%s: the emulated step's loss is %f", c.preset.c_str(), loss);
    bool moved = false;
    for (size_t i = 0; i < p.size(); i++) moved |= p[i] != w[i];
    CHECK_MSG(moved, "%s: the emulated step left every parameter unchanged", c.preset.c_str());
    CallCounts emu = emu_call_counts_of(e);
    CallCounts cost = cost_call_counts(cost_step_launches(c, 1, looping));
    if (getenv("PGOLF_CUDA_TEST_VERBOSE"))
        printf("  %s B=%d T=%d: kernel launches %ld, memsets %ld, copies %ld, GEMMs %ld, collectives %ld\n",
               c.preset.c_str(), B, T, emu.launches, emu.memsets, emu.copies, emu.gemms, emu.collectives);
    check_call_counts(c.preset, cost, emu, e);
    CHECK(emu.launches > 0 && emu.gemms > 0 && emu.copies > 0 && emu.graphs == 2);  // memsets: 0 at one rank
    CallCounts host = emu_call_counts_of(replay);
    check_call_counts(c.preset + " (replayed)", cost_call_counts(cost_step_launches(c, 1), true), host, replay);
    CHECK(host.graphs == 2 && host.launches + host.gemms < emu.launches + emu.gemms);
}

TEST(cost_emu_tiny_step_calls_match) {
    Config c; preset_tiny(c); c.preset = "tiny";
    c.train_seq_len = 64;  // the full width and depth, fewer positions
    cost_matches_emulated_step(c, 2);
}
// pr600 (BigramHash, SmearGate) at 2 layers of width 128, with EMA, bf16 embedding tables and VARLEN_ATTN
TEST(cost_emu_pr600_step_calls_match) {
    Config c; preset_pr600(c); c.preset = "pr600";
    c.num_layers = 2; c.model_dim = 128; c.num_heads = 4; c.num_kv_heads = 2; c.train_seq_len = 64; c.eval_stride = 32;
    c.swa_steps = 0; c.ema_decay = 0.997f; c.embed_bf16 = 1;  // EMA in place of its SWA
    c.varlen_attn = 1;  // document_starts once per forward, the masked attention kernels
    cost_matches_emulated_step(c, 2);
}

// frontier (loop, lanes, gates, BOS-masked SmearGate, layerwise scale) at 4 layers of width 64, vocab
// 512, with the loop on (its longer sequence runs every op of the shorter one)
TEST(cost_emu_frontier_step_calls_match) {
    Config c; preset_frontier_tiny(c); c.preset = "frontier_tiny";
    c.vocab_size = 512; c.model_dim = 64; c.train_seq_len = 32; c.eval_stride = 16;
    cost_matches_emulated_step(c, 2, true);
}
// The embedding backward's sort on both sides of cub's single-tile limit (the training steps above sort
// ≤ 4,864 pairs; a full batch sorts more, through onesweep's 6 launches and 6 memsets).
TEST(cost_emu_embedding_backward_sort_calls_match) {
    for (int N : {COST_SORT_SINGLE_TILE, COST_SORT_SINGLE_TILE + 1}) {
        int C = 8, V = 64;
        std::vector<int32_t> idx = synthetic_tokens((size_t)N, V, 3);
        std::vector<bf16> dout((size_t)N * C, __float2bfloat16(0.5f));
        Cuda dev;
        float* dtable = (float*)device_alloc(dev, (size_t)V * C * sizeof(float));
        int32_t* didx = (int32_t*)device_alloc(dev, (size_t)N * sizeof(int32_t));
        bf16* ddout = (bf16*)device_alloc(dev, dout.size() * sizeof(bf16));
        device_zero(dev, dtable, (size_t)V * C * sizeof(float));
        to_device(dev, didx, idx.data(), idx.size());
        to_device(dev, ddout, dout.data(), dout.size());
        emu::reset_counts();
        embedding_backward(dev, dtable, ddout, didx, N, C, V, ACCUMULATE);
        EmuCounts e = emu::counts();
        std::vector<float> table((size_t)V * C);
        to_host(dev, table.data(), dtable, table.size());
        device_free(dev, dtable); device_free(dev, didx); device_free(dev, ddout);
        double sum = 0;
        for (float v : table) sum += v;
        CHECK_CLOSE(sum, 0.5 * N * C, 0, 1e-3);  // every position's row landed once
        g_cost = CostLog();
        embedding_backward(Cost{}, cost_region<float>(2), cost_region<CostBf16>(3), cost_region<int32_t>(4), N, C, V,
                           ACCUMULATE);
        CallCounts cost = cost_call_counts(g_cost.entries);
        g_cost = CostLog();
        check_call_counts(test_format("embedding_backward of %d pairs", N), cost, emu_call_counts_of(e), e);
    }
}

#endif  // PGOLF_EMU
