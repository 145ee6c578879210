// CPU reference model: gradients against finite differences, in double precision.

// A config small enough for exhaustive checks that switches every component on.
static Config gradcheck_config(int variant) {
    Config c;
    c.vocab_size = 64; c.num_layers = 4; c.model_dim = 32; c.num_heads = 4; c.num_kv_heads = 2;
    c.mlp_mult = 2.0f; c.rope_dims = 4; c.xsa_last_n = 2; c.smear = 1; c.smear_gate = 1;
    c.bigram_vocab_size = 37; c.bigram_dim = 16; c.tie_embeddings = 1; c.logit_softcap = 3.0f;
    c.train_seq_len = 7; c.train_batch_tokens = 14; c.grad_accum_steps = 1; c.eval_stride = 7;
    c.ttt_chunk_size = 4; c.ttt_eval_seq_len = 7;
    if (variant == 1) {  // untied head, leaky relu², PR #600 bigram, depth recurrence
        c.tie_embeddings = 0; c.mlp_activation = "leaky_relu_sq"; c.bigram_vocab_size = 0; c.bigram_hash_size = 29;
        c.unique_layers = 2; c.named_cores = 1; c.num_layers = 5; c.xsa_last_n = 1; c.rope_dims = 0;
    }
    return c;
}

template <class T> static void randomize(T* p, size_t n, Rng& rng, double scale) {
    for (size_t i = 0; i < n; i++) p[i] = T(scale * rng.normal());
}

// Loss = Σ_n w_n·nll_n for fixed random weights; returns it, leaving dlogits in place.
static double weighted_loss(Model<Cpu<double>>& m, int B, int T) {
    gpt_forward(Cpu<double>{}, m, B, T, true);
    double L = 0;
    for (int n = 0; n < B * T; n++) L += m.acts.loss_weights[n] * m.acts.losses[n];
    return L;
}

static void gradcheck_model(int variant) {
    Config c = gradcheck_config(variant);
    config_validate(c, 1);
    int B = 2, T = 7;
    Model<Cpu<double>> m;
    model_init(Cpu<double>{}, m, c, B, T);
    Rng rng(1234 + variant);
    randomize(m.params, m.nparams, rng, 0.3);  // not the init: zeros there would hide gradients
    for (int n = 0; n < B * T; n++) {
        m.acts.inputs[n] = (int32_t)(rng.uniform() * c.vocab_size);
        m.acts.targets[n] = (int32_t)(rng.uniform() * c.vocab_size);
        m.acts.loss_weights[n] = (float)(0.5 + rng.uniform());
    }
    memset(m.grads, 0, m.nparams * sizeof(double));
    weighted_loss(m, B, T);
    gpt_backward(Cpu<double>{}, m, B, T);
    const double h = 1e-5;
    for (const ParamSpec& p : m.table) {
        // every element of small tensors, a random sample of large ones
        std::vector<size_t> idx;
        if (p.numel <= 96) for (size_t i = 0; i < p.numel; i++) idx.push_back(i);
        else for (int k = 0; k < 96; k++) idx.push_back((size_t)(rng.uniform() * p.numel));
        double num = 0, den = 0;
        for (size_t i : idx) {
            double* w = m.params + p.offset + i;
            double orig = *w;
            *w = orig + h; double lp = weighted_loss(m, B, T);
            *w = orig - h; double lm = weighted_loss(m, B, T);
            *w = orig;
            double fd = (lp - lm) / (2 * h), an = m.grads[p.offset + i];
            num += (fd - an) * (fd - an);
            den += std::max(fd * fd, an * an);
        }
        double rel = std::sqrt(num / std::max(den, 1e-300));
        CHECK_MSG(den > 0, "%s: gradient is identically zero on the checked elements", p.name.c_str());
        CHECK_MSG(rel < 1e-6, "%s: relative error %.3g of the analytic gradient vs finite differences", p.name.c_str(),
                  rel);
    }
}

TEST(model_gradcheck_every_component) { gradcheck_model(0); }
TEST(model_gradcheck_untied_leaky_recurrent) { gradcheck_model(1); }
