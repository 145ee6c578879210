// Parity with the PyTorch reference, the llm.c way: tests/parity/<preset>.safetensors were written by
// scripts/make_parity_dump from each preset's own train_gpt.py (on the CPU, float32, small shape, every
// feature of the preset on; tests/parity/README.md has the commands). The CPU reference must reproduce
// them: the first step's loss, logits and every gradient, ten optimizer steps, and each evaluation mode's
// per-position NLL. No torch here: the dumps are files.

static std::vector<float> parity_tensor(const SafetensorsFile& f, const std::string& name) {
    auto it = f.tensors.find(name);
    if (it == f.tensors.end()) throw TestFailure(test_format("%s: no tensor %s", f.path.c_str(), name.c_str()));
    size_t n = 1;
    for (long long d : it->second.shape) n *= (size_t)d;
    std::vector<float> v(n);
    safetensors_get(f, name, v.data(), n);
    return v;
}

static std::vector<uint16_t> parity_tensor_u16(const SafetensorsFile& f, const std::string& name) {
    std::vector<float> t = parity_tensor(f, name);
    return std::vector<uint16_t>(t.begin(), t.end());
}

static SafetensorsFile parity_load(const char* preset) {
    std::string path = std::string("tests/parity/") + preset + ".safetensors";
    if (access(path.c_str(), R_OK) != 0) throw TestFailure(path + " is missing (scripts/make_parity_dump writes it)");
    SafetensorsFile f = safetensors_read(path);
    CHECK(f.meta["format"] == "pgolf-parity-1" && f.meta["preset"] == preset);
    return f;
}

// The preset with the reference's settings of the dump (same names here, but for the few below), and the
// switches that reproduce what pgolf deliberately does otherwise: the validation stream cut to a
// multiple of TRAIN_SEQ_LEN (VAL_TRUNCATE_TO_SEQ=1) and the reference's sliding window set.
static Config parity_config(const SafetensorsFile& f, const std::string& data_dir) {
    Config c;
    const std::string preset = f.meta.at("preset");
    for (const Preset& p : PRESETS)
        if (preset == p.name) p.apply(c);
    // a small activation plan, unless the dump says
    c.ttt_batch_size = 2;
    c.ttt_eval_seq_len = 64;
    c.ttt_batch_seqs = 2;
    std::vector<Setting> settings = config_settings(c);
    std::string env = f.meta.at("env");
    for (size_t pos = 0; pos < env.size();) {
        size_t sp = std::min(env.find(' ', pos), env.size());
        std::string item = env.substr(pos, sp - pos);
        pos = sp + 1;
        size_t eq = item.find('=');
        std::string key = item.substr(0, eq), value = item.substr(eq + 1);
        if (key == "TORCH_COMPILE" || key == "TTT_ENABLED") continue;  // no compiler; TTT is an EVAL_MODE here
        if (key == "SLIDING_EVAL_STRIDE") key = "EVAL_STRIDE";         // PR #600's name
        if (key == "VAL_BATCH_TOKENS") key = "VAL_BATCH_SIZE";         // PR #1855's name
        if (key == "FUSED_CE_ENABLED") continue;  // its fused and eager CE are one formula; pgolf's is fused
        bool known = false;
        for (const Setting& s : settings)
            if (key == s.name) { setting_parse(s, value.c_str(), f.path); known = true; }
        if (!known)
            throw TestFailure(
                test_format("%s: the reference setting %s has no counterpart here", f.path.c_str(), key.c_str()));
    }
    if (preset == "frontier") {  // what PR #1855's code always does: settings of their own here
        c.varlen_attn = 1;
        c.muon_row_normalize = 1;
        c.muon_polar_express = 1;
        c.caseops_enabled = 0;  // the dump's shards are plain tokens (the record's CASEOPS_ENABLED defaults to 0)
    }
    c.data_path = data_dir;
    c.val_truncate_to_seq = 1;
    c.sliding = "reference";
    c.val_tokens_limit = 0;
    c.train_log_every = 0;
    c.checkpoint_every = 0;
    return c;
}

// The dump's shards, written back where the config reads them.
static std::string parity_data(const SafetensorsFile& f, const char* preset) {
    std::string d = test_dir((std::string("parity_") + preset).c_str());
    for (const char* split : {"train", "val"}) {
        std::vector<float> t = parity_tensor(f, std::string(split) + "_tokens");
        write_shard_file(d + "/fineweb_" + split + "_000000.bin", std::vector<uint16_t>(t.begin(), t.end()));
    }
    return d;
}

// Copies prefix.<name> of the dump into every parameter; each parameter must be there, and every
// tensor of the dump under that prefix must be a parameter here. jitter > 0 multiplies each weight by a
// random 1 ± jitter (the tolerance studies of tests/test_parity_cuda.cuh).
template <class D>
static void parity_put(const SafetensorsFile& f, const std::string& prefix, Model<D>& m, double jitter = 0,
                       uint64_t seed = 1) {
    size_t found = 0;
    for (auto& kv : f.tensors) found += kv.first.compare(0, prefix.size(), prefix) == 0;
    CHECK_MSG(found == m.table.size(), "%s: %zu tensors under %s, %zu parameters here", f.path.c_str(), found,
              prefix.c_str(), m.table.size());
    std::vector<typename D::grad> host(m.nparams, 0);
    Rng rng(seed);
    for (const ParamSpec& p : m.table) {
        std::vector<float> v = parity_tensor(f, prefix + p.name);
        CHECK_MSG(v.size() == p.numel, "%s%s: %zu elements, %zu here", prefix.c_str(), p.name.c_str(), v.size(),
                  p.numel);
        for (size_t i = 0; i < p.numel && i < v.size(); i++)
            host[p.offset + i] =
                (typename D::grad)(jitter > 0 ? v[i] * (rng.uniform() < 0.5 ? 1 - jitter : 1 + jitter) : v[i]);
    }
    to_device(D{}, m.params, host.data(), m.nparams);
}

// ‖a − b‖ / ‖b‖ (absolute when b is zero).
template <class T> static double rel_l2(const T* a, const float* b, size_t n) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) { d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]); r += (double)b[i] * b[i]; }
    return r > 0 ? std::sqrt(d / r) : std::sqrt(d);
}

// One step (step 0: the first): GRAD_ACCUM micro-batches of the stream, as the reference's loader cuts them
// (each takes the next local+1 tokens); loss = their mean, gradients summed with weight 1/(local·accum) into
// m.grads. on_logits(m) sees the first micro-batch's soft-capped logits (the forward leaves them in place).
template <class D, class F>
static double parity_first_step_run(D dev, Model<D>& m, const SafetensorsFile& f, F on_logits, int step = 0) {
    const Config& c = m.cfg;
    m.looping = c.num_loops > 0 && training_frac(c, step, 0) >= c.enable_looping_at;  // as train() decides it
    refresh_compute_weights(dev, m, false);
    int accum = atoi(f.meta.at("grad_accum").c_str());
    long local = c.train_batch_tokens / accum;
    int L = c.train_seq_len, B = (int)(local / L);
    std::vector<float> stream = parity_tensor(f, "train_tokens");
    std::vector<float> weights(local, 1.0f / (float)(local * accum));
    std::vector<int32_t> x(local), y(local);
    std::vector<float> nll;
    device_zero(dev, m.grads, m.nparams * sizeof(typename D::grad));
    double sum = 0;
    for (int k = 0; k < accum; k++) {
        size_t at = ((size_t)step * accum + k) * (local + 1);
        for (long i = 0; i < local; i++) {
            x[i] = (int32_t)stream[at + i];
            y[i] = (int32_t)stream[at + i + 1];
        }
        if (k == 0) {
            forward_nll(dev, m, x, y, B, L, nll);
            on_logits(m);
        }
        to_device(dev, m.acts.loss_weights, weights.data(), local);
        forward_nll(dev, m, x, y, B, L, nll, (Lora<D>*)nullptr, true);
        gpt_backward(dev, m, B, L);
        for (float v : nll) sum += v;
    }
    return sum / ((double)local * accum);
}

// Every gradient against the dump's prefix.<name>, relative to its own norm; a reference gradient that is
// rounding noise (zero in exact arithmetic, e.g. an RMSNorm's scale invariance at init) below 1e-3 of the
// largest is compared absolutely at that scale.
template <class D>
static void parity_check_grads(const SafetensorsFile& f, const Model<D>& m, const std::string& prefix,
                               double grad_rtol) {
    double largest = 0;
    for (const ParamSpec& p : m.table) {
        std::vector<float> g = parity_tensor(f, prefix + p.name);
        double n = 0;
        for (float v : g) n += (double)v * v;
        largest = std::max(largest, std::sqrt(n));
    }
    for (const ParamSpec& p : m.table) {
        std::vector<float> g = parity_tensor(f, prefix + p.name);
        double d = 0, r = 0;
        for (size_t i = 0; i < p.numel; i++) {
            d += ((double)m.grads[p.offset + i] - g[i]) * ((double)m.grads[p.offset + i] - g[i]);
            r += (double)g[i] * g[i];
        }
        double e = std::sqrt(d) / std::max(std::sqrt(r), 1e-3 * largest);
        if (getenv("PARITY_VERBOSE")) printf("  %s%s: relative L2 error %.3g\n", prefix.c_str(), p.name.c_str(), e);
        CHECK_MSG(e <= grad_rtol, "%s%s: relative L2 error %.3g", prefix.c_str(), p.name.c_str(), e);
    }
}

// The dump's config, and a model holding its weights under `prefix` ("init.", "mid.", "final.").
template <class D> static Config parity_model(const SafetensorsFile& f, const char* preset, const char* prefix, D dev,
                                              Model<D>& m) {
    Config c = parity_config(f, parity_data(f, preset));
    model_init_for_run(dev, m, c);
    parity_put(f, prefix, m);
    return c;
}

template <class T> static void parity_first_step(const char* preset, double loss_rtol, double grad_rtol) {
    SafetensorsFile f = parity_load(preset);
    Cpu<T> dev;
    Model<Cpu<T>> m;
    Config c = parity_model(f, preset, "init.", dev, m);
    long local = c.train_batch_tokens / atoi(f.meta.at("grad_accum").c_str());
    double loss = parity_first_step_run(dev, m, f, [&](const Model<Cpu<T>>& mm) {
        std::vector<float> slice = parity_tensor(f, "logits.slice"), stats = parity_tensor(f, "logits.stats");
        const T* z = mm.acts.logits;
        double s1 = 0, s2 = 0;
        for (size_t i = 0; i < (size_t)local * c.vocab_size; i++) { s1 += z[i]; s2 += (double)z[i] * z[i]; }
        for (int r = 0; r < 8; r++)
            for (int v = 0; v < 16; v++)
                CHECK_CLOSE(z[(size_t)r * c.vocab_size + v], slice[r * 16 + v], 0, 1e-5);
        CHECK_CLOSE(s2, stats[1], 1e-5, 0);
        CHECK_CLOSE(s1, stats[0], 0, 1e-5 * std::sqrt(s2));
    });
    double want = atof(f.meta.at("loss").c_str());
    CHECK_MSG(std::fabs(loss - want) <= loss_rtol * std::fabs(want), "%s loss %.9g, reference %.9g", preset, loss,
              want);
    parity_check_grads(f, m, "grad.", grad_rtol);
}

// The dump's mid step (its weights before step K and that step's loss and gradients): by then every path
// carries gradient and, for PR #1855, the loop is on.
template <class T> static void parity_mid_step(const char* preset, double loss_rtol, double grad_rtol) {
    SafetensorsFile f = parity_load(preset);
    Cpu<T> dev;
    Model<Cpu<T>> m;
    Config c = parity_model(f, preset, "mid.", dev, m);
    int step = atoi(f.meta.at("mid_step").c_str()) - 1;
    double loss = parity_first_step_run(dev, m, f, [](const Model<Cpu<T>>&) {}, step);
    CHECK(m.looping == (training_frac(c, step, 0) >= c.enable_looping_at));
    double want = atof(f.meta.at("mid_loss").c_str());
    CHECK_MSG(std::fabs(loss - want) <= loss_rtol * std::fabs(want), "%s step %d loss %.9g, reference %.9g", preset,
              step + 1, loss, want);
    parity_check_grads(f, m, "midgrad.", grad_rtol);
}

// Ten optimizer steps through the training loop (its loader, schedule, clipping, averaging), from the
// weights already in m; returns each step's loss and leaves the final weights in m.params.
template <class D> static std::vector<double> parity_train_run(D dev, Model<D>& m, TrainState<D>& s) {
    train_state_init(dev, s, m);
    s.loader.stream.open(shard_files(m.cfg.data_path, "train"), m.cfg.vocab_size);
    EvalData ev = unit_byte_eval_data(m.cfg);
    train(dev, m, s, ev);
    return s.losses;
}

// weight_rtol: 1e-4, but 1.5e-3 for frontier, whose final weights are chaotic at ~1e-4: Polar Express's
// Newton–Schulz (first coefficient 8.16) amplifies rounding, and pgolf against itself with its init perturbed by
// 1e-7 moves ten steps' weights by up to 2.4e-4 (attention projections); its step losses stay within 1e-6.
static void parity_ten_steps(const char* preset, double weight_rtol = 1e-4, double loss_rtol = 1e-4) {
    SafetensorsFile f = parity_load(preset);
    Cpu<float> dev;
    Model<Cpu<float>> m;
    TrainState<Cpu<float>> s;
    Config c = parity_model(f, preset, "init.", dev, m);
    parity_train_run(dev, m, s);
    std::vector<float> want = parity_tensor(f, "step_losses");
    CHECK(s.losses.size() == want.size());
    for (size_t i = 0; i < want.size() && i < s.losses.size(); i++)
        CHECK_MSG(std::fabs(s.losses[i] - want[i]) <= loss_rtol * std::fabs(want[i]),
                  "%s step %zu loss %.7f, reference %.7f", preset, i + 1, s.losses[i], want[i]);
    std::string worst;
    double worst_e = 0;
    for (const ParamSpec& p : m.table) {
        std::vector<float> w = parity_tensor(f, "final." + p.name);
        double e = rel_l2(m.params + p.offset, w.data(), p.numel);
        if (getenv("PARITY_VERBOSE")) printf("  %s final %s: relative L2 error %.3g\n", preset, p.name.c_str(), e);
        if (e > worst_e) { worst_e = e; worst = p.name; }
    }
    CHECK_MSG(worst_e <= weight_rtol, "%s final %s: relative L2 error %.3g", preset, worst.c_str(), worst_e);
}

// Each evaluation mode of the dump on its final weights: per-position NLL and the mean the reference
// reported (which counts a position twice where its window set scores it twice).
static void parity_eval(const char* preset) {
    SafetensorsFile f = parity_load(preset);
    Cpu<float> dev;
    Model<Cpu<float>> m;
    Config c = parity_model(f, preset, "final.", dev, m);
    refresh_compute_weights(dev, m, false);
    EvalData ev = unit_byte_eval_data(c);
    int modes = 0;
    // lora_ttt reads the whole stream (the reference's LoRA TTT loads the shards again, uncut), and only
    // each document's first chunk is compared: it is scored before any update, while later chunks depend
    // on the adapters' random A, which the reference draws per batch and pgolf once for every document.
    EvalData whole = ev;
    whole.val = parity_tensor_u16(f, "val_tokens");
    for (const char* mode : {"standard", "sliding", "lora_ttt", "full_ttt"}) {  // full_ttt last: it trains the model
        std::string key = std::string("nll.") + mode;
        if (!f.tensors.count(key)) continue;
        modes++;
        bool lora = !strcmp(mode, "lora_ttt");
        const EvalData& d = lora ? whole : ev;
        std::vector<float> want = parity_tensor(f, key);
        NllRecord rec;
        rec.init(d.val.size() - 1);
        EvalResult r = !strcmp(mode, "standard") ? eval_standard(dev, m, d, &rec)
                     : !strcmp(mode, "sliding")  ? eval_sliding(dev, m, d, &rec)
                     : lora                      ? eval_lora_ttt(dev, m, d, &rec) : eval_full_ttt(dev, m, d, &rec);
        if (lora) {  // the dump holds exactly the first chunks
            size_t first = 0, held = 0;
            for (const EvalDoc& doc : find_documents(d.val)) first += std::min<long>(doc.pred, c.ttt_chunk_size);
            for (float v : want) held += !std::isnan(v);
            CHECK_MSG(held == first, "%s lora_ttt: the dump scores %zu first-chunk positions, %zu expected", preset,
                      held, first);
            for (size_t j = 0; j < want.size() && j < rec.nll.size(); j++) if (std::isnan(want[j])) rec.nll[j] = NAN;
        }
        size_t scored = 0, bad = 0, first_bad = 0;
        for (size_t j = 0; j < want.size(); j++) {
            float got = j < rec.nll.size() ? rec.nll[j] : NAN;
            if (std::isnan(want[j]) != std::isnan(got) ||
                (!std::isnan(got) && std::fabs(got - want[j]) > 1e-5 * std::max(1.0f, std::fabs(want[j])))) {
                if (!bad++) first_bad = j;
            }
            scored += !std::isnan(want[j]);
        }
        CHECK_MSG(bad == 0, "%s %s: %zu of %zu positions differ, first at %zu: %g vs reference %g", preset, mode, bad,
                  want.size(), first_bad, first_bad < rec.nll.size() ? rec.nll[first_bad] : NAN, want[first_bad]);
        double ref = atof(f.meta.at(std::string("val_loss.") + mode).c_str());
        if (!lora)
            CHECK_MSG(std::fabs(r.val_loss - ref) <= 1e-6 * ref, "%s %s val_loss %.9f, reference %.9f", preset, mode,
                      r.val_loss, ref);
        CHECK(scored > 0);
    }
    CHECK(modes > 0);
}

#define PARITY_FIRST_STEP_AND_EVAL(preset) \
    TEST(parity_##preset##_first_step_fp64) { parity_first_step<double>(#preset, 1e-6, 1e-5); } \
    TEST(parity_##preset##_first_step_fp32) { parity_first_step<float>(#preset, 1e-5, 1e-5); } \
    TEST(parity_##preset##_eval_modes) { parity_eval(#preset); }
#define PARITY_TESTS(preset) \
    PARITY_FIRST_STEP_AND_EVAL(preset) \
    TEST(parity_##preset##_ten_steps) { parity_ten_steps(#preset); }
PARITY_TESTS(pr467)
PARITY_TESTS(pr600)
PARITY_TESTS(pr456)
PARITY_TESTS(baseline)
PARITY_FIRST_STEP_AND_EVAL(frontier)
TEST(parity_frontier_ten_steps) { parity_ten_steps("frontier", 1.5e-3, 1e-5); }
TEST(parity_frontier_mid_step_fp64) { parity_mid_step<double>("frontier", 1e-6, 1e-5); }
TEST(parity_frontier_mid_step_fp32) { parity_mid_step<float>("frontier", 1e-5, 1e-5); }
