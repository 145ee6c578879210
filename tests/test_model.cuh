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
        CHECK_MSG(rel < 1e-6, "%s: relative error %.3g of the analytic gradient vs finite differences", p.name.c_str(), rel);
    }
}

TEST(model_gradcheck_every_component) { gradcheck_model(0); }
TEST(model_gradcheck_untied_leaky_recurrent) { gradcheck_model(1); }

// The backward's buffer rule (gpt_backward): no gradient buffer needs zeroing beforehand. With every
// parameter gradient and every backward scratch buffer poisoned with NaN, a first micro-batch's
// backward (OVERWRITE) gives exactly the gradients of zeroing them and adding (ACCUMULATE), and a
// second micro-batch's (ACCUMULATE) adds to them: twice (to rounding). Both configs: tied and untied heads,
// BigramHash both ways, SmearGate, gates, XSA, and layers sharing a block.
static void poison_backward_scratch(Model<Cpu<double>>& m) {
    double* end = (double*)((char*)m.act_memory + m.act_bytes);
    std::fill(m.acts.d_residual, end, std::nan(""));
}
static void backward_overwrite_matches_accumulate(int variant) {
    Config c = gradcheck_config(variant);
    config_validate(c, 1);
    int B = 2, T = 7;
    Model<Cpu<double>> m;
    model_init(Cpu<double>{}, m, c, B, T);
    Rng rng(4321 + variant);
    randomize(m.params, m.nparams, rng, 0.3);
    for (int n = 0; n < B * T; n++) {
        m.acts.inputs[n] = (int32_t)(rng.uniform() * c.vocab_size);
        m.acts.targets[n] = (int32_t)(rng.uniform() * c.vocab_size);
        m.acts.loss_weights[n] = (float)(0.5 + rng.uniform());
    }
    weighted_loss(m, B, T);
    std::vector<double> dlogits(m.acts.logits, m.acts.logits + (size_t)B * T * c.vocab_size);
    memset(m.grads, 0, m.nparams * sizeof(double));
    gpt_backward(Cpu<double>{}, m, B, T, (Lora<Cpu<double>>*)nullptr, true, ACCUMULATE);
    std::vector<double> want(m.grads, m.grads + m.nparams);
    std::fill(m.grads, m.grads + m.nparams, std::nan(""));
    poison_backward_scratch(m);
    memcpy(m.acts.logits, dlogits.data(), dlogits.size() * sizeof(double));
    gpt_backward(Cpu<double>{}, m, B, T, (Lora<Cpu<double>>*)nullptr, true, OVERWRITE);
    for (const ParamSpec& p : m.table)
        for (size_t i = 0; i < p.numel; i++)
            CHECK_MSG(m.grads[p.offset + i] == want[p.offset + i], "%s[%zu]: overwritten %.17g, zeroed and added %.17g",
                      p.name.c_str(), i, m.grads[p.offset + i], want[p.offset + i]);
    poison_backward_scratch(m);
    memcpy(m.acts.logits, dlogits.data(), dlogits.size() * sizeof(double));
    gpt_backward(Cpu<double>{}, m, B, T, (Lora<Cpu<double>>*)nullptr, true, ACCUMULATE);
    for (const ParamSpec& p : m.table) {  // (a gradient with two writers adds four terms in another order)
        double scale = 0;
        for (size_t i = 0; i < p.numel; i++) scale = std::max(scale, std::fabs(want[p.offset + i]));
        for (size_t i = 0; i < p.numel; i++)
            CHECK_MSG(std::fabs(m.grads[p.offset + i] - 2 * want[p.offset + i]) <= 1e-13 * scale,
                      "%s[%zu]: second micro-batch %.17g, expected %.17g", p.name.c_str(), i, m.grads[p.offset + i],
                      2 * want[p.offset + i]);
    }
    model_free(Cpu<double>{}, m);
}
TEST(model_backward_overwrites_without_zeroing) {
    backward_overwrite_matches_accumulate(0);
    backward_overwrite_matches_accumulate(1);
}
