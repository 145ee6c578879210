// Every EVAL_MODE on the CUDA path against the CPU reference (the model of tests/test_eval.cuh, at
// head dim 16, the CUDA kernels' smallest): the same positions scored, the losses within bf16
// tolerance; LoRA TTT with every target (q, k, v, o, mlp_up, mlp_down, lm_head: PR #467's and PR
// #600's setups are subsets) and full TTT train on the GPU between chunks.
#ifdef PGOLF_CUDA

TEST(cuda_eval_every_mode_matches_cpu) {
    REQUIRE_GPU();
    Config c = eval_test_config();
    c.num_heads = 2; c.num_kv_heads = 1;  // head dim 16
    std::vector<uint16_t> t = eval_test_stream(EVAL_DOC_LENS, c.vocab_size, 3, true);
    EvalData d = eval_test_data(t, c.vocab_size);
    for (const char* mode : {"standard", "sliding", "lora_ttt", "full_ttt"}) {
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
        CHECK_MSG(a.tokens == b.tokens && a.tokens > 0, "%s: %.0f positions scored on the GPU, %.0f on the CPU", mode, b.tokens, a.tokens);
        double worst = 0;
        size_t at = 0;
        for (size_t j = 0; j < rc.nll.size(); j++) {
            CHECK_MSG(std::isnan(rc.nll[j]) == std::isnan(rg.nll[j]), "%s: position %zu scored on one device only", mode, j);
            if (std::isnan(rc.nll[j])) continue;
            double e = std::fabs(rc.nll[j] - rg.nll[j]);
            if (e > worst) { worst = e; at = j; }
        }
        if (getenv("PGOLF_CUDA_TEST_VERBOSE"))
            printf("  %s val_loss cpu %.6f gpu %.6f, worst position %zu: %.4f vs %.4f\n", mode, a.val_loss, b.val_loss, at, rc.nll[at], rg.nll[at]);
        // bf16 activations and weights: ~0.4% per value, a few % on one position's NLL after TTT updates
        CHECK_MSG(std::fabs(a.val_loss - b.val_loss) <= 1e-2 * a.val_loss, "%s: val_loss GPU %.6f vs CPU %.6f", mode, b.val_loss, a.val_loss);
        CHECK_MSG(worst <= 0.05 + 0.02 * std::fabs(rc.nll[at]), "%s: position %zu NLL GPU %.5f vs CPU %.5f", mode, at, rg.nll[at], rc.nll[at]);
    }
}

#endif  // PGOLF_CUDA
