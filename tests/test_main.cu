// The test binary: the whole of train_gpt.cu (its main() fenced off) plus every test file.
#define PGOLF_TESTING 1
#include "../train_gpt.cu"
#include "harness.h"

// Round a float through half or bfloat16 (the tests' expected values).
static inline uint16_t float_to_bf16(float f) {
    uint32_t x; memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (x >> 16) | 0x40;  // nan stays nan
    x += 0x7fff + ((x >> 16) & 1);
    return x >> 16;
}
static inline float round_to_half(float f) { return half_to_float(float_to_half(f)); }
static inline float round_to_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

#include "test_model.cuh"
#include "test_frontier.cuh"
#include "test_train.cuh"
#include "test_compress.cuh"
#include "test_gptq.cuh"
#include "test_eval.cuh"
#include "test_parity.cuh"
#include "test_cost.cuh"
#include "test_cuda.cuh"  // defines REQUIRE_GPU: before the other CUDA tests
#include "test_cuda_attention.cuh"
#include "test_cuda_frontier.cuh"
#include "test_cuda_eval.cuh"
#include "test_gptq_cuda.cuh"  // after test_cuda.cuh: REQUIRE_GPU, perturbed_init
#include "test_parity_cuda.cuh"  // the parity dumps through the CUDA path
#include "test_cost_emu.cuh"  // the cost model's launch counts against an emulated step (emulated build only)
#include "test_cuda_cover.cuh"
#include "test_emu.cuh"  // the CUDA emulator's own checks (emulated build only)

int main(int argc, char** argv) {
    g_quiet = !getenv("PGOLF_TEST_LOG");  // PGOLF_TEST_LOG=1 shows the training log lines
    return test_main(argc, argv);
}
