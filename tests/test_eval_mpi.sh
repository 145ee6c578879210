#!/usr/bin/env bash
# Evaluation on 2 MPI ranks equals 1 rank, every mode: runs the test binary's
# eval_mpi_two_ranks_match_one_rank under `mpirun -np 2` (each rank also computes the 1-rank
# result, so one run compares both). Prints one PASS/FAIL/SKIP line.
# TEST_BIN overrides the binary (default tests/test_main, built with MPI by the Makefile).
set -u
cd "$(dirname "$0")/.."
name=eval_mpi_two_ranks_match_one_rank
bin=${TEST_BIN:-tests/test_main}
if ! command -v mpirun >/dev/null 2>&1; then echo "SKIP $name: no mpirun"; exit 0; fi
if [ ! -x "$bin" ]; then echo "FAIL $name: $bin is not built (make tests/test_main)"; exit 1; fi
flags=(-np 2 --oversubscribe)
[ "$(id -u)" = 0 ] && flags+=(--allow-run-as-root)
out=$(OMP_NUM_THREADS=1 timeout 300 mpirun "${flags[@]}" "$bin" "$name" 2>&1); rc=$?
# both ranks print the test's line
fails=$(grep -E "^FAIL $name" <<<"$out" | head -n 1)
passes=$(grep -cE "^PASS $name" <<<"$out")
skip=$(grep -E "^SKIP $name" <<<"$out" | head -n 1)
if [ -n "$fails" ]; then echo "$fails"; exit 1; fi
if [ "$passes" -eq 2 ] && [ "$rc" -eq 0 ]; then echo "PASS $name (2 ranks)"; exit 0; fi
if [ -n "$skip" ] && [ "$rc" -eq 0 ]; then echo "$skip"; exit 0; fi
echo "FAIL $name: mpirun exited with status $rc, $passes of 2 ranks passed"
tail -n 15 <<<"$out" | sed 's/^/    /'
exit 1
