#!/usr/bin/env bash
# The CUDA emulator's NCCL over MPI with two ranks: tests/test_emu_libs's nccl_* tests under
# `mpirun -np 2` (collectives against sums computed by the test, and mismatched collectives refused).
set -u
cd "$(dirname "$0")/.."
bin=tests/test_emu_libs
if ! command -v mpirun >/dev/null 2>&1; then echo "SKIP emu_nccl_two_ranks: no mpirun (install openmpi-bin)"; exit 0; fi
if [ ! -x "$bin" ]; then
    if [ -f "${CUDA_HOME:-/usr/local/cuda}/include/cuda_runtime.h" ]; then echo "FAIL emu_nccl_two_ranks: $bin not built (make $bin)"; exit 1; fi
    echo "SKIP emu_nccl_two_ranks: no CUDA toolkit headers, so $bin is not built"; exit 0
fi
root=(); [ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
log=$(mktemp); trap 'rm -f "$log"' EXIT
timeout 120 mpirun -np 2 --oversubscribe --tag-output "${root[@]}" "$bin" nccl_ > "$log" 2>&1
rc=$?
# each rank prints its own PASS/FAIL lines: report rank 0's as two-rank results, and any rank's FAIL
sed -n 's/^\[1,0\]<stdout>:\(PASS\|SKIP\) \([^ ]*\)\(.*\)/\1 \2_two_ranks\3/p' "$log"
if [ "$rc" -ne 0 ] || grep -q '<stdout>:FAIL' "$log"; then
    echo "FAIL emu_nccl_two_ranks: mpirun exited with status $rc"
    grep -E 'FAIL|error|rror' "$log" | head -20 | sed 's/^/    /'
    exit 1
fi
exit 0
