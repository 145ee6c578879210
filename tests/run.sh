#!/usr/bin/env bash
# Runs the test programs and scripts, then prints one line: N passed, N failed, N skipped.
#   tests/run.sh                 every test (make test)
#   tests/run.sh --cpu           every test that needs no CUDA path (make test-cpu): tests/test_main_cpu (the
#                                g++ build of the test binary) instead of tests/test_main and the emulator's
#                                tests/test_main_emu, and no script whose name says cuda, emu or gpu (they
#                                build or run ./train_gpt, the nvcc build, or the emulator)
#   tests/run.sh [--cpu] NAME    only the tests whose name contains NAME: a program whose file name contains
#                                NAME runs whole; a test binary runs the tests of its own that match
#                                (PGOLF_TEST_FILTER, tests/harness.h), if it has any; a script runs when its
#                                text contains NAME (its tests' names are written in it), and of its results
#                                only the matching tests and any failure count
# Each program prints PASS/FAIL/SKIP lines (tests/harness.h); a program that dies
# without saying FAIL still counts as one failure.
set -u
cd "$(dirname "$0")/.."
cpu_only=0
[ "${1:-}" = --cpu ] && { cpu_only=1; shift; }
filter="${1:-}"
export OMP_WAIT_POLICY=passive  # idle OpenMP threads sleep instead of spinning (2 shared cores)
log=$(mktemp); trap 'rm -f "$log"' EXIT
crashed=0

report() {  # report NAME CMD...: run, echo the PASS/FAIL/SKIP lines, count them (KEEP: only those matching)
    local name="$1"; shift
    echo "== $name"
    local out; out=$(mktemp) t0=$SECONDS
    "$@" 2>&1 | tee "$out" | grep --line-buffered -E '^(PASS|FAIL|SKIP) ' | grep -E "${KEEP:-.}" ; local rc=${PIPESTATUS[0]}
    grep -E '^(PASS|FAIL|SKIP) ' "$out" | grep -E "${KEEP:-.}" >> "$log"
    if [ "$rc" -ne 0 ] && ! grep -qE '^FAIL ' "$out"; then
        echo "FAIL $name: exited with status $rc"; tail -n 20 "$out" | sed 's/^/    /'
        crashed=$((crashed + 1))
    fi
    echo "   ($name: $((SECONDS - t0)) s)"
    rm -f "$out"
}

run_binary() {  # run_binary NAME BIN [PATTERNS...]: with a filter, only its matching tests, if it has any
    local name="$1"
    if [ -z "$filter" ] || [[ "$name" == *"$filter"* ]]; then report "$@"; return; fi
    shift
    local names; names=$(PGOLF_TEST_FILTER="$filter" "$1" --list "${@:2}" 2>/dev/null)
    [ -n "$names" ] && PGOLF_TEST_FILTER="$filter" report "$name" "$@"
}

run_script() {  # run_script SCRIPT: with a filter, when its name or its text contains it
    [ -z "$filter" ] || [[ "$1" == *"$filter"* ]] || grep -qF -- "$filter" "$1" || return 0
    local keep=.
    [ -n "$filter" ] && [[ "$1" != *"$filter"* ]] && keep="^FAIL |^(PASS|SKIP) [^ :]*$(printf '%s' "$filter" | sed 's/[^A-Za-z0-9_]/\\&/g')"
    KEEP="$keep" report "$1" bash "$1"
}

for bin in tests/test_tokenizer tests/test_emu_libs; do
    [ "$cpu_only" = 1 ] && [ "$bin" = tests/test_emu_libs ] && continue
    [ -x "$bin" ] && run_binary "$bin" "$bin"
done
# The test program's shapes are tiny: on one OpenMP thread it runs in a third of the time, as waking a
# second thread for each small loop costs more than the loop (eval_lora_gradcheck_every_target: 106 s on
# two threads, 3.4 s on one). An OMP_NUM_THREADS given by the caller is kept.
threads_given=${OMP_NUM_THREADS-}
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "$cpu_only" = 1 ]; then
    [ -x tests/test_main_cpu ] || { echo "FAIL tests/test_main_cpu is not built (make tests/test_main_cpu)"; exit 1; }
    export TEST_BIN=tests/test_main_cpu  # the scripts that run the test binary (test_eval_mpi.sh)
    run_binary tests/test_main_cpu tests/test_main_cpu
    if [ -n "$threads_given" ]; then export OMP_NUM_THREADS="$threads_given"; else unset OMP_NUM_THREADS; fi
else
    # The CUDA tests: natively where a GPU is, and always through the emulator (tests/emu) when it is built;
    # without a GPU the native binary leaves them to the emulator (all but the no-GPU failure test).
    has_gpu=0
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU' && has_gpu=1
    if [ -x tests/test_main ]; then
        if [ "$has_gpu" = 1 ] || [ ! -x tests/test_main_emu ]; then run_binary tests/test_main tests/test_main
        else run_binary tests/test_main tests/test_main -cuda_ cuda_host_without_gpu; fi
    fi
    if [ -n "$threads_given" ]; then export OMP_NUM_THREADS="$threads_given"; else unset OMP_NUM_THREADS; fi
    [ -x tests/test_main_emu ] && run_binary "tests/test_main_emu (CUDA emulator)" tests/test_main_emu cuda_ \
        -cuda_host_without_gpu emu_
fi
for script in tests/test_*.sh; do
    [ "$cpu_only" = 1 ] && [[ "$script" == *cuda* || "$script" == *emu* || "$script" == *gpu* ]] && continue
    [ -f "$script" ] && run_script "$script"
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
