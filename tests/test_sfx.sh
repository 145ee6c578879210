#!/usr/bin/env bash
# The counted code, build/submission/train_gpt.sh (scripts/make_sfx): it unpacks exactly the stripped
# source, builds it once with the flags that count its own bytes (also when mpirun starts several
# copies at once), runs the binary with the arguments and environment it was given, rebuilds after a
# change, and fails (never runs a stale binary) when its compressed part is damaged. nvcc is a stand-in
# here (NVCC=...): it records its arguments and writes a binary that prints its own.
set -u
cd "$(dirname "$0")/.."
sfx=build/submission/train_gpt.sh
src=build/submission/train_gpt.cu
make -s submission >/dev/null || { echo "FAIL sfx: make submission failed"; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/nvcc" <<'EOF'
#!/bin/sh
echo "$@" >>"$NVCC_LOG"
sleep 1
while [ $# -gt 1 ]; do [ "$1" = -o ] && out=$2; shift; done
printf '#!/bin/sh\necho "ran $* X=$X"\n' >"$out"
chmod +x "$out"
EOF
chmod +x "$tmp/nvcc"
export NVCC="$tmp/nvcc" NVCC_LOG="$tmp/nvcc.log"
failed=0
check() { if eval "$2"; then echo "PASS $1"; else echo "FAIL $1: $3"; failed=1; fi; }

out=$(PGOLF_SFX_DIR="$tmp/b" X=7 sh "$sfx" a "b c")
check sfx_unpacks_the_stripped_source 'cmp -s "$tmp/b/train_gpt.cu" "$src"' "the unpacked source differs from $src"
check sfx_runs_the_binary_with_its_arguments '[ "$out" = "ran a b c X=7" ]' "output '$out'"
n=$(wc -c <"$sfx")
m=$(wc -c <"$src")
check sfx_counts_its_own_bytes \
    'grep -q -- "-DPGOLF_CODE_BYTES_SFX=$n " "$NVCC_LOG" && grep -q -- "-DPGOLF_CODE_BYTES_STRIPPED=$m " "$NVCC_LOG"' \
    "nvcc args: $(head -c 300 "$NVCC_LOG")"
PGOLF_SFX_DIR="$tmp/b" sh "$sfx" >/dev/null
check sfx_builds_once '[ "$(wc -l <"$NVCC_LOG")" = 1 ]' "$(wc -l <"$NVCC_LOG") builds for two runs"
: >"$NVCC_LOG"
for i in 1 2 3 4; do PGOLF_SFX_DIR="$tmp/m" sh "$sfx" "$i" >"$tmp/m$i.out" & done
wait
ok=1; for i in 1 2 3 4; do grep -q "^ran $i " "$tmp/m$i.out" || ok=0; done
check sfx_concurrent_ranks_build_once '[ "$ok" = 1 ] && [ "$(wc -l <"$NVCC_LOG")" = 1 ]' \
    "$(wc -l <"$NVCC_LOG") builds for 4 concurrent starts; outputs: $(cat "$tmp"/m?.out | tr '\n' ' ')"
# a changed script (another source) is rebuilt; a damaged one fails before running anything
sed '2s/pgolf/PGOLF/' "$sfx" >"$tmp/changed.sh"
: >"$NVCC_LOG"
PGOLF_SFX_DIR="$tmp/b" sh "$tmp/changed.sh" >/dev/null 2>&1
check sfx_rebuilds_after_a_change '[ "$(wc -l <"$NVCC_LOG")" = 1 ]' "not rebuilt"
head -c $((n - 5000)) "$sfx" >"$tmp/cut.sh"
if PGOLF_SFX_DIR="$tmp/b" sh "$tmp/cut.sh" >"$tmp/cut.out" 2>&1; then r=0; else r=1; fi
check sfx_damaged_stream_fails '[ "$r" = 1 ] && ! grep -q "^ran" "$tmp/cut.out"' \
    "exit $r, output $(head -c 200 "$tmp/cut.out")"
# the counted form is a fraction of the stripped source
check sfx_is_compressed '[ "$n" -lt $(( $(wc -c <"$src") / 3 )) ]' "$n bytes for a $(wc -c <"$src")-byte source"
echo "  sfx: $n bytes (stripped source $(wc -c <"$src"), full source $(cat train_gpt.cu tokenizer/spm_model.h | wc -c))"
exit $failed
