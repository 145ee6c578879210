// train_gpt.cu — pgolf: the Parameter Golf record stack in one CUDA C++ file.
//
// Trains a small GPT on FineWeb shards, compresses it into a ≤16 MB artifact and scores it
// in bits per byte (val_bpb), reproducing the PyTorch reference submissions:
//   CONFIG=pr467  10L d512, BigramHash, SmearGate, U-Net skips, int5/int6 + zstd, LoRA TTT
//   CONFIG=pr600  11L d512, branch gates, EMA, int6 bit-packed, LoRA TTT
//   CONFIG=pr456  10L d512, XSA, late QAT, full-model score-first TTT
//   CONFIG=baseline / tiny
// Build: make            Run: mpirun -np 8 ./train_gpt      CPU: DEVICE=cpu CONFIG=tiny ./train_gpt
//
// The same driver runs on the CPU (plain C++ reference: the golden model every CUDA kernel is
// tested against) and on the GPU; only the math of each operation differs. Sections, in order:
//   1. utilities and checks           7. optimizers, schedule, weight averaging, QAT
//   2. configuration and presets      8. distributed (MPI, NCCL)
//   3. data: shards and loaders       9. compression: quantization and the artifact
//   4. parameters: table and arenas  10. evaluation: val_bpb, sliding window, both TTTs
//   5. operations (CPU, then CUDA)   11. checkpoints
//   6. the model: forward/backward   12. training driver and main
// Sections between `#ifdef PGOLF_CPU_REFERENCE` fences are the CPU reference; `make submission`
// strips them (and comments) to produce the byte-counted single file.

#include <algorithm>
#include <cerrno>
#include <cfloat>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>
#include <dirent.h>
#include <fnmatch.h>
#include <zstd.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef PGOLF_MPI
#define OMPI_SKIP_MPICXX 1   // the C API only
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif
#include "tokenizer/spm_model.h"
#ifdef __CUDACC__
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublasLt.h>
#include <cub/device/device_radix_sort.cuh>  // stable sort for the deterministic embedding backward
#include <tuple>
#ifdef PGOLF_NCCL
#include <nccl.h>
#endif
#endif

#ifndef PGOLF_CPU_REFERENCE
#define PGOLF_CPU_REFERENCE 1
#endif
#ifdef __CUDACC__
#define HD __host__ __device__  // scalar helpers shared by kernels and host code (and tested on the host)
#else
#define HD
#endif

// ============================================================================================
// 1. Utilities and checks
// ============================================================================================

static int g_rank = 0, g_world = 1;  // set once by distributed_init()

// Every fatal condition ends here: one line naming what was expected and what was found.
// Test builds throw instead, so the tests can check the message.
[[noreturn]] __attribute__((format(printf, 1, 2))) static void fail(const char* fmt, ...) {
    char msg[4096];
    va_list ap; va_start(ap, fmt); vsnprintf(msg, sizeof msg, fmt, ap); va_end(ap);
#ifdef PGOLF_TESTING
    throw std::runtime_error(msg);
#else
    fprintf(stderr, "error%s: %s\n", g_world > 1 ? (" (rank " + std::to_string(g_rank) + ")").c_str() : "", msg);
    fflush(stderr);
#ifdef PGOLF_MPI
    int mpi_up = 0; MPI_Initialized(&mpi_up);
    if (mpi_up && g_world > 1) MPI_Abort(MPI_COMM_WORLD, 1);  // never leave the other ranks hanging
#endif
    exit(1);
#endif
}

// printf on rank 0 only, also appended to the run's log file when one is open.
static FILE* g_logfile = nullptr;
static bool g_quiet = false;  // tests silence the training log
__attribute__((format(printf, 1, 2))) static void log0(const char* fmt, ...) {
    if (g_rank != 0 || g_quiet) return;
    va_list ap;
    va_start(ap, fmt); vprintf(fmt, ap); va_end(ap);
    if (g_logfile) { va_start(ap, fmt); vfprintf(g_logfile, fmt, ap); va_end(ap); fflush(g_logfile); }
    fflush(stdout);
}

static std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
static std::string fmt(const char* f, ...) {  // printf into a std::string
    char buf[1024]; va_list ap; va_start(ap, f); vsnprintf(buf, sizeof buf, f, ap); va_end(ap); return buf;
}

static double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// Checked file helpers: every error names the file.
static FILE* fopen_check(const char* path, const char* mode) {
    FILE* f = fopen(path, mode);
    if (!f) fail("cannot open %s (%s): %s", path, mode, strerror(errno));
    return f;
}
static void fread_check(void* dst, size_t n, FILE* f, const char* path) {
    size_t got = fread(dst, 1, n, f);
    if (got != n) fail("%s: truncated (wanted %zu more bytes, got %zu)", path, n, got);
}
static void fwrite_check(const void* src, size_t n, FILE* f, const char* path) {
    if (fwrite(src, 1, n, f) != n) fail("cannot write %s: %s", path, strerror(errno));
}
static std::vector<uint8_t> read_file(const std::string& path) {
    FILE* f = fopen_check(path.c_str(), "rb");
    std::vector<uint8_t> buf;
    uint8_t chunk[1 << 16];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) buf.insert(buf.end(), chunk, chunk + n);
    if (ferror(f)) fail("cannot read %s: %s", path.c_str(), strerror(errno));
    fclose(f);
    return buf;
}
// Outputs are written to path.tmp and renamed, so a crash never leaves a half-written file.
static void write_file_atomic(const std::string& path, const void* data, size_t n) {
    std::string tmp = path + ".tmp";
    FILE* f = fopen_check(tmp.c_str(), "wb");
    fwrite_check(data, n, f, tmp.c_str());
    if (fclose(f) != 0) fail("cannot write %s: %s", tmp.c_str(), strerror(errno));
    if (rename(tmp.c_str(), path.c_str()) != 0) fail("cannot rename %s to %s: %s", tmp.c_str(), path.c_str(), strerror(errno));
}
static void make_dirs(const std::string& path) {
    std::string cur;
    for (size_t i = 0; i <= path.size(); i++) {
        if (i == path.size() || path[i] == '/') {
            if (!cur.empty() && mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST)
                fail("cannot create directory %s: %s", cur.c_str(), strerror(errno));
        }
        if (i < path.size()) cur += path[i];
    }
}
// Sorted list of the files matching a glob pattern (only the last path component may hold wildcards).
static std::vector<std::string> glob_sorted(const std::string& pattern) {
    size_t slash = pattern.rfind('/');
    std::string dir = slash == std::string::npos ? "." : pattern.substr(0, slash);
    std::string base = slash == std::string::npos ? pattern : pattern.substr(slash + 1);
    std::vector<std::string> out;
    DIR* d = opendir(dir.c_str());
    if (!d) return out;
    while (dirent* e = readdir(d))
        if (fnmatch(base.c_str(), e->d_name, 0) == 0) out.push_back(dir + "/" + e->d_name);
    closedir(d);
    std::sort(out.begin(), out.end());
    return out;
}

// Deterministic random numbers for initialisation and LoRA resets (same on CPU and GPU runs).
struct Rng {
    std::mt19937_64 gen;
    explicit Rng(uint64_t seed) : gen(seed) {}
    double uniform() { return (gen() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
    double normal() {  // Box-Muller; one value per call keeps the stream simple to reason about
        double u1 = uniform(), u2 = uniform();
        return std::sqrt(-2.0 * std::log(1.0 - u1)) * std::cos(2.0 * M_PI * u2);
    }
};

// IEEE half and bfloat16 conversions (round to nearest even), used for scales, storage, checkpoints.
static inline uint16_t float_to_half(float f) {
    uint32_t x; memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, exp = (x >> 23) & 0xff, man = x & 0x7fffff;
    if (exp == 0xff) return sign | 0x7c00 | (man ? 0x200 : 0);  // inf / nan
    int e = (int)exp - 127 + 15;
    if (e >= 31) return sign | 0x7c00;                            // overflow → inf
    if (e <= 0) {                                                 // subnormal half
        if (e < -10) return sign;
        man |= 0x800000;
        int shift = 14 - e;
        uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return sign | half;
    }
    uint32_t half = sign | (e << 10) | (man >> 13), rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;    // may carry into the exponent: correct
    return half;
}
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, x;
    if (exp == 0) {
        if (man == 0) x = sign;
        else { int e = -1; do { e++; man <<= 1; } while (!(man & 0x400)); x = sign | ((112 - e) << 23) | ((man & 0x3ff) << 13); }
    } else if (exp == 31) x = sign | 0x7f800000 | (man << 13);
    else x = sign | ((exp + 112) << 23) | (man << 13);
    float f; memcpy(&f, &x, 4); return f;
}
static inline float bf16_to_float(uint16_t b) { uint32_t x = (uint32_t)b << 16; float f; memcpy(&f, &x, 4); return f; }

// ============================================================================================
// 2. Configuration: one struct, filled from a preset, then from the reference's env-var names
// ============================================================================================

enum OrthoInit { INIT_DEFAULT = 0, INIT_ORTHO_ALL = 1, INIT_ORTHO_THWU1 = 2 };

struct Config {
    std::string preset = "baseline", device = "auto";
    // data and run
    std::string data_path = "./data/datasets/fineweb10B_sp1024";
    std::string tokenizer_path = "./data/tokenizers/fineweb_1024_bpe.model";
    std::string run_id, out_dir, resume, load_artifact, nll_dump;
    int seed = 1337;
    // cadence
    long val_batch_size = 524288;
    int val_loss_every = 1000, train_log_every = 200;
    long val_tokens_limit = 0;         // evaluate only a prefix of the validation stream (0 = all)
    int val_truncate_to_seq = 0;       // 1 = drop the tail that is not a multiple of TRAIN_SEQ_LEN, as the reference
    int checkpoint_every = 0;          // steps between checkpoints (0 = none during training)
    int checkpoint_keep = 2;           // newest checkpoints kept on disk (0 = all)
    // training length and batch
    int iterations = 20000, warmdown_iters = 1200, warmup_steps = 20;
    long train_batch_tokens = 524288;
    int train_seq_len = 1024;
    double max_wallclock_seconds = 600.0;
    int grad_accum_steps = 0;          // 0 = 8 / world size, as the reference
    // model shape
    int vocab_size = 1024, num_layers = 9, model_dim = 512, num_heads = 8, num_kv_heads = 4;
    float mlp_mult = 2.0f;
    std::string mlp_activation = "relu_sq";  // or leaky_relu_sq (slope 0.5)
    int unique_layers = 0;             // depth recurrence: this many unique blocks looped (0 = off)
    int named_cores = 0;               // name block matrices cores.i.* (PR456) instead of blocks.i.*
    int tie_embeddings = 1;
    float rope_base = 10000.0f;
    int rope_dims = 0;                 // rotary dims per head (0 = all: full RoPE)
    float logit_softcap = 30.0f, qk_gain_init = 1.5f, tied_embed_init_std = 0.005f;
    int bigram_vocab_size = 0, bigram_dim = 128;  // BigramHash with projection and scale (thwu1)
    int bigram_hash_size = 0;          // PR600's bigram embedding: (prev·V + cur) mod size, model_dim wide
    int smear = 0;                     // SmearGate on the embedding (thwu1)
    int smear_gate = 0;                // PR600's sigmoid gates on each block's attention and MLP outputs
    int xsa_last_n = 0;
    int ortho_init = INIT_DEFAULT;
    // optimizer
    float embed_lr = 0.6f, head_lr = 0.008f, tied_embed_lr = 0.05f, matrix_lr = 0.04f, scalar_lr = 0.04f;
    float muon_momentum = 0.95f, muon_momentum_warmup_start = 0.85f;
    int muon_backend_steps = 5, muon_momentum_warmup_steps = 500;
    float muon_weight_decay = 0.0f, adam_wd = 0.0f;
    float beta1 = 0.9f, beta2 = 0.95f, adam_eps = 1e-8f, grad_clip_norm = 0.0f;
    // weight averaging
    int swa_enabled = 0, swa_every = 50;
    float swa_start_frac = 0.4f;       // mean of snapshots taken while the lr multiplier < this (thwu1)
    int swa_steps = 0, swa_start_step = -1;
    float swa_decay = 0.4f;            // PR600's "SWA": an EMA over the last SWA_STEPS steps
    float ema_decay = 0.0f;            // EMA of every step (2026-03-22 record; 0 = off)
    // quantization-aware training
    int late_qat = 0, qat_bits = 0, qat_start_step = -1;
    float qat_threshold = 0.1f;        // LATE_QAT switches on once the lr multiplier is below this
    float qat_scale_floor = 0.0f;      // smallest per-row scale of the fake quantizer
    // export
    std::string quant_scheme = "int8"; // int8 | mixed (int5 MLP / int6 attn) | int6
    std::string pack = "auto";         // bits | bytes | auto (the smaller under zstd, per tensor group)
    int zstd_level = 22;
    float prune_frac = 0.0f;
    int gptq_lite = 0, all_int5 = 0;
    std::string fp16_keep_patterns = "";
    std::string control_patterns = "attn_scale,attn_scales,mlp_scale,mlp_scales,resid_mix,resid_mixes,q_gain,skip_weight,skip_weights";
    // evaluation
    std::string eval_mode = "standard";  // comma list of standard, sliding, lora_ttt, full_ttt
    int eval_seq_len = 0, eval_stride = 64, eval_batch_seqs = 32;
    std::string sliding = "exact";     // exact | reference (reference double-counts the tail)
    double eval_max_wallclock_seconds = 0.0;
    // per-document LoRA TTT
    int ttt_lora_rank = 8, ttt_chunk_size = 256, ttt_eval_seq_len = 1024, ttt_batch_size = 64;
    int ttt_steps = 1, ttt_n_epochs = 1;
    float ttt_lora_lr = 0.01f, ttt_lora_alpha = 0.0f;  // alpha 0 = scale 1 (the reference has no alpha/r)
    std::string ttt_lora_targets = "q,v,lm_head", ttt_lora_optimizer = "adam";
    float ttt_lora_beta1 = 0.9f, ttt_lora_beta2 = 0.95f, ttt_lora_eps = 1e-10f, ttt_lora_wd = 0.0f;
    std::string ttt_lora_schedule = "constant";  // constant | cosine_epochs (PR467)
    int ttt_report_final_epoch = 0;    // also print PR467's final-epoch score (not competition-legal)
    // full-model score-first TTT
    int ttt_chunk_tokens = 32768, ttt_epochs = 3, ttt_freeze_blocks = 0, ttt_batch_seqs = 32;
    float ttt_lr = 0.002f, ttt_momentum = 0.9f, ttt_grad_clip = 1.0f, ttt_wd = 0.0f;
    float ttt_beta1 = 0.9f, ttt_beta2 = 0.999f, ttt_eps = 1e-8f;
    std::string ttt_optimizer = "sgd";  // sgd (momentum) | adamw

    // derived
    int head_dim() const { return model_dim / num_heads; }
    int kv_dim() const { return num_kv_heads * head_dim(); }
    int mlp_hidden() const { return (int)(mlp_mult * model_dim); }
    int num_cores() const { return unique_layers > 0 && unique_layers < num_layers ? unique_layers : num_layers; }
    int num_encoder_layers() const { return num_layers / 2; }
    int num_skip_weights() const { return std::min(num_layers / 2, num_layers - num_layers / 2); }
    int rotary_dims() const { return rope_dims > 0 ? rope_dims : head_dim(); }
    int eval_len() const { return eval_seq_len > 0 ? eval_seq_len : train_seq_len; }
};

// The naive baseline (records/…/2026-03-17_NaiveBaseline) is the struct's defaults.
static void preset_baseline(Config&) {}

// thwu1's 10L int5/int6 stack (records/…/2026-03-20_10L_Int5MLP_MuonWD04_SWA50) with PR #467's
// changes (warmdown 3500, SWA from 0.35) and its LoRA TTT (Q and V of every layer, 50 epochs).
static void preset_pr467(Config& c) {
    c.seed = 42; c.val_loss_every = 500; c.train_log_every = 100;
    c.warmdown_iters = 3500; c.train_batch_tokens = 786432; c.train_seq_len = 2048;
    c.num_layers = 10; c.mlp_mult = 3.0f;
    c.tied_embed_lr = 0.03f; c.matrix_lr = 0.02f; c.scalar_lr = 0.02f;
    c.muon_momentum = 0.99f; c.muon_momentum_warmup_start = 0.92f; c.muon_momentum_warmup_steps = 1500;
    c.grad_clip_norm = 0.3f; c.muon_weight_decay = 0.04f; c.adam_wd = 0.04f;
    c.bigram_vocab_size = 10240; c.bigram_dim = 128; c.smear = 1; c.ortho_init = INIT_ORTHO_THWU1;
    c.swa_enabled = 1; c.swa_start_frac = 0.35f; c.swa_every = 50;
    c.quant_scheme = "mixed"; c.prune_frac = 0.03f;
    c.fp16_keep_patterns = "tok_emb,blocks.8.attn.c_k";
    c.control_patterns += ",smear,bigram.scale";
    c.eval_mode = "sliding,lora_ttt"; c.eval_stride = 64; c.eval_batch_seqs = 32;
    c.ttt_lora_rank = 8; c.ttt_lora_lr = 0.001f; c.ttt_n_epochs = 50; c.ttt_chunk_size = 256;
    c.ttt_eval_seq_len = 2048; c.ttt_batch_size = 32; c.ttt_lora_targets = "q,v";
    c.ttt_lora_schedule = "cosine_epochs"; c.ttt_report_final_epoch = 1;
}

// PR #600 (records/track_non_record_16mb/2026-03-24_TTT-LoRA-Base), with the flags of its run command.
static void preset_pr600(Config& c) {
    c.num_layers = 11; c.mlp_mult = 3.0f; c.bigram_hash_size = 2048; c.smear_gate = 1;
    c.ortho_init = INIT_ORTHO_ALL; c.embed_lr = 0.05f; c.muon_weight_decay = 0.04f;
    c.val_loss_every = 0;
    c.swa_steps = 500; c.swa_decay = 0.4f;
    c.qat_bits = 6; c.qat_scale_floor = 1e-7f / 31.0f;
    c.quant_scheme = "int6";
    c.eval_mode = "sliding"; c.eval_stride = 512; c.eval_batch_seqs = 32;
    // TTT as the PR plans it (its submitted score had TTT off): rank 128 on all attention + MLP,
    // chunks of 64, 4 Adam steps per chunk.
    c.ttt_lora_rank = 128; c.ttt_chunk_size = 64; c.ttt_steps = 4; c.ttt_lora_lr = 0.0001f;
    c.ttt_lora_targets = "q,k,v,o,mlp_up,mlp_down,lm_head";
    c.eval_max_wallclock_seconds = 480.0;
}

// PR #456 (records/track_non_record_16mb/2026-03-22_DepthRecurrence_AggressiveTTT_10L).
static void preset_pr456(Config& c) {
    preset_pr467(c);
    c.iterations = 5200; c.warmdown_iters = 3000;
    c.tied_embed_lr = 0.035f; c.matrix_lr = 0.025f; c.scalar_lr = 0.025f;
    c.adam_wd = 0.01f; c.muon_weight_decay = 0.04f;
    c.unique_layers = 10; c.named_cores = 1; c.xsa_last_n = 3;
    c.swa_start_frac = 0.2f;
    c.late_qat = 1; c.qat_threshold = 0.1f; c.qat_bits = 6; c.qat_scale_floor = 1.0f / 31.0f;
    c.fp16_keep_patterns = "tok_emb,cores.2.attn.c_k";
    c.eval_mode = "full_ttt"; c.eval_stride = 128; c.eval_batch_seqs = 64;
    c.ttt_optimizer = "adamw"; c.ttt_lr = 0.0005f; c.ttt_epochs = 1; c.ttt_batch_seqs = 16;
    c.ttt_beta1 = 0.9f; c.ttt_beta2 = 0.999f; c.ttt_grad_clip = 1.0f; c.ttt_freeze_blocks = 0;
    c.ttt_lora_targets = "q,v,lm_head"; c.ttt_lora_rank = 8; c.ttt_lora_lr = 0.01f; c.ttt_n_epochs = 1;
    c.ttt_lora_schedule = "constant"; c.ttt_report_final_epoch = 0; c.ttt_eval_seq_len = 1024; c.ttt_batch_size = 64;
}

// pr467 shrunk to CPU size, for the tests and the CPU quick start.
static void preset_tiny(Config& c) {
    preset_pr467(c);
    c.num_layers = 4; c.model_dim = 128; c.num_heads = 4; c.num_kv_heads = 2; c.mlp_mult = 3.0f;
    c.train_seq_len = 256; c.train_batch_tokens = 8192; c.iterations = 200; c.warmdown_iters = 60;
    c.max_wallclock_seconds = 0; c.val_loss_every = 50; c.train_log_every = 25;
    c.bigram_vocab_size = 2048; c.bigram_dim = 64;
    c.matrix_lr = 0.04f; c.scalar_lr = 0.04f; c.tied_embed_lr = 0.05f;
    c.muon_momentum_warmup_steps = 100;
    c.swa_every = 10; c.fp16_keep_patterns = "tok_emb,blocks.2.attn.c_k";
    c.val_tokens_limit = 131072;
    c.eval_mode = "standard,sliding"; c.eval_stride = 64; c.eval_batch_seqs = 16;
    c.ttt_eval_seq_len = 256; c.ttt_chunk_size = 64; c.ttt_batch_size = 16; c.ttt_n_epochs = 1;
    c.ttt_lora_schedule = "constant"; c.ttt_report_final_epoch = 0; c.ttt_lora_lr = 0.01f;
    c.ttt_chunk_tokens = 4096; c.ttt_batch_seqs = 8;
}

struct Preset { const char* name; void (*apply)(Config&); const char* what; };
static const Preset PRESETS[] = {
    {"baseline", preset_baseline, "the naive 9L 512d baseline"},
    {"pr467", preset_pr467, "thwu1 10L int5/int6 stack + PR #467 LoRA TTT"},
    {"pr600", preset_pr600, "PR #600: 11L, branch gates, EMA, int6 bit-packed"},
    {"pr456", preset_pr456, "PR #456: 10L XSA, late QAT, full-model score-first TTT"},
    {"tiny", preset_tiny, "pr467 shrunk to CPU size (4L d128), for tests and the CPU quick start"},
};

// Every setting, by the reference's env-var name (ours where the reference has none).
struct Setting { const char* name; char kind; void* ptr; const char* help; };  // kind: i l f d s
static std::vector<Setting> config_settings(Config& c) {
    return {
        {"DATA_PATH", 's', &c.data_path, "directory with fineweb_train_*.bin and fineweb_val_*.bin"},
        {"TOKENIZER_PATH", 's', &c.tokenizer_path, "SentencePiece .model used for the val_bpb byte tables"},
        {"RUN_ID", 's', &c.run_id, "name of the run (default: a timestamp)"},
        {"OUT_DIR", 's', &c.out_dir, "where log.txt, result.json, checkpoints and the artifact go (default runs/RUN_ID)"},
        {"RESUME", 's', &c.resume, "checkpoint to continue training from"},
        {"LOAD_ARTIFACT", 's', &c.load_artifact, "evaluate this artifact instead of training"},
        {"NLL_DUMP", 's', &c.nll_dump, "write each validation position's NLL (float32 per position) to PATH.<mode>"},
        {"SEED", 'i', &c.seed, "random seed"},
        {"DEVICE", 's', &c.device, "cpu | cuda | auto"},
        {"VAL_BATCH_SIZE", 'l', &c.val_batch_size, "tokens per evaluation batch (all ranks)"},
        {"VAL_LOSS_EVERY", 'i', &c.val_loss_every, "steps between validations during training (0 = only at the end)"},
        {"TRAIN_LOG_EVERY", 'i', &c.train_log_every, "steps between train-loss lines"},
        {"VAL_TOKENS_LIMIT", 'l', &c.val_tokens_limit, "evaluate only the first N validation tokens (0 = all)"},
        {"VAL_TRUNCATE_TO_SEQ", 'i', &c.val_truncate_to_seq, "1 = score only a multiple of TRAIN_SEQ_LEN positions, as the reference"},
        {"CHECKPOINT_EVERY", 'i', &c.checkpoint_every, "steps between checkpoints, plus one at the end (0 = none)"},
        {"CHECKPOINT_KEEP", 'i', &c.checkpoint_keep, "newest checkpoints kept (0 = all)"},
        {"ITERATIONS", 'i', &c.iterations, "training steps"},
        {"WARMDOWN_ITERS", 'i', &c.warmdown_iters, "length of the linear lr warm-down (steps, or its wall-clock equivalent)"},
        {"WARMUP_STEPS", 'i', &c.warmup_steps, "compiler warm-up steps of the reference; nothing to warm up here, so unused"},
        {"TRAIN_BATCH_TOKENS", 'l', &c.train_batch_tokens, "tokens per optimizer step, all ranks together"},
        {"TRAIN_SEQ_LEN", 'i', &c.train_seq_len, "training sequence length"},
        {"MAX_WALLCLOCK_SECONDS", 'd', &c.max_wallclock_seconds, "stop training after this many seconds (0 = no cap)"},
        {"GRAD_ACCUM_STEPS", 'i', &c.grad_accum_steps, "micro-batches per step and rank (0 = 8 / world size)"},
        {"VOCAB_SIZE", 'i', &c.vocab_size, "vocabulary size"},
        {"NUM_LAYERS", 'i', &c.num_layers, "transformer blocks"},
        {"MODEL_DIM", 'i', &c.model_dim, "width of the residual stream"},
        {"NUM_HEADS", 'i', &c.num_heads, "attention heads"},
        {"NUM_KV_HEADS", 'i', &c.num_kv_heads, "key/value heads (GQA)"},
        {"MLP_MULT", 'f', &c.mlp_mult, "MLP hidden width / MODEL_DIM"},
        {"MLP_ACTIVATION", 's', &c.mlp_activation, "relu_sq | leaky_relu_sq"},
        {"UNIQUE_LAYERS", 'i', &c.unique_layers, "depth recurrence: unique blocks looped over NUM_LAYERS (0 = off)"},
        {"NAMED_CORES", 'i', &c.named_cores, "1 = block matrices are named cores.i.* (PR #456)"},
        {"TIE_EMBEDDINGS", 'i', &c.tie_embeddings, "1 = the output head is the token embedding"},
        {"ROPE_BASE", 'f', &c.rope_base, "RoPE base"},
        {"ROPE_DIMS", 'i', &c.rope_dims, "rotary dims per head (0 = all)"},
        {"LOGIT_SOFTCAP", 'f', &c.logit_softcap, "logits = cap·tanh(z/cap)"},
        {"QK_GAIN_INIT", 'f', &c.qk_gain_init, "initial per-head query gain"},
        {"TIED_EMBED_INIT_STD", 'f', &c.tied_embed_init_std, "std of the tied embedding at init"},
        {"BIGRAM_VOCAB_SIZE", 'i', &c.bigram_vocab_size, "BigramHash buckets (0 = off)"},
        {"BIGRAM_DIM", 'i', &c.bigram_dim, "BigramHash embedding width (projected to MODEL_DIM)"},
        {"BIGRAM_HASH_SIZE", 'i', &c.bigram_hash_size, "PR #600 bigram embedding buckets (0 = off)"},
        {"SMEAR", 'i', &c.smear, "1 = SmearGate blends each embedding with the previous token's"},
        {"SMEAR_GATE", 'i', &c.smear_gate, "1 = PR #600's sigmoid gates on attention and MLP outputs"},
        {"XSA_LAST_N", 'i', &c.xsa_last_n, "exclusive self-attention on the last N blocks"},
        {"ORTHO_INIT", 'i', &c.ortho_init, "0 = PyTorch default init, 1 = orthogonal (PR #600), 2 = orthogonal ≥64×64 and .proj ×1/√(2L) (thwu1)"},
        {"EMBED_LR", 'f', &c.embed_lr, "lr of an untied token embedding"},
        {"HEAD_LR", 'f', &c.head_lr, "lr of an untied output head"},
        {"TIED_EMBED_LR", 'f', &c.tied_embed_lr, "lr of the tied embedding and the bigram table"},
        {"MATRIX_LR", 'f', &c.matrix_lr, "Muon lr"},
        {"SCALAR_LR", 'f', &c.scalar_lr, "lr of vectors and scalars"},
        {"MUON_MOMENTUM", 'f', &c.muon_momentum, "Muon momentum"},
        {"MUON_BACKEND_STEPS", 'i', &c.muon_backend_steps, "Newton–Schulz iterations"},
        {"MUON_MOMENTUM_WARMUP_START", 'f', &c.muon_momentum_warmup_start, "Muon momentum at step 0"},
        {"MUON_MOMENTUM_WARMUP_STEPS", 'i', &c.muon_momentum_warmup_steps, "steps of the momentum warm-up"},
        {"MUON_WEIGHT_DECAY", 'f', &c.muon_weight_decay, "decoupled weight decay of Muon"},
        {"ADAM_WD", 'f', &c.adam_wd, "decoupled weight decay of the Adam groups"},
        {"WEIGHT_DECAY", 'f', &c.adam_wd, "thwu1's name for ADAM_WD"},
        {"BETA1", 'f', &c.beta1, "Adam beta1"},
        {"BETA2", 'f', &c.beta2, "Adam beta2"},
        {"ADAM_EPS", 'f', &c.adam_eps, "Adam epsilon"},
        {"GRAD_CLIP_NORM", 'f', &c.grad_clip_norm, "clip gradients to this global L2 norm (0 = off)"},
        {"SWA_ENABLED", 'i', &c.swa_enabled, "average snapshots taken during the warm-down"},
        {"SWA_START_FRAC", 'f', &c.swa_start_frac, "snapshots start when the lr multiplier drops below this"},
        {"SWA_EVERY", 'i', &c.swa_every, "steps between snapshots"},
        {"SWA_STEPS", 'i', &c.swa_steps, "PR #600: EMA over the last N steps (0 = off)"},
        {"SWA_DECAY", 'f', &c.swa_decay, "PR #600: decay of that EMA"},
        {"SWA_START_STEP", 'i', &c.swa_start_step, "PR #600: first EMA step (-1 = last SWA_STEPS)"},
        {"EMA_DECAY", 'f', &c.ema_decay, "EMA of the weights at every step (0 = off)"},
        {"LATE_QAT", 'i', &c.late_qat, "fake-quantize matrices once the lr multiplier < QAT_THRESHOLD"},
        {"QAT_THRESHOLD", 'f', &c.qat_threshold, "lr multiplier that switches LATE_QAT on"},
        {"QAT_BITS", 'i', &c.qat_bits, "bits of the fake quantizer (5 or 6; 0 = no QAT)"},
        {"QAT_START_STEP", 'i', &c.qat_start_step, "PR #600: QAT from this step (-1 = ITERATIONS - WARMDOWN_ITERS)"},
        {"QAT_SCALE_FLOOR", 'f', &c.qat_scale_floor, "smallest per-row scale of the fake quantizer"},
        {"QUANT_SCHEME", 's', &c.quant_scheme, "int8 | mixed (int5 MLP, int6 attention/bigram) | int6"},
        {"PACK", 's', &c.pack, "bits | bytes | auto: how int5/int6 values are stored before zstd"},
        {"ZSTD_LEVEL", 'i', &c.zstd_level, "zstd level of the artifact (the challenge's records use 22)"},
        {"PRUNE_FRAC", 'f', &c.prune_frac, "zero this fraction of the smallest weights of large matrices before export"},
        {"GPTQ_LITE", 'i', &c.gptq_lite, "per-row clip search before quantizing"},
        {"ALL_INT5", 'i', &c.all_int5, "int5 for every low-bit tensor"},
        {"FP16_KEEP_NAME_PATTERNS", 's', &c.fp16_keep_patterns, "tensors kept in fp16 (comma list of substrings)"},
        {"CONTROL_TENSOR_NAME_PATTERNS", 's', &c.control_patterns, "control tensors (scalar lr group; fp32 in the artifact)"},
        {"EVAL_MODE", 's', &c.eval_mode, "comma list of standard, sliding, lora_ttt, full_ttt"},
        {"EVAL_SEQ_LEN", 'i', &c.eval_seq_len, "window of standard/sliding eval (0 = TRAIN_SEQ_LEN)"},
        {"EVAL_STRIDE", 'i', &c.eval_stride, "sliding-window stride"},
        {"EVAL_BATCH_SEQS", 'i', &c.eval_batch_seqs, "windows per forward pass"},
        {"SLIDING", 's', &c.sliding, "exact (every position once) | reference (the reference's window set)"},
        {"EVAL_MAX_WALLCLOCK_SECONDS", 'd', &c.eval_max_wallclock_seconds, "LoRA TTT deadline; later documents fall back to the base model (0 = none)"},
        {"TTT_LORA_RANK", 'i', &c.ttt_lora_rank, "LoRA rank"},
        {"TTT_LORA_LR", 'f', &c.ttt_lora_lr, "LoRA lr"},
        {"TTT_LORA_ALPHA", 'f', &c.ttt_lora_alpha, "LoRA delta scale alpha/rank (0 = scale 1)"},
        {"TTT_LORA_TARGETS", 's', &c.ttt_lora_targets, "comma list of q, k, v, o, mlp_up, mlp_down, lm_head"},
        {"TTT_LORA_OPTIMIZER", 's', &c.ttt_lora_optimizer, "adam | adamw | sgd"},
        {"TTT_LORA_BETA1", 'f', &c.ttt_lora_beta1, "LoRA Adam beta1"},
        {"TTT_LORA_BETA2", 'f', &c.ttt_lora_beta2, "LoRA Adam beta2"},
        {"TTT_LORA_EPS", 'f', &c.ttt_lora_eps, "LoRA Adam epsilon"},
        {"TTT_LORA_WD", 'f', &c.ttt_lora_wd, "LoRA AdamW weight decay"},
        {"TTT_CHUNK_SIZE", 'i', &c.ttt_chunk_size, "LoRA TTT chunk (tokens scored, then trained on)"},
        {"TTT_EVAL_SEQ_LEN", 'i', &c.ttt_eval_seq_len, "LoRA TTT context window"},
        {"TTT_BATCH_SIZE", 'i', &c.ttt_batch_size, "documents per LoRA TTT batch"},
        {"TTT_STEPS", 'i', &c.ttt_steps, "optimizer steps per chunk"},
        {"TTT_N_EPOCHS", 'i', &c.ttt_n_epochs, "passes over each document (PR #467: 50)"},
        {"TTT_LORA_SCHEDULE", 's', &c.ttt_lora_schedule, "constant | cosine_epochs (lr·½(1+cos(π·ep/epochs)))"},
        {"TTT_REPORT_FINAL_EPOCH", 'i', &c.ttt_report_final_epoch, "also print the final-epoch score (not competition-legal)"},
        {"TTT_CHUNK_TOKENS", 'i', &c.ttt_chunk_tokens, "full TTT: validation tokens per chunk"},
        {"TTT_EPOCHS", 'i', &c.ttt_epochs, "full TTT: training passes per chunk"},
        {"TTT_FREEZE_BLOCKS", 'i', &c.ttt_freeze_blocks, "full TTT: leave the first N blocks untouched"},
        {"TTT_BATCH_SEQS", 'i', &c.ttt_batch_seqs, "full TTT: sequences per optimizer step"},
        {"TTT_LR", 'f', &c.ttt_lr, "full TTT: lr (cosine over chunks)"},
        {"TTT_MOMENTUM", 'f', &c.ttt_momentum, "full TTT: SGD momentum"},
        {"TTT_GRAD_CLIP", 'f', &c.ttt_grad_clip, "full TTT: gradient clip norm"},
        {"TTT_WD", 'f', &c.ttt_wd, "full TTT: weight decay"},
        {"TTT_BETA1", 'f', &c.ttt_beta1, "full TTT: AdamW beta1"},
        {"TTT_BETA2", 'f', &c.ttt_beta2, "full TTT: AdamW beta2"},
        {"TTT_EPS", 'f', &c.ttt_eps, "full TTT: AdamW epsilon"},
        {"TTT_OPTIMIZER", 's', &c.ttt_optimizer, "full TTT: sgd | adamw"},
    };
}

static std::string setting_value(const Setting& s) {
    char buf[64];
    switch (s.kind) {
        case 'i': return std::to_string(*(int*)s.ptr);
        case 'l': return std::to_string(*(long*)s.ptr);
        case 'f':  // the shortest text that reads back as the same float (0.35, not 0.349999994)
            for (int digits = 6; digits <= 9; digits++) {
                snprintf(buf, sizeof buf, "%.*g", digits, *(float*)s.ptr);
                if (strtof(buf, nullptr) == *(float*)s.ptr) break;
            }
            return buf;
        case 'd':
            for (int digits = 6; digits <= 17; digits++) {
                snprintf(buf, sizeof buf, "%.*g", digits, *(double*)s.ptr);
                if (strtod(buf, nullptr) == *(double*)s.ptr) break;
            }
            return buf;
        default: return *(std::string*)s.ptr;
    }
}
static void setting_parse(const Setting& s, const char* text, const std::string& where = "") {
    char* end = nullptr;
    errno = 0;
    switch (s.kind) {
        case 'i': { long v = strtol(text, &end, 10); if (v < INT32_MIN || v > INT32_MAX) errno = ERANGE; *(int*)s.ptr = (int)v; break; }
        case 'l': *(long*)s.ptr = strtol(text, &end, 10); break;
        case 'f': *(float*)s.ptr = strtof(text, &end); break;
        case 'd': *(double*)s.ptr = strtod(text, &end); break;
        default: *(std::string*)s.ptr = text; return;
    }
    if (errno || end == text || *end != '\0')
        fail("%s%s=\"%s\": expected %s", where.empty() ? "" : (where + ": ").c_str(), s.name, text,
             s.kind == 'i' || s.kind == 'l' ? "an integer" : "a number");
}

// Preset (CONFIG) first, then every env var that names a setting.
static Config config_from_env() {
    Config c;
    const char* preset = getenv("CONFIG");
    c.preset = preset && *preset ? preset : "baseline";
    bool found = false;
    for (const Preset& p : PRESETS)
        if (c.preset == p.name) { p.apply(c); found = true; }
    if (!found) {
        std::string names;
        for (const Preset& p : PRESETS) names += std::string(names.empty() ? "" : ", ") + p.name;
        fail("CONFIG=%s: unknown preset (expected one of %s)", c.preset.c_str(), names.c_str());
    }
    for (const Setting& s : config_settings(c))
        if (const char* v = getenv(s.name)) setting_parse(s, v);
    return c;
}

// Settings as KEY=VALUE lines: printed at start, stored in checkpoints and artifacts.
static std::string config_to_text(Config& c) {
    std::string out = "CONFIG=" + c.preset + "\n";
    for (const Setting& s : config_settings(c)) {
        if (!strcmp(s.name, "WEIGHT_DECAY")) continue;  // alias of ADAM_WD
        out += std::string(s.name) + "=" + setting_value(s) + "\n";
    }
    return out;
}
static Config config_from_text(const std::string& text, const std::string& where) {
    Config c;
    std::vector<Setting> settings = config_settings(c);
    size_t pos = 0;
    while (pos < text.size()) {
        size_t nl = text.find('\n', pos);
        std::string line = text.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
        pos = nl == std::string::npos ? text.size() : nl + 1;
        if (line.empty()) continue;
        size_t eq = line.find('=');
        if (eq == std::string::npos) fail("%s: config line \"%s\" is not KEY=VALUE", where.c_str(), line.c_str());
        std::string key = line.substr(0, eq), value = line.substr(eq + 1);
        if (key == "CONFIG") { c.preset = value; continue; }
        bool known = false;
        for (const Setting& s : settings)
            if (key == s.name) { setting_parse(s, value.c_str(), where); known = true; }
        if (!known) fail("%s: unknown config key %s", where.c_str(), key.c_str());
    }
    return c;
}

// Shape and batch checks, before any work is done.
static void config_validate(const Config& c, int world) {
    auto need = [](bool ok, const char* fmt, auto... args) { if (!ok) fail(fmt, args...); };
    need(c.vocab_size > 0 && c.vocab_size <= 65536, "VOCAB_SIZE=%d: expected 1..65536 (tokens are uint16)", c.vocab_size);
    need(c.num_layers > 0, "NUM_LAYERS=%d: expected > 0", c.num_layers);
    need(c.num_heads > 0 && c.model_dim % c.num_heads == 0, "NUM_HEADS=%d must divide MODEL_DIM=%d", c.num_heads, c.model_dim);
    need(c.num_kv_heads > 0 && c.num_heads % c.num_kv_heads == 0, "NUM_KV_HEADS=%d must divide NUM_HEADS=%d", c.num_kv_heads, c.num_heads);
    need(c.head_dim() % 2 == 0, "head dim MODEL_DIM/NUM_HEADS=%d must be even for RoPE", c.head_dim());
    need(c.rope_dims >= 0 && c.rope_dims <= c.head_dim() && c.rope_dims % 2 == 0, "ROPE_DIMS=%d: expected an even number ≤ head dim %d", c.rope_dims, c.head_dim());
    need(c.mlp_hidden() > 0, "MLP_MULT=%g gives an empty MLP", c.mlp_mult);
    need(c.mlp_activation == "relu_sq" || c.mlp_activation == "leaky_relu_sq", "MLP_ACTIVATION=%s: expected relu_sq or leaky_relu_sq", c.mlp_activation.c_str());
    need(c.unique_layers >= 0 && c.unique_layers <= c.num_layers, "UNIQUE_LAYERS=%d: expected 0..NUM_LAYERS=%d", c.unique_layers, c.num_layers);
    need(c.xsa_last_n >= 0 && c.xsa_last_n <= c.num_cores(), "XSA_LAST_N=%d: expected 0..%d", c.xsa_last_n, c.num_cores());
    need(c.logit_softcap > 0, "LOGIT_SOFTCAP=%g: expected > 0", c.logit_softcap);
    need(c.bigram_vocab_size == 0 || c.bigram_vocab_size >= 2, "BIGRAM_VOCAB_SIZE=%d: expected 0 or ≥ 2", c.bigram_vocab_size);
    need(c.bigram_vocab_size == 0 || c.bigram_dim > 0, "BIGRAM_DIM=%d: expected > 0", c.bigram_dim);
    need(!(c.bigram_vocab_size > 0 && c.bigram_hash_size > 0), "BIGRAM_VOCAB_SIZE and BIGRAM_HASH_SIZE are two different bigram embeddings: set one");
    need(c.ortho_init >= 0 && c.ortho_init <= 2, "ORTHO_INIT=%d: expected 0, 1 or 2", c.ortho_init);
    need(c.train_seq_len > 0, "TRAIN_SEQ_LEN=%d: expected > 0", c.train_seq_len);
    need(c.iterations >= 0, "ITERATIONS=%d: expected ≥ 0", c.iterations);
    int accum = c.grad_accum_steps > 0 ? c.grad_accum_steps : (8 % world == 0 ? 8 / world : 0);
    need(accum > 0, "world size %d does not divide 8: set GRAD_ACCUM_STEPS", world);
    long per_micro = (long)world * accum * c.train_seq_len;
    need(c.train_batch_tokens > 0 && c.train_batch_tokens % per_micro == 0,
         "TRAIN_BATCH_TOKENS=%ld must be a multiple of world size %d × GRAD_ACCUM_STEPS %d × TRAIN_SEQ_LEN %d = %ld",
         c.train_batch_tokens, world, accum, c.train_seq_len, per_micro);
    need(c.quant_scheme == "int8" || c.quant_scheme == "mixed" || c.quant_scheme == "int6",
         "QUANT_SCHEME=%s: expected int8, mixed or int6", c.quant_scheme.c_str());
    need(c.pack == "bits" || c.pack == "bytes" || c.pack == "auto", "PACK=%s: expected bits, bytes or auto", c.pack.c_str());
    need(c.prune_frac >= 0 && c.prune_frac < 1, "PRUNE_FRAC=%g: expected [0, 1)", c.prune_frac);
    need(c.sliding == "exact" || c.sliding == "reference", "SLIDING=%s: expected exact or reference", c.sliding.c_str());
    need(c.eval_stride > 0 && c.eval_stride <= c.eval_len(), "EVAL_STRIDE=%d: expected 1..eval length %d", c.eval_stride, c.eval_len());
    need(c.eval_batch_seqs > 0, "EVAL_BATCH_SEQS=%d: expected > 0", c.eval_batch_seqs);
    need(c.qat_bits == 0 || c.qat_bits == 5 || c.qat_bits == 6 || c.qat_bits == 8, "QAT_BITS=%d: expected 0, 5, 6 or 8", c.qat_bits);
    need(!c.late_qat || c.qat_bits > 0, "LATE_QAT=1 needs QAT_BITS (5 or 6)");
    need(!c.swa_enabled || c.swa_every > 0, "SWA_EVERY=%d: expected > 0 with SWA_ENABLED=1", c.swa_every);
    need(c.ttt_chunk_size > 0 && c.ttt_eval_seq_len >= c.ttt_chunk_size, "TTT_CHUNK_SIZE=%d must be in 1..TTT_EVAL_SEQ_LEN=%d", c.ttt_chunk_size, c.ttt_eval_seq_len);
    need(c.ttt_lora_rank > 0, "TTT_LORA_RANK=%d: expected > 0", c.ttt_lora_rank);
    need(c.ttt_chunk_tokens > 0, "TTT_CHUNK_TOKENS=%d: expected > 0", c.ttt_chunk_tokens);
    need(c.ttt_batch_seqs > 0, "TTT_BATCH_SEQS=%d: expected > 0", c.ttt_batch_seqs);
    need(c.ttt_batch_size > 0, "TTT_BATCH_SIZE=%d: expected > 0", c.ttt_batch_size);
    need(c.ttt_steps >= 1 && c.ttt_n_epochs >= 1 && c.ttt_epochs >= 0, "TTT_STEPS=%d, TTT_N_EPOCHS=%d, TTT_EPOCHS=%d: expected ≥ 1, ≥ 1, ≥ 0",
         c.ttt_steps, c.ttt_n_epochs, c.ttt_epochs);
    need(c.ttt_freeze_blocks >= 0 && c.ttt_freeze_blocks <= c.num_layers, "TTT_FREEZE_BLOCKS=%d: expected 0..NUM_LAYERS=%d", c.ttt_freeze_blocks, c.num_layers);
    need(c.ttt_lora_schedule == "constant" || c.ttt_lora_schedule == "cosine_epochs",
         "TTT_LORA_SCHEDULE=%s: expected constant or cosine_epochs", c.ttt_lora_schedule.c_str());
    need(c.ttt_optimizer == "sgd" || c.ttt_optimizer == "adamw", "TTT_OPTIMIZER=%s: expected sgd or adamw", c.ttt_optimizer.c_str());
    need(c.ttt_lora_optimizer == "adam" || c.ttt_lora_optimizer == "adamw" || c.ttt_lora_optimizer == "sgd",
         "TTT_LORA_OPTIMIZER=%s: expected adam, adamw or sgd", c.ttt_lora_optimizer.c_str());
}
static int grad_accum_steps(const Config& c, int world) { return c.grad_accum_steps > 0 ? c.grad_accum_steps : 8 / world; }

// `./train_gpt settings`: every setting with its default under each preset, as a markdown table.
static void print_settings_table() {
    std::vector<Config> cs(sizeof PRESETS / sizeof PRESETS[0]);
    std::string head = "| setting |", rule = "|---|";
    for (size_t i = 0; i < cs.size(); i++) { PRESETS[i].apply(cs[i]); head += std::string(" ") + PRESETS[i].name + " |"; rule += "---|"; }
    printf("%s meaning |\n%s---|\n", head.c_str(), rule.c_str());
    std::vector<std::vector<Setting>> all;
    for (Config& c : cs) all.push_back(config_settings(c));
    for (size_t k = 0; k < all[0].size(); k++) {
        std::string row = std::string("| `") + all[0][k].name + "` |";
        for (auto& st : all) { std::string v = setting_value(st[k]); row += " " + (v.empty() ? std::string("—") : "`" + v + "`") + " |"; }
        printf("%s %s |\n", row.c_str(), all[0][k].help);
    }
}

static void config_print(Config& c) {
    log0("config: CONFIG=%s\n", c.preset.c_str());
    for (const Setting& s : config_settings(c))
        if (strcmp(s.name, "WEIGHT_DECAY")) log0("  %-28s %s\n", s.name, setting_value(s).c_str());
}

// ============================================================================================
// 3. Data: challenge shards and the reference's loader order
// ============================================================================================
// A shard is 256 little-endian int32 (magic 20240520, version 1, token count N, zeros), then N
// little-endian uint16 tokens, nothing after. Documents start with BOS (id 1); there is no EOS.

static const int SHARD_MAGIC = 20240520, SHARD_VERSION = 1, SHARD_HEADER_BYTES = 1024, BOS_ID = 1;

// Validates the header against the file size; returns N.
static long shard_header_check(const std::string& path, FILE* f) {
    int32_t header[256];
    struct stat st;
    if (fstat(fileno(f), &st) != 0) fail("cannot stat %s: %s", path.c_str(), strerror(errno));
    if (st.st_size < SHARD_HEADER_BYTES)
        fail("%s: %lld bytes is shorter than the 1024-byte shard header", path.c_str(), (long long)st.st_size);
    fread_check(header, sizeof header, f, path.c_str());
    if (header[0] != SHARD_MAGIC) fail("%s: bad magic %d (expected %d): not a token shard", path.c_str(), header[0], SHARD_MAGIC);
    if (header[1] != SHARD_VERSION) fail("%s: unsupported shard version %d (expected %d)", path.c_str(), header[1], SHARD_VERSION);
    long n = header[2];
    long long expected = SHARD_HEADER_BYTES + 2LL * n;
    if (n < 0 || st.st_size != expected)
        fail("%s: header says %ld tokens, i.e. %lld bytes, but the file has %lld bytes%s", path.c_str(), n, expected,
             (long long)st.st_size, st.st_size < expected ? " (truncated?)" : "");
    return n;
}

static std::vector<uint16_t> load_shard(const std::string& path, int vocab_size) {
    FILE* f = fopen_check(path.c_str(), "rb");
    long n = shard_header_check(path, f);
    std::vector<uint16_t> tokens(n);
    fread_check(tokens.data(), 2 * (size_t)n, f, path.c_str());
    fclose(f);
    for (long i = 0; i < n; i++)
        if (tokens[i] >= vocab_size) fail("%s: token %d at position %ld is outside the vocabulary (VOCAB_SIZE=%d)", path.c_str(), tokens[i], i, vocab_size);
    return tokens;
}

static std::vector<std::string> shard_files(const std::string& data_path, const char* split) {
    std::string pattern = data_path + "/fineweb_" + split + "_*.bin";
    std::vector<std::string> files = glob_sorted(pattern);
    if (files.empty()) fail("no %s shards match %s (set DATA_PATH, or run scripts/make_corpus or scripts/download_fineweb)", split, pattern.c_str());
    return files;
}

// The training stream: shards in sorted order, read front to back, wrapping around at the end.
struct TokenStream {
    std::vector<std::string> files;
    int vocab_size = 0, file_idx = 0;
    long pos = 0;
    std::vector<uint16_t> tokens;
    void open(const std::vector<std::string>& f, int vocab, int start_file = 0, long start_pos = 0) {
        files = f; vocab_size = vocab; file_idx = start_file; pos = start_pos;
        tokens = load_shard(files[file_idx], vocab_size);
    }
    void take(long n, std::vector<uint16_t>& out) {
        out.clear();
        while ((long)out.size() < n) {
            if (pos >= (long)tokens.size()) {
                file_idx = (file_idx + 1) % (int)files.size();
                tokens = load_shard(files[file_idx], vocab_size);
                pos = 0;
                continue;
            }
            long k = std::min(n - (long)out.size(), (long)tokens.size() - pos);
            out.insert(out.end(), tokens.begin() + pos, tokens.begin() + pos + k);
            pos += k;
        }
    }
};

// Each micro-batch takes world·(local+1) tokens; rank r keeps span r, inputs = span[:-1] and
// targets = span[1:], exactly as the reference, so the same tokens reach the same step at any
// world size with the same global batch.
struct DataLoader {
    TokenStream stream;
    int rank = 0, world = 1;
    std::vector<uint16_t> chunk;
    void next_batch(long global_tokens, int accum, std::vector<int32_t>& x, std::vector<int32_t>& y) {
        long local = global_tokens / ((long)world * accum);
        stream.take((local + 1) * world, chunk);
        const uint16_t* span = chunk.data() + (long)rank * (local + 1);
        x.resize(local); y.resize(local);
        for (long i = 0; i < local; i++) { x[i] = span[i]; y[i] = span[i + 1]; }
    }
};

// The validation stream: every val shard concatenated. The reference scores only the first
// ((N−1)/L)·L targets; we score all N−1 unless VAL_TRUNCATE_TO_SEQ=1.
static std::vector<uint16_t> load_validation_tokens(const Config& c) {
    std::vector<uint16_t> all;
    for (const std::string& path : shard_files(c.data_path, "val")) {
        std::vector<uint16_t> t = load_shard(path, c.vocab_size);
        all.insert(all.end(), t.begin(), t.end());
    }
    if (c.val_tokens_limit > 0 && (long)all.size() > c.val_tokens_limit) all.resize(c.val_tokens_limit);
    if (c.val_truncate_to_seq) {
        long usable = ((long)all.size() - 1) / c.train_seq_len * c.train_seq_len;
        if (usable <= 0) fail("validation split has %zu tokens: too short for TRAIN_SEQ_LEN=%d", all.size(), c.train_seq_len);
        all.resize(usable + 1);
    }
    if (all.size() < 2) fail("validation split under %s has %zu tokens: need at least 2", c.data_path.c_str(), all.size());
    return all;
}

// ============================================================================================
// 4. Parameters: one table with the reference's names, carved out of flat arenas
// ============================================================================================
// Every parameter lives at a fixed offset of one flat buffer (master weights, fp32); gradients,
// optimizer moments and the GPU's bf16 copy use the same offsets. The table order is the
// reference's state_dict order, so checkpoints and artifacts list tensors as PyTorch does.

enum ParamRole {
    P_TOK_EMB, P_LM_HEAD, P_BIGRAM_EMBED, P_BIGRAM_PROJ, P_BIGRAM_SCALE, P_SMEAR_GATE, P_SKIP_WEIGHTS,
    P_C_Q, P_C_K, P_C_V, P_ATTN_PROJ, P_FC, P_MLP_PROJ, P_Q_GAIN,  // per core (shared under recurrence)
    P_ATTN_SCALE, P_MLP_SCALE, P_RESID_MIX, P_ATTN_GATE, P_MLP_GATE, // per layer
    P_NUM_ROLES
};
enum ParamGroup { GROUP_TOKEN, GROUP_HEAD, GROUP_MATRIX, GROUP_SCALAR };

struct ParamSpec {
    std::string name;
    std::vector<int> shape;  // {} for a scalar
    size_t offset = 0, numel = 0;
    ParamRole role = P_TOK_EMB;
    int index = 0;           // layer or core index (0 for model-level tensors)
    ParamGroup group = GROUP_SCALAR;
    int uses = 1;            // layers that share this tensor (depth recurrence)
    int rows() const { return shape.size() == 2 ? shape[0] : 1; }
    int cols() const { return shape.empty() ? 1 : shape.back(); }
};

static bool name_matches_any(const std::string& name, const std::string& comma_patterns) {
    size_t pos = 0;
    while (pos <= comma_patterns.size()) {
        size_t comma = comma_patterns.find(',', pos);
        std::string pat = comma_patterns.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
        if (!pat.empty() && name.find(pat) != std::string::npos) return true;
        if (comma == std::string::npos) break;
        pos = comma + 1;
    }
    return false;
}

static std::vector<ParamSpec> build_param_table(const Config& c) {
    std::vector<ParamSpec> t;
    int D = c.model_dim, L = c.num_layers, NC = c.num_cores();
    auto add = [&](std::string name, std::vector<int> shape, ParamRole role, int index) {
        ParamSpec p; p.name = name; p.shape = shape; p.role = role; p.index = index;
        p.numel = 1; for (int s : shape) p.numel *= s;
        t.push_back(p);
    };
    // GPT's own parameter first, then its children in registration order (PyTorch's state_dict).
    if (c.num_skip_weights() > 0) add("skip_weights", {c.num_skip_weights(), D}, P_SKIP_WEIGHTS, 0);
    add("tok_emb.weight", {c.vocab_size, D}, P_TOK_EMB, 0);
    if (c.bigram_vocab_size > 0) {
        add("bigram.scale", {}, P_BIGRAM_SCALE, 0);
        add("bigram.embed.weight", {c.bigram_vocab_size, c.bigram_dim}, P_BIGRAM_EMBED, 0);
        if (c.bigram_dim != D) add("bigram.proj.weight", {D, c.bigram_dim}, P_BIGRAM_PROJ, 0);
    }
    if (c.bigram_hash_size > 0) add("bigram_emb.weight", {c.bigram_hash_size, D}, P_BIGRAM_EMBED, 0);
    if (c.smear) add("smear.gate", {D}, P_SMEAR_GATE, 0);
    auto add_core = [&](const std::string& pre, int i) {
        add(pre + "attn.q_gain", {c.num_heads}, P_Q_GAIN, i);
        add(pre + "attn.c_q.weight", {D, D}, P_C_Q, i);
        add(pre + "attn.c_k.weight", {c.kv_dim(), D}, P_C_K, i);
        add(pre + "attn.c_v.weight", {c.kv_dim(), D}, P_C_V, i);
        add(pre + "attn.proj.weight", {D, D}, P_ATTN_PROJ, i);
        add(pre + "mlp.fc.weight", {c.mlp_hidden(), D}, P_FC, i);
        add(pre + "mlp.proj.weight", {D, c.mlp_hidden()}, P_MLP_PROJ, i);
    };
    auto add_layer = [&](const std::string& pre, int i) {
        add(pre + "attn_scale", {D}, P_ATTN_SCALE, i);
        add(pre + "mlp_scale", {D}, P_MLP_SCALE, i);
        add(pre + "resid_mix", {2, D}, P_RESID_MIX, i);
        if (c.smear_gate) { add(pre + "attn_gate", {D}, P_ATTN_GATE, i); add(pre + "mlp_gate", {D}, P_MLP_GATE, i); }
    };
    if (c.named_cores) {  // PR #456: cores.i hold the matrices, blocks.i the per-layer vectors
        for (int i = 0; i < NC; i++) add_core("cores." + std::to_string(i) + ".", i);
        for (int l = 0; l < L; l++) add_layer("blocks." + std::to_string(l) + ".", l);
    } else {
        if (NC != L) fail("UNIQUE_LAYERS=%d needs NAMED_CORES=1 (shared blocks are named cores.i)", c.unique_layers);
        for (int l = 0; l < L; l++) {
            std::string pre = "blocks." + std::to_string(l) + ".";
            // A Block registers its own parameters before its attn and mlp children.
            add_layer(pre, l);
            add_core(pre, l);
        }
        // state_dict order within a block: attn_scale, mlp_scale, resid_mix, [gates], attn.*, mlp.*
    }
    if (!c.tie_embeddings) add("lm_head.weight", {c.vocab_size, D}, P_LM_HEAD, 0);

    size_t offset = 0;
    for (ParamSpec& p : t) {
        p.offset = offset;
        offset += (p.numel + 15) / 16 * 16;  // 64-byte alignment of every tensor for vector loads
        bool core = p.role >= P_C_Q && p.role <= P_Q_GAIN;
        p.uses = core ? (L / NC + (p.index < L % NC ? 1 : 0)) : 1;
        if (p.role == P_TOK_EMB || p.role == P_BIGRAM_EMBED) p.group = GROUP_TOKEN;
        else if (p.role == P_LM_HEAD) p.group = GROUP_HEAD;
        else if (p.shape.size() == 2 && !name_matches_any(p.name, c.control_patterns)) p.group = GROUP_MATRIX;
        else p.group = GROUP_SCALAR;
    }
    return t;
}
static size_t param_arena_size(const std::vector<ParamSpec>& t) {
    return t.empty() ? 0 : t.back().offset + (t.back().numel + 15) / 16 * 16;
}
static const ParamSpec* find_param(const std::vector<ParamSpec>& t, ParamRole role, int index = 0) {
    for (const ParamSpec& p : t) if (p.role == role && p.index == index) return &p;
    return nullptr;
}

// Named pointers into an arena. W points at matrices (bf16 copies on the GPU), V at vectors.
template <class W, class V> struct LayerWeights {
    W *c_q, *c_k, *c_v, *attn_proj, *fc, *mlp_proj;  // of this layer's core
    V *q_gain, *attn_scale, *mlp_scale, *resid_mix, *attn_gate, *mlp_gate;
};
template <class W, class V> struct Weights {
    W *tok_emb, *lm_head, *bigram_embed, *bigram_proj;
    V *bigram_scale, *smear_gate, *skip_weights;
    std::vector<LayerWeights<W, V>> layers;
};
template <class W, class V>
static Weights<W, V> point_weights(const Config& c, const std::vector<ParamSpec>& t, W* wbase, V* vbase) {
    auto w = [&](ParamRole r, int i = 0) -> W* { const ParamSpec* p = find_param(t, r, i); return p && wbase ? wbase + p->offset : nullptr; };
    auto v = [&](ParamRole r, int i = 0) -> V* { const ParamSpec* p = find_param(t, r, i); return p && vbase ? vbase + p->offset : nullptr; };
    Weights<W, V> m;
    m.tok_emb = w(P_TOK_EMB); m.lm_head = w(P_LM_HEAD); m.bigram_embed = w(P_BIGRAM_EMBED); m.bigram_proj = w(P_BIGRAM_PROJ);
    m.bigram_scale = v(P_BIGRAM_SCALE); m.smear_gate = v(P_SMEAR_GATE); m.skip_weights = v(P_SKIP_WEIGHTS);
    for (int l = 0; l < c.num_layers; l++) {
        int k = l % c.num_cores();
        m.layers.push_back({w(P_C_Q, k), w(P_C_K, k), w(P_C_V, k), w(P_ATTN_PROJ, k), w(P_FC, k), w(P_MLP_PROJ, k),
                            v(P_Q_GAIN, k), v(P_ATTN_SCALE, l), v(P_MLP_SCALE, l), v(P_RESID_MIX, l),
                            v(P_ATTN_GATE, l), v(P_MLP_GATE, l)});
    }
    return m;
}

// Orthogonal matrix as torch.nn.init.orthogonal_: QR of a Gaussian matrix (modified
// Gram–Schmidt in double), orthonormal columns when rows ≥ cols, orthonormal rows otherwise.
static void orthogonal_init(float* w, int rows, int cols, Rng& rng) {
    int m = std::max(rows, cols), n = std::min(rows, cols);  // work on the tall m×n matrix
    std::vector<double> a((size_t)m * n);
    for (double& x : a) x = rng.normal();
    for (int j = 0; j < n; j++) {  // column j: subtract projections on earlier columns, normalize
        for (int k = 0; k < j; k++) {
            double dot = 0;
            for (int i = 0; i < m; i++) dot += a[(size_t)i * n + j] * a[(size_t)i * n + k];
            for (int i = 0; i < m; i++) a[(size_t)i * n + j] -= dot * a[(size_t)i * n + k];
        }
        double norm = 0;
        for (int i = 0; i < m; i++) norm += a[(size_t)i * n + j] * a[(size_t)i * n + j];
        norm = std::sqrt(norm);
        for (int i = 0; i < m; i++) a[(size_t)i * n + j] /= norm;
    }
    for (int r = 0; r < rows; r++)
        for (int col = 0; col < cols; col++)
            w[(size_t)r * cols + col] = (float)(rows >= cols ? a[(size_t)r * n + col] : a[(size_t)col * n + r]);
}

// Initial values as the reference: zero-init output projections (and the untied head), the
// tied embedding ~ N(0, std), matrices orthogonal or PyTorch's default U(±1/√in).
static void init_params(const Config& c, const std::vector<ParamSpec>& t, float* base) {
    Rng rng(c.seed);
    for (const ParamSpec& p : t) {
        float* w = base + p.offset;
        int rows = p.rows(), cols = p.cols();
        std::fill(w, w + p.numel, 0.0f);
        switch (p.role) {
            case P_TOK_EMB: {
                double std = c.tie_embeddings ? c.tied_embed_init_std : 1.0;  // nn.Embedding default: N(0, 1)
                for (size_t i = 0; i < p.numel; i++) w[i] = (float)(std * rng.normal());
                break;
            }
            case P_BIGRAM_EMBED:  // thwu1 zero-inits its table; PR #600's nn.Embedding keeps N(0, 1)
                if (c.bigram_hash_size > 0) for (size_t i = 0; i < p.numel; i++) w[i] = (float)rng.normal();
                break;
            case P_BIGRAM_SCALE: w[0] = 0.05f; break;
            case P_SKIP_WEIGHTS: case P_ATTN_SCALE: case P_MLP_SCALE: std::fill(w, w + p.numel, 1.0f); break;
            case P_RESID_MIX: std::fill(w, w + cols, 1.0f); break;  // row 0 (x) = 1, row 1 (x0) = 0
            case P_Q_GAIN: std::fill(w, w + p.numel, c.qk_gain_init); break;
            case P_SMEAR_GATE: case P_ATTN_GATE: case P_MLP_GATE: break;  // sigmoid(0) = 0.5
            case P_ATTN_PROJ: case P_MLP_PROJ: case P_LM_HEAD: break;    // zero-init outputs
            case P_C_Q: case P_C_K: case P_C_V: case P_FC: case P_BIGRAM_PROJ: {
                // thwu1 zero-inits bigram.proj in its constructor, but _init_weights then
                // re-initializes every ≥64×64 linear, so it starts orthogonal ×1/√(2L).
                bool ortho = c.ortho_init == INIT_ORTHO_ALL ? std::min(rows, cols) > 1
                           : c.ortho_init == INIT_ORTHO_THWU1 ? rows >= 64 && cols >= 64 : false;
                if (ortho) {
                    orthogonal_init(w, rows, cols, rng);
                    if (c.ortho_init == INIT_ORTHO_THWU1 && p.role == P_BIGRAM_PROJ)
                        for (size_t i = 0; i < p.numel; i++) w[i] *= (float)(1.0 / std::sqrt(2.0 * c.num_layers));
                } else if (c.ortho_init == INIT_ORTHO_THWU1 && p.role == P_BIGRAM_PROJ && !(rows >= 64 && cols >= 64)) {
                    // too small for the orthogonal rule: the constructor's zeros stay
                } else {
                    double bound = 1.0 / std::sqrt((double)cols);  // kaiming_uniform(a=√5) of nn.Linear
                    for (size_t i = 0; i < p.numel; i++) w[i] = (float)((2.0 * rng.uniform() - 1.0) * bound);
                }
                break;
            }
            default: break;
        }
    }
}

static void print_param_table(const std::vector<ParamSpec>& t) {
    size_t total = 0, per_group[4] = {0, 0, 0, 0};
    for (const ParamSpec& p : t) { total += p.numel; per_group[p.group] += p.numel; }
    log0("model_params:%zu (token %zu, head %zu, matrix %zu, scalar %zu) in %zu tensors\n",
         total, per_group[0], per_group[1], per_group[2], per_group[3], t.size());
}

// ============================================================================================
// 5. Operations. Each one: its CPU reference forward and backward, then its CUDA kernels.
// ============================================================================================
// Conventions: rows are tokens (N = B·T, row n is position n % T of sequence n / T); matrices
// are stored [out, in] as PyTorch's nn.Linear, so a linear layer computes out = inp · Wᵀ.
// Backward functions ADD into the gradients of their inputs and parameters (callers zero them),
// so branches of the residual stream and layers sharing a block simply accumulate.
// The device tag picks the implementation: Cpu<float> (training), Cpu<double> (gradient checks).

template <class T> struct Cpu {
    using act = T;     // activations
    using mat = T;     // matrix weights as the forward reads them
    using vec = T;     // vector weights (gains, scales, mixes)
    using grad = T;    // gradients, and the master weights they update
    using stat = T;    // normalization statistics, log-sum-exps, losses
    static constexpr bool is_cuda = false;
};

static const double RMSNORM_EPS = 1.1920928955078125e-07;  // F.rms_norm(eps=None): fp32 machine epsilon
static const double XSA_EPS = 1e-12;                        // F.normalize's default eps
static const float LEAKY_SLOPE = 0.5f;

// sigmoid, shared by the CPU reference and the kernels
template <class T> static inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

#if PGOLF_CPU_REFERENCE
// --- Embedding: out[n] = table[idx[n]] -------------------------------------------------------
template <class T> static void embedding_forward(Cpu<T>, T* out, const int32_t* idx, const T* table, int N, int C) {
    for (int n = 0; n < N; n++) memcpy(out + (size_t)n * C, table + (size_t)idx[n] * C, C * sizeof(T));
}
template <class T> static void embedding_backward(Cpu<T>, T* dtable, const T* dout, const int32_t* idx, int N, int C) {
    for (int n = 0; n < N; n++)  // sequential: rows that share an index add up in a fixed order
        for (int c = 0; c < C; c++) dtable[(size_t)idx[n] * C + c] += dout[(size_t)n * C + c];
}
#endif

// --- BigramHash indices ------------------------------------------------------------------------
// thwu1: bucket = (36313·t[i]) xor (27191·t[i−1]) mod (buckets − 1); the first position of each
// sequence has no previous token and gets the last bucket. PR #600: (prev·V + cur) mod buckets
// with prev = 0 at the first position.
HD static inline int32_t bigram_bucket(int32_t cur, int32_t prev, int pos, int buckets, int vocab, bool pr600_hash) {
    if (pr600_hash) return (int32_t)(((int64_t)(pos ? prev : 0) * vocab + cur) % buckets);
    if (pos == 0) return buckets - 1;
    // the reference multiplies in int32; identical for ids < 59139, where the products fit
    return (int32_t)(((int64_t)36313 * cur ^ (int64_t)27191 * prev) % (buckets - 1));
}
#if PGOLF_CPU_REFERENCE
template <class T> static void bigram_lookup(Cpu<T>, int32_t* out, const int32_t* idx, int B, int T_, int buckets, int vocab, bool pr600_hash) {
    for (int n = 0; n < B * T_; n++) out[n] = bigram_bucket(idx[n], n % T_ ? idx[n - 1] : 0, n % T_, buckets, vocab, pr600_hash);
}
#endif

#if PGOLF_CPU_REFERENCE
// --- RMSNorm (no weight): out = x / sqrt(mean(x²) + eps) over rows of C ----------------------
template <class T> static void rmsnorm_forward(Cpu<T>, T* out, T* rstd, const T* inp, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const T* x = inp + (size_t)n * C;
        T ss = 0;
        for (int c = 0; c < C; c++) ss += x[c] * x[c];
        T r = T(1) / std::sqrt(ss / C + T(RMSNORM_EPS));
        rstd[n] = r;
        for (int c = 0; c < C; c++) out[(size_t)n * C + c] = x[c] * r;
    }
}
// dx = r·dy − r³·x·(dy·x)/C
template <class T> static void rmsnorm_backward(Cpu<T>, T* dinp, const T* dout, const T* inp, const T* rstd, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const T *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
        T r = rstd[n], dot = 0;
        for (int c = 0; c < C; c++) dot += dy[c] * x[c];
        T k = r * r * r * dot / C;
        for (int c = 0; c < C; c++) dinp[(size_t)n * C + c] += r * dy[c] - k * x[c];
    }
}

// --- Linear layer: out = inp · Wᵀ (W is [OC, IC]) -------------------------------------------------
// All three products of a linear layer go through one blocked kernel, C (+)= A·B with B
// row-major: 4×16 tiles of C stay in registers while k runs, and the loop over the 16 columns
// vectorizes. Every C element sums its k terms in order, so results do not depend on threads.
template <class T> static void gemm_cpu(T* C, const T* A, long a_row, long a_col, const T* B, int M, int Nc, int K, bool accumulate) {
    const int MR = 4, NR = 16;
    #pragma omp parallel for schedule(static)
    for (int m0 = 0; m0 < M; m0 += MR) {
        int mr = std::min(MR, M - m0);
        for (int j0 = 0; j0 < Nc; j0 += NR) {
            int nr = std::min(NR, Nc - j0);
            T acc[MR][NR] = {};
            if (mr == MR && nr == NR) {  // full tile: fixed trip counts let the compiler keep acc in registers
                for (int k = 0; k < K; k++) {
                    const T* b = B + (size_t)k * Nc + j0;
                    for (int r = 0; r < MR; r++) {
                        T a = A[(size_t)(m0 + r) * a_row + (size_t)k * a_col];
                        #pragma omp simd
                        for (int j = 0; j < NR; j++) acc[r][j] += a * b[j];
                    }
                }
            } else {
                for (int k = 0; k < K; k++)
                    for (int r = 0; r < mr; r++) {
                        T a = A[(size_t)(m0 + r) * a_row + (size_t)k * a_col];
                        for (int j = 0; j < nr; j++) acc[r][j] += a * B[(size_t)k * Nc + j0 + j];
                    }
            }
            for (int r = 0; r < mr; r++)
                for (int j = 0; j < nr; j++) {
                    T* c = C + (size_t)(m0 + r) * Nc + j0 + j;
                    *c = accumulate ? *c + acc[r][j] : acc[r][j];
                }
        }
    }
}
template <class T> static void matmul_forward(Cpu<T>, T* out, const T* inp, const T* w, int N, int IC, int OC, bool accumulate = false) {
    std::vector<T> wt((size_t)IC * OC);  // Wᵀ, so the kernel's inner loop runs along contiguous outputs
    for (int o = 0; o < OC; o++)
        for (int i = 0; i < IC; i++) wt[(size_t)i * OC + o] = w[(size_t)o * IC + i];
    gemm_cpu(out, inp, IC, 1, wt.data(), N, OC, IC, accumulate);
}
// dinp += dout · W ; dW += doutᵀ · inp   (either may be null: frozen weights, or input of no interest)
template <class T> static void matmul_backward(Cpu<T>, T* dinp, T* dw, const T* dout, const T* inp, const T* w, int N, int IC, int OC) {
    if (dinp) gemm_cpu(dinp, dout, OC, 1, w, N, IC, OC, true);
    if (dw) gemm_cpu(dw, dout, 1, OC, inp, OC, IC, N, true);
}
#endif

// --- Rotary angles -------------------------------------------------------------------------------
// Pair i of the first rd dims of a head rotates by pos·base^(−2i/rd): x1 = x[i], x2 = x[i+rd/2].
static double rope_inv_freq(int i, int rd, float base) {
    float e = (float)(2 * i) / (float)rd;  // the reference builds inv_freq in fp32
    return (double)(1.0f / std::pow(base, e));
}

#if PGOLF_CPU_REFERENCE
// cos and sin of every (position, pair), computed once per call
template <class T> static void rope_table(std::vector<T>& cs, std::vector<T>& sn, int T_, int rd, float base) {
    int half = rd / 2;
    cs.resize((size_t)T_ * half); sn.resize((size_t)T_ * half);
    for (int pos = 0; pos < T_; pos++)
        for (int i = 0; i < half; i++) {
            T ang = T(pos * rope_inv_freq(i, rd, base));
            cs[(size_t)pos * half + i] = std::cos(ang); sn[(size_t)pos * half + i] = std::sin(ang);
        }
}

// --- Query/key preparation: per-head RMSNorm, partial RoPE, per-head gain ------------------------
// x is [N, nh·hd] straight from the projection; out = gain[h] · rope(rmsnorm(x_h)).
// rstd is [N, nh]. gain may be null (keys).
template <class T> static void qk_norm_rope_forward(Cpu<T>, T* out, T* rstd, const T* x, const T* gain,
                                                     int N, int T_, int nh, int hd, int rd, float base) {
    int half = rd / 2;
    std::vector<T> cst, snt;
    rope_table(cst, snt, T_, rd, base);
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        int pos = n % T_;
        for (int h = 0; h < nh; h++) {
            const T* xi = x + (size_t)n * nh * hd + h * hd;
            T* yo = out + (size_t)n * nh * hd + h * hd;
            T ss = 0;
            for (int d = 0; d < hd; d++) ss += xi[d] * xi[d];
            T r = T(1) / std::sqrt(ss / hd + T(RMSNORM_EPS));
            rstd[(size_t)n * nh + h] = r;
            T g = gain ? gain[h] : T(1);
            for (int i = 0; i < half; i++) {
                T cs = cst[(size_t)pos * half + i], sn = snt[(size_t)pos * half + i];
                T x1 = xi[i] * r, x2 = xi[i + half] * r;
                yo[i] = g * (x1 * cs + x2 * sn);
                yo[i + half] = g * (-x1 * sn + x2 * cs);
            }
            for (int d = rd; d < hd; d++) yo[d] = g * xi[d] * r;
        }
    }
}
template <class T> static void qk_norm_rope_backward(Cpu<T>, T* dx, T* dgain, const T* dout, const T* x, const T* rstd,
                                                      const T* gain, int N, int T_, int nh, int hd, int rd, float base) {
    int half = rd / 2;
    std::vector<T> cst, snt;
    rope_table(cst, snt, T_, rd, base);
    std::vector<T> dgain_rows((size_t)N * nh, T(0));
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        int pos = n % T_;
        std::vector<T> dn(hd);
        for (int h = 0; h < nh; h++) {
            const T* xi = x + (size_t)n * nh * hd + h * hd;
            const T* dy = dout + (size_t)n * nh * hd + h * hd;
            T r = rstd[(size_t)n * nh + h], g = gain ? gain[h] : T(1), dg = 0;
            for (int i = 0; i < half; i++) {  // undo the rotation: dn = Rᵀ·dy, and dgain = dy·(R·n)
                T cs = cst[(size_t)pos * half + i], sn = snt[(size_t)pos * half + i];
                T x1 = xi[i] * r, x2 = xi[i + half] * r;
                dg += dy[i] * (x1 * cs + x2 * sn) + dy[i + half] * (-x1 * sn + x2 * cs);
                dn[i] = g * (dy[i] * cs - dy[i + half] * sn);
                dn[i + half] = g * (dy[i] * sn + dy[i + half] * cs);
            }
            for (int d = rd; d < hd; d++) { dg += dy[d] * xi[d] * r; dn[d] = g * dy[d]; }
            dgain_rows[(size_t)n * nh + h] = dg;
            T dot = 0;
            for (int d = 0; d < hd; d++) dot += dn[d] * xi[d];
            T k = r * r * r * dot / hd;
            for (int d = 0; d < hd; d++) dx[(size_t)n * nh * hd + h * hd + d] += r * dn[d] - k * xi[d];
        }
    }
    if (dgain)
        for (int n = 0; n < N; n++)
            for (int h = 0; h < nh; h++) dgain[h] += dgain_rows[(size_t)n * nh + h];
}

// --- Causal attention with grouped KV heads -------------------------------------------------------
// q, out: [B, T, H, hd]; k, v: [B, T, Hk, hd]; query head h reads kv head h / (H/Hk).
// The CPU reference works head by head in matrix form: S = QKᵀ/√hd, P = softmax over j ≤ t,
// O = PV. lse[b, h, t] = log Σ_j exp(S_tj) lets the backward rebuild P instead of storing it.

// Copies the [T, hd] slice of head `h` out of an interleaved [B, T, nh, hd] tensor (and back).
template <class T> static void head_gather(T* dst, const T* src, int b, int h, int T_, int nh, int hd) {
    for (int t = 0; t < T_; t++) memcpy(dst + (size_t)t * hd, src + (((size_t)b * T_ + t) * nh + h) * hd, hd * sizeof(T));
}
template <class T> static void head_scatter_add(T* dst, const T* src, int b, int h, int T_, int nh, int hd) {
    for (int t = 0; t < T_; t++)
        for (int i = 0; i < hd; i++) dst[(((size_t)b * T_ + t) * nh + h) * hd + i] += src[(size_t)t * hd + i];
}
template <class T> static void transpose(T* dst, const T* src, int rows, int cols) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) dst[(size_t)c * rows + r] = src[(size_t)r * cols + c];
}

template <class T> static void attention_forward(Cpu<T>, T* out, T* lse, const T* q, const T* k, const T* v,
                                                  int B, int T_, int H, int Hk, int hd) {
    T scale = T(1) / std::sqrt(T(hd));
    int group = H / Hk;
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            std::vector<T> Q((size_t)T_ * hd), K((size_t)T_ * hd), Kt((size_t)hd * T_), V((size_t)T_ * hd), S((size_t)T_ * T_), O((size_t)T_ * hd);
            head_gather(Q.data(), q, b, h, T_, H, hd);
            head_gather(K.data(), k, b, h / group, T_, Hk, hd);
            head_gather(V.data(), v, b, h / group, T_, Hk, hd);
            transpose(Kt.data(), K.data(), T_, hd);
            gemm_cpu(S.data(), Q.data(), hd, 1, Kt.data(), T_, T_, hd, false);  // S = Q Kᵀ
            for (int t = 0; t < T_; t++) {  // causal softmax of row t over j ≤ t
                T* row = S.data() + (size_t)t * T_;
                T mx = -INFINITY;
                for (int j = 0; j <= t; j++) { row[j] *= scale; mx = std::max(mx, row[j]); }
                T sum = 0;
                for (int j = 0; j <= t; j++) { row[j] = std::exp(row[j] - mx); sum += row[j]; }
                for (int j = 0; j <= t; j++) row[j] /= sum;
                for (int j = t + 1; j < T_; j++) row[j] = 0;
                lse[((size_t)b * H + h) * T_ + t] = mx + std::log(sum);
            }
            gemm_cpu(O.data(), S.data(), T_, 1, V.data(), T_, hd, T_, false);  // O = P V
            for (int t = 0; t < T_; t++) memcpy(out + (((size_t)b * T_ + t) * H + h) * hd, O.data() + (size_t)t * hd, hd * sizeof(T));
        }
}
// P from S and lse; dP = dO Vᵀ; dS = P ⊙ (dP − rowsum(dO ⊙ O)); dQ = dS K/√hd; dK = dSᵀ Q/√hd; dV = Pᵀ dO.
template <class T> static void attention_backward(Cpu<T>, T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k,
                                                   const T* v, const T* out, const T* lse, int B, int T_, int H, int Hk, int hd) {
    T scale = T(1) / std::sqrt(T(hd));
    int group = H / Hk;
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int g = 0; g < Hk; g++) {  // a thread owns one kv head, so its dK/dV sums are race-free
            size_t th = (size_t)T_ * hd;
            std::vector<T> Q(th), K(th), Kt(th), V(th), Vt(th), dO(th), O(th), S((size_t)T_ * T_), dP((size_t)T_ * T_);
            std::vector<T> dQ(th), dK(th), dV(th);
            head_gather(K.data(), k, b, g, T_, Hk, hd);
            head_gather(V.data(), v, b, g, T_, Hk, hd);
            transpose(Kt.data(), K.data(), T_, hd);
            transpose(Vt.data(), V.data(), T_, hd);
            for (int h = g * group; h < (g + 1) * group; h++) {
                head_gather(Q.data(), q, b, h, T_, H, hd);
                head_gather(dO.data(), dout, b, h, T_, H, hd);
                head_gather(O.data(), out, b, h, T_, H, hd);
                gemm_cpu(S.data(), Q.data(), hd, 1, Kt.data(), T_, T_, hd, false);   // S = Q Kᵀ
                gemm_cpu(dP.data(), dO.data(), hd, 1, Vt.data(), T_, T_, hd, false); // dP = dO Vᵀ
                for (int t = 0; t < T_; t++) {
                    T L = lse[((size_t)b * H + h) * T_ + t], Dt = 0;
                    for (int i = 0; i < hd; i++) Dt += dO[(size_t)t * hd + i] * O[(size_t)t * hd + i];
                    T *srow = S.data() + (size_t)t * T_, *dprow = dP.data() + (size_t)t * T_;
                    for (int j = 0; j < T_; j++) {
                        T p = j <= t ? std::exp(srow[j] * scale - L) : T(0);
                        srow[j] = p;                             // S now holds P
                        dprow[j] = p * (dprow[j] - Dt) * scale;  // dP now holds dS/√hd
                    }
                }
                gemm_cpu(dQ.data(), dP.data(), T_, 1, K.data(), T_, hd, T_, false);  // dQ = dS K
                gemm_cpu(dK.data(), dP.data(), 1, T_, Q.data(), T_, hd, T_, true);   // dK += dSᵀ Q
                gemm_cpu(dV.data(), S.data(), 1, T_, dO.data(), T_, hd, T_, true);   // dV += Pᵀ dO
                head_scatter_add(dq, dQ.data(), b, h, T_, H, hd);
            }
            head_scatter_add(dk, dK.data(), b, g, T_, Hk, hd);
            head_scatter_add(dv, dV.data(), b, g, T_, Hk, hd);
        }
}

// --- XSA: remove from each head's output its component along the token's own value vector ------
// y_h = a_h − (a_h·v̂)v̂ with v̂ = v_g/max(|v_g|, eps), g the head's kv group.
template <class T> static void xsa_forward(Cpu<T>, T* out, const T* a, const T* v, int N, int H, int Hk, int hd) {
    int group = H / Hk;
    #pragma omp parallel for
    for (int n = 0; n < N; n++)
        for (int h = 0; h < H; h++) {
            const T* vg = v + ((size_t)n * Hk + h / group) * hd;
            const T* ah = a + ((size_t)n * H + h) * hd;
            T nrm = 0;
            for (int i = 0; i < hd; i++) nrm += vg[i] * vg[i];
            T inv = T(1) / std::max(std::sqrt(nrm), T(XSA_EPS)), s = 0;
            for (int i = 0; i < hd; i++) s += ah[i] * vg[i] * inv;
            for (int i = 0; i < hd; i++) out[((size_t)n * H + h) * hd + i] = ah[i] - s * vg[i] * inv;
        }
}
// With u = v̂: da += dy − (dy·u)u; du = −Σ_heads [(a·u)dy + (dy·u)a]; dv += (du − (du·u)u)/|v|
template <class T> static void xsa_backward(Cpu<T>, T* da, T* dv, const T* dout, const T* a, const T* v, int N, int H, int Hk, int hd) {
    int group = H / Hk;
    #pragma omp parallel for
    for (int n = 0; n < N; n++)
        for (int g = 0; g < Hk; g++) {
            const T* vg = v + ((size_t)n * Hk + g) * hd;
            T nrm = 0;
            for (int i = 0; i < hd; i++) nrm += vg[i] * vg[i];
            nrm = std::sqrt(nrm);
            T inv = T(1) / std::max(nrm, T(XSA_EPS));
            std::vector<T> u(hd), du(hd, T(0));
            for (int i = 0; i < hd; i++) u[i] = vg[i] * inv;
            for (int h = g * group; h < (g + 1) * group; h++) {
                const T *ah = a + ((size_t)n * H + h) * hd, *dy = dout + ((size_t)n * H + h) * hd;
                T au = 0, du_dot = 0;
                for (int i = 0; i < hd; i++) { au += ah[i] * u[i]; du_dot += dy[i] * u[i]; }
                for (int i = 0; i < hd; i++) {
                    da[((size_t)n * H + h) * hd + i] += dy[i] - du_dot * u[i];
                    du[i] -= au * dy[i] + du_dot * ah[i];
                }
            }
            if (nrm > XSA_EPS) {  // below eps the normalization is a constant scale 1/eps
                T duu = 0;
                for (int i = 0; i < hd; i++) duu += du[i] * u[i];
                for (int i = 0; i < hd; i++) dv[((size_t)n * Hk + g) * hd + i] += (du[i] - duu * u[i]) * inv;
            } else {
                for (int i = 0; i < hd; i++) dv[((size_t)n * Hk + g) * hd + i] += du[i] * inv;
            }
        }
}

// --- Residual lanes: out = mix[0]⊙x + mix[1]⊙x0 ---------------------------------------------------
template <class T> static void resid_mix_forward(Cpu<T>, T* out, const T* x, const T* x0, const T* mix, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            size_t i = (size_t)n * C + c;
            out[i] = mix[c] * x[i] + mix[C + c] * x0[i];
        }
}
template <class T> static void resid_mix_backward(Cpu<T>, T* dx, T* dx0, T* dmix, const T* dout, const T* x, const T* x0,
                                                   const T* mix, int N, int C) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            size_t i = (size_t)n * C + c;
            dx[i] += mix[c] * dout[i];
            dx0[i] += mix[C + c] * dout[i];
            if (dmix) { dmix[c] += dout[i] * x[i]; dmix[C + c] += dout[i] * x0[i]; }  // null: frozen base (LoRA TTT)
        }
}

// --- Scaled branch: out = res + scale ⊙ σ(gate) ⊙ branch -----------------------------------------
// Attention/MLP outputs (scale per channel, optional PR #600 gate), U-Net skips (no gate), and the
// BigramHash term (one scalar scale: scale_stride 0).
template <class T> static void branch_add_forward(Cpu<T>, T* out, const T* res, const T* branch, const T* scale,
                                                   const T* gate, int N, int C, int scale_stride = 1) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            size_t i = (size_t)n * C + c;
            T s = scale[c * scale_stride] * (gate ? sigmoid(gate[c]) : T(1));
            out[i] = res[i] + s * branch[i];
        }
}
template <class T> static void branch_add_backward(Cpu<T>, T* dres, T* dbranch, T* dscale, T* dgate, const T* dout,
                                                    const T* branch, const T* scale, const T* gate, int N, int C,
                                                    int scale_stride = 1) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            size_t i = (size_t)n * C + c;
            T sg = gate ? sigmoid(gate[c]) : T(1), sc = scale[c * scale_stride];
            if (dres) dres[i] += dout[i];
            dbranch[i] += sc * sg * dout[i];
            if (dscale) dscale[c * scale_stride] += dout[i] * sg * branch[i];
            if (dgate) dgate[c] += dout[i] * sc * branch[i] * sg * (T(1) - sg);
        }
}

// --- SmearGate: out[t] = (1−g)⊙x[t] + g⊙x[t−1], g = σ(gate), x[−1] = 0 within each sequence -----
template <class T> static void smear_forward(Cpu<T>, T* out, const T* x, const T* gate, int N, int T_, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            T g = sigmoid(gate[c]), prev = n % T_ ? x[(size_t)(n - 1) * C + c] : T(0);
            out[(size_t)n * C + c] = (T(1) - g) * x[(size_t)n * C + c] + g * prev;
        }
}
template <class T> static void smear_backward(Cpu<T>, T* dx, T* dgate, const T* dout, const T* x, const T* gate, int N, int T_, int C) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            T g = sigmoid(gate[c]), prev = n % T_ ? x[(size_t)(n - 1) * C + c] : T(0);
            T d = dout[(size_t)n * C + c];
            dx[(size_t)n * C + c] += (T(1) - g) * d;
            if (n % T_) dx[(size_t)(n - 1) * C + c] += g * d;
            if (dgate) dgate[c] += d * (prev - x[(size_t)n * C + c]) * g * (T(1) - g);
        }
}

// --- MLP activation: relu(h)² or leaky_relu(h, 0.5)² ----------------------------------------------
template <class T> static void mlp_act_forward(Cpu<T>, T* out, const T* h, size_t n, bool leaky) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        T a = h[i] > 0 ? h[i] : (leaky ? T(LEAKY_SLOPE) * h[i] : T(0));
        out[i] = a * a;
    }
}
template <class T> static void mlp_act_backward(Cpu<T>, T* dh, const T* dout, const T* h, size_t n, bool leaky) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        T slope = h[i] > 0 ? T(1) : (leaky ? T(LEAKY_SLOPE) : T(0));
        dh[i] += dout[i] * T(2) * slope * slope * h[i];  // d/dh (slope·h)² = 2·slope²·h
    }
}

// --- Soft-capped cross-entropy: z = cap·tanh(l/cap), loss = logsumexp(z) − z[y] ------------------
// Writes each row's loss; when weights is given, also overwrites the logits with
// dloss/dlogits = w·(softmax(z) − onehot(y))·(1 − tanh²(l/cap)) for the backward pass.
template <class T> static void softcap_ce(Cpu<T>, T* losses, T* logits, const int32_t* targets, const float* weights,
                                          int N, int V, float cap) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        T* l = logits + (size_t)n * V;
        T mx = -INFINITY;
        for (int i = 0; i < V; i++) { l[i] = T(cap) * std::tanh(l[i] / T(cap)); mx = std::max(mx, l[i]); }
        T sum = 0;
        for (int i = 0; i < V; i++) sum += std::exp(l[i] - mx);
        T lse = mx + std::log(sum);
        int y = targets[n];
        losses[n] = lse - l[y];
        if (weights) {
            T w = weights[n];
            for (int i = 0; i < V; i++) {
                T th = l[i] / T(cap), p = std::exp(l[i] - lse);
                l[i] = w * (p - (i == y ? T(1) : T(0))) * (T(1) - th * th);
            }
        }
    }
}
#endif  // PGOLF_CPU_REFERENCE

// ============================================================================================
// 6. The model: parameters, activations, LoRA adapters; forward and backward written once
// ============================================================================================

// One allocation per arena, carved into named tensors. A first pass with base == nullptr only
// measures, so the layout (and its byte count, printed at start) is known before allocating.
struct Arena {
    uint8_t* base = nullptr;
    size_t used = 0, cap = 0;
    template <class X> X* take(size_t n) {
        size_t at = (used + 255) / 256 * 256;  // 256-byte aligned tensors
        used = at + n * sizeof(X);
        if (!base) return nullptr;
        if (used > cap) fail("internal: arena overflow (%zu > %zu bytes)", used, cap);
        return (X*)(base + at);
    }
};
#if PGOLF_CPU_REFERENCE
template <class T> static void* device_alloc(Cpu<T>, size_t bytes) {
    void* p = calloc(1, bytes ? bytes : 1);
    if (!p) fail("out of host memory allocating %.1f MiB", bytes / 1048576.0);
    return p;
}
template <class T> static void device_free(Cpu<T>, void* p) { free(p); }
template <class T> static void device_zero(Cpu<T>, void* p, size_t bytes) { memset(p, 0, bytes); }
template <class T, class X> static void to_device(Cpu<T>, X* dst, const X* src, size_t n) { memcpy(dst, src, n * sizeof(X)); }
template <class T, class X> static void to_host(Cpu<T>, X* dst, const X* src, size_t n) { memcpy(dst, src, n * sizeof(X)); }
template <class T, class X> static void device_copy(Cpu<T>, X* dst, const X* src, size_t n) { memcpy(dst, src, n * sizeof(X)); }
#endif

// Activations of one forward pass over B sequences of T tokens, kept for the backward.
template <class D> struct LayerActs {
    using A = typename D::act; using S = typename D::stat;
    A *x_in, *xm, *n1, *q, *k, *v, *qr, *kr, *ya, *y, *a, *xa, *n2, *h, *u, *m, *x_out;
    S *r1, *qrs, *krs, *lse, *r2;
};
template <class D> struct Acts {
    using A = typename D::act; using S = typename D::stat;
    int B = 0, T = 0;                       // capacity
    int32_t *inputs, *targets, *bigram_idx;
    float* loss_weights;                    // dloss/dnll per position (null: no backward)
    A *e_tok, *bigram_h, *bigram_p, *e, *xn0, *x0, *hf, *logits;
    S *r0, *rf, *losses;
    std::vector<LayerActs<D>> layers;
    // backward scratch
    A *dx, *dx0, *dxa, *dxm, *dn, *dq, *dk, *dv, *dqr, *dkr, *dy, *dya, *da, *dh, *du, *dm, *de, *dbh, *dbp;
    std::vector<A*> dskips;                 // gradient flowing back into each encoder output
};

template <class D> static void carve_acts(Arena& ar, Acts<D>& a, const Config& c, int B, int T) {
    using A = typename D::act; using S = typename D::stat;
    size_t N = (size_t)B * T, Dm = c.model_dim, KV = c.kv_dim(), F = c.mlp_hidden(), H = c.num_heads, Hk = c.num_kv_heads;
    a.B = B; a.T = T;
    a.inputs = ar.take<int32_t>(N); a.targets = ar.take<int32_t>(N); a.bigram_idx = ar.take<int32_t>(N);
    a.loss_weights = ar.take<float>(N);
    a.e_tok = ar.take<A>(N * Dm);
    a.bigram_h = c.bigram_vocab_size ? ar.take<A>(N * c.bigram_dim) : nullptr;
    a.bigram_p = (c.bigram_vocab_size || c.bigram_hash_size) ? ar.take<A>(N * Dm) : nullptr;
    a.e = ar.take<A>(N * Dm); a.xn0 = ar.take<A>(N * Dm); a.r0 = ar.take<S>(N);
    a.x0 = c.smear ? ar.take<A>(N * Dm) : a.xn0;
    a.layers.assign(c.num_layers, {});
    int enc = c.num_encoder_layers();
    for (int l = 0; l < c.num_layers; l++) {
        LayerActs<D>& L = a.layers[l];
        bool skip_in = l >= enc && (l - enc) < c.num_skip_weights();
        L.x_in = (l == 0 || skip_in) ? ar.take<A>(N * Dm) : a.layers[l - 1].x_out;
        L.xm = ar.take<A>(N * Dm); L.n1 = ar.take<A>(N * Dm); L.r1 = ar.take<S>(N);
        L.q = ar.take<A>(N * Dm); L.k = ar.take<A>(N * KV); L.v = ar.take<A>(N * KV);
        L.qr = ar.take<A>(N * Dm); L.kr = ar.take<A>(N * KV); L.qrs = ar.take<S>(N * H); L.krs = ar.take<S>(N * Hk);
        L.ya = ar.take<A>(N * Dm); L.lse = ar.take<S>(N * H);
        bool xsa = (l % c.num_cores()) >= c.num_cores() - c.xsa_last_n;
        L.y = xsa ? ar.take<A>(N * Dm) : L.ya;
        L.a = ar.take<A>(N * Dm); L.xa = ar.take<A>(N * Dm); L.n2 = ar.take<A>(N * Dm); L.r2 = ar.take<S>(N);
        L.h = ar.take<A>(N * F); L.u = ar.take<A>(N * F); L.m = ar.take<A>(N * Dm); L.x_out = ar.take<A>(N * Dm);
    }
    a.hf = ar.take<A>(N * Dm); a.rf = ar.take<S>(N);
    a.logits = ar.take<A>(N * c.vocab_size); a.losses = ar.take<S>(N);
    a.dx = ar.take<A>(N * Dm); a.dx0 = ar.take<A>(N * Dm); a.dxa = ar.take<A>(N * Dm); a.dxm = ar.take<A>(N * Dm);
    a.dn = ar.take<A>(N * Dm); a.dq = ar.take<A>(N * Dm); a.dk = ar.take<A>(N * KV); a.dv = ar.take<A>(N * KV);
    a.dqr = ar.take<A>(N * Dm); a.dkr = ar.take<A>(N * KV); a.dy = ar.take<A>(N * Dm); a.dya = ar.take<A>(N * Dm);
    a.da = ar.take<A>(N * Dm); a.dh = ar.take<A>(N * F); a.du = ar.take<A>(N * F); a.dm = ar.take<A>(N * Dm);
    a.de = ar.take<A>(N * Dm);
    a.dbh = c.bigram_vocab_size ? ar.take<A>(N * c.bigram_dim) : nullptr;
    a.dbp = (c.bigram_vocab_size || c.bigram_hash_size) ? ar.take<A>(N * Dm) : nullptr;
    a.dskips.assign(c.num_skip_weights(), nullptr);
    for (int i = 0; i < c.num_skip_weights(); i++) a.dskips[i] = ar.take<A>(N * Dm);
}

// Per-document LoRA adapters for test-time training: on target linear y = W x of document b,
// y += s · B_b (A_b x), with A_b [rank, in] and B_b [out, rank]; B = 0 at every reset.
enum LoraTarget { LORA_Q, LORA_K, LORA_V, LORA_O, LORA_UP, LORA_DOWN, LORA_HEAD, LORA_NUM };
static const char* LORA_TARGET_NAMES[LORA_NUM] = {"q", "k", "v", "o", "mlp_up", "mlp_down", "lm_head"};
template <class D> struct Lora {
    using G = typename D::grad; using M = typename D::mat; using A_ = typename D::act;
    int docs = 0, rank = 0;
    float scale = 1.0f;
    bool on[LORA_NUM] = {};
    int in_dim[LORA_NUM], out_dim[LORA_NUM];
    // [target][layer] (the head has one "layer"): parameters (master), their compute copies, grads
    std::vector<G*> A[LORA_NUM], B[LORA_NUM], dA[LORA_NUM], dB[LORA_NUM];
    std::vector<M*> Ac[LORA_NUM], Bc[LORA_NUM];
    std::vector<A_*> tmp[LORA_NUM];     // s·(x A_bᵀ) per layer, [N, rank], kept for the backward
    A_* dtmp = nullptr;                  // scratch [N, rank]
    size_t nparams = 0;
    G *params = nullptr, *grads = nullptr;  // all A and B, contiguous (optimizer state mirrors it)
    M* compute = nullptr;
};

template <class D> struct Model {
    using G = typename D::grad; using M = typename D::mat; using V = typename D::vec;
    Config cfg;
    std::vector<ParamSpec> table;
    size_t nparams = 0;                 // arena length in elements (with alignment padding)
    G* params = nullptr;                // master weights
    G* grads = nullptr;
    M* compute_mat = nullptr;           // weights as the forward reads them (QAT / bf16 copies)
    V* compute_vec = nullptr;
    Weights<M, V> w;
    Weights<G, G> g;
    Acts<D> acts;
    void* act_memory = nullptr;
    size_t act_bytes = 0;
    bool qat_active = false;
};

template <class D> static void model_init(D dev, Model<D>& m, const Config& c, int B, int T) {
    m.cfg = c;
    m.table = build_param_table(c);
    m.nparams = param_arena_size(m.table);
    m.params = (typename D::grad*)device_alloc(dev, m.nparams * sizeof(typename D::grad));
    m.grads = (typename D::grad*)device_alloc(dev, m.nparams * sizeof(typename D::grad));
    std::vector<float> host(m.nparams, 0.0f);
    init_params(c, m.table, host.data());
    std::vector<typename D::grad> conv(host.begin(), host.end());
    to_device(dev, m.params, conv.data(), m.nparams);
    model_bind_compute(dev, m);
    m.g = point_weights(c, m.table, m.grads, m.grads);
    Arena ar;
    carve_acts(ar, m.acts, c, B, T);
    m.act_bytes = ar.used;
    ar.base = (uint8_t*)(m.act_memory = device_alloc(dev, ar.used)); ar.cap = ar.used; ar.used = 0;
    carve_acts(ar, m.acts, c, B, T);
}

template <class D> static void refresh_compute_weights(D dev, Model<D>& m, bool qat);
template <class D> static void model_free(D dev, Model<D>& m) {
    refresh_compute_weights(dev, m, false);  // drops a QAT copy
    if (m.compute_mat != (void*)m.params) device_free(dev, m.compute_mat);
    device_free(dev, m.params); device_free(dev, m.grads); device_free(dev, m.act_memory);
    m.params = m.grads = nullptr; m.compute_mat = nullptr; m.compute_vec = nullptr; m.act_memory = nullptr;
}

#if PGOLF_CPU_REFERENCE
// On the CPU the forward reads the master weights directly, or a fake-quantized copy under QAT.
template <class T> static void model_bind_compute(Cpu<T>, Model<Cpu<T>>& m) {
    m.compute_mat = m.compute_vec = m.params;
    m.w = point_weights(m.cfg, m.table, m.compute_mat, m.compute_vec);
}
#endif

// LoRA targets run their delta through the same matmul as the model.
template <class D> static void lora_forward(D dev, Lora<D>* lo, int t, int layer, typename D::act* out,
                                            const typename D::act* x, int T) {
    if (!lo || !lo->on[t]) return;
    int in = lo->in_dim[t], out_d = lo->out_dim[t], r = lo->rank;
    for (int b = 0; b < lo->docs; b++) {
        typename D::act* tmp = lo->tmp[t][layer] + (size_t)b * T * r;
        matmul_forward(dev, tmp, x + (size_t)b * T * in, lo->Ac[t][layer] + (size_t)b * r * in, T, in, r);
        if (lo->scale != 1.0f) scale_inplace(dev, tmp, (size_t)T * r, lo->scale);
        matmul_forward(dev, out + (size_t)b * T * out_d, tmp, lo->Bc[t][layer] + (size_t)b * out_d * r, T, r, out_d, true);
    }
}
template <class D> static void lora_backward(D dev, Lora<D>* lo, int t, int layer, typename D::act* dx,
                                             const typename D::act* dout, const typename D::act* x, int T) {
    if (!lo || !lo->on[t]) return;
    int in = lo->in_dim[t], out_d = lo->out_dim[t], r = lo->rank;
    for (int b = 0; b < lo->docs; b++) {
        size_t dtmp_n = (size_t)T * r;
        device_zero(dev, lo->dtmp, dtmp_n * sizeof(typename D::act));
        const typename D::act* tmp = lo->tmp[t][layer] + (size_t)b * T * r;
        // y += tmp·Bᵀ  →  dB += doutᵀ·tmp, dtmp = dout·B
        matmul_backward(dev, lo->dtmp, lo->dB[t][layer] + (size_t)b * out_d * r, dout + (size_t)b * T * out_d, tmp,
                        lo->Bc[t][layer] + (size_t)b * out_d * r, T, r, out_d);
        if (lo->scale != 1.0f) scale_inplace(dev, lo->dtmp, dtmp_n, lo->scale);
        // tmp = x·Aᵀ  →  dA += dtmpᵀ·x, dx += dtmp·A
        matmul_backward(dev, dx ? dx + (size_t)b * T * in : nullptr, lo->dA[t][layer] + (size_t)b * r * in, lo->dtmp,
                        x + (size_t)b * T * in, lo->Ac[t][layer] + (size_t)b * r * in, T, in, r);
    }
}

#if PGOLF_CPU_REFERENCE
// --- Elementwise helpers of the model's data flow ------------------------------------------------
template <class T> static void scale_inplace(Cpu<T>, T* x, size_t n, float s) { for (size_t i = 0; i < n; i++) x[i] *= T(s); }
template <class T> static void add_inplace(Cpu<T>, T* x, const T* y, size_t n) { for (size_t i = 0; i < n; i++) x[i] += y[i]; }
template <class T> static void add_forward(Cpu<T>, T* out, const T* x, const T* y, size_t n) { for (size_t i = 0; i < n; i++) out[i] = x[i] + y[i]; }
template <class T> static void copy_forward(Cpu<T>, T* out, const T* x, size_t n) { memcpy(out, x, n * sizeof(T)); }
// master weights → the copy the forward reads (the same memory on the CPU; bf16 on the GPU)
template <class T> static void cast_params(Cpu<T>, T* dst, const T* src, size_t n) { if (dst != src) memcpy(dst, src, n * sizeof(T)); }
#endif

static bool layer_has_xsa(const Config& c, int l) { return (l % c.num_cores()) >= c.num_cores() - c.xsa_last_n; }

// Forward over a.inputs/a.targets (already on the device). Per-position NLLs land in a.losses.
// With a.loss_weights set (weights != nullptr), the logits buffer ends up holding dloss/dlogits.
template <class D> static void gpt_forward(D dev, Model<D>& m, int B, int T, bool with_grad, Lora<D>* lo = nullptr) {
    const Config& c = m.cfg;
    Acts<D>& a = m.acts;
    auto& W = m.w;
    int N = B * T, Dm = c.model_dim, KV = c.kv_dim(), F = c.mlp_hidden(), H = c.num_heads, Hk = c.num_kv_heads, hd = c.head_dim();
    const typename D::vec* no_gate = nullptr;
    if (T > a.T || N > a.B * a.T) fail("internal: batch %d×%d exceeds the activation plan of %d×%d tokens", B, T, a.B, a.T);
    // embeddings: token, BigramHash, RMSNorm, SmearGate
    embedding_forward(dev, a.e_tok, a.inputs, W.tok_emb, N, Dm);
    typename D::act* e = a.e_tok;
    if (c.bigram_vocab_size) {
        bigram_lookup(dev, a.bigram_idx, a.inputs, B, T, c.bigram_vocab_size, c.vocab_size, false);
        embedding_forward(dev, a.bigram_h, a.bigram_idx, W.bigram_embed, N, c.bigram_dim);
        if (W.bigram_proj) matmul_forward(dev, a.bigram_p, a.bigram_h, W.bigram_proj, N, c.bigram_dim, Dm);
        branch_add_forward(dev, a.e, a.e_tok, W.bigram_proj ? a.bigram_p : a.bigram_h, W.bigram_scale, no_gate, N, Dm, 0);
        e = a.e;
    } else if (c.bigram_hash_size) {
        bigram_lookup(dev, a.bigram_idx, a.inputs, B, T, c.bigram_hash_size, c.vocab_size, true);
        embedding_forward(dev, a.bigram_p, a.bigram_idx, W.bigram_embed, N, Dm);
        add_forward(dev, a.e, a.e_tok, a.bigram_p, (size_t)N * Dm);
        e = a.e;
    }
    rmsnorm_forward(dev, a.xn0, a.r0, e, N, Dm);
    if (c.smear) smear_forward(dev, a.x0, a.xn0, W.smear_gate, N, T, Dm);
    // blocks, with U-Net skips from the first half into the second
    int enc = c.num_encoder_layers();
    for (int l = 0; l < c.num_layers; l++) {
        LayerActs<D>& L = a.layers[l];
        const auto& LW = W.layers[l];
        if (l == 0) copy_forward(dev, L.x_in, a.x0, (size_t)N * Dm);
        else if (l >= enc && l - enc < c.num_skip_weights()) {
            int i = l - enc;  // decoder layer i takes encoder output enc−1−i (a stack)
            branch_add_forward(dev, L.x_in, a.layers[l - 1].x_out, a.layers[enc - 1 - i].x_out, W.skip_weights + (size_t)i * Dm, no_gate, N, Dm);
        }
        resid_mix_forward(dev, L.xm, L.x_in, a.x0, LW.resid_mix, N, Dm);
        rmsnorm_forward(dev, L.n1, L.r1, L.xm, N, Dm);
        matmul_forward(dev, L.q, L.n1, LW.c_q, N, Dm, Dm);
        matmul_forward(dev, L.k, L.n1, LW.c_k, N, Dm, KV);
        matmul_forward(dev, L.v, L.n1, LW.c_v, N, Dm, KV);
        lora_forward(dev, lo, LORA_Q, l, L.q, L.n1, T);
        lora_forward(dev, lo, LORA_K, l, L.k, L.n1, T);
        lora_forward(dev, lo, LORA_V, l, L.v, L.n1, T);
        qk_norm_rope_forward(dev, L.qr, L.qrs, L.q, LW.q_gain, N, T, H, hd, c.rotary_dims(), c.rope_base);
        qk_norm_rope_forward(dev, L.kr, L.krs, L.k, (const typename D::vec*)nullptr, N, T, Hk, hd, c.rotary_dims(), c.rope_base);
        attention_forward(dev, L.ya, L.lse, L.qr, L.kr, L.v, B, T, H, Hk, hd);
        if (layer_has_xsa(c, l)) xsa_forward(dev, L.y, L.ya, L.v, N, H, Hk, hd);
        matmul_forward(dev, L.a, L.y, LW.attn_proj, N, Dm, Dm);
        lora_forward(dev, lo, LORA_O, l, L.a, L.y, T);
        branch_add_forward(dev, L.xa, L.xm, L.a, LW.attn_scale, LW.attn_gate, N, Dm);
        rmsnorm_forward(dev, L.n2, L.r2, L.xa, N, Dm);
        matmul_forward(dev, L.h, L.n2, LW.fc, N, Dm, F);
        lora_forward(dev, lo, LORA_UP, l, L.h, L.n2, T);
        mlp_act_forward(dev, L.u, L.h, (size_t)N * F, c.mlp_activation == "leaky_relu_sq");
        matmul_forward(dev, L.m, L.u, LW.mlp_proj, N, F, Dm);
        lora_forward(dev, lo, LORA_DOWN, l, L.m, L.u, T);
        branch_add_forward(dev, L.x_out, L.xa, L.m, LW.mlp_scale, LW.mlp_gate, N, Dm);
    }
    // head: final norm, tied or untied projection, softcap, cross-entropy
    rmsnorm_forward(dev, a.hf, a.rf, a.layers[c.num_layers - 1].x_out, N, Dm);
    matmul_forward(dev, a.logits, a.hf, c.tie_embeddings ? W.tok_emb : W.lm_head, N, Dm, c.vocab_size);
    lora_forward(dev, lo, LORA_HEAD, 0, a.logits, a.hf, T);
    softcap_ce(dev, a.losses, a.logits, a.targets, with_grad ? a.loss_weights : nullptr, N, c.vocab_size, c.logit_softcap);
}

// Backward of the last forward (which must have had with_grad). Adds into m.grads and the LoRA
// grads; with param_grads = false only the LoRA adapters get gradients (the base is frozen).
template <class D> static void gpt_backward(D dev, Model<D>& m, int B, int T, Lora<D>* lo = nullptr, bool param_grads = true) {
    const Config& c = m.cfg;
    Acts<D>& a = m.acts;
    auto& W = m.w;
    auto G = m.g;
    if (!param_grads) G = point_weights(c, m.table, (typename D::grad*)nullptr, (typename D::grad*)nullptr);
    using A = typename D::act;
    int N = B * T, Dm = c.model_dim, KV = c.kv_dim(), F = c.mlp_hidden(), H = c.num_heads, Hk = c.num_kv_heads, hd = c.head_dim();
    size_t ND = (size_t)N * Dm, NKV = (size_t)N * KV, NF = (size_t)N * F;
    auto zero = [&](A* p, size_t n) { device_zero(dev, p, n * sizeof(A)); };
    zero(a.dx, ND); zero(a.dx0, ND);
    for (A* d : a.dskips) zero(d, ND);
    // head (a.logits now holds dlogits)
    zero(a.dn, ND);
    matmul_backward(dev, a.dn, c.tie_embeddings ? G.tok_emb : G.lm_head, a.logits, a.hf,
                    c.tie_embeddings ? W.tok_emb : W.lm_head, N, Dm, c.vocab_size);
    lora_backward(dev, lo, LORA_HEAD, 0, a.dn, a.logits, a.hf, T);
    rmsnorm_backward(dev, a.dx, a.dn, a.layers[c.num_layers - 1].x_out, a.rf, N, Dm);
    int enc = c.num_encoder_layers();
    for (int l = c.num_layers - 1; l >= 0; l--) {
        LayerActs<D>& L = a.layers[l];
        const auto& LW = W.layers[l];
        const auto& LG = G.layers[l];
        if (l < enc && l >= enc - c.num_skip_weights())  // this encoder output also fed a skip
            add_inplace(dev, a.dx, a.dskips[enc - 1 - l], ND);
        // MLP branch: x_out = xa + mlp_scale ⊙ σ(gate) ⊙ m
        zero(a.dxa, ND); zero(a.dm, ND);
        branch_add_backward(dev, a.dxa, a.dm, LG.mlp_scale, LG.mlp_gate, a.dx, L.m, LW.mlp_scale, LW.mlp_gate, N, Dm);
        zero(a.du, NF);
        matmul_backward(dev, a.du, LG.mlp_proj, a.dm, L.u, LW.mlp_proj, N, F, Dm);
        lora_backward(dev, lo, LORA_DOWN, l, a.du, a.dm, L.u, T);
        zero(a.dh, NF);
        mlp_act_backward(dev, a.dh, a.du, L.h, NF, c.mlp_activation == "leaky_relu_sq");
        zero(a.dn, ND);
        matmul_backward(dev, a.dn, LG.fc, a.dh, L.n2, LW.fc, N, Dm, F);
        lora_backward(dev, lo, LORA_UP, l, a.dn, a.dh, L.n2, T);
        rmsnorm_backward(dev, a.dxa, a.dn, L.xa, L.r2, N, Dm);
        // attention branch: xa = xm + attn_scale ⊙ σ(gate) ⊙ a
        zero(a.dxm, ND); zero(a.da, ND);
        branch_add_backward(dev, a.dxm, a.da, LG.attn_scale, LG.attn_gate, a.dxa, L.a, LW.attn_scale, LW.attn_gate, N, Dm);
        zero(a.dy, ND);
        matmul_backward(dev, a.dy, LG.attn_proj, a.da, L.y, LW.attn_proj, N, Dm, Dm);
        lora_backward(dev, lo, LORA_O, l, a.dy, a.da, L.y, T);
        zero(a.dv, NKV);
        A* dya = a.dy;
        if (layer_has_xsa(c, l)) { zero(a.dya, ND); xsa_backward(dev, a.dya, a.dv, a.dy, L.ya, L.v, N, H, Hk, hd); dya = a.dya; }
        zero(a.dqr, ND); zero(a.dkr, NKV);
        attention_backward(dev, a.dqr, a.dkr, a.dv, dya, L.qr, L.kr, L.v, L.ya, L.lse, B, T, H, Hk, hd);
        zero(a.dq, ND); zero(a.dk, NKV);
        qk_norm_rope_backward(dev, a.dq, LG.q_gain, a.dqr, L.q, L.qrs, LW.q_gain, N, T, H, hd, c.rotary_dims(), c.rope_base);
        qk_norm_rope_backward(dev, a.dk, (typename D::grad*)nullptr, a.dkr, L.k, L.krs, (const typename D::vec*)nullptr,
                              N, T, Hk, hd, c.rotary_dims(), c.rope_base);
        zero(a.dn, ND);
        matmul_backward(dev, a.dn, LG.c_q, a.dq, L.n1, LW.c_q, N, Dm, Dm);
        matmul_backward(dev, a.dn, LG.c_k, a.dk, L.n1, LW.c_k, N, Dm, KV);
        matmul_backward(dev, a.dn, LG.c_v, a.dv, L.n1, LW.c_v, N, Dm, KV);
        lora_backward(dev, lo, LORA_Q, l, a.dn, a.dq, L.n1, T);
        lora_backward(dev, lo, LORA_K, l, a.dn, a.dk, L.n1, T);
        lora_backward(dev, lo, LORA_V, l, a.dn, a.dv, L.n1, T);
        rmsnorm_backward(dev, a.dxm, a.dn, L.xm, L.r1, N, Dm);
        // residual lanes: xm = mix0 ⊙ x_in + mix1 ⊙ x0
        zero(a.dx, ND);  // dx now becomes the gradient of x_in
        resid_mix_backward(dev, a.dx, a.dx0, LG.resid_mix, a.dxm, L.x_in, a.x0, LW.resid_mix, N, Dm);
        if (l >= enc && l - enc < c.num_skip_weights()) {  // x_in = x_out[l−1] + w ⊙ skip
            int i = l - enc;
            branch_add_backward(dev, (A*)nullptr, a.dskips[i], G.skip_weights ? G.skip_weights + (size_t)i * Dm : nullptr,
                                (typename D::grad*)nullptr, a.dx, a.layers[enc - 1 - i].x_out, W.skip_weights + (size_t)i * Dm,
                                (const typename D::vec*)nullptr, N, Dm);
            // the residual part (x_out[l−1]) passes dx through unchanged
        }
        if (l == 0) add_inplace(dev, a.dx0, a.dx, ND);  // x_in of layer 0 is x0
    }
    // embeddings
    A* dxn0 = a.dx0;
    if (c.smear) { zero(a.dn, ND); smear_backward(dev, a.dn, G.smear_gate, a.dx0, a.xn0, W.smear_gate, N, T, Dm); dxn0 = a.dn; }
    zero(a.de, ND);
    const A* e = (c.bigram_vocab_size || c.bigram_hash_size) ? a.e : a.e_tok;
    rmsnorm_backward(dev, a.de, dxn0, e, a.r0, N, Dm);
    if (G.tok_emb) embedding_backward(dev, G.tok_emb, a.de, a.inputs, N, Dm);
    if (c.bigram_vocab_size) {
        A* dsrc = W.bigram_proj ? a.dbp : a.dbh;
        zero(dsrc, (size_t)N * (W.bigram_proj ? Dm : c.bigram_dim));
        branch_add_backward(dev, (A*)nullptr, dsrc, G.bigram_scale, (typename D::grad*)nullptr, a.de,
                            W.bigram_proj ? a.bigram_p : a.bigram_h, W.bigram_scale, (const typename D::vec*)nullptr, N, Dm, 0);
        if (W.bigram_proj) {
            zero(a.dbh, (size_t)N * c.bigram_dim);
            matmul_backward(dev, a.dbh, G.bigram_proj, a.dbp, a.bigram_h, W.bigram_proj, N, c.bigram_dim, Dm);
        }
        if (G.bigram_embed) embedding_backward(dev, G.bigram_embed, a.dbh, a.bigram_idx, N, c.bigram_dim);
    } else if (c.bigram_hash_size) {
        if (G.bigram_embed) embedding_backward(dev, G.bigram_embed, a.de, a.bigram_idx, N, Dm);
    }
}

// ============================================================================================
// 7. Optimizers, schedule, weight averaging, quantization-aware training
// ============================================================================================
// Muon for block matrices (and the bigram projection); Adam(W) for embeddings, the untied head
// and every vector/scalar, with the reference's lr groups. All state lives in arenas with the
// parameter layout, so the same offsets address weights, grads and moments.

static const float NS_A = 3.4445f, NS_B = -4.7750f, NS_C = 2.0315f;  // Newton–Schulz quintic

#if PGOLF_CPU_REFERENCE
// --- AdamW (torch.optim.AdamW; Adam when wd = 0) ---------------------------------------------------
// p ← p·(1 − lr·wd); m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²; p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + eps)
template <class T> static void adamw_update(Cpu<T>, T* p, const T* g, T* m, T* v, size_t n, float lr, float b1, float b2,
                                            float eps, float wd, int t) {
    double bc1 = 1.0 - std::pow((double)b1, t), bc2 = 1.0 - std::pow((double)b2, t);
    T step_size = T(lr / bc1), bc2_sqrt = T(std::sqrt(bc2));
    for (size_t i = 0; i < n; i++) {
        if (wd != 0.0f) p[i] *= T(1) - T(lr) * T(wd);
        m[i] = T(b1) * m[i] + (T(1) - T(b1)) * g[i];
        v[i] = T(b2) * v[i] + (T(1) - T(b2)) * g[i] * g[i];
        p[i] -= step_size * m[i] / (std::sqrt(v[i]) / bc2_sqrt + T(eps));
    }
}

// --- SGD with momentum (torch.optim.SGD, dampening 0, not Nesterov): full-model TTT -------------------
template <class T> static void sgd_update(Cpu<T>, T* p, const T* g, T* buf, size_t n, float lr, float momentum, float wd, bool first) {
    for (size_t i = 0; i < n; i++) {
        T gi = g[i] + T(wd) * p[i];
        buf[i] = first ? gi : T(momentum) * buf[i] + gi;
        p[i] -= T(lr) * buf[i];
    }
}

// --- Muon: momentum, Nesterov, orthogonalize with Newton–Schulz, shape scale, decoupled decay ----
// X = G/(‖G‖_F + 1e−7), transposed so X is wide; repeat: A = XXᵀ, X = aX + (bA + cA²)X.
template <class T> static void newton_schulz(Cpu<T>, T* out, const T* g, int rows, int cols, int steps) {
    bool tr = rows > cols;
    int r = tr ? cols : rows, k = tr ? rows : cols;  // X is r×k with r ≤ k
    std::vector<T> X((size_t)r * k), A((size_t)r * r), Bm((size_t)r * r), Y((size_t)r * k);
    double nrm = 0;
    for (size_t i = 0; i < (size_t)rows * cols; i++) nrm += (double)g[i] * g[i];
    T inv = T(1.0 / (std::sqrt(nrm) + 1e-7));
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) X[tr ? (size_t)j * k + i : (size_t)i * k + j] = g[(size_t)i * cols + j] * inv;
    for (int s = 0; s < steps; s++) {
        matmul_forward(Cpu<T>{}, A.data(), X.data(), X.data(), r, k, r);  // A = X Xᵀ
        matmul_forward(Cpu<T>{}, Bm.data(), A.data(), A.data(), r, r, r); // A² (A is symmetric: A·Aᵀ = A²)
        for (size_t i = 0; i < Bm.size(); i++) Bm[i] = T(NS_B) * A[i] + T(NS_C) * Bm[i];
        std::fill(Y.begin(), Y.end(), T(0));  // Y = B·X, row by row (the inner loop runs along X's rows)
        for (int i = 0; i < r; i++)
            for (int t = 0; t < r; t++) {
                T b = Bm[(size_t)i * r + t];
                const T* xt = X.data() + (size_t)t * k;
                T* yi = Y.data() + (size_t)i * k;
                #pragma omp simd
                for (int j = 0; j < k; j++) yi[j] += b * xt[j];
            }
        for (size_t i = 0; i < X.size(); i++) X[i] = T(NS_A) * X[i] + Y[i];
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) out[(size_t)i * cols + j] = X[tr ? (size_t)j * k + i : (size_t)i * k + j];
}
// One matrix: buf ← μ·buf + g; u = NS(g + μ·buf)·√max(1, rows/cols). The update is applied separately.
template <class T> static void muon_direction(Cpu<T>, T* update, const T* g, T* buf, int rows, int cols, float momentum, int steps) {
    size_t n = (size_t)rows * cols;
    std::vector<T> nest(n);
    for (size_t i = 0; i < n; i++) { buf[i] = T(momentum) * buf[i] + g[i]; nest[i] = g[i] + T(momentum) * buf[i]; }
    newton_schulz(Cpu<T>{}, update, nest.data(), rows, cols, steps);
    T s = T(std::sqrt(std::max(1.0, (double)rows / cols)));
    for (size_t i = 0; i < n; i++) update[i] *= s;
}
template <class T> static void apply_update(Cpu<T>, T* p, const T* update, size_t n, float lr, float wd) {
    for (size_t i = 0; i < n; i++) p[i] = p[i] * (T(1) - T(lr) * T(wd)) - T(lr) * update[i];
}

// --- Gradient norm and clipping ---------------------------------------------------------------------
template <class T> static double sum_squares(Cpu<T>, const T* x, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return s;
}
template <class T> static void scale_grads(Cpu<T>, T* x, size_t n, float s) { for (size_t i = 0; i < n; i++) x[i] *= T(s); }

// --- Weight averaging: sum += w (SWA), or ema ← d·ema + (1−d)·w ------------------------------------
template <class T> static void average_accumulate(Cpu<T>, T* avg, const T* w, size_t n, float decay, bool first) {
    for (size_t i = 0; i < n; i++) avg[i] = first ? w[i] : (decay < 0 ? avg[i] + w[i] : T(decay) * avg[i] + (T(1) - T(decay)) * w[i]);
}
#endif

// --- Fake quantization (QAT, straight-through) ---------------------------------------------------------
// Per row: s = max(rowmax/clip, floor); w ← clamp(round(w/s), −(clip+1), clip)·s. rint rounds half
// to even like torch.round.
HD static inline float fake_quant_value(float w, float s, int clip) {
    float q = rintf(w / s);
    return fminf(fmaxf(q, (float)(-(clip + 1))), (float)clip) * s;
}
#if PGOLF_CPU_REFERENCE
template <class T> static void fake_quant_rows(Cpu<T>, T* out, const T* w, int rows, int cols, int clip, float floor) {
    for (int r = 0; r < rows; r++) {
        float mx = 0;
        for (int c = 0; c < cols; c++) mx = std::max(mx, std::fabs((float)w[(size_t)r * cols + c]));
        float s = std::max(mx / clip, floor);
        for (int c = 0; c < cols; c++) out[(size_t)r * cols + c] = T(fake_quant_value((float)w[(size_t)r * cols + c], s, clip));
    }
}
#endif

// The lr multiplier: 1, then a linear warm-down over the last WARMDOWN_ITERS steps — measured in
// wall-clock time when there is a cap (warm-down time = WARMDOWN_ITERS × mean step time so far).
static double lr_multiplier(const Config& c, int step, double elapsed_ms) {
    if (c.warmdown_iters <= 0) return 1.0;
    if (c.max_wallclock_seconds <= 0) {
        int start = std::max(c.iterations - c.warmdown_iters, 0);
        return (step >= start && step < c.iterations) ? std::max((double)(c.iterations - step) / std::max(c.warmdown_iters, 1), 0.0) : 1.0;
    }
    double step_ms = elapsed_ms / std::max(step, 1);
    double warmdown_ms = c.warmdown_iters * step_ms;
    double remaining = std::max(1000.0 * c.max_wallclock_seconds - elapsed_ms, 0.0);
    return remaining <= warmdown_ms ? remaining / std::max(warmdown_ms, 1e-9) : 1.0;
}
static double muon_momentum_at(const Config& c, int step) {
    double frac = c.muon_momentum_warmup_steps > 0 ? std::min((double)step / c.muon_momentum_warmup_steps, 1.0) : 1.0;
    return (1 - frac) * c.muon_momentum_warmup_start + frac * c.muon_momentum;
}
static float group_lr(const Config& c, ParamGroup g) {
    switch (g) {
        case GROUP_TOKEN: return c.tie_embeddings ? c.tied_embed_lr : c.embed_lr;
        case GROUP_HEAD: return c.head_lr;
        case GROUP_MATRIX: return c.matrix_lr;
        default: return c.scalar_lr;
    }
}
// Matrices the fake quantizer touches: the reference's CastedLinear weights (not the embeddings).
// Largest quantized magnitude of the fake quantizer: 2^(bits−1) − 1, or int5's 15 under ALL_INT5.
static int qat_clip(const Config& c) { return c.all_int5 ? 15 : (1 << (c.qat_bits - 1)) - 1; }
static bool qat_applies(const ParamSpec& p) {
    return p.role == P_C_Q || p.role == P_C_K || p.role == P_C_V || p.role == P_ATTN_PROJ || p.role == P_FC ||
           p.role == P_MLP_PROJ || p.role == P_BIGRAM_PROJ || p.role == P_LM_HEAD;
}

// ============================================================================================
// 8. Distributed: MPI launches the ranks; gradients and scores are summed across them
// ============================================================================================
// `mpirun -np N ./train_gpt`: one process per GPU (local rank → device), NCCL for device buffers,
// MPI for host values. A single process needs neither.

static int g_local_rank = 0;

#ifdef PGOLF_MPI
#define mpiCheck(call) do { int rc_ = (call); if (rc_ != MPI_SUCCESS) { \
    char s_[MPI_MAX_ERROR_STRING]; int n_ = 0; MPI_Error_string(rc_, s_, &n_); \
    fail("MPI error at %s:%d: %s", __FILE__, __LINE__, s_); } } while (0)
#endif

static int env_int(const char* name, int fallback) { const char* v = getenv(name); return v && *v ? atoi(v) : fallback; }

static void distributed_init(int* argc, char*** argv) {
    // Open MPI, MPICH/PMI and Slurm all announce the world size through the environment.
    int launched = std::max({env_int("OMPI_COMM_WORLD_SIZE", 1), env_int("PMI_SIZE", 1), env_int("PMIX_SIZE", 1)});
#ifdef PGOLF_MPI
    if (launched > 1 || getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE")) {
        mpiCheck(MPI_Init(argc, argv));
        mpiCheck(MPI_Comm_rank(MPI_COMM_WORLD, &g_rank));
        mpiCheck(MPI_Comm_size(MPI_COMM_WORLD, &g_world));
        MPI_Comm local;  // ranks on this node, for the GPU index
        mpiCheck(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g_rank, MPI_INFO_NULL, &local));
        mpiCheck(MPI_Comm_rank(local, &g_local_rank));
        mpiCheck(MPI_Comm_free(&local));
    }
#else
    (void)argc; (void)argv;
    if (launched > 1) fail("launched with %d ranks, but this train_gpt was built without MPI: rebuild with `make USE_MPI=1` (needs mpicxx)", launched);
#endif
}
static void distributed_finish() {
#ifdef PGOLF_MPI
    int up = 0; MPI_Initialized(&up);
    if (up) MPI_Finalize();
#endif
}
static void host_allreduce_sum(double* x, int n) {
#ifdef PGOLF_MPI
    if (g_world > 1) mpiCheck(MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
#else
    (void)x; (void)n;
#endif
}
static bool any_rank(bool flag) {
    double v = flag ? 1.0 : 0.0;
    host_allreduce_sum(&v, 1);
    return v > 0;
}
static void host_barrier() {
#ifdef PGOLF_MPI
    if (g_world > 1) mpiCheck(MPI_Barrier(MPI_COMM_WORLD));
#endif
}
// Rank 0's bytes to every rank (artifacts and checkpoints are read once).
static void host_broadcast(std::vector<uint8_t>& buf) {
#ifdef PGOLF_MPI
    if (g_world == 1) return;
    uint64_t n = buf.size();
    mpiCheck(MPI_Bcast(&n, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD));
    buf.resize(n);
    for (uint64_t off = 0; off < n; off += (1u << 30))
        mpiCheck(MPI_Bcast(buf.data() + off, (int)std::min<uint64_t>(1u << 30, n - off), MPI_BYTE, 0, MPI_COMM_WORLD));
#else
    (void)buf;
#endif
}

#if PGOLF_CPU_REFERENCE
// Sum of a host array over ranks (the CPU reference keeps everything in host memory).
template <class T> static void allreduce_sum(Cpu<T>, T* x, size_t n) {
#ifdef PGOLF_MPI
    if (g_world == 1) return;
    MPI_Datatype type = sizeof(T) == 8 ? MPI_DOUBLE : MPI_FLOAT;
    for (size_t off = 0; off < n; off += (1u << 28))
        mpiCheck(MPI_Allreduce(MPI_IN_PLACE, x + off, (int)std::min<size_t>(1u << 28, n - off), type, MPI_SUM, MPI_COMM_WORLD));
#else
    (void)x; (void)n;
#endif
}
#endif

// Contiguous split of n items over ranks: rank r takes [n·r/W, n·(r+1)/W).
static long split_begin(long n, int rank, int world) { return n * rank / world; }

#ifdef __CUDACC__
#include "sections/cuda.cuh"
#include "sections/cuda_attention.cuh"
#endif

// ============================================================================================
// 9. Compression: quantization, packing, the artifact
// ============================================================================================
#include "sections/compress.cuh"

// ============================================================================================
// 10. Evaluation: val_bpb exactly as the reference counts bytes
// ============================================================================================
// A scored position j predicts t[j+1] from t[..j]; its bytes are base[y] + 1 when y carries a
// leading space and the previous token t[j] is not a boundary (control/unknown). Sums are fp64,
// reduced over ranks; val_bpb = (Σ nll / ln 2) / Σ bytes.

struct EvalData {
    std::vector<uint16_t> val;  // the validation stream
    ByteLuts luts;
};
struct ScoreSums {
    double loss = 0, tokens = 0, bytes = 0;
    void add(double nll, int prev, int target, const ByteLuts& lut) {
        loss += nll; tokens += 1;
        bytes += lut.base_bytes[target] + ((lut.has_leading_space[target] && !lut.is_boundary[prev]) ? 1 : 0);
    }
    void reduce() { double v[3] = {loss, tokens, bytes}; host_allreduce_sum(v, 3); loss = v[0]; tokens = v[1]; bytes = v[2]; }
    double val_loss() const { return loss / std::max(tokens, 1.0); }
    double val_bpb() const { return loss / M_LN2 / std::max(bytes, 1.0); }
};
struct EvalResult {
    std::string mode;
    double val_loss = 0, val_bpb = 0, tokens = 0, ms = 0;
    std::string note;  // e.g. "not competition-legal (…)"
};

// Per-position NLLs of the validation stream, in stream order (position j scores t[j+1]), for
// NLL_DUMP and for the legality tests. Unscored positions stay NaN.
struct NllRecord {
    std::vector<float> nll;
    void init(size_t n) { nll.assign(n, NAN); }
    void set(size_t j, float v) { if (!nll.empty()) nll[j] = v; }
};

// Runs the model over rows of `inputs` (B rows of T tokens, targets alongside) and returns the
// per-position NLLs on the host.
template <class D> static void forward_nll(D dev, Model<D>& m, const std::vector<int32_t>& x, const std::vector<int32_t>& y,
                                           int B, int T, std::vector<float>& nll, Lora<D>* lo = nullptr, bool with_grad = false) {
    size_t N = (size_t)B * T;
    to_device(dev, m.acts.inputs, x.data(), N);
    to_device(dev, m.acts.targets, y.data(), N);
    gpt_forward(dev, m, B, T, with_grad, lo);
    std::vector<typename D::stat> host(N);
    to_host(dev, host.data(), m.acts.losses, N);
    nll.assign(host.begin(), host.end());
}

// `standard`: non-overlapping windows of the eval length; the last, shorter window scores the
// tail the reference drops (unless VAL_TRUNCATE_TO_SEQ=1 cut the stream already).
template <class D> static EvalResult eval_standard(D dev, Model<D>& m, const EvalData& d, NllRecord* rec = nullptr) {
    const Config& c = m.cfg;
    double t0 = now_ms();
    int L = c.eval_len();
    long targets = (long)d.val.size() - 1;
    long full = targets / L, tail = targets - full * L;
    long nseq = full + (tail > 0 ? 1 : 0);
    long s0 = split_begin(nseq, g_rank, g_world), s1 = split_begin(nseq, g_rank + 1, g_world);
    int per_batch = std::max(1, (int)std::min<long>(c.val_batch_size / ((long)g_world * grad_accum_steps(c, g_world)) / L, m.acts.B * (long)m.acts.T / L));
    ScoreSums sums;
    std::vector<int32_t> x, y;
    std::vector<float> nll;
    for (long s = s0; s < s1;) {
        int len = s < full ? L : (int)tail;
        int B = 1;
        if (len == L) while (B < per_batch && s + B < s1 && s + B < full) B++;
        x.resize((size_t)B * len); y.resize((size_t)B * len);
        for (int b = 0; b < B; b++)
            for (int t = 0; t < len; t++) {
                long j = (s + b) * L + t;
                x[(size_t)b * len + t] = d.val[j]; y[(size_t)b * len + t] = d.val[j + 1];
            }
        forward_nll(dev, m, x, y, B, len, nll);
        for (int b = 0; b < B; b++)
            for (int t = 0; t < len; t++) {
                size_t i = (size_t)b * len + t;
                sums.add(nll[i], x[i], y[i], d.luts);
                if (rec) rec->set((s + b) * L + t, nll[i]);
            }
        s += B;
    }
    sums.reduce();
    EvalResult r;
    r.mode = "standard"; r.val_loss = sums.val_loss(); r.val_bpb = sums.val_bpb(); r.tokens = sums.tokens; r.ms = now_ms() - t0;
    return r;
}

#include "sections/eval.cuh"

// ============================================================================================
// 11. Checkpoints: safetensors with the reference's parameter names, plus optimizer state
// ============================================================================================
// Layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets},
// "__metadata__": {…}}, then the raw little-endian data. PyTorch reads the weights with
// safetensors.torch.load_file; our metadata carries the config and the training state.

struct TensorBlob { std::string name; std::vector<int> shape; const float* data; size_t numel; };

static std::string json_escape(const std::string& s) {
    std::string out;
    for (unsigned char ch : s) {
        if (ch == '"' || ch == '\\') { out += '\\'; out += ch; }
        else if (ch == '\n') out += "\\n";
        else if (ch < 0x20) { char b[8]; snprintf(b, sizeof b, "\\u%04x", ch); out += b; }
        else out += ch;
    }
    return out;
}

static void safetensors_write(const std::string& path, const std::vector<TensorBlob>& tensors,
                              const std::vector<std::pair<std::string, std::string>>& meta) {
    std::string h = "{\"__metadata__\":{";
    for (size_t i = 0; i < meta.size(); i++)
        h += (i ? "," : "") + ("\"" + json_escape(meta[i].first) + "\":\"" + json_escape(meta[i].second) + "\"");
    h += "}";
    size_t off = 0;
    for (const TensorBlob& t : tensors) {
        h += ",\"" + json_escape(t.name) + "\":{\"dtype\":\"F32\",\"shape\":[";
        for (size_t i = 0; i < t.shape.size(); i++) h += (i ? "," : "") + std::to_string(t.shape[i]);
        h += "],\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + 4 * t.numel) + "]}";
        off += 4 * t.numel;
    }
    h += "}";
    while ((8 + h.size()) % 8) h += ' ';  // data starts 8-byte aligned
    std::vector<uint8_t> buf(8 + h.size() + off);
    uint64_t hl = h.size();
    memcpy(buf.data(), &hl, 8);
    memcpy(buf.data() + 8, h.data(), h.size());
    size_t at = 8 + h.size();
    for (const TensorBlob& t : tensors) { memcpy(buf.data() + at, t.data, 4 * t.numel); at += 4 * t.numel; }
    write_file_atomic(path, buf.data(), buf.size());
}

// A JSON reader just large enough for safetensors headers: objects, strings, arrays of integers.
struct JsonCursor {
    const std::string& s; size_t i; const std::string& where;
    [[noreturn]] void bad(const char* what) { fail("%s: malformed safetensors header at byte %zu: %s", where.c_str(), i, what); }
    void ws() { while (i < s.size() && isspace((unsigned char)s[i])) i++; }
    bool eat(char ch) { ws(); if (i < s.size() && s[i] == ch) { i++; return true; } return false; }
    void expect(char ch) { if (!eat(ch)) { char m[32]; snprintf(m, sizeof m, "expected '%c'", ch); bad(m); } }
    std::string str() {
        expect('"');
        std::string out;
        while (i < s.size() && s[i] != '"') {
            if (s[i] == '\\') {
                if (++i >= s.size()) bad("unterminated escape");
                char e = s[i++];
                if (e == 'n') out += '\n'; else if (e == 't') out += '\t'; else if (e == 'r') out += '\r';
                else if (e == 'u') {
                    if (i + 4 > s.size()) bad("short \\u escape");
                    unsigned cp = (unsigned)strtoul(s.substr(i, 4).c_str(), nullptr, 16); i += 4;
                    if (cp < 0x80) out += (char)cp;
                    else if (cp < 0x800) { out += (char)(0xC0 | (cp >> 6)); out += (char)(0x80 | (cp & 0x3F)); }
                    else { out += (char)(0xE0 | (cp >> 12)); out += (char)(0x80 | ((cp >> 6) & 0x3F)); out += (char)(0x80 | (cp & 0x3F)); }
                } else out += e;
            } else out += s[i++];
        }
        if (i >= s.size()) bad("unterminated string");
        i++;
        return out;
    }
    long long num() {
        ws();
        size_t start = i;
        if (i < s.size() && s[i] == '-') i++;
        while (i < s.size() && isdigit((unsigned char)s[i])) i++;
        if (start == i) bad("expected a number");
        return atoll(s.substr(start, i - start).c_str());
    }
};
struct SafeTensor { std::string dtype; std::vector<long long> shape; size_t begin, end; };
struct SafetensorsFile {
    std::string path;
    std::vector<uint8_t> bytes;
    size_t data_start = 0;
    std::map<std::string, SafeTensor> tensors;
    std::map<std::string, std::string> meta;
};
static SafetensorsFile safetensors_read(const std::string& path) {
    SafetensorsFile f;
    f.path = path;
    f.bytes = read_file(path);
    if (f.bytes.size() < 8) fail("%s: %zu bytes is too short for a safetensors file", path.c_str(), f.bytes.size());
    uint64_t hl;
    memcpy(&hl, f.bytes.data(), 8);
    if (hl > f.bytes.size() - 8) fail("%s: header length %llu exceeds the file (%zu bytes): truncated?", path.c_str(), (unsigned long long)hl, f.bytes.size());
    std::string h((const char*)f.bytes.data() + 8, hl);
    f.data_start = 8 + hl;
    JsonCursor j{h, 0, path};
    j.expect('{');
    if (!j.eat('}')) do {
        std::string key = j.str();
        j.expect(':');
        j.expect('{');
        if (key == "__metadata__") {
            if (!j.eat('}')) { do { std::string k = j.str(); j.expect(':'); f.meta[k] = j.str(); } while (j.eat(',')); j.expect('}'); }
            continue;
        }
        SafeTensor t;
        bool have_offsets = false;
        if (!j.eat('}')) {
            do {
                std::string field = j.str();
                j.expect(':');
                if (field == "dtype") t.dtype = j.str();
                else if (field == "shape") { j.expect('['); if (!j.eat(']')) { do t.shape.push_back(j.num()); while (j.eat(',')); j.expect(']'); } }
                else if (field == "data_offsets") { j.expect('['); t.begin = j.num(); j.expect(','); t.end = j.num(); j.expect(']'); have_offsets = true; }
                else j.bad("unknown tensor field");
            } while (j.eat(','));
            j.expect('}');
        }
        if (!have_offsets || t.end < t.begin || f.data_start + t.end > f.bytes.size())
            fail("%s: tensor %s lies outside the file (truncated?)", path.c_str(), key.c_str());
        f.tensors[key] = t;
    } while (j.eat(','));
    j.expect('}');
    return f;
}
// Copies tensor `name` (F32 of the given numel) into dst, with clear errors for anything else.
static void safetensors_get(const SafetensorsFile& f, const std::string& name, float* dst, size_t numel) {
    auto it = f.tensors.find(name);
    if (it == f.tensors.end()) fail("%s: no tensor named %s", f.path.c_str(), name.c_str());
    const SafeTensor& t = it->second;
    size_t n = 1;
    for (long long s : t.shape) n *= (size_t)s;
    if (n != numel) fail("%s: tensor %s has %zu elements, expected %zu (different model config?)", f.path.c_str(), name.c_str(), n, numel);
    if (t.dtype == "F32" && t.end - t.begin == 4 * numel) memcpy(dst, f.bytes.data() + f.data_start + t.begin, 4 * numel);
    else if (t.dtype == "BF16" && t.end - t.begin == 2 * numel)
        for (size_t i = 0; i < numel; i++) { uint16_t b; memcpy(&b, f.bytes.data() + f.data_start + t.begin + 2 * i, 2); dst[i] = bf16_to_float(b); }
    else fail("%s: tensor %s is %s with %zu bytes; expected F32 or BF16 of %zu elements", f.path.c_str(), name.c_str(),
              t.dtype.c_str(), t.end - t.begin, numel);
}

// Weights only (arena layout, fp32), from a checkpoint or a final_model.safetensors.
static void load_checkpoint_weights(const std::string& path, const std::vector<ParamSpec>& table, std::vector<float>& w) {
    SafetensorsFile f = safetensors_read(path);
    w.assign(param_arena_size(table), 0.0f);
    for (const ParamSpec& p : table) safetensors_get(f, p.name, w.data() + p.offset, p.numel);
}

// ============================================================================================
// 12. Training driver and main
// ============================================================================================

#ifndef PGOLF_CODE_BYTES            // set by the Makefile: bytes of the sources compiled into train_gpt
#define PGOLF_CODE_BYTES 0
#endif
#ifndef PGOLF_CODE_BYTES_STRIPPED   // and of the stripped single-file submission (`make submission`)
#define PGOLF_CODE_BYTES_STRIPPED 0
#endif
#ifndef PGOLF_CODE_CHECKSUM         // sha256 prefix of the stripped submission, to tie a result to its code
#define PGOLF_CODE_CHECKSUM "unknown"
#endif
static const long ARTIFACT_LIMIT_BYTES = 16000000;

// Optimizer and averaging state, all in the parameter layout.
template <class D> struct TrainState {
    using G = typename D::grad;
    G *adam_m = nullptr, *adam_v = nullptr;  // Adam moments; adam_m doubles as Muon's momentum for matrices
    G *update = nullptr;                     // Muon's orthogonalized updates, summed over ranks
    G *avg = nullptr;                        // SWA sum, or an EMA of the weights
    int step = 0, swa_count = 0;
    double train_ms = 0;
    bool qat_active = false;
    DataLoader loader;
    std::vector<std::string> checkpoints;    // written so far, oldest first
};

// Activation capacity: the largest batch any phase runs (training micro-batch, eval, TTT).
static void activation_capacity(const Config& c, int world, long* tokens, int* max_t) {
    long micro = c.train_batch_tokens / ((long)world * grad_accum_steps(c, world));
    long ev = (long)c.eval_batch_seqs * c.eval_len();
    long lora = (long)c.ttt_batch_size * c.ttt_eval_seq_len;
    long full = (long)c.ttt_batch_seqs * c.eval_len();
    *tokens = std::max({micro, ev, lora, full, (long)c.train_seq_len});
    *max_t = std::max({c.train_seq_len, c.eval_len(), c.ttt_eval_seq_len});
}

// The model with activations for the largest batch any phase of a run needs.
template <class D> static void model_init_for_run(D dev, Model<D>& m, const Config& c) {
    long cap_tokens; int cap_t;
    activation_capacity(c, g_world, &cap_tokens, &cap_t);
    model_init(dev, m, c, (int)((cap_tokens + cap_t - 1) / cap_t), cap_t);
}

template <class D> static void train_state_init(D dev, TrainState<D>& s, Model<D>& m) {
    using G = typename D::grad;
    size_t bytes = m.nparams * sizeof(G);
    s.adam_m = (G*)device_alloc(dev, bytes);
    s.adam_v = (G*)device_alloc(dev, bytes);
    s.update = (G*)device_alloc(dev, bytes);
    const Config& c = m.cfg;
    if (c.swa_enabled || c.swa_steps > 0 || c.ema_decay > 0) s.avg = (G*)device_alloc(dev, bytes);
    if (c.ema_decay > 0) average_accumulate(dev, s.avg, m.params, m.nparams, c.ema_decay, true);  // EMA starts at the init
}

// One optimizer step over the summed gradients of this step's micro-batches.
template <class D> static void optimizer_step(D dev, Model<D>& m, TrainState<D>& s, double lr_scale, float muon_momentum) {
    const Config& c = m.cfg;
    // data parallel: average the gradients of all ranks (the reference's DDP)
    allreduce_sum(dev, m.grads, m.nparams);
    if (g_world > 1) scale_grads(dev, m.grads, m.nparams, 1.0f / g_world);
    // depth recurrence: a block used k times has its gradients scaled by 1/k (PR #456's hooks)
    for (const ParamSpec& p : m.table)
        if (p.uses > 1) scale_grads(dev, m.grads + p.offset, p.numel, 1.0f / p.uses);
    if (c.grad_clip_norm > 0) {  // torch.nn.utils.clip_grad_norm_ over every parameter
        double norm = std::sqrt(sum_squares(dev, m.grads, m.nparams));
        double coef = c.grad_clip_norm / (norm + 1e-6);
        if (coef < 1.0) scale_grads(dev, m.grads, m.nparams, (float)coef);
    }
    int t = s.step + 1;
    int matrix_i = 0;
    for (const ParamSpec& p : m.table) {
        float lr = (float)(group_lr(c, p.group) * lr_scale);
        auto* w = m.params + p.offset; auto* g = m.grads + p.offset;
        if (p.group == GROUP_MATRIX) {
            // parallel Muon: matrix i is orthogonalized by rank i mod W, the others add zeros
            if (matrix_i++ % g_world == g_rank)
                muon_direction(dev, s.update + p.offset, g, s.adam_m + p.offset, p.rows(), p.cols(), muon_momentum, c.muon_backend_steps);
            else
                device_zero(dev, s.update + p.offset, p.numel * sizeof(*w));
        } else {
            float wd = p.group == GROUP_HEAD ? 0.0f : c.adam_wd;
            adamw_update(dev, w, g, s.adam_m + p.offset, s.adam_v + p.offset, p.numel, lr, c.beta1, c.beta2, c.adam_eps, wd, t);
        }
    }
    if (g_world > 1) allreduce_sum(dev, s.update, m.nparams);  // (only the matrix slots are non-zero)
    for (const ParamSpec& p : m.table)
        if (p.group == GROUP_MATRIX)
            apply_update(dev, m.params + p.offset, s.update + p.offset, p.numel, (float)(group_lr(c, p.group) * lr_scale), c.muon_weight_decay);
}

// The weights the forward reads: the master weights, fake-quantized under QAT.
#if PGOLF_CPU_REFERENCE
template <class T> static void refresh_compute_weights(Cpu<T> dev, Model<Cpu<T>>& m, bool qat) {
    if (!qat) { if (m.compute_mat != m.params) { free(m.compute_mat); model_bind_compute(dev, m); } return; }
    const Config& c = m.cfg;
    if (m.compute_mat == m.params) m.compute_mat = m.compute_vec = (T*)device_alloc(dev, m.nparams * sizeof(T));
    memcpy(m.compute_mat, m.params, m.nparams * sizeof(T));
    int clip = qat_clip(c);
    for (const ParamSpec& p : m.table)
        if (qat_applies(p)) fake_quant_rows(dev, m.compute_mat + p.offset, m.params + p.offset, p.rows(), p.cols(), clip, c.qat_scale_floor);
    m.w = point_weights(c, m.table, m.compute_mat, m.compute_vec);
}
#endif

static std::string checkpoint_path(const Config& c, int step) { return c.out_dir + fmt("/checkpoint_%06d.safetensors", step); }

template <class D> static void save_checkpoint(D dev, Model<D>& m, TrainState<D>& s) {
    Config c = m.cfg;
    std::string path = checkpoint_path(c, s.step);
    if (!s.checkpoints.empty() && s.checkpoints.back() == path) return;  // already saved at this step
    s.checkpoints.push_back(path);
    if (g_rank != 0) return;
    size_t n = m.nparams;
    std::vector<float> w(n), am(n), av(n), avg(s.avg ? n : 0);
    auto fetch = [&](std::vector<float>& dst, const typename D::grad* src) {
        std::vector<typename D::grad> tmp(n); to_host(dev, tmp.data(), src, n); dst.assign(tmp.begin(), tmp.end());
    };
    fetch(w, m.params); fetch(am, s.adam_m); fetch(av, s.adam_v);
    if (s.avg) fetch(avg, s.avg);
    std::vector<TensorBlob> blobs;
    for (const ParamSpec& p : m.table) blobs.push_back({p.name, p.shape, w.data() + p.offset, p.numel});
    for (const ParamSpec& p : m.table) blobs.push_back({"optimizer.m." + p.name, p.shape, am.data() + p.offset, p.numel});
    for (const ParamSpec& p : m.table) blobs.push_back({"optimizer.v." + p.name, p.shape, av.data() + p.offset, p.numel});
    if (s.avg) for (const ParamSpec& p : m.table) blobs.push_back({"average." + p.name, p.shape, avg.data() + p.offset, p.numel});
    char ms[64]; snprintf(ms, sizeof ms, "%.17g", s.train_ms);
    safetensors_write(path, blobs, {
        {"format", "pgolf-checkpoint-1"}, {"config", config_to_text(c)}, {"step", std::to_string(s.step)},
        {"train_ms", ms}, {"swa_count", std::to_string(s.swa_count)}, {"qat_active", std::to_string((int)s.qat_active)},
        {"loader_file", std::to_string(s.loader.stream.file_idx)}, {"loader_pos", std::to_string(s.loader.stream.pos)}});
    log0("checkpoint: %s\n", path.c_str());
    while (c.checkpoint_keep > 0 && (int)s.checkpoints.size() > c.checkpoint_keep) {
        remove(s.checkpoints.front().c_str());
        s.checkpoints.erase(s.checkpoints.begin());
    }
}

// Training shape settings must match to resume; cadence, logging and eval settings may differ.
static const char* RESUME_MUST_MATCH[] = {"VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT",
    "UNIQUE_LAYERS", "NAMED_CORES", "TIE_EMBEDDINGS", "BIGRAM_VOCAB_SIZE", "BIGRAM_DIM", "BIGRAM_HASH_SIZE", "SMEAR",
    "SMEAR_GATE", "XSA_LAST_N", "TRAIN_BATCH_TOKENS", "TRAIN_SEQ_LEN"};

template <class D> static void load_checkpoint(D dev, Model<D>& m, TrainState<D>& s, const std::string& path) {
    SafetensorsFile f = safetensors_read(path);
    if (f.meta["format"] != "pgolf-checkpoint-1") fail("%s: not a pgolf checkpoint (format \"%s\")", path.c_str(), f.meta["format"].c_str());
    Config saved = config_from_text(f.meta["config"], path);
    Config cur = m.cfg;
    std::vector<Setting> a = config_settings(saved), b = config_settings(cur);
    for (size_t i = 0; i < a.size(); i++)
        for (const char* key : RESUME_MUST_MATCH)
            if (!strcmp(a[i].name, key) && setting_value(a[i]) != setting_value(b[i]))
                fail("%s: checkpoint has %s=%s but this run has %s=%s", path.c_str(), key, setting_value(a[i]).c_str(), key, setting_value(b[i]).c_str());
    size_t n = m.nparams;
    std::vector<float> tmp(n, 0.0f);
    auto put = [&](const char* prefix, typename D::grad* dst) {
        std::fill(tmp.begin(), tmp.end(), 0.0f);
        for (const ParamSpec& p : m.table) safetensors_get(f, prefix + p.name, tmp.data() + p.offset, p.numel);
        std::vector<typename D::grad> conv(tmp.begin(), tmp.end());
        to_device(dev, dst, conv.data(), n);
    };
    put("", m.params); put("optimizer.m.", s.adam_m); put("optimizer.v.", s.adam_v);
    if (s.avg) put("average.", s.avg);
    s.step = atoi(f.meta["step"].c_str());
    s.train_ms = atof(f.meta["train_ms"].c_str());
    s.swa_count = atoi(f.meta["swa_count"].c_str());
    s.qat_active = atoi(f.meta["qat_active"].c_str()) != 0;
    s.loader.stream.open(s.loader.stream.files, m.cfg.vocab_size, atoi(f.meta["loader_file"].c_str()), atol(f.meta["loader_pos"].c_str()));
    log0("resumed from %s at step %d (train_time %.0fms)\n", path.c_str(), s.step, s.train_ms);
}

static void write_result_json(const Config& c, const std::string& json_body) {
    if (g_rank != 0) return;
    std::string path = c.out_dir + "/result.json";
    std::string text = "{\n" + json_body + "\n}\n";
    write_file_atomic(path, text.data(), text.size());
}

// The training loop, as the reference's main(): validate every VAL_LOSS_EVERY steps, stop at
// ITERATIONS or the wall-clock cap, average weights at the end.
template <class D> static void train(D dev, Model<D>& m, TrainState<D>& s, const EvalData& ev) {
    const Config& c = m.cfg;
    int accum = grad_accum_steps(c, g_world);
    long local = c.train_batch_tokens / ((long)g_world * accum);
    int T = c.train_seq_len, B = (int)(local / T);
    std::vector<int32_t> x, y;
    std::vector<float> weights(local, 1.0f / (float)(local * accum));
    int stop_after = -1;
    double t0 = now_ms(), tokens_per_step = (double)c.train_batch_tokens;
    refresh_compute_weights(dev, m, s.qat_active);
    if (c.warmup_steps > 0) log0("warmup_steps:%d not needed (no JIT compiler to warm up); training starts at step 0\n", c.warmup_steps);
    while (true) {
        bool last = s.step == c.iterations || (stop_after >= 0 && s.step >= stop_after);
        if (last || (c.val_loss_every > 0 && s.step % c.val_loss_every == 0)) {
            s.train_ms += now_ms() - t0;
            EvalResult r = eval_standard(dev, m, ev);
            log0("step:%d/%d val_loss:%.4f val_bpb:%.4f train_time:%.0fms step_avg:%.2fms\n", s.step, c.iterations,
                 r.val_loss, r.val_bpb, s.train_ms, s.train_ms / std::max(s.step, 1));
            t0 = now_ms();
        }
        if (last) {
            if (stop_after >= 0 && s.step < c.iterations)
                log0("stopping_early: wallclock_cap train_time:%.0fms step:%d/%d\n", s.train_ms, s.step, c.iterations);
            break;
        }
        double elapsed = s.train_ms + now_ms() - t0;
        double scale = lr_multiplier(c, s.step, elapsed);
        device_zero(dev, m.grads, m.nparams * sizeof(typename D::grad));
        double loss_sum = 0;
        for (int micro = 0; micro < accum; micro++) {
            s.loader.next_batch(c.train_batch_tokens, accum, x, y);
            to_device(dev, m.acts.loss_weights, weights.data(), local);
            std::vector<float> nll;
            forward_nll(dev, m, x, y, B, T, nll, (Lora<D>*)nullptr, true);
            gpt_backward(dev, m, B, T);
            for (float v : nll) loss_sum += v;
        }
        double train_loss = loss_sum / ((double)local * accum);
        double tl[1] = {train_loss}; host_allreduce_sum(tl, 1); train_loss = tl[0] / g_world;
        if (!std::isfinite(train_loss)) {
            std::string ck = s.checkpoints.empty() ? std::string("none (set CHECKPOINT_EVERY)") : s.checkpoints.back();
            fail("train_loss is %f at step %d: stopping (last good checkpoint: %s)", train_loss, s.step + 1, ck.c_str());
        }
        optimizer_step(dev, m, s, scale, (float)muon_momentum_at(c, s.step));
        // PR #456: late QAT switches on after the first step whose lr multiplier is below the threshold
        if (c.late_qat && !s.qat_active && scale < c.qat_threshold) {
            s.qat_active = true;
            log0("late_qat:enabled step:%d scale:%.4f clip_range:%d\n", s.step, scale, qat_clip(c));
        }
        s.step++;
        double approx = s.train_ms + now_ms() - t0;
        // thwu1 SWA: sum snapshots every SWA_EVERY steps once the lr multiplier is below SWA_START_FRAC
        if (c.swa_enabled && scale < c.swa_start_frac && s.step % c.swa_every == 0) {
            average_accumulate(dev, s.avg, m.params, m.nparams, -1.0f, s.swa_count == 0);
            if (s.swa_count++ == 0) log0("swa:start step:%d\n", s.step);
        }
        if (c.ema_decay > 0) average_accumulate(dev, s.avg, m.params, m.nparams, c.ema_decay, false);
        if (c.train_log_every > 0 && (s.step <= 10 || s.step % c.train_log_every == 0 || stop_after >= 0)) {
            double eta = c.max_wallclock_seconds > 0 ? std::max(0.0, c.max_wallclock_seconds * 1000 - approx) / 1000
                                                     : (c.iterations - s.step) * approx / s.step / 1000;
            log0("step:%d/%d train_loss:%.4f train_time:%.0fms step_avg:%.2fms tok/s:%.0f eta:%.0fs\n", s.step, c.iterations,
                 train_loss, approx, approx / s.step, tokens_per_step * s.step / (approx / 1000), eta);
        }
        bool capped = c.max_wallclock_seconds > 0 && approx >= 1000 * c.max_wallclock_seconds;
        if (stop_after < 0 && any_rank(capped)) stop_after = s.step;
        // PR #600: QAT from a step, and its "SWA" (an EMA over the last SWA_STEPS steps)
        if (c.qat_bits > 0 && !c.late_qat && !s.qat_active) {
            int begin = c.qat_start_step >= 0 ? c.qat_start_step : std::max(0, c.iterations - c.warmdown_iters);
            if (s.step > begin) { s.qat_active = true; log0("qat:enabled step:%d bits:%d\n", s.step, c.qat_bits); }
        }
        if (c.swa_steps > 0) {
            int end = stop_after >= 0 ? stop_after : c.iterations;
            int begin = c.swa_start_step >= 0 ? c.swa_start_step : std::max(0, end - c.swa_steps);
            if (s.step > begin) average_accumulate(dev, s.avg, m.params, m.nparams, c.swa_decay, s.swa_count++ == 0);
        }
        refresh_compute_weights(dev, m, s.qat_active);
        if (c.checkpoint_every > 0 && s.step % c.checkpoint_every == 0) {
            s.train_ms += now_ms() - t0;
            save_checkpoint(dev, m, s);
            t0 = now_ms();
        }
    }
    // final weights: the SWA mean (more than one snapshot), PR #600's EMA, or the EMA
    if (c.swa_enabled && s.swa_count > 1) {
        log0("swa:applying averaged %d checkpoints\n", s.swa_count);
        scale_grads(dev, s.avg, m.nparams, 1.0f / s.swa_count);
        device_copy(dev, m.params, s.avg, m.nparams);
    } else if ((c.swa_steps > 0 && s.swa_count > 0) || c.ema_decay > 0) {
        log0("%s:applying averaged weights\n", c.ema_decay > 0 ? "ema" : "swa_ema");
        device_copy(dev, m.params, s.avg, m.nparams);
    }
    refresh_compute_weights(dev, m, false);
}

static std::vector<std::string> split_list(const std::string& s) {
    std::vector<std::string> out;
    size_t pos = 0;
    while (pos <= s.size()) {
        size_t comma = s.find(',', pos);
        std::string item = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
        if (!item.empty()) out.push_back(item);
        if (comma == std::string::npos) break;
        pos = comma + 1;
    }
    return out;
}

// Every EVAL_MODE in order; each prints the reference-style final_<mode> lines.
template <class D> static std::vector<EvalResult> evaluate_modes(D dev, Model<D>& m, const EvalData& ev) {
    const Config& c = m.cfg;
    std::vector<EvalResult> results;
    for (const std::string& mode : split_list(c.eval_mode)) {
        NllRecord rec;
        if (!c.nll_dump.empty()) rec.init(ev.val.size() - 1);
        std::vector<EvalResult> extra;
        EvalResult r;
        if (mode == "standard") r = eval_standard(dev, m, ev, &rec);
        else if (mode == "sliding") r = eval_sliding(dev, m, ev, &rec);
        else if (mode == "lora_ttt") r = eval_lora_ttt(dev, m, ev, &rec, &extra);
        else if (mode == "full_ttt") r = eval_full_ttt(dev, m, ev, &rec);
        else fail("EVAL_MODE: unknown mode \"%s\" (expected standard, sliding, lora_ttt, full_ttt)", mode.c_str());
        results.push_back(r);
        for (EvalResult& e : extra) results.push_back(e);
        for (size_t i = results.size() - 1 - extra.size(); i < results.size(); i++) {
            const EvalResult& x = results[i];
            log0("final_%s val_loss:%.4f val_bpb:%.4f eval_time:%.0fms%s%s\n", x.mode.c_str(), x.val_loss, x.val_bpb, x.ms,
                 x.note.empty() ? "" : " ", x.note.c_str());
            log0("final_%s_exact val_loss:%.8f val_bpb:%.8f scored_tokens:%.0f\n", x.mode.c_str(), x.val_loss, x.val_bpb, x.tokens);
            if (g_world < 8) log0("final_%s projected_eval_time_8gpu:%.0fms (×%d/8 ranks, assuming linear scaling)\n", x.mode.c_str(), x.ms * g_world / 8, g_world);
        }
        if (!c.nll_dump.empty()) {  // each position was scored by exactly one rank: a sum gathers them
            std::vector<double> all(rec.nll.size());
            for (size_t i = 0; i < all.size(); i++) all[i] = std::isnan(rec.nll[i]) ? 0.0 : rec.nll[i];
            host_allreduce_sum(all.data(), (int)all.size());
            std::vector<float> out(all.begin(), all.end());
            if (g_rank == 0) write_file_atomic(c.nll_dump + "." + mode, out.data(), out.size() * sizeof(float));
        }
    }
    return results;
}


// Everything after the command line is parsed: data, model, training, export, evaluation.
template <class D> static void run(D dev, Config& c, const char* device_name) {
    double run_start = now_ms();
    SpmModel sp;
    try { sp = spm_load(c.tokenizer_path); } catch (const std::exception& e) { fail("TOKENIZER_PATH: %s", e.what()); }
    if ((int)sp.pieces.size() != c.vocab_size)
        fail("VOCAB_SIZE=%d does not match the tokenizer %s (%zu pieces)", c.vocab_size, c.tokenizer_path.c_str(), sp.pieces.size());
    EvalData ev;
    ev.luts = spm_byte_luts(sp, c.vocab_size);
    ev.val = load_validation_tokens(c);
    log0("tokenizer:%s pieces:%zu checksum:%016llx\n", c.tokenizer_path.c_str(), sp.pieces.size(), (unsigned long long)sp.checksum);
    std::vector<std::string> train_files;
    if (c.load_artifact.empty()) {
        train_files = shard_files(c.data_path, "train");
        long total = 0;
        for (const std::string& f : train_files) { FILE* fp = fopen_check(f.c_str(), "rb"); total += shard_header_check(f, fp); fclose(fp); }
        log0("train_loader:dataset:%s train_shards:%zu tokens:%ld\n", c.data_path.c_str(), train_files.size(), total);
    }
    log0("val_loader:tokens:%zu scored_positions:%zu%s\n", ev.val.size(), ev.val.size() - 1,
         c.val_truncate_to_seq ? " (truncated to a multiple of TRAIN_SEQ_LEN, as the reference)" : "");

    Model<D> m;
    model_init_for_run(dev, m, c);
    print_param_table(m.table);
    size_t pbytes = m.nparams * sizeof(typename D::grad);
    log0("memory: params %.1f MiB, grads %.1f MiB, optimizer %.1f MiB, activations %.1f MiB (%d × %d tokens)\n",
         pbytes / 1048576.0, pbytes / 1048576.0, 3 * pbytes / 1048576.0, m.act_bytes / 1048576.0, m.acts.B, m.acts.T);
    log0("device:%s world_size:%d (this node's ranks from local rank %d) grad_accum_steps:%d\n", device_name, g_world, g_local_rank,
         grad_accum_steps(c, g_world));

    std::string json;
    auto add_json = [&](const std::string& line) { json += (json.empty() ? "" : ",\n") + std::string("  ") + line; };
    add_json(fmt("\"run_id\": \"%s\"", json_escape(c.run_id).c_str()));
    add_json(fmt("\"preset\": \"%s\"", json_escape(c.preset).c_str()));
    add_json(fmt("\"device\": \"%s\", \"world_size\": %d", device_name, g_world));
    add_json(fmt("\"seed\": %d, \"eval_mode\": \"%s\", \"data_path\": \"%s\", \"val_tokens\": %zu, \"val_tokens_limit\": %ld",
                 c.seed, json_escape(c.eval_mode).c_str(), json_escape(c.data_path).c_str(), ev.val.size(), c.val_tokens_limit));
    add_json(fmt("\"tokenizer_checksum\": \"%016llx\", \"code_checksum\": \"%s\"", (unsigned long long)sp.checksum, PGOLF_CODE_CHECKSUM));
    size_t artifact_bytes = 0;
    std::vector<uint8_t> artifact;
    std::string artifact_path = c.out_dir + "/final_model.pgz";
    if (c.load_artifact.empty()) {
        TrainState<D> s;
        train_state_init(dev, s, m);
        s.loader.rank = g_rank; s.loader.world = g_world;
        s.loader.stream.open(train_files, c.vocab_size);
        if (!c.resume.empty()) load_checkpoint(dev, m, s, c.resume);
        train(dev, m, s, ev);
        if (c.checkpoint_every > 0) save_checkpoint(dev, m, s);
        add_json(fmt("\"steps\": %d, \"train_time_ms\": %.0f", s.step, s.train_ms));
        // export: final weights (full precision), pruning, quantization, zstd
        std::vector<typename D::grad> wd(m.nparams);
        to_host(dev, wd.data(), m.params, m.nparams);
        std::vector<float> w(wd.begin(), wd.end());
        if (g_rank == 0) {
            std::vector<TensorBlob> blobs;
            for (const ParamSpec& p : m.table) blobs.push_back({p.name, p.shape, w.data() + p.offset, p.numel});
            safetensors_write(c.out_dir + "/final_model.safetensors", blobs, {{"format", "pgolf-weights-1"}, {"config", config_to_text(c)}});
        }
        if (c.prune_frac > 0) { magnitude_prune(c, m.table, w.data()); log0("magnitude_pruning: frac=%g\n", c.prune_frac); }
        if (g_rank == 0) {  // one rank compresses (zstd-22 takes a while); the others wait and read the file
            ExportReport rep;
            artifact = artifact_build(c, m.table, w.data(), &rep);
            write_file_atomic(artifact_path, artifact.data(), artifact.size());
            print_export_report(rep);
        }
        host_barrier();
    } else {
        artifact_path = c.load_artifact;
    }
    // the score is always that of the weights read back from the artifact file
    if (g_rank == 0) artifact = read_file(artifact_path);
    host_broadcast(artifact);
    artifact_bytes = artifact.size();
    Config art_cfg;
    std::vector<float> w;
    artifact_parse(artifact, artifact_path, &art_cfg, &w);
    std::vector<typename D::grad> wconv(w.begin(), w.end());
    to_device(dev, m.params, wconv.data(), m.nparams);
    refresh_compute_weights(dev, m, false);
    long code = PGOLF_CODE_BYTES, code_stripped = PGOLF_CODE_BYTES_STRIPPED;
    long counted = code_stripped > 0 ? code_stripped : code;
    long total = (long)artifact_bytes + counted;
    log0("artifact:%s bytes:%zu (read back and dequantized for every score below)\n", artifact_path.c_str(), artifact_bytes);
    log0("Code size: %ld bytes (full source %ld, stripped submission %ld)\n", counted, code, code_stripped);
    log0("Total submission size: %ld bytes%s\n", total, total > ARTIFACT_LIMIT_BYTES ? "  <-- OVER THE 16,000,000-BYTE LIMIT: not a valid submission" : "");
    if (total > ARTIFACT_LIMIT_BYTES && g_rank == 0)
        fprintf(stderr, "WARNING: total submission size %ld bytes exceeds 16,000,000 bytes; outputs are kept, but this is not a valid submission\n", total);
    add_json(fmt("\"artifact_bytes\": %zu, \"code_bytes\": %ld, \"code_bytes_full\": %ld, \"code_bytes_stripped\": %ld, \"total_bytes\": %ld, \"under_limit\": %s",
                 artifact_bytes, counted, code, code_stripped, total, total <= ARTIFACT_LIMIT_BYTES ? "true" : "false"));

    std::vector<EvalResult> results = evaluate_modes(dev, m, ev);
    std::string evj = "\"eval\": {";
    for (size_t i = 0; i < results.size(); i++)
        evj += fmt("%s\n    \"%s\": {\"val_loss\": %.8f, \"val_bpb\": %.8f, \"eval_time_ms\": %.0f, \"scored_tokens\": %.0f, \"legal\": %s}",
                   i ? "," : "", results[i].mode.c_str(), results[i].val_loss, results[i].val_bpb, results[i].ms, results[i].tokens,
                   results[i].note.find("not competition-legal") == std::string::npos ? "true" : "false");
    add_json(evj + "\n  }");
    add_json(fmt("\"wall_time_s\": %.1f", (now_ms() - run_start) / 1000));
    write_result_json(c, json);
    // summary
    log0("\n%-22s %12s %12s %12s\n", "summary", "val_loss", "val_bpb", "eval_ms");
    for (const EvalResult& r : results) log0("%-22s %12.6f %12.6f %12.0f%s\n", ("final_" + r.mode).c_str(), r.val_loss, r.val_bpb, r.ms, r.note.empty() ? "" : "  (not competition-legal)");
    log0("%-22s %12zu bytes\n%-22s %12ld bytes\n%-22s %12ld bytes of 16000000 %s\n", "artifact", artifact_bytes, "code", counted,
         "total", total, total <= ARTIFACT_LIMIT_BYTES ? "(ok)" : "(OVER)");
    log0("outputs in %s\n", c.out_dir.c_str());
}

static bool cuda_available();

#ifndef PGOLF_TESTING
int main(int argc, char** argv) {
    distributed_init(&argc, &argv);
    if (argc > 1 && !strcmp(argv[1], "inspect")) { int rc = inspect_main(argc, argv); distributed_finish(); return rc; }
    if (argc > 1 && !strcmp(argv[1], "settings")) { print_settings_table(); return 0; }
    if (argc > 1) fail("unknown argument \"%s\": settings are environment variables (e.g. CONFIG=pr467 ./train_gpt), `./train_gpt inspect ARTIFACT [CHECKPOINT]` or `./train_gpt settings`", argv[1]);
    Config c = config_from_env();
    if (!c.load_artifact.empty()) {  // the model comes from the artifact; env vars may change evaluation only
        std::vector<uint8_t> bytes;
        if (g_rank == 0) bytes = read_file(c.load_artifact);
        host_broadcast(bytes);
        Config art; std::vector<float> w;
        artifact_parse(bytes, c.load_artifact, &art, &w);
        std::vector<Setting> a = config_settings(art), e = config_settings(c);
        for (size_t i = 0; i < a.size(); i++) {
            bool shape = false;
            for (const char* key : RESUME_MUST_MATCH) shape |= !strcmp(a[i].name, key);
            const char* env = getenv(a[i].name);
            if (env && shape && setting_value(a[i]) != setting_value(e[i]))
                fail("LOAD_ARTIFACT: %s=%s contradicts the artifact's %s=%s", a[i].name, env, a[i].name, setting_value(a[i]).c_str());
            if (env && !shape) setting_parse(a[i], env);
        }
        art.load_artifact = c.load_artifact;
        c = art;
    }
    if (c.run_id.empty()) {
        char buf[64]; time_t t = time(nullptr); strftime(buf, sizeof buf, "%Y%m%d_%H%M%S", localtime(&t)); c.run_id = buf;
    }
    if (c.out_dir.empty()) c.out_dir = "runs/" + c.run_id;
    std::string device = c.device;
    if (device == "auto") device = cuda_available() ? "cuda" : "cpu";
    if (device != "cpu" && device != "cuda") fail("DEVICE=%s: expected cpu, cuda or auto", c.device.c_str());
    c.device = device;
    config_validate(c, g_world);
    if (g_rank == 0) {
        make_dirs(c.out_dir);
        g_logfile = fopen_check((c.out_dir + "/log.txt").c_str(), "a");
    }
    log0("pgolf train_gpt: code_bytes:%ld stripped:%ld\n", (long)PGOLF_CODE_BYTES, (long)PGOLF_CODE_BYTES_STRIPPED);
    if (c.device == "cpu" && (long)c.model_dim * c.num_layers > 1024 && c.load_artifact.empty())
        log0("note: DEVICE=cpu runs the plain C++ reference; a %d-layer d%d model trains very slowly on a CPU\n", c.num_layers, c.model_dim);
    config_print(c);
    if (c.device == "cpu") {
#if PGOLF_CPU_REFERENCE
        run(Cpu<float>{}, c, "cpu");
#else
        fail("DEVICE=cpu: this build has no CPU reference (it is the stripped submission)");
#endif
    } else {
#ifdef __CUDACC__
        run_cuda(c);
#else
        fail("DEVICE=cuda: this train_gpt was built without CUDA");
#endif
    }
    if (g_logfile) fclose(g_logfile);
    distributed_finish();
    return 0;
}
#endif

#ifndef __CUDACC__
static bool cuda_available() { return false; }
#endif
