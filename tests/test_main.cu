// The test binary: the whole of train_gpt.cu (its main() fenced off) plus every test file.
#define PGOLF_TESTING 1
#include "../train_gpt.cu"
#include "harness.h"

#include "test_model.cuh"
#include "test_compress.cuh"

int main(int argc, char** argv) { return test_main(argc, argv); }
