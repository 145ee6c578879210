#!/usr/bin/env bash
# Runs every test program and script, then prints one line: N passed, N failed, N skipped.
# Each program prints PASS/FAIL/SKIP lines (tests/harness.h); a program that dies
# without saying FAIL still counts as one failure.
set -u
cd "$(dirname "$0")/.."
filter="${1:-}"
export OMP_WAIT_POLICY=passive  # idle OpenMP threads sleep instead of spinning (2 shared cores)
log=$(mktemp); trap 'rm -f "$log"' EXIT
crashed=0

run() {  # run NAME CMD...
    local name="$1"; shift
    [ -n "$filter" ] && [[ "$name" != *"$filter"* ]] && return
    echo "== $name"
    local out; out=$(mktemp)
    "$@" 2>&1 | tee "$out" | grep -E '^(PASS|FAIL|SKIP) ' ; local rc=${PIPESTATUS[0]}
    grep -E '^(PASS|FAIL|SKIP) ' "$out" >> "$log"
    if [ "$rc" -ne 0 ] && ! grep -qE '^FAIL ' "$out"; then
        echo "FAIL $name: exited with status $rc"; tail -n 20 "$out" | sed 's/^/    /'
        crashed=$((crashed + 1))
    fi
    rm -f "$out"
}

for bin in tests/test_tokenizer tests/test_emu_libs; do
    [ -x "$bin" ] && run "$bin" "$bin"
done
# The CUDA tests: natively where a GPU is, and always through the emulator (tests/emu) when it is built;
# without a GPU the native binary leaves them to the emulator (all but the no-GPU failure test).
has_gpu=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU' && has_gpu=1
if [ -x tests/test_main ]; then
    if [ "$has_gpu" = 1 ] || [ ! -x tests/test_main_emu ]; then run tests/test_main tests/test_main
    else run tests/test_main tests/test_main -cuda_ cuda_host_without_gpu; fi
fi
[ -x tests/test_main_emu ] && run "tests/test_main_emu (CUDA emulator)" tests/test_main_emu cuda_ -cuda_host_without_gpu emu_
for script in tests/test_*.sh; do
    [ -f "$script" ] && run "$script" bash "$script"
done

passed=$(grep -c '^PASS ' "$log")
failed=$(( $(grep -c '^FAIL ' "$log") + crashed ))
skipped=$(grep -c '^SKIP ' "$log")
if [ "$skipped" -gt 0 ]; then
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]
