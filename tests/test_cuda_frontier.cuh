// The final leaderboard's ops (CONFIG=frontier) on the CUDA path against the CPU reference, at shapes
// small enough for the emulator: BOS-masked SmearGate, SparseAttnGate, gated U-Net skips, the
// parallel residual lanes. Metrics as tests/test_cuda.cuh (band: bf16 1e-2, fp32 1e-4).

#ifdef PGOLF_CUDA

TEST(cuda_frontier_smear_bos) {
    REQUIRE_GPU();
    Rng rng(71);
    int cases[][4] = {{1, 1, 8, 3}, {2, 7, 33, 12}, {3, 40, 300, 12}};  // B, T, C, W
    for (auto& k : cases) {
        int B = k[0], T = k[1], C = k[2], W = k[3], N = B * T;
        size_t n = (size_t)N * C;
        std::vector<int32_t> ids = cu_randint(N, rng, 50);
        for (int i = 0; i < N; i += 5) ids[i] = BOS_ID;  // documents start inside the sequences too
        std::vector<double> x = cu_randn(n, rng), dy = cu_randn(n, rng), w = cu_randn(W, rng, 0.5, false);
        std::vector<double> lam = {0.7}, dw0 = cu_randn(W, rng, 1.0, false), dl0 = {0.3};
        std::vector<double> out(n), dx(n);
        smear_bos_forward(Cpu<double>{}, out.data(), x.data(), ids.data(), w.data(), lam.data(), N, T, C, W);
        CU_UP(gx, bf16, x); CU_UP(gdy, bf16, dy); CU_UP(gids, i32, ids); CU_UP(gw, f32, w); CU_UP(gl, f32, lam);
        GpuBuf gout(n * 2), gdx(n * 2);
        gout.poison();
        smear_bos_forward(Cuda{}, gout.b(), gx->b(), gids->i(), gw->f(), gl->f(), N, T, C, W);
        std::string tag = test_format("smear_bos B=%d T=%d C=%d W=%d", B, T, C, W);
        check_band((tag + " out").c_str(), down_bf16(gout.p, n), out, BF16_TOL);
        for (GradWrite gw_ : GRAD_WRITES) {
            std::vector<double> dw = dw0, dl = dl0;
            GradWrite other = gw_ == OVERWRITE ? ACCUMULATE : OVERWRITE;  // dlambda the other way
            smear_bos_backward(Cpu<double>{}, dx.data(), dw.data(), dl.data(), dy.data(), x.data(), ids.data(),
                               w.data(), lam.data(), N, T, C, W, gw_, other);
            std::unique_ptr<GpuBuf> gdw(up_grad_f32(dw0, gw_)), gdl(up_grad_f32(dl0, other));
            gdx.poison();  // overwritten
            smear_bos_backward(Cuda{}, gdx.b(), gdw->f(), gdl->f(), gdy->b(), gx->b(), gids->i(), gw->f(), gl->f(), N,
                               T, C, W, gw_, other);
            std::string wtag = tag + grad_write_name(gw_);
            check_band((wtag + " dx").c_str(), down_bf16(gdx.p, n), dx, BF16_TOL);
            check_band((wtag + " dw").c_str(), down_f32(gdw->p, W), dw, F32_TOL);
            check_band((wtag + " dlambda").c_str(), down_f32(gdl->p, 1), dl, F32_TOL);
        }
    }
}

TEST(cuda_frontier_attn_gate) {
    REQUIRE_GPU();
    Rng rng(72);
    int cases[][4] = {{1, 1, 16, 4}, {9, 4, 32, 12}, {70, 8, 64, 12}};  // N, H, hd, GW
    for (auto& k : cases) {
        int N = k[0], H = k[1], hd = k[2], GW = k[3], C = H * hd;
        size_t n = (size_t)N * C;
        std::vector<double> y = cu_randn(n, rng), x = cu_randn(n, rng), dy = cu_randn(n, rng);
        std::vector<double> wg = cu_randn((size_t)H * GW, rng, 0.5, false);
        std::vector<double> dwg0 = cu_randn((size_t)H * GW, rng, 1.0, false);
        std::vector<double> dx0 = cu_randn(n, rng, 0.5), out(n), dyin(n), dx = dx0, dwg = dwg0;
        float scale = 0.5f;
        GradWrite dwg_write = N == 9 ? OVERWRITE : ACCUMULATE;  // (both ways across the cases)
        attn_gate_forward(Cpu<double>{}, out.data(), y.data(), x.data(), wg.data(), N, H, hd, C, GW, scale);
        std::vector<double> dz((size_t)N * H);
        attn_gate_backward(Cpu<double>{}, dyin.data(), dz.data(), dwg.data(), dy.data(), y.data(), x.data(), wg.data(),
                           N, H, hd, C, GW, scale, dwg_write);
        attn_gate_backward_input(Cpu<double>{}, dx.data(), dz.data(), wg.data(), N, H, C, GW);
        CU_UP(gy, bf16, y); CU_UP(gx, bf16, x); CU_UP(gdy, bf16, dy); CU_UP(gwg, f32, wg);
        CU_UP(gdx, bf16, dx0);
        std::unique_ptr<GpuBuf> gdwg(up_grad_f32(dwg0, dwg_write));
        GpuBuf gout(n * 2), gdyin(n * 2);
        gout.poison();
        gdyin.poison();
        attn_gate_forward(Cuda{}, gout.b(), gy->b(), gx->b(), gwg->f(), N, H, hd, C, GW, scale);
        GpuBuf gdz((size_t)N * H * 4);
        gdz.poison();  // overwritten
        attn_gate_backward(Cuda{}, gdyin.b(), gdz.f(), gdwg->f(), gdy->b(), gy->b(), gx->b(), gwg->f(), N, H, hd, C,
                           GW, scale, dwg_write);
        attn_gate_backward_input(Cuda{}, gdx->b(), gdz.f(), gwg->f(), N, H, C, GW);
        std::string tag = test_format("attn_gate N=%d H=%d hd=%d GW=%d%s", N, H, hd, GW, grad_write_name(dwg_write));
        check_band((tag + " out").c_str(), down_bf16(gout.p, n), out, BF16_TOL);
        check_band((tag + " dy").c_str(), down_bf16(gdyin.p, n), dyin, BF16_TOL);
        check_band((tag + " dz").c_str(), down_f32(gdz.p, (size_t)N * H), dz, F32_TOL);
        check_band((tag + " dx").c_str(), down_bf16(gdx->p, n), dx, BF16_TOL);
        check_band((tag + " dwg").c_str(), down_f32(gdwg->p, (size_t)H * GW), dwg, F32_TOL);
    }
}

TEST(cuda_frontier_skip_gate) {
    REQUIRE_GPU();
    Rng rng(73);
    int cases[][2] = {{1, 8}, {7, 33}, {300, 64}};  // N, C
    for (auto& k : cases) {
        int N = k[0], C = k[1];
        size_t n = (size_t)N * C;
        std::vector<double> x = cu_randn(n, rng), sk = cu_randn(n, rng), dy = cu_randn(n, rng);
        std::vector<double> w = cu_randn(C, rng, 1.0, false), gate = cu_randn(C, rng, 1.0, false);
        std::vector<double> dx0 = cu_randn(n, rng, 0.5), ds0 = cu_randn(n, rng, 0.5);
        std::vector<double> dw0 = cu_randn(C, rng, 1.0, false), dg0 = cu_randn(C, rng, 1.0, false);
        std::vector<double> out(n), dx = dx0, ds = ds0, dw = dw0, dg = dg0;
        GradWrite w_write = N == 7 ? ACCUMULATE : OVERWRITE, g_write = N == 300 ? ACCUMULATE : OVERWRITE;
        skip_gate_forward(Cpu<double>{}, out.data(), x.data(), sk.data(), w.data(), gate.data(), N, C);
        skip_gate_backward(Cpu<double>{}, dx.data(), ds.data(), dw.data(), dg.data(), dy.data(), x.data(), sk.data(),
                           w.data(), gate.data(), N, C, w_write, g_write);
        CU_UP(gx, bf16, x); CU_UP(gsk, bf16, sk); CU_UP(gdy, bf16, dy); CU_UP(gw, f32, w); CU_UP(gg, f32, gate);
        CU_UP(gdx, bf16, dx0);
        std::unique_ptr<GpuBuf> gds(up_grad_bf16(ds0, OVERWRITE));  // overwritten
        std::unique_ptr<GpuBuf> gdw(up_grad_f32(dw0, w_write)), gdg(up_grad_f32(dg0, g_write));
        GpuBuf gout(n * 2);
        gout.poison();
        skip_gate_forward(Cuda{}, gout.b(), gx->b(), gsk->b(), gw->f(), gg->f(), N, C);
        skip_gate_backward(Cuda{}, gdx->b(), gds->b(), gdw->f(), gdg->f(), gdy->b(), gx->b(), gsk->b(), gw->f(),
                           gg->f(), N, C, w_write, g_write);
        std::string tag = test_format("skip_gate N=%d C=%d dw%s dgate%s", N, C, grad_write_name(w_write),
                                      grad_write_name(g_write));
        check_band((tag + " out").c_str(), down_bf16(gout.p, n), out, BF16_TOL);
        check_band((tag + " dx").c_str(), down_bf16(gdx->p, n), dx, BF16_TOL);
        check_band((tag + " dskip").c_str(), down_bf16(gds->p, n), ds, BF16_TOL);
        check_band((tag + " dw").c_str(), down_f32(gdw->p, C), dw, F32_TOL);
        check_band((tag + " dgate").c_str(), down_f32(gdg->p, C), dg, F32_TOL);
    }
}

TEST(cuda_frontier_lanes) {
    REQUIRE_GPU();
    Rng rng(74);
    int cases[][2] = {{1, 8}, {9, 33}, {200, 64}};  // N, C
    for (auto& k : cases) {
        int N = k[0], C = k[1];
        size_t n = (size_t)N * C;
        std::vector<double> l0 = cu_randn(n, rng), l1 = cu_randn(n, rng), a = cu_randn(n, rng), m = cu_randn(n, rng);
        std::vector<double> d0 = cu_randn(n, rng), d1 = cu_randn(n, rng);
        std::vector<double> sa = cu_randn(C, rng, 1.0, false), sm = cu_randn(C, rng, 1.0, false);
        std::vector<double> resid = cu_randn(2, rng, 1.0, false), post = cu_randn(4, rng, 1.0, false);
        std::vector<double> dsa0 = cu_randn(C, rng, 1.0, false), dsm0 = cu_randn(C, rng, 1.0, false);
        std::vector<double> dr0 = cu_randn(2, rng, 1.0, false), dp0 = cu_randn(4, rng, 1.0, false);
        std::vector<double> o0(n), o1(n), da(n), dm(n), g0 = d0, g1 = d1, dsa = dsa0, dsm = dsm0, dr = dr0, dp = dp0;
        lanes_forward(Cpu<double>{}, o0.data(), o1.data(), l0.data(), l1.data(), a.data(), m.data(), sa.data(),
                      sm.data(), resid.data(), post.data(), N, C);
        // each parameter gradient overwritten in some case, added in another
        GradWrite sa_write = N == 1 ? ACCUMULATE : OVERWRITE, sm_write = N == 9 ? ACCUMULATE : OVERWRITE;
        GradWrite resid_write = N == 200 ? ACCUMULATE : OVERWRITE, post_write = N == 1 ? ACCUMULATE : OVERWRITE;
        lanes_backward(Cpu<double>{}, g0.data(), g1.data(), da.data(), dm.data(), dsa.data(), dsm.data(), dr.data(),
                       dp.data(), l0.data(), l1.data(), a.data(), m.data(), sa.data(), sm.data(), resid.data(),
                       post.data(), N, C, sa_write, sm_write, resid_write, post_write);
        CU_UP(gl0, bf16, l0); CU_UP(gl1, bf16, l1); CU_UP(ga, bf16, a); CU_UP(gm, bf16, m);
        CU_UP(gd0, bf16, d0); CU_UP(gd1, bf16, d1); CU_UP(gsa, f32, sa); CU_UP(gsm, f32, sm);
        CU_UP(gr, f32, resid); CU_UP(gp, f32, post);
        std::unique_ptr<GpuBuf> gdsa(up_grad_f32(dsa0, sa_write)), gdsm(up_grad_f32(dsm0, sm_write));
        std::unique_ptr<GpuBuf> gdr(up_grad_f32(dr0, resid_write)), gdp(up_grad_f32(dp0, post_write));
        GpuBuf go0(n * 2), go1(n * 2), gda(n * 2), gdm(n * 2);
        for (GpuBuf* b : {&go0, &go1, &gda, &gdm}) b->poison();
        lanes_forward(Cuda{}, go0.b(), go1.b(), gl0->b(), gl1->b(), ga->b(), gm->b(), gsa->f(), gsm->f(), gr->f(),
                      gp->f(), N, C);
        lanes_backward(Cuda{}, gd0->b(), gd1->b(), gda.b(), gdm.b(), gdsa->f(), gdsm->f(), gdr->f(), gdp->f(), gl0->b(),
                       gl1->b(), ga->b(), gm->b(), gsa->f(), gsm->f(), gr->f(), gp->f(), N, C, sa_write, sm_write,
                       resid_write, post_write);
        std::string tag = test_format("lanes N=%d C=%d", N, C);
        check_band((tag + " lane0").c_str(), down_bf16(go0.p, n), o0, BF16_TOL);
        check_band((tag + " lane1").c_str(), down_bf16(go1.p, n), o1, BF16_TOL);
        check_band((tag + " dlane0").c_str(), down_bf16(gd0->p, n), g0, BF16_TOL);
        check_band((tag + " dlane1").c_str(), down_bf16(gd1->p, n), g1, BF16_TOL);
        check_band((tag + " da").c_str(), down_bf16(gda.p, n), da, BF16_TOL);
        check_band((tag + " dm").c_str(), down_bf16(gdm.p, n), dm, BF16_TOL);
        check_band((tag + " dsa").c_str(), down_f32(gdsa->p, C), dsa, F32_TOL);
        check_band((tag + " dsm").c_str(), down_f32(gdsm->p, C), dsm, F32_TOL);
        check_band((tag + " dresid").c_str(), down_f32(gdr->p, 2), dr, F32_TOL);
        check_band((tag + " dpost").c_str(), down_f32(gdp->p, 4), dp, F32_TOL);
    }
}

#endif  // PGOLF_CUDA
