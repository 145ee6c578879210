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

// The backward's buffer rule (gpt_backward): no gradient buffer needs zeroing beforehand. With every
// parameter gradient and every backward scratch buffer poisoned with NaN, a first micro-batch's
// backward (OVERWRITE) gives exactly the gradients of zeroing them and adding (ACCUMULATE), and a
// second micro-batch's (ACCUMULATE) adds to them: twice (to rounding). Configs: tied and untied heads,
// BigramHash both ways, SmearGate, gates, XSA, layers sharing a block (here); the frontier's features
// with the loop on and off (test_frontier.cuh). ids: the input tokens (null: random).
static void poison_backward_scratch(Model<Cpu<double>>& m) {
    double* end = (double*)((char*)m.act_memory + m.act_bytes);
    std::fill(m.acts.d_residual, end, std::nan(""));
}
static void backward_overwrite_matches_accumulate(Config c, bool looping = false, const int32_t* ids = nullptr) {
    config_validate(c, 1);
    int B = 2, T = 7;
    Model<Cpu<double>> m;
    model_init(Cpu<double>{}, m, c, B, T);
    m.looping = looping;
    Rng rng(4321 + c.num_layers + looping);
    randomize(m.params, m.nparams, rng, 0.3);
    for (int n = 0; n < B * T; n++) {
        m.acts.inputs[n] = ids ? ids[n] : (int32_t)(rng.uniform() * c.vocab_size);
        m.acts.targets[n] = (int32_t)(rng.uniform() * c.vocab_size);
        m.acts.loss_weights[n] = (float)(0.5 + rng.uniform());
    }
    weighted_loss(m, B, T);
    std::vector<double> dlogits(m.acts.logits, m.acts.logits + (size_t)B * T * c.vocab_size);
    memset(m.grads, 0, m.nparams * sizeof(double));
    poison_backward_scratch(m);  // (a buffer read before its first write makes the reference NaN too)
    gpt_backward(Cpu<double>{}, m, B, T, (Lora<Cpu<double>>*)nullptr, true, ACCUMULATE);
    std::vector<double> want(m.grads, m.grads + m.nparams);
    std::fill(m.grads, m.grads + m.nparams, std::nan(""));
    poison_backward_scratch(m);
    memcpy(m.acts.logits, dlogits.data(), dlogits.size() * sizeof(double));
    gpt_backward(Cpu<double>{}, m, B, T, (Lora<Cpu<double>>*)nullptr, true, OVERWRITE);
    for (const ParamSpec& p : m.table)
        for (size_t i = 0; i < p.numel; i++)
            CHECK_MSG(m.grads[p.offset + i] == want[p.offset + i],
                      "%s[%zu] (looping %d): overwritten %.17g, zeroed and added %.17g", p.name.c_str(), i, looping,
                      m.grads[p.offset + i], want[p.offset + i]);
    poison_backward_scratch(m);
    memcpy(m.acts.logits, dlogits.data(), dlogits.size() * sizeof(double));
    gpt_backward(Cpu<double>{}, m, B, T, (Lora<Cpu<double>>*)nullptr, true, ACCUMULATE);
    for (const ParamSpec& p : m.table) {  // (a gradient with two writers adds four terms in another order)
        double scale = 0;
        for (size_t i = 0; i < p.numel; i++) scale = std::max(scale, std::fabs(want[p.offset + i]));
        for (size_t i = 0; i < p.numel; i++)
            CHECK_MSG(std::fabs(m.grads[p.offset + i] - 2 * want[p.offset + i]) <= 1e-13 * scale,
                      "%s[%zu] (looping %d): second micro-batch %.17g, expected %.17g", p.name.c_str(), i, looping,
                      m.grads[p.offset + i], 2 * want[p.offset + i]);
    }
    model_free(Cpu<double>{}, m);
}

// --- Document-masked attention (VARLEN_ATTN) -------------------------------------------------------
// The document starts on the CPU: the last BOS at or before each position, 0 before the first.
TEST(document_starts_are_the_last_bos) {
    const int B = 2, T = 9;
    std::vector<int32_t> tokens = {5, 1, 4, 4, 1, 1, 8, 9, 9,   // row 0: BOS at 1, 4, 5
                                   1, 6, 6, 6, 6, 6, 6, 6, 1};  // row 1: BOS at 0 and 8
    std::vector<int32_t> want = {0, 1, 1, 1, 4, 5, 5, 5, 5, 0, 0, 0, 0, 0, 0, 0, 0, 8}, got(B * T, -1);
    document_starts(Cpu<float>{}, got.data(), tokens.data(), B, T);
    CHECK(got == want);
}

// Rows with documents of 1, 2, 3 and 5 positions, boundaries anywhere (B = 2, T = 11).
static const int32_t ATTN_DOC_TOKENS[2][11] = {{1, 9, 9, 9, 1, 1, 9, 9, 9, 1, 9},   // documents from 0, 4, 5, 9
                                               {9, 9, 9, 1, 9, 9, 9, 1, 9, 9, 9}};  // from 0, 3, 7
template <class T> static std::vector<T> attn_random(size_t n, Rng& rng) {
    std::vector<T> x(n);
    for (T& v : x) v = T(rng.normal());
    return x;
}

// Masked attention is attention over each document alone: every output row and lse of the masked op
// equals the unmasked op run on that document as a sequence of its own (fp64).
TEST(attention_documents_equal_separate_sequences) {
    const int B = 2, T = 11, H = 4, Hk = 2, hd = 4, group = H / Hk;
    Rng rng(91);
    std::vector<int32_t> doc(B * T);
    document_starts(Cpu<double>{}, doc.data(), &ATTN_DOC_TOKENS[0][0], B, T);
    std::vector<double> q = attn_random<double>((size_t)B * T * H * hd, rng),
                        k = attn_random<double>((size_t)B * T * Hk * hd, rng);
    std::vector<double> v = attn_random<double>(k.size(), rng), out(q.size()), lse((size_t)B * H * T);
    attention_forward(Cpu<double>{}, out.data(), lse.data(), q.data(), k.data(), v.data(), B, T, H, Hk, hd, doc.data());
    int checked = 0;
    for (int b = 0; b < B; b++)
        for (int s0 = 0; s0 < T;) {
            int s1 = s0 + 1;
            while (s1 < T && ATTN_DOC_TOKENS[b][s1] != BOS_ID) s1++;
            int n = s1 - s0;  // one document as its own sequence
            std::vector<double> dq((size_t)n * H * hd), dk((size_t)n * Hk * hd), dv(dk.size()), dout(dq.size()),
                dl((size_t)H * n);
            for (int t = 0; t < n; t++) {
                memcpy(&dq[(size_t)t * H * hd], &q[((size_t)b * T + s0 + t) * H * hd], H * hd * sizeof(double));
                memcpy(&dk[(size_t)t * Hk * hd], &k[((size_t)b * T + s0 + t) * Hk * hd], Hk * hd * sizeof(double));
                memcpy(&dv[(size_t)t * Hk * hd], &v[((size_t)b * T + s0 + t) * Hk * hd], Hk * hd * sizeof(double));
            }
            attention_forward(Cpu<double>{}, dout.data(), dl.data(), dq.data(), dk.data(), dv.data(), 1, n, H, Hk, hd);
            for (int t = 0; t < n; t++)
                for (int h = 0; h < H; h++) {
                    CHECK_MSG(std::fabs(lse[((size_t)b * H + h) * T + s0 + t] - dl[(size_t)h * n + t]) < 1e-12,
                              "row %d position %d head %d: lse differs from its document's own", b, s0 + t, h);
                    for (int i = 0; i < hd; i++)
                        CHECK_MSG(std::fabs(out[(((size_t)b * T + s0 + t) * H + h) * hd + i] -
                                            dout[((size_t)t * H + h) * hd + i]) < 1e-12,
                                  "row %d position %d head %d: output differs from its document's own", b, s0 + t, h);
                    if (t == 0)  // a document's first position sees itself only: out = its own value
                        for (int i = 0; i < hd; i++)
                            CHECK(std::fabs(out[(((size_t)b * T + s0) * H + h) * hd + i] -
                                            v[(((size_t)b * T + s0) * Hk + h / group) * hd + i]) < 1e-12);
                }
            checked++;
            s0 = s1;
        }
    CHECK(checked == 7);
}

// dq, dk, dv of the masked op against central differences of L = Σ w ⊙ out (fp64, every element).
TEST(attention_documents_gradcheck) {
    const int B = 2, T = 11, H = 4, Hk = 2, hd = 4;
    Rng rng(92);
    std::vector<int32_t> doc(B * T);
    document_starts(Cpu<double>{}, doc.data(), &ATTN_DOC_TOKENS[0][0], B, T);
    std::vector<double> q = attn_random<double>((size_t)B * T * H * hd, rng),
                        k = attn_random<double>((size_t)B * T * Hk * hd, rng);
    std::vector<double> v = attn_random<double>(k.size(), rng), w = attn_random<double>(q.size(), rng);
    std::vector<double> out(q.size()), lse((size_t)B * H * T), dq(q.size(), 0.0), dk(k.size(), 0.0), dv(v.size(), 0.0);
    auto loss = [&]() {
        attention_forward(Cpu<double>{}, out.data(), lse.data(), q.data(), k.data(), v.data(), B, T, H, Hk, hd,
                          doc.data());
        double L = 0;
        for (size_t i = 0; i < out.size(); i++) L += w[i] * out[i];
        return L;
    };
    loss();
    attention_backward(Cpu<double>{}, dq.data(), dk.data(), dv.data(), w.data(), q.data(), k.data(), v.data(),
                       out.data(), lse.data(), B, T, H, Hk, hd, doc.data());
    const double h = 1e-6;
    std::vector<double>* xs[3] = {&q, &k, &v};
    std::vector<double>* gs[3] = {&dq, &dk, &dv};
    for (int x = 0; x < 3; x++) {
        double num = 0, den = 0;
        for (size_t i = 0; i < xs[x]->size(); i++) {
            double orig = (*xs[x])[i];
            (*xs[x])[i] = orig + h; double lp = loss();
            (*xs[x])[i] = orig - h; double lm = loss();
            (*xs[x])[i] = orig;
            double fd = (lp - lm) / (2 * h), an = (*gs[x])[i];
            num += (fd - an) * (fd - an);
            den += std::max(fd * fd, an * an);
        }
        double rel = std::sqrt(num / den);
        CHECK_MSG(rel < 1e-7, "%s: relative error %.3g against finite differences",
                  x == 0   ? "dq"
                  : x == 1 ? "dk"
                           : "dv",
                  rel);
    }
}

// The model under VARLEN_ATTN: changing the tokens of a row's first document changes no loss of its second
// document (bit for bit), and does without the mask. Smear and bigrams (which read the previous token
// across a BOS, the frontier's BOS-masked SmearGate) are off.
TEST(model_documents_do_not_see_each_other) {
    for (int varlen : {1, 0}) {
        Config c = gradcheck_config(0);
        c.smear = 0; c.bigram_vocab_size = 0; c.varlen_attn = varlen;
        config_validate(c, 1);
        const int B = 2, T = 7;
        Model<Cpu<double>> m;
        model_init(Cpu<double>{}, m, c, B, T);
        Rng rng(5);
        randomize(m.params, m.nparams, rng, 0.3);
        for (int n = 0; n < B * T; n++) {
            m.acts.inputs[n] = 2 + (int32_t)(rng.uniform() * (c.vocab_size - 2));
            m.acts.targets[n] = (int32_t)(rng.uniform() * c.vocab_size);
        }
        m.acts.inputs[7 + 3] = BOS_ID;  // row 1: document 1 is positions 0–2, document 2 positions 3–6
        gpt_forward(Cpu<double>{}, m, B, T, false);
        std::vector<double> before(m.acts.losses, m.acts.losses + B * T);
        m.acts.inputs[7 + 0] = m.acts.inputs[7 + 0] == 5 ? 6 : 5;
        m.acts.inputs[7 + 2] = m.acts.inputs[7 + 2] == 5 ? 6 : 5;
        gpt_forward(Cpu<double>{}, m, B, T, false);
        bool doc1_changed = false, doc2_changed = false;
        for (int t = 0; t < 3; t++) doc1_changed |= m.acts.losses[7 + t] != before[7 + t];
        for (int t = 3; t < 7; t++) doc2_changed |= m.acts.losses[7 + t] != before[7 + t];
        for (int t = 0; t < 7; t++) CHECK(m.acts.losses[t] == before[t]);  // row 0 is another sequence
        CHECK(doc1_changed);
        CHECK_MSG(doc2_changed == !varlen, "VARLEN_ATTN=%d: document 2's losses %s when document 1's tokens change",
                  varlen, doc2_changed ? "changed" : "did not change");
        model_free(Cpu<double>{}, m);
    }
}
