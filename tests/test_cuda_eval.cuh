// Every EVAL_MODE on the CUDA path against the CPU reference (the model of tests/test_eval.cuh, at
// head dim 16, the CUDA kernels' smallest): the same positions scored, the losses within bf16
// tolerance; LoRA TTT with every target (q, k, v, o, mlp_up, mlp_down, lm_head: PR #467's and PR
// #600's setups are subsets) and full TTT train on the GPU between chunks.
#ifdef PGOLF_CUDA

// Each position's chunk within its document (LoRA TTT's chunks restart at every BOS).
static std::vector<int> eval_chunk_in_document(const std::vector<uint16_t>& t, int C) {
    std::vector<int> chunk(t.size() - 1);
    size_t start = 0;
    for (size_t j = 0; j + 1 < t.size(); j++) {
        if (t[j] == BOS_ID) start = j;
        chunk[j] = (int)((j - start) / C);
    }
    return chunk;
}

TEST(cuda_eval_every_mode_matches_cpu) {
    REQUIRE_GPU();
    Config c = eval_test_config();
    c.num_heads = 2; c.num_kv_heads = 1;  // head dim 16
    std::vector<uint16_t> t = eval_test_stream(EVAL_DOC_LENS, c.vocab_size, 3, true);
    EvalData d = eval_test_data(t, c.vocab_size);
    std::vector<int> chunk = eval_chunk_in_document(t, c.ttt_chunk_size);
    struct { const char* mode; float lr; const char* lora_opt; } runs[] = {
        {"standard", 0, ""}, {"sliding", 0, ""}, {"lora_ttt", 0.02f, "adam"}, {"lora_ttt", 0.02f, "sgd"},
        {"lora_ttt", 0, "adam"}, {"full_ttt", 0.02f, ""}, {"full_ttt", 0, ""}};  // full TTT: SGD (eval_test_config)
    for (auto run : runs) {
        const char* mode = run.mode;
        c.ttt_lora_lr = c.ttt_lr = run.lr;  // lr 0: the TTT machinery runs and must leave the base model's scores
        if (*run.lora_opt) c.ttt_lora_optimizer = run.lora_opt;
        char tag[64];
        snprintf(tag, sizeof tag, "%s lr %g%s%s", mode, run.lr, *run.lora_opt ? " " : "", run.lora_opt);
        Model<Cpu<float>> mc;
        eval_test_model(mc, c);
        Model<Cuda> mg;
        model_init_for_run(Cuda{}, mg, c);
        to_device(Cuda{}, mg.params, mc.params, mc.nparams);
        refresh_compute_weights(Cuda{}, mg, false);
        NllRecord rc, rg;
        EvalResult a = eval_run_mode(mode, mc, d, rc), b = eval_run_mode(mode, mg, d, rg);
        eval_test_model_free(mc);
        model_free(Cuda{}, mg);
        CHECK_MSG(a.tokens == b.tokens && a.tokens > 0, "%s: %.0f positions scored on the GPU, %.0f on the CPU", mode,
                  b.tokens, a.tokens);
        // Adam's first step is lr·sign(g) (eps 1e-10): bf16 noise flips the sign of ~1% of the LoRA gradient's
        // elements (cuda_lora_gradients_match_cpu), each a 2·lr difference, and later chunks are scored by
        // adapters that grew apart (measured, mean |ΔNLL| by chunk: 0.016, 0.018, 0.029, 0.028, ..., 0.21 past
        // chunk 7; SGD at the same lr: 0.013–0.018 in every chunk). Under Adam only each document's first chunk,
        // scored before any update, is compared per position; SGD, whose update is linear in the gradient, is
        // compared at every position.
        bool adam_lora = !strcmp(run.lora_opt, "adam") && run.lr > 0;
        double worst = 0, sum = 0, n = 0;
        size_t at = 0;
        for (size_t j = 0; j < rc.nll.size(); j++) {
            CHECK_MSG(std::isnan(rc.nll[j]) == std::isnan(rg.nll[j]), "%s: position %zu scored on one device only", tag,
                      j);
            if (std::isnan(rc.nll[j]) || (adam_lora && chunk[j] > 0)) continue;
            double e = std::fabs(rc.nll[j] - rg.nll[j]);
            sum += e;
            n++;
            if (e > worst) { worst = e; at = j; }
        }
        double mean = sum / n;
        if (getenv("PGOLF_CUDA_TEST_VERBOSE"))
            printf("  %s val_loss cpu %.6f gpu %.6f, mean |ΔNLL| %.4f over %.0f positions, worst %zu: %.4f vs %.4f\n",
                   tag, a.val_loss, b.val_loss, mean, n, at, rc.nll[at], rg.nll[at]);
        // bf16 activations and weights (~0.4% per value) on a random model with sharp distributions: ~0.02 nat
        // per position, ~0.1 on the worst. Full TTT (SGD) and LoRA TTT with SGD keep that (measured 0.017 mean).
        CHECK_MSG(std::fabs(a.val_loss - b.val_loss) <= 1e-2 * a.val_loss, "%s: val_loss GPU %.6f vs CPU %.6f", tag,
                  b.val_loss, a.val_loss);
        CHECK_MSG(n >= 60, "%s: only %.0f positions compared", tag, n);
        CHECK_MSG(mean <= 0.03, "%s: mean |NLL difference| %.4f per position (worst %zu: GPU %.5f vs CPU %.5f)",
                  tag, mean, at, rg.nll[at], rc.nll[at]);
        CHECK_MSG(worst <= 0.2, "%s: position %zu NLL GPU %.5f vs CPU %.5f", tag, at, rg.nll[at], rc.nll[at]);
    }
}

// Sliding evaluation runs the head (final norm, projection, softcap CE) on the scored positions only: a
// forward scoring some rows gives the full forward's NLLs at those rows (CPU: to fp32 rounding; GPU: within
// bf16 tolerance of the CPU), and leaves the logits of the other rows uncomputed.
TEST(cuda_forward_scores_only_the_rows_asked) {
    REQUIRE_GPU();
    Config c = eval_test_config();
    c.num_heads = 2; c.num_kv_heads = 1;  // head dim 16
    Model<Cpu<float>> mc;
    eval_test_model(mc, c);
    Model<Cuda> mg;
    model_init_for_run(Cuda{}, mg, c);
    to_device(Cuda{}, mg.params, mc.params, mc.nparams);
    refresh_compute_weights(Cuda{}, mg, false);
    int B = 2, T = 32, N = B * T;
    Rng rng(19);
    std::vector<int32_t> x(N), y(N);
    for (int n = 0; n < N; n++) {
        x[n] = (int32_t)(rng.uniform() * c.vocab_size);
        y[n] = (int32_t)(rng.uniform() * c.vocab_size);
    }
    std::vector<int32_t> rows = {0, 5, 24, 31, 32, 40, 62, 63}, yr;
    for (int32_t r : rows) yr.push_back(y[r]);
    std::vector<float> full, part, gpu;
    forward_nll(Cpu<float>{}, mc, x, y, B, T, full);
    std::fill(mc.acts.logits, mc.acts.logits + (size_t)N * c.vocab_size, NAN);
    forward_nll_rows(Cpu<float>{}, mc, x, rows, yr, B, T, part);
    forward_nll_rows(Cuda{}, mg, x, rows, yr, B, T, gpu);
    size_t R = rows.size();
    CHECK(part.size() == R && gpu.size() == R);
    for (size_t r = 0; r < R && r < part.size() && r < gpu.size(); r++) {
        float want = full[rows[r]];
        CHECK_MSG(std::fabs(part[r] - want) <= 1e-5f * std::fabs(want), "row %d: CPU %.7g, full forward %.7g", rows[r],
                  part[r], want);
        CHECK_MSG(std::fabs(gpu[r] - want) <= 0.2f, "row %d: GPU %.5f, CPU %.5f", rows[r], gpu[r], want);
    }
    bool untouched = true;
    for (size_t i = R * c.vocab_size; i < (size_t)N * c.vocab_size; i++) untouched &= std::isnan(mc.acts.logits[i]);
    CHECK_MSG(untouched, "the head computed logits beyond the %zu scored rows", R);
    eval_test_model_free(mc);
    model_free(Cuda{}, mg);
}

// One LoRA TTT step's adapter gradients, GPU against the CPU reference, every target and layer: B
// random (so dA is not identically zero) and B = 0 (the first step of every document: dA must be
// exactly 0, as dtmp = dout·B is). The same weighted loss as lora_batch (the mean over a chunk of 8
// positions, two documents). bf16 activations round ~2⁻⁹ per value across the ~20 stored
// intermediates on a gradient's path, and the sums over positions cancel: measured 1–7% relative
// error per tensor; a wrong transpose, document offset or dropped term is O(1).
TEST(cuda_lora_gradients_match_cpu) {
    REQUIRE_GPU();
    Config c = eval_test_config();
    c.num_heads = 2; c.num_kv_heads = 1;  // head dim 16
    std::vector<uint16_t> t = eval_test_stream(EVAL_DOC_LENS, c.vocab_size, 3, true);
    int k = 2, W = c.ttt_eval_seq_len;
    std::vector<int32_t> x(k * W), y(k * W);
    std::vector<float> w(k * W, 0.0f), nll;
    for (int i = 0; i < k * W; i++) { x[i] = t[10 + i]; y[i] = t[11 + i]; }
    for (int b = 0; b < k; b++)
        for (int i = 8; i < 16; i++) w[b * W + i] = 1.0f / 8;
    for (int random_B = 0; random_B < 2; random_B++) {
        Model<Cpu<float>> mc;
        eval_test_model(mc, c);
        Model<Cuda> mg;
        model_init_for_run(Cuda{}, mg, c);
        to_device(Cuda{}, mg.params, mc.params, mc.nparams);
        refresh_compute_weights(Cuda{}, mg, false);
        LoraState<Cpu<float>> sc;
        LoraState<Cuda> sg;
        lora_state_init(Cpu<float>{}, sc, c, k, (size_t)k * W);
        lora_state_init(Cuda{}, sg, c, k, (size_t)k * W);
        lora_reset(Cpu<float>{}, sc);
        lora_reset(Cuda{}, sg);
        Rng rng(99);
        if (random_B) {
            for (size_t i = sc.nA; i < sc.lo.nparams; i++) sc.lo.params[i] = (float)(0.1 * (2 * rng.uniform() - 1));
            to_device(Cuda{}, sg.lo.params, sc.lo.params, sc.lo.nparams);
            lora_refresh_compute(Cuda{}, sg.lo);
        }
        memcpy(mc.acts.loss_weights, w.data(), w.size() * sizeof(float));
        to_device(Cuda{}, mg.acts.loss_weights, w.data(), w.size());
        forward_nll(Cpu<float>{}, mc, x, y, k, W, nll, &sc.lo, true);
        forward_nll(Cuda{}, mg, x, y, k, W, nll, &sg.lo, true);
        memset(sc.lo.grads, 0, sc.lo.nparams * sizeof(float));
        device_zero(Cuda{}, sg.lo.grads, sg.lo.nparams * sizeof(float));
        gpt_backward(Cpu<float>{}, mc, k, W, &sc.lo, /*param_grads=*/false);
        gpt_backward(Cuda{}, mg, k, W, &sg.lo, /*param_grads=*/false);
        std::vector<float> gg(sc.lo.nparams);
        to_host(Cuda{}, gg.data(), sg.lo.grads, gg.size());
        for (int tt = 0; tt < LORA_NUM; tt++)
            for (size_t l = 0; l < sc.lo.A[tt].size(); l++)
                for (int which = 0; which < 2; which++) {
                    size_t off = (which ? sc.lo.B[tt][l] : sc.lo.A[tt][l]) - sc.lo.params;
                    size_t len = (size_t)k * sc.lo.rank * (which ? sc.lo.out_dim[tt] : sc.lo.in_dim[tt]);
                    double e2 = 0, g2 = 0;
                    for (size_t i = off; i < off + len; i++) {
                        e2 += ((double)sc.lo.grads[i] - gg[i]) * ((double)sc.lo.grads[i] - gg[i]);
                        g2 += (double)sc.lo.grads[i] * sc.lo.grads[i];
                    }
                    const char* name = which ? "B" : "A";
                    if (!random_B && !which) {
                        CHECK_MSG(g2 == 0 && e2 == 0, "B = 0: %s layer %zu dA not zero (CPU %.3g, GPU differs by %.3g)",
                                  LORA_TARGET_NAMES[tt], l, std::sqrt(g2), std::sqrt(e2));
                        continue;
                    }
                    double rel = std::sqrt(e2 / std::max(g2, 1e-300));
                    if (getenv("PGOLF_CUDA_TEST_VERBOSE"))
                        printf("  B %s: %s layer %zu d%s |g| %.3g, relative error %.4f\n", random_B ? "random" : "0",
                               LORA_TARGET_NAMES[tt], l, name, std::sqrt(g2), rel);
                    CHECK_MSG(g2 > 0, "%s layer %zu d%s: zero gradient on the CPU", LORA_TARGET_NAMES[tt], l, name);
                    CHECK_MSG(rel <= 0.15, "B %s: %s layer %zu d%s: GPU relative error %.4f against the CPU",
                              random_B ? "random" : "0", LORA_TARGET_NAMES[tt], l, name, rel);
                }
        lora_state_free(Cpu<float>{}, sc);
        lora_state_free(Cuda{}, sg);
        eval_test_model_free(mc);
        model_free(Cuda{}, mg);
    }
}

#endif  // PGOLF_CUDA
