// Configuration, data, optimizers, schedule, averaging, checkpoints: the CPU reference's driver.

// --- helpers --------------------------------------------------------------------------------------
// The validation tokens with a byte table of one byte per token, no boundaries: the training loop's
// in-run validation then needs no tokenizer.
static EvalData unit_byte_eval_data(const Config& c) {
    EvalData ev;
    ev.val = load_validation_tokens(c);
    ev.luts.base_bytes.assign(c.vocab_size, 1);
    ev.luts.has_leading_space.assign(c.vocab_size, 0);
    ev.luts.is_boundary.assign(c.vocab_size, 0);
    return ev;
}

static std::string test_dir(const char* name) {
    std::string d = "/tmp/pgolf_test_" + std::to_string(getpid()) + "_" + name;
    make_dirs(d);
    return d;
}
static void write_shard_file(const std::string& path, const std::vector<uint16_t>& tokens, int magic = SHARD_MAGIC,
                             int version = SHARD_VERSION, long count = -1, size_t extra_bytes = 0) {
    int32_t header[256] = {magic, version, (int32_t)(count >= 0 ? count : (long)tokens.size())};
    std::vector<uint8_t> buf(sizeof header + 2 * tokens.size() + extra_bytes, 0);
    memcpy(buf.data(), header, sizeof header);
    memcpy(buf.data() + sizeof header, tokens.data(), 2 * tokens.size());
    write_file_atomic(path, buf.data(), buf.size());
}
// Documents of random length (BOS + tokens), as the challenge's shards.
static std::vector<uint16_t> synthetic_stream(size_t n, int vocab, uint64_t seed) {
    Rng rng(seed);
    std::vector<uint16_t> t;
    while (t.size() < n) {
        t.push_back(BOS_ID);
        int len = 1 + (int)(rng.uniform() * 300);
        for (int i = 0; i < len && t.size() < n; i++) t.push_back((uint16_t)(4 + rng.uniform() * (vocab - 4)));
    }
    return t;
}
static Config small_train_config(const std::string& data) {
    Config c;
    preset_tiny(c);
    c.data_path = data;
    c.vocab_size = 64; c.num_layers = 2; c.model_dim = 32; c.num_heads = 2; c.num_kv_heads = 1;
    c.train_seq_len = 16; c.train_batch_tokens = 128; c.grad_accum_steps = 2;
    c.bigram_vocab_size = 53; c.bigram_dim = 16; c.fp16_keep_patterns = "";
    c.iterations = 6; c.warmdown_iters = 4; c.val_loss_every = 0; c.train_log_every = 0;
    c.eval_stride = 16; c.eval_batch_seqs = 4; c.ttt_eval_seq_len = 16; c.ttt_chunk_size = 8; c.ttt_batch_size = 2;
    c.ttt_batch_seqs = 2; c.val_tokens_limit = 0;
    return c;
}
static std::string small_dataset(const char* name, int vocab = 64) {
    std::string d = test_dir(name);
    write_shard_file(d + "/fineweb_train_000000.bin", synthetic_stream(3000, vocab, 1));
    write_shard_file(d + "/fineweb_train_000001.bin", synthetic_stream(2000, vocab, 2));
    write_shard_file(d + "/fineweb_val_000000.bin", synthetic_stream(700, vocab, 3));
    return d;
}
// A CPU model and its training state at step 0, reading the config's train shards.
static void start_training(const Config& c, Model<Cpu<float>>& m, TrainState<Cpu<float>>& s) {
    model_init_for_run(Cpu<float>{}, m, c);
    train_state_init(Cpu<float>{}, s, m);
    s.loader.stream.open(shard_files(c.data_path, "train"), c.vocab_size);
}
// Trains `c` from its init (or from a checkpoint) and returns the final master weights.
static std::vector<float> train_weights(Config c, const std::string& resume = "", int* steps_done = nullptr) {
    Cpu<float> dev;
    Model<Cpu<float>> m;
    TrainState<Cpu<float>> s;
    start_training(c, m, s);
    if (!resume.empty()) load_checkpoint(dev, m, s, resume);
    EvalData ev = unit_byte_eval_data(c);
    train(dev, m, s, ev);
    if (c.checkpoint_every > 0) save_checkpoint(dev, m, s);
    if (steps_done) *steps_done = s.step;
    return std::vector<float>(m.params, m.params + m.nparams);
}

// --- configuration ----------------------------------------------------------------------------------
TEST(config_rejects_bad_shapes) {
    Config c;
    c.num_heads = 7;
    CHECK_THROWS(config_validate(c, 1), "NUM_HEADS=7 must divide MODEL_DIM=512");
    c = Config(); c.num_kv_heads = 3;
    CHECK_THROWS(config_validate(c, 1), "NUM_KV_HEADS=3 must divide NUM_HEADS=8");
    c = Config(); c.train_batch_tokens = 524288 + 1024;
    CHECK_THROWS(config_validate(c, 1), "TRAIN_BATCH_TOKENS=525312 must be a multiple of world size 1");
    c = Config();
    CHECK_THROWS(config_validate(c, 3), "world size 3 does not divide 8");
    c = Config(); c.rope_dims = 70;
    CHECK_THROWS(config_validate(c, 1), "ROPE_DIMS=70");
    c = Config(); c.bigram_vocab_size = 10; c.bigram_hash_size = 10;
    CHECK_THROWS(config_validate(c, 1), "two different bigram embeddings");
}
// On the CUDA path a head dim or GQA ratio the attention kernels lack fails at start, not at the first
// attention call after data loading; the CPU reference takes any even head dim.
TEST(config_rejects_head_dims_the_cuda_kernels_lack) {
    for (int heads : {4, 8, 16, 32}) {  // d512: head dims 128, 64, 32, 16
        Config c; c.num_heads = heads; c.num_kv_heads = 4; c.device = "cuda";
        config_validate(c, 1);
    }
    Config c; c.model_dim = 384; c.num_heads = 8; c.num_kv_heads = 4;  // head dim 48
    c.device = "cpu";
    config_validate(c, 1);
    c.device = "cuda";
    CHECK_THROWS(config_validate(c, 1),
                 "head dim MODEL_DIM/NUM_HEADS=384/8=48: the CUDA attention kernels support 16, 32, 64 or 128");
    c = Config(); c.num_heads = 32; c.num_kv_heads = 1; c.device = "cuda";  // 32 query heads per kv head at hd 16: fits
    config_validate(c, 1);
    c.model_dim = 4096;  // hd 128: 32 query heads per kv head fit, 64 do not
    config_validate(c, 1);
    c.num_heads = 64; c.model_dim = 8192;
    CHECK_THROWS(config_validate(c, 1), "at most 32 query heads per kv head at head dim 128");
    c.model_dim = 1024;  // hd 16: 64 heads fit, 128 do not
    config_validate(c, 1);
    c.num_heads = 128; c.model_dim = 2048;
    CHECK_THROWS(config_validate(c, 1), "NUM_HEADS/NUM_KV_HEADS=128");
    c.device = "cpu";
    config_validate(c, 1);
}
TEST(config_env_errors_and_presets) {
    setenv("CONFIG", "nonexistent", 1);
    CHECK_THROWS(config_from_env(),
                 "CONFIG=nonexistent: unknown preset (expected one of baseline, pr467, pr600, pr456, tiny, frontier, "
                 "frontier_tiny)");
    setenv("CONFIG", "pr467", 1);
    setenv("ITERATIONS", "12x", 1);
    CHECK_THROWS(config_from_env(), "ITERATIONS=\"12x\": expected an integer");
    setenv("ITERATIONS", "77", 1);
    Config c = config_from_env();
    CHECK(c.iterations == 77 && c.num_layers == 10 && c.warmdown_iters == 3500 && c.swa_start_frac == 0.35);
    unsetenv("ITERATIONS"); unsetenv("CONFIG");
    for (const Preset& p : PRESETS) {  // every preset is a valid configuration at its reference world size
        Config q; p.apply(q);
        config_validate(q, strcmp(p.name, "tiny") ? 8 : 1);
    }
}
TEST(config_text_roundtrip) {
    Config c; preset_pr456(c);
    c.data_path = "/some where/with=equals";
    std::string text = config_to_text(c);
    Config d = config_from_text(text, "test");
    CHECK(config_to_text(d) == text);
    CHECK_THROWS(config_from_text("NOT_A_KEY=1\n", "x.pgz"), "x.pgz: unknown config key NOT_A_KEY");
}
// SWA, SWA_STEPS and EMA_DECAY share one averaging buffer: two at once are refused at start.
TEST(weight_averages_are_exclusive) {
    Config c; preset_tiny(c);
    config_validate(c, 1);
    c.ema_decay = 0.9f;
    CHECK_THROWS(config_validate(c, 1), "three different weight averages");
    c.swa_enabled = 0;
    config_validate(c, 1);
    c.swa_steps = 5;
    CHECK_THROWS(config_validate(c, 1), "three different weight averages");
    c.ema_decay = 0; c.swa_enabled = 1;
    CHECK_THROWS(config_validate(c, 1), "three different weight averages");
}
// Settings used only after training are checked before the first step.
TEST(config_validates_evaluation_settings_before_training) {
    Config c; preset_tiny(c);
    c.eval_mode = "standard,slidng";
    CHECK_THROWS(config_validate(c, 1), "EVAL_MODE: unknown mode \"slidng\"");
    c = Config(); c.ttt_lora_targets = "q,vv";
    CHECK_THROWS(config_validate(c, 1), "TTT_LORA_TARGETS: unknown target \"vv\"");
    c = Config(); c.zstd_level = 40;
    CHECK_THROWS(config_validate(c, 1), "ZSTD_LEVEL=40");
    c = Config(); c.nll_dump = "/nonexistent_pgolf_dir/nll";
    CHECK_THROWS(outputs_check(c), "NLL_DUMP=/nonexistent_pgolf_dir/nll: cannot write");
    c.nll_dump = test_dir("nll_ok") + "/nll";
    outputs_check(c);
}
// A mistyped setting name is reported with the closest real one; other variables are left alone.
TEST(unknown_settings_are_named_with_the_closest_setting) {
    const char* env[] = {
        "ITERATION=2", "PATH=/usr/bin", "HOME=/root", "OMP_NUM_THREADS=1", "TTT_LORA_RANKS=4", "SEED=1",
        "USER=x",      "MATRIX_LR=0.1", nullptr};
    std::vector<std::string> w = unknown_setting_warnings((char**)env);
    CHECK_MSG(w.size() == 2, "%zu warnings", w.size());
    CHECK(w[0].find("ITERATION is not a pgolf setting") != std::string::npos &&
          w[0].find("did you mean ITERATIONS?") != std::string::npos);
    CHECK(w[1].find("did you mean TTT_LORA_RANK?") != std::string::npos);
    CHECK(edit_distance("ITERATION", "ITERATIONS") == 1 && edit_distance("kitten", "sitting") == 3 &&
          edit_distance("", "ab") == 2);
}
// Every setting has one scope, and the scopes say what each setting does: a model setting changes
// the parameter table or the function the same weights compute; no other setting changes either.
// Each setting is moved to a nearby valid value, under three bases (tiny-like, PR #600-like, frontier-like).
TEST(setting_scopes_match_what_each_setting_does) {
    Config a = small_train_config("unused");
    a.vocab_size = 64; a.smear = 1; a.xsa_last_n = 0; a.rope_dims = 0;
    Config b = a;
    b.bigram_vocab_size = 0; b.bigram_hash_size = 64; b.smear = 0; b.smear_gate = 1; b.swa_enabled = 0; b.swa_steps = 3;
    b.tie_embeddings = 0; b.rope_dims = 4; b.xsa_last_n = 1; b.named_cores = 1;
    Config f = a;  // a third base for the settings that act only together with others (frontier's)
    f.sparse_attn_gate = 1;
    f.gate_window = 4;
    f.num_layers = 4;
    f.parallel_start_layer = 3;
    f.num_loops = 1;  // blocks 1..2 twice, with looping on in nll_of
    f.loop_start = 1;
    f.loop_end = 2;
    const int B = 2, T = 16;
    Rng rng(5);
    std::vector<int32_t> x(B * T), y(B * T);
    for (int i = 0; i < B * T; i++) {
        x[i] = (int)(rng.uniform() * 64);
        y[i] = (int)(rng.uniform() * 64);
    }
    x[5] = 1;  // a BOS (id 1) inside each row: document masking (VARLEN_ATTN) must change the forward
    x[T + 9] = 1;
    auto nll_of = [&](const Config& c, std::vector<ParamSpec>& table) {
        Cpu<float> dev;
        Model<Cpu<float>> m;
        model_init(dev, m, c, B, T);
        m.looping = c.num_loops > 0;
        Rng w(9);
        for (size_t i = 0; i < m.nparams; i++) m.params[i] = (float)(0.3 * w.normal());
        refresh_compute_weights(dev, m, false);
        std::vector<float> nll;
        forward_nll(dev, m, x, y, B, T, nll);
        table = m.table;
        model_free(dev, m);
        return nll;
    };
    std::map<std::string, int> changed;
    for (Config base : {a, b, f}) {
        config_validate(base, 1);
        std::vector<ParamSpec> t0;
        std::vector<float> n0 = nll_of(base, t0);
        size_t count = config_settings(base).size();
        for (size_t k = 0; k < count; k++) {
            Config c = base;
            Setting s = config_settings(c)[k];
            Scope scope = setting_scope(s.name);
            std::string v = setting_value(s);
            std::vector<std::string> cand;
            if (s.kind == 'i' || s.kind == 'l') {
                long iv = atol(v.c_str());
                for (long d : {iv == 0 ? 1L : 0L, iv + 1, iv + 2, iv * 2, iv - 1}) cand.push_back(std::to_string(d));
            } else if (s.kind == 'f' || s.kind == 'd') {
                double dv = atof(v.c_str());
                cand = {fmt("%.9g", dv * 1.5 + 0.25), fmt("%.9g", dv * 0.5)};
            } else {
                cand = {"leaky_relu_sq", "relu_sq", "standard", "sliding",   "mixed",
                        "q,k",           "bits",    "adamw",    "reference", "attn",
                        "mlp",           "x"};
            }
            bool moved = false;
            for (const std::string& nv : cand) {
                c = base;
                Setting t = config_settings(c)[k];
                setting_parse(t, nv.c_str());
                if (setting_value(t) == v) continue;
                try { config_validate(c, 1); } catch (const std::exception&) { continue; }
                moved = true;
                break;
            }
            if (!moved) continue;
            std::vector<ParamSpec> t1;
            std::vector<float> n1 = nll_of(c, t1);
            bool same_table = t0.size() == t1.size();
            for (size_t i = 0; same_table && i < t0.size(); i++)
                same_table = t0[i].name == t1[i].name && t0[i].shape == t1[i].shape;
            bool same = same_table && memcmp(n0.data(), n1.data(), n0.size() * sizeof(float)) == 0;
            if (!same) changed[s.name]++;
            CHECK_MSG(same || scope == SCOPE_MODEL, "%s (scope %s) changes the model: tag it model", s.name,
                      SCOPE_NAMES[scope]);
        }
    }
    for (const Setting& s : config_settings(a))
        if (setting_scope(s.name) == SCOPE_MODEL)
            CHECK_MSG(changed[s.name] > 0, "%s is tagged model but changed neither the table nor the forward", s.name);
}
// Every model setting set in the environment to another value than a loaded artifact's is refused;
// a checkpoint refuses it too; settings of other scopes pass.
TEST(every_model_setting_is_refused_at_load_time) {
    Config art; preset_tiny(art);
    int model = 0;
    for (const char* name : {"MLP_ACTIVATION", "ROPE_DIMS", "ROPE_BASE", "LOGIT_SOFTCAP"})
        CHECK(setting_scope(name) == SCOPE_MODEL);
    std::vector<Setting> settings = config_settings(art);
    for (size_t k = 0; k < settings.size(); k++) {
        const Setting& s = settings[k];
        Scope scope = setting_scope(s.name);
        std::string v = setting_value(s);
        std::string other = s.kind == 's'                    ? v + "_other"
                            : s.kind == 'f' || s.kind == 'd' ? fmt("%.9g", 2 * atof(v.c_str()) + 1)
                                                             : std::to_string(atol(v.c_str()) + 7);
        setenv("CONFIG", "tiny", 1);
        setenv(s.name, other.c_str(), 1);
        Config e = config_from_env();
        if (scope == SCOPE_MODEL) {
            model++;
            CHECK_THROWS(config_for_artifact(e, art, "a.pgz"),
                         fmt("LOAD_ARTIFACT: %s=%s contradicts", s.name, other.c_str()).c_str());
            CHECK_THROWS(config_check_resume(art, e, "c.safetensors"), fmt("checkpoint has %s=", s.name).c_str());
        } else {  // the environment's value is the one in force
            Config got = config_for_artifact(e, art, "a.pgz");
            CHECK_MSG(setting_value(config_settings(got)[k]) == setting_value(config_settings(e)[k]), "%s", s.name);
            config_check_resume(art, e, "c.safetensors");
        }
        unsetenv(s.name);
    }
    unsetenv("CONFIG");
    CHECK(model >= 19);
}

// --- data -------------------------------------------------------------------------------------------
TEST(shard_bad_inputs_name_the_file) {
    std::string d = test_dir("shards");
    std::vector<uint16_t> toks = {1, 5, 6, 7};
    write_shard_file(d + "/magic.bin", toks, 1234);
    CHECK_THROWS(load_shard(d + "/magic.bin", 64), "magic.bin: bad magic 1234 (expected 20240520)");
    write_shard_file(d + "/version.bin", toks, SHARD_MAGIC, 2);
    CHECK_THROWS(load_shard(d + "/version.bin", 64), "version.bin: unsupported shard version 2");
    write_shard_file(d + "/count.bin", toks, SHARD_MAGIC, 1, 10);
    CHECK_THROWS(load_shard(d + "/count.bin", 64),
                 "count.bin: header says 10 tokens, i.e. 1044 bytes, but the file has 1032 bytes (truncated?)");
    write_shard_file(d + "/odd.bin", toks, SHARD_MAGIC, 1, -1, 1);
    CHECK_THROWS(load_shard(d + "/odd.bin", 64),
                 "odd.bin: header says 4 tokens, i.e. 1032 bytes, but the file has 1033 bytes");
    std::vector<uint8_t> tiny(100, 0);
    write_file_atomic(d + "/short.bin", tiny.data(), tiny.size());
    CHECK_THROWS(load_shard(d + "/short.bin", 64), "short.bin: 100 bytes is shorter than the 1024-byte shard header");
    write_shard_file(d + "/vocab.bin", {1, 5, 99});
    CHECK_THROWS(load_shard(d + "/vocab.bin", 64),
                 "vocab.bin: token 99 at position 2 is outside the vocabulary (VOCAB_SIZE=64)");
    CHECK_THROWS(load_shard(d + "/missing.bin", 64), "cannot open");
    CHECK_THROWS(shard_files(d + "/nowhere", "train"), "no train shards match");
    CHECK(load_shard(d + "/vocab.bin", 128).size() == 3);
}
// Train shards are checked before the first step: every token within the scan budget, else samples
// that include each shard's first and last tokens (the rest is checked when training loads it).
TEST(shard_check_at_start_full_or_sampled) {
    std::string d = test_dir("shard_scan");
    std::vector<std::string> files = {d + "/fineweb_train_000000.bin", d + "/fineweb_train_000001.bin"};
    std::vector<uint16_t> a(1000000, 7), b(1000000, 7);
    b[500001] = 999;  // between two of the 64 evenly spaced 4096-token samples
    write_shard_file(files[0], a);
    write_shard_file(files[1], b);
    CHECK_THROWS(validate_train_shards(files, 64),
                 "fineweb_train_000001.bin: token 999 at position 500001 is outside the vocabulary");
    CHECK(validate_train_shards(files, 64, 1000) == 2000000);  // sampled: not seen here
    CHECK_THROWS(load_shard(files[1], 64), "token 999 at position 500001");  // but when training loads the shard
    b[500001] = 7;
    b.back() = 64;
    write_shard_file(files[1], b);
    CHECK_THROWS(validate_train_shards(files, 64, 1000), "fineweb_train_000001.bin: token 64 at position 999999");
    write_shard_file(files[1], {});
    CHECK_THROWS(validate_train_shards(files, 64), "fineweb_train_000001.bin: a shard with 0 tokens");
}
// The reference's order: any world size with the same global batch sees the same sequences.
TEST(loader_order_is_world_size_invariant) {
    std::string d = small_dataset("loader");
    std::vector<std::string> files = shard_files(d, "train");
    long global = 256;
    DataLoader one; one.stream.open(files, 64);
    std::vector<DataLoader> two(2);
    for (int r = 0; r < 2; r++) { two[r].rank = r; two[r].world = 2; two[r].stream.open(files, 64); }
    std::vector<int32_t> x, y, x2, y2;
    for (int step = 0; step < 30; step++) {  // crosses shard boundaries and wraps around
        std::vector<int32_t> all1, all2;
        for (int micro = 0; micro < 8; micro++) {
            one.next_batch(global, 8, x, y);
            all1.insert(all1.end(), x.begin(), x.end());
            all1.insert(all1.end(), y.begin(), y.end());
        }
        for (int micro = 0; micro < 4; micro++)
            for (int r = 0; r < 2; r++) {
                two[r].next_batch(global, 4, x2, y2);
                all2.insert(all2.end(), x2.begin(), x2.end());
                all2.insert(all2.end(), y2.begin(), y2.end());
            }
        CHECK_MSG(all1 == all2, "step %d: world 1 and world 2 see different tokens", step);
    }
    // and targets are inputs shifted by one within each rank's span
    one.next_batch(global, 8, x, y);
    for (size_t i = 0; i + 1 < x.size(); i++) CHECK(y[i] == x[i + 1]);
}
TEST(validation_stream_truncation) {
    std::string d = small_dataset("val");
    Config c = small_train_config(d);
    std::vector<uint16_t> all = load_validation_tokens(c);
    CHECK(all.size() == 700);
    c.val_truncate_to_seq = 1;  // the reference keeps ((N-1)/L)·L + 1 tokens
    CHECK(load_validation_tokens(c).size() == (size_t)((699 / 16) * 16 + 1));
    c.val_truncate_to_seq = 0; c.val_tokens_limit = 100;
    CHECK(load_validation_tokens(c).size() == 100);
}

// --- optimizers and schedule ----------------------------------------------------------------------------
TEST(adamw_matches_hand_computation) {
    float p[2] = {1.0f, -2.0f}, g1[2] = {0.5f, -1.0f}, g2[2] = {0.1f, 0.2f}, m[2] = {0, 0}, v[2] = {0, 0};
    float lr = 0.1f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.04f;
    double P[2] = {1.0, -2.0}, M[2] = {0, 0}, Vv[2] = {0, 0};
    const float* gs[2] = {g1, g2};
    for (int t = 1; t <= 2; t++) {
        adamw_update(Cpu<float>{}, p, gs[t - 1], m, v, 2, lr, b1, b2, eps, wd, t);
        for (int i = 0; i < 2; i++) {  // torch.optim.AdamW, step by step
            double g = gs[t - 1][i];
            P[i] *= 1 - lr * wd;
            M[i] = b1 * M[i] + (1 - b1) * g;
            Vv[i] = b2 * Vv[i] + (1 - b2) * g * g;
            double mhat = M[i] / (1 - std::pow(b1, t)), vhat = Vv[i] / (1 - std::pow(b2, t));
            P[i] -= lr * mhat / (std::sqrt(vhat) + eps);
        }
    }
    CHECK_ALL_CLOSE(p, P, 2, 1e-6, 1e-7);
}
// Newton–Schulz acts on each singular value alone: σ → aσ + bσ³ + cσ⁵ (after σ/‖G‖_F), 5 times.
TEST(newton_schulz_maps_singular_values) {
    for (int shape = 0; shape < 2; shape++) {
        int rows = shape ? 48 : 20, cols = shape ? 20 : 48, r = std::min(rows, cols);
        Rng rng(7);
        std::vector<float> U((size_t)rows * rows), V((size_t)cols * cols);
        orthogonal_init(U.data(), rows, rows, rng);
        orthogonal_init(V.data(), cols, cols, rng);
        std::vector<double> s(r);
        for (int i = 0; i < r; i++) s[i] = 0.05 + 3.0 * i / r;  // spread, including small ones
        double fro = 0;
        for (double x : s) fro += x * x;
        fro = std::sqrt(fro);
        auto build = [&](const std::vector<double>& sv) {  // U diag(sv) Vᵀ
            std::vector<double> G((size_t)rows * cols, 0.0);
            for (int i = 0; i < rows; i++)
                for (int j = 0; j < cols; j++)
                    for (int k = 0; k < r; k++)
                        G[(size_t)i * cols + j] += U[(size_t)i * rows + k] * sv[k] * V[(size_t)j * cols + k];
            return G;
        };
        std::vector<double> G = build(s);
        std::vector<float> Gf(G.begin(), G.end()), out(Gf.size());
        newton_schulz(Cpu<float>{}, out.data(), Gf.data(), rows, cols, 5);
        std::vector<double> f(r);
        for (int i = 0; i < r; i++) {
            double x = s[i] / (fro + 1e-7);
            for (int k = 0; k < 5; k++) x = NS_A * x + NS_B * x * x * x + NS_C * x * x * x * x * x;
            f[i] = x;
            CHECK_MSG(x > 0.0 && x < 1.25, "singular value %g maps outside the quintic's band: %g", s[i], x);
        }
        std::vector<double> want = build(f);
        CHECK_ALL_CLOSE(out.data(), want.data(), out.size(), 1e-4, 2e-5);
    }
}
TEST(muon_step_matches_hand_computation) {
    int rows = 6, cols = 3;
    Rng rng(3);
    std::vector<float> g(18), buf(18), upd(18), p(18);
    for (auto& x : g) x = (float)rng.normal();
    for (auto& x : buf) x = (float)rng.normal();
    for (auto& x : p) x = (float)rng.normal();
    std::vector<float> buf0 = buf, p0 = p;
    float mu = 0.95f, lr = 0.02f, wd = 0.04f;
    muon_direction(Cpu<float>{}, upd.data(), g.data(), buf.data(), rows, cols, mu, 5);
    std::vector<float> nest(18), want(18);
    for (int i = 0; i < 18; i++) { buf0[i] = mu * buf0[i] + g[i]; nest[i] = g[i] + mu * buf0[i]; }
    newton_schulz(Cpu<float>{}, want.data(), nest.data(), rows, cols, 5);
    for (auto& x : want) x *= std::sqrt(2.0f);  // √max(1, rows/cols)
    CHECK_ALL_CLOSE(buf.data(), buf0.data(), 18, 0, 0);
    CHECK_ALL_CLOSE(upd.data(), want.data(), 18, 1e-6, 1e-7);
    apply_update(Cpu<float>{}, p.data(), upd.data(), 18, lr, wd);
    for (int i = 0; i < 18; i++) CHECK_CLOSE(p[i], p0[i] * (1 - lr * wd) - lr * want[i], 1e-6, 1e-7);
}
// An independent fp64 Newton–Schulz as #1855 writes it: X = G/(‖G‖_F + 1e−7), transposed when tall;
// per iteration (a, b, c): A = XXᵀ, B = bA + cA², X = aX + BX. The Polar Express table as published (PR #1344).
static const double PE_TABLE[5][3] = {
    {8.156554524902461, -22.48329292557795, 15.878769915207462},
    {4.042929935166739, -2.808917465908714, 0.5000178451051316},
    {3.8916678022926607, -2.772484153217685, 0.5060648178503393},
    {3.285753657755655, -2.3681294933425376, 0.46449024233003106},
    {2.3465413258596377, -1.7097828382687081, 0.42323551169305323},
};
static std::vector<double> ns_fp64(const std::vector<double>& G, int rows, int cols, int steps, bool polar) {
    bool tr = rows > cols;
    int r = tr ? cols : rows, k = tr ? rows : cols;
    double fro = 0;
    for (double x : G) fro += x * x;
    fro = std::sqrt(fro) + 1e-7;
    std::vector<double> X((size_t)r * k), A((size_t)r * r), B((size_t)r * r), Y((size_t)r * k);
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) X[tr ? (size_t)j * k + i : (size_t)i * k + j] = G[(size_t)i * cols + j] / fro;
    for (int s = 0; s < steps; s++) {
        double a = polar ? PE_TABLE[s][0] : 3.4445;
        double b = polar ? PE_TABLE[s][1] : -4.7750;
        double c = polar ? PE_TABLE[s][2] : 2.0315;
        for (int i = 0; i < r; i++)
            for (int j = 0; j < r; j++) {
                double t = 0;
                for (int q = 0; q < k; q++) t += X[(size_t)i * k + q] * X[(size_t)j * k + q];
                A[(size_t)i * r + j] = t;
            }
        for (int i = 0; i < r; i++)
            for (int j = 0; j < r; j++) {
                double t = 0;
                for (int q = 0; q < r; q++) t += A[(size_t)i * r + q] * A[(size_t)q * r + j];
                B[(size_t)i * r + j] = b * A[(size_t)i * r + j] + c * t;
            }
        for (int i = 0; i < r; i++)
            for (int j = 0; j < k; j++) {
                double t = 0;
                for (int q = 0; q < r; q++) t += B[(size_t)i * r + q] * X[(size_t)q * k + j];
                Y[(size_t)i * k + j] = a * X[(size_t)i * k + j] + t;
            }
        X = Y;
    }
    std::vector<double> out(G.size());
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) out[(size_t)i * cols + j] = X[tr ? (size_t)j * k + i : (size_t)i * k + j];
    return out;
}
// Polar Express: the CPU reference's Newton–Schulz with MUON_POLAR_EXPRESS=1 against the fp64 one with
// the published table, wide and tall, 3 and 5 steps; after 5 steps every singular value is within
// [0.5, 1.25] of 1 (the stock quintic leaves the small ones far lower), and the two schedules differ.
TEST(polar_express_newton_schulz_matches_fp64) {
    for (int shape = 0; shape < 2; shape++) {
        int rows = shape ? 40 : 16, cols = shape ? 16 : 40;
        Rng rng(11 + shape);
        std::vector<double> G((size_t)rows * cols);
        for (double& x : G) x = rng.normal();
        std::vector<float> Gf(G.begin(), G.end()), out(G.size()), stock(G.size());
        for (int steps : {3, 5}) {
            newton_schulz(Cpu<float>{}, out.data(), Gf.data(), rows, cols, steps, true);
            std::vector<double> want = ns_fp64(G, rows, cols, steps, true);
            CHECK_ALL_CLOSE(out.data(), want.data(), out.size(), 1e-4, 2e-5);
        }
        newton_schulz(Cpu<float>{}, stock.data(), Gf.data(), rows, cols, 5, false);
        std::vector<double> stock_want = ns_fp64(G, rows, cols, 5, false);
        CHECK_ALL_CLOSE(stock.data(), stock_want.data(), stock.size(), 1e-4, 2e-5);
        double diff = 0;
        for (size_t i = 0; i < out.size(); i++) diff = std::max(diff, (double)std::fabs(out[i] - stock[i]));
        CHECK_MSG(diff > 1e-2, "Polar Express and the stock quintic give the same matrix (max diff %g)", diff);
        // the singular values both leave: Polar Express ends nearer to orthogonal (‖O·Oᵀ − I‖_F smaller)
        auto gram_dev = [&](const std::vector<float>& O) {
            int r = std::min(rows, cols), k = std::max(rows, cols);
            double fro = 0;
            for (int i = 0; i < r; i++)
                for (int j = 0; j < r; j++) {
                    double t = i == j ? -1.0 : 0.0;
                    for (int q = 0; q < k; q++) {
                        double x = rows < cols ? O[(size_t)i * cols + q] : O[(size_t)q * cols + i];
                        double y = rows < cols ? O[(size_t)j * cols + q] : O[(size_t)q * cols + j];
                        t += x * y;
                    }
                    fro += t * t;
                }
            return std::sqrt(fro);
        };
        double dev_pe = gram_dev(out), dev_stock = gram_dev(stock);
        CHECK_MSG(dev_pe < dev_stock, "Polar Express %g not nearer orthogonal than the stock quintic %g", dev_pe,
                  dev_stock);
    }
    Config c;
    c.muon_polar_express = 1; c.muon_backend_steps = 6;
    CHECK_THROWS(config_validate(c, 1), "MUON_POLAR_EXPRESS");
}
// MuonEq-R: each row of g + μ·buf divided by max(‖row‖₂, 1e−7) before Newton–Schulz (a zero row stays
// zero), against fp64 with the same momentum; the momentum buffer itself is not normalized.
TEST(muon_row_normalize_matches_fp64) {
    int rows = 24, cols = 10;
    Rng rng(5);
    std::vector<float> g((size_t)rows * cols), buf(g.size()), upd(g.size());
    for (auto& x : g) x = (float)rng.normal();
    for (auto& x : buf) x = (float)rng.normal();
    for (int j = 0; j < cols; j++) { g[3 * cols + j] = 0.0f; buf[3 * cols + j] = 0.0f; }  // a zero row
    for (int j = 0; j < cols; j++) g[5 * cols + j] *= 100.0f;  // a row 100× the others
    std::vector<float> buf0 = buf;
    float mu = 0.97f;
    muon_direction(Cpu<float>{}, upd.data(), g.data(), buf.data(), rows, cols, mu, 5, true, true);
    std::vector<double> nest(g.size()), b(g.size());
    for (size_t i = 0; i < g.size(); i++) { b[i] = (double)(mu * buf0[i] + g[i]); nest[i] = g[i] + mu * b[i]; }
    for (int i = 0; i < rows; i++) {
        double ss = 0;
        for (int j = 0; j < cols; j++) ss += nest[(size_t)i * cols + j] * nest[(size_t)i * cols + j];
        double rn = std::max(std::sqrt(ss), 1e-7);
        for (int j = 0; j < cols; j++) nest[(size_t)i * cols + j] /= rn;
    }
    std::vector<double> want = ns_fp64(nest, rows, cols, 5, true);
    for (double& x : want) x *= std::sqrt((double)rows / cols);
    CHECK_ALL_CLOSE(buf.data(), b.data(), buf.size(), 1e-6, 1e-6);
    CHECK_ALL_CLOSE(upd.data(), want.data(), upd.size(), 2e-4, 2e-5);
    for (int j = 0; j < cols; j++) CHECK(upd[3 * cols + j] == 0.0f);
}
TEST(lr_multiplier_matches_reference_formula) {
    Config c;
    c.iterations = 1000; c.warmdown_iters = 200; c.max_wallclock_seconds = 0;
    CHECK(lr_multiplier(c, 0, 0) == 1.0 && lr_multiplier(c, 799, 0) == 1.0);
    CHECK_CLOSE(lr_multiplier(c, 800, 0), 1.0, 1e-12, 0);
    CHECK_CLOSE(lr_multiplier(c, 900, 0), 0.5, 1e-12, 0);
    CHECK_CLOSE(lr_multiplier(c, 999, 0), 0.005, 1e-12, 0);
    c.max_wallclock_seconds = 600;  // 100 ms per step so far: warm-down = 200 × 100 ms = 20 s
    CHECK(lr_multiplier(c, 5000, 500000) == 1.0);                    // 100 s remaining > 20 s
    CHECK_CLOSE(lr_multiplier(c, 5900, 590000), 10000.0 / 20000.0 * (5900.0 / 5900.0), 1e-12, 0);
    CHECK_CLOSE(lr_multiplier(c, 5990, 599000), 1000.0 / (200 * 599000.0 / 5990), 1e-12, 0);
    CHECK(lr_multiplier(c, 6100, 610000) == 0.0);
    c.min_lr = 0.1f;  // #1787's floor inside the warm-down: max(ramp, MIN_LR)
    CHECK(lr_multiplier(c, 5000, 500000) == 1.0);
    CHECK_CLOSE(lr_multiplier(c, 5900, 590000), 0.5, 1e-12, 0);
    CHECK_CLOSE(lr_multiplier(c, 5990, 599000), (double)c.min_lr, 1e-12, 0);
    c.max_wallclock_seconds = 0;
    CHECK_CLOSE(lr_multiplier(c, 900, 0), 0.5, 1e-12, 0);
    CHECK_CLOSE(lr_multiplier(c, 999, 0), (double)c.min_lr, 1e-12, 0);
    CHECK(lr_multiplier(c, 700, 0) == 1.0);
    c.warmdown_frac = 0.5;  // #1855's form: max((1 − frac)/WARMDOWN_FRAC, MIN_LR)
    CHECK_CLOSE(lr_multiplier(c, 900, 0), 0.2, 1e-12, 0);
    CHECK_CLOSE(lr_multiplier(c, 990, 0), (double)c.min_lr, 1e-12, 0);
    c.warmdown_frac = 0;
    c.min_lr = 0; c.max_wallclock_seconds = 600;
    c.warmdown_iters = 0;
    CHECK(lr_multiplier(c, 5990, 599000) == 1.0);
    c.muon_momentum_warmup_start = 0.85f; c.muon_momentum = 0.95f; c.muon_momentum_warmup_steps = 500;
    CHECK_CLOSE(muon_momentum_at(c, 0), 0.85, 1e-6, 0);
    CHECK_CLOSE(muon_momentum_at(c, 250), 0.90, 1e-6, 0);
    CHECK_CLOSE(muon_momentum_at(c, 9999), 0.95, 1e-6, 0);
}
// Fake quantization is quantize→dequantize with the per-row scale max(rowmax/clip, floor).
TEST(qat_fake_quant_is_quantize_dequantize) {
    int rows = 5, cols = 33;
    Rng rng(11);
    std::vector<float> w((size_t)rows * cols), out(w.size());
    for (auto& x : w) x = (float)(0.02 * rng.normal());
    for (int c = 0; c < cols; c++) w[(size_t)4 * cols + c] = 0.0f;  // an all-zero row hits the floor
    for (int bits : {5, 6}) {
        int clip = (1 << (bits - 1)) - 1;
        float floor = 1.0f / 31;
        fake_quant_rows(Cpu<float>{}, out.data(), w.data(), rows, cols, clip, floor);
        for (int r = 0; r < rows; r++) {
            float mx = 0;
            for (int c = 0; c < cols; c++) mx = std::max(mx, std::fabs(w[(size_t)r * cols + c]));
            float s = std::max(mx / clip, floor);
            for (int c = 0; c < cols; c++) {
                float q = std::nearbyint(w[(size_t)r * cols + c] / s);
                q = std::min(std::max(q, (float)-(clip + 1)), (float)clip);
                CHECK(out[(size_t)r * cols + c] == q * s);
                CHECK(std::fabs(out[(size_t)r * cols + c] - w[(size_t)r * cols + c]) <= s / 2 + 1e-9f);
            }
        }
    }
}

// --- training loop ----------------------------------------------------------------------------------------
// thwu1 SWA: the final weights are the arithmetic mean of the snapshots taken.
TEST(swa_is_the_mean_of_the_snapshots) {
    std::string d = small_dataset("swa");
    Config c = small_train_config(d);
    c.warmdown_iters = 0;  // lr multiplier 1 throughout, so shorter runs are prefixes of longer ones
    c.swa_enabled = 0;
    std::vector<std::vector<float>> snaps;
    for (int steps : {2, 4, 6}) { c.iterations = steps; snaps.push_back(train_weights(c)); }
    c.iterations = 6; c.swa_enabled = 1; c.swa_every = 2; c.swa_start_frac = 2.0f;
    std::vector<float> avg = train_weights(c);
    for (size_t i = 0; i < avg.size(); i++) {
        double mean = ((double)snaps[0][i] + snaps[1][i] + snaps[2][i]) / 3;
        CHECK_MSG(std::fabs(avg[i] - mean) <= 1e-6 * (1 + std::fabs(mean)), "element %zu: %g vs mean %g", i, avg[i],
                  mean);
    }
}
// Schedule ties compare as the reference's Python floats: with PR #456's thresholds (0.2, 0.1) and
// ITERATIONS=WARMDOWN_ITERS=10 the multiplier is exactly 0.2 at step 8 and 0.1 at step 9, where
// `mult < 0.2` and `mult < 0.1` are false: SWA first sums after step 10 and late QAT never starts.
TEST(schedule_thresholds_compare_as_the_reference) {
    std::string d = small_dataset("ties");
    Config c = small_train_config(d);
    preset_pr456(c);
    Config s0 = small_train_config(d);
    c.data_path = s0.data_path; c.vocab_size = s0.vocab_size; c.num_layers = 2; c.unique_layers = 2; c.xsa_last_n = 1;
    c.model_dim = 32; c.num_heads = 2; c.num_kv_heads = 1; c.train_seq_len = 16; c.train_batch_tokens = 128;
    c.grad_accum_steps = 2; c.bigram_vocab_size = 53; c.bigram_dim = 16; c.fp16_keep_patterns = "";
    c.max_wallclock_seconds = 0; c.val_loss_every = 0; c.train_log_every = 0; c.val_tokens_limit = 0;
    c.iterations = 10; c.warmdown_iters = 10; c.swa_every = 1;
    CHECK(c.late_qat == 1);
    Cpu<float> dev;
    Model<Cpu<float>> m;
    TrainState<Cpu<float>> s;
    start_training(c, m, s);
    EvalData ev = unit_byte_eval_data(c);
    train(dev, m, s, ev);
    CHECK_MSG(s.swa_count == 1, "SWA took %d snapshots (the reference takes 1, after step 10)", s.swa_count);
    CHECK_MSG(!s.qat_active, "late QAT started (the reference never starts it here)");
}
// PR #456 fake-quantizes only in training mode: the validation during training reads plain weights.
TEST(validation_under_late_qat_reads_plain_weights) {
    std::string d = small_dataset("qatval");
    Config c = small_train_config(d);
    c.late_qat = 1; c.qat_bits = 6; c.qat_threshold = 2.0; c.qat_scale_floor = 1.0f / 31.0f; c.swa_enabled = 0;
    c.iterations = 3;
    Cpu<float> dev;
    Model<Cpu<float>> m;
    TrainState<Cpu<float>> s;
    start_training(c, m, s);
    EvalData ev = unit_byte_eval_data(c);
    train(dev, m, s, ev);  // validates at the last step, QAT active
    CHECK(s.qat_active);
    refresh_compute_weights(dev, m, false);
    double plain = eval_standard(dev, m, ev).val_loss;
    refresh_compute_weights(dev, m, true);
    double quant = eval_standard(dev, m, ev).val_loss;
    refresh_compute_weights(dev, m, false);
    CHECK_MSG(plain != quant, "fake quantization changed nothing (%.9f): the test cannot tell them apart", plain);
    CHECK_MSG(s.last_val.val_loss == plain, "in-training val_loss %.9f, plain weights %.9f, fake-quantized %.9f",
              s.last_val.val_loss, plain, quant);
}
// EMBED_BF16=1: the embedding tables' weights, Adam moments and SWA sum hold bf16 values (as the
// reference's bf16 tensors), every other tensor stays fp32, and the run differs from the fp32 default.
TEST(embed_bf16_keeps_the_tables_in_bf16) {
    std::string d = small_dataset("bf16");
    Config c = small_train_config(d);
    c.swa_enabled = 1; c.swa_every = 1; c.swa_start_frac = 2.0; c.iterations = 4;
    auto is_bf16 = [](float f) { uint32_t x; memcpy(&x, &f, 4); return (x & 0xffffu) == 0; };
    std::vector<float> plain = train_weights(c);
    c.embed_bf16 = 1;
    Cpu<float> dev;
    Model<Cpu<float>> m;
    TrainState<Cpu<float>> s;
    start_training(c, m, s);
    EvalData ev = unit_byte_eval_data(c);
    train(dev, m, s, ev);
    int tables = 0;
    for (const ParamSpec& p : m.table) {
        bool want = p.role == P_TOK_EMB || p.role == P_BIGRAM_EMBED;
        tables += want;
        size_t off = 0, n_bf16 = 0;
        for (const float* buf :
             {(const float*)m.params, (const float*)s.adam_m, (const float*)s.adam_v, (const float*)s.avg})
            for (size_t i = 0; i < p.numel; i++) n_bf16 += is_bf16(buf[p.offset + i]) ? 1 : 0;
        off = 4 * p.numel;
        if (want) CHECK_MSG(n_bf16 == off, "%s: %zu of %zu values are not bf16", p.name.c_str(), off - n_bf16, off);
        size_t fp32 = 0, nonzero = 0;  // other tensors: their non-zero weights are not all bf16 values
        for (size_t i = 0; i < p.numel; i++) nonzero += m.params[p.offset + i] != 0;
        for (size_t i = 0; i < p.numel; i++) fp32 += m.params[p.offset + i] != 0 && !is_bf16(m.params[p.offset + i]);
        if (!want && nonzero > 64)
            CHECK_MSG(fp32 > 0, "%s: every weight is a bf16 value (should stay fp32)", p.name.c_str());
    }
    CHECK(tables == 2);
    CHECK(memcmp(plain.data(), m.params, plain.size() * 4) != 0);
    CHECK(round_bf16(1.0f + 1.0f / 256) == 1.0f && round_bf16(1.0f + 3.0f / 256) == 1.0f + 4.0f / 256);  // ties to even
}
// Train N steps ≡ train k, checkpoint, resume, train N − k: bit for bit.
TEST(resume_is_bit_identical) {
    std::string d = small_dataset("resume");
    Config c = small_train_config(d);
    c.iterations = 8; c.warmdown_iters = 5; c.swa_enabled = 1; c.swa_every = 2; c.swa_start_frac = 0.9f;
    c.out_dir = test_dir("resume_run");
    c.checkpoint_every = 3; c.checkpoint_keep = 0;
    std::vector<float> straight = train_weights(c);  // writes checkpoints at steps 3, 6 and 8
    int steps = 0;
    Config b = c; b.checkpoint_every = 0;
    std::vector<float> resumed = train_weights(b, checkpoint_path(c, 3), &steps);
    CHECK(steps == 8);
    CHECK_MSG(memcmp(straight.data(), resumed.data(), straight.size() * 4) == 0,
              "resumed weights differ from the straight run");
}
TEST(checkpoint_rejects_other_shapes_and_corruption) {
    std::string d = small_dataset("ckpt");
    Config c = small_train_config(d);
    c.iterations = 1; c.checkpoint_every = 1; c.out_dir = test_dir("ckpt_run");
    train_weights(c);
    Config other = c; other.model_dim = 64; other.num_heads = 2;
    CHECK_THROWS(train_weights(other, checkpoint_path(c, 1)),
                 "checkpoint has MODEL_DIM=32 but this run has MODEL_DIM=64");
    std::vector<uint8_t> bytes = read_file(checkpoint_path(c, 1));
    std::string cut = c.out_dir + "/cut.safetensors";
    write_file_atomic(cut, bytes.data(), bytes.size() / 2);
    CHECK_THROWS(train_weights(c, cut), "cut.safetensors");
    write_file_atomic(cut, bytes.data(), 5);
    CHECK_THROWS(train_weights(c, cut), "too short for a safetensors file");
}
// A checkpoint past ITERATIONS, or a loader position the train shards do not have: a clear error.
TEST(resume_rejects_a_step_past_iterations_and_missing_shards) {
    std::string d = test_dir("resume_bad");
    write_shard_file(d + "/fineweb_train_000000.bin", synthetic_stream(300, 64, 1));
    write_shard_file(d + "/fineweb_train_000001.bin", synthetic_stream(3000, 64, 2));
    write_shard_file(d + "/fineweb_val_000000.bin", synthetic_stream(700, 64, 3));
    Config c = small_train_config(d);
    c.iterations = 4; c.checkpoint_every = 4; c.out_dir = test_dir("resume_bad_run");
    train_weights(c);
    std::string ck = checkpoint_path(c, 4);
    Config b = c; b.checkpoint_every = 0; b.iterations = 2;
    CHECK_THROWS(train_weights(b, ck), "the checkpoint is at step 4, past ITERATIONS=2");
    b.iterations = 4;
    int steps = -1;
    train_weights(b, ck, &steps);  // at ITERATIONS exactly: nothing left to train
    CHECK(steps == 4);
    SafetensorsFile f = safetensors_read(ck);
    CHECK(f.meta["loader_file"] == "1");  // 4 steps of 2 × 65 tokens went past the first shard's 300
    std::string fewer = test_dir("resume_fewer");
    write_shard_file(fewer + "/fineweb_train_000000.bin", synthetic_stream(300, 64, 1));
    write_shard_file(fewer + "/fineweb_val_000000.bin", synthetic_stream(700, 64, 3));
    b.data_path = fewer; b.iterations = 6;
    CHECK_THROWS(train_weights(b, ck),
                 fmt("is train shard #1 (0-based), token %s, but DATA_PATH=%s holds 1 train shards",
                     f.meta["loader_pos"].c_str(), fewer.c_str())
                     .c_str());
    write_shard_file(fewer + "/fineweb_train_000001.bin", synthetic_stream(10, 64, 2));
    CHECK_THROWS(train_weights(b, ck), "fineweb_train_000001.bin, which holds 10 tokens");
}
// After a divergence, the checkpoint named is from before it: the weights after step k are those the
// step-(k+1) forward reads, so a checkpoint at the diverging step itself is not named.
TEST(divergence_names_a_checkpoint_from_before_it) {
    std::vector<SavedCheckpoint> saved = {{"a", 2}, {"b", 4}, {"c", 6}};
    CHECK(last_good_checkpoint(saved, 6) == "b");
    CHECK(last_good_checkpoint(saved, 7) == "c");
    CHECK(last_good_checkpoint(saved, 2) == "");
    CHECK(last_good_checkpoint({}, 5) == "");
}

// --- end to end ---------------------------------------------------------------------------------------
// The tiny preset learns: after a short CPU run on the embedded corpus its val_bpb is well below
// the unigram baseline of that corpus (train-set token frequencies, add-one smoothed).
TEST(tiny_trains_below_unigram_baseline) {
    Config c;
    preset_tiny(c);
    c.data_path = "data/datasets/debian_prose_sp1024";
    if (glob_sorted(c.data_path + "/fineweb_train_*.bin").empty())
        throw TestFailure("the embedded corpus is missing: run scripts/make_corpus (make test does)");
    c.iterations = 50; c.warmdown_iters = 20; c.train_batch_tokens = 4096; c.val_tokens_limit = 32768;
    SpmModel sp = spm_load("data/tokenizers/fineweb_1024_bpe.model");
    EvalData ev;
    ev.luts = spm_byte_luts(sp, c.vocab_size);
    ev.val = load_validation_tokens(c);
    std::vector<double> count(c.vocab_size, 1.0);
    double total = c.vocab_size;
    for (const std::string& f : shard_files(c.data_path, "train"))
        for (uint16_t t : load_shard(f, c.vocab_size)) { count[t] += 1; total += 1; }
    ScoreSums uni;
    for (size_t j = 0; j + 1 < ev.val.size(); j++)
        uni.add(-std::log(count[ev.val[j + 1]] / total), ev.val[j], ev.val[j + 1], ev.luts);
    Cpu<float> dev;
    Model<Cpu<float>> m;
    TrainState<Cpu<float>> s;
    start_training(c, m, s);
    train(dev, m, s, ev);
    EvalResult r = eval_standard(dev, m, ev);
    printf("    unigram val_bpb %.4f, tiny after %d steps %.4f\n", uni.val_bpb(), c.iterations, r.val_bpb);
    CHECK_MSG(r.val_bpb < uni.val_bpb() - 0.25,
              "tiny reached val_bpb %.4f, not clearly below the unigram baseline %.4f", r.val_bpb, uni.val_bpb());
}
