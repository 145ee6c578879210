#!/usr/bin/env bash
# Checks of the embedded Debian prose corpus (scripts/make_corpus) when it has been built:
# shard headers, sizes, one BOS per document of the text file, ids in range, few <unk>,
# the shard tokens of the first documents equal to spm_encode's, and a re-run that changes nothing.
set -u
cd "$(dirname "$0")/.." || exit 1
dir=data/datasets/debian_prose_sp1024
text=data/corpus/debian_prose.txt
model=data/tokenizers/fineweb_1024_bpe.model
failed=0

# The SWORD reader and OSIS conversion on a hand-made module (no download needed).
python3 - <<'EOF' || failed=1
import os, struct, sys, tempfile, zlib
sys.dont_write_bytecode = True
sys.path.insert(0, "scripts")
import lib_data
bad = 0
def check(name, got, want):
    global bad
    print(f"PASS corpus_{name}" if got == want else f"FAIL corpus_{name}: got {got!r}, expected {want!r}")
    bad |= got != want

check("osis_inline_tags", lib_data.osis_to_text(
    '<w lemma="strong:G5547">Christ</w>,<note placement="foot">Messiah <hi>(Hebrew)</hi></note> the '
    '<transChange type="added">son</transChange>  of&#160;<divineName>David</divineName> &amp; co.'),
    "Christ, the son of David & co.")
check("osis_block_tags", lib_data.osis_to_text(
    '<title type="x-s">Verse 1.</title> <div sID="g1" type="x-p"/>First<lb/>  <l>second</l>'
    '<div eID="g1" type="x-p"/>\n\n \n<table><row><cell>Outline.</cell><cell>(1-17)</cell></row></table>'),
    "Verse 1.\nFirst\nsecond\nOutline. (1-17)")

# A zText testament: two blocks; verse entries stored back to back without a separator, a linked
# (repeated) index record, an empty slot, and chapter milestones that start documents.
with tempfile.TemporaryDirectory() as d:
    head = b'<chapter osisID="Gen.1" sID="Gen.1"/>In the beginning.'
    blocks = [head + b'And God said.' * 40,
              b'<chapter osisID="Gen.2" sID="Gen.2"/>Thus the heavens' + b' were finished.' * 30]
    zz, zs = b"", b""
    for raw in blocks:
        c = zlib.compress(raw)
        zs += struct.pack("<III", len(zz), len(c), len(raw))
        zz += c
    n0, n1 = len(head), len(blocks[0]) - len(head)
    recs = [(0, 0, 0), (0, 0, n0), (0, n0, n1), (0, n0, n1), (1, 0, len(blocks[1]))]
    zv = b"".join(struct.pack("<IIH", *r) for r in recs)
    for ext, data in (("bzs", zs), ("bzz", zz), ("bzv", zv)):
        with open(os.path.join(d, "ot." + ext), "wb") as f:
            f.write(data)
    check("sword_entries", [len(e) for e in lib_data.sword_entries(d)], [n0, n1, len(blocks[1])])
    docs = lib_data.sword_documents(d, min_chars=100, max_chars=100000)
    check("sword_documents", [doc[:30] for doc in docs],
          ["In the beginning. And God said", "Thus the heavens were finished"])
    with open(os.path.join(d, "ot.bzv"), "wb") as f:  # last record points at a block that does not exist
        f.write(zv[:-10] + struct.pack("<IIH", 7, 0, 5))
    try:
        lib_data.sword_entries(d)
        check("sword_bad_index", "no error", "ValueError")
    except ValueError as e:
        check("sword_bad_index", "ot.bzv: not a verse index" in str(e), True)
sys.exit(bad)
EOF

# Offline (apt-get cannot fetch): one clear error naming the packages and the FineWeb alternative.
tmp=$(mktemp -d)
mkdir -p "$tmp/scripts" "$tmp/bin"
cp scripts/make_corpus scripts/lib_data.py "$tmp/scripts/"
printf '#!/bin/sh\necho "E: Failed to fetch http://deb.debian.org/... Temporary failure resolving" >&2\nexit 100\n' > "$tmp/bin/apt-get"
chmod +x "$tmp/bin/apt-get"
if PATH="$tmp/bin:$PATH" "$tmp/scripts/make_corpus" > "$tmp/out" 2>&1; then
    echo "FAIL corpus_offline_error: exit status 0"; failed=1
elif grep -q 'error: could not download sword-comm-tdavid, .*Temporary failure resolving.*DATA_PATH' "$tmp/out" \
     && [ ! -e "$tmp/data/datasets/debian_prose_sp1024" ]; then
    echo "PASS corpus_offline_error"
else
    echo "FAIL corpus_offline_error: $(cat "$tmp/out")"; failed=1
fi
rm -rf "$tmp"

if [ ! -f "$dir/fineweb_val_000000.bin" ] || [ ! -f "$text" ]; then
    echo "SKIP corpus: not built (scripts/make_corpus)"
    exit $failed
fi

python3 - "$dir" "$text" <<'EOF' || failed=1
import glob, os, re, sys
sys.dont_write_bytecode = True
sys.path.insert(0, "scripts")
import lib_data
d, text_path = sys.argv[1], sys.argv[2]
bad = 0
def check(name, ok, why):
    global bad
    print(f"PASS corpus_{name}" if ok else f"FAIL corpus_{name}: {why}")
    bad |= not ok

val = sorted(glob.glob(f"{d}/fineweb_val_*.bin"))
train = sorted(glob.glob(f"{d}/fineweb_train_*.bin"))
shards, errors = {}, []
for p in val + train:
    try:
        shards[p] = lib_data.read_shard_tokens(p)
    except ValueError as e:
        errors.append(str(e))
check("headers", not errors and len(val) == 1 and len(train) >= 1,
      "; ".join(errors) or f"{len(val)} val / {len(train)} train files")
if errors:
    sys.exit(1)
nval = sum(len(shards[p]) for p in val)
ntrain = sum(len(shards[p]) for p in train)
check("sizes", nval >= 500_000 and ntrain >= 5_000_000, f"{nval:,} val / {ntrain:,} train tokens")

# Documents of the text file, counted independently of the tokenizer: runs of non-blank lines.
with open(text_path, encoding="utf-8") as f:
    raw = f.read()
docs = [p for p in re.split(r"\n[ \t]*\n", raw.strip("\n")) if p.strip()]
bos = sum(shards[p].count(1) for p in shards)
first_val, first_train = shards[val[0]][0], shards[train[0]][0]
check("bos_per_document", bos == len(docs) and first_val == 1 and first_train == 1,
      f"{bos:,} BOS for {len(docs):,} documents; val starts with {first_val}, train with {first_train}")

top = max(max(t) for t in shards.values())
reserved = sum(t.count(0) + t.count(2) for t in shards.values())  # pad/eos never come from encoding
check("ids_in_range", top < 1024 and reserved == 0, f"max id {top}, {reserved} pad/eos ids")

unk = sum(t.count(3) for t in shards.values())
share = unk / (nval + ntrain)
check("unk_share", share < 0.001, f"<unk> is {share:.4%} of tokens")

# Clean prose: no OSIS markup or entities left, no blank line inside a document (by construction of
# `docs` above, a blank line would have made two documents and broken the BOS count).
leftover = re.findall(r"<(?:w|note|div|hi|reference|title|chapter|transChange|milestone)\b|lemma=|&(?:amp|quot|lt|gt);", raw)
check("text_clean", not leftover and "\r" not in raw, f"{len(leftover)} markup remnants, e.g. {leftover[:3]}")
EOF

# The shard tokens of the first val documents equal spm_encode's (the reference tokenizer); a
# document's line breaks normalize to spaces, so each is given to spm_encode as one line.
if command -v spm_encode > /dev/null; then
    python3 - "$dir" "$text" "$model" <<'EOF' || failed=1
import re, subprocess, sys
sys.dont_write_bytecode = True
sys.path.insert(0, "scripts")
import lib_data
d, text_path, model = sys.argv[1:4]
with open(text_path, encoding="utf-8") as f:
    docs = re.split(r"\n[ \t]*\n", f.read(2_000_000).strip("\n"))[:40]
lines = "\n".join(doc.replace("\n", " ") for doc in docs) + "\n"
r = subprocess.run(["spm_encode", "--model", model, "--output_format=id"], input=lines,
                   capture_output=True, text=True, check=True)
expect = []
for line in r.stdout.splitlines():
    expect += [1] + [int(x) for x in line.split()]
got = list(lib_data.read_shard_tokens(f"{d}/fineweb_val_000000.bin")[:len(expect)])
if got == expect:
    print(f"PASS corpus_matches_spm_encode ({len(docs)} documents, {len(expect):,} tokens)")
else:
    k = next(i for i, (a, b) in enumerate(zip(got, expect)) if a != b) if len(got) == len(expect) else len(got)
    print(f"FAIL corpus_matches_spm_encode: first difference at token {k}: shard {got[k:k+5]}, spm_encode {expect[k:k+5]}")
    sys.exit(1)
EOF
else
    echo "SKIP corpus_matches_spm_encode: spm_encode not installed (scripts/setup)"
fi

# The CaseOps form (scripts/make_corpus --vocab 8192 --caseops): one BOS per document as the text has them,
# and the val byte sidecar charging each document exactly its original UTF-8 bytes (the text's, not the
# transformed text's: val_bpb stays comparable), BOS positions 0.
cdir=data/datasets/debian_prose_sp8192_caseops
if [ -f "$cdir/fineweb_val_bytes_000000.bin" ] && [ -f "$text" ]; then
    python3 - "$cdir" "$text" <<'EOF' || failed=1
import re, sys
sys.dont_write_bytecode = True
sys.path.insert(0, "scripts")
import lib_data
d, text_path = sys.argv[1:3]
toks = lib_data.read_shard_tokens(f"{d}/fineweb_val_000000.bin")
side = lib_data.read_shard_tokens(f"{d}/fineweb_val_bytes_000000.bin")
with open(text_path, encoding="utf-8") as f:
    docs = re.split(r"\n[ \t]*\n", f.read().strip("\n"))
starts = [i for i, t in enumerate(toks) if t == 1] + [len(toks)]
bad = [k for k in range(len(starts) - 1)
       if sum(side[starts[k]:starts[k + 1]]) != len(docs[k].encode("utf-8")) or side[starts[k]] != 0]
if len(side) == len(toks) and len(starts) > 100 and starts[0] == 0 and not bad:
    print(f"PASS corpus_caseops_sidecar_bytes ({len(starts) - 1} val documents, {sum(side):,} bytes)")
else:
    print(f"FAIL corpus_caseops_sidecar_bytes: {len(side)} sidecar vs {len(toks)} tokens, "
          f"{len(starts) - 1} documents, {len(bad)} with a wrong byte sum (first {bad[:3]})")
    sys.exit(1)
EOF
else
    echo "SKIP corpus_caseops_sidecar_bytes: no CaseOps corpus (scripts/make_corpus --vocab 8192 --caseops)"
fi

# A second run of make_corpus is a no-op: same files, untouched.
before=$(stat -c '%n %i %s %Y' "$dir"/*.bin "$text")
out=$(scripts/make_corpus 2>&1)
after=$(stat -c '%n %i %s %Y' "$dir"/*.bin "$text")
if [ "$before" = "$after" ] && grep -q 'corpus present' <<< "$out"; then
    echo "PASS corpus_rerun_noop"
else
    echo "FAIL corpus_rerun_noop: $out"
    failed=1
fi
exit $failed
