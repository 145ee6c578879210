#!/usr/bin/env bash
# Resume on the CUDA path, through the emulator (./train_gpt_emu, DEVICE=cuda), 1 and 2 ranks:
#   emu_resume_one_rank_is_bit_identical    stop at a checkpoint, RESUME from it: the losses of the
#                                           remaining steps and the final weights equal the straight run's;
#   emu_resume_two_ranks_is_bit_identical   the same under mpirun -np 2 (NCCL over MPI; each rank's Muon
#                                           momentum comes back from the checkpoint).
set -u
cd "$(dirname "$0")/.."
emu=./train_gpt_emu
if [ ! -x "$emu" ]; then echo "SKIP emu_resume: $emu not built (make train_gpt_emu needs the CUDA headers)"; exit 0; fi
if [ -z "$(ls data/datasets/debian_prose_sp1024/fineweb_train_*.bin 2>/dev/null)" ]; then
    echo "FAIL emu_resume: corpus missing (scripts/make_corpus)"; exit 1
fi
root=(); [ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
common=(CONFIG=tiny NUM_LAYERS=2 MODEL_DIM=64 DEVICE=cuda DATA_PATH=data/datasets/debian_prose_sp1024 ITERATIONS=4 WARMDOWN_ITERS=2
        TRAIN_BATCH_TOKENS=512 GRAD_ACCUM_STEPS=1 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=1 VAL_TOKENS_LIMIT=512
        EVAL_MODE=standard SWA_START_FRAC=0 ZSTD_LEVEL=3 OMP_NUM_THREADS=1)
failed=0
# the weight tensors of a safetensors file (its metadata names the run's paths, so it differs)
tensors() { python3 -c '
import json, struct, sys
b = open(sys.argv[1], "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
h.pop("__metadata__", None); print(json.dumps(h, sort_keys=True)); sys.stdout.flush()
sys.stdout.buffer.write(b[8 + n:])' "$1" | sha256sum; }
# resume_case NAME LAUNCHER...: straight run with a checkpoint at step 2, then a run resumed from it
resume_case() {
    local name=$1; shift
    local t0=$SECONDS
    if ! "$@" env "${common[@]}" OUT_DIR="$tmp/$name/straight" CHECKPOINT_EVERY=2 CHECKPOINT_KEEP=0 "$emu" \
            > "$tmp/$name.straight.log" 2>&1; then
        echo "FAIL $name: the straight run failed"; tail -3 "$tmp/$name.straight.log"; failed=1; return
    fi
    local ck="$tmp/$name/straight/checkpoint_000002.safetensors"
    if [ ! -s "$ck" ]; then echo "FAIL $name: no checkpoint at step 2 ($ck)"; failed=1; return; fi
    if ! "$@" env "${common[@]}" OUT_DIR="$tmp/$name/resumed" RESUME="$ck" "$emu" > "$tmp/$name.resumed.log" 2>&1; then
        echo "FAIL $name: the resumed run failed"; tail -3 "$tmp/$name.resumed.log"; failed=1; return
    fi
    local la lb a b
    la=$(grep -o 'step:[34]/4 train_loss:[0-9.]*' "$tmp/$name.straight.log")
    lb=$(grep -o 'step:[34]/4 train_loss:[0-9.]*' "$tmp/$name.resumed.log")
    a=$(tensors "$tmp/$name/straight/final_model.safetensors"); b=$(tensors "$tmp/$name/resumed/final_model.safetensors")
    if [ "$(echo "$la" | wc -l)" -eq 2 ] && [ "$la" = "$lb" ] && [ "$a" = "$b" ] &&
       grep -q "CUDA emulator" "$tmp/$name.resumed.log"; then
        echo "PASS $name (steps 3-4: $(echo $la | tr '\n' ' '); $((SECONDS - t0))s)"
    else
        echo "FAIL $name: losses of steps 3-4 or final weights differ: '$la' vs '$lb'"; failed=1
    fi
}
resume_case emu_resume_one_rank_is_bit_identical
if command -v mpirun >/dev/null 2>&1; then
    resume_case emu_resume_two_ranks_is_bit_identical mpirun -np 2 --oversubscribe "${root[@]}"
else
    echo "SKIP emu_resume_two_ranks_is_bit_identical: no mpirun (install openmpi-bin)"
fi
exit $failed
