// Full-Hessian GPTQ, SDClip, LQER and the calibration Hessians (section 9).

// --- an independent GPTQ: the paper's algorithm (Frantar et al. 2022, Alg. 1 without lazy batches) ---
// fp64 throughout; H⁻¹ by Gauss–Jordan elimination (not through the Cholesky of H as in the exporter),
// then the upper Cholesky factor of H⁻¹; one column at a time, each error spread at once onto every
// later column. Dead columns, damping, descending-diagonal order and SDClip scales as the record.
static std::vector<int8_t> gptq_paper(const std::vector<float>& w, int rows, int cols, const std::vector<float>& Hf,
                                      float k_sigma, int clip, std::vector<uint16_t>* scales) {
    int n = cols;
    std::vector<double> H(Hf.begin(), Hf.end());
    std::vector<bool> dead(n);
    for (int i = 0; i < n; i++) if (H[(size_t)i * n + i] == 0) { dead[i] = true; H[(size_t)i * n + i] = 1; }
    double tr = 0;
    for (int i = 0; i < n; i++) tr += H[(size_t)i * n + i];
    for (int i = 0; i < n; i++) H[(size_t)i * n + i] += 0.01 * tr / n;
    std::vector<int> perm(n);
    for (int i = 0; i < n; i++) perm[i] = i;
    auto diag_desc = [&](int a, int b) { return H[(size_t)a * n + a] > H[(size_t)b * n + b]; };
    std::stable_sort(perm.begin(), perm.end(), diag_desc);
    // Gauss–Jordan inverse of the permuted H
    std::vector<double> M((size_t)n * 2 * n, 0.0);
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) M[(size_t)i * 2 * n + j] = H[(size_t)perm[i] * n + perm[j]];
        M[(size_t)i * 2 * n + n + i] = 1;
    }
    for (int c = 0; c < n; c++) {
        int piv = c;
        for (int r = c + 1; r < n; r++) if (fabs(M[(size_t)r * 2 * n + c]) > fabs(M[(size_t)piv * 2 * n + c])) piv = r;
        for (int j = 0; j < 2 * n; j++) std::swap(M[(size_t)c * 2 * n + j], M[(size_t)piv * 2 * n + j]);
        double d = M[(size_t)c * 2 * n + c];
        for (int j = 0; j < 2 * n; j++) M[(size_t)c * 2 * n + j] /= d;
        for (int r = 0; r < n; r++) {
            if (r == c) continue;
            double f = M[(size_t)r * 2 * n + c];
            if (f != 0) for (int j = 0; j < 2 * n; j++) M[(size_t)r * 2 * n + j] -= f * M[(size_t)c * 2 * n + j];
        }
    }
    // upper Cholesky U of H⁻¹ (Uᵀ·U = H⁻¹), row by row
    std::vector<double> U((size_t)n * n, 0.0);
    auto hinv = [&](int i, int j) { return M[(size_t)i * 2 * n + n + j]; };
    for (int i = 0; i < n; i++) {
        double d = hinv(i, i);
        for (int k = 0; k < i; k++) d -= U[(size_t)k * n + i] * U[(size_t)k * n + i];
        U[(size_t)i * n + i] = sqrt(d);
        for (int j = i + 1; j < n; j++) {
            double s = hinv(i, j);
            for (int k = 0; k < i; k++) s -= U[(size_t)k * n + i] * U[(size_t)k * n + j];
            U[(size_t)i * n + j] = s / U[(size_t)i * n + i];
        }
    }
    std::vector<int8_t> q((size_t)rows * cols);
    scales->resize(rows);
    for (int r = 0; r < rows; r++) {
        double mean = 0, ss = 0;
        for (int j = 0; j < cols; j++) mean += w[(size_t)r * cols + j];
        mean /= cols;
        for (int j = 0; j < cols; j++) ss += (w[(size_t)r * cols + j] - mean) * (w[(size_t)r * cols + j] - mean);
        float sd = (float)sqrt(ss / (cols - 1));
        (*scales)[r] = float_to_half(k_sigma * sd / (float)clip);
        double s = half_to_float((*scales)[r]);
        std::vector<double> x(cols);
        for (int j = 0; j < cols; j++) x[j] = dead[perm[j]] ? 0.0 : w[(size_t)r * cols + perm[j]];
        for (int j = 0; j < cols; j++) {
            double v = std::min(std::max(std::nearbyint(x[j] / s), (double)-clip), (double)clip);
            q[(size_t)r * cols + perm[j]] = (int8_t)v;
            double e = (x[j] - v * s) / U[(size_t)j * n + j];
            for (int k = j + 1; k < cols; k++) x[k] -= e * U[(size_t)j * n + k];
        }
    }
    return q;
}

// A matrix parameter of the given shape for quantize_tensor.
static ParamSpec gptq_test_param(const std::string& name, int rows, int cols) {
    ParamSpec p;
    p.name = name; p.shape = {rows, cols}; p.numel = (size_t)rows * cols;
    return p;
}
// Correlated inputs (a random mixing of iid normals, column scales spread over 10×) and one dead column.
static std::vector<float> gptq_test_hessian(int n, int tokens, uint64_t seed, int dead) {
    Rng rng(seed);
    std::vector<double> mix((size_t)n * n), x((size_t)tokens * n);
    for (double& v : mix) v = rng.normal();
    std::vector<double> z(n);
    for (int t = 0; t < tokens; t++) {
        for (double& v : z) v = rng.normal();
        for (int j = 0; j < n; j++) {
            double s = z[j];
            for (int k = 0; k < 4; k++) s += 0.5 * mix[(size_t)j * n + k] * z[(j + 1 + k) % n];
            x[(size_t)t * n + j] = j == dead ? 0.0 : s * (0.3 + 3.0 * j / n);
        }
    }
    std::vector<float> H((size_t)n * n);
    for (int a = 0; a < n; a++)
        for (int b = 0; b < n; b++) {
            double s = 0;
            for (int t = 0; t < tokens; t++) s += x[(size_t)t * n + a] * x[(size_t)t * n + b];
            H[(size_t)a * n + b] = (float)s;
        }
    return H;
}

// Same Hessian in, same integers out: the exporter (blocks of 128 columns, lazy updates, H⁻¹ through
// the Cholesky of H) against the paper's column-at-a-time algorithm. 300 columns: three blocks.
TEST(gptq_matches_an_independent_fp64_gptq) {
    Config c;
    c.gptq = 1;
    int rows = 232, cols = 300;  // 69,600 values: above the passthrough
    for (int bits : {6, 7}) {
        std::string name = bits == 7 ? "tok_emb.weight" : "blocks.0.mlp.fc.weight";
        c.embed_bits = bits;
        ParamSpec p = gptq_test_param(name, rows, cols);
        std::vector<float> H = gptq_test_hessian(cols, 400, 7 + bits, 17), w((size_t)rows * cols);
        Rng rng(3);
        for (float& v : w) v = (float)(0.05 * rng.normal() * exp(0.3 * rng.normal()));
        QTensor t = quantize_tensor(c, p, w.data(), &H);
        int clip = (1 << (bits - 1)) - 1;
        CHECK(t.plan.rule == QR_GPTQ && t.plan.qmin == -clip && t.plan.qmax == clip);
        std::vector<uint16_t> want_s;
        std::vector<int8_t> want = gptq_paper(w, rows, cols, H, sdclip_sigmas(c, name), clip, &want_s);
        CHECK(t.scales == want_s);
        size_t diff = 0;
        for (size_t i = 0; i < want.size(); i++) diff += t.q[i] != want[i];
        CHECK_MSG(diff == 0, "int%d: %zu of %zu integers differ from the paper's GPTQ", bits, diff, want.size());
        // GPTQ moved integers away from rounding (the test would not notice a plain rounder otherwise)
        size_t moved = 0;
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < cols; j++) {
                float s = half_to_float(t.scales[r]);
                int rtn = (int)std::min(std::max(rintf(w[(size_t)r * cols + j] / s), (float)-clip), (float)clip);
                moved += j != 17 && rtn != t.q[(size_t)r * cols + j];
            }
        CHECK(moved > want.size() / 20);
    }
}

// SDClip's scale is k·std(row)/clip per row in fp16, k by family (the record's name tests).
TEST(gptq_sdclip_scales_and_families) {
    Config c;
    c.gptq = 1;
    CHECK(sdclip_sigmas(c, "tok_emb.weight") == 14.0f);
    CHECK(sdclip_sigmas(c, "blocks.3.mlp.proj.weight") == 11.5f);
    CHECK(sdclip_sigmas(c, "blocks.3.attn.c_k.weight") == 13.0f);
    CHECK(sdclip_sigmas(c, "bigram.proj.weight") == 12.85f);
    std::vector<float> row = {1, -1, 3, -3};  // mean 0, Σx² = 20, std = √(20/3)
    std::vector<uint16_t> s = sdclip_scales(row.data(), 1, 4, 13.0f, 31);
    CHECK(s[0] == float_to_half(13.0f * (float)sqrt(20.0 / 3.0) / 31.0f));
    std::vector<float> zero(8, 0.0f);
    CHECK(sdclip_scales(zero.data(), 1, 8, 13.0f, 31)[0] == 1);  // never 0: the smallest subnormal
    ParamSpec emb = gptq_test_param("tok_emb.weight", 1024, 128);
    ParamSpec mlp = gptq_test_param("blocks.0.mlp.fc.weight", 384, 256);
    CHECK(quant_plan(c, emb).kind == SK_INT7 && quant_plan(c, mlp).kind == SK_INT6);
    CHECK(quant_plan(c, gptq_test_param("blocks.0.attn.c_q.weight", 256, 256)).kind == SK_F16);  // 65,536: passthrough
}

// A rank-r correction of E = U·diag(σ)·Vᵀ + small noise recovers the top r directions: the residual
// is within 1% of the best possible, Σ_{i>r} σ_i² + noise.
TEST(gptq_lqer_top_singular_subspace) {
    int rows = 40, cols = 96, r = 4;
    Rng rng(9);
    auto orthonormal = [&](int n, int k) {
        std::vector<double> Q((size_t)n * k);
        for (double& v : Q) v = rng.normal();
        for (int a = 0; a < k; a++) {
            for (int b = 0; b < a; b++) {
                double d = 0;
                for (int i = 0; i < n; i++) d += Q[(size_t)i * k + a] * Q[(size_t)i * k + b];
                for (int i = 0; i < n; i++) Q[(size_t)i * k + a] -= d * Q[(size_t)i * k + b];
            }
            double nn = 0;
            for (int i = 0; i < n; i++) nn += Q[(size_t)i * k + a] * Q[(size_t)i * k + a];
            for (int i = 0; i < n; i++) Q[(size_t)i * k + a] /= sqrt(nn);
        }
        return Q;
    };
    int k = 8;
    std::vector<double> U = orthonormal(rows, k), V = orthonormal(cols, k), E((size_t)rows * cols, 0.0);
    double sigma[8] = {10, 7, 5, 4, 1, 0.8, 0.5, 0.3};
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++)
            for (int t = 0; t < k; t++)
                E[(size_t)i * cols + j] += U[(size_t)i * k + t] * sigma[t] * V[(size_t)j * k + t];
    std::vector<double> A, B;
    top_singular(E, rows, cols, r, &A, &B);
    double res = 0, best = 0;
    for (int t = r; t < k; t++) best += sigma[t] * sigma[t];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            double ab = 0;
            for (int t = 0; t < r; t++) ab += A[(size_t)i * r + t] * B[(size_t)t * cols + j];
            res += (E[(size_t)i * cols + j] - ab) * (E[(size_t)i * cols + j] - ab);
        }
    CHECK_MSG(res <= best * 1.01, "residual %g, best rank-%d residual %g", res, r, best);
    double n0 = 0;  // B's rows are unit vectors, the first along the largest σ
    for (int j = 0; j < cols; j++) n0 += B[j] * B[j];
    CHECK_CLOSE(n0, 1.0, 1e-9, 0);
}

// --- the whole export on a trained tiny model -----------------------------------------------------
// 2 layers of d64, vocab 128; every matrix through GPTQ (passthrough lowered from 65,536 to 1,024).
static Config gptq_tiny_config(const std::string& data) {
    Config c = small_train_config(data);
    c.vocab_size = 128; c.model_dim = 64; c.mlp_mult = 2.0f;
    c.bigram_vocab_size = 0; c.iterations = 10; c.warmdown_iters = 3;
    c.gptq = 1; c.gptq_calibration_batches = 6; c.gptq_passthrough_numel = 1024;
    return c;
}
// Σ_rows (w − ŵ)ᵀ·H·(w − ŵ): the layer-output error GPTQ minimizes.
static double hessian_error(const float* w, const float* deq, int rows, int cols, const std::vector<float>& H) {
    double total = 0;
    #pragma omp parallel for reduction(+ : total)
    for (int r = 0; r < rows; r++) {
        std::vector<double> d(cols);
        for (int j = 0; j < cols; j++) d[j] = (double)w[(size_t)r * cols + j] - deq[(size_t)r * cols + j];
        for (int a = 0; a < cols; a++) {
            double s = 0;
            for (int b = 0; b < cols; b++) s += (double)H[(size_t)a * cols + b] * d[b];
            total += d[a] * s;
        }
    }
    return total;
}

// The Hessians come from the training stream where training stopped, never from validation data:
// equal (fp32 sums) to XᵀX of the next GPTQ_CALIBRATION_BATCHES micro-batches of the train shards,
// recomputed here from the shard files and a forward pass of our own over exactly those tokens.
// Then every GPTQ tensor's Hessian-weighted error is below rounding with the same scales, and the
// artifact (GPTQ + LQER) reads back to quantize_dequantize bit for bit.
TEST(gptq_trained_tiny_calibration_error_and_artifact) {
    std::string d = small_dataset("gptq_tiny", 128);
    Config c = gptq_tiny_config(d);
    Cpu<float> dev;
    Model<Cpu<float>> m;
    TrainState<Cpu<float>> s;
    start_training(c, m, s);
    EvalData ev = unit_byte_eval_data(c);
    train(dev, m, s, ev);
    // the tokens training consumed: steps × accum micro-batches of world·(local+1) tokens
    int accum = grad_accum_steps(c, 1);
    long local = c.train_batch_tokens / accum;
    std::vector<uint16_t> stream;
    for (const std::string& f : shard_files(d, "train")) {
        std::vector<uint16_t> t = load_shard(f, c.vocab_size);
        stream.insert(stream.end(), t.begin(), t.end());
    }
    size_t at = (size_t)s.step * accum * (local + 1);
    Hessians hs = gptq_calibrate(dev, m, s.loader);
    std::vector<std::vector<double>> want(m.table.size());
    std::vector<LinearInput<Cpu<float>>> in = linear_inputs(m);
    for (int b = 0; b < c.gptq_calibration_batches; b++) {
        std::vector<int32_t> x(local), y(local);
        for (long i = 0; i < local; i++) { x[i] = stream[at + i]; y[i] = stream[at + i + 1]; }
        at += local + 1;
        std::vector<float> nll;
        memcpy(m.acts.inputs, x.data(), 4 * local);
        memcpy(m.acts.targets, y.data(), 4 * local);
        gpt_forward(dev, m, (int)(local / c.train_seq_len), c.train_seq_len, false);
        for (const auto& li : in) {
            size_t idx = 0;
            while (m.table[idx].offset != (size_t)(li.weight - m.params)) idx++;
            int n = li.cols;
            want[idx].resize((size_t)n * n, 0.0);
            for (long t = 0; t < local; t++)
                for (int a = 0; a < n; a++)
                    for (int bb = 0; bb < n; bb++)
                        want[idx][(size_t)a * n + bb] += (double)li.x[t * n + a] * li.x[t * n + bb];
        }
    }
    int with_h = 0;
    for (size_t i = 0; i < m.table.size(); i++) {
        CHECK_MSG(hs[i].size() == want[i].size(), "%s: Hessian of %zu values, want %zu", m.table[i].name.c_str(),
                  hs[i].size(), want[i].size());
        if (hs[i].empty()) continue;
        with_h++;
        CHECK_ALL_CLOSE(hs[i].data(), want[i].data(), hs[i].size(), 1e-4, 1e-3);
    }
    CHECK(with_h == 2 * 6 + 1);  // q, k, v, proj, fc, mlp proj per layer; the tied head
    // Hessian-weighted error: GPTQ below plain rounding on every GPTQ tensor
    std::vector<float> w(m.params, m.params + m.nparams);
    int gptq_tensors = 0;
    for (size_t i = 0; i < m.table.size(); i++) {
        const ParamSpec& p = m.table[i];
        if (quant_plan(c, p).rule != QR_GPTQ) continue;
        gptq_tensors++;
        int rows = p.rows(), cols = (int)(p.numel / rows);
        QTensor g = quantize_tensor(c, p, w.data() + p.offset, &hs[i]);
        QTensor r = quantize_tensor(c, p, w.data() + p.offset, nullptr);
        CHECK(g.scales == r.scales);
        std::vector<float> dg(p.numel), dr(p.numel);
        dequantize_tensor(p, g, dg.data());
        dequantize_tensor(p, r, dr.data());
        double eg = hessian_error(w.data() + p.offset, dg.data(), rows, cols, hs[i]);
        double er = hessian_error(w.data() + p.offset, dr.data(), rows, cols, hs[i]);
        CHECK_MSG(eg < er, "%s: GPTQ's Hessian-weighted error %g is not below rounding's %g", p.name.c_str(), eg, er);
        if (getenv("PGOLF_TEST_LOG"))
            printf("  %-28s gptq %.4g  rounding %.4g  (%.2f)\n", p.name.c_str(), eg, er, eg / er);
    }
    CHECK(gptq_tensors == 2 * 6 + 1);
    // LQER: the corrected tensors are those with the largest errors, each corrected one closer to W
    c.lqer_enabled = 1; c.lqer_top_k = 3;
    std::vector<QTensor> qt = quantize_model(c, m.table, w.data(), &hs);
    std::vector<std::pair<double, size_t>> err;
    int corrected = 0;
    for (size_t i = 0; i < qt.size(); i++) {
        if (qt[i].plan.rule != QR_GPTQ) continue;
        const ParamSpec& p = m.table[i];
        QTensor plain = qt[i];
        plain.lqer = LqerFactors();
        std::vector<float> d0(p.numel), d1(p.numel);
        dequantize_tensor(p, plain, d0.data());
        dequantize_tensor(p, qt[i], d1.data());
        double e0 = 0, e1 = 0;
        for (size_t k = 0; k < p.numel; k++) {
            e0 += ((double)w[p.offset + k] - d0[k]) * ((double)w[p.offset + k] - d0[k]);
            e1 += ((double)w[p.offset + k] - d1[k]) * ((double)w[p.offset + k] - d1[k]);
        }
        err.push_back({-e0, i});
        if (qt[i].lqer.rank == 0) continue;
        corrected++;
        CHECK(qt[i].lqer.rank == 4 && qt[i].lqer.asym);
        CHECK_MSG(e1 < e0, "%s: LQER error %g not below %g", p.name.c_str(), e1, e0);
    }
    CHECK(corrected == 3);
    std::stable_sort(err.begin(), err.end());
    for (int k = 0; k < 3; k++) CHECK(qt[err[k].second].lqer.rank > 0);
    std::vector<float> want_w(m.nparams, 0.0f), got_w;
    for (size_t i = 0; i < qt.size(); i++) dequantize_tensor(m.table[i], qt[i], want_w.data() + m.table[i].offset);
    Config back;
    artifact_parse(artifact_build(c, m.table, w.data(), nullptr, &hs), "gptq.pgz", &back, &got_w);
    CHECK(same_bits(got_w, want_w));
    CHECK(back.gptq == 1 && back.lqer_enabled == 1 && back.embed_bits == 7);
    model_free(dev, m);
}

// A config whose GPTQ artifact holds int6, int7 and LQER factors, small enough to parse many times.
static Config gptq_micro_config() {
    Config c = compress_micro_config();
    c.vocab_size = 1100; c.num_layers = 1; c.model_dim = 64; c.mlp_mult = 17.0f;  // tok_emb 70,400; fc 1088×64
    c.bigram_vocab_size = 0; c.fp16_keep_patterns = "mlp.proj";  // its 1088² Hessian would cost seconds
    c.gptq = 1; c.lqer_enabled = 1; c.lqer_top_k = 2;
    return c;
}
// Hessians of random inputs for every GPTQ tensor of a table.
static Hessians gptq_fake_hessians(const Config& c, const std::vector<ParamSpec>& t) {
    Hessians hs(t.size());
    for (size_t i = 0; i < t.size(); i++)
        if (quant_plan(c, t[i]).rule == QR_GPTQ) hs[i] = gptq_test_hessian(t[i].cols(), 3 * t[i].cols(), i, -1);
    return hs;
}

TEST(gptq_reader_rejects_corrupt_lqer) {
    Config c = gptq_micro_config();
    std::vector<ParamSpec> t = build_param_table(c);
    std::vector<float> w = compress_fake_weights(t, 5);
    Hessians hs = gptq_fake_hessians(c, t);
    const std::vector<uint8_t> art = artifact_build(c, t, w.data(), nullptr, &hs);
    Config out;
    std::vector<float> wo;
    auto parse = [&](const std::vector<uint8_t>& f) { artifact_parse(f, "lq.pgz", &out, &wo); };
    ArtParts p = art_split(art);
    parse(art_join(p));
    CHECK(p.frames[G_LQER].size() > 9);
    size_t table = p.header.size() - G_NUM * 17 - 4 - 4 * 2;  // u32 count, two u32 indices
    CHECK(get_le(p.header.data() + table, 4) == 2);
    ArtParts q = p;
    q.header[table] = 3;  // a third entry the config does not allow (and the table does not hold)
    CHECK_THROWS(parse(art_join(q)), "3 LQER corrections where the stored config allows 2");
    q = p;
    std::swap(q.header[table + 4], q.header[table + 8]);  // indices out of order
    CHECK_THROWS(parse(art_join(q)), "not a later GPTQ tensor");
    q = p;
    q.header[table + 8] = 0;  // tensor 0 (fp16 gains or the embedding): not a later entry
    q.header[table + 9] = q.header[table + 10] = q.header[table + 11] = 0;
    CHECK_THROWS(parse(art_join(q)), "not a later GPTQ tensor");
    q = p;
    art_set_config_text(q, replace_once(art_config_text(p), "LQER_ENABLED=1\n", "LQER_ENABLED=0\n"));
    CHECK_THROWS(parse(art_join(q)), "2 LQER corrections where the stored config allows 0");
    q = p;
    art_set_config_text(q, replace_once(art_config_text(p), "LQER_RANK=4\n", "LQER_RANK=5\n"));
    CHECK_THROWS(parse(art_join(q)), "lqer factors: the group table says");
    q = p;
    {
        std::vector<uint8_t> raw(ZSTD_getFrameContentSize(q.frames[G_LQER].data(), q.frames[G_LQER].size()));
        ZSTD_decompress(raw.data(), raw.size(), q.frames[G_LQER].data(), q.frames[G_LQER].size());
        raw[0] = 2;  // A is int2: [−2, 1]
        q.frames[G_LQER] = zstd_compress(raw.data(), raw.size(), 1);
        CHECK_THROWS(parse(art_join(q)), "LQER factor A[0] = 2 lies outside [-2, 1]");
    }
    q = p;
    art_set_config_text(q, replace_once(art_config_text(p), "EMBED_BITS=7\n", "EMBED_BITS=9\n"));
    CHECK_THROWS(parse(art_join(q)), "EMBED_BITS=9");
    q = p;
    art_set_config_text(q, replace_once(art_config_text(p), "EMBED_BITS=7\n", "EMBED_BITS=6\n"));
    CHECK_THROWS(parse(art_join(q)), "is stored as int7, the stored config");
}

// Mutated GPTQ + LQER artifacts: header (the LQER table), the LQER and int8/int7 groups. Never a crash.
TEST(gptq_fuzz_reader) {
    Config c = gptq_micro_config();
    std::vector<ParamSpec> t = build_param_table(c);
    std::vector<float> w = compress_fake_weights(t, 6);
    Hessians hs = gptq_fake_hessians(c, t);
    const ArtParts parts = art_split(artifact_build(c, t, w.data(), nullptr, &hs));
    Rng rng(77);
    int accepted = 0, rejected = 0, n = 300;
    for (int it = 0; it < n; it++) {
        ArtParts q = parts;
        int edits = 1 + (int)(rng.uniform() * 3);
        if (it % 2 == 0) {  // the header's last bytes: LQER table and group table
            for (int e = 0; e < edits; e++) {
                size_t i = q.header.size() - 1 - (size_t)(rng.uniform() * (G_NUM * 17 + 12));
                q.header[i] ^= (uint8_t)(1 << (int)(rng.uniform() * 8));
            }
        } else {
            int g = it % 4 == 1 ? G_LQER : G_INT8;
            std::vector<uint8_t> raw(ZSTD_getFrameContentSize(q.frames[g].data(), q.frames[g].size()));
            ZSTD_decompress(raw.data(), raw.size(), q.frames[g].data(), q.frames[g].size());
            for (int e = 0; e < edits; e++)
                raw[(size_t)(rng.uniform() * raw.size())] ^= (uint8_t)(1 << (int)(rng.uniform() * 8));
            q.frames[g] = zstd_compress(raw.data(), raw.size(), 1);
        }
        Config oc;
        std::vector<float> ow;
        try { artifact_parse(art_join(q, rng.uniform() < 0.7), "fuzz.pgz", &oc, &ow); accepted++; }
        catch (const TestFailure&) { throw; }
        catch (const std::runtime_error& e) {
            rejected++;
            CHECK_MSG(strstr(e.what(), "fuzz.pgz"), "message without the file: %s", e.what());
        }
    }
    CHECK(rejected > n / 4 && accepted + rejected == n);
}

// COMPRESSOR=brotli: the groups are brotli streams whose sizes the group table gives. The same
// weights as zstd; damaged, trailing-byte and bomb streams are refused with the file's name.
TEST(gptq_brotli_artifact) {
    Config c = gptq_micro_config();
    std::vector<ParamSpec> t = build_param_table(c);
    std::vector<float> w = compress_fake_weights(t, 8);
    Hessians hs = gptq_fake_hessians(c, t);
    c.compressor = "brotli";
#ifndef PGOLF_BROTLI
    CHECK_THROWS(artifact_build(c, t, w.data(), nullptr, &hs), "this build has no brotli");
    SKIP("built without brotli (USE_BROTLI=0 or no libbrotli-dev)");
#else
    std::vector<uint8_t> art = artifact_build(c, t, w.data(), nullptr, &hs);
    Config zc = c;
    zc.compressor = "zstd";
    std::vector<float> wb, wz;
    Config out;
    artifact_parse(art, "b.pgz", &out, &wb);
    artifact_parse(artifact_build(zc, t, w.data(), nullptr, &hs), "z.pgz", &out, &wz);
    CHECK(same_bits(wb, wz));
    // take the file apart: zstd header frame, then the brotli frames the group table sizes
    size_t hs_bytes = ZSTD_findFrameCompressedSize(art.data() + 16, art.size() - 32);
    std::vector<uint8_t> header(ZSTD_getFrameContentSize(art.data() + 16, hs_bytes));
    ZSTD_decompress(header.data(), header.size(), art.data() + 16, hs_bytes);
    std::vector<std::vector<uint8_t>> frames;
    size_t at = 16 + hs_bytes;
    for (int g = 0; g < G_NUM; g++) {
        size_t n = get_le(header.data() + header.size() - (G_NUM - g) * 17 + 9, 8);
        frames.emplace_back(art.begin() + at, art.begin() + at + n);
        at += n;
    }
    CHECK(at == art.size() - 16);
    auto join = [&](const std::vector<std::vector<uint8_t>>& fr) {
        std::vector<uint8_t> h = header;
        for (int g = 0; g < G_NUM; g++) {
            uint8_t* e = h.data() + h.size() - (G_NUM - g) * 17;
            for (int b = 0; b < 8; b++) e[9 + b] = (uint8_t)((uint64_t)fr[g].size() >> (8 * b));
        }
        std::vector<uint8_t> f(art.begin(), art.begin() + 16), hz = zstd_compress(h.data(), h.size(), 1);
        f.insert(f.end(), hz.begin(), hz.end());
        for (auto& x : fr) f.insert(f.end(), x.begin(), x.end());
        uint64_t sum = fnv1a64(f.data(), f.size());
        put_le(f, ZSTD_SKIP_MAGIC + 1, 4); put_le(f, 8, 4); put_le(f, sum, 8);
        return f;
    };
    auto parse = [&](const std::vector<uint8_t>& f) { std::vector<float> x; artifact_parse(f, "b.pgz", &out, &x); };
    parse(join(frames));
    std::vector<std::vector<uint8_t>> q = frames;
    q[G_LQER].push_back(0);  // a byte after the stream's end
    CHECK_THROWS(parse(join(q)), "b.pgz: lqer factors: the brotli stream of");
    q = frames;
    q[G_INT6].pop_back();
    CHECK_THROWS(parse(join(q)), "does not decode to the");
    std::vector<uint8_t> zeros((size_t)1 << 20, 0);  // 1 MiB where the table needs ~70 KB
    q = frames;
    q[G_INT6] = brotli_compress(zeros.data(), zeros.size());
    CHECK(q[G_INT6].size() < 1024);
    CHECK_THROWS(parse(join(q)), "int6 values: the brotli stream");
    Rng rng(31);
    int rejected = 0, n = 150;
    for (int it = 0; it < n; it++) {
        q = frames;
        int g = it % 3 == 0 ? G_LQER : it % 3 == 1 ? G_INT8 : G_SCALES;
        for (int e = 0; e < 1 + it % 3; e++) q[g][(size_t)(rng.uniform() * q[g].size())] ^= (uint8_t)(1 << (it % 8));
        try { parse(join(q)); }
        catch (const TestFailure&) { throw; }
        catch (const std::runtime_error& e) {
            rejected++;
            CHECK_MSG(strstr(e.what(), "b.pgz"), "message: %s", e.what());
        }
    }
    CHECK_MSG(rejected > n / 10, "only %d of %d damaged streams refused", rejected, n);  // brotli has no checksum
#endif
}

// The frontier's model: a looped block's Hessians sum over every virtual layer that runs it, and with
// SparseAttnGate the attention projection's input is the gated output. Checked against XᵀX of the
// kept activations of one calibration batch, the virtual layers enumerated here from block_of.
TEST(gptq_calibration_frontier_loop_and_gate) {
    std::string d = small_dataset("gptq_frontier", 64);
    Config c = frontier_gradcheck_config();  // blocks 0 1 2 1 2 3 4 once looping is on
    c.data_path = d; c.gptq = 1; c.gptq_calibration_batches = 1; c.gptq_passthrough_numel = 0;
    config_validate(c, 1);
    Cpu<float> dev;
    Model<Cpu<float>> m;
    model_init(dev, m, c, 2, 7);
    m.looping = true;
    DataLoader ld;
    ld.stream.open(shard_files(d, "train"), c.vocab_size);
    Hessians hs = gptq_calibrate(dev, m, ld);
    auto xtx = [](const float* x, int rows, int n, std::vector<double>& acc) {
        acc.resize((size_t)n * n, 0.0);
        for (int t = 0; t < rows; t++)
            for (int a = 0; a < n; a++)
                for (int b = 0; b < n; b++)
                    acc[(size_t)a * n + b] += (double)x[(size_t)t * n + a] * x[(size_t)t * n + b];
    };
    auto index_of = [&](const float* w) {
        for (size_t i = 0; i < m.table.size(); i++) if (m.table[i].offset == (size_t)(w - m.params)) return i;
        throw TestFailure("weight not in the table");
    };
    int N = 14, Dm = c.model_dim, runs_of_1 = 0;
    for (int b = 0; b < c.num_layers; b++) {
        std::vector<double> q, proj;
        for (int l = 0; l < c.num_virtual(true); l++) {
            if (c.block_of(l, true) != b) continue;
            runs_of_1 += b == 1;
            xtx(m.acts.layers[l].attn_norm, N, Dm, q);
            xtx(m.acts.layers[l].attn_gated, N, Dm, proj);
        }
        const std::vector<float>& hq = hs[index_of(m.w.layers[b].c_q)];
        const std::vector<float>& hp = hs[index_of(m.w.layers[b].attn_proj)];
        CHECK(hq.size() == q.size() && hp.size() == proj.size());
        CHECK_ALL_CLOSE(hq.data(), q.data(), q.size(), 1e-5, 1e-6);
        CHECK_ALL_CLOSE(hp.data(), proj.data(), proj.size(), 1e-5, 1e-6);
    }
    CHECK(runs_of_1 == 2);
    std::vector<double> head;
    xtx(m.acts.final_norm, N, Dm, head);
    const std::vector<float>& hh = hs[index_of(m.w.tok_emb)];
    CHECK_ALL_CLOSE(hh.data(), head.data(), head.size(), 1e-5, 1e-6);
    int with_h = 0;
    for (const std::vector<float>& h : hs) with_h += !h.empty();
    CHECK(with_h == 6 * c.num_layers + 1);
    model_free(dev, m);
}

// Parity with the record's quantizer: tests/parity/gptq.safetensors holds what PR #1855's
// gptq_quantize_weight (torch, float32) made of a small weight and Hessian (scripts/make_parity_dump
// REFERENCE gptq; 144 columns, a dead one). Same Hessian in, same fp16 scales and integers out.
TEST(gptq_parity_with_the_record) {
    SafetensorsFile f = safetensors_read("tests/parity/gptq.safetensors");
    CHECK(f.meta["format"] == "pgolf-parity-1" && f.meta["preset"] == "gptq");
    auto tensor = [&](const std::string& name) {
        CHECK_MSG(f.tensors.count(name), "%s: no tensor %s", f.path.c_str(), name.c_str());
        size_t n = 1;
        for (long long d : f.tensors.at(name).shape) n *= (size_t)d;
        std::vector<float> v(n);
        safetensors_get(f, name, v.data(), n);
        return v;
    };
    std::vector<float> w = tensor("gptq.w"), H = tensor("gptq.H");
    const std::vector<long long>& shape = f.tensors.at("gptq.w").shape;
    int rows = (int)shape[0], cols = (int)shape[1];
    CHECK(H.size() == (size_t)cols * cols);
    std::string cases = f.meta.at("cases");
    int n = 0;
    for (size_t pos = 0; pos < cases.size(); n++) {  // name:k:clip, space separated
        size_t sp = std::min(cases.find(' ', pos), cases.size());
        std::string item = cases.substr(pos, sp - pos);
        pos = sp + 1;
        size_t c1 = item.find(':'), c2 = item.rfind(':');
        std::string name = item.substr(0, c1);
        float k = (float)atof(item.substr(c1 + 1, c2 - c1 - 1).c_str());
        int clip = atoi(item.substr(c2 + 1).c_str());
        Config c;
        c.gptq = 1;
        c.gptq_passthrough_numel = 0;  // a small tensor: quantized all the same
        c.embed_bits = c.matrix_bits = clip == 63 ? 7 : 6;
        c.embed_clip_sigmas = c.mlp_clip_sigmas = k;
        CHECK(sdclip_sigmas(c, name) == k);
        QTensor t = quantize_tensor(c, gptq_test_param(name, rows, cols), w.data(), &H);
        CHECK(t.plan.rule == QR_GPTQ && t.plan.clip == clip);
        std::vector<float> q = tensor("gptq." + name + ".q"), s = tensor("gptq." + name + ".s");
        size_t bad_s = 0, bad_q = 0, moved = 0;
        for (int r = 0; r < rows; r++) bad_s += half_to_float(t.scales[r]) != s[r];
        for (size_t i = 0; i < q.size(); i++) {
            bad_q += t.q[i] != (int)q[i];
            int rtn = (int)std::min(std::max(rintf(w[i] / s[i / cols]), (float)-clip), (float)clip);
            moved += rtn != (int)q[i];
        }
        CHECK_MSG(bad_s == 0, "%s: %zu of %d scales differ from the record's", name.c_str(), bad_s, rows);
        CHECK_MSG(bad_q == 0, "%s: %zu of %zu integers differ from the record's", name.c_str(), bad_q, q.size());
        CHECK(moved > q.size() / 20);  // the record's GPTQ moved integers away from plain rounding
    }
    CHECK(n == 2);
}
