#!/usr/bin/env bash
# The bytes submitted are the bytes built and tested:
#   cuda_build_submission_compiles_<arch>  the stripped single-file submission (make submission)
#                                          compiles on its own with the Makefile's GPU code (GPU_ARCH,
#                                          default fat: sm_80 + sm_90 machine code, compute_90 PTX);
#   cuda_build_fat_binary                  that binary holds the sm_80 and sm_90 code and the PTX;
#   cuda_build_portable_host_code          ./train_gpt's host code is not built for this CPU (-march=native);
#   cuda_build_submission_no_warnings      with nvcc's front end, the host compiler's -Wall -Wextra and
#                                          ptxas spill/local-memory warnings, nothing warns;
#   cuda_build_train_gpt_is_cuda           ./train_gpt is the nvcc build (it links cuBLASLt);
#   cuda_build_tests_present               tests/test_main carries the host-side CUDA tests;
#   cuda_submission_trains_like_full       the stripped build's first steps have the same losses, bit for
#                                          bit, as the full build's (without a GPU: both through the emulator).
set -u
cd "$(dirname "$0")/.."
failed=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failed=1; }
skip() { echo "SKIP $1: $2"; }

NVCC=${NVCC:-nvcc}
arch=${GPU_ARCH:-fat}
gpu_code=$(make -s --no-print-directory print-gpu-code GPU_ARCH="$arch")
sub=build/submission/train_gpt.cu
if ! command -v "$NVCC" >/dev/null 2>&1; then skip cuda_build "nvcc not found (the CUDA toolkit is not installed)"; exit 0; fi
[ -f "$sub" ] || make -s submission >/dev/null || { fail cuda_build "make submission failed"; exit 1; }

defs=()  # the Makefile's feature switches, decided the same way
cuda_home=$(dirname "$(dirname "$(command -v "$NVCC")")")
if [ -f "$cuda_home/include/nccl.h" ] || [ -f /usr/include/nccl.h ]; then defs+=(-DPGOLF_NCCL); fi
if command -v mpicxx >/dev/null 2>&1; then
    defs+=(-DPGOLF_MPI $(mpicxx --showme:compile 2>/dev/null || mpicxx -show 2>/dev/null | tr ' ' '\n' | grep '^-I'))
fi
bin=build/submission/train_gpt
log=$(mktemp); trap 'rm -f "$log"' EXIT
t0=$SECONDS
if "$NVCC" -O3 -std=c++17 $gpu_code -x cu -Xcompiler -fopenmp,-Wall,-Wextra -Xptxas -warn-spills,-warn-lmem-usage \
        "${defs[@]}" -o "$bin" "$sub" -lcublasLt -lcublas -lzstd -lgomp $( [ ${#defs[@]} -gt 0 ] && [[ " ${defs[*]} " == *PGOLF_NCCL* ]] && echo -lnccl ) \
        $(command -v mpicxx >/dev/null && mpicxx --showme:link 2>/dev/null) >"$log" 2>&1; then
    pass "cuda_build_submission_compiles_$arch ($(wc -c < "$sub") bytes, $((SECONDS - t0))s)"
    # Any warning fails: spills and stack frames included (the attention backward at 3 blocks per SM has none).
    warnings=$(grep -iE 'warning' "$log")
    if [ -n "$warnings" ]; then fail cuda_build_submission_no_warnings "$(head -n 3 <<<"$warnings" | tr '\n' ' ')"
    else pass cuda_build_submission_no_warnings; fi
else
    fail "cuda_build_submission_compiles_$arch" "$(grep -m 3 -E 'error' "$log" | tr '\n' ' ')"
fi
if [ "$arch" = fat ] && [ -x "$bin" ]; then
    # the GPU code in the binary's .nv_fatbin section: fatbin headers (magic 0xBA55ED50), then entries
    # of kind 1 (PTX) or 2 (machine code) with the architecture at byte 28 of each entry's header
    code=$(python3 - "$bin" <<'PY'
import struct, subprocess, sys
path = sys.argv[1]
data = open(path, "rb").read()
sec = b""
for line in subprocess.run(["readelf", "-S", "-W", path], capture_output=True, text=True).stdout.splitlines():
    if ".nv_fatbin " in line + " ":
        f = line.split("]")[1].split()
        sec = data[int(f[3], 16):int(f[3], 16) + int(f[4], 16)]
found, pos = set(), 0
while (pos := sec.find(struct.pack("<I", 0xBA55ED50), pos)) >= 0:
    _, _, hsize, fsize = struct.unpack_from("<IHHQ", sec, pos)
    e = pos + hsize
    while e < pos + hsize + fsize:
        kind, _, ehsize, esize = struct.unpack_from("<HHIQ", sec, e)
        found.add(("sm_" if kind == 2 else "compute_") + str(struct.unpack_from("<I", sec, e + 28)[0]))
        e += ehsize + esize
    pos += hsize + fsize
print(" ".join(sorted(found)))
PY
)
    if [ "$code" = "compute_90 sm_80 sm_90" ]; then pass "cuda_build_fat_binary ($code)"
    else fail cuda_build_fat_binary "the binary holds GPU code [$code], expected compute_90 sm_80 sm_90"; fi
fi
if make -n -s --no-print-directory -W train_gpt.cu train_gpt 2>/dev/null | grep -q -- '-march=native'; then
    fail cuda_build_portable_host_code "make train_gpt passes -march=native to the host compiler: the binary may not run on another node"
else
    pass cuda_build_portable_host_code
fi

if [ -x train_gpt ]; then
    if ldd train_gpt 2>/dev/null | grep -q libcublasLt; then pass cuda_build_train_gpt_is_cuda
    else fail cuda_build_train_gpt_is_cuda "./train_gpt does not link cuBLASLt: not the nvcc build with the CUDA path (make train_gpt)"; fi
else
    skip cuda_build_train_gpt_is_cuda "./train_gpt is not built (make)"
fi
if [ -x tests/test_main ]; then
    n=$(tests/test_main cuda_host_ 2>/dev/null | grep -cE '^(PASS|FAIL|SKIP) cuda_host_')
    if [ "$n" -gt 0 ]; then pass "cuda_build_tests_present ($n host-side CUDA tests)"
    else fail cuda_build_tests_present "tests/test_main runs no cuda_host_* test: tests/test_main.cu must include test_cuda.cuh"; fi
else
    skip cuda_build_tests_present "tests/test_main is not built (make tests/test_main)"
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    # no GPU: the same comparison through the CUDA emulator, the stripped source built with its hooks kept
    if [ ! -x train_gpt_emu ]; then
        skip cuda_submission_trains_like_full "no CUDA device, and no ./train_gpt_emu (make emu) to emulate one"
    elif ! make -s build/submission/train_gpt_emu > "$log" 2>&1; then
        fail cuda_submission_trains_like_full "make build/submission/train_gpt_emu failed: $(tail -3 "$log")"
    else
        tmp=$(mktemp -d)
        run=(CONFIG=tiny NUM_LAYERS=2 MODEL_DIM=64 DEVICE=cuda DATA_PATH=data/datasets/debian_prose_sp1024
             ITERATIONS=3 TRAIN_BATCH_TOKENS=512 GRAD_ACCUM_STEPS=1 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=1
             VAL_TOKENS_LIMIT=1024 EVAL_MODE=standard ZSTD_LEVEL=3 OMP_NUM_THREADS=1)
        env "${run[@]}" OUT_DIR="$tmp/full" ./train_gpt_emu > "$tmp/full.log" 2>&1
        env "${run[@]}" OUT_DIR="$tmp/sub" build/submission/train_gpt_emu > "$tmp/sub.log" 2>&1
        a=$(grep -o 'train_loss:[0-9.]*\|val_bpb:[0-9.]*' "$tmp/full.log")
        b=$(grep -o 'train_loss:[0-9.]*\|val_bpb:[0-9.]*' "$tmp/sub.log")
        if [ "$(echo "$a" | grep -c train_loss)" -eq 3 ] && [ "$a" = "$b" ] && grep -q "CUDA emulator" "$tmp/sub.log"; then
            pass "cuda_submission_trains_like_full (emulated: $(echo $a | tr '\n' ' '))"
        else
            fail cuda_submission_trains_like_full "emulated, full: $(echo $a | head -c 200) / stripped: $(echo $b | head -c 200)"
        fi
        rm -rf "$tmp"
    fi
elif [ ! -x "$bin" ] || [ ! -x train_gpt ]; then
    fail cuda_submission_trains_like_full "binaries missing"
else
    tmp=$(mktemp -d)
    run=(CONFIG=tiny DEVICE=cuda DATA_PATH=data/datasets/debian_prose_sp1024 ITERATIONS=5 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=1
         VAL_TOKENS_LIMIT=8192 EVAL_MODE=standard ZSTD_LEVEL=3)
    env "${run[@]}" OUT_DIR="$tmp/full" ./train_gpt > "$tmp/full.log" 2>&1
    env "${run[@]}" OUT_DIR="$tmp/sub" "$bin" > "$tmp/sub.log" 2>&1
    a=$(grep -o 'train_loss:[0-9.]*\|val_bpb:[0-9.]*' "$tmp/full.log"); b=$(grep -o 'train_loss:[0-9.]*\|val_bpb:[0-9.]*' "$tmp/sub.log")
    if [ -n "$a" ] && [ "$a" = "$b" ]; then pass cuda_submission_trains_like_full
    else fail cuda_submission_trains_like_full "full: $(echo $a | head -c 200) / stripped: $(echo $b | head -c 200)"; fi
    rm -rf "$tmp"
fi
exit $failed
