#!/usr/bin/env bash
# ./tokenize against Debian's sentencepiece tools (v0.1.97: spm_encode, spm_decode, spm_normalize)
# on text nobody here wrote: Debian's own changelogs, copyright files and licenses, the prose
# corpus in data/corpus/ when it exists, and a seeded fuzz file. One document per line, with tabs
# and carriage returns turned into spaces (the charsmap maps them to spaces anyway).
# Also checks the byte rule, decode, the charsmap, the shard writer and command-line errors.
# Prints PASS/FAIL/SKIP lines; exits non-zero on any failure. Needs ./tokenize built and python3.
set -u
cd "$(dirname "$0")/.."
failures=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failures=$((failures + 1)); }
skip() { echo "SKIP $1: $2"; }
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
PY=python3

if [ ! -x ./tokenize ]; then
    echo "FAIL parity: ./tokenize not built (g++ -O2 -std=c++17 -Wall -Wextra -o tokenize tokenizer/tokenize.cpp)"
    exit 1
fi
if ! command -v spm_encode >/dev/null || ! command -v spm_decode >/dev/null || ! command -v spm_normalize >/dev/null; then
    echo "FAIL parity: spm_encode not found (install Debian package sentencepiece)"
    exit 1
fi
models=()
for v in 1024 8192; do
    m=data/tokenizers/fineweb_${v}_bpe.model
    if [ -f "$m" ]; then models+=("$v"); else fail "parity_model_$v" "$m is missing"; fi
done
for v in 2048 4096; do  # not committed; checked when someone put them there
    [ -f data/tokenizers/fineweb_${v}_bpe.model ] && models+=("$v")
done
model() { echo "data/tokenizers/fineweb_$1_bpe.model"; }

# --- corpora: one document per line -----------------------------------------------------------------
$PY - "$T" <<'EOF'
import glob, gzip, os, random, sys
T = sys.argv[1]
def paragraphs(text):
    for p in text.split('\n\n'):
        p = p.replace('\t', ' ').replace('\r', ' ').replace('\n', ' ')
        if p.strip():
            yield p
def write(name, sources, limit):
    n = 0
    with open(os.path.join(T, name), 'w', encoding='utf-8', errors='surrogateescape') as out:
        for read in sources:
            try:
                text = read().decode('utf-8', 'surrogateescape')
            except Exception:
                continue
            for p in paragraphs(text):
                out.write(p + '\n')
                n += len(p) + 1
                if n >= limit:
                    return
def opener(path, gz=False):
    return lambda: (gzip.open if gz else open)(path, 'rb').read()
docs = [opener(p, True) for p in sorted(glob.glob('/usr/share/doc/*/changelog*.gz'))[::3]]
docs += [opener(p) for p in sorted(glob.glob('/usr/share/doc/*/copyright'))[::2]]
docs += [opener(p) for p in sorted(glob.glob('/usr/share/common-licenses/*')) if os.path.isfile(p)]
write('debian_docs.txt', docs, 6_000_000)
write('corpus.txt', [opener(p) for p in sorted(glob.glob('data/corpus/*.txt'))], 8_000_000)

# fuzz: mixes of everything the normalizer and BPE treat specially, plus lines of random bytes
rng = random.Random(20240520)
def ch(lo, hi): return chr(rng.randint(lo, hi))
pools = [
    lambda: rng.choice('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?\'"()-#*+<=>@[]\\^_`{}~|/$%&'),
    lambda: rng.choice('éèêëàâäçñöüßÉÀÇØøåÅæœ'),
    lambda: rng.choice('aeiouAEIOUnc') + ch(0x300, 0x36F),  # letter + combining mark
    lambda: ch(0x300, 0x36F),
    lambda: rng.choice(['\u00a0', '\u1680', '\u2000', '\u2003', '\u200b', '\u200c', '\u200d', '\u200e', '\u2028',
                        '\u2029', '\u202f', '\u205f', '\u3000', '\ufeff', '  ', '\t', '\r', '\f', '\v']),
    lambda: ch(0x1, 0x1f).replace('\n', ' '),
    lambda: rng.choice(['\x7f', '\x85', '\x8f', '\x9f', '\x00']),
    lambda: '\ufffd', lambda: '\u2581', lambda: '\u2581\u2581 ',
    lambda: ch(0x4e00, 0x4fff), lambda: ch(0x3040, 0x30ff),
    lambda: ch(0x1f300, 0x1f64f), lambda: '\U0001F468\u200D\U0001F469',
    lambda: ch(0x1100, 0x1112) + ch(0x1161, 0x1175) + rng.choice(['', ch(0x11a8, 0x11c2)]),  # Hangul jamo
    lambda: rng.choice('´¨¯¸˘˙˚˛˜˝΄΅῭`'), lambda: rng.choice('ﬁﬂ½¼™…²³！＂Ａｚ①⑳㎏㍻ℌℍ'),
    lambda: rng.choice(['\udc80', '\udcff', '\udce2\udc96', '\udcf0\udc9f\udc98', '\udcc0\udcaf', '\udced\udca0\udc80']),  # invalid UTF-8
    lambda: ' ' + rng.choice(['the', 'and', 'information', 'Hello', 'world', '2024', 'Americ', 'water']) + rng.choice(['', ' ', ',', '.']),
]
with open(os.path.join(T, 'fuzz.txt'), 'w', encoding='utf-8', errors='surrogateescape') as out:
    for i in range(20000):
        if i % 10 == 9:
            b = bytes(rng.randrange(256) for _ in range(rng.randint(0, 80))).replace(b'\n', b' ')
            out.write(b.decode('utf-8', 'surrogateescape') + '\n')
        else:
            out.write(''.join(rng.choice(pools)() for _ in range(rng.randint(0, 60))).replace('\n', ' ') + '\n')
EOF
corpora=(debian_docs fuzz)
if [ -s "$T/corpus.txt" ]; then corpora+=(corpus); else skip parity_corpus "data/corpus/*.txt not present"; fi

mb() { $PY -c "import os,sys; print('%.1f MB' % (os.path.getsize(sys.argv[1]) / 1e6))" "$1"; }

# first differing line of two files, for the failure message
first_diff() {
    $PY - "$1" "$2" <<'EOF'
import sys
a = open(sys.argv[1], 'rb').read().split(b'\n'); b = open(sys.argv[2], 'rb').read().split(b'\n')
for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
        print('line %d: want %r got %r' % (i + 1, x[:120], y[:120])); break
else:
    print('line counts %d vs %d' % (len(a), len(b)))
EOF
}

# --- encode: ids identical to spm_encode -----------------------------------------------------------------
for v in "${models[@]}"; do
    for c in "${corpora[@]}"; do
        [ "$v" != 1024 ] && [ "$v" != 8192 ] && [ "$c" = corpus ] && continue
        name="parity_encode_${v}_$c"
        if ! spm_encode --model="$(model $v)" --output_format=id "$T/$c.txt" > "$T/want.ids" 2> "$T/err"; then
            fail "$name" "spm_encode failed: $(head -c 200 "$T/err")"; continue
        fi
        if ! ./tokenize encode "$(model $v)" "$T/$c.txt" > "$T/got.ids" 2> "$T/err"; then
            fail "$name" "tokenize failed: $(head -c 200 "$T/err")"; continue
        fi
        if cmp -s "$T/want.ids" "$T/got.ids"; then
            pass "$name ($(mb "$T/$c.txt"), $(wc -l < "$T/$c.txt") lines, identical ids)"
        else
            fail "$name" "$(first_diff "$T/want.ids" "$T/got.ids")"
        fi
        cp "$T/got.ids" "$T/${v}_$c.ids"
    done
done

# --- decode: random id sequences give the same text as spm_decode ------------------------------------------
for v in 1024 8192; do
    [ -f "$(model $v)" ] || continue
    $PY - "$v" > "$T/random_$v.ids" <<'EOF'
import random, sys
v = int(sys.argv[1]); rng = random.Random(v)
space = {1024: 940, 8192: 8108}[v]
for _ in range(20000):  # specials, byte pieces (8192), bare spaces and anything
    print(' '.join(str(rng.choice([rng.randrange(v), rng.randrange(4), rng.randrange(4, 260), space]))
                   for _ in range(rng.randint(0, 30))))
EOF
    spm_decode --model="$(model $v)" --input_format=id "$T/random_$v.ids" > "$T/want.txt"
    ./tokenize decode "$(model $v)" "$T/random_$v.ids" > "$T/got.txt"
    if cmp -s "$T/want.txt" "$T/got.txt"; then pass "parity_decode_${v} (20000 random id lines)"
    else fail "parity_decode_${v}" "$(first_diff "$T/want.txt" "$T/got.txt")"; fi
done

# --- decode(encode(x)) is the normalized text; LUT bytes are its UTF-8 length ------------------------------
# Oracle: spm_normalize with the model's own normalizer (spaces written as U+2581). Lines holding
# <unk> are left out: unknown characters decode as " ⁇ " and count 0 bytes.
for v in 1024 8192; do
    [ -f "$(model $v)" ] || continue
    for c in debian_docs corpus; do
        [ -f "$T/${v}_$c.ids" ] || continue
        spm_normalize --model="$(model $v)" --use_internal_normalization --input="$T/$c.txt" > "$T/norm.txt"
        ./tokenize decode "$(model $v)" "$T/${v}_$c.ids" > "$T/dec.txt"
        ./tokenize bytes "$(model $v)" "$T/$c.txt" > "$T/bytes.txt"
        out=$($PY - "$T/norm.txt" "$T/dec.txt" "$T/bytes.txt" "$T/${v}_$c.ids" <<'EOF'
import sys
norm, dec, nbytes, ids = (open(p, 'rb').read().split(b'\n')[:-1] for p in sys.argv[1:5])
if not len(norm) == len(dec) == len(nbytes) == len(ids):
    print(0, 1, 1, 'line counts differ: %d %d %d %d' % (len(norm), len(dec), len(nbytes), len(ids))); sys.exit()
checked = dec_bad = bytes_bad = 0; first = ''
for i, (n, d, b, t) in enumerate(zip(norm, dec, nbytes, ids)):
    if b'3' in t.split():
        continue
    want = n.replace('\u2581'.encode(), b' ')
    checked += 1
    if d != want:
        dec_bad += 1; first = first or 'decode line %d: want %r got %r' % (i + 1, want[:100], d[:100])
    if int(b) != len(want):
        bytes_bad += 1; first = first or 'bytes line %d: want %d got %s' % (i + 1, len(want), b.decode())
print(checked, dec_bad, bytes_bad, first)
EOF
)
        read -r checked dec_bad bytes_bad first <<< "$out"
        if [ "$dec_bad" = 0 ]; then pass "roundtrip_decode_${v}_$c ($checked unk-free lines)"
        else fail "roundtrip_decode_${v}_$c" "$dec_bad of $checked lines differ; $first"; fi
        if [ "$bytes_bad" = 0 ]; then pass "lut_bytes_${v}_$c ($checked unk-free lines)"
        else fail "lut_bytes_${v}_$c" "$bytes_bad of $checked lines differ; $first"; fi
    done
done

# --- other normalizer settings: the 1024 model rewritten with each flag flipped -----------------------------
# The challenge's models use one setting; these check the other branches of normalize and decode.
head -n 3000 "$T/fuzz.txt" > "$T/mix.txt"
head -n 3000 "$T/debian_docs.txt" >> "$T/mix.txt"
for cfg in add_dummy_prefix=1 remove_extra_whitespaces=0 escape_whitespaces=0 treat_whitespace_as_suffix=1,add_dummy_prefix=1 \
           add_dummy_prefix=1,remove_extra_whitespaces=0; do
    $PY - "$(model 1024)" "$T/variant.model" "$cfg" <<'EOF'
import sys
def varint(b, i):
    v = s = 0
    while True:
        c = b[i]; i += 1; v |= (c & 0x7F) << s; s += 7
        if not c & 0x80: return v, i
def put_varint(v):
    out = bytearray()
    while v >= 0x80: out.append(v & 0x7F | 0x80); v >>= 7
    return bytes(out + bytes([v]))
def fields(b):  # (number, whole field bytes, payload of a length-delimited field)
    i = 0
    while i < len(b):
        key, j = varint(b, i); wire = key & 7
        if wire == 0: _, k = varint(b, j); payload = None
        elif wire == 2: n, j = varint(b, j); k = j + n; payload = b[j:k]
        else: k = j + (4 if wire == 5 else 8); payload = None
        yield key >> 3, b[i:k], payload; i = k
numbers = {'treat_whitespace_as_suffix': (2, 24), 'add_dummy_prefix': (3, 3), 'remove_extra_whitespaces': (3, 4), 'escape_whitespaces': (3, 5)}
sets = {}
for a in sys.argv[3].split(','):
    k, v = a.split('='); msg, num = numbers[k]; sets.setdefault(msg, {})[num] = int(v)
out = bytearray()
for num, whole, payload in fields(open(sys.argv[1], 'rb').read()):
    if num in sets:
        sub = bytearray(w for n2, w2, _ in fields(payload) if n2 not in sets[num] for w in w2)
        for n2, v in sets[num].items(): sub += put_varint(n2 << 3) + put_varint(v)
        out += put_varint(num << 3 | 2) + put_varint(len(sub)) + sub
    else:
        out += whole
open(sys.argv[2], 'wb').write(out)
EOF
    spm_encode --model="$T/variant.model" --output_format=id "$T/mix.txt" > "$T/want.ids"
    ./tokenize encode "$T/variant.model" "$T/mix.txt" > "$T/got.ids"
    spm_decode --model="$T/variant.model" --input_format=id "$T/random_1024.ids" > "$T/want.txt"
    ./tokenize decode "$T/variant.model" "$T/random_1024.ids" > "$T/got.txt"
    if ! cmp -s "$T/want.ids" "$T/got.ids"; then fail "parity_setting_$cfg" "encode: $(first_diff "$T/want.ids" "$T/got.ids")"
    elif ! cmp -s "$T/want.txt" "$T/got.txt"; then fail "parity_setting_$cfg" "decode: $(first_diff "$T/want.txt" "$T/got.txt")"
    else pass "parity_setting_$cfg (6000 lines encoded, 20000 id lines decoded)"; fi
done

# --- charsmap: every rule equals spm_normalize --decompile -------------------------------------------------
./tokenize charsmap "$(model 1024)" | sort > "$T/rules_got"
spm_normalize --model="$(model 1024)" --decompile 2>/dev/null | cut -f1,2 | sort > "$T/rules_want"
if [ -s "$T/rules_want" ] && cmp -s "$T/rules_want" "$T/rules_got"; then pass "charsmap_rules_decompile ($(wc -l < "$T/rules_got") rules)"
else fail charsmap_rules_decompile "$(first_diff "$T/rules_want" "$T/rules_got")"; fi

# --- shards: format, BOS per document, val/train split, determinism -------------------------------------------
# Documents: multi-line paragraphs of the Debian docs plus fuzz lines and empty texts, written as JSONL
# (Python's json.dumps with \u escapes and surrogate pairs) and as blank-line-separated text.
$PY - "$T" <<'EOF'
import json, os, random, sys
T = sys.argv[1]; rng = random.Random(7)
text = open(os.path.join(T, 'debian_docs.txt'), encoding='utf-8', errors='surrogateescape').read().split('\n')[:3000]
fuzz = open(os.path.join(T, 'fuzz.txt'), encoding='utf-8', errors='surrogateescape').read().split('\n')[:500]
docs = []
for p in text:  # re-wrap into lines, as documents have newlines inside
    words = p.split(' '); lines = []; cur = []
    for w in words:
        cur.append(w)
        if rng.random() < 0.1: lines.append(' '.join(cur)); cur = []
    lines.append(' '.join(cur))
    docs.append('\n'.join(l for l in lines if l.strip()))
for f in fuzz:
    if any('\udc80' <= c <= '\udcff' for c in f): continue  # invalid UTF-8 cannot be written as JSON
    docs.insert(rng.randrange(len(docs)), f)
docs = [d for d in docs if d.strip()]
docs[5:5] = ['', '   ']  # empty documents become a lone BOS
with open(os.path.join(T, 'docs.jsonl'), 'w') as f:
    for i, d in enumerate(docs):
        f.write(json.dumps({'id': i, 'text': d, 'meta': {'n': [1, 2.5, None, True]}}) + '\n')
# text format: drop documents that cannot be written that way (empty, or with whitespace-only lines)
plain = [d for d in docs if d.strip() and all(l.strip(' \t\r') for l in d.split('\n'))]
with open(os.path.join(T, 'docs.txt'), 'w', encoding='utf-8', errors='surrogateescape') as f:
    f.write('\n\n'.join(plain) + '\n')
for name, ds in (('docs_jsonl.lines', docs), ('docs_txt.lines', plain)):
    with open(os.path.join(T, name), 'w', encoding='utf-8', errors='surrogateescape') as f:
        for d in ds: f.write(d.replace('\n', ' ').replace('\r', ' ').replace('\t', ' ') + '\n')
EOF
check_shards() {  # NAME DIR LINES_FILE VAL_DOCS|-VAL_TOKENS SHARD_TOKENS
    spm_encode --model="$(model 1024)" --output_format=id "$3" > "$T/shard_want.ids"
    local r
    r=$($PY - "$2" "$T/shard_want.ids" "$4" "$5" <<'EOF'
import array, glob, os, struct, sys
d, want_ids, val_arg, shard_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
docs = [[1] + [int(x) for x in l.split()] for l in open(want_ids).read().split('\n')[:-1]]
def read(split):
    toks = array.array('H'); files = sorted(glob.glob(os.path.join(d, 'fineweb_%s_*.bin' % split)))
    for i, f in enumerate(files):
        if os.path.basename(f) != 'fineweb_%s_%06d.bin' % (split, i): return None, 'unexpected name ' + f
        b = open(f, 'rb').read()
        head = struct.unpack('<256i', b[:1024])
        if head[0] != 20240520 or head[1] != 1 or any(head[3:]): return None, 'bad header in ' + f
        if len(b) != 1024 + 2 * head[2]: return None, '%s: size %d != 1024 + 2*%d' % (f, len(b), head[2])
        if i < len(files) - 1 and head[2] != shard_tokens: return None, '%s holds %d tokens, not %d' % (f, head[2], shard_tokens)
        t = array.array('H'); t.frombytes(b[1024:]); toks.extend(t)
    return toks.tolist(), len(files)
if glob.glob(os.path.join(d, '*.tmp')): print('leftover .tmp files'); sys.exit()
val, nv = read('val'); train, nt = read('train')
if val is None: print(nv); sys.exit()
if train is None: print(nt); sys.exit()
if val_arg >= 0: n_val = min(val_arg, len(docs))
else:  # --val-tokens: documents until at least that many tokens
    n_val, acc = 0, 0
    while n_val < len(docs) and acc < -val_arg: acc += len(docs[n_val]); n_val += 1
want_val = [t for doc in docs[:n_val] for t in doc]; want_train = [t for doc in docs[n_val:] for t in doc]
if val != want_val: print('val tokens differ from BOS + spm_encode (%d vs %d tokens)' % (len(val), len(want_val))); sys.exit()
if train != want_train: print('train tokens differ from BOS + spm_encode (%d vs %d tokens)' % (len(train), len(want_train))); sys.exit()
if (val + train).count(1) != len(docs): print('BOS count differs from document count'); sys.exit()
print('ok %d docs, %d val + %d train tokens, %d + %d files' % (len(docs), len(val), len(train), nv, nt))
EOF
)
    if [[ "$r" == ok* ]]; then pass "$1 (${r#ok })"; else fail "$1" "$r"; fi
}
run_shard() {  # NAME OUTDIR ARGS...
    local name=$1 out=$2; shift 2
    if ! ./tokenize shard "$(model 1024)" "$out" "$@" > "$T/shard_log" 2>&1; then
        fail "$name" "tokenize shard failed: $(tail -n 1 "$T/shard_log")"; return 1
    fi
}
if run_shard shard_jsonl "$T/s1" --val-docs 100 --shard-tokens 50000 "$T/docs.jsonl"; then
    check_shards shard_jsonl "$T/s1" "$T/docs_jsonl.lines" 100 50000
fi
if run_shard shard_text "$T/s2" --format text --val-tokens 30000 --shard-tokens 20000 --threads 1 < "$T/docs.txt"; then
    check_shards shard_text_val_tokens "$T/s2" "$T/docs_txt.lines" -30000 20000
fi
if run_shard shard_threads "$T/s3" --val-docs 100 --shard-tokens 50000 --threads 1 "$T/docs.jsonl" &&
   run_shard shard_threads "$T/s4" --val-docs 100 --shard-tokens 50000 --threads 2 - < "$T/docs.jsonl"; then
    if diff -r "$T/s3" "$T/s4" > /dev/null && diff -r "$T/s1" "$T/s3" > /dev/null; then pass "shard_deterministic_threads"
    else fail shard_deterministic_threads "1 and 2 threads wrote different files"; fi
fi
printf '{"text": "ok"}\n{"text": "broken}\n' > "$T/bad.jsonl"
if ./tokenize shard "$(model 1024)" "$T/s5" "$T/bad.jsonl" > /dev/null 2> "$T/err"; then fail shard_malformed_jsonl "exit status 0"
elif grep -q "bad.jsonl:2: malformed JSONL" "$T/err" && [ "$(wc -l < "$T/err")" = 1 ]; then pass shard_malformed_jsonl
else fail shard_malformed_jsonl "message: $(head -c 200 "$T/err")"; fi

# --- command-line errors: one line, exit status 2 for usage, 1 for bad input ----------------------------------
cli_case() {  # NAME WANT_STATUS COMMAND...
    local name=$1 want=$2; shift 2
    "$@" > /dev/null 2> "$T/err" < /dev/null
    local rc=$?
    if [ "$rc" = "$want" ] && [ "$(wc -l < "$T/err")" = 1 ]; then pass "$name"
    else fail "$name" "status $rc (want $want), stderr: $(head -c 200 "$T/err")"; fi
}
cli_case cli_unknown_subcommand 2 ./tokenize frob "$(model 1024)"
cli_case cli_missing_model_arg 2 ./tokenize encode
cli_case cli_missing_model_file 1 ./tokenize encode /nonexistent.model
cli_case cli_missing_input 1 ./tokenize encode "$(model 1024)" /nonexistent.txt
cli_case cli_bad_ids 1 ./tokenize decode "$(model 1024)" <(echo "12 x3")
cli_case cli_id_out_of_range 1 ./tokenize decode "$(model 1024)" <(echo "5 1024")
head -c 1000 "$(model 1024)" > "$T/truncated.model"
cli_case cli_truncated_model 1 ./tokenize info "$T/truncated.model"

[ "$failures" -eq 0 ]
