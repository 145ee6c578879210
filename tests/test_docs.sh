#!/usr/bin/env bash
# The README cannot drift from the code: its settings table is generated from `train_gpt settings`,
# and every function it names in "Read the code" exists in train_gpt.cu.
set -u
cd "$(dirname "$0")/.."
failed=0
if out=$(scripts/update_readme --check 2>&1); then echo "PASS readme_settings_table_is_current"
else echo "FAIL readme_settings_table_is_current: $out"; failed=1; fi
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
exit $failed
