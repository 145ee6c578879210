#!/usr/bin/env bash
# `./train_gpt cost`: settings as arguments or environment, the same table either way; bad arguments
# get a one-line error naming the argument.
set -u
cd "$(dirname "$0")/.."
bin=./train_gpt_cpu
[ -x "$bin" ] || { echo "FAIL cost_cli: $bin not built (make cpu)"; exit 1; }
failed=0
a=$("$bin" cost CONFIG=pr467 GPUS=8 2>&1); b=$(CONFIG=pr467 "$bin" cost 2>&1)
if [ "$a" = "$b" ] && grep -q '^total ' <<< "$a" && grep -q '^projected: .* ms/step' <<< "$a" &&
   grep -q 'one GPU of 8: 98304 tokens per micro-batch (48×2048)' <<< "$a"; then echo "PASS cost_cli_arguments_or_environment"
else echo "FAIL cost_cli_arguments_or_environment: $(head -2 <<< "$a")"; failed=1; fi
one=$("$bin" cost CONFIG=pr467 GPUS=1 2>&1)
if grep -q 'one GPU of 1: 98304 tokens per micro-batch (48×2048), 8 micro-batches' <<< "$one" && grep -q '^communication  *0 ' <<< "$one"
then echo "PASS cost_cli_one_gpu_accumulates"; else echo "FAIL cost_cli_one_gpu_accumulates: $(head -1 <<< "$one")"; failed=1; fi
ops=$(/usr/bin/env "$bin" cost CONFIG=pr600 OPS=1 2>&1)
total=$(awk '$1 == "total" { print $2 }' <<< "$ops")
by_op=$(awk '/^  op  / { on = 1; next } on && NF { s += $(NF - 3) } END { print s }' <<< "$ops")
if [ -n "$total" ] && [ "$total" = "$by_op" ]; then echo "PASS cost_cli_ops_table_adds_up"
else echo "FAIL cost_cli_ops_table_adds_up: total $total launches, per-op rows $by_op"; failed=1; fi
check() {  # NAME EXPECTED ARGS...
    local name="$1" want="$2"; shift 2
    local out; out=$("$bin" cost "$@" 2>&1)
    if [ $? -ne 0 ] && [ "$(wc -l <<< "$out")" -eq 1 ] && grep -q -- "$want" <<< "$out"; then echo "PASS $name"
    else echo "FAIL $name: $out"; failed=1; fi
}
check cost_cli_rejects_bare_words 'argument "pr467": expected KEY=VALUE' pr467
check cost_cli_rejects_bad_gpus 'GPUS=x: expected a rank count' GPUS=x
check cost_cli_rejects_unknown_preset 'CONFIG=nope: unknown preset' CONFIG=nope
check cost_cli_rejects_bad_ops 'OPS=yes: expected 0 or 1' OPS=yes
check cost_cli_rejects_bad_setting 'MODEL_DIM' CONFIG=pr467 MODEL_DIM=abc
exit $failed
