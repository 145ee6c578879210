#!/usr/bin/env bash
# The line rules and the fast test loop:
#   style_sources_pass_check_style     no line over 120 characters (train_gpt.cu, tokenizer/, tests/ C++), no
#                                      line with several statements in train_gpt.cu (scripts/check_style)
#   style_check_flags_what_it_should   the checker on a file written here: each rule and each exception
#   run_sh_filters_by_test_name        tests/run.sh NAME runs exactly the tests named so, in a binary or a script
#   test_cpu_needs_no_cuda_compiler    `make test-cpu` builds with neither nvcc nor the emulator's compiler
set -u
cd "$(dirname "$0")/.."
[ -n "${PGOLF_RUN_NESTED:-}" ] && exit 0  # inside the run.sh check below: nothing of its own to add
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
failed=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failed=1; }

if out=$(python3 scripts/check_style 2>&1); then pass style_sources_pass_check_style
else fail style_sources_pass_check_style "$(echo "$out" | tail -n 4 | tr '\n' ' ') (run scripts/reflow)"; fi

# One line per case; the expected verdict is in the file too (line numbers below).
mid=$(printf 'x%.0s' $(seq 1 100))
python3 - "$tmp/train_gpt.cu" "$mid" <<'PY'
import sys
path, mid = sys.argv[1], sys.argv[2]
lines = [
    "int a = 1;",                                           # 1 ok
    "int b = 2; int c = 3;",                                # 2 multi
    "for (int i = 0; i < n; i++) s += i;",                  # 3 ok: a for header
    'const char* s = "a; b; c";',                           # 4 ok: in a string
    "x = 1;  // then y = 2; z = 3;",                        # 5 ok: in a comment
    "f([](int v) { return v * v; });",                      # 6 ok: a one-statement lambda
    "f([](int v) { g(v); return v; });",                    # 7 multi: two statements in the lambda
    "#define TWICE(x) do { x; x; } while (0)",              # 8 ok: the preprocessor
    "y = 2; /* a; b; */",                                   # 9 ok: a block comment
    "char q = ';'; // ",                                    # 10 ok: a character literal
    "// table: rows of data",                               # 11
    "{\"A\", 1}, {\"B\", 2}; int t = 0; // " + mid,         # 12 ok: in a table, long and several
    "// end table",                                         # 13
    "int w = 0; // " + mid,                                 # 14 long (120 + 1 characters)
    "int u = 0; // " + "·" * (120 - 14),                    # 15 ok: 120 characters, more bytes
    "if (e) { cleanup(); return; }",                        # 16 multi
]
lines[13] = lines[13] + "x" * (121 - len(lines[13]))
assert len(lines[14]) == 120
open(path, "w", encoding="utf-8").write("\n".join(lines) + "\n")
PY
got=$(python3 scripts/check_style "$tmp/train_gpt.cu" | grep -oE '^[^ ]*:[0-9]+: (several|[0-9]+ characters)' \
      | sed -E 's/^.*:([0-9]+): (several|[0-9]+ characters)/\1 \2/' | tr '\n' ',')
want="2 several,7 several,14 121 characters,16 several,"
if [ "$got" = "$want" ]; then pass style_check_flags_what_it_should
else fail style_check_flags_what_it_should "flagged '$got', expected '$want'"; fi
printf '// table: never closed\nint a = 1;\n' > "$tmp/open.cu"
python3 scripts/check_style "$tmp/open.cu" 2>/dev/null | grep -q 'without `// end table`' \
    || fail style_check_flags_what_it_should "an unclosed table is not reported"

# run.sh NAME: a test of the test binary, and a test of a script, each alone (names split so that this
# script's own text does not match them)
mode=(); bin=tests/test_main
[ -n "${TEST_BIN:-}" ] && { mode=(--cpu); bin=$TEST_BIN; }  # under tests/run.sh --cpu
[ ! -x "$bin" ] && [ -x tests/test_main_cpu ] && { mode=(--cpu); bin=tests/test_main_cpu; }  # run by hand
one="checkpoint_rejects_other_shapes""_and_corruption" two="readme_walkthrough""_names_exist"
if [ ! -x "$bin" ]; then fail run_sh_filters_by_test_name "$bin is not built"
else
    ok=1
    for name in "$one" "$two"; do
        out=$(PGOLF_RUN_NESTED=1 tests/run.sh "${mode[@]}" "$name" 2>&1)
        lines=$(echo "$out" | grep -E '^(PASS|FAIL|SKIP) ' | sed -E 's/ \(.*$//; s/:.*$//' | tr '\n' ',')
        [ "$lines" = "PASS $name," ] && echo "$out" | tail -n 1 | grep -qx '1 passed, 0 failed' || {
            ok=0; fail run_sh_filters_by_test_name "tests/run.sh $name ran: ${lines:-nothing} ($(echo "$out" | tail -n 1))"; }
    done
    [ "$ok" = 1 ] && pass run_sh_filters_by_test_name
fi

plan=$(make -n -B test-cpu 2>&1)
if echo "$plan" | grep -qE '(^|[ /])(nvcc|clang\+\+)( |$)'; then
    fail test_cpu_needs_no_cuda_compiler "$(echo "$plan" | grep -E '(^|[ /])(nvcc|clang\+\+)( |$)' | head -n 1 | cut -c1-100)"
elif ! echo "$plan" | grep -q 'tests/test_main_cpu'; then
    fail test_cpu_needs_no_cuda_compiler "make -n test-cpu does not build tests/test_main_cpu"
else pass test_cpu_needs_no_cuda_compiler; fi
exit $failed
