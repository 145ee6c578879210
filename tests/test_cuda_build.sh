#!/usr/bin/env bash
# CUDA build checks, cheap enough for every `make test` (one nvcc compile, about 20 s on 2 cores):
#   cuda_build_compiles_<arch>    train_gpt.cu with sections/cuda*.cuh compiles for GPU_ARCH (sm_90a);
#   cuda_build_no_warnings        nothing in sections/cuda*.cuh warns: nvcc's front end, the host
#                                 compiler's -Wall -Wextra, and ptxas spills or local memory (a
#                                 per-lane array indexed at run time ends up in slow local memory);
#   cuda_build_train_gpt_is_cuda  the built ./train_gpt links cuBLASLt (the nvcc build, not g++'s);
#   cuda_build_tests_present      tests/test_main carries the CUDA core tests.
# Prints PASS/FAIL/SKIP lines like every test and exits non-zero on a failure.
set -u
cd "$(dirname "$0")/.."
failed=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failed=1; }
skip() { echo "SKIP $1: $2"; }

NVCC=${NVCC:-nvcc}
arch=${GPU_ARCH:-sm_90a}
if ! command -v "$NVCC" >/dev/null 2>&1; then
    skip cuda_build "nvcc not found (the CUDA toolkit is not installed)"
    exit 0
fi
if ! grep -q '#include "sections/cuda.cuh"' train_gpt.cu; then
    skip cuda_build "train_gpt.cu does not include sections/cuda.cuh yet"
    exit 0
fi

# the Makefile's feature switches, decided the same way
defs=()
cuda_home=$(dirname "$(dirname "$(command -v "$NVCC")")")
if [ -f "$cuda_home/include/nccl.h" ] || [ -f /usr/include/nccl.h ]; then defs+=(-DPGOLF_NCCL); fi
if command -v mpicxx >/dev/null 2>&1; then
    defs+=(-DPGOLF_MPI $(mpicxx --showme:compile 2>/dev/null || mpicxx -show 2>/dev/null | tr ' ' '\n' | grep '^-I'))
fi

log=$(mktemp)
obj=$(mktemp --suffix=.o)
trap 'rm -f "$log" "$obj"' EXIT
t0=$SECONDS
if "$NVCC" -std=c++17 -arch="$arch" -x cu -Xcompiler -fopenmp,-Wall,-Wextra -Xptxas -warn-spills,-warn-lmem-usage \
        "${defs[@]}" -I. -c -o "$obj" train_gpt.cu >"$log" 2>&1; then
    pass "cuda_build_compiles_$arch ($((SECONDS - t0))s)"
    # warnings located in the CUDA sections (nvcc: file(line): warning; gcc: file:line:col: warning),
    # and every ptxas warning (only the CUDA sections hold kernels)
    warns=$( { grep -E '^(\./)?sections/cuda[A-Za-z0-9_]*\.cuh[(:][0-9]+' "$log" | grep -iE 'warning'; grep -iE '^ptxas.*warning' "$log"; } )
    if [ -z "$warns" ]; then
        pass cuda_build_no_warnings
    else
        fail cuda_build_no_warnings "$(echo "$warns" | head -n 3 | tr '\n' ' ')"
    fi
    others=$(grep -ciE 'warning' "$log")
    [ "$others" -gt 0 ] && [ -z "$warns" ] && echo "note: $others warning line(s) outside sections/cuda*.cuh (not counted here)"
else
    fail "cuda_build_compiles_$arch" "$(grep -m 3 -E 'error' "$log" | tr '\n' ' ')"
fi

if [ -x train_gpt ]; then
    if ldd train_gpt 2>/dev/null | grep -q libcublasLt; then
        pass cuda_build_train_gpt_is_cuda
    else
        fail cuda_build_train_gpt_is_cuda "./train_gpt does not link cuBLASLt: not the nvcc build with the CUDA path (make train_gpt)"
    fi
else
    skip cuda_build_train_gpt_is_cuda "./train_gpt is not built (make)"
fi

if [ -x tests/test_main ]; then
    n=$(tests/test_main cuda_host_ 2>/dev/null | grep -cE '^(PASS|FAIL|SKIP) cuda_host_')
    if [ "$n" -gt 0 ]; then
        pass "cuda_build_tests_present ($n host-side CUDA tests)"
    else
        fail cuda_build_tests_present "tests/test_main runs no cuda_host_* test: tests/test_main.cu must include test_cuda.cuh"
    fi
else
    skip cuda_build_tests_present "tests/test_main is not built (make tests/test_main)"
fi
exit $failed
