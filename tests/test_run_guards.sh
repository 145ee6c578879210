#!/usr/bin/env bash
# What protects a run from bad data, a busy folder, a full disk and a shared CPU, as a user meets it:
#   shards:   ./tokenize shard refuses a non-empty folder and records its tokenizer (manifest.txt);
#             train_gpt refuses a tokenizer the manifest does not name, warns on implausible ids
#             without one, and checks every train shard before the first step (empty, out of vocabulary)
#   runs:     one run per OUT_DIR (a lock); a full disk leaves no .tmp and keeps the trained weights;
#             fatal errors land in log.txt; the host-memory error names the settings to lower
#   outputs:  the artifact depends on the weights and model settings only (not the run's name, paths or
#             evaluation); the summary counts each evaluation pass once; scripts/plot skips runs without
#             curves and shows every point; OpenMP waits passively unless the user says otherwise
set -u
cd "$(dirname "$0")/.." || exit 1
root=$(pwd)
bin=./train_gpt_cpu
[ -x "$bin" ] && [ -x ./tokenize ] || { echo "FAIL run_guards: $bin or ./tokenize not built (make train_gpt_cpu tokenize)"; exit 1; }
corpus=data/datasets/debian_prose_sp1024
text=data/corpus/debian_prose.txt
m1024=data/tokenizers/fineweb_1024_bpe.model
m8192=data/tokenizers/fineweb_8192_bpe.model
tmp=$(mktemp -d); bg=""
trap '[ -n "$bg" ] && kill "$bg" 2>/dev/null; rm -rf "$tmp"' EXIT
failed=0
pass() { echo "PASS run_guards_$1"; }
fail() { echo "FAIL run_guards_$1: $2"; failed=1; }
last() { tail -n 1 "$1" | cut -c1-300; }
# a tiny CPU run: 3 steps, small validation, fast zstd; deterministic on one thread
common=(CONFIG=tiny DEVICE=cpu ITERATIONS=3 VAL_LOSS_EVERY=0 VAL_TOKENS_LIMIT=8192 ZSTD_LEVEL=3 EVAL_MODE=standard
        OMP_NUM_THREADS=1)
shard() {  # shard NAME VALUES...: a challenge-format shard holding these tokens
    python3 -c 'import sys; sys.path.insert(0, "scripts"); import lib_data; lib_data.write_shard(sys.argv[1], [int(x) for x in sys.argv[2:]])' "$@"
}

# --- shards and their tokenizer -----------------------------------------------------------------
if [ ! -f "$text" ] || [ ! -f "$corpus/fineweb_val_000000.bin" ]; then
    echo "SKIP run_guards_data: the embedded corpus is not built (make corpus)"
else
    head -c 1500000 "$text" > "$tmp/docs.txt"
    d=$tmp/d1024
    if ./tokenize shard "$m1024" "$d" --format text --val-tokens 90000 "$tmp/docs.txt" > "$tmp/shard.log" 2>&1; then
        want=$(./tokenize info "$m1024" | sed -n 's/^checksum: \([0-9a-f]*\) .*/\1/p')
        if grep -qx "tokenizer_checksum=$want" "$d/manifest.txt" && grep -qx "tokenizer=fineweb_1024_bpe.model" "$d/manifest.txt"
        then pass shard_writes_manifest; else fail shard_writes_manifest "$(tr '\n' ' ' < "$d/manifest.txt")"; fi
        before=$(ls -l --time-style=+%s.%N "$d" | sha256sum)
        if ./tokenize shard "$m1024" "$d" --format text --val-tokens 1000 "$tmp/docs.txt" > /dev/null 2> "$tmp/err"; then
            fail shard_refuses_nonempty_folder "exit 0"
        elif grep -q "$d: output folder is not empty .*old shards would be read together with the new ones" "$tmp/err" \
             && [ "$before" = "$(ls -l --time-style=+%s.%N "$d" | sha256sum)" ]; then
            pass shard_refuses_nonempty_folder
        else fail shard_refuses_nonempty_folder "$(last "$tmp/err"), or the folder changed"; fi

        # the 8192 model on shards made with the 1024 one: refused by the manifest, warned about without it
        env "${common[@]}" DATA_PATH="$d" TOKENIZER_PATH="$m8192" VOCAB_SIZE=8192 OUT_DIR="$tmp/mismatch" \
            "$bin" > "$tmp/mismatch.out" 2> "$tmp/mismatch.err"
        rc=$?
        if [ "$rc" = 1 ] && grep -q "manifest.txt: the shards were made with the tokenizer fineweb_1024_bpe.model (1024 pieces, checksum $want), but TOKENIZER_PATH=$m8192 (8192 pieces) has checksum" "$tmp/mismatch.err"
        then pass tokenizer_mismatch_refused; else fail tokenizer_mismatch_refused "status $rc: $(last "$tmp/mismatch.err")"; fi
        if grep -q "^error: .*the shards were made with the tokenizer" "$tmp/mismatch/log.txt" 2>/dev/null
        then pass fatal_error_in_log; else fail fatal_error_in_log "log.txt has no error line"; fi
        cp -r "$d" "$tmp/nomanifest" && rm "$tmp/nomanifest/manifest.txt"
        # (a batch no host holds: the run stops at the memory check, after the data checks)
        env "${common[@]}" DATA_PATH="$tmp/nomanifest" TOKENIZER_PATH="$m8192" VOCAB_SIZE=8192 VAL_TOKENS_LIMIT=0 \
            TRAIN_BATCH_TOKENS=$((1 << 34)) OUT_DIR="$tmp/nomanifest_run" "$bin" > /dev/null 2> "$tmp/nm.err"
        if grep -q "^warning: DATA_PATH=$tmp/nomanifest has no manifest.txt, and its [0-9]* validation tokens use only ids 0..10[0-9][0-9] .* of the 8192 of TOKENIZER_PATH" "$tmp/nm.err"
        then pass tokenizer_stats_warning; else fail tokenizer_stats_warning "$(head -c 300 "$tmp/nm.err")"; fi
        if grep -q "^error: DEVICE=cpu: this run needs [0-9]* MiB of host memory, .* for [0-9]* tokens .*set by TRAIN_BATCH_TOKENS.*MODEL_DIM=128.*: lower TRAIN_BATCH_TOKENS" "$tmp/nm.err"
        then pass host_memory_error_names_settings; else fail host_memory_error_names_settings "$(last "$tmp/nm.err")"; fi
    else
        fail shard_writes_manifest "tokenize shard failed: $(last "$tmp/shard.log")"
    fi

    # an empty train shard: refused at start (it used to spin forever)
    mkdir -p "$tmp/empty" && ln -s "$root/$corpus/fineweb_val_000000.bin" "$tmp/empty/fineweb_val_000000.bin"
    shard "$tmp/empty/fineweb_train_000000.bin"
    timeout 120 env "${common[@]}" DATA_PATH="$tmp/empty" OUT_DIR="$tmp/empty_run" "$bin" > /dev/null 2> "$tmp/err"
    rc=$?
    if [ "$rc" = 1 ] && grep -q "fineweb_train_000000.bin: a shard with 0 tokens" "$tmp/err"; then pass empty_shard_refused
    else fail empty_shard_refused "status $rc (124: hung): $(last "$tmp/err")"; fi

    # a token outside the vocabulary in the second train shard: found before the first step
    mkdir -p "$tmp/oov" && ln -s "$root/$corpus/fineweb_val_000000.bin" "$tmp/oov/fineweb_val_000000.bin"
    ln -s "$root/$corpus/fineweb_train_000000.bin" "$tmp/oov/fineweb_train_000000.bin"
    shard "$tmp/oov/fineweb_train_000001.bin" 1 5 6 7 2000 8
    timeout 300 env "${common[@]}" ITERATIONS=1 DATA_PATH="$tmp/oov" OUT_DIR="$tmp/oov_run" "$bin" > "$tmp/out" 2> "$tmp/err"
    rc=$?
    if [ "$rc" = 1 ] && grep -q "fineweb_train_000001.bin: token 2000 at position 4 is outside the vocabulary (VOCAB_SIZE=1024)" "$tmp/err" \
       && ! grep -q "^step:" "$tmp/out"; then pass oov_shard_refused_at_start
    else fail oov_shard_refused_at_start "status $rc: $(last "$tmp/err")"; fi
    # and a good folder says how its shards were checked
    if env "${common[@]}" ITERATIONS=0 DATA_PATH="$corpus" OUT_DIR="$tmp/zero" "$bin" > "$tmp/out" 2>&1 \
       && grep -q "^train_shards: 2 files, [0-9]* tokens: headers checked; token ids checked in full" "$tmp/out"
    then pass shard_check_logged; else fail shard_check_logged "$(grep -m1 train_shards "$tmp/out")"; fi
fi

# --- one run per folder -------------------------------------------------------------------------
if [ -f "$corpus/fineweb_val_000000.bin" ]; then
    env "${common[@]}" ITERATIONS=100000 DATA_PATH="$corpus" OUT_DIR="$tmp/lock" "$bin" > "$tmp/first.out" 2>&1 &
    bg=$!
    for _ in $(seq 1 240); do grep -q "^step:1/" "$tmp/lock/log.txt" 2>/dev/null && break; sleep 0.5; done
    env "${common[@]}" DATA_PATH="$corpus" OUT_DIR="$tmp/lock" "$bin" > /dev/null 2> "$tmp/second.err"
    rc=$?
    if [ "$rc" = 1 ] && grep -q "^error: OUT_DIR=$tmp/lock is in use by another run (process $bg holds $tmp/lock/.lock)" "$tmp/second.err" \
       && kill -0 "$bg" 2>/dev/null && [ "$(grep -c '^pgolf train_gpt' "$tmp/lock/log.txt")" = 1 ]; then
        pass second_run_refused
    else fail second_run_refused "status $rc: $(last "$tmp/second.err")"; fi
    kill "$bg" 2>/dev/null; wait "$bg" 2>/dev/null; bg=""
    # the lock dies with its process: the folder is free again
    if env "${common[@]}" ITERATIONS=0 DATA_PATH="$corpus" OUT_DIR="$tmp/lock" "$bin" > /dev/null 2>&1
    then pass lock_released; else fail lock_released "a run after the first one ended was refused"; fi
fi

# --- a full disk --------------------------------------------------------------------------------
if [ -f "$corpus/fineweb_val_000000.bin" ]; then
    # files over 2000 KiB fail with EFBIG (SIGXFSZ ignored): the 3.4 MB full-precision weights cannot
    # be written anywhere, the 0.8 MB artifact can; the run finishes, scored, with no .tmp left behind
    mkdir -p "$tmp/fulltmp"
    (trap '' XFSZ; ulimit -f 2000; env "${common[@]}" DATA_PATH="$corpus" OUT_DIR="$tmp/full" TMPDIR="$tmp/fulltmp" RUN_ID=full \
        "$bin" > "$tmp/full.out" 2> "$tmp/full.err")
    rc=$?
    if [ "$rc" = 0 ] && [ -z "$(find "$tmp/full" "$tmp/fulltmp" -name '*.tmp')" ] && [ -f "$tmp/full/result.json" ] \
       && grep -q "^warning: full-precision weights not written: cannot write $tmp/full/final_model.safetensors.tmp: File too large" "$tmp/full.err" \
       && [ ! -e /dev/shm/pgolf_full_final_model.safetensors ]; then
        pass disk_full_no_tmp_left
    else fail disk_full_no_tmp_left "status $rc, .tmp: $(find "$tmp/full" -name '*.tmp' | head -1), $(last "$tmp/full.err")"; fi
    # the artifact cannot be written: the run says where the trained weights are
    mkdir -p "$tmp/noart/final_model.pgz.tmp/blocked"
    env "${common[@]}" DATA_PATH="$corpus" OUT_DIR="$tmp/noart" "$bin" > /dev/null 2> "$tmp/noart.err"
    rc=$?
    if [ "$rc" = 1 ] && grep -q "^error: export: the artifact was not written (cannot open $tmp/noart/final_model.pgz.tmp (wb): Is a directory); the trained weights are kept in full precision in $tmp/noart/final_model.safetensors" "$tmp/noart.err" \
       && [ -s "$tmp/noart/final_model.safetensors" ]; then pass artifact_unwritable_keeps_weights
    else fail artifact_unwritable_keeps_weights "status $rc: $(last "$tmp/noart.err")"; fi
fi

# --- the artifact is a function of the weights and the model settings ------------------------------
if [ -f "$corpus/fineweb_val_000000.bin" ]; then
    ln -s "$root/$corpus" "$tmp/alias" && cp "$m1024" "$tmp/tok.model"
    env "${common[@]}" DATA_PATH="$corpus" RUN_ID=first OUT_DIR="$tmp/a" EVAL_MODE=lora_ttt TTT_N_EPOCHS=2 \
        TTT_REPORT_FINAL_EPOCH=1 VAL_TOKENS_LIMIT=4096 "$bin" > "$tmp/a.out" 2>&1 || fail identical_artifacts "run a: $(last "$tmp/a.out")"
    mkdir -p "$tmp/elsewhere"
    (cd "$tmp/elsewhere" && env "${common[@]}" DATA_PATH="$tmp/alias" TOKENIZER_PATH="$tmp/tok.model" RUN_ID=second \
        EVAL_STRIDE=32 "$root/$bin" > "$tmp/b.out" 2>&1) || fail identical_artifacts "run b: $(last "$tmp/b.out")"
    if cmp -s "$tmp/a/final_model.pgz" "$tmp/elsewhere/runs/second/final_model.pgz"; then pass identical_artifacts
    else fail identical_artifacts "same seed and model, other RUN_ID/OUT_DIR/DATA_PATH/TOKENIZER_PATH/evaluation: artifacts differ"; fi
    # one LoRA TTT pass yields two scores (first exposure, final epoch): its time counts once
    ms=$(sed -n 's/^final_lora_ttt val_loss:.* eval_time:\([0-9]*\)ms.*/\1/p' "$tmp/a.out")
    total=$(sed -n 's/^eval  *\([0-9.]*\) s (all modes)/\1/p' "$tmp/a.out")
    if [ -n "$ms" ] && [ -n "$total" ] && grep -q "^final_lora_ttt_final_epoch " "$tmp/a.out" \
       && python3 -c "import sys; sys.exit(abs($total - $ms / 1000) > 0.051)"; then pass summary_counts_a_pass_once
    else fail summary_counts_a_pass_once "lora_ttt ${ms:-?} ms, summary eval ${total:-?} s"; fi
fi

# --- OpenMP waits passively unless the user chose otherwise ----------------------------------------
# libgomp prints its settings at start-up (OMP_DISPLAY_ENV); the last print is the process that runs
spin() { env "$@" OMP_DISPLAY_ENV=verbose "$bin" settings 2>&1 >/dev/null | sed -n "s/^ *GOMP_SPINCOUNT = '\(.*\)'/\1/p" | tail -n 1; }
a=$(spin -u OMP_WAIT_POLICY); b=$(spin OMP_WAIT_POLICY=active)
if [ "$a" = 0 ] && [ -n "$b" ] && [ "$b" != 0 ]; then pass omp_passive_by_default
else fail omp_passive_by_default "GOMP_SPINCOUNT '$a' by default (want 0), '$b' with OMP_WAIT_POLICY=active"; fi

# --- scripts/plot -----------------------------------------------------------------------------------
mkdir -p "$tmp/plots/r1" "$tmp/plots/r2" "$tmp/plots/failed" "$tmp/plots/evalonly"
for r in 1 2; do
    python3 - "$tmp/plots/r$r/log.txt" "$r" <<'EOF'
import math, sys
with open(sys.argv[1], "w") as f:
    for s in range(1, 201):
        loss = 2 + 5 * math.exp(-s / 10) + 0.01 * int(sys.argv[2])
        f.write(f"step:{s}/200 train_loss:{loss:.4f} train_time:{s * 100}ms step_avg:100.00ms\n")
        if s % 50 == 0 or s == 1:
            f.write(f"step:{s}/200 val_loss:{loss:.4f} val_bpb:{loss / 2:.4f} train_time:{s * 100}ms step_avg:100.00ms\n")
    f.write("final_sliding val_loss:2.0 val_bpb:1.0100 eval_time:5ms\n")
EOF
done
printf 'pgolf train_gpt: code_bytes:1\nerror: no train shards match x\n' > "$tmp/plots/failed/log.txt"
printf 'pgolf train_gpt: code_bytes:1\nfinal_standard val_loss:1.0 val_bpb:1.0 eval_time:3ms\n' > "$tmp/plots/evalonly/log.txt"
if command -v gnuplot > /dev/null; then
    if scripts/plot "$tmp"/plots/*/log.txt -o "$tmp/plots/all.png" > /dev/null 2> "$tmp/plot.err" \
       && [ "$(head -c 4 "$tmp/plots/all.png" | tail -c 3)" = PNG ] \
       && grep -q "skipping $tmp/plots/failed/log.txt: no step lines (failed or stopped before its first step)" "$tmp/plot.err" \
       && grep -q "skipping $tmp/plots/evalonly/log.txt: no step lines (evaluation only)" "$tmp/plot.err"
    then pass plot_skips_runs_without_curves; else fail plot_skips_runs_without_curves "$(last "$tmp/plot.err")"; fi
else echo "SKIP run_guards_plot_skips_runs_without_curves: no gnuplot"; fi
# the script plot gives gnuplot (a wrapper keeps it): every point inside the y ranges, the first
# steps too, and the keys beside the panels, not over them
if command -v gnuplot > /dev/null; then
    mkdir -p "$tmp/gpbin"
    printf '#!/bin/sh\n[ "$#" -gt 0 ] && exec %s "$@"\ntee "%s" | %s\n' "$(command -v gnuplot)" "$tmp/plot.gp" "$(command -v gnuplot)" \
        > "$tmp/gpbin/gnuplot"
    chmod +x "$tmp/gpbin/gnuplot"
    PATH="$tmp/gpbin:$PATH" scripts/plot "$tmp/plots/r1" "$tmp/plots/r2" -o "$tmp/plots/two.png" > /dev/null 2>&1
    if python3 - "$tmp/plot.gp" "$tmp/plots/r1/log.txt" "$tmp/plots/r2/log.txt" <<'EOF'; then
import re, sys
script = open(sys.argv[1]).read().splitlines()
train, val = [], []
for log in sys.argv[2:]:
    for line in open(log):
        m = re.match(r"step:\d+/\d+ (train_loss|val_loss:\S+ val_bpb):(\S+)", line)
        if m:
            (train if m.group(1) == "train_loss" else val).append(float(m.group(2)))
        m = re.match(r"final_\w+ val_loss:\S+ val_bpb:(\S+)", line)
        if m:
            val.append(float(m.group(1)))
ranges = [m.groups() for m in (re.match(r"set yrange \[(\S*):(\S*)\]", l) for l in script) if m]
bad = []
for (lo, hi), v in zip(ranges, (train, val, train, val)):
    lo = float("-inf") if lo in ("", "*") else float(lo)
    hi = float("inf") if hi in ("", "*") else float(hi)
    if not (lo <= min(v) and max(v) <= hi):
        bad.append(f"y range [{lo:.3f}, {hi:.3f}] leaves out points in [{min(v):.3f}, {max(v):.3f}]")
layout = next((l for l in script if l.startswith("set multiplot")), "")
m = re.search(r"margins [0-9.]+,([0-9.]+),", layout)
for l in script:
    if l.startswith("set key"):
        k = re.match(r"set key at screen ([0-9.]+)", l)
        if not (k and m and float(k.group(1)) >= float(m.group(1))):
            bad.append(f"a key inside the panels: {l!r}")
if bad or len(ranges) != 4:
    print("; ".join(bad) or f"{len(ranges)} y ranges")
    sys.exit(1)
EOF
        pass plot_shows_every_point_keys_outside
    else fail plot_shows_every_point_keys_outside "(above)"; fi
fi

exit $failed
