#!/usr/bin/env bash
# A run's life on the CPU binary: resume with 2 ranks equals the straight 2-rank run bit for bit
# (every rank's Muon momentum is in the checkpoint); SIGTERM finishes the step, writes a checkpoint
# and exits 143, a second signal exits at once; after a divergence, the checkpoint named resumes
# with a finite loss.
set -u
cd "$(dirname "$0")/.."
bin=./train_gpt_cpu
[ -x "$bin" ] || { echo "FAIL train_lifecycle: $bin not built (make train_gpt_cpu)"; exit 1; }
if [ -z "$(ls data/datasets/debian_prose_sp1024/fineweb_train_*.bin 2>/dev/null)" ]; then
    echo "FAIL train_lifecycle: corpus missing (scripts/make_corpus)"; exit 1
fi
root=(); [ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
common=(CONFIG=tiny DEVICE=cpu DATA_PATH=data/datasets/debian_prose_sp1024 TRAIN_BATCH_TOKENS=4096 VAL_LOSS_EVERY=0
        TRAIN_LOG_EVERY=1 VAL_TOKENS_LIMIT=4096 EVAL_MODE=standard OMP_NUM_THREADS=1 ZSTD_LEVEL=3)
failed=0
# the weight tensors of a safetensors file (its metadata names the run's paths, so it differs)
tensors() { python3 -c '
import json, struct, sys
b = open(sys.argv[1], "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
h.pop("__metadata__", None); print(json.dumps(h, sort_keys=True)); sys.stdout.flush()
sys.stdout.buffer.write(b[8 + n:])' "$1" | sha256sum; }

# --- resume with 2 ranks ---
if command -v mpirun >/dev/null 2>&1; then
    run2() { mpirun -np 2 --oversubscribe "${root[@]}" env "${common[@]}" ITERATIONS=6 WARMDOWN_ITERS=4 "$@" "$bin"; }
    if run2 OUT_DIR="$tmp/straight" CHECKPOINT_EVERY=3 CHECKPOINT_KEEP=0 > "$tmp/straight.log" 2>&1 &&
       run2 OUT_DIR="$tmp/resumed" RESUME="$tmp/straight/checkpoint_000003.safetensors" > "$tmp/resumed.log" 2>&1; then
        a=$(tensors "$tmp/straight/final_model.safetensors"); b=$(tensors "$tmp/resumed/final_model.safetensors")
        la=$(grep -o 'step:[456]/6 train_loss:[0-9.]*' "$tmp/straight.log"); lb=$(grep -o 'step:[456]/6 train_loss:[0-9.]*' "$tmp/resumed.log")
        if [ "$a" = "$b" ] && [ -n "$la" ] && [ "$la" = "$lb" ]; then echo "PASS resume_two_ranks_is_bit_identical"
        else echo "FAIL resume_two_ranks_is_bit_identical: final weights or losses of steps 4-6 differ: '$la' vs '$lb'"; failed=1; fi
    else
        echo "FAIL resume_two_ranks_is_bit_identical: a run failed"; tail -3 "$tmp/straight.log" "$tmp/resumed.log"; failed=1
    fi
else
    echo "SKIP resume_two_ranks_is_bit_identical: no mpirun (install openmpi-bin)"
fi

# --- SIGTERM: the step finishes, a checkpoint is written, exit 128 + 15 ---
wait_for() {  # wait_for FILE PATTERN: up to 60 s
    for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1
}
env "${common[@]}" ITERATIONS=100000 OUT_DIR="$tmp/term" "$bin" > "$tmp/term.log" 2>&1 &
pid=$!
wait_for "$tmp/term.log" "^step:2/" && kill -TERM "$pid"
( sleep 60; kill -KILL "$pid" 2>/dev/null ) >/dev/null 2>&1 & watchdog=$!
wait "$pid"; rc=$?
kill "$watchdog" 2>/dev/null
ck=$(grep -o 'continue with RESUME=.*' "$tmp/term.log" | cut -d= -f2)
if [ "$rc" -eq 143 ] && [ -n "$ck" ] && [ -f "$ck" ]; then
    echo "PASS sigterm_writes_a_checkpoint_and_exits_143 ($(basename "$ck"))"
else echo "FAIL sigterm_writes_a_checkpoint_and_exits_143: exit $rc, checkpoint '$ck'"; tail -3 "$tmp/term.log"; failed=1; fi

# --- a second signal exits at once, mid-step (a step of 64k tokens takes seconds here) ---
set -m  # the job gets its own process group and keeps SIGINT (a script's background jobs ignore it)
env "${common[@]}" ITERATIONS=100000 TRAIN_BATCH_TOKENS=65536 OUT_DIR="$tmp/int" "$bin" > "$tmp/int.log" 2>&1 &
set +m
pid=$!
wait_for "$tmp/int.log" "^step:1/" && { kill -INT "$pid"; sleep 0.3; kill -INT "$pid"; }
( sleep 30; kill -KILL "$pid" 2>/dev/null ) >/dev/null 2>&1 & watchdog=$!
wait "$pid"; rc=$?
kill "$watchdog" 2>/dev/null
if [ "$rc" -eq 130 ] && grep -q "second signal: exiting at once" "$tmp/int.log" && ! ls "$tmp/int"/checkpoint_* >/dev/null 2>&1; then
    echo "PASS second_signal_exits_at_once"
else echo "FAIL second_signal_exits_at_once: exit $rc"; tail -3 "$tmp/int.log"; failed=1; fi

# --- divergence: the checkpoint named resumes with a finite loss ---
# MATRIX_LR=1e10 gives finite weights after steps 1-3 and a NaN loss at step 4: the weights after
# step 3 are the ones that diverge, so checkpoint 3 must not be named.
nan=(ITERATIONS=12 WARMDOWN_ITERS=0 TRAIN_BATCH_TOKENS=2048 MATRIX_LR=1e10)
env "${common[@]}" "${nan[@]}" CHECKPOINT_EVERY=1 CHECKPOINT_KEEP=2 OUT_DIR="$tmp/nan" "$bin" > "$tmp/nan.log" 2>&1
msg=$(grep -o 'train_loss is .*' "$tmp/nan.log")
bad=$(echo "$msg" | grep -o 'at step [0-9]*' | grep -o '[0-9]*')
good=$(echo "$msg" | grep -o 'last good checkpoint: [^;)]*' | cut -d' ' -f4)
if [ -n "$good" ] && [ -f "$good" ] && [ -n "$bad" ]; then
    gstep=$((10#$(basename "$good" | grep -o '[0-9]\{6\}')))
    env "${common[@]}" "${nan[@]}" ITERATIONS=$((gstep + 1)) RESUME="$good" OUT_DIR="$tmp/nan2" "$bin" > "$tmp/nan2.log" 2>&1
    if [ "$gstep" -lt $((bad - 1)) ] && grep -q "^step:$((gstep + 1))/$((gstep + 1)) train_loss:[0-9]" "$tmp/nan2.log"; then
        echo "PASS divergence_names_a_checkpoint_that_resumes (loss NaN at step $bad, checkpoint of step $gstep)"
    else echo "FAIL divergence_names_a_checkpoint_that_resumes: named step $gstep for a NaN at step $bad"; tail -2 "$tmp/nan2.log"; failed=1; fi
else echo "FAIL divergence_names_a_checkpoint_that_resumes: '$msg'"; failed=1; fi

# --- a mistyped setting is named with the closest real one ---
if env "${common[@]}" ITERATIONS=1 ITERATION=2 EVAL_MODE=slidng OUT_DIR="$tmp/typo" "$bin" > "$tmp/typo.log" 2>&1; then
    echo "FAIL typos_are_caught_before_training: exit 0"; failed=1
elif grep -q "ITERATION is not a pgolf setting and is ignored (did you mean ITERATIONS?)" "$tmp/typo.log" &&
     grep -q 'EVAL_MODE: unknown mode "slidng"' "$tmp/typo.log" && ! grep -q "^step:" "$tmp/typo.log"; then
    echo "PASS typos_are_caught_before_training"
else echo "FAIL typos_are_caught_before_training"; tail -3 "$tmp/typo.log"; failed=1; fi
exit $failed
