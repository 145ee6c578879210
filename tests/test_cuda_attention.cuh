// Fused causal attention on the GPU (train_gpt.cu, section 5).
// CPU tests, run everywhere: the tiling plan (GQA packing, causal tile ranges, skip and mask
// decisions, statistics indices) against brute-force enumeration; the warp-level operand plans
// (ldmatrix addresses, accumulator layout, accumulator → A-operand repacking) against an emulation
// of ldmatrix and mma.sync written from the PTX ISA's fragment tables; the launchers' shape checks.
// GPU tests: forward (out, lse) and backward (dq, dk, dv) against attention_forward/backward(Cpu<float>)
// on random inputs, for the shapes the model and the tiny configs use, ragged ones included.
#ifdef PGOLF_CUDA

// The plans are checked over these sequence lengths, GQA group sizes and packed-tile heights.
static const int ATTN_TEST_T[] = {1, 2, 7, 31, 32, 33, 63, 64, 65, 77, 129, 200, 513};
static const int ATTN_TEST_GROUP[] = {1, 2, 3, 4, 5, 8, 16, 32, 64};

TEST(attention_packing_covers_every_query_row_once) {
    for (int rows : {128, 64, 32})
        for (int group : ATTN_TEST_GROUP) {
            if (group > rows) continue;
            int positions = attn_tile_positions(rows, group);
            for (int T : ATTN_TEST_T) {
                int n_qt = attn_query_tiles(T, positions), Hk = 2, H = group * Hk;
                for (int g = 0; g < Hk; g++) {
                    std::vector<int> hits((size_t)T * H, 0);
                    for (int i = 0; i < n_qt; i++) {
                        int valid_rows = 0;
                        for (int m = 0; m < rows; m++) {
                            int t, hoff;
                            if (!attn_packed_row(i, m, positions, group, T, &t, &hoff)) continue;
                            CHECK_MSG(t >= 0 && t < T && hoff >= 0 && hoff < group,
                                      "rows %d group %d T %d: tile %d row %d → t %d hoff %d", rows, group, T, i, m, t,
                                      hoff);
                            hits[(size_t)t * H + g * group + hoff]++;
                            valid_rows++;
                        }
                        CHECK_MSG(valid_rows > 0, "rows %d group %d T %d: query tile %d of %d holds no row", rows,
                                  group, T, i, n_qt);
                    }
                    for (int t = 0; t < T; t++)
                        for (int h = 0; h < H; h++)
                            CHECK_MSG(hits[(size_t)t * H + h] == (h / group == g ? 1 : 0),
                                      "rows %d group %d T %d kv head %d: (t %d, head %d) packed %d times", rows, group,
                                      T, g, t, h, hits[(size_t)t * H + h]);
                }
            }
        }
}

// Largest and smallest valid position in packed query tile i (brute force).
static void attn_tile_span(int i, int rows, int positions, int group, int T, int* tmin, int* tmax) {
    *tmin = INT32_MAX; *tmax = -1;
    for (int m = 0; m < rows; m++) {
        int t, hoff;
        if (attn_packed_row(i, m, positions, group, T, &t, &hoff)) {
            *tmin = std::min(*tmin, t);
            *tmax = std::max(*tmax, t);
        }
    }
}

TEST(attention_tile_ranges_follow_the_causal_mask) {
    for (int rows : {128, 64, 32})
        for (int group : ATTN_TEST_GROUP) {
            if (group > rows) continue;
            int positions = attn_tile_positions(rows, group);
            for (int T : ATTN_TEST_T) {
                int n_qt = attn_query_tiles(T, positions), n_kt = (T + ATTN_TILE - 1) / ATTN_TILE;
                // forward and dQ visit exactly the key tiles up to the last visible key
                for (int i = 0; i < n_qt; i++) {
                    int tmin, tmax;
                    attn_tile_span(i, rows, positions, group, T, &tmin, &tmax);
                    CHECK_MSG(attn_key_tiles(i, positions, T, ATTN_TILE) == tmax / ATTN_TILE + 1,
                              "rows %d group %d T %d: query tile %d (positions ≤ %d) visits %d key tiles", rows, group,
                              T, i, tmax, attn_key_tiles(i, positions, T, ATTN_TILE));
                }
                // dK/dV visit exactly the query tiles with a position ≥ the tile's first key
                for (int j = 0; j < n_kt; j++) {
                    int first = attn_first_query_tile(j, ATTN_TILE, positions);
                    for (int i = 0; i < n_qt; i++) {
                        int tmin, tmax;
                        attn_tile_span(i, rows, positions, group, T, &tmin, &tmax);
                        bool sees = tmax >= j * ATTN_TILE;
                        CHECK_MSG(sees == (i >= first),
                                  "rows %d group %d T %d: key tile %d starts at query tile %d, but tile %d %s its keys",
                                  rows, group, T, j, first, i, sees ? "sees" : "does not see");
                    }
                }
            }
        }
}

// Brute force over valid (position, key) pairs of a block of rows and a range of keys; doc: the row's
// document starts (null: one document).
static void attn_pairs(int i, int m0, int m1, int key0, int key1, int rows, int positions, int group, int T,
                       const int32_t* doc, bool* any_visible, bool* any_hidden) {
    *any_visible = *any_hidden = false;
    for (int m = m0; m < m1 && m < rows; m++) {
        int t, hoff;
        if (!attn_packed_row(i, m, positions, group, T, &t, &hoff)) continue;
        int d = doc ? doc[t] : 0;
        for (int key = key0; key < key1 && key < T; key++) (key <= t && key >= d ? *any_visible : *any_hidden) = true;
    }
}
// Document starts of one row of T tokens with BOS at `every`-th positions and at a few tile edges (63, 64,
// 65, 127 when T reaches them): ragged boundaries inside tiles and on their edges.
static std::vector<int32_t> attn_test_docs(int T, int every) {
    std::vector<int32_t> tokens(T, 7), doc(T);
    for (int t = 3; t < T; t += every) tokens[t] = BOS_ID;
    for (int t : {63, 64, 65, 127})
        if (t < T) tokens[t] = BOS_ID;
    document_starts(Cpu<float>{}, doc.data(), tokens.data(), 1, T);
    return doc;
}

TEST(attention_skip_and_mask_decisions_are_exact) {
    for (int every : {0, 5, 29})  // 0: one document (no mask beyond the causal one)
    for (int group : ATTN_TEST_GROUP)
        for (int T : ATTN_TEST_T) {
            std::vector<int32_t> docs = attn_test_docs(T, every ? every : T + 1);
            const int32_t* doc = every ? docs.data() : nullptr;
            // forward (128 rows, 32 per warp; 64 and 16 at hd 128): warp w holds packed rows wr·w .. wr·w + wr − 1
            // of a tile, key tiles of 64 from the tile's first document on
            int n_kt = (T + ATTN_TILE - 1) / ATTN_TILE;
            for (int rows : {attn_forward_rows(64), ATTN_TILE}) {
                int positions = attn_tile_positions(rows, group), wr = rows / 4;
                if (group > rows) continue;
                for (int i = 0; i < attn_query_tiles(T, positions); i++) {
                    int j0 = attn_doc_start(doc, 0, i * positions, T) / ATTN_TILE;
                    for (int w = 0; w < 4; w++)
                        for (int j = 0; j < n_kt; j++) {
                            int lo, hi;
                            bool vis, hid;
                            attn_row_positions(i, w * wr, wr, positions, group, &lo, &hi);
                            int dlo = attn_doc_start(doc, 0, lo, T), dhi = attn_doc_start(doc, 0, hi, T);
                            attn_pairs(i, w * wr, w * wr + wr, j * ATTN_TILE, (j + 1) * ATTN_TILE, rows, positions,
                                       group, T, doc, &vis, &hid);
                            CHECK_MSG(!(j < j0 && vis),
                                      "docs %d group %d T %d rows %d: query tile %d starts at key tile %d after %d, "
                                      "which it sees",
                                      every, group, T, rows, i, j0, j);
                            CHECK_MSG(
                                !(attn_all_masked(j * ATTN_TILE, j * ATTN_TILE + ATTN_TILE - 1, hi, dlo) && vis),
                                "docs %d group %d T %d rows %d: query tile %d warp %d skips key tile %d, which it sees",
                                every, group, T, rows, i, w, j);
                            CHECK_MSG(
                                !(!attn_any_masked(j * ATTN_TILE, j * ATTN_TILE + ATTN_TILE - 1, lo, dhi) && hid),
                                "docs %d group %d T %d rows %d: query tile %d warp %d leaves key tile %d unmasked",
                                every, group, T, rows, i, w, j);
                        }
                }
            }
            // backward: warp w holds keys 16w..16w+15 of a key tile, against whole query tiles of BQ rows up to
            // the last one whose documents reach the key tile; the whole block skips the dQ product of a tile
            // pair without a visible pair
            for (int bq : {64, 32}) {
                if (group > bq) continue;
                int pos = attn_tile_positions(bq, group);
                for (int j = 0; j < n_kt; j++) {
                    int n_qt = attn_query_tiles(attn_doc_positions(doc, 0, j * ATTN_TILE + ATTN_TILE - 1, T), pos);
                    for (int i = 0; i < attn_query_tiles(T, pos); i++) {
                        int lo, hi;
                        bool vis, hid;
                        attn_row_positions(i, 0, bq, pos, group, &lo, &hi);
                        attn_pairs(i, 0, bq, j * ATTN_TILE, (j + 1) * ATTN_TILE, bq, pos, group, T, doc, &vis, &hid);
                        CHECK_MSG(!(attn_all_masked(j * ATTN_TILE, j * ATTN_TILE + ATTN_TILE - 1, hi,
                                                    attn_doc_start(doc, 0, lo, T)) && vis),
                                  "docs %d group %d T %d BQ %d: key tile %d skips the dQ share of query tile %d, "
                                  "which sees it",
                                  every, group, T, bq, j, i);
                    }
                    for (int i = 0; i < attn_query_tiles(T, pos); i++)
                        for (int w = 0; w < 4; w++) {
                            int lo, hi, kw0 = j * ATTN_TILE + w * 16;
                            bool vis, hid;
                            attn_row_positions(i, 0, bq, pos, group, &lo, &hi);
                            int dlo = attn_doc_start(doc, 0, lo, T), dhi = attn_doc_start(doc, 0, hi, T);
                            attn_pairs(i, 0, bq, kw0, kw0 + 16, bq, pos, group, T, doc, &vis, &hid);
                            CHECK_MSG(!(i >= n_qt && vis),
                                      "docs %d group %d T %d BQ %d: key tile %d stops at query tile %d before %d, "
                                      "which sees it",
                                      every, group, T, bq, j, n_qt, i);
                            CHECK_MSG(!(attn_all_masked(kw0, kw0 + 15, hi, dlo) && vis),
                                      "docs %d group %d T %d BQ %d: key warp %d of tile %d skips query tile %d, which "
                                      "sees it",
                                      every, group, T, bq, w, j, i);
                            CHECK_MSG(
                                !(!attn_any_masked(kw0, kw0 + 15, lo, dhi) && hid),
                                "docs %d group %d T %d BQ %d: key warp %d of tile %d leaves query tile %d unmasked",
                                every, group, T, bq, w, j, i);
                        }
                }
            }
        }
}


TEST(attention_statistics_index_matches_layouts) {
    int B = 3, T = 5, H = 4, hd = 8;
    size_t r = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++, r++) {  // rows of [B,T,H,hd] in memory order
                CHECK(attn_index(b, t, h, T, H, hd) == r * hd);
                CHECK(attn_lse_index(b, h, t, T, H) == (size_t)(b * H + h) * T + t);
                CHECK(attn_row_lse_index(r, T, H) == attn_lse_index(b, h, t, T, H));
            }
}

// The backward's fixed-point exponent puts a row's bound in [2^61, 2^62) units: below int64's 2^63 with
// room for rounding, and no coarser than needed, from denormal bounds to FLT_MAX; inf and NaN are flagged.
TEST(attention_dq_exponent_bounds_the_fixed_point_range) {
    for (float bound : {1e-40f, 1e-30f, 1e-12f, 0.75f, 1.f, 3.f, 1e8f, 1e30f, FLT_MAX}) {
        int e = attn_dq_exponent(bound);
        double scaled = std::ldexp((double)bound, e);
        CHECK_MSG(scaled >= std::ldexp(1.0, ATTN_DQ_BITS - 1) && scaled < std::ldexp(1.0, ATTN_DQ_BITS),
                  "bound %g: exponent %d puts it at %g", bound, e, scaled);
    }
    CHECK(attn_dq_exponent(0.f) == ATTN_DQ_BITS);
    CHECK(attn_dq_exponent(INFINITY) == ATTN_DQ_BAD && attn_dq_exponent(NAN) == ATTN_DQ_BAD);
}

// --- a warp of ldmatrix and mma.sync, emulated from the PTX ISA's fragment tables ---------------
// ldmatrix .x4: lane l gives the address of row l%8 of matrix l/8. Without .trans lane l receives, in
// register j, elements (row l/4, columns 2(l%4) and 2(l%4)+1) of matrix j; with .trans, elements
// (rows 2(l%4) and 2(l%4)+1, column l/4). The lower-indexed element sits in the low 16 bits.
static void emu_ldmatrix_x4(uint32_t out[32][4], const uint16_t* const addr[32], bool trans) {
    for (int l = 0; l < 32; l++)
        for (int j = 0; j < 4; j++) {
            const uint16_t* const* m = addr + 8 * j;
            int r = l / 4, c = 2 * (l % 4);
            uint16_t lo = trans ? m[c][r] : m[r][c], hi = trans ? m[c + 1][r] : m[r][c + 1];
            out[l][j] = lo | (uint32_t)hi << 16;
        }
}
static double emu_bf16(uint32_t reg, int half) { return bf16_to_float((uint16_t)(half ? reg >> 16 : reg & 0xffff)); }
// mma.m16n8k16.row.col bf16, d += A·B. With g = l/4, t = l%4: A regs 0..3 hold (g, 2t..2t+1),
// (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..); B regs 0, 1 hold (k = 2t..2t+1, n = g), (k = 2t+8.., n = g);
// D elements 0..3 are (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
static void emu_mma_16816(float d[32][4], const uint32_t a[32][4], const uint32_t b0[32], const uint32_t b1[32]) {
    double A[16][16], Bm[16][8];
    for (int l = 0; l < 32; l++) {
        int g = l / 4, t = l % 4;
        for (int x = 0; x < 2; x++) {
            A[g][2 * t + x] = emu_bf16(a[l][0], x);
            A[g + 8][2 * t + x] = emu_bf16(a[l][1], x);
            A[g][2 * t + 8 + x] = emu_bf16(a[l][2], x);
            A[g + 8][2 * t + 8 + x] = emu_bf16(a[l][3], x);
            Bm[2 * t + x][g] = emu_bf16(b0[l], x);
            Bm[2 * t + 8 + x][g] = emu_bf16(b1[l], x);
        }
    }
    for (int l = 0; l < 32; l++) {
        int g = l / 4, t = l % 4;
        for (int x = 0; x < 2; x++) {
            double top = 0, bottom = 0;
            for (int kk = 0; kk < 16; kk++) {
                top += A[g][kk] * Bm[kk][2 * t + x];
                bottom += A[g + 8][kk] * Bm[kk][2 * t + x];
            }
            d[l][x] += (float)top;
            d[l][2 + x] += (float)bottom;
        }
    }
}

// The forward's inner steps for one warp, with the kernels' own plans: S = Q·Kᵀ (A from the Q tile,
// B from K stored [key][d]), then O = P·V with P repacked from S's accumulators (acc_to_a) and V
// stored [key][d] read with .trans. dQ's dS·K and dK/dV's Sᵀ = K·Qᵀ, Pᵀ·dO, dSᵀ·Q use the same
// plans on other tiles. Pad columns hold NaN, so a plan that reads them poisons the result.
static void attn_check_fragment_plans(int hd, Rng& rng) {
    const int LD = hd + ATTN_PAD, KS = hd / 16, NT = ATTN_TILE / 8, warp = 2;
    auto tile = [&](double sd) {
        std::vector<uint16_t> x((size_t)ATTN_TILE * LD, 0x7fc0);  // bf16 NaN in the pad
        for (int r = 0; r < ATTN_TILE; r++)
            for (int c = 0; c < hd; c++) x[(size_t)r * LD + c] = float_to_bf16((float)(sd * rng.normal()));
        return x;
    };
    std::vector<uint16_t> sQ = tile(1.0), sK = tile(1.0), sV = tile(1.0);
    auto val = [&](const std::vector<uint16_t>& s, int r, int c) {
        return (double)bf16_to_float(s[(size_t)r * LD + c]);
    };
    const uint16_t* addr[32];
    static uint32_t qf[8][32][4];       // [k-step][lane][register], hd ≤ 128
    static float s[8][32][4], o[16][32][4];  // [n-tile][lane][element]
    memset(s, 0, sizeof s);
    memset(o, 0, sizeof o);
    for (int kk = 0; kk < KS; kk++) {
        for (int l = 0; l < 32; l++) addr[l] = &sQ[(size_t)(warp * 16 + ldsm_a_row(l)) * LD + kk * 16 + ldsm_a_col(l)];
        uint32_t r[32][4];
        emu_ldmatrix_x4(r, addr, false);
        for (int l = 0; l < 32; l++) for (int x = 0; x < 4; x++) qf[kk][l][x] = r[l][x];
    }
    for (int kk = 0; kk < KS; kk++)
        for (int np = 0; np < NT / 2; np++) {
            for (int l = 0; l < 32; l++)
                addr[l] = &sK[(size_t)(np * 16 + ldsm_b_row(l)) * LD + kk * 16 + ldsm_b_col(l)];
            uint32_t kb[32][4], a[32][4], b[4][32];
            emu_ldmatrix_x4(kb, addr, false);
            for (int l = 0; l < 32; l++) for (int x = 0; x < 4; x++) { a[l][x] = qf[kk][l][x]; b[x][l] = kb[l][x]; }
            float d0[32][4], d1[32][4];
            for (int l = 0; l < 32; l++)
                for (int e = 0; e < 4; e++) {
                    d0[l][e] = s[2 * np][l][e];
                    d1[l][e] = s[2 * np + 1][l][e];
                }
            emu_mma_16816(d0, a, b[0], b[1]);
            emu_mma_16816(d1, a, b[2], b[3]);
            for (int l = 0; l < 32; l++)
                for (int e = 0; e < 4; e++) {
                    s[2 * np][l][e] = d0[l][e];
                    s[2 * np + 1][l][e] = d1[l][e];
                }
        }
    std::vector<double> P((size_t)16 * ATTN_TILE, NAN);  // S read back through the accumulator layout, as bf16
    for (int n = 0; n < NT; n++)
        for (int l = 0; l < 32; l++)
            for (int e = 0; e < 4; e++) {
                int row = mma_acc_row(l, e), key = n * 8 + mma_acc_col(l, e);
                double want = 0;
                for (int c = 0; c < hd; c++) want += val(sQ, warp * 16 + row, c) * val(sK, key, c);
                CHECK_MSG(std::fabs(s[n][l][e] - want) <= 1e-5 * (1 + std::fabs(want)),
                          "hd %d: S[%d][%d] from lane %d element %d is %.6g, Q·Kᵀ is %.6g", hd, row, key, l, e,
                          s[n][l][e], want);
                P[(size_t)row * ATTN_TILE + key] = round_to_bf16(s[n][l][e]);
            }
    for (double p : P)
        CHECK_MSG(!std::isnan(p), "hd %d: the accumulator layout leaves an element of the 16×64 tile unset", hd);
    for (int kk = 0; kk < NT / 2; kk++) {
        uint32_t pa[32][4];
        for (int l = 0; l < 32; l++) acc_to_a(pa[l], s[2 * kk][l], s[2 * kk + 1][l]);
        for (int dp = 0; dp < hd / 16; dp++) {
            for (int l = 0; l < 32; l++)
                addr[l] = &sV[(size_t)(kk * 16 + ldsm_a_row(l)) * LD + dp * 16 + ldsm_a_col(l)];
            uint32_t vb[32][4], b[4][32];
            emu_ldmatrix_x4(vb, addr, true);
            for (int l = 0; l < 32; l++) for (int x = 0; x < 4; x++) b[x][l] = vb[l][x];
            float d0[32][4], d1[32][4];
            for (int l = 0; l < 32; l++)
                for (int e = 0; e < 4; e++) {
                    d0[l][e] = o[2 * dp][l][e];
                    d1[l][e] = o[2 * dp + 1][l][e];
                }
            emu_mma_16816(d0, pa, b[0], b[1]);
            emu_mma_16816(d1, pa, b[2], b[3]);
            for (int l = 0; l < 32; l++)
                for (int e = 0; e < 4; e++) {
                    o[2 * dp][l][e] = d0[l][e];
                    o[2 * dp + 1][l][e] = d1[l][e];
                }
        }
    }
    for (int n = 0; n < hd / 8; n++)
        for (int l = 0; l < 32; l++)
            for (int e = 0; e < 4; e++) {
                int row = mma_acc_row(l, e), c = n * 8 + mma_acc_col(l, e);
                double want = 0;
                for (int key = 0; key < ATTN_TILE; key++) want += P[(size_t)row * ATTN_TILE + key] * val(sV, key, c);
                CHECK_MSG(std::fabs(o[n][l][e] - want) <= 1e-4 * (1 + std::fabs(want)),
                          "hd %d: O[%d][%d] from lane %d element %d is %.6g, P·V is %.6g", hd, row, c, l, e, o[n][l][e],
                          want);
            }
}

TEST(attention_fragment_plans_match_ptx_layouts) {
    Rng rng(77);
    for (int hd : {16, 32, 64, 128}) attn_check_fragment_plans(hd, rng);
}

// The backward's dQ product reads its A operand dS [query][key] from the dSᵀ tile stored [key][query]: ldmatrix
// .trans at the B-operand addresses (ldsm_b_row, ldsm_b_col) of the stored tile gives the registers ldmatrix
// without .trans gives at the A-operand addresses of dS stored [query][key].
TEST(attention_transposed_a_operand_plan) {
    Rng rng(5);
    const int LDS = 64 + ATTN_PAD, r0 = 16, c0 = 32;  // a 16 × 16 block inside a wider padded tile
    std::vector<uint16_t> a((size_t)64 * LDS, 0x7fc0), at((size_t)64 * LDS, 0x7fc0);  // NaN where not written
    for (int m = 0; m < 64; m++)
        for (int k = 0; k < 64; k++) {
            uint16_t x = float_to_bf16((float)rng.normal());
            a[(size_t)m * LDS + k] = x;   // dS [query m][key k]
            at[(size_t)k * LDS + m] = x;  // dSᵀ [key k][query m]
        }
    const uint16_t *pa[32], *pt[32];
    for (int l = 0; l < 32; l++) {
        pa[l] = &a[(size_t)(r0 + ldsm_a_row(l)) * LDS + c0 + ldsm_a_col(l)];
        pt[l] = &at[(size_t)(c0 + ldsm_b_row(l)) * LDS + r0 + ldsm_b_col(l)];
    }
    uint32_t want[32][4], got[32][4];
    emu_ldmatrix_x4(want, pa, false);
    emu_ldmatrix_x4(got, pt, true);
    for (int l = 0; l < 32; l++)
        for (int j = 0; j < 4; j++)
            CHECK_MSG(got[l][j] == want[l][j], "lane %d register %d: %08x from dSᵀ, %08x from dS", l, j, got[l][j],
                      want[l][j]);
}

TEST(attention_rejects_unsupported_shapes) {
    __nv_bfloat16* z = nullptr;
    float* l = nullptr;
    alignas(16) static __nv_bfloat16 buf[16];
    CHECK_THROWS(attention_forward(Cuda{}, z, l, z, z, z, 1, 8, 4, 2, 48), "head dim 48");
    CHECK_THROWS(attention_forward(Cuda{}, z, l, z, z, z, 1, 8, 6, 4, 64), "H a multiple of Hk");
    CHECK_THROWS(attention_forward(Cuda{}, z, l, z, z, z, 1, 8, 128, 1, 64), "at most 64 fit");
    CHECK_THROWS(attention_backward(Cuda{}, z, z, z, z, z, z, z, z, l, 1, 8, 64, 1, 128), "at most 32 fit");
    CHECK_THROWS(attention_backward(Cuda{}, z, z, z, z, buf + 1, z, z, z, l, 1, 8, 4, 2, 64),
                 "attention_backward: q is not 16-byte aligned");
}

// --- GPU against the CPU reference ----------------------------------------------------------------
// Element `idx` of a [B,T,nh,hd] tensor (or of lse [B,H,T] when hd == 0) as text.
static std::string attn_where(size_t idx, int T, int nh, int hd) {
    if (hd == 0) return test_format("b=%zu h=%zu t=%zu", idx / T / nh, idx / T % nh, idx % T);
    return test_format("b=%zu t=%zu h=%zu i=%zu", idx / hd / nh / T, idx / hd / nh % T, idx / hd % nh, idx % hd);
}
// max |got − want| ≤ rel·max|ref| + floor, where ref is the reference result itself (want minus the
// buffer's initial values for gradients). NaN (a poisoned, unwritten element) always fails.
static void attn_expect_band(const char* what, const char* shape, const std::vector<float>& got,
                             const std::vector<float>& want, double ref_max, double rel, double floor, int T, int nh,
                             int hd) {
    double tol = rel * ref_max + floor, worst = -1;
    size_t at = 0, bad = 0;
    for (size_t i = 0; i < got.size(); i++) {
        double err = std::fabs((double)got[i] - want[i]);
        if (!(err <= tol)) { bad++; if (!(err <= worst)) { worst = err; at = i; } }
    }
    CHECK_MSG(
        bad == 0,
        "%s %s: %zu of %zu elements off by more than %.3g (= %g·max|ref| %.4g + %g); worst at %s: got %.6g want %.6g",
        what, shape, bad, got.size(), tol, rel, ref_max, floor, attn_where(at, T, nh, hd).c_str(), got[at], want[at]);
}
// lse is fp32 all through: |got − want| ≤ 1e-4·max(1, |want|) per element.
static void attn_expect_lse(const char* shape, const std::vector<float>& got, const std::vector<float>& want, int T,
                            int H) {
    for (size_t i = 0; i < got.size(); i++)
        CHECK_MSG(std::fabs((double)got[i] - want[i]) <= 1e-4 * std::max(1.0, std::fabs((double)want[i])),
                  "lse %s: at %s got %.7g want %.7g", shape, attn_where(i, T, H, 0).c_str(), got[i], want[i]);
}

struct AttnDev {  // one device buffer, freed on every exit path of a test
    void* p = nullptr;
    explicit AttnDev(size_t bytes) { cudaCheck(cudaMalloc(&p, bytes ? bytes : 1)); }
    ~AttnDev() { cudaFree(p); }
    template <class X> X* as() const { return (X*)p; }
};
static void attn_upload(const AttnDev& d, const std::vector<uint16_t>& h) {
    cudaCheck(cudaMemcpy(d.p, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
}
template <class X> static std::vector<X> attn_download(const AttnDev& d, size_t n) {
    std::vector<X> h(n);
    cudaCheck(cudaMemcpy(h.data(), d.p, n * sizeof(X), cudaMemcpyDeviceToHost));
    return h;
}
static std::vector<float> attn_widen(const std::vector<uint16_t>& h) {
    std::vector<float> f(h.size());
    for (size_t i = 0; i < h.size(); i++) f[i] = bf16_to_float(h[i]);
    return f;
}
static double attn_max_abs(const std::vector<float>& x) {
    double m = 0;
    for (float v : x) m = std::max(m, (double)std::fabs(v));
    return m;
}

// every > 0: document-masked (VARLEN_ATTN), each row cut into documents by attn_test_docs(T, every + b),
// the document starts in device memory as gpt_forward keeps them. dscale scales dO (and so every gradient).
// overwrite: also the backward that writes dq, dk (and dv) over poisoned buffers, as gpt_backward calls it.
static void attention_gpu_vs_cpu(int B, int T, int H, int Hk, int hd, int every = 0, double dscale = 1,
                                 bool overwrite = false) {
    std::string scaled = dscale != 1 ? test_format(", dO × %g", dscale) : "";
    std::string shape = test_format("(B,T,H,Hk,hd)=(%d,%d,%d,%d,%d)%s%s", B, T, H, Hk, hd,
                                    every ? " with documents" : "", scaled.c_str());
    const char* sh = shape.c_str();
    size_t nq = (size_t)B * T * H * hd, nk = (size_t)B * T * Hk * hd, nl = (size_t)B * H * T;
    Rng rng(1000003ull * T + 1009 * H + 31 * Hk + hd + 7 * B + every);
    std::vector<int32_t> docs;
    for (int b = 0; b < B && every; b++) {
        std::vector<int32_t> row = attn_test_docs(T, every + b);
        docs.insert(docs.end(), row.begin(), row.end());
    }
    const int32_t* doc = every ? docs.data() : nullptr;
    AttnDev doc_((size_t)B * T * 4);
    if (every) cudaCheck(cudaMemcpy(doc_.p, docs.data(), docs.size() * 4, cudaMemcpyHostToDevice));
    const int32_t* ddoc = every ? doc_.as<int32_t>() : nullptr;
    auto random_bf16 = [&](size_t n, double sd) {
        std::vector<uint16_t> h(n);
        for (uint16_t& x : h) x = float_to_bf16((float)(sd * rng.normal()));
        return h;
    };
    // q·k/√hd then has standard deviation 1.5: softmax rows are neither flat nor one-hot
    std::vector<uint16_t> q = random_bf16(nq, 1.5), k = random_bf16(nk, 1.0), v = random_bf16(nk, 1.0),
                          dout = random_bf16(nq, dscale);
    std::vector<float> qf = attn_widen(q), kf = attn_widen(k), vf = attn_widen(v), doutf = attn_widen(dout);
    std::vector<float> out_ref(nq), lse_ref(nl);
    attention_forward(Cpu<float>{}, out_ref.data(), lse_ref.data(), qf.data(), kf.data(), vf.data(), B, T, H, Hk, hd,
                      doc);

    AttnDev dq_(nq * 2), dk_(nk * 2), dv_(nk * 2), dout_(nq * 2), q_(nq * 2), k_(nk * 2), v_(nk * 2), out_(nq * 2),
        lse_(nl * 4);
    attn_upload(q_, q); attn_upload(k_, k); attn_upload(v_, v); attn_upload(dout_, dout);
    auto bf = [](const AttnDev& d) { return d.as<__nv_bfloat16>(); };

    // forward, twice over poisoned outputs: within the bf16 band, and bit-identical
    std::vector<uint16_t> out1;
    std::vector<float> lse1;
    for (int run = 0; run < 2; run++) {
        cudaCheck(cudaMemset(out_.p, 0xff, nq * 2));
        cudaCheck(cudaMemset(lse_.p, 0xff, nl * 4));
        attention_forward(Cuda{}, bf(out_), lse_.as<float>(), bf(q_), bf(k_), bf(v_), B, T, H, Hk, hd, ddoc);
        cudaCheck(cudaDeviceSynchronize());
        std::vector<uint16_t> out = attn_download<uint16_t>(out_, nq);
        std::vector<float> lse = attn_download<float>(lse_, nl);
        if (run == 0) {
            attn_expect_band("out", sh, attn_widen(out), out_ref, attn_max_abs(out_ref), 1e-2, 1e-5, T, H, hd);
            attn_expect_lse(sh, lse, lse_ref, T, H);
            out1 = out; lse1 = lse;
        } else {
            CHECK_MSG(out == out1 && !memcmp(lse.data(), lse1.data(), nl * 4),
                      "forward %s: a second run differs from the first", sh);
        }
    }

    // backward from the reference's own out (as bf16) and lse, so it is tested apart from the forward
    std::vector<uint16_t> out_in(nq);
    for (size_t i = 0; i < nq; i++) out_in[i] = float_to_bf16(out_ref[i]);
    std::vector<float> out_inf = attn_widen(out_in), dq_ref(nq, 0.f), dk_ref(nk, 0.f), dv_ref(nk, 0.f);
    attention_backward(Cpu<float>{}, dq_ref.data(), dk_ref.data(), dv_ref.data(), doutf.data(), qf.data(), kf.data(),
                       vf.data(), out_inf.data(), lse_ref.data(), B, T, H, Hk, hd, doc);
    double mq = attn_max_abs(dq_ref), mk = attn_max_abs(dk_ref), mv = attn_max_abs(dv_ref);
    // the kernels add into dq, dk, dv: start them at nonzero values (|x| ≤ max|grad|/2) and expect the sum
    auto start = [&](size_t n, double m) {
        std::vector<uint16_t> h(n);
        for (uint16_t& x : h) x = float_to_bf16((float)(m * (rng.uniform() - 0.5)));
        return h;
    };
    std::vector<uint16_t> dq0 = start(nq, mq), dk0 = start(nk, mk), dv0 = start(nk, mv);
    auto plus = [](const std::vector<uint16_t>& a, const std::vector<float>& b) {
        std::vector<float> s(b.size());
        for (size_t i = 0; i < b.size(); i++) s[i] = bf16_to_float(a[i]) + b[i];
        return s;
    };
    attn_upload(out_, out_in);
    cudaCheck(cudaMemcpy(lse_.p, lse_ref.data(), nl * 4, cudaMemcpyHostToDevice));
    std::vector<uint16_t> g1[3];
    // the fixed-point dQ sums in the scratch, where the op carves them: compared bit for bit between the runs
    // (rounded to bf16, dq alone would hide most order-dependent fp32 sums)
    std::vector<long long> acc1;
    for (int run = 0; run < 2; run++) {
        attn_upload(dq_, dq0); attn_upload(dk_, dk0); attn_upload(dv_, dv0);
        // the scratch must be rewritten before it is read: poison it before the second run
        if (run == 1) cudaCheck(cudaMemset(g_cuda.scratch, 0xff, g_cuda.scratch_bytes));
        attention_backward(Cuda{}, bf(dq_), bf(dk_), bf(dv_), bf(dout_), bf(q_), bf(k_), bf(v_), bf(out_),
                           lse_.as<float>(), B, T, H, Hk, hd, ddoc);
        cudaCheck(cudaDeviceSynchronize());
        Arena carve;
        carve.base = g_cuda.scratch;
        carve.cap = g_cuda.scratch_bytes;
        AttnBackwardScratch sc;
        carve_attention_backward_scratch(carve, sc, B, T, H, Hk, hd);
        std::vector<long long> acc(nq);
        cudaCheck(cudaMemcpy(acc.data(), sc.dq_acc, nq * 8, cudaMemcpyDeviceToHost));
        if (run == 0) acc1 = acc;
        else CHECK_MSG(acc == acc1, "backward %s: the dQ sums of a second run differ from the first", sh);
        std::vector<uint16_t> g[3] = {attn_download<uint16_t>(dq_, nq), attn_download<uint16_t>(dk_, nk),
                                      attn_download<uint16_t>(dv_, nk)};
        if (run == 0) {
            double fl = 1e-5 * dscale;
            attn_expect_band("dq", sh, attn_widen(g[0]), plus(dq0, dq_ref), mq, 1e-2, fl, T, H, hd);
            attn_expect_band("dk", sh, attn_widen(g[1]), plus(dk0, dk_ref), mk, 1e-2, fl, T, Hk, hd);
            attn_expect_band("dv", sh, attn_widen(g[2]), plus(dv0, dv_ref), mv, 1e-2, fl, T, Hk, hd);
            for (int x = 0; x < 3; x++) g1[x] = g[x];
        } else {  // the emulator's block order differs from the first run's (its seeded generator moved on)
            for (int x = 0; x < 3; x++)
                CHECK_MSG(g[x] == g1[x], "backward %s: %s of a second run differs from the first", sh,
                          x == 0   ? "dq"
                          : x == 1 ? "dk"
                                   : "dv");
        }
    }
    for (GradWrite v_write : {OVERWRITE, ACCUMULATE}) {  // without and with an XSA backward before it
        if (!overwrite) break;
        std::vector<uint16_t> poison_q(nq, 0xffff), poison_k(nk, 0xffff);  // bf16 NaN
        attn_upload(dq_, poison_q); attn_upload(dk_, poison_k);
        attn_upload(dv_, v_write == OVERWRITE ? poison_k : dv0);
        attention_backward(Cuda{}, bf(dq_), bf(dk_), bf(dv_), bf(dout_), bf(q_), bf(k_), bf(v_), bf(out_),
                           lse_.as<float>(), B, T, H, Hk, hd, ddoc, OVERWRITE, v_write);
        cudaCheck(cudaDeviceSynchronize());
        std::string w = shape + (v_write == OVERWRITE ? ", overwriting" : ", overwriting dq, dk");
        std::vector<float> dv_want = v_write == OVERWRITE ? dv_ref : plus(dv0, dv_ref);
        attn_expect_band("dq", w.c_str(), attn_widen(attn_download<uint16_t>(dq_, nq)), dq_ref, mq, 1e-2, 1e-5, T, H,
                         hd);
        attn_expect_band("dk", w.c_str(), attn_widen(attn_download<uint16_t>(dk_, nk)), dk_ref, mk, 1e-2, 1e-5, T, Hk,
                         hd);
        attn_expect_band("dv", w.c_str(), attn_widen(attn_download<uint16_t>(dv_, nk)), dv_want, mv, 1e-2, 1e-5, T,
                         Hk, hd);
    }
}

TEST(cuda_attention_single_token_hd64) { REQUIRE_GPU(); attention_gpu_vs_cpu(1, 1, 1, 1, 64); }
TEST(cuda_attention_ragged_gqa_hd32) { REQUIRE_GPU(); attention_gpu_vs_cpu(2, 77, 4, 2, 32); }
TEST(cuda_attention_ragged_gqa_hd64) { REQUIRE_GPU(); attention_gpu_vs_cpu(3, 129, 8, 4, 64); }
TEST(cuda_attention_mha_t513_hd64) { REQUIRE_GPU(); attention_gpu_vs_cpu(1, 513, 8, 8, 64); }
TEST(cuda_attention_mqa_hd16) { REQUIRE_GPU(); attention_gpu_vs_cpu(2, 256, 4, 1, 16); }
TEST(cuda_attention_group3_hd32) { REQUIRE_GPU(); attention_gpu_vs_cpu(1, 70, 6, 2, 32); }
TEST(cuda_attention_ragged_hd128) { REQUIRE_GPU(); attention_gpu_vs_cpu(1, 100, 4, 2, 128); }
TEST(cuda_attention_t2048_hd64) { REQUIRE_GPU(); attention_gpu_vs_cpu(1, 2048, EMU_OR(8, 2), EMU_OR(4, 1), 64); }
// Document-masked: boundaries inside tiles and on their edges, documents shorter and longer than a tile,
// key tiles wholly before a query tile's documents skipped (T 200: rows with BOS every 29 and 30 positions).
TEST(cuda_attention_documents_gqa_hd32) { REQUIRE_GPU(); attention_gpu_vs_cpu(2, 77, 4, 2, 32, 5, 1, true); }
TEST(cuda_attention_documents_gqa_hd64) { REQUIRE_GPU(); attention_gpu_vs_cpu(2, 200, 4, 2, 64, 29); }
// hd 128's 32-row query tiles (the dQ product split by columns across warps) with documents; gradients from
// 1e-12 to 1e8 (a span of 2^66: no single fixed-point scale of an int64 holds both; the per-row exponents do).
TEST(cuda_attention_documents_gqa_hd128) { REQUIRE_GPU(); attention_gpu_vs_cpu(1, 150, 4, 2, 128, 37, 1, true); }
TEST(cuda_attention_gradient_range) {
    REQUIRE_GPU();
    attention_gpu_vs_cpu(1, 100, 4, 2, 32, 0, 1e-12);
    attention_gpu_vs_cpu(1, 100, 4, 2, 32, 0, 1e8);
}

// A NaN in K reaches dq as NaN, never as a finite number: every query row that sees the key (and so gets a NaN
// share) reads NaN, though a NaN has no fixed-point value (its kv head's rows are all flagged).
TEST(cuda_attention_backward_nan_stays_nan) {
    REQUIRE_GPU();
    const int B = 1, T = 70, H = 4, Hk = 2, hd = 32, bad_t = 40, bad_g = 1;
    size_t nq = (size_t)B * T * H * hd, nk = (size_t)B * T * Hk * hd, nl = (size_t)B * H * T;
    Rng rng(23);
    std::vector<uint16_t> x[4];  // q, k, v, dout
    size_t sizes[4] = {nq, nk, nk, nq};
    for (int i = 0; i < 4; i++)
        for (size_t e = 0; e < sizes[i]; e++) x[i].push_back(float_to_bf16((float)rng.normal()));
    x[1][attn_index(0, bad_t, bad_g, T, Hk, hd) + 3] = 0x7fc0;  // bf16 NaN
    AttnDev q_(nq * 2), k_(nk * 2), v_(nk * 2), dout_(nq * 2), out_(nq * 2), lse_(nl * 4), dq_(nq * 2), dk_(nk * 2),
        dv_(nk * 2);
    attn_upload(q_, x[0]); attn_upload(k_, x[1]); attn_upload(v_, x[2]); attn_upload(dout_, x[3]);
    for (const AttnDev* d : {&dq_, &dk_, &dv_}) cudaCheck(cudaMemset(d->p, 0, d == &dq_ ? nq * 2 : nk * 2));
    auto bf = [](const AttnDev& d) { return d.as<__nv_bfloat16>(); };
    attention_forward(Cuda{}, bf(out_), lse_.as<float>(), bf(q_), bf(k_), bf(v_), B, T, H, Hk, hd);
    attention_backward(Cuda{}, bf(dq_), bf(dk_), bf(dv_), bf(dout_), bf(q_), bf(k_), bf(v_), bf(out_),
                       lse_.as<float>(), B, T, H, Hk, hd);
    cudaCheck(cudaDeviceSynchronize());
    std::vector<float> dq = attn_widen(attn_download<uint16_t>(dq_, nq));
    size_t finite = 0;
    for (int t = bad_t; t < T; t++)
        for (int h = bad_g * (H / Hk); h < (bad_g + 1) * (H / Hk); h++)
            for (int i = 0; i < hd; i++) finite += std::isfinite(dq[attn_index(0, t, h, T, H, hd) + i]);
    CHECK_MSG(finite == 0, "%zu dq elements of the rows that see the NaN key are finite", finite);
}

// document_starts on the GPU against the CPU: rows longer than the block (several positions per thread),
// without any BOS, with BOS on chunk edges and in the first and last positions, and shorter than the block.
TEST(cuda_document_starts_match_cpu) {
    REQUIRE_GPU();
    for (int T : {1000, 300, 5}) {
        const int B = 3;
        std::vector<int32_t> tokens((size_t)B * T), want(tokens.size()), got(tokens.size());
        Rng rng(T);
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) {
                bool bos = b == 0 ? rng.uniform() < 0.02 : b == 1 ? false : (t % 4 == 3 || t == 0 || t == T - 1);
                tokens[(size_t)b * T + t] = bos ? BOS_ID : 2 + (int)(rng.uniform() * 100);
            }
        document_starts(Cpu<float>{}, want.data(), tokens.data(), B, T);
        AttnDev tok_(tokens.size() * 4), doc_(tokens.size() * 4);
        cudaCheck(cudaMemcpy(tok_.p, tokens.data(), tokens.size() * 4, cudaMemcpyHostToDevice));
        cudaCheck(cudaMemset(doc_.p, 0xff, tokens.size() * 4));
        document_starts(Cuda{}, doc_.as<int32_t>(), tok_.as<int32_t>(), B, T);
        cudaCheck(cudaDeviceSynchronize());
        got = attn_download<int32_t>(doc_, tokens.size());
        for (size_t n = 0; n < got.size(); n++)
            CHECK_MSG(got[n] == want[n], "T %d: row %zu position %zu starts at %d, want %d", T, n / T, n % T, got[n],
                      want[n]);
    }
}

// Changing q, k, v and dO at every position of a row's documents before a BOS at position 70 (inside key
// tile 1) changes no output at or after it: out, lse, dq, dk and dv of the later documents stay bit-identical.
TEST(cuda_attention_documents_do_not_see_each_other) {
    REQUIRE_GPU();
    const int B = 1, T = 150, H = 4, Hk = 2, hd = 32, cut = 70;
    size_t nq = (size_t)B * T * H * hd, nk = (size_t)B * T * Hk * hd, nl = (size_t)B * H * T;
    std::vector<int32_t> tokens(T, 9), docs(T);
    for (int t : {0, 20, cut, 71, 130}) tokens[t] = BOS_ID;
    document_starts(Cpu<float>{}, docs.data(), tokens.data(), B, T);
    AttnDev doc_(T * 4), q_(nq * 2), k_(nk * 2), v_(nk * 2), dout_(nq * 2), out_(nq * 2), lse_(nl * 4), dq_(nq * 2),
        dk_(nk * 2), dv_(nk * 2);
    cudaCheck(cudaMemcpy(doc_.p, docs.data(), T * 4, cudaMemcpyHostToDevice));
    auto bf = [](const AttnDev& d) { return d.as<__nv_bfloat16>(); };
    Rng rng(17);
    std::vector<uint16_t> x[4];  // q, k, v, dout
    size_t sizes[4] = {nq, nk, nk, nq};
    for (int i = 0; i < 4; i++)
        for (size_t e = 0; e < sizes[i]; e++) x[i].push_back(float_to_bf16((float)rng.normal()));
    std::vector<uint16_t> res[2][5];  // out, dq, dk, dv; lse as raw bits
    for (int run = 0; run < 2; run++) {
        if (run == 1)  // new values before the cut: rows of [T, nh, hd] up to position cut − 1
            for (int i = 0; i < 4; i++) {
                size_t per_pos = sizes[i] / T;
                for (size_t e = 0; e < cut * per_pos; e++) x[i][e] = float_to_bf16((float)rng.normal());
            }
        attn_upload(q_, x[0]); attn_upload(k_, x[1]); attn_upload(v_, x[2]); attn_upload(dout_, x[3]);
        cudaCheck(cudaMemset(dq_.p, 0, nq * 2));
        cudaCheck(cudaMemset(dk_.p, 0, nk * 2));
        cudaCheck(cudaMemset(dv_.p, 0, nk * 2));
        attention_forward(Cuda{}, bf(out_), lse_.as<float>(), bf(q_), bf(k_), bf(v_), B, T, H, Hk, hd,
                          doc_.as<int32_t>());
        attention_backward(Cuda{}, bf(dq_), bf(dk_), bf(dv_), bf(dout_), bf(q_), bf(k_), bf(v_), bf(out_),
                           lse_.as<float>(), B, T, H, Hk, hd, doc_.as<int32_t>());
        cudaCheck(cudaDeviceSynchronize());
        res[run][0] = attn_download<uint16_t>(out_, nq);
        res[run][1] = attn_download<uint16_t>(dq_, nq);
        res[run][2] = attn_download<uint16_t>(dk_, nk);
        res[run][3] = attn_download<uint16_t>(dv_, nk);
        res[run][4] = attn_download<uint16_t>(lse_, nl * 2);
    }
    const char* names[4] = {"out", "dq", "dk", "dv"};
    for (int i = 0; i < 4; i++) {
        size_t per_pos = res[0][i].size() / T;
        bool before_changed = false;
        for (size_t e = 0; e < res[0][i].size(); e++) {
            if (e < cut * per_pos) { before_changed |= res[0][i][e] != res[1][i][e]; continue; }
            CHECK_MSG(res[0][i][e] == res[1][i][e],
                      "%s at position %zu (after the BOS at %d) changed with the documents before it", names[i],
                      e / per_pos, cut);
        }
        CHECK_MSG(before_changed, "%s before position %d did not change with its inputs", names[i], cut);
    }
    for (int h = 0; h < H; h++)  // lse [B, H, T] as pairs of uint16
        for (int t = cut; t < T; t++)
            for (int half = 0; half < 2; half++)
                CHECK_MSG(res[0][4][((size_t)h * T + t) * 2 + half] == res[1][4][((size_t)h * T + t) * 2 + half],
                          "lse of head %d at position %d changed with the documents before it", h, t);
}

#endif  // PGOLF_CUDA
