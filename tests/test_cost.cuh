// The cost model of a training step (section 13) against independent truth: the FLOPs of every
// linear layer in closed form, causal attention in closed form, a launch count made by hand for a
// small config, and how the totals scale with batch, layers and ranks.

struct CostSums {
    long launches[OP_NUM] = {};
    double flops[OP_NUM] = {}, hbm[OP_NUM] = {}, link[OP_NUM] = {};
    long total = 0;
};
static CostSums cost_sums(const Config& c, int world) {
    CostSums s;
    config_validate(c, world);
    for (const CostEntry& e : cost_step_launches(c, world)) {
        s.launches[e.cls]++;
        s.flops[e.cls] += e.flops;
        s.hbm[e.cls] += e.hbm_bytes;
        s.link[e.cls] += e.link_bytes;
        s.total++;
    }
    return s;
}
static Config cost_preset(const char* name) {
    Config c;
    for (const Preset& p : PRESETS) if (!strcmp(p.name, name)) { c.preset = name; p.apply(c); }
    return c;
}
// Weights every token passes through a matmul with (per layer use, the tied or untied head, the bigram
// projection), from the config's dimensions alone.
static double matmul_params(const Config& c) {
    double D = c.model_dim, KV = (double)c.num_kv_heads * (c.model_dim / c.num_heads), F = c.mlp_mult * c.model_dim;
    double per_layer = D * D + 2 * KV * D + D * D + 2 * F * D;  // c_q, c_k, c_v, proj, fc, mlp.proj
    double bigram = c.bigram_vocab_size && c.bigram_dim != c.model_dim ? (double)c.bigram_dim * D : 0;
    return c.num_layers * per_layer + (double)c.vocab_size * D + bigram;
}

TEST(cost_gemm_flops_are_6_N_T) {
    struct {
        const char* preset;
        int world;
    } cases[] = {{"tiny", 1}, {"baseline", 8}, {"pr467", 8}, {"pr600", 8}, {"pr456", 8}, {"pr467", 2}};
    for (auto& k : cases) {
        Config c = cost_preset(k.preset);
        double tokens = (double)c.train_batch_tokens / k.world;  // every micro-batch of this rank
        double want = 6 * matmul_params(c) * tokens;
        CostSums s = cost_sums(c, k.world);
        CHECK_MSG(std::fabs(s.flops[OP_GEMM] - want) <= 1e-9 * want, "%s on %d: GEMM FLOPs %.6g, 6·N·T = %.6g",
                  k.preset, k.world, s.flops[OP_GEMM], want);
    }
}

TEST(cost_attention_flops_match_the_causal_closed_form) {
    for (const char* name : {"tiny", "pr467", "pr600"}) {
        Config c = cost_preset(name);
        int world = 8, T = c.train_seq_len, hd = c.model_dim / c.num_heads;
        double B = (double)c.train_batch_tokens / world / T;
        // QKᵀ and PV over the T(T+1)/2 causal (query, key) pairs of every head and layer
        double useful = c.num_layers * B * c.num_heads * (T * (T + 1.0) / 2) * 2 * (2.0 * hd);
        CostSums s = cost_sums(c, world);
        // > 1: the masked part of each diagonal tile is computed too (query tiles of 128 packed rows forward,
        // 64 backward: at most 128 positions a query tile past its diagonal)
        double ratio = s.flops[OP_ATTN_FWD] / useful;
        CHECK_MSG(ratio >= 1.0 && ratio <= 1.0 + 2 * 128.0 / T,
                  "%s: attention forward %.6g FLOPs, causal closed form %.6g (ratio %.4f)", name, s.flops[OP_ATTN_FWD],
                  useful, ratio);
        double bwd = s.flops[OP_ATTN_BWD] / (2.5 * useful);  // 5 products against 2
        CHECK_MSG(bwd >= 1.0 && bwd <= 1.0 + 128.0 / T,
                  "%s: attention backward %.6g FLOPs, 2.5 × causal closed form %.6g (ratio %.4f)", name,
                  s.flops[OP_ATTN_BWD], 2.5 * useful, bwd);
        // bounds, D and exponents, the 5-product kernel, dq from the fixed-point sums
        CHECK(s.launches[OP_ATTN_FWD] == c.num_layers && s.launches[OP_ATTN_BWD] == 4 * c.num_layers);
    }
}

// The naive baseline cut to 2 layers (one encoder, one decoder, one skip), no clipping, one rank, one
// micro-batch, counted by reading each Cuda op of train()'s step.
TEST(cost_launches_match_a_hand_count) {
    Config c = cost_preset("baseline");
    c.num_layers = 2;
    c.model_dim = 64;
    c.num_heads = 2;
    c.num_kv_heads = 1;
    c.train_seq_len = 64;
    c.train_batch_tokens = 128;
    c.grad_accum_steps = 1;
    CHECK(c.grad_clip_norm == 0 && c.tie_embeddings && !c.bigram_vocab_size && !c.bigram_hash_size && !c.smear &&
          !c.smear_gate && c.xsa_last_n == 0 && c.muon_backend_steps == 5 && c.ema_decay == 0);
    CostSums s = cost_sums(c, 1);
    // memsets: none; every gradient buffer (attention_backward's dq, dk, dv included) and the parameter
    // gradients are overwritten by their first writer
    CHECK_MSG(s.launches[OP_MEMSET] == 0, "memsets %ld", s.launches[OP_MEMSET]);
    // host syncs: none (the tokens go up and the losses down without waiting, the loss weights once per run;
    // one rank: no NCCL)
    CHECK(s.launches[OP_SYNC] == 0);
    CHECK(s.launches[OP_COMM] == 0);
    // GEMMs: per layer q, k, v, proj, fc, mlp.proj and the head, each once forward and twice backward
    CHECK(s.launches[OP_GEMM] == 3 * (2 * 6 + 1));
    CHECK(s.launches[OP_ATTN_FWD] == 2 && s.launches[OP_ATTN_BWD] == 2 * 4);
    // forward: embedding, norm; per layer the layer-0 copy or the skip add, resid_mix, 2 norms, q and k
    // norm+rope, 2 branch adds, relu²; final norm, softcap CE
    int fwd = 2 + 2 * 9 + 2;
    // backward: final norm; per layer 2 branch backwards (kernel + scale sums), relu², 2 norms, q (kernel +
    // 2 gain sums) and k norm+rope, resid_mix (kernel + mix sums) = 13; the decoder's skip backward (2);
    // the encoder's skip-gradient add and dx0 add (2); the embedding norm; embedding backward (iota,
    // cub's single-tile sort of the 128 pairs, the windows' sums, the long runs' sums)
    int bwd = 1 + 2 * 13 + 2 + 2 + 1 + 4;
    // + the bf16 weight cast; the copies: tokens up, inputs and targets into place, losses down, the optimizer's
    // scalars up; the two graph launches (micro-batches, optimizer)
    int other = 1 + 5 + 2;
    CHECK_MSG(s.launches[OP_ELEMENTWISE] == fwd + bwd + other, "elementwise launches %ld, hand count %d",
              s.launches[OP_ELEMENTWISE], fwd + bwd + other);
    // optimizer (its scalars are copied up, above): Muon's momentum and normalize launches, 5 × 3 strided-batched
    // Newton–Schulz GEMMs for each of 4 banks (c_q and proj, c_k and c_v, fc, mlp.proj), one apply; one Adam
    CHECK_MSG(s.launches[OP_OPTIMIZER] == 2 + 4 * 15 + 1 + 1, "optimizer launches %ld", s.launches[OP_OPTIMIZER]);
}

TEST(cost_scales_with_batch_layers_and_ranks) {
    Config c = cost_preset("pr467");
    CostSums a = cost_sums(c, 8);
    c.train_batch_tokens *= 2;  // twice the sequences per rank: the same launches, twice the token work
    CostSums b = cost_sums(c, 8);
    CHECK(a.total == b.total);
    CHECK_CLOSE(b.flops[OP_GEMM], 2 * a.flops[OP_GEMM], 1e-12, 0);
    CHECK_CLOSE(b.flops[OP_ATTN_FWD], 2 * a.flops[OP_ATTN_FWD], 1e-12, 0);
    CHECK_CLOSE(b.hbm[OP_ATTN_BWD], 2 * a.hbm[OP_ATTN_BWD], 1e-12, 0);
    CHECK(b.hbm[OP_ELEMENTWISE] > 1.9 * a.hbm[OP_ELEMENTWISE] && b.hbm[OP_ELEMENTWISE] < 2.0 * a.hbm[OP_ELEMENTWISE]);
    CHECK(b.hbm[OP_OPTIMIZER] == a.hbm[OP_OPTIMIZER]);  // per parameter, not per token
    // two more layers (one more encoder, decoder and skip) add the same launches each time
    long n[3];
    for (int i = 0; i < 3; i++) {
        Config d = cost_preset("baseline");
        d.num_layers = 2 + 2 * i;
        n[i] = cost_sums(d, 1).total;
    }
    CHECK_MSG(n[1] - n[0] == n[2] - n[1] && n[1] > n[0], "launches for 2, 4, 6 layers: %ld %ld %ld", n[0], n[1], n[2]);
    // ranks (Parallel Muon): a reduce-scatter of the fp32 banks and an all-gather of the bf16 updates, ring
    // traffic (W−1)/W of the banks each; an all-reduce of the replicated gradients and one of the clip's
    // fp64 Σ g², 2·(W−1)/W each
    Config e = cost_preset("pr467");
    CHECK(e.grad_clip_norm > 0);
    std::vector<ParamSpec> table = build_param_table(e);
    OptPlan P = opt_plan(e, table, 8, 0);
    CostSums one = cost_sums(e, 1), eight = cost_sums(e, 8);
    CHECK(one.launches[OP_COMM] == 0 && eight.launches[OP_COMM] == 4);
    double banks = 8.0 * P.chunk;
    CHECK_CLOSE(eight.link[OP_COMM], 7.0 / 8 * banks * (4 + 2) + 2 * 7.0 / 8 * (P.rep * 4.0 + 8), 1e-12, 0);
    // Newton–Schulz: one strided-batched GEMM per product and bank whatever the ranks; rank 0 multiplies
    // ⌈count/8⌉ matrices of each bank (its FLOPs), one rank all of them
    long ns_one = 0, ns_eight = 0;
    double fl_one = 0, fl_eight = 0;
    for (const CostEntry& x : cost_step_launches(e, 1))
        if (x.cls == OP_OPTIMIZER && !strcmp(x.op, "gemm_bf16")) { ns_one++; fl_one += x.flops; }
    for (const CostEntry& x : cost_step_launches(e, 8))
        if (x.cls == OP_OPTIMIZER && !strcmp(x.op, "gemm_bf16")) { ns_eight++; fl_eight += x.flops; }
    double want_one = 0, want_eight = 0;
    for (const MuonBank& b : P.banks) {
        double r = std::min(b.rows, b.cols), k = std::max(b.rows, b.cols);
        double per = 5 * (2 * r * r * k + 2 * r * r * r + 2 * r * k * r);
        want_one += per * b.mats.size();
        want_eight += per * b.shard;
    }
    CHECK(P.banks.size() >= 4 && ns_one == 15L * (long)P.banks.size() && ns_eight == ns_one);
    CHECK_CLOSE(fl_one, want_one, 1e-12, 0);
    CHECK_CLOSE(fl_eight, want_eight, 1e-12, 0);
}

// The projection adds each entry's own time; every entry takes at least a launch.
TEST(cost_projection_is_the_sum_of_its_entries) {
    Config c = cost_preset("pr467");
    std::vector<CostEntry> list = cost_step_launches(c, 8);
    double ms[OP_NUM];
    cost_projected_ms(c, 8, ms);
    double sum = 0, total = 0;
    for (const CostEntry& e : list) {
        double s = cost_seconds(e);
        CHECK(s >= (e.in_graph ? GRAPH_NODE_S : LAUNCH_S) || e.cls == OP_SYNC);
        sum += s;
    }
    for (int k = 0; k < OP_NUM; k++) total += ms[k];
    CHECK_CLOSE(total, sum * 1e3, 1e-12, 0);
    // the GEMMs can't beat the tensor-core peak, the memsets can't beat HBM
    CostSums s = cost_sums(c, 8);
    CHECK(ms[OP_GEMM] * 1e-3 >= s.flops[OP_GEMM] / H100_BF16_FLOPS);
    CHECK(ms[OP_MEMSET] * 1e-3 >= s.hbm[OP_MEMSET] / H100_HBM_BYTES);
}

// LoRA TTT's adapters are batched across documents: a chunk issues the same launches for 1 document as
// for 7 (one strided-batched GEMM per product), and its adapter GEMMs' FLOPs grow with the documents.
// With one adapter per target and layer, a chunk's forward adds 2 GEMMs and its backward 4.
TEST(cost_lora_launches_independent_of_documents) {
    Config c = cost_preset("tiny");
    c.ttt_lora_targets = "q,v,attn_out,mlp,lm_head"; c.ttt_lora_rank = 4; c.ttt_eval_seq_len = 32; c.ttt_chunk_size = 8;
    config_validate(c, 1);
    Model<Cost> m;
    TrainState<Cost> s;
    cost_model_init(m, s, c, 8, 32);
    Lora<Cost> lo;
    cost_lora_init(lo, c, 8, 8 * 32);
    CostEval one = cost_lora_chunk(m, lo, c, 1, 24, 1), seven = cost_lora_chunk(m, lo, c, 7, 24, 7);
    CHECK_MSG(one.launches == seven.launches, "1 document: %.0f launches, 7 documents: %.0f", one.launches,
              seven.launches);
    Lora<Cost> none = lo;
    for (int t = 0; t < LORA_NUM; t++) none.on[t] = false;
    CostEval base = cost_lora_chunk(m, none, c, 7, 24, 0), scored = cost_lora_chunk(m, lo, c, 7, 24, 0);
    int slots = 4 * c.num_layers + 1;
    CHECK_MSG(scored.launches - base.launches == 2 * slots, "a scoring forward adds %.0f launches, want %d",
              scored.launches - base.launches, 2 * slots);
    CHECK(seven.per_doc_launches > 6 * one.per_doc_launches);
}
