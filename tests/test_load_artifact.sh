#!/usr/bin/env bash
# LOAD_ARTIFACT evaluates an existing artifact: the same score as the run that wrote it, written to
# this run's own OUT_DIR (never into the training run's), and model-shape settings may not change.
set -u
cd "$(dirname "$0")/.."
root=$(pwd)
bin=./train_gpt_cpu
[ -x "$bin" ] || { echo "FAIL load_artifact: $bin not built (make train_gpt_cpu)"; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
common=(CONFIG=tiny DEVICE=cpu DATA_PATH=data/datasets/debian_prose_sp1024 VAL_TOKENS_LIMIT=8192 EVAL_MODE=standard OMP_NUM_THREADS=1)
env "${common[@]}" ITERATIONS=3 VAL_LOSS_EVERY=0 ZSTD_LEVEL=3 OUT_DIR="$tmp/train" "$bin" > "$tmp/train.log" 2>&1 \
    || { echo "FAIL load_artifact: training run failed"; tail -3 "$tmp/train.log"; exit 1; }
before=$(sha256sum "$tmp/train/result.json" "$tmp/train/log.txt")
mkdir -p "$tmp/here"
(cd "$tmp/here" && env "${common[@]}" DATA_PATH="$root/data/datasets/debian_prose_sp1024" \
    TOKENIZER_PATH="$root/data/tokenizers/fineweb_1024_bpe.model" RUN_ID=eval LOAD_ARTIFACT="$tmp/train/final_model.pgz" \
    "$root/$bin" > "$tmp/eval.log" 2>&1) || { echo "FAIL load_artifact: evaluation failed"; tail -3 "$tmp/eval.log"; exit 1; }
failed=0
a=$(grep -o 'final_standard_exact.*' "$tmp/train.log"); b=$(grep -o 'final_standard_exact.*' "$tmp/eval.log")
if [ -n "$a" ] && [ "$a" = "$b" ]; then echo "PASS load_artifact_scores_like_the_run"; else echo "FAIL load_artifact_scores_like_the_run: '$a' vs '$b'"; failed=1; fi
if [ -f "$tmp/here/runs/eval/result.json" ] && [ "$before" = "$(sha256sum "$tmp/train/result.json" "$tmp/train/log.txt")" ]; then
    echo "PASS load_artifact_writes_its_own_out_dir"
else echo "FAIL load_artifact_writes_its_own_out_dir: outputs not in runs/eval, or the training run's files changed"; failed=1; fi
if env "${common[@]}" MODEL_DIM=64 LOAD_ARTIFACT="$tmp/train/final_model.pgz" OUT_DIR="$tmp/bad" "$bin" > "$tmp/bad.log" 2>&1; then
    echo "FAIL load_artifact_rejects_other_shapes: exit 0"; failed=1
elif grep -q "LOAD_ARTIFACT: MODEL_DIM=64 contradicts the artifact's MODEL_DIM=128" "$tmp/bad.log"; then echo "PASS load_artifact_rejects_other_shapes"
else echo "FAIL load_artifact_rejects_other_shapes: $(tail -1 "$tmp/bad.log")"; failed=1; fi
exit $failed
