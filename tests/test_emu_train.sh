#!/usr/bin/env bash
# The whole program's CUDA path through the emulator (./train_gpt_emu, tests/emu), on a machine
# without a GPU:
#   emu_train_tiny_matches_cpu      CONFIG=tiny for a few steps: DEVICE=cuda's losses match DEVICE=cpu's
#                                   within bf16 tolerance, then it compresses and scores the artifact;
#   emu_train_frees_its_state       and frees its page-locked buffers and step graphs (the emulator's
#                                   PGOLF_EMU_LEAK_CHECK=1 names what was never freed);
#   emu_train_two_ranks_equal_one   mpirun -np 2 (NCCL over MPI: Parallel Muon's bank reduce-scatter and
#                                   bf16 all-gather, one all-reduce of the replicated gradients) gives one
#                                   rank's losses;
#   emu_train_two_ranks_same_weights  and its trained weights.
# Rank r reads span r of world·(local+1) tokens (as the reference), so the same tokens reach a step only at
# the same world·GRAD_ACCUM_STEPS: one rank accumulates 2 micro-batches, two ranks 1 each. (With 1 and 1, rank
# 1's sequence starts one token later; on 512 tokens Adam's first ±lr·sign(g) steps and Muon's orthogonalized
# updates turn that into weights 2x their size apart while the losses stay within 1e-3.)
set -u
cd "$(dirname "$0")/.."
emu=./train_gpt_emu cpu=./train_gpt_cpu
if [ ! -x "$emu" ]; then echo "SKIP emu_train: $emu not built (make train_gpt_emu needs the CUDA headers)"; exit 0; fi
if [ ! -x "$cpu" ]; then echo "FAIL emu_train: $cpu not built (make train_gpt_cpu)"; exit 1; fi
if [ -z "$(ls data/datasets/debian_prose_sp1024/fineweb_train_*.bin 2>/dev/null)" ]; then
    echo "FAIL emu_train: corpus missing (scripts/make_corpus)"; exit 1
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
common=(CONFIG=tiny DATA_PATH=data/datasets/debian_prose_sp1024 ITERATIONS=3 WARMDOWN_ITERS=1 TRAIN_BATCH_TOKENS=512
        VAL_LOSS_EVERY=3 TRAIN_LOG_EVERY=1 VAL_TOKENS_LIMIT=1024 EVAL_MODE=standard SWA_START_FRAC=0
        ZSTD_LEVEL=3 OMP_NUM_THREADS=1)
failed=0
env "${common[@]}" GRAD_ACCUM_STEPS=2 DEVICE=cpu OUT_DIR="$tmp/cpu" "$cpu" > "$tmp/cpu.log" 2>&1 || { echo "FAIL emu_train: DEVICE=cpu failed"; tail "$tmp/cpu.log"; exit 1; }
t0=$SECONDS
env "${common[@]}" GRAD_ACCUM_STEPS=2 PGOLF_EMU_LEAK_CHECK=1 DEVICE=cuda OUT_DIR="$tmp/emu" "$emu" > "$tmp/emu.log" 2>&1 || { echo "FAIL emu_train_tiny_matches_cpu: the emulated run failed"; tail "$tmp/emu.log"; exit 1; }
secs=$((SECONDS - t0))
compare() {  # compare NAME LOG_A LOG_B TOLERANCE
    python3 - "$@" <<'PY'
import re, sys
name, a, b, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
def run(path):
    text = open(path).read()
    return ([float(x) for x in re.findall(r"train_loss:([0-9.]+)", text)],
            [float(x) for x in re.findall(r"step:\d+/\d+ val_loss:[0-9.]+ val_bpb:([0-9.]+)", text)],
            [float(x) for x in re.findall(r"final_standard val_loss:[0-9.]+ val_bpb:([0-9.]+)", text)], text)
(ta, va, fa, _), (tb, vb, fb, text) = run(a), run(b)
ok = len(ta) == 3 and len(ta) == len(tb) and len(va) == len(vb) >= 2 and len(fa) == len(fb) == 1
worst = max([abs(x - y) / max(abs(x), 1e-9) for x, y in zip(ta + va + fa, tb + vb + fb)] or [1])
if ok and worst <= tol:
    print(f"PASS {name} (max relative difference {worst:.2e} over {len(ta)} train losses, {len(va)} evals and the artifact's score; tolerance {tol:g})")
else:
    print(f"FAIL {name}: {ta} {va} {fa} vs {tb} {vb} {fb} (worst {worst:.3g}, tolerance {tol:g})")
    sys.exit(1)
PY
}
# bf16 activations and weights on the CUDA path: the CPU's losses within 2%
compare emu_train_tiny_matches_cpu "$tmp/cpu.log" "$tmp/emu.log" 2e-2 || failed=1
grep -q "CUDA emulator" "$tmp/emu.log" || { echo "FAIL emu_train_tiny_matches_cpu: the run did not say it ran on the emulator"; failed=1; }
[ -s "$tmp/emu/final_model.pgz" ] || { echo "FAIL emu_train_tiny_matches_cpu: no artifact written in $tmp/emu"; failed=1; }
echo "    (the emulated run took ${secs}s: the emulator checks, it does not time)"
if grep -q "never freed" "$tmp/emu.log"; then
    echo "FAIL emu_train_frees_its_state: $(grep "never freed" "$tmp/emu.log")"; failed=1
else
    echo "PASS emu_train_frees_its_state"
fi
if command -v mpirun >/dev/null 2>&1; then
    root=(); [ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
    mpirun -np 2 --oversubscribe "${root[@]}" env "${common[@]}" GRAD_ACCUM_STEPS=1 DEVICE=cuda OUT_DIR="$tmp/two" "$emu" > "$tmp/two.log" 2>&1 \
        || { echo "FAIL emu_train_two_ranks_equal_one: mpirun -np 2 failed"; tail "$tmp/two.log"; exit 1; }
    compare emu_train_two_ranks_equal_one "$tmp/emu.log" "$tmp/two.log" 1e-4 || failed=1
    # the same sums in another order (the replicated gradients' all-reduce): tok_emb moves by ~2e-5
    python3 tests/compare_weights.py emu_train_two_ranks_same_weights "$tmp/emu/final_model.safetensors" \
        "$tmp/two/final_model.safetensors" 1e-3 || failed=1
else
    echo "SKIP emu_train_two_ranks_equal_one: no mpirun (install openmpi-bin)"
fi
exit $failed
