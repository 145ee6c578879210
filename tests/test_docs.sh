#!/usr/bin/env bash
# The README cannot drift from the code: its settings table is generated from `train_gpt settings` and its
# reading guide from scripts/reading_guide (names and line counts), and every function it names in "Read the
# code" exists in train_gpt.cu.
set -u
cd "$(dirname "$0")/.."
failed=0
if out=$(scripts/update_readme --check 2>&1); then echo "PASS readme_generated_parts_are_current"
else echo "FAIL readme_generated_parts_are_current: $out"; failed=1; fi
missing=$(python3 - <<'PY'
import re
readme = open("README.md", encoding="utf-8").read()
section = readme.split("## Read the code", 1)[1].split("\n## ", 1)[0]
names = set(re.findall(r"`([a-z_][a-z0-9_]*)`", section))
code = open("train_gpt.cu", encoding="utf-8").read()
print(" ".join(sorted(n for n in names if not re.search(r"\b%s\b" % re.escape(n), code))))
PY
)
if [ -z "$missing" ]; then echo "PASS readme_walkthrough_names_exist"
else echo "FAIL readme_walkthrough_names_exist: not in train_gpt.cu: $missing"; failed=1; fi
header=$(python3 - <<'PY'
import re
s = open("train_gpt.cu", encoding="utf-8").read()
head = s.split("Sections, in order:", 1)[1].split("\n\n", 1)[0]
listed = [int(n) for n in re.findall(r"^//\s+(\d+)\. ", head, re.M)]
banners = [int(n) for n in re.findall(r"^// =+\n// (\d+)\. ", s, re.M)]
problems = []
if listed != banners:
    problems.append("the header lists sections %s, the banners are %s" % (listed, banners))
last = s.rfind("\n// 13. ")
for name in ("static void run_cuda(", "int main("):
    if s.find(name) < last:
        problems.append("%s is not after section 13, where the header places it" % name.rstrip("("))
print("; ".join(problems))
PY
)
if [ -z "$header" ]; then echo "PASS train_gpt_header_section_map_is_true"
else echo "FAIL train_gpt_header_section_map_is_true: $header"; failed=1; fi
exit $failed
