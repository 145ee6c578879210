// Evaluation modes: byte accounting, exactly-once scoring, causality, document isolation, the
// lr = 0 identities, TTT legality, LoRA gradients, and (under mpirun) 2 ranks against 1.
#include <malloc.h>  // mallinfo2: what the LoRA state really allocates
#include "../tokenizer/spm_encode.h"

// A small model with every feature that reads the previous token (SmearGate, BigramHash) and XSA:
// document isolation and causality are tested where they could break.
static Config eval_test_config() {
    Config c;
    c.vocab_size = 48; c.num_layers = 2; c.model_dim = 32; c.num_heads = 4; c.num_kv_heads = 2; c.mlp_mult = 2.0f;
    c.smear = 1; c.bigram_vocab_size = 31; c.bigram_dim = 16; c.xsa_last_n = 1;
    c.train_seq_len = 32; c.train_batch_tokens = 64; c.grad_accum_steps = 1; c.val_batch_size = 128;
    c.eval_seq_len = 32; c.eval_stride = 8; c.eval_batch_seqs = 5;
    c.ttt_eval_seq_len = 24; c.ttt_chunk_size = 8; c.ttt_batch_size = 3; c.ttt_lora_rank = 4; c.ttt_lora_lr = 0.02f;
    c.ttt_lora_targets = "q,k,v,o,mlp_up,mlp_down,lm_head"; c.ttt_steps = 2;
    c.ttt_chunk_tokens = 64; c.ttt_epochs = 2; c.ttt_batch_seqs = 2; c.ttt_lr = 0.02f; c.ttt_optimizer = "sgd";
    c.phased_ttt_prefix_docs = 7; c.phased_ttt_num_phases = 2; c.global_ttt_chunk_tokens = 80;
    c.global_ttt_batch_seqs = 2; c.global_ttt_lr = 0.05f;
    return c;
}

// Random weights (not the init, whose zero projections would hide most of the model).
template <class D> static void eval_test_model(Model<D>& m, const Config& c, uint64_t seed = 7) {
    config_validate(c, 1);
    model_init_for_run(D{}, m, c);
    Rng rng(seed);
    randomize(m.params, m.nparams, rng, 0.3);
}
template <class D> static void eval_test_model_free(Model<D>& m) { model_free(D{}, m); }

// Documents of the given lengths (BOS included), bodies of random ids in [2, vocab); final_bos ends
// the stream with a lone BOS, so that every document's last target is a BOS.
static std::vector<uint16_t> eval_test_stream(const std::vector<int>& lens, int vocab, uint64_t seed,
                                              bool final_bos = false) {
    Rng rng(seed);
    std::vector<uint16_t> t;
    for (int len : lens) {
        t.push_back(BOS_ID);
        for (int i = 1; i < len; i++) t.push_back((uint16_t)(2 + rng.uniform() * (vocab - 2)));
    }
    if (final_bos) t.push_back(BOS_ID);
    return t;
}
// the last one is cut by the stream's end
static const std::vector<int> EVAL_DOC_LENS = {37, 1, 2, 90, 5, 1, 150, 3, 17, 64, 2, 41};

// A made-up byte table for the test vocabulary: ids 0–3 are boundaries (0 bytes), others v % 4
// bytes, every third one with a leading space.
static ByteLuts eval_test_luts(int vocab) {
    ByteLuts l;
    l.base_bytes.assign(vocab, 0); l.has_leading_space.assign(vocab, 0); l.is_boundary.assign(vocab, 0);
    for (int v = 0; v < vocab; v++) {
        l.is_boundary[v] = v < 4;
        if (v >= 4) { l.base_bytes[v] = (int16_t)(v % 4); l.has_leading_space[v] = v % 3 == 0; }
    }
    return l;
}
static EvalData eval_test_data(const std::vector<uint16_t>& t, int vocab) {
    EvalData d;
    d.val = t;
    d.luts = eval_test_luts(vocab);
    return d;
}

template <class D>
static EvalResult eval_run_mode(const std::string& mode, Model<D>& m, const EvalData& d, NllRecord& rec,
                                std::vector<EvalResult>* extra = nullptr) {
    rec.init(d.val.size() - 1);
    if (mode == "standard") return eval_standard(D{}, m, d, &rec);
    if (mode == "sliding") return eval_sliding(D{}, m, d, &rec);
    if (mode == "lora_ttt") return eval_lora_ttt(D{}, m, d, &rec, extra);
    if (mode == "full_ttt") return eval_full_ttt(D{}, m, d, &rec);
    if (mode == "phased_ttt") return eval_phased_ttt(D{}, m, d, &rec);
    throw TestFailure("unknown mode " + mode);
}

// The sums of a result, recomputed from its per-position record with the byte rule written out.
static void check_result_matches_record(const EvalResult& r, const NllRecord& rec, const EvalData& d,
                                        const char* what) {
    double loss = 0, n = 0, bytes = 0;
    for (size_t j = 0; j < rec.nll.size(); j++) {
        if (std::isnan(rec.nll[j])) continue;
        int prev = d.val[j], tgt = d.val[j + 1];
        loss += rec.nll[j]; n += 1;
        bytes += d.luts.base_bytes[tgt] + (d.luts.has_leading_space[tgt] && !d.luts.is_boundary[prev] ? 1 : 0);
    }
    CHECK_MSG(r.tokens == n, "%s: %.0f tokens counted, %.0f positions recorded", what, r.tokens, n);
    CHECK_MSG(std::fabs(r.val_loss - loss / n) <= 1e-9 * loss / n, "%s: val_loss %.12g vs %.12g from the record", what,
              r.val_loss, loss / n);
    double bpb = loss / M_LN2 / bytes;
    CHECK_MSG(std::fabs(r.val_bpb - bpb) <= 1e-9 * bpb, "%s: val_bpb %.12g vs %.12g from the record", what, r.val_bpb,
              bpb);
}
static size_t scored_count(const NllRecord& rec) {
    size_t n = 0;
    for (float v : rec.nll) n += !std::isnan(v);
    return n;
}
// NLLs equal up to the float rounding of values computed in double (1–2 ulps).
static bool nll_same(float a, float b) { return std::fabs(a - b) <= 2.5e-7 * std::fabs(a) + 1e-7; }
static void check_records_equal(const NllRecord& a, const NllRecord& b, size_t from, size_t to, const char* what) {
    for (size_t j = from; j < to; j++) {
        bool na = std::isnan(a.nll[j]), nb = std::isnan(b.nll[j]);
        CHECK_MSG(na == nb && (na || nll_same(a.nll[j], b.nll[j])), "%s: position %zu: %.9g vs %.9g", what, j, a.nll[j],
                  b.nll[j]);
    }
}

// ---------------------------------------------------------------------------------------------

TEST(eval_bytes_hand_example) {
    ByteLuts l = eval_test_luts(48);
    // ids: 1 = BOS (boundary), 9 = 1 byte + leading space, 10 = 2 bytes, 15 = 3 bytes + leading space
    ScoreSums s;
    s.add(0.5, 1, 15, l);   // after BOS the leading space is not counted: 3 bytes
    s.add(0.25, 10, 9, l);  // 1 + 1 (space) = 2 bytes
    s.add(1.0, 9, 1, l);    // BOS as a target: scored, 0 bytes
    s.add(0.75, 9, 10, l);  // 2 bytes
    CHECK(s.tokens == 4 && s.bytes == 7);
    CHECK_CLOSE(s.val_loss(), 2.5 / 4, 1e-15, 0);
    CHECK_CLOSE(s.val_bpb(), 2.5 / std::log(2.0) / 7, 1e-15, 0);
}

// Real tokenizer: the bytes of a BOS-delimited stream of ASCII documents are the documents' lengths.
TEST(eval_bytes_ascii_documents) {
    const char* path = "data/tokenizers/fineweb_1024_bpe.model";
    if (access(path, R_OK) != 0) SKIP("data/tokenizers/fineweb_1024_bpe.model not present");
    SpmModel sp = spm_load(path);
    ByteLuts l = spm_byte_luts(sp, 1024);
    SpmEncoder enc = spm_encoder_build(sp);
    SpmScratch scratch;
    // a tab or newline becomes one space (1 byte); the normalizer collapses the double space
    struct Doc { const char* text; size_t bytes; };
    const Doc docs[] = {{"The quick brown fox jumps over the lazy dog.", 44}, {"x", 1},
                        {"It was 42 degrees in  Oslo, said Ms. O'Neil -- twice!", 52},
                        {"Tabs\tand\nnewlines count: one byte each.", 39}};
    std::vector<int> t;
    size_t want = 0;
    for (const Doc& doc : docs) {
        t.push_back(BOS_ID);
        std::vector<int> ids;
        spm_encode(enc, doc.text, strlen(doc.text), &ids, &scratch);
        t.insert(t.end(), ids.begin(), ids.end());
        want += doc.bytes;
    }
    ScoreSums s;
    for (size_t j = 0; j + 1 < t.size(); j++) s.add(0.0, t[j], t[j + 1], l);
    CHECK_MSG(s.bytes == (double)want, "byte count %.0f, the documents hold %zu bytes", s.bytes, want);
    CHECK(s.tokens == (double)(t.size() - 1));
}

// Every position 1..N−1 scored once, in every mode: short documents, BOS targets, the last partial
// window and chunk; a stream whose first token is not BOS, and one that ends with a lone BOS.
TEST(eval_every_position_scored_once) {
    Config c = eval_test_config();
    Model<Cpu<float>> m;
    eval_test_model(m, c);
    std::vector<uint16_t> plain = eval_test_stream(EVAL_DOC_LENS, c.vocab_size, 11);
    std::vector<uint16_t> odd = eval_test_stream({20, 1, 45, 3}, c.vocab_size, 12, true);
    odd.insert(odd.begin(), {7, 9, 30});  // a prefix before the first BOS
    const char* modes[] = {"standard", "sliding", "lora_ttt", "full_ttt", "phased_ttt"};
    for (const std::vector<uint16_t>* t : {&plain, &odd}) {
        EvalData d = eval_test_data(*t, c.vocab_size);
        size_t N = t->size();
        // partial last window and chunk
        if (t == &plain) CHECK((N - 1) % c.eval_stride != 0 && (N - 1) % c.ttt_chunk_tokens != 0);
        for (const char* mode : modes) {
            NllRecord rec;
            EvalResult r = eval_run_mode(mode, m, d, rec);
            CHECK_MSG(scored_count(rec) == N - 1 && r.tokens == N - 1,
                      "%s: %zu positions recorded, %.0f counted, want %zu", mode, scored_count(rec), r.tokens, N - 1);
            check_result_matches_record(r, rec, d, mode);
        }
        // the multi-epoch loop, and the reference's rule for the last window of a document
        m.cfg.ttt_n_epochs = 2; m.cfg.ttt_report_final_epoch = 1;
        NllRecord rec;
        std::vector<EvalResult> extra;
        EvalResult r = eval_run_mode("lora_ttt", m, d, rec, &extra);
        CHECK(scored_count(rec) == N - 1 && r.tokens == N - 1 && extra.size() == 1 && extra[0].tokens == N - 1);
        m.cfg = c;
    }
    eval_test_model_free(m);
}

// The reference window set scores the tail again: with S | T the extra count is L − S, and for
// T = 100, L = 32, S = 8 it is 20 (positions 92..95 four times, 96..99 three times).
TEST(eval_sliding_reference_overcount) {
    Config c = eval_test_config();
    c.sliding = "reference";
    Model<Cpu<float>> m;
    eval_test_model(m, c);
    for (long T : {96L, 100L}) {
        std::vector<uint16_t> t = eval_test_stream({60, 5, 40}, c.vocab_size, 13);
        t.resize(T + 1);
        EvalData d = eval_test_data(t, c.vocab_size);
        NllRecord rec;
        EvalResult r = eval_run_mode("sliding", m, d, rec);
        double want = T == 96 ? 96 + (32 - 8) : 120;
        CHECK_MSG(r.tokens == want, "T=%ld: %.0f scored, want %.0f", T, r.tokens, want);
        CHECK(scored_count(rec) == (size_t)T);
        m.cfg.sliding = "exact";
        NllRecord ex;
        CHECK(eval_run_mode("sliding", m, d, ex).tokens == T);
        // below 88 both rules score each position in the same window; above, the record holds the
        // reference's last (shorter-context) window
        check_records_equal(rec, ex, 0, 88, "reference vs exact windows");
        m.cfg.sliding = "reference";
    }
    eval_test_model_free(m);
}

// Changing the tokens after position P leaves every NLL of positions ≤ P−1 (targets ≤ P) unchanged.
TEST(eval_causality_every_mode) {
    Config c = eval_test_config();
    Model<Cpu<double>> m;
    eval_test_model(m, c);
    std::vector<uint16_t> t = eval_test_stream(EVAL_DOC_LENS, c.vocab_size, 21);
    struct Variant { const char* mode; void (*set)(Config&); };
    Variant variants[] = {
        {"standard", [](Config&) {}},
        {"sliding", [](Config&) {}},
        {"sliding", [](Config& k) { k.sliding = "reference"; }},
        {"lora_ttt", [](Config&) {}},
        {"lora_ttt",
         [](Config& k) {
             k.ttt_n_epochs = 2;
             k.ttt_report_final_epoch = 1;
             k.ttt_lora_schedule = "cosine_epochs";
         }},
        {"lora_ttt",
         [](Config& k) {
             k.ttt_lora_optimizer = "sgd";
             k.ttt_lora_lr = 0.5f;
             k.ttt_steps = 1;
         }},
        {"full_ttt", [](Config&) {}},
        {"full_ttt",
         [](Config& k) {
             k.ttt_optimizer = "adamw";
             k.ttt_lr = 0.01f;
             k.ttt_freeze_blocks = 1;
             k.ttt_wd = 0.1f;
         }},
        // phases make a score depend on the documents scored before it in the length-sorted queue, which
        // may come later in the stream: eval_phased_ttt_queue_causality covers them
        {"phased_ttt", [](Config& k) { k.phased_ttt_prefix_docs = 0; }},
    };
    Rng rng(5);
    for (long P : {40L, 131L, 300L}) {
        std::vector<uint16_t> u = t;
        for (size_t j = P + 1; j < u.size(); j++)
            u[j] = rng.uniform() < 0.05 ? BOS_ID : (uint16_t)(2 + rng.uniform() * (c.vocab_size - 2));
        EvalData d0 = eval_test_data(t, c.vocab_size), d1 = eval_test_data(u, c.vocab_size);
        for (const Variant& v : variants) {
            m.cfg = c; v.set(m.cfg);
            NllRecord a, b;
            eval_run_mode(v.mode, m, d0, a);
            eval_run_mode(v.mode, m, d1, b);
            std::string what = std::string(v.mode) + " P=" + std::to_string(P);
            check_records_equal(a, b, 0, P, what.c_str());
            size_t changed = 0;  // sanity: the perturbation does reach the later positions
            for (size_t j = P + 1; j < a.nll.size(); j++) changed += !nll_same(a.nll[j], b.nll[j]);
            CHECK_MSG(changed > 0, "%s: no NLL after P changed", what.c_str());
        }
    }
    eval_test_model_free(m);
}

// Document boundaries found independently of the code under test: [start, start + pred].
static std::vector<std::pair<long, long>> test_documents(const std::vector<uint16_t>& t) {
    std::vector<std::pair<long, long>> docs;
    for (long i = 0; i < (long)t.size(); i++)
        if (t[i] == BOS_ID || i == 0) docs.push_back({i, 0});
    for (size_t k = 0; k < docs.size(); k++)
        docs[k].second = (k + 1 < docs.size() ? docs[k + 1].first : (long)t.size() - 1) - docs[k].first;
    return docs;
}
// Per document, its NLLs in order.
static std::vector<std::vector<float>> per_document(const std::vector<uint16_t>& t, const NllRecord& rec) {
    std::vector<std::vector<float>> out;
    for (auto& dd : test_documents(t))
        out.emplace_back(rec.nll.begin() + dd.first, rec.nll.begin() + dd.first + dd.second);
    return out;
}
static void check_docs_equal(const std::vector<float>& a, const std::vector<float>& b, const char* what, size_t doc) {
    CHECK_MSG(a.size() == b.size(), "%s: document %zu has %zu vs %zu positions", what, doc, a.size(), b.size());
    for (size_t i = 0; i < a.size(); i++)
        CHECK_MSG(nll_same(a[i], b[i]), "%s: document %zu position %zu: %.9g vs %.9g", what, doc, i, a[i], b[i]);
}

// LoRA TTT: a document's NLLs depend on that document only — not on other documents' tokens, not on
// the order of documents in the stream, not on the batch size.
TEST(eval_lora_document_isolation) {
    Config c = eval_test_config();
    Model<Cpu<double>> m;
    eval_test_model(m, c);
    std::vector<int> lens = EVAL_DOC_LENS;
    std::vector<uint16_t> t = eval_test_stream(lens, c.vocab_size, 31, true);  // every document ends with a BOS target
    EvalData d = eval_test_data(t, c.vocab_size);
    NllRecord base;
    eval_run_mode("lora_ttt", m, d, base);
    std::vector<std::vector<float>> A = per_document(t, base);
    // 1. change document 6's body (same length), then replace document 3 by a longer one
    std::vector<uint16_t> u = t;
    auto docs = test_documents(t);
    Rng rng(9);
    for (long j = docs[6].first + 1; j < docs[6].first + docs[6].second; j++)
        u[j] = (uint16_t)(2 + rng.uniform() * (c.vocab_size - 2));
    NllRecord r1;
    eval_run_mode("lora_ttt", m, eval_test_data(u, c.vocab_size), r1);
    std::vector<std::vector<float>> B = per_document(u, r1);
    for (size_t k = 0; k < A.size(); k++) if (k != 6) check_docs_equal(A[k], B[k], "other document changed", k);
    bool differs = false;
    for (size_t i = 0; i < A[6].size(); i++) differs |= !nll_same(A[6][i], B[6][i]);
    CHECK(differs);
    std::vector<uint16_t> w(t.begin(), t.begin() + docs[3].first);
    std::vector<uint16_t> longer = eval_test_stream({130}, c.vocab_size, 77);
    w.insert(w.end(), longer.begin(), longer.end());
    w.insert(w.end(), t.begin() + docs[4].first, t.end());
    NllRecord r2;
    eval_run_mode("lora_ttt", m, eval_test_data(w, c.vocab_size), r2);
    std::vector<std::vector<float>> C = per_document(w, r2);
    for (size_t k = 0; k < A.size(); k++) if (k != 3) check_docs_equal(A[k], C[k], "document 3 grew", k);
    // 2. documents in another order
    std::vector<size_t> perm = {9, 2, 11, 0, 6, 4, 1, 10, 3, 8, 5, 7};
    std::vector<uint16_t> p;
    for (size_t k : perm) p.insert(p.end(), t.begin() + docs[k].first, t.begin() + docs[k].first + docs[k].second);
    p.push_back(BOS_ID);
    NllRecord r3;
    eval_run_mode("lora_ttt", m, eval_test_data(p, c.vocab_size), r3);
    std::vector<std::vector<float>> P = per_document(p, r3);
    for (size_t i = 0; i < perm.size(); i++) check_docs_equal(A[perm[i]], P[i], "permuted", perm[i]);
    // 3. batch size 1 and 5 instead of 3
    for (int bs : {1, 5}) {
        m.cfg.ttt_batch_size = bs;
        NllRecord r4;
        eval_run_mode("lora_ttt", m, d, r4);
        check_records_equal(base, r4, 0, t.size() - 1, "batch size");
    }
    eval_test_model_free(m);
}

TEST(eval_sliding_full_stride_equals_standard) {
    Config c = eval_test_config();
    c.eval_stride = c.eval_seq_len;
    Model<Cpu<double>> m;
    eval_test_model(m, c);
    EvalData d = eval_test_data(eval_test_stream(EVAL_DOC_LENS, c.vocab_size, 41), c.vocab_size);
    NllRecord a, b;
    EvalResult ra = eval_run_mode("standard", m, d, a), rb = eval_run_mode("sliding", m, d, b);
    check_records_equal(a, b, 0, d.val.size() - 1, "sliding S=L vs standard");
    CHECK_CLOSE(rb.val_bpb, ra.val_bpb, 1e-7, 0);
    eval_test_model_free(m);
}

// Each document's chunk windows through the base model, one forward per window, written from the spec.
template <class D> static NllRecord per_document_base_eval(Model<D>& m, const EvalData& d) {
    const Config& c = m.cfg;
    NllRecord rec;
    rec.init(d.val.size() - 1);
    int C = c.ttt_chunk_size, L = c.ttt_eval_seq_len;
    for (auto& dd : test_documents(d.val))
        for (long c0 = 0; c0 < dd.second; c0 += C) {
            long e = std::min(c0 + C, dd.second), ws = std::max(0L, e - L);
            std::vector<int32_t> x, y;
            for (long j = dd.first + ws; j < dd.first + e; j++) { x.push_back(d.val[j]); y.push_back(d.val[j + 1]); }
            std::vector<float> nll;
            forward_nll(D{}, m, x, y, 1, (int)x.size(), nll);
            for (long j = c0; j < e; j++) rec.set(dd.first + j, nll[j - ws]);
        }
    return rec;
}

// lr = 0: the adapters never move (B stays 0), so LoRA TTT is the document-isolated base model;
// a deadline that has already passed gives the same numbers through the fallback.
TEST(eval_lora_lr0_and_deadline_equal_per_document_base) {
    Config c = eval_test_config();
    Model<Cpu<double>> m;
    eval_test_model(m, c);
    std::vector<uint16_t> t = eval_test_stream(EVAL_DOC_LENS, c.vocab_size, 51);
    t.insert(t.begin(), {5, 6});  // and a leading prefix document
    EvalData d = eval_test_data(t, c.vocab_size);
    NllRecord want = per_document_base_eval(m, d);
    CHECK(scored_count(want) == t.size() - 1);
    struct Variant { const char* name; void (*set)(Config&); };
    Variant variants[] = {
        {"adam lr 0", [](Config& k) { k.ttt_lora_lr = 0; }},
        {"adamw lr 0, 3 epochs",
         [](Config& k) {
             k.ttt_lora_lr = 0;
             k.ttt_lora_optimizer = "adamw";
             k.ttt_lora_wd = 0.5f;
             k.ttt_n_epochs = 3;
             k.ttt_report_final_epoch = 1;
         }},
        {"sgd lr 0",
         [](Config& k) {
             k.ttt_lora_lr = 0;
             k.ttt_lora_optimizer = "sgd";
         }},
        {"deadline passed", [](Config& k) { k.eval_max_wallclock_seconds = 1e-9; }},
    };
    for (const Variant& v : variants) {
        m.cfg = c; v.set(m.cfg);
        NllRecord got;
        std::vector<EvalResult> extra;
        eval_run_mode("lora_ttt", m, d, got, &extra);
        check_records_equal(want, got, 0, t.size() - 1, v.name);
        for (const EvalResult& e : extra) CHECK(e.tokens == t.size() - 1);
    }
    // with lr > 0 the adaptation does change the scores
    m.cfg = c;
    NllRecord got;
    eval_run_mode("lora_ttt", m, d, got);
    size_t changed = 0;
    for (size_t j = 0; j < got.nll.size(); j++) changed += !nll_same(got.nll[j], want.nll[j]);
    CHECK(changed > 0);
    eval_test_model_free(m);
}

// lr = 0: full-model TTT is sliding; with lr > 0 it differs, and the loaded weights come back after.
TEST(eval_full_ttt_lr0_equals_sliding_and_restores_weights) {
    Config c = eval_test_config();
    Model<Cpu<double>> m;
    eval_test_model(m, c);
    EvalData d = eval_test_data(eval_test_stream(EVAL_DOC_LENS, c.vocab_size, 61), c.vocab_size);
    NllRecord s;
    EvalResult rs = eval_run_mode("sliding", m, d, s);
    std::vector<double> before(m.params, m.params + m.nparams);
    for (const char* opt : {"sgd", "adamw"}) {
        m.cfg = c; m.cfg.ttt_optimizer = opt; m.cfg.ttt_lr = 0; m.cfg.ttt_wd = 0.3f;
        NllRecord f;
        eval_run_mode("full_ttt", m, d, f);
        check_records_equal(s, f, 0, d.val.size() - 1, opt);
        m.cfg.ttt_lr = 0.05f;
        EvalResult r = eval_run_mode("full_ttt", m, d, f);
        CHECK_MSG(std::fabs(r.val_bpb - rs.val_bpb) > 1e-6, "%s: lr > 0 left val_bpb at %.9g", opt, r.val_bpb);
        CHECK(memcmp(before.data(), m.params, m.nparams * sizeof(double)) == 0);
        m.cfg = c;
        NllRecord s2;
        eval_run_mode("sliding", m, d, s2);
        check_records_equal(s, s2, 0, d.val.size() - 1, "sliding after full_ttt");
    }
    eval_test_model_free(m);
}

// Every TTT step trains only on positions that were already scored; single-epoch LoRA never trains on
// a document's last chunk, full-model TTT never on the last chunk of the stream.
static NllRecord* g_legal_rec = nullptr;
static long g_legal_steps = 0, g_legal_bad = -1;
static const char* g_legal_why = "";
static std::vector<char>* g_legal_forbidden = nullptr;
static void legal_hook(const std::vector<long>& pos) {
    g_legal_steps++;
    for (long j : pos) {
        bool unscored = std::isnan(g_legal_rec->nll[j]);
        bool forbidden = g_legal_forbidden && (*g_legal_forbidden)[j];
        if ((unscored || forbidden) && g_legal_bad < 0) {
            g_legal_bad = j;
            g_legal_why = unscored ? "not scored yet" : "scored, but in a last chunk, which is never trained on";
        }
    }
}
TEST(eval_ttt_trains_only_on_scored_positions) {
    Config c = eval_test_config();
    c.ttt_chunk_tokens = 72;  // the last chunk (from 360) holds a whole sequence that must not be trained on
    Model<Cpu<float>> m;
    eval_test_model(m, c);
    std::vector<uint16_t> t = eval_test_stream(EVAL_DOC_LENS, c.vocab_size, 71);
    EvalData d = eval_test_data(t, c.vocab_size);
    long T = (long)t.size() - 1;
    std::vector<char> last_chunks(T, 0), last_stream_chunk(T, 0);
    for (auto& dd : test_documents(t))
        for (long j = (dd.second - 1) / c.ttt_chunk_size * c.ttt_chunk_size; j < dd.second; j++)
            last_chunks[dd.first + j] = 1;
    for (long j = (T - 1) / c.ttt_chunk_tokens * c.ttt_chunk_tokens; j < T; j++) last_stream_chunk[j] = 1;
    struct Variant { const char* mode; void (*set)(Config&); std::vector<char>* forbidden; };
    Variant variants[] = {
        {"lora_ttt", [](Config&) {}, &last_chunks},
        {"lora_ttt",
         [](Config& k) {
             k.ttt_n_epochs = 3;
             k.ttt_report_final_epoch = 1;
         },
         nullptr},
        {"full_ttt", [](Config&) {}, &last_stream_chunk},
        {"full_ttt",
         [](Config& k) {
             k.sliding = "reference";
             k.ttt_chunk_tokens = 48;
             k.ttt_batch_seqs = 1;
         },
         nullptr},
        {"phased_ttt", [](Config&) {}, nullptr},
        {"phased_ttt",
         [](Config& k) {
             k.phased_ttt_num_phases = 3;
             k.ttt_warm_start_a = 1;
             k.global_ttt_epochs = 2;
         },
         nullptr},
    };
    for (const Variant& v : variants) {
        m.cfg = c; v.set(m.cfg);
        NllRecord rec;
        rec.init(T);
        g_legal_rec = &rec; g_legal_steps = 0; g_legal_bad = -1; g_legal_forbidden = v.forbidden;
        g_ttt_step_hook = legal_hook;
        try {
            if (!strcmp(v.mode, "lora_ttt")) eval_lora_ttt(Cpu<float>{}, m, d, &rec);
            else if (!strcmp(v.mode, "phased_ttt")) eval_phased_ttt(Cpu<float>{}, m, d, &rec);
            else eval_full_ttt(Cpu<float>{}, m, d, &rec);
        } catch (...) { g_ttt_step_hook = nullptr; throw; }
        g_ttt_step_hook = nullptr;
        CHECK_MSG(g_legal_steps > 0, "%s: no training step observed", v.mode);
        CHECK_MSG(g_legal_bad < 0, "%s: a step trained on position %ld (%s)", v.mode, g_legal_bad, g_legal_why);
    }
    eval_test_model_free(m);
}

// PR #467's loop: the reported score is the first exposure (= one epoch, whatever the later epochs
// do); the final epoch's, trained on the same tokens, is reported apart and labelled.
TEST(eval_lora_multi_epoch_reports_first_exposure) {
    Config c = eval_test_config();
    Model<Cpu<float>> m;
    eval_test_model(m, c);
    EvalData d = eval_test_data(eval_test_stream(EVAL_DOC_LENS, c.vocab_size, 81), c.vocab_size);
    NllRecord one, three;
    EvalResult r1 = eval_run_mode("lora_ttt", m, d, one);
    m.cfg.ttt_n_epochs = 3; m.cfg.ttt_report_final_epoch = 1; m.cfg.ttt_lora_schedule = "cosine_epochs";
    std::vector<EvalResult> extra;
    EvalResult r3 = eval_run_mode("lora_ttt", m, d, three, &extra);
    check_records_equal(one, three, 0, d.val.size() - 1, "epoch 0 of 3 vs 1 epoch");
    CHECK_CLOSE(r3.val_bpb, r1.val_bpb, 1e-9, 0);
    CHECK(r3.note.empty());
    CHECK(extra.size() == 1 && extra[0].mode == "lora_ttt_final_epoch");
    CHECK(extra[0].note.find("not competition-legal") != std::string::npos);
    CHECK_MSG(extra[0].val_loss < r3.val_loss, "final epoch %.6f vs first exposure %.6f", extra[0].val_loss,
              r3.val_loss);
    eval_test_model_free(m);
}

// dA, dB of every target against finite differences, base weights frozen (no parameter gradient).
static void lora_gradcheck(int variant) {
    Config c = gradcheck_config(variant);
    c.ttt_lora_targets = "q,k,v,o,mlp_up,mlp_down,lm_head,attn_out,mlp"; c.ttt_lora_rank = 3;
    c.ttt_lora_alpha = 6.0f;  // scale 2
    config_validate(c, 1);
    int B = 2, T = 7;
    Cpu<double> dev;
    Model<Cpu<double>> m;
    model_init(dev, m, c, B, T);
    Rng rng(4321 + variant);
    randomize(m.params, m.nparams, rng, 0.3);
    Lora<Cpu<double>> lo;
    lora_alloc(dev, lo, c, B, (size_t)B * T);
    randomize(lo.params, lo.nparams, rng, 0.3);  // B ≠ 0, so dA is not identically zero
    for (int n = 0; n < B * T; n++) {
        m.acts.inputs[n] = (int32_t)(rng.uniform() * c.vocab_size);
        m.acts.targets[n] = (int32_t)(rng.uniform() * c.vocab_size);
        m.acts.loss_weights[n] = (float)(0.5 + rng.uniform());
    }
    auto loss = [&]() {
        gpt_forward(dev, m, B, T, true, &lo);
        double L = 0;
        for (int n = 0; n < B * T; n++) L += m.acts.loss_weights[n] * m.acts.losses[n];
        return L;
    };
    memset(m.grads, 0, m.nparams * sizeof(double));
    memset(lo.grads, 0, lo.nparams * sizeof(double));
    loss();
    gpt_backward(dev, m, B, T, &lo, /*param_grads=*/false);
    for (size_t i = 0; i < m.nparams; i++) CHECK_MSG(m.grads[i] == 0, "frozen base weight %zu got a gradient", i);
    const double h = 1e-5;
    for (int t = 0; t < LORA_NUM; t++)
        for (size_t l = 0; l < lo.A[t].size(); l++)
            for (int which = 0; which < 2; which++) {
                double* p = which ? lo.B[t][l] : lo.A[t][l];
                size_t n = (size_t)B * lo.rank * (which ? lo.out_dim[t] : lo.in_dim[t]);
                double num = 0, den = 0;
                for (int k = 0; k < 24; k++) {
                    size_t i = (size_t)(rng.uniform() * n);
                    double orig = p[i];
                    p[i] = orig + h; double lp = loss();
                    p[i] = orig - h; double lm = loss();
                    p[i] = orig;
                    double fd = (lp - lm) / (2 * h), an = (which ? lo.dB[t][l] : lo.dA[t][l])[i];
                    num += (fd - an) * (fd - an); den += std::max(fd * fd, an * an);
                }
                double rel = std::sqrt(num / std::max(den, 1e-300));
                CHECK_MSG(den > 0, "%s layer %zu d%s: zero on every sampled element", LORA_TARGET_NAMES[t], l,
                          which ? "B" : "A");
                CHECK_MSG(rel < 1e-6, "%s layer %zu d%s: relative error %.3g vs finite differences",
                          LORA_TARGET_NAMES[t], l, which ? "B" : "A", rel);
            }
    lora_free(dev, lo);
    eval_test_model_free(m);
}
TEST(eval_lora_gradcheck_every_target) { lora_gradcheck(0); lora_gradcheck(1); }

// Under `mpirun -np 2` (tests/test_eval_mpi.sh): every mode on 2 ranks equals the same mode run on
// one rank in the same process. All collectives run before any check, so a failure cannot hang.
TEST(eval_mpi_two_ranks_match_one_rank) {
    const char* ws = getenv("OMPI_COMM_WORLD_SIZE");
    if (!ws || atoi(ws) != 2) SKIP("needs 2 MPI ranks: tests/test_eval_mpi.sh runs it under mpirun -np 2");
#ifndef PGOLF_MPI
    SKIP("this test binary was built without MPI (-DPGOLF_MPI)");
#else
    distributed_init(nullptr, nullptr);
    Config c = eval_test_config();
    Model<Cpu<double>> m;
    eval_test_model(m, c);
    EvalData d = eval_test_data(eval_test_stream(EVAL_DOC_LENS, c.vocab_size, 91), c.vocab_size);
    struct Variant { const char* name; const char* mode; void (*set)(Config&); };
    Variant variants[] = {
        {"standard", "standard", [](Config&) {}},
        {"sliding", "sliding", [](Config&) {}},
        {"sliding reference", "sliding", [](Config& k) { k.sliding = "reference"; }},
        {"lora_ttt", "lora_ttt", [](Config&) {}},
        {"lora_ttt 2 epochs", "lora_ttt",
         [](Config& k) {
             k.ttt_n_epochs = 2;
             k.ttt_report_final_epoch = 1;
             k.ttt_batch_size = 2;
         }},
        // the final-epoch score depends on the batch (as in PR #467, documents whose chunks ran out
        // still take momentum-only steps until the epoch ends): compare it one document per batch
        {"lora_ttt 2 epochs, batch 1", "lora_ttt",
         [](Config& k) {
             k.ttt_n_epochs = 2;
             k.ttt_report_final_epoch = 1;
             k.ttt_batch_size = 1;
         }},
        {"full_ttt sgd", "full_ttt", [](Config&) {}},
        // one sequence per chunk: rank 1 never holds one and must still join every all-reduce
        {"full_ttt adamw, 1 seq per chunk", "full_ttt",
         [](Config& k) {
             k.ttt_optimizer = "adamw";
             k.ttt_chunk_tokens = 40;
             k.ttt_freeze_blocks = 1;
         }},
    };
    struct Outcome {
        std::string name;
        EvalResult one, two;
        std::vector<EvalResult> extra1, extra2;
        NllRecord rec1;
        std::vector<double> sum2, count2;
    };
    std::vector<Outcome> out;
    for (const Variant& v : variants) {
        Outcome o;
        o.name = v.name;
        m.cfg = c; v.set(m.cfg);
        int world = g_world, rank = g_rank;
        g_world = 1; g_rank = 0;  // one rank: nothing is split, nothing reduced
        o.one = eval_run_mode(v.mode, m, d, o.rec1, &o.extra1);
        g_world = world; g_rank = rank;
        NllRecord rec2;
        o.two = eval_run_mode(v.mode, m, d, rec2, &o.extra2);
        for (float x : rec2.nll) { o.sum2.push_back(std::isnan(x) ? 0.0 : x); o.count2.push_back(!std::isnan(x)); }
        host_allreduce_sum(o.sum2.data(), (int)o.sum2.size());
        host_allreduce_sum(o.count2.data(), (int)o.count2.size());
        out.push_back(o);
    }
    int world = g_world;
    distributed_finish();
    g_world = 1; g_rank = 0;
    eval_test_model_free(m);
    CHECK_MSG(world == 2, "world size %d under mpirun -np 2", world);
    for (const Outcome& o : out) {
        const char* n = o.name.c_str();
        CHECK_MSG(o.two.tokens == o.one.tokens, "%s: %.0f tokens on 2 ranks, %.0f on 1", n, o.two.tokens, o.one.tokens);
        CHECK_MSG(std::fabs(o.two.val_bpb - o.one.val_bpb) <= 1e-10 * o.one.val_bpb,
                  "%s: val_bpb %.15g on 2 ranks, %.15g on 1", n, o.two.val_bpb, o.one.val_bpb);
        CHECK_MSG(std::fabs(o.two.val_loss - o.one.val_loss) <= 1e-10 * o.one.val_loss, "%s: val_loss differs", n);
        CHECK_MSG(o.extra1.size() == o.extra2.size(), "%s: extra results differ", n);
        if (o.name == "lora_ttt 2 epochs") CHECK(o.extra2.size() == 1 && o.extra2[0].tokens == o.one.tokens);
        else for (size_t i = 0; i < o.extra1.size(); i++)
                CHECK_MSG(std::fabs(o.extra2[i].val_bpb - o.extra1[i].val_bpb) <= 1e-10 * o.extra1[i].val_bpb,
                          "%s: %s differs", n, o.extra1[i].mode.c_str());
        if (o.name == "sliding reference") continue;  // overlapping windows may sit on both ranks
        for (size_t j = 0; j < o.sum2.size(); j++) {
            CHECK_MSG(o.count2[j] == 1, "%s: position %zu scored by %.0f ranks", n, j, o.count2[j]);
            CHECK_MSG(nll_same((float)o.sum2[j], o.rec1.nll[j]), "%s: position %zu: %.9g on 2 ranks, %.9g on 1", n, j,
                      o.sum2[j], o.rec1.nll[j]);
        }
    }
#endif
}

// The evaluation's own device memory, which the GPU memory plan adds to training's (issue: PR #600's LoRA
// TTT state, ~14 GiB, was outside the plan, so a run that could not evaluate failed only after training).
// Counted here independently from the adapters' shapes: per layer, A blocks [rank, in] and B blocks
// [out, rank] for each target, the head's once; docs adapters each; fp32 master, grads, Adam m and v,
// a bf16 compute copy, A's fp32 reset image, and a bf16 [docs·window, rank] tmp per block plus one.
TEST(eval_memory_counts_ttt_state) {
    Config c; preset_pr600(c);
    c.eval_mode = "sliding,lora_ttt";
    config_validate(c, 8);
    long tokens; int T;
    activation_capacity(c, 8, &tokens, &T);
    int B = (int)((tokens + T - 1) / T);
    size_t nparams = param_arena_size(build_param_table(c));
    EvalMemory e = eval_memory(c, B, T, nparams, 4, 2, 2);
    CHECK(!strcmp(e.mode, "lora_ttt") && strstr(e.settings, "TTT_BATCH_SIZE"));
    size_t docs = std::min<long>(c.ttt_batch_size, (long)B * T / c.ttt_eval_seq_len), r = c.ttt_lora_rank,
           L = c.num_layers;
    size_t Dm = c.model_dim, KV = c.kv_dim(), F = c.mlp_hidden(), V = c.vocab_size;
    size_t nA = docs * r * (L * (5 * Dm + F) + Dm);                       // in: q k v o up = Dm, down = F; head Dm
    // out: q o down = Dm, k v = KV, up = F; head V
    size_t nB = docs * r * (L * (Dm + KV + KV + Dm + F + Dm) + V);
    size_t blocks = 6 * L + 1, tmp = docs * c.ttt_eval_seq_len * r;
    size_t want = (nA + nB) * (4 + 4 + 4 + 4 + 2) + nA * 4 + (blocks + 1) * tmp * 2;
    CHECK_MSG(e.bytes == want, "lora_ttt state %zu bytes, counted %zu", e.bytes, want);
    CHECK_MSG(e.bytes > (14ul << 30) && e.bytes < (15ul << 30), "pr600's LoRA TTT state is %.2f GiB",
              e.bytes / 1073741824.0);
    c.ttt_lora_optimizer = "sgd";  // one moment
    CHECK(eval_memory(c, B, T, nparams, 4, 2, 2).bytes == want - (nA + nB) * 4);
    c.eval_mode = "full_ttt";  // saved weights and the moments: 2 with SGD, 3 with AdamW
    c.ttt_optimizer = "sgd";
    CHECK(eval_memory(c, B, T, nparams, 4, 2, 2).bytes == 2 * nparams * 4);
    c.ttt_optimizer = "adamw";
    e = eval_memory(c, B, T, nparams, 4, 2, 2);
    CHECK(e.bytes == 3 * nparams * 4 && !strcmp(e.mode, "full_ttt"));
    c.eval_mode = "standard,sliding";
    CHECK(eval_memory(c, B, T, nparams, 4, 2, 2).bytes == 0);
}

// The count is what lora_state_init really allocates: the heap grows by it on the CPU path (fp32
// everywhere, the compute copy is the master: 0 bytes), to within the allocator's rounding (a page per
// mmap-served block, six blocks).
TEST(eval_memory_matches_lora_allocations) {
    Config c = eval_test_config();
    c.ttt_lora_rank = 16; c.ttt_batch_size = 8; c.ttt_eval_seq_len = 32;
    for (const char* opt : {"adam", "sgd"}) {
        c.ttt_lora_optimizer = opt;
        int docs = 8;
        size_t want = lora_state_bytes(c, docs, (size_t)docs * c.ttt_eval_seq_len, 4, 0, 4);
        struct mallinfo2 before = mallinfo2();
        LoraState<Cpu<float>> st;
        lora_state_init(Cpu<float>{}, st, c, docs, (size_t)docs * c.ttt_eval_seq_len);
        struct mallinfo2 after = mallinfo2();
        size_t got = (after.uordblks + after.hblkhd) - (before.uordblks + before.hblkhd);
        lora_state_free(Cpu<float>{}, st);
        CHECK_MSG(got >= want && got <= want + 8 * 4096,
                  "%s: lora_state_init allocated %zu bytes, lora_state_bytes says %zu", opt, got, want);
    }
}

// --- CaseOps byte sidecar -------------------------------------------------------------------------

// A sidecar as ./tokenize shard --transform caseops writes it: header [3] kind, [4..5] fnv1a64 of `tokens`.
static void write_sidecar_file(const std::string& path, const std::vector<uint16_t>& tokens,
                               const std::vector<uint16_t>& b, bool with_checksum = true) {
    int32_t header[256] = {SHARD_MAGIC, SHARD_VERSION, (int32_t)b.size()};
    if (with_checksum) {
        uint64_t h = fnv1a64(tokens.data(), 2 * tokens.size());
        header[3] = (int32_t)SIDECAR_KIND; header[4] = (int32_t)(uint32_t)h; header[5] = (int32_t)(uint32_t)(h >> 32);
    }
    std::vector<uint8_t> buf(sizeof header + 2 * b.size());
    memcpy(buf.data(), header, sizeof header);
    memcpy(buf.data() + sizeof header, b.data(), 2 * b.size());
    write_file_atomic(path, buf.data(), buf.size());
}

// val_bpb charges the sidecar's bytes (of each scored target), in every mode; a sidecar that belongs to other
// tokens (checksum, count, a BOS with bytes) is refused with the file's name, and the sidecars are not read
// as token shards.
TEST(eval_caseops_sidecar_bytes) {
    Config c = eval_test_config();
    std::string d = test_dir("caseops");
    std::vector<uint16_t> t0 = eval_test_stream({37, 20, 90}, c.vocab_size, 91);
    std::vector<uint16_t> t1 = eval_test_stream({41, 30}, c.vocab_size, 92);
    auto bytes_of = [](const std::vector<uint16_t>& t, uint64_t seed) {
        Rng rng(seed);
        std::vector<uint16_t> b(t.size());
        for (size_t i = 0; i < t.size(); i++) b[i] = t[i] == BOS_ID ? 0 : (uint16_t)(rng.uniform() * 7);
        return b;
    };
    std::vector<uint16_t> b0 = bytes_of(t0, 1), b1 = bytes_of(t1, 2);
    write_shard_file(d + "/fineweb_val_000000.bin", t0);
    write_shard_file(d + "/fineweb_val_000001.bin", t1);
    write_sidecar_file(d + "/fineweb_val_bytes_000000.bin", t0, b0);
    write_sidecar_file(d + "/fineweb_val_bytes_000001.bin", t1, b1, false);  // the reference's: no checksum
    c.data_path = d; c.caseops_enabled = 1;
    EvalData ev = eval_test_data({}, c.vocab_size);
    ev.val = load_validation_tokens(c);
    CHECK(ev.val.size() == t0.size() + t1.size());  // the sidecars were not taken for tokens
    ev.val_bytes = load_validation_bytes(c, ev.val);
    std::vector<uint16_t> want = b0;
    want.insert(want.end(), b1.begin(), b1.end());
    CHECK(ev.val_bytes == want);
    Model<Cpu<float>> m;
    eval_test_model(m, c);
    for (const char* mode : {"standard", "sliding", "lora_ttt", "full_ttt"}) {
        NllRecord rec;
        EvalResult r = eval_run_mode(mode, m, ev, rec);
        double loss = 0, bytes = 0;
        for (size_t j = 0; j < rec.nll.size(); j++) { loss += rec.nll[j]; bytes += want[j + 1]; }
        double want_bpb = loss / M_LN2 / bytes;
        CHECK_MSG(std::fabs(r.val_bpb - want_bpb) <= 1e-9 * r.val_bpb, "%s: val_bpb %.12g, from the sidecar %.12g",
                  mode, r.val_bpb, want_bpb);
    }
    eval_test_model_free(m);
    // a wrong table: another shard's sidecar, a BOS charged bytes, a short one
    std::string f0 = d + "/fineweb_val_bytes_000000.bin", f1 = d + "/fineweb_val_bytes_000001.bin";
    std::vector<uint16_t> shifted(t0.begin() + 1, t0.end());
    shifted.push_back(5);
    write_sidecar_file(f0, shifted, b0);
    CHECK_THROWS(load_validation_bytes(c, ev.val), f0 + ": written for other tokens than");
    write_sidecar_file(f0, t0, b0);
    std::vector<uint16_t> bad = b1;
    bad[0] = 3;  // t1[0] is BOS
    write_sidecar_file(f1, t1, bad, false);
    CHECK_THROWS(load_validation_bytes(c, ev.val), f1 + ": entry 0 is 3 bytes, but token 0 is BOS");
    write_sidecar_file(f1, t1, std::vector<uint16_t>(b1.begin(), b1.end() - 1), false);
    CHECK_THROWS(load_validation_bytes(c, ev.val), f1 + ": " + std::to_string(b1.size() - 1) + " byte entries");
    remove(f1.c_str());
    CHECK_THROWS(load_validation_bytes(c, ev.val), f1 + " is missing");
}

// --- Phased score-first TTT -------------------------------------------------------------------------

// The queue and its segments, derived here from the rules (not from the code under test): documents sorted
// by length into batches of TTT_BATCH_SIZE, longest batch first; segment p ends with the first batch after
// which prefix·(p+1)/P documents are scored. Returns each document's segment.
static std::vector<int> phased_segments(const std::vector<std::pair<long, long>>& docs, int bs, long prefix, int P) {
    std::vector<long> idx;  // a final lone BOS predicts nothing: no document
    for (size_t i = 0; i < docs.size(); i++)
        if (docs[i].second > 0) idx.push_back((long)i);
    std::stable_sort(idx.begin(), idx.end(), [&](long a, long b) { return docs[a].second < docs[b].second; });
    std::vector<std::vector<long>> batches;
    for (size_t i = 0; i < idx.size(); i += bs)
        batches.emplace_back(idx.begin() + i, idx.begin() + std::min(idx.size(), i + (size_t)bs));
    std::stable_sort(batches.begin(), batches.end(), [&](const std::vector<long>& a, const std::vector<long>& b) {
        return docs[a.back()].second > docs[b.back()].second;
    });
    std::vector<int> seg(docs.size(), 0);
    long scored = 0;
    int p = 0;
    for (const auto& b : batches) {
        for (long i : b) seg[i] = p;
        scored += (long)b.size();
        if (p < P && prefix > 0 && scored >= prefix * (p + 1) / P) p++;
    }
    return seg;
}

// Without phases, phased TTT is per-document LoRA TTT (the same NLLs, in another order). With phases: the
// documents of the first segment are scored by the loaded model (as lora_ttt scores them), later ones by the
// model the global SGD updated; a document's NLLs depend only on itself and the documents scored before it
// (its segment's others and earlier segments): changing a last-segment document changes no other score.
TEST(eval_phased_ttt_queue_order) {
    Config c = eval_test_config();
    Model<Cpu<double>> m;
    eval_test_model(m, c);
    std::vector<uint16_t> t = eval_test_stream(EVAL_DOC_LENS, c.vocab_size, 31, true);
    EvalData d = eval_test_data(t, c.vocab_size);
    auto docs = test_documents(t);
    NllRecord lora, none, ph;
    eval_run_mode("lora_ttt", m, d, lora);
    m.cfg.phased_ttt_prefix_docs = 0;
    eval_run_mode("phased_ttt", m, d, none);
    check_records_equal(lora, none, 0, t.size() - 1, "phased_ttt without phases vs lora_ttt");
    m.cfg = c;
    eval_run_mode("phased_ttt", m, d, ph);
    std::vector<int> seg = phased_segments(docs, c.ttt_batch_size, c.phased_ttt_prefix_docs, c.phased_ttt_num_phases);
    std::vector<std::vector<float>> A = per_document(t, lora), B = per_document(t, ph);
    size_t later_changed = 0, last = docs.size();  // the longest document of the last segment
    for (size_t k = 0; k < docs.size(); k++) {
        if (seg[k] == 0) check_docs_equal(A[k], B[k], "first segment vs lora_ttt", k);
        else for (size_t i = 0; i < A[k].size(); i++) later_changed += !nll_same(A[k][i], B[k][i]);
        bool longer = last == docs.size() || A[k].size() > A[last].size();
        if (seg[k] == c.phased_ttt_num_phases && longer) last = k;
    }
    CHECK_MSG(later_changed > 0, "no score after a global SGD phase changed");
    CHECK_MSG(last < docs.size() && A[last].size() >= 2, "the test stream has no document of 2+ positions in the last "
              "segment");
    std::vector<uint16_t> u = t;
    Rng rng(19);
    for (long j = docs[last].first + 1; j < docs[last].first + docs[last].second; j++)
        u[j] = (uint16_t)(2 + rng.uniform() * (c.vocab_size - 2));
    NllRecord r;
    eval_run_mode("phased_ttt", m, eval_test_data(u, c.vocab_size), r);
    std::vector<std::vector<float>> C = per_document(u, r);
    for (size_t k = 0; k < docs.size(); k++)
        if (k != last) check_docs_equal(B[k], C[k], "a last-segment document changed", k);
    eval_test_model_free(m);
}
