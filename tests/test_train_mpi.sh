#!/usr/bin/env bash
# Data parallel on the CPU: `mpirun -np 2` gives the same losses and trained weights as one process with
# the same global batch (to float tolerance; Parallel Muon with MuonEq-R and Polar Express: banks
# reduce-scattered, each rank orthogonalizing its shard, updates all-gathered), and a rank that fails
# ends every rank with a clear message.
set -u
cd "$(dirname "$0")/.."
bin=./train_gpt_cpu
if ! command -v mpirun >/dev/null 2>&1; then echo "SKIP mpi_two_ranks_equal_one: no mpirun (install openmpi-bin)"; exit 0; fi
if [ ! -x "$bin" ]; then echo "FAIL mpi_two_ranks_equal_one: $bin not built (make train_gpt_cpu)"; exit 1; fi
if [ -z "$(ls data/datasets/debian_prose_sp1024/fineweb_train_*.bin 2>/dev/null)" ]; then
    echo "FAIL mpi_two_ranks_equal_one: corpus missing (scripts/make_corpus)"; exit 1
fi
root=(); [ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
common=(CONFIG=tiny DEVICE=cpu DATA_PATH=data/datasets/debian_prose_sp1024 ITERATIONS=6 WARMDOWN_ITERS=3
        TRAIN_BATCH_TOKENS=4096 VAL_LOSS_EVERY=3 TRAIN_LOG_EVERY=1 VAL_TOKENS_LIMIT=8192 EVAL_MODE=standard
        OMP_NUM_THREADS=1 ZSTD_LEVEL=3 MUON_ROW_NORMALIZE=1 MUON_POLAR_EXPRESS=1 MIN_LR=0.1)
failed=0
env "${common[@]}" OUT_DIR="$tmp/one" "$bin" > "$tmp/one.log" 2>&1 || { echo "FAIL mpi_two_ranks_equal_one: single process failed"; tail "$tmp/one.log"; exit 1; }
mpirun -np 2 --oversubscribe "${root[@]}" env "${common[@]}" OUT_DIR="$tmp/two" "$bin" > "$tmp/two.log" 2>&1 \
    || { echo "FAIL mpi_two_ranks_equal_one: mpirun -np 2 failed"; tail "$tmp/two.log"; exit 1; }
python3 - "$tmp/one.log" "$tmp/two.log" <<'PY' || failed=1
import re, sys
def losses(path):
    text = open(path).read()
    return ([float(x) for x in re.findall(r"train_loss:([0-9.]+)", text)],
            [float(x) for x in re.findall(r"val_bpb:([0-9.]+)", text)])
(t1, v1), (t2, v2) = losses(sys.argv[1]), losses(sys.argv[2])
ok = len(t1) == 6 and len(t1) == len(t2) and len(v1) == len(v2) and len(v1) >= 3
worst = max([abs(a - b) / max(abs(a), 1e-9) for a, b in zip(t1 + v1, t2 + v2)] or [1])
if ok and worst < 2e-4:
    print(f"PASS mpi_two_ranks_equal_one (max relative difference {worst:.2e} over {len(t1)} train losses and {len(v1)} evals)")
else:
    print(f"FAIL mpi_two_ranks_equal_one: one rank {t1} {v1} vs two ranks {t2} {v2}")
    sys.exit(1)
PY
# weights within 3e-3 of each tensor's largest: the matrices agree to ~1e-4; Adam's m/√v amplifies the
# summation-order noise of the embedding rows whose gradients nearly cancel (~1e-3 after 6 steps)
python3 tests/compare_weights.py mpi_two_ranks_same_weights "$tmp/one/final_model.safetensors" \
    "$tmp/two/final_model.safetensors" 3e-3 || failed=1
# A rank that dies takes the job down with a message instead of hanging the others.
mpirun -np 2 --oversubscribe "${root[@]}" env "${common[@]}" OUT_DIR="$tmp/bad" DATA_PATH="$tmp/nowhere" \
    timeout 60 "$bin" > "$tmp/bad.log" 2>&1
rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && grep -q "shards match" "$tmp/bad.log"; then
    echo "PASS mpi_failing_rank_ends_the_job"
else
    echo "FAIL mpi_failing_rank_ends_the_job: exit $rc"; tail -5 "$tmp/bad.log"; failed=1
fi
exit $failed
