#!/usr/bin/env bash
# scripts/bench_gpu without a GPU: its argument checks, and the report it writes into docs/perf.md
# from recorded logs (tests/fixtures/bench_gpu: synthetic logs in the two programs' exact formats).
set -u
cd "$(dirname "$0")/.."
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fx=tests/fixtures/bench_gpu
[ -x ./train_gpt_cpu ] || [ -x ./train_gpt ] || { echo "FAIL bench_gpu: ./train_gpt_cpu not built (make cpu)"; exit 1; }
failed=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failed=1; }

# the medians, computed here from the fixtures: consecutive train_time differences after step 10
median() {
    grep -o '^step:[0-9]*/[0-9]* train_loss:[^ ]* train_time:[0-9]*' "$1" | sed 's/^step:\([0-9]*\)\/.*train_time:\([0-9]*\)/\1 \2/' |
        awk 'NR > 1 && $1 == prev + 1 && $1 > 10 { print $2 - t } { prev = $1; t = $2 }' | sort -n |
        awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
pg_ms=$(median $fx/pgolf.log); ref_ms=$(median $fx/reference.log)
flops=
for bin in ./train_gpt ./train_gpt_cpu; do  # as bench_gpu: the first build whose cost subcommand prints the FLOPs
    [ -z "$flops" ] && [ -x $bin ] && flops=$($bin cost CONFIG=pr467 GPUS=1 GRAD_ACCUM_STEPS=8 | sed -n 's/^model_flops_per_step_per_gpu: \([0-9.e+]*\).*/\1/p')
done
[ -n "$flops" ] || { echo "FAIL bench_gpu: no build prints model_flops_per_step_per_gpu (make cpu)"; exit 1; }
want_pg=$(python3 -c "print(f'| pgolf \`./train_gpt\` | {$pg_ms:.1f} | {786432 / ($pg_ms / 1000):,.0f} | {100 * $flops / ($pg_ms / 1000) / 989.4e12:.1f}% | 21,504 MiB |')")
want_ratio=$(python3 -c "print(f'| pgolf / reference | {$pg_ms / $ref_ms:.3f}× the time | {$ref_ms / $pg_ms:.3f}× |')")

# 1. the report from the two logs replaces the marked block, and only it
cp docs/perf.md "$tmp/perf.md"
if scripts/bench_gpu --from-logs $fx/pgolf.log $fx/reference.log --report "$tmp/perf.md" > "$tmp/out" 2>&1; then
    block=$(sed -n '/<!-- bench_gpu:begin -->/,/<!-- bench_gpu:end -->/p' "$tmp/perf.md")
    outside_new=$(sed '/<!-- bench_gpu:begin -->/,/<!-- bench_gpu:end -->/d' "$tmp/perf.md")
    outside_old=$(sed '/<!-- bench_gpu:begin -->/,/<!-- bench_gpu:end -->/d' docs/perf.md)
    if [[ "$block" == *"$want_pg"* ]] && [[ "$block" == *"$want_ratio"* ]] && [[ "$block" == *"| 18,731 MiB"* || "$block" == *"20,110 MiB (torch: 18731 MiB allocated"* ]] &&
       [[ "$block" == *"NVIDIA H100 80GB HBM3, driver 570.00"* ]] && [[ "$block" == *"steps 11–60 (50 steps)"* ]] &&
       [ "$outside_new" = "$outside_old" ]; then
        pass bench_gpu_report_from_recorded_logs
    else
        fail bench_gpu_report_from_recorded_logs "want '$want_pg' and '$want_ratio' in:
$block"
    fi
else fail bench_gpu_report_from_recorded_logs "$(tail -2 "$tmp/out")"; fi

# 2. a second report replaces the first (one block, same text); pgolf alone says the reference was not run
cp "$tmp/perf.md" "$tmp/first.md"
scripts/bench_gpu --from-logs $fx/pgolf.log $fx/reference.log --report "$tmp/perf.md" > /dev/null 2>&1
n=$(grep -c '<!-- bench_gpu:begin -->' "$tmp/perf.md")
scripts/bench_gpu --from-logs $fx/pgolf.log --report "$tmp/alone.md" > /dev/null 2>&1; cp "$tmp/perf.md" "$tmp/alone.md"
scripts/bench_gpu --from-logs $fx/pgolf.log --report "$tmp/alone.md" > /dev/null 2>&1
if cmp -s "$tmp/perf.md" "$tmp/first.md" && [ "$n" = 1 ] && grep -q '| reference | not run' "$tmp/alone.md" && ! grep -q 'pgolf / reference' "$tmp/alone.md"; then
    pass bench_gpu_report_replaces_its_block
else fail bench_gpu_report_replaces_its_block "blocks: $n"; fi

# 3. bad input: a clear one-line error, exit 1, the report untouched
check_error() {  # NAME EXPECTED_TEXT ARGS...
    local name="$1" want="$2"; shift 2
    cp "$tmp/first.md" "$tmp/r.md"
    if PATH="/usr/bin:/bin" scripts/bench_gpu "$@" --report "$tmp/r.md" > "$tmp/err" 2>&1; then fail "$name" "exit 0"
    elif ! grep -q -- "$want" "$tmp/err"; then fail "$name" "$(head -3 "$tmp/err")"
    elif grep -q Traceback "$tmp/err"; then fail "$name" "a Python traceback"
    elif ! cmp -s "$tmp/r.md" "$tmp/first.md"; then fail "$name" "the report changed"
    else pass "$name"; fi
}
check_error bench_gpu_needs_50_steps "the median needs at least 50 steps" --steps 40 --from-logs $fx/pgolf.log
check_error bench_gpu_missing_log "nolog.txt: No such file" --from-logs "$tmp/nolog.txt"
head -40 $fx/pgolf.log > "$tmp/short.log"
check_error bench_gpu_short_log "consecutive step lines after step 10; the median needs at least 50" --from-logs "$tmp/short.log"
check_error bench_gpu_log_without_steps "no \`step:K/N" --from-logs docs/perf.md
check_error bench_gpu_missing_reference "--reference $tmp/ref.py: no such file" --reference "$tmp/ref.py"
grep -v 'bench_gpu:' "$tmp/first.md" > "$tmp/nomarks.md"
if scripts/bench_gpu --from-logs $fx/pgolf.log --report "$tmp/nomarks.md" > "$tmp/err" 2>&1 || ! grep -q "expected one .*block to replace" "$tmp/err"; then
    fail bench_gpu_report_without_markers "$(tail -1 "$tmp/err")"
else pass bench_gpu_report_without_markers; fi
# no GPU here: a real run stops before starting anything (nvidia-smi is not on this PATH)
check_error bench_gpu_without_a_gpu "no GPU to benchmark on" --data data/tokenizers --out "$tmp/runs"
exit $failed
