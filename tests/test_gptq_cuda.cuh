// GPTQ calibration on the CUDA path (section 9): the Hessians its forward collects against the CPU's.
#ifdef PGOLF_CUDA

// The same weights and training batches on both paths: XᵀX of every linear input within bf16's reach.
// The GPU's X are bf16 activations (relative rounding ≤ 2⁻⁹ each) summed in fp32 by cuBLAS: 1% relative
// L2 per Hessian is ~5× the rounding a bf16 copy of the CPU's activations alone makes.
TEST(cuda_gptq_calibration_matches_cpu) {
    REQUIRE_GPU();
    std::string d = small_dataset("gptq_cuda", 128);
    Config c = gptq_tiny_config(d);
    c.gptq_calibration_batches = 2;
    config_validate(c, 1);
    int T = c.train_seq_len, B = (int)(c.train_batch_tokens / grad_accum_steps(c, 1) / T);
    std::vector<float> w = perturbed_init(c, 5);
    Model<Cpu<float>> mc;
    model_init(Cpu<float>{}, mc, c, B, T);
    memcpy(mc.params, w.data(), w.size() * sizeof(float));
    DataLoader lc;
    lc.stream.open(shard_files(d, "train"), c.vocab_size);
    Hessians hc = gptq_calibrate(Cpu<float>{}, mc, lc);
    Model<Cuda> mg;
    model_init(Cuda{}, mg, c, B, T);
    to_device(Cuda{}, mg.params, w.data(), w.size());
    refresh_compute_weights(Cuda{}, mg, false);
    DataLoader lg;
    lg.stream.open(shard_files(d, "train"), c.vocab_size);
    Hessians hg = gptq_calibrate(Cuda{}, mg, lg);
    int n = 0;
    for (size_t i = 0; i < mc.table.size(); i++) {
        CHECK_MSG(hc[i].size() == hg[i].size(), "%s: Hessian sizes %zu (CPU) vs %zu (GPU)", mc.table[i].name.c_str(),
                  hc[i].size(), hg[i].size());
        if (hc[i].empty()) continue;
        n++;
        double num = 0, den = 0;
        for (size_t k = 0; k < hc[i].size(); k++) {
            num += ((double)hg[i][k] - hc[i][k]) * ((double)hg[i][k] - hc[i][k]);
            den += (double)hc[i][k] * hc[i][k];
        }
        double rel = std::sqrt(num / den);
        CHECK_MSG(rel < 1e-2, "%s: GPU Hessian relative L2 %.3g from the CPU's", mc.table[i].name.c_str(), rel);
    }
    CHECK(n == 2 * 6 + 1);
    model_free(Cuda{}, mg);
    model_free(Cpu<float>{}, mc);
}
#endif  // PGOLF_CUDA
