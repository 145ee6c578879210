// --- Shared pieces of the evaluation modes ------------------------------------------------------

static EvalResult eval_result(const char* mode, const ScoreSums& s, double t0) {
    EvalResult r;
    r.mode = mode; r.val_loss = s.val_loss(); r.val_bpb = s.val_bpb(); r.tokens = s.tokens; r.ms = now_ms() - t0;
    return r;
}

// Rank 0 reports how far a long evaluation is, at most every 10 seconds (its own share of the work).
struct EvalProgress {
    const char* name;
    double t0, last;
    explicit EvalProgress(const char* n) : name(n), t0(now_ms()), last(t0) {}
    void tick(double done, double total, const ScoreSums& s) {
        double t = now_ms();
        if (g_rank != 0 || t - last < 10000) return;
        last = t;
        double frac = total > 0 ? done / total : 1.0, el = (t - t0) / 1000;
        log0("%s [%5.1f%%] %.0f/%.0f running_bpb:%.6f elapsed:%.0fs eta:%.0fs\n", name, 100 * frac, done, total,
             s.val_bpb(), el, frac > 0 ? el * (1 - frac) / frac : 0.0);
    }
};

#ifdef PGOLF_TESTING
// Test builds watch every TTT optimizer step: the stream positions j (target t[j+1]) it trains on.
static void (*g_ttt_step_hook)(const std::vector<long>& positions) = nullptr;
#endif

// --- Sliding-window evaluation ------------------------------------------------------------------
// Window k starts at ws = k·S and holds len = min(L, T − ws) positions; RoPE positions restart at 0
// in every window. Window 0 scores all its positions, later ones their last S:
//   exact (ours):   [L − S, len), windows with ws + L − S < T: every position exactly once;
//   reference:      [max(len − S, 0), len), windows with len ≥ S (thwu1, PR #456): every window
//                   that ends at T scores the same tail again.
struct EvalWindow { long ws; int len, first; };  // inputs t[ws .. ws+len−1]; positions [first, len) scored

static std::vector<EvalWindow> sliding_windows(const Config& c, long T) {
    int L = c.eval_len(), S = c.eval_stride;
    bool exact = c.sliding != "reference";
    std::vector<EvalWindow> win;
    for (long ws = 0; ws < T; ws += S) {
        int len = (int)std::min<long>(L, T - ws);
        if (ws == 0) win.push_back({0, len, 0});
        else if (exact) { if (ws + L - S >= T) break; win.push_back({ws, len, L - S}); }
        else { if (len < S) break; win.push_back({ws, len, std::max(len - S, 0)}); }
    }
    return win;
}

// Scores windows [w0, w1) in batches of EVAL_BATCH_SEQS. Short tail windows share a batch padded at
// the end with token 0: attention is causal, so pads never reach real positions, and are not scored.
template <class D> static void score_windows(D dev, Model<D>& m, const EvalData& d, const std::vector<EvalWindow>& win,
                                             long w0, long w1, ScoreSums& sums, NllRecord* rec, EvalProgress* prog = nullptr) {
    const Config& c = m.cfg;
    int L = c.eval_len();
    if (L > m.acts.T) fail("internal: eval length %d exceeds the activation plan (%d positions)", L, m.acts.T);
    int per_batch = (int)std::max<long>(1, std::min<long>(c.eval_batch_seqs, (long)m.acts.B * m.acts.T / L));
    std::vector<int32_t> x, y;
    std::vector<float> nll;
    for (long w = w0; w < w1; w += per_batch) {
        int B = (int)std::min<long>(per_batch, w1 - w), W = 0;
        for (int b = 0; b < B; b++) W = std::max(W, win[w + b].len);
        x.assign((size_t)B * W, 0); y.assign((size_t)B * W, 0);
        for (int b = 0; b < B; b++)
            for (int i = 0; i < win[w + b].len; i++) {
                x[(size_t)b * W + i] = d.val[win[w + b].ws + i];
                y[(size_t)b * W + i] = d.val[win[w + b].ws + i + 1];
            }
        forward_nll(dev, m, x, y, B, W, nll);
        for (int b = 0; b < B; b++)
            for (int i = win[w + b].first; i < win[w + b].len; i++) {
                size_t k = (size_t)b * W + i;
                sums.add(nll[k], x[k], y[k], d.luts);
                if (rec) rec->set(win[w + b].ws + i, nll[k]);
            }
        if (prog) prog->tick((double)(w + B - w0), (double)(w1 - w0), sums);
    }
}

template <class D> static EvalResult eval_sliding(D dev, Model<D>& m, const EvalData& d, NllRecord* rec = nullptr) {
    const Config& c = m.cfg;
    double t0 = now_ms();
    long T = (long)d.val.size() - 1;
    std::vector<EvalWindow> win = sliding_windows(c, T);
    long n = (long)win.size();
    log0("sliding_eval:start windows:%ld window:%d stride:%d rule:%s batch:%d\n", n, c.eval_len(), c.eval_stride,
         c.sliding.c_str(), c.eval_batch_seqs);
    ScoreSums sums;
    EvalProgress prog("sliding_eval");
    score_windows(dev, m, d, win, split_begin(n, g_rank, g_world), split_begin(n, g_rank + 1, g_world), sums, rec, &prog);
    sums.reduce();
    return eval_result("sliding", sums, t0);
}

// --- Per-document LoRA test-time training --------------------------------------------------------
// Document i spans [s_i, s_{i+1}], the next document's BOS included, so that BOS is predicted from
// this document alone and every position 1..N−1 is scored exactly once (PR #467 dropped it).
struct EvalDoc { long start, pred; };  // tokens t[start .. start+pred]: pred scored positions

static std::vector<EvalDoc> find_documents(const std::vector<uint16_t>& t) {
    std::vector<EvalDoc> docs;
    long N = (long)t.size();
    for (long i = 0; i < N; i++) {
        if (i > 0 && t[i] != BOS_ID) continue;  // a prefix before the first BOS is a document too
        if (!docs.empty()) docs.back().pred = i - docs.back().start;
        docs.push_back({i, N - 1 - i});
    }
    if (!docs.empty() && docs.back().pred == 0) docs.pop_back();  // a final lone BOS predicts nothing
    return docs;
}

// Chunk ci of a document covers its positions [ci·C, e), e = min((ci+1)·C, pred), seen through the
// window [ws, e) of at most L positions; the chunk sits at [co, co + cl) of the window.
struct ChunkWindow { long ws; int len, co, cl; };
static ChunkWindow chunk_window(long ci, long pred, int C, int L) {
    long e = std::min((ci + 1) * C, pred), ws = std::max(0L, e - L);
    return {ws, (int)(e - ws), (int)(ci * C - ws), (int)(e - ci * C)};
}

static void lora_parse_targets(const std::string& list, bool on[LORA_NUM]) {
    for (int t = 0; t < LORA_NUM; t++) on[t] = false;
    for (size_t pos = 0; pos <= list.size();) {
        size_t comma = std::min(list.find(',', pos), list.size());
        std::string name = list.substr(pos, comma - pos);
        pos = comma + 1;
        if (name.empty()) continue;
        int t = 0;
        while (t < LORA_NUM && name != LORA_TARGET_NAMES[t]) t++;
        if (t == LORA_NUM) fail("TTT_LORA_TARGETS: unknown target \"%s\" (expected q, k, v, o, mlp_up, mlp_down, lm_head)", name.c_str());
        on[t] = true;
    }
}

// Adapters for `docs` documents and forward passes of up to max_tokens positions. All A blocks come
// first in lo.params, then all B blocks; returns the length of the A part. One allocation, headed
// by dtmp, holds every per-layer tmp. Compute copies alias the master copy when the types agree.
template <class D> static size_t lora_alloc(D dev, Lora<D>& lo, const Config& c, int docs, size_t max_tokens) {
    using G = typename D::grad; using M = typename D::mat; using A = typename D::act;
    lora_parse_targets(c.ttt_lora_targets, lo.on);
    lo.docs = docs; lo.rank = c.ttt_lora_rank;
    lo.scale = c.ttt_lora_alpha > 0 ? c.ttt_lora_alpha / c.ttt_lora_rank : 1.0f;
    int Dm = c.model_dim, KV = c.kv_dim(), F = c.mlp_hidden();
    const int ins[LORA_NUM] = {Dm, Dm, Dm, Dm, Dm, F, Dm}, outs[LORA_NUM] = {Dm, KV, KV, Dm, F, Dm, c.vocab_size};
    auto pad = [](size_t k) { return (k + 15) / 16 * 16; };
    size_t r = lo.rank, n = 0, slots = 0;
    std::vector<size_t> offA[LORA_NUM], offB[LORA_NUM];
    for (int t = 0; t < LORA_NUM; t++) {
        lo.in_dim[t] = ins[t]; lo.out_dim[t] = outs[t];
        int layers = !lo.on[t] ? 0 : t == LORA_HEAD ? 1 : c.num_layers;
        for (int l = 0; l < layers; l++) { offA[t].push_back(n); n += pad(docs * r * ins[t]); slots++; }
    }
    size_t nA = n;
    for (int t = 0; t < LORA_NUM; t++)
        for (size_t l = 0; l < offA[t].size(); l++) { offB[t].push_back(n); n += pad(docs * outs[t] * r); }
    lo.nparams = n;
    lo.params = (G*)device_alloc(dev, n * sizeof(G));
    lo.grads = (G*)device_alloc(dev, n * sizeof(G));
    lo.compute = std::is_same<M, G>::value ? (M*)lo.params : (M*)device_alloc(dev, n * sizeof(M));
    size_t tmp_n = pad(max_tokens * r);
    lo.dtmp = (A*)device_alloc(dev, (slots + 1) * tmp_n * sizeof(A));
    A* next_tmp = lo.dtmp + tmp_n;
    for (int t = 0; t < LORA_NUM; t++) {
        size_t k = offA[t].size();
        lo.A[t].assign(k, nullptr); lo.B[t].assign(k, nullptr); lo.dA[t].assign(k, nullptr); lo.dB[t].assign(k, nullptr);
        lo.Ac[t].assign(k, nullptr); lo.Bc[t].assign(k, nullptr); lo.tmp[t].assign(k, nullptr);
        for (size_t l = 0; l < k; l++) {
            lo.A[t][l] = lo.params + offA[t][l]; lo.dA[t][l] = lo.grads + offA[t][l]; lo.Ac[t][l] = lo.compute + offA[t][l];
            lo.B[t][l] = lo.params + offB[t][l]; lo.dB[t][l] = lo.grads + offB[t][l]; lo.Bc[t][l] = lo.compute + offB[t][l];
            lo.tmp[t][l] = next_tmp; next_tmp += tmp_n;
        }
    }
    return nA;
}
template <class D> static void lora_free(D dev, Lora<D>& lo) {
    if ((void*)lo.compute != (void*)lo.params) device_free(dev, lo.compute);
    device_free(dev, lo.params); device_free(dev, lo.grads); device_free(dev, lo.dtmp);
    lo = Lora<D>{};
}
// The forward reads the adapters' compute copy (the same memory on the CPU, bf16 on the GPU).
template <class D> static void lora_refresh_compute(D dev, Lora<D>& lo) {
    if ((void*)lo.compute != (void*)lo.params) cast_params(dev, lo.compute, lo.params, lo.nparams);
}

// Adapters plus their optimizer: moments m1 (Adam's m, or SGD's buffer) and m2 (Adam's v), and
// the image of A that every reset restores.
template <class D> struct LoraState {
    using G = typename D::grad;
    Lora<D> lo;
    size_t nA = 0;
    G *A_init = nullptr, *m1 = nullptr, *m2 = nullptr;
    int step = 0;
};

// Every document starts from the same A (one U(±1/√in) draw per target and layer) and B = 0: a
// document's adapters then cannot depend on its batch or its place in the stream, so the order of
// documents provably cannot change any score.
template <class D> static void lora_state_init(D dev, LoraState<D>& s, const Config& c, int docs, size_t max_tokens) {
    using G = typename D::grad;
    s.nA = lora_alloc(dev, s.lo, c, docs, max_tokens);
    size_t n = s.lo.nparams;
    s.A_init = (G*)device_alloc(dev, s.nA * sizeof(G));
    s.m1 = (G*)device_alloc(dev, n * sizeof(G));
    if (c.ttt_lora_optimizer != "sgd") s.m2 = (G*)device_alloc(dev, n * sizeof(G));
    Rng rng((uint64_t)c.seed * 0x9E3779B97F4A7C15ull + 0x10AA);
    std::vector<G> one;
    for (int t = 0; t < LORA_NUM; t++)
        for (size_t l = 0; l < s.lo.A[t].size(); l++) {
            size_t k = (size_t)s.lo.rank * s.lo.in_dim[t];
            double bound = 1.0 / std::sqrt((double)s.lo.in_dim[t]);  // nn.Linear's kaiming_uniform(a=√5)
            one.resize(k);
            for (G& v : one) v = G((2.0 * rng.uniform() - 1.0) * bound);
            for (int b = 0; b < docs; b++) to_device(dev, s.A_init + (s.lo.A[t][l] - s.lo.params) + (size_t)b * k, one.data(), k);
        }
}
template <class D> static void lora_state_free(D dev, LoraState<D>& s) {
    lora_free(dev, s.lo);
    device_free(dev, s.A_init); device_free(dev, s.m1);
    if (s.m2) device_free(dev, s.m2);
}
// Fresh adapters and optimizer for a new batch of documents.
template <class D> static void lora_reset(D dev, LoraState<D>& s) {
    using G = typename D::grad;
    size_t n = s.lo.nparams;
    device_copy(dev, s.lo.params, s.A_init, s.nA);
    device_zero(dev, s.lo.params + s.nA, (n - s.nA) * sizeof(G));
    device_zero(dev, s.m1, n * sizeof(G));
    if (s.m2) device_zero(dev, s.m2, n * sizeof(G));
    s.step = 0;
    lora_refresh_compute(dev, s.lo);
}
// adam = AdamW without decay (LORA77, PR #600, PR #467); plain SGD has no momentum setting.
template <class D> static void lora_step(D dev, LoraState<D>& s, const Config& c, float lr) {
    Lora<D>& lo = s.lo;
    s.step++;
    if (c.ttt_lora_optimizer == "sgd") sgd_update(dev, lo.params, lo.grads, s.m1, lo.nparams, lr, 0.0f, c.ttt_lora_wd, true);
    else adamw_update(dev, lo.params, lo.grads, s.m1, s.m2, lo.nparams, lr, c.ttt_lora_beta1, c.ttt_lora_beta2, c.ttt_lora_eps,
                      c.ttt_lora_optimizer == "adamw" ? c.ttt_lora_wd : 0.0f, s.step);
    lora_refresh_compute(dev, lo);
}
static float lora_lr(const Config& c, int ep, int epochs) {  // PR #467: lr·½(1 + cos(π·ep/epochs)) per epoch
    if (c.ttt_lora_schedule == "constant") return c.ttt_lora_lr;
    if (c.ttt_lora_schedule == "cosine_epochs") return (float)(c.ttt_lora_lr * 0.5 * (1.0 + std::cos(M_PI * ep / epochs)));
    fail("TTT_LORA_SCHEDULE=%s: expected constant or cosine_epochs", c.ttt_lora_schedule.c_str());
}

// One batch of documents, longest first, chunk by chunk: each chunk is scored from the forward pass
// that also feeds its update, so it is predicted by adapters trained only on earlier chunks of the
// same document. Single epoch: a document's last chunk is never trained on. Several epochs (PR #467):
// every epoch re-runs all chunks and trains on each active one, last included; a position's score is
// its NLL at the first exposure (epoch 0), the last epoch's goes to *final. As in PR #467, one
// optimizer spans the batch: a document whose chunks ran out still takes momentum-only steps until
// the epoch ends, so the final-epoch score (never the reported one) depends on the batch.
// Longest first makes the active (and the training) documents of a chunk a prefix of the batch, so
// only those rows run. st == nullptr: the base model scores the same document-isolated windows
// (the deadline fallback).
template <class D> static void lora_batch(D dev, Model<D>& m, const EvalData& d, const EvalDoc* docs, int bsz,
                                          LoraState<D>* st, int epochs, ScoreSums& first, ScoreSums* final, NllRecord* rec) {
    const Config& c = m.cfg;
    int C = c.ttt_chunk_size, L = c.ttt_eval_seq_len;
    long max_nc = (docs[0].pred + C - 1) / C;
    std::vector<int32_t> x, y;
    std::vector<float> nll, weights;
    std::vector<ChunkWindow> cw(bsz);
    if (st) lora_reset(dev, *st);
    for (int ep = 0; ep < epochs; ep++) {
        float lr = lora_lr(c, ep, epochs);
        for (long ci = 0; ci < max_nc; ci++) {
            int k = 0, tr = 0, W = 0;  // active rows, training rows, window width
            while (k < bsz && ci * C < docs[k].pred) k++;
            while (tr < k && (epochs > 1 || (ci + 1) * C < docs[tr].pred)) tr++;
            if (!st) tr = 0;
            for (int b = 0; b < k; b++) { cw[b] = chunk_window(ci, docs[b].pred, C, L); W = std::max(W, cw[b].len); }
            x.assign((size_t)k * W, 0); y.assign((size_t)k * W, 0);
            for (int b = 0; b < k; b++)
                for (int i = 0; i < cw[b].len; i++) {
                    long j = docs[b].start + cw[b].ws + i;
                    x[(size_t)b * W + i] = d.val[j]; y[(size_t)b * W + i] = d.val[j + 1];
                }
            if (tr > 0) {  // loss = Σ over training documents of the mean NLL of their chunk
                weights.assign((size_t)k * W, 0.0f);
                for (int b = 0; b < tr; b++)
                    for (int i = cw[b].co; i < cw[b].co + cw[b].cl; i++) weights[(size_t)b * W + i] = 1.0f / cw[b].cl;
                to_device(dev, m.acts.loss_weights, weights.data(), weights.size());
            }
            if (st) st->lo.docs = k;
            forward_nll(dev, m, x, y, k, W, nll, st ? &st->lo : nullptr, tr > 0);
            for (int b = 0; b < k; b++)
                for (int i = cw[b].co; i < cw[b].co + cw[b].cl; i++) {
                    size_t q = (size_t)b * W + i;
                    if (ep == 0) { first.add(nll[q], x[q], y[q], d.luts); if (rec) rec->set(docs[b].start + cw[b].ws + i, nll[q]); }
                    if (final && ep == epochs - 1) final->add(nll[q], x[q], y[q], d.luts);
                }
            if (tr == 0) continue;
#ifdef PGOLF_TESTING
            if (g_ttt_step_hook) {  // the positions that carry loss weight
                std::vector<long> pos;
                for (int b = 0; b < k; b++)
                    for (int i = 0; i < W; i++) if (weights[(size_t)b * W + i] != 0) pos.push_back(docs[b].start + cw[b].ws + i);
                for (int s = 0; s < c.ttt_steps; s++) g_ttt_step_hook(pos);
            }
#endif
            for (int s = 0; s < c.ttt_steps; s++) {  // PR #600's TTT_STEPS: more passes over the scored chunk
                if (s > 0) forward_nll(dev, m, x, y, k, W, nll, &st->lo, true);
                device_zero(dev, st->lo.grads, st->lo.nparams * sizeof(typename D::grad));
                gpt_backward(dev, m, k, W, &st->lo, /*param_grads=*/false);
                lora_step(dev, *st, c, lr);
            }
        }
    }
}

template <class D> static EvalResult eval_lora_ttt(D dev, Model<D>& m, const EvalData& d, NllRecord* rec = nullptr,
                                                   std::vector<EvalResult>* extra = nullptr) {
    const Config& c = m.cfg;
    double t0 = now_ms();
    std::vector<EvalDoc> docs = find_documents(d.val);
    if (d.val[0] != BOS_ID) log0("lora_ttt: the stream does not start with BOS: its first %ld positions form a document\n", docs[0].pred);
    long n = (long)docs.size(), d0 = split_begin(n, g_rank, g_world), d1 = split_begin(n, g_rank + 1, g_world);
    std::vector<EvalDoc> mine(docs.begin() + d0, docs.begin() + d1);
    std::stable_sort(mine.begin(), mine.end(), [](const EvalDoc& a, const EvalDoc& b) { return a.pred > b.pred; });
    int L = c.ttt_eval_seq_len;
    if (L > m.acts.T) fail("internal: TTT_EVAL_SEQ_LEN=%d exceeds the activation plan (%d positions)", L, m.acts.T);
    int Bd = (int)std::max<long>(1, std::min<long>(c.ttt_batch_size, (long)m.acts.B * m.acts.T / L));
    int E = std::max(c.ttt_n_epochs, 1);
    bool report_final = c.ttt_report_final_epoch && E > 1;
    // Epochs after the first change only the final-epoch score: without that report they are skipped.
    int epochs = report_final ? E : 1;
    if (E > 1 && !report_final) log0("lora_ttt: TTT_N_EPOCHS=%d but TTT_REPORT_FINAL_EPOCH=0: later epochs cannot change the reported (first-exposure) score, running epoch 0 only\n", E);
    log0("lora_ttt:start docs:%ld batch:%d chunk:%d window:%d rank:%d scale:%g targets:%s optimizer:%s lr:%g schedule:%s steps:%d epochs:%d\n",
         n, Bd, c.ttt_chunk_size, L, c.ttt_lora_rank, c.ttt_lora_alpha > 0 ? c.ttt_lora_alpha / c.ttt_lora_rank : 1.0,
         c.ttt_lora_targets.c_str(), c.ttt_lora_optimizer.c_str(), c.ttt_lora_lr, c.ttt_lora_schedule.c_str(), c.ttt_steps, epochs);
    LoraState<D> st;
    lora_state_init(dev, st, c, Bd, (size_t)Bd * L);
    ScoreSums sums, final_sums;
    EvalProgress prog("lora_ttt");
    double fallback = 0;
    for (size_t b0 = 0; b0 < mine.size(); b0 += Bd) {
        int bsz = (int)std::min<size_t>(Bd, mine.size() - b0);
        // PR #600 stopped at its deadline and never scored the rest: ours scores it with the base model.
        bool late = c.eval_max_wallclock_seconds > 0 && now_ms() - t0 >= 1000 * c.eval_max_wallclock_seconds;
        if (late) fallback += bsz;
        lora_batch(dev, m, d, mine.data() + b0, bsz, late ? nullptr : &st, late ? 1 : epochs, sums,
                   report_final ? &final_sums : nullptr, rec);
        prog.tick((double)(b0 + bsz), (double)mine.size(), sums);
    }
    lora_state_free(dev, st);
    host_allreduce_sum(&fallback, 1);
    if (fallback > 0)
        log0("lora_ttt:deadline EVAL_MAX_WALLCLOCK_SECONDS=%g passed: %.0f of %ld documents scored by the base model without adaptation\n",
             c.eval_max_wallclock_seconds, fallback, n);
    sums.reduce();
    EvalResult r = eval_result("lora_ttt", sums, t0);
    if (report_final) {
        final_sums.reduce();
        EvalResult f = eval_result("lora_ttt_final_epoch", final_sums, t0);
        f.note = "not competition-legal (scored after training on the same tokens)";
        if (extra) extra->push_back(f);
    }
    return r;
}

// --- Full-model score-first TTT -------------------------------------------------------------------
// The stream is cut into chunks of TTT_CHUNK_TOKENS positions; each sliding window (same set as
// `sliding`) belongs to the chunk of its first scored position. Per chunk: score its windows, then
// (except for the last chunk) train the whole model on the chunk's sequences, whose targets were all
// scored already. Nothing is reset between chunks; the artifact's weights are restored at the end.

// Parameters TTT may change, as runs of adjacent arena ranges: all but the first TTT_FREEZE_BLOCKS
// layers' own tensors and the cores (depth recurrence) that only those layers use.
static std::vector<std::pair<size_t, size_t>> ttt_trainable_runs(const Config& c, const std::vector<ParamSpec>& table) {
    int F = c.ttt_freeze_blocks, NC = c.num_cores(), L = c.num_layers;
    std::vector<std::pair<size_t, size_t>> runs;
    for (const ParamSpec& p : table) {
        bool core = p.role >= P_C_Q && p.role <= P_Q_GAIN;
        bool layer = p.role >= P_ATTN_SCALE && p.role <= P_MLP_GATE;
        int last_user = core ? p.index + (L - 1 - p.index) / NC * NC : p.index;  // last layer reading this core
        if ((core || layer) && last_user < F) continue;
        size_t b = p.offset, e = p.offset + (p.numel + 15) / 16 * 16;  // padding: zero weights and grads
        if (!runs.empty() && runs.back().second == b) runs.back().second = e;
        else runs.push_back({b, e});
    }
    return runs;
}

template <class D> static EvalResult eval_full_ttt(D dev, Model<D>& m, const EvalData& d, NllRecord* rec = nullptr) {
    using G = typename D::grad;
    const Config& c = m.cfg;
    double t0 = now_ms();
    long T = (long)d.val.size() - 1, Ct = c.ttt_chunk_tokens;
    int L = c.eval_len();
    if (c.ttt_batch_seqs <= 0) fail("TTT_BATCH_SEQS=%d: expected > 0", c.ttt_batch_seqs);
    std::vector<EvalWindow> win = sliding_windows(c, T);
    long nchunks = (T + Ct - 1) / Ct;
    std::vector<long> cw(nchunks + 1, 0);  // chunk ci owns windows [cw[ci], cw[ci+1]): first positions never decrease
    long prev_ci = 0;
    for (const EvalWindow& w : win) {
        long ci = std::min((w.ws + w.first) / Ct, nchunks - 1);
        if (ci < prev_ci) fail("internal: sliding windows out of chunk order");
        cw[ci + 1]++; prev_ci = ci;
    }
    for (long ci = 0; ci < nchunks; ci++) cw[ci + 1] += cw[ci];
    std::vector<std::pair<size_t, size_t>> runs = ttt_trainable_runs(c, m.table);
    size_t trainable = 0;
    for (auto& r : runs) trainable += r.second - r.first;
    bool sgd = c.ttt_optimizer == "sgd";
    log0("full_ttt:start chunks:%ld chunk_tokens:%ld windows:%zu stride:%d window:%d optimizer:%s lr:%g epochs:%d batch_seqs:%d freeze_blocks:%d trainable:%zu\n",
         nchunks, Ct, win.size(), c.eval_stride, L, c.ttt_optimizer.c_str(), c.ttt_lr, c.ttt_epochs, c.ttt_batch_seqs,
         c.ttt_freeze_blocks, trainable);
    size_t bytes = m.nparams * sizeof(G);
    G* saved = (G*)device_alloc(dev, bytes);
    G* m1 = (G*)device_alloc(dev, bytes);  // SGD momentum buffer, or Adam's m
    G* m2 = sgd ? nullptr : (G*)device_alloc(dev, bytes);
    device_copy(dev, saved, m.params, m.nparams);
    device_zero(dev, m1, bytes);
    if (m2) device_zero(dev, m2, bytes);
    if (L > m.acts.T) fail("internal: eval length %d exceeds the activation plan (%d positions)", L, m.acts.T);
    int cap_rows = (int)std::max<long>(1, (long)m.acts.B * m.acts.T / L);  // sequences per forward
    ScoreSums sums;
    EvalProgress prog("full_ttt");
    std::vector<int32_t> x, y;
    std::vector<float> nll, weights;
    int step = 0;
    for (long ci = 0; ci < nchunks; ci++) {
        // phase 1: score this chunk's windows with the weights trained on chunks < ci
        long a = cw[ci], nw = cw[ci + 1] - cw[ci];
        score_windows(dev, m, d, win, a + split_begin(nw, g_rank, g_world), a + split_begin(nw, g_rank + 1, g_world), sums, rec);
        prog.tick((double)(ci + 1), (double)nchunks, sums);
        if (ci == nchunks - 1) break;  // the last chunk is never trained on
        // phase 2: train on the chunk's whole sequences (targets t[cs+1 .. cs+seqs·L], all scored above)
        long cs = ci * Ct, seqs = (std::min(cs + Ct, T) - cs) / L;
        float lr = (float)(c.ttt_lr * 0.5 * (1.0 + std::cos(M_PI * ci / std::max(nchunks - 1, 1L))));
        for (int ep = 0; ep < c.ttt_epochs; ep++)
            for (long g0 = 0; g0 < seqs; g0 += c.ttt_batch_seqs) {
                // A group of TTT_BATCH_SEQS sequences is split across ranks, and its loss is the mean over
                // all of it: the same steps at any world size (the reference's per-rank groups agree
                // whenever a chunk fits in one group, as in its runs).
                long gn = std::min<long>(c.ttt_batch_seqs, seqs - g0);
                long s0 = g0 + split_begin(gn, g_rank, g_world), s1 = g0 + split_begin(gn, g_rank + 1, g_world);
                device_zero(dev, m.grads, bytes);
                for (long s = s0; s < s1; s += cap_rows) {
                    int B = (int)std::min<long>(cap_rows, s1 - s);
                    x.resize((size_t)B * L); y.resize((size_t)B * L);
                    for (size_t i = 0; i < x.size(); i++) { x[i] = d.val[cs + s * L + i]; y[i] = d.val[cs + s * L + i + 1]; }
                    weights.assign(x.size(), (float)(1.0 / ((double)gn * L)));
                    to_device(dev, m.acts.loss_weights, weights.data(), weights.size());
                    forward_nll(dev, m, x, y, B, L, nll, (Lora<D>*)nullptr, true);
                    gpt_backward(dev, m, B, L);
                }
#ifdef PGOLF_TESTING
                if (g_ttt_step_hook) {
                    std::vector<long> pos;
                    for (long j = cs + s0 * L; j < cs + s1 * L; j++) pos.push_back(j);
                    g_ttt_step_hook(pos);
                }
#endif
                // every rank joins, with zero gradient when it holds no sequence: no deadlock
                allreduce_sum(dev, m.grads, m.nparams);
                for (const ParamSpec& p : m.table)  // depth recurrence: PR #456's 1/uses gradient hooks
                    if (p.uses > 1) scale_grads(dev, m.grads + p.offset, p.numel, 1.0f / p.uses);
                if (c.ttt_grad_clip > 0) {  // torch's clip_grad_norm_ over the trained parameters
                    double ss = 0;
                    for (auto& r : runs) ss += sum_squares(dev, m.grads + r.first, r.second - r.first);
                    double coef = c.ttt_grad_clip / (std::sqrt(ss) + 1e-6);
                    if (coef < 1.0)
                        for (auto& r : runs) scale_grads(dev, m.grads + r.first, r.second - r.first, (float)coef);
                }
                step++;
                for (auto& r : runs) {
                    size_t o = r.first, k = r.second - r.first;
                    if (sgd) sgd_update(dev, m.params + o, m.grads + o, m1 + o, k, lr, c.ttt_momentum, c.ttt_wd, step == 1);
                    else adamw_update(dev, m.params + o, m.grads + o, m1 + o, m2 + o, k, lr, c.ttt_beta1, c.ttt_beta2, c.ttt_eps, c.ttt_wd, step);
                }
                refresh_compute_weights(dev, m, false);
            }
    }
    // later modes (and the artifact) see the weights as loaded, not the TTT-updated ones
    device_copy(dev, m.params, saved, m.nparams);
    refresh_compute_weights(dev, m, false);
    device_free(dev, saved); device_free(dev, m1);
    if (m2) device_free(dev, m2);
    sums.reduce();
    log0("full_ttt:done steps:%d\n", step);
    return eval_result("full_ttt", sums, t0);
}
