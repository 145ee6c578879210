// The test binary: the whole of train_gpt.cu (its main() fenced off) plus every test file.
#define PGOLF_TESTING 1
#include "../train_gpt.cu"
#include "harness.h"

#include "test_model.cuh"
#include "test_train.cuh"
#include "test_compress.cuh"
#include "test_eval.cuh"
#include "test_cuda.cuh"  // defines REQUIRE_GPU: before the other CUDA tests

int main(int argc, char** argv) {
    g_quiet = !getenv("PGOLF_TEST_LOG");  // PGOLF_TEST_LOG=1 shows the training log lines
    return test_main(argc, argv);
}
