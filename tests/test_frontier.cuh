// CONFIG=frontier (PR #1855's model) on the CPU reference: its parameter count against the record's log,
// the block sequence of the depth recurrence, the warm-down by fraction, and the new ops' gradients.

static Config frontier_config(const char* preset) {
    Config c;
    for (const Preset& p : PRESETS)
        if (!strcmp(p.name, preset)) p.apply(c);
    return c;
}

// The record's log prints model_params:35945671 for this shape (train_seed42.log).
TEST(frontier_param_count_matches_record) {
    Config c = frontier_config("frontier");
    config_validate(c, 8);
    std::vector<ParamSpec> t = build_param_table(c);
    size_t total = 0;
    for (const ParamSpec& p : t) total += p.numel;
    CHECK_MSG(total == 35945671, "CONFIG=frontier has %zu parameters, the record's log 35,945,671", total);
    for (const char* name : {"skip_gates", "parallel_post_lambdas", "parallel_resid_lambdas", "smear_lambda",
                             "smear_gate.weight", "blocks.10.attn.attn_gate_w"}) {
        bool found = false;
        for (const ParamSpec& p : t) found |= p.name == name;
        CHECK_MSG(found, "no tensor %s", name);
    }
}

// The record logs encoder:[0, 1, 2, 3, 4, 5, 3, 4] decoder:[5, 3, 4, 5, 6, 7, 8, 9, 10] once looping is on.
TEST(frontier_block_sequence) {
    Config c = frontier_config("frontier");
    int want[] = {0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10};
    CHECK(c.num_virtual(true) == 17 && c.num_virtual(false) == 11 && c.num_encoder(true) == 8);
    for (int v = 0; v < 17; v++)
        CHECK_MSG(c.block_of(v, true) == want[v], "virtual %d: block %d, expected %d", v, c.block_of(v, true), want[v]);
    for (int v = 0; v < 11; v++) CHECK(c.block_of(v, false) == v);
    // skips: 8 weights; 5 used before looping (encoder 5, decoder 6), all 8 after (encoder 8, decoder 9)
    CHECK(c.num_skip_weights() == 8 && c.num_skips(false) == 5 && c.num_skips(true) == 8);
    c.num_loops = 0;
    CHECK(c.num_skip_weights() == 5 && c.num_virtual(true) == 11);
}

// lr = 1 until 15% of training, then (1 − frac)/0.85 (PR #1855's lr_mul without MIN_LR).
TEST(frontier_warmdown_frac) {
    Config c = frontier_config("frontier");
    c.max_wallclock_seconds = 0; c.iterations = 1000; c.min_lr = 0;  // (the preset's MIN_LR floor: test_train.cuh)
    CHECK(lr_multiplier(c, 0, 0) == 1.0 && lr_multiplier(c, 149, 0) == 1.0);
    CHECK(std::fabs(lr_multiplier(c, 150, 0) - 1.0) < 1e-12);
    CHECK(std::fabs(lr_multiplier(c, 575, 0) - 0.5) < 1e-12);
    CHECK(lr_multiplier(c, 1000, 0) == 0.0);
    c.max_wallclock_seconds = 600;  // fraction of the wall clock: 300 s of 600 → (1 − 0.5)/0.85
    CHECK(std::fabs(lr_multiplier(c, 7, 300000.0) - 0.5 / 0.85) < 1e-12);
}

// Finite differences (fp64) of the new ops' backward: each op's loss Σ r⊙out for random r.
TEST(frontier_ops_gradcheck) {
    Rng rng(81);
    Cpu<double> dev;
    const double h = 1e-6;
    auto check = [&](const char* what, std::vector<double>& param, auto&& loss,
                     const std::vector<double>& analytic) {
        double num = 0, den = 0;
        for (size_t i = 0; i < param.size(); i++) {
            double o = param[i];
            param[i] = o + h; double lp = loss();
            param[i] = o - h; double lm = loss();
            param[i] = o;
            double fd = (lp - lm) / (2 * h);
            num += (fd - analytic[i]) * (fd - analytic[i]);
            den += std::max(fd * fd, analytic[i] * analytic[i]);
        }
        CHECK_MSG(den > 0 && std::sqrt(num / den) < 1e-7, "%s: relative error %.3g against finite differences", what,
                  std::sqrt(num / std::max(den, 1e-300)));
    };
    auto randv = [&](size_t n, double s) { std::vector<double> v(n); randomize(v.data(), n, rng, s); return v; };
    auto dot = [](const std::vector<double>& a, const std::vector<double>& b) {
        double s = 0;
        for (size_t i = 0; i < a.size(); i++) s += a[i] * b[i];
        return s;
    };
    {   // BOS-masked SmearGate: x, w, λ
        int B = 2, T = 6, C = 5, W = 3, N = B * T;
        std::vector<int32_t> ids = {1, 7, 8, 1, 9, 4, 5, 1, 1, 3, 2, 6};
        std::vector<double> x = randv(N * C, 1), w = randv(W, 1), lam = {0.8}, r = randv(N * C, 1), out(N * C);
        auto loss = [&]() {
            smear_bos_forward(dev, out.data(), x.data(), ids.data(), w.data(), lam.data(), N, T, C, W);
            return dot(out, r);
        };
        std::vector<double> dx(N * C), dw(W, 0.0), dl(1, 0.0);
        smear_bos_backward(dev, dx.data(), dw.data(), dl.data(), r.data(), x.data(), ids.data(), w.data(), lam.data(),
                           N, T, C, W, OVERWRITE, OVERWRITE);
        check("smear_bos dx", x, loss, dx);
        check("smear_bos dw", w, loss, dw);
        check("smear_bos dlambda", lam, loss, dl);
    }
    {   // SparseAttnGate: y, x (first GW dims), Wg
        int N = 4, H = 3, hd = 4, C = H * hd, GW = 5;
        std::vector<double> y = randv(N * C, 1), x = randv(N * C, 1), wg = randv(H * GW, 1), r = randv(N * C, 1);
        std::vector<double> out(N * C);
        auto loss = [&]() {
            attn_gate_forward(dev, out.data(), y.data(), x.data(), wg.data(), N, H, hd, C, GW, 0.5f);
            return dot(out, r);
        };
        std::vector<double> dy(N * C), dx(N * C, 0.0), dwg(H * GW, 0.0), dz(N * H);
        attn_gate_backward(dev, dy.data(), dz.data(), dwg.data(), r.data(), y.data(), x.data(), wg.data(), N, H, hd, C,
                           GW, 0.5f, OVERWRITE);
        attn_gate_backward_input(dev, dx.data(), dz.data(), wg.data(), N, H, C, GW);
        check("attn_gate dy", y, loss, dy);
        check("attn_gate dx", x, loss, dx);
        check("attn_gate dwg", wg, loss, dwg);
    }
    {   // gated skip: x, skip, w, gate
        int N = 3, C = 4;
        std::vector<double> x = randv(N * C, 1), sk = randv(N * C, 1), w = randv(C, 1), g = randv(C, 1);
        std::vector<double> r = randv(N * C, 1), out(N * C);
        auto loss = [&]() {
            skip_gate_forward(dev, out.data(), x.data(), sk.data(), w.data(), g.data(), N, C);
            return dot(out, r);
        };
        std::vector<double> dx = randv(N * C, 1), ds(N * C, 0.0), dw(C, 0.0), dg(C, 0.0);  // dx: overwritten
        skip_gate_backward(dev, dx.data(), ds.data(), dw.data(), dg.data(), r.data(), x.data(), sk.data(), w.data(),
                           g.data(), N, C, OVERWRITE, OVERWRITE);
        check("skip_gate dx", x, loss, dx);
        check("skip_gate dskip", sk, loss, ds);
        check("skip_gate dw", w, loss, dw);
        check("skip_gate dgate", g, loss, dg);
    }
    {   // parallel lanes: both lanes, both branches, their scales, resid and post lambdas
        int N = 3, C = 4;
        size_t n = N * C;
        std::vector<double> l0 = randv(n, 1), l1 = randv(n, 1), a = randv(n, 1), m = randv(n, 1);
        std::vector<double> sa = randv(C, 1), sm = randv(C, 1);
        std::vector<double> rs = randv(2, 1), po = randv(4, 1), r0 = randv(n, 1), r1 = randv(n, 1), o0(n), o1(n);
        auto loss = [&]() {
            lanes_forward(dev, o0.data(), o1.data(), l0.data(), l1.data(), a.data(), m.data(), sa.data(), sm.data(),
                          rs.data(), po.data(), N, C);
            return dot(o0, r0) + dot(o1, r1);
        };
        std::vector<double> g0 = r0, g1 = r1, da(n), dm(n), dsa(C, 0.0), dsm(C, 0.0), dr(2, 0.0), dp(4, 0.0);
        lanes_backward(dev, g0.data(), g1.data(), da.data(), dm.data(), dsa.data(), dsm.data(), dr.data(), dp.data(),
                       l0.data(), l1.data(), a.data(), m.data(), sa.data(), sm.data(), rs.data(), po.data(), N, C,
                       OVERWRITE, OVERWRITE, OVERWRITE, OVERWRITE);
        check("lanes dlane0", l0, loss, g0);
        check("lanes dlane1", l1, loss, g1);
        check("lanes da", a, loss, da);
        check("lanes dm", m, loss, dm);
        check("lanes dsa", sa, loss, dsa);
        check("lanes dsm", sm, loss, dsm);
        check("lanes dresid", rs, loss, dr);
        check("lanes dpost", po, loss, dp);
    }
}

// No information crosses a BOS: changing the tokens (embeddings) before a document start changes
// nothing at or after it, within the op; the previous position does change the next when no BOS.
TEST(frontier_smear_bos_isolates_documents) {
    Cpu<double> dev;
    Rng rng(82);
    int T = 8, C = 6, W = 3;
    std::vector<int32_t> ids = {1, 5, 6, 7, 1, 9, 9, 2};  // document 1: positions 0–3, document 2: 4–7
    std::vector<double> x(T * C), w(W), lam = {0.9}, a(T * C), b(T * C);
    randomize(x.data(), x.size(), rng, 1.0);
    randomize(w.data(), W, rng, 1.0);
    smear_bos_forward(dev, a.data(), x.data(), ids.data(), w.data(), lam.data(), T, T, C, W);
    for (int i = 0; i < 4 * C; i++) x[i] += 1.0;  // change all of document 1
    smear_bos_forward(dev, b.data(), x.data(), ids.data(), w.data(), lam.data(), T, T, C, W);
    for (int i = 4 * C; i < T * C; i++) CHECK_MSG(a[i] == b[i], "document 2's output [%d] changed with document 1", i);
    bool moved = false;
    for (int i = C; i < 4 * C; i++) moved |= std::fabs((b[i] - a[i]) - 1.0) > 1e-9;  // not just the +1 itself
    CHECK_MSG(moved, "the smear does not mix neighbours inside document 1");
}

// The whole model with every frontier feature (fp64 finite differences, as test_model.cuh): both block
// sequences of the recurrence, the parallel lanes (each final-lane choice), gated skips, SparseAttnGate,
// layerwise norm scale and the BOS-masked SmearGate, with BOS tokens inside the sequences.
static Config frontier_gradcheck_config() {
    Config c;
    c.vocab_size = 64; c.num_layers = 5; c.model_dim = 32; c.num_heads = 4; c.num_kv_heads = 2; c.mlp_mult = 2.0f;
    c.mlp_activation = "leaky_relu_sq"; c.rope_dims = 4; c.xsa_last_n = 5; c.logit_softcap = 3.0f;
    c.ln_scale = 1; c.skip_gates_enabled = 1; c.sparse_attn_gate = 1; c.gate_window = 5;
    c.sparse_attn_gate_scale = 0.5f; c.smear_gate_enabled = 1; c.parallel_start_layer = 3;
    c.num_loops = 1; c.loop_start = 1; c.loop_end = 2;  // blocks 0 1 2 1 2 3 4: 7 virtual layers
    c.train_seq_len = 7; c.train_batch_tokens = 14; c.grad_accum_steps = 1; c.eval_stride = 7;
    c.ttt_chunk_size = 4; c.ttt_eval_seq_len = 7;
    return c;
}
static void frontier_gradcheck(Config c, bool looping) {
    config_validate(c, 1);
    int B = 2, T = 7;
    Model<Cpu<double>> m;
    model_init(Cpu<double>{}, m, c, B, T);
    m.looping = looping;
    Rng rng(4321 + looping);
    randomize(m.params, m.nparams, rng, 0.3);
    int32_t ids[] = {1, 9, 12, 1, 40, 7, 3, 22, 1, 5, 1, 1, 60, 2};  // BOS inside and at the start of sequences
    for (int n = 0; n < B * T; n++) {
        m.acts.inputs[n] = ids[n];
        m.acts.targets[n] = (int32_t)(rng.uniform() * c.vocab_size);
        m.acts.loss_weights[n] = (float)(0.5 + rng.uniform());
    }
    memset(m.grads, 0, m.nparams * sizeof(double));
    weighted_loss(m, B, T);
    gpt_backward(Cpu<double>{}, m, B, T);
    const double h = 1e-5;
    for (const ParamSpec& p : m.table) {
        std::vector<size_t> idx;
        if (p.numel <= 40) for (size_t i = 0; i < p.numel; i++) idx.push_back(i);
        else for (int k = 0; k < 16; k++) idx.push_back((size_t)(rng.uniform() * p.numel));
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
        if (getenv("FRONTIER_DEBUG")) fprintf(stderr, "%s %g\n", p.name.c_str(), rel);
        CHECK_MSG(den > 0, "%s (looping %d): gradient is identically zero on the checked elements", p.name.c_str(),
                  looping);
        // (1e-5: a few sampled elements with tiny gradients sit at the finite differences' rounding floor)
        CHECK_MSG(rel < 1e-5, "%s (looping %d, final lane %s): relative error %.3g vs finite differences",
                  p.name.c_str(), looping, c.parallel_final_lane.c_str(), rel);
    }
    model_free(Cpu<double>{}, m);
}
// The buffer rule (test_model.cuh) on the gradcheck configs and on the frontier's: both block sequences
// (a looped block's gradients written by several virtual layers; skip weights the shorter sequence leaves
// unused), both final lanes, gated and plain skips.
TEST(model_backward_overwrites_without_zeroing) {
    backward_overwrite_matches_accumulate(gradcheck_config(0));
    backward_overwrite_matches_accumulate(gradcheck_config(1));
    int32_t ids[] = {1, 9, 12, 1, 40, 7, 3, 22, 1, 5, 1, 1, 60, 2};  // BOS inside and at the start of sequences
    Config f = frontier_gradcheck_config();
    backward_overwrite_matches_accumulate(f, false, ids);
    backward_overwrite_matches_accumulate(f, true, ids);
    f.parallel_final_lane = "mlp";
    f.tie_embeddings = 0;
    f.skip_gates_enabled = 0;
    backward_overwrite_matches_accumulate(f, true, ids);
}
TEST(frontier_gradcheck_loop_off) { frontier_gradcheck(frontier_gradcheck_config(), false); }
TEST(frontier_gradcheck_loop_on) { frontier_gradcheck(frontier_gradcheck_config(), true); }
TEST(frontier_gradcheck_loop_on_mlp_lane_untied) {
    Config c = frontier_gradcheck_config();
    c.parallel_final_lane = "mlp";
    c.tie_embeddings = 0;
    c.skip_gates_enabled = 0;  // the plain skip with the loop's sequence
    frontier_gradcheck(c, true);
}

// No information crosses a BOS through the model's embedding stream: one sequence holding two
// documents (BOS at 0 and at 6); changing document 1's tokens leaves every row of document 2 in the
// SmearGate's output (what the blocks read) bit for bit as it was. (Attention still crosses documents
// until document-masked attention is on; the SmearGate is the op that must not.)
TEST(frontier_model_bos_isolation) {
    Config c = frontier_gradcheck_config();
    config_validate(c, 1);
    int T = 12;
    std::vector<double> first;
    for (int trial = 0; trial < 2; trial++) {
        Model<Cpu<double>> m;
        model_init(Cpu<double>{}, m, c, 1, T);
        Rng rng(99);
        randomize(m.params, m.nparams, rng, 0.3);
        int32_t ids[12] = {1, 5, 6, 7, 8, 9, 1, 30, 31, 32, 33, 34};
        for (int n = 0; n < T; n++) {
            m.acts.inputs[n] = ids[n] + (trial && n > 0 && n < 6 ? 7 : 0);
            m.acts.targets[n] = 3;
        }
        gpt_forward(Cpu<double>{}, m, 1, T, false);
        size_t C = c.model_dim;
        std::vector<double> rows(m.acts.embed_smeared, m.acts.embed_smeared + T * C);
        if (trial == 0) first = rows;
        for (size_t i = 6 * C; trial && i < T * C; i++)
            CHECK_MSG(rows[i] == first[i], "document 2's embedding row %zu changed with document 1's tokens", i / C);
        model_free(Cpu<double>{}, m);
    }
}
