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

for bin in tests/test_tokenizer tests/test_emu_libs tests/test_main; do
    [ -x "$bin" ] && run "$bin" "$bin"
done
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
