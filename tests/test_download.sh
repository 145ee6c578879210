#!/usr/bin/env bash
# Offline tests of scripts/download_fineweb against a loopback HTTP server started here.
# The server mimics the Hugging Face layout (resolve URL -> 302 -> file), supports Range, and can be
# told (control.json, re-read per request) to ignore Range, cut a body short, or serve corrupt shards.
set -u
cd "$(dirname "$0")/.." || exit 1
repo_root=$PWD
tmp=$(mktemp -d)
server_pid=""
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
failed=0
pass() { echo "PASS download_$1"; }
fail() { echo "FAIL download_$1: $2"; failed=1; }

# --- the fake published repo: root prefix "exp", shard size 5000 tokens ------------------------------
src=$tmp/srv/exp
python3 - "$src" "$repo_root" <<'EOF' || { echo "FAIL download_setup: cannot build the fake repo"; exit 1; }
import json, os, random, sys
sys.dont_write_bytecode = True
src, root = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(root, "scripts"))
import lib_data
rng = random.Random(5)
def shard(path, n):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    toks = [1 if i % 700 == 0 else rng.randrange(4, 1024) for i in range(n)]
    lib_data.write_shard(path, toks)
d = f"{src}/datasets/fineweb10B_sp1024"
shard(f"{d}/fineweb_val_000000.bin", 3000)
for i, n in enumerate([5000, 5000, 2345]):
    shard(f"{d}/fineweb_train_{i:06d}.bin", n)
shard(f"{src}/datasets/fineweb10B_sp2048/fineweb_val_000000.bin", 100)  # manifest says 99: a wrong N
co = f"{src}/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"  # CaseOps: val shard + byte sidecar
shard(f"{co}/fineweb_val_000000.bin", 2000)
shard(f"{co}/fineweb_val_bytes_000000.bin", 2000)
shard(f"{co}/fineweb_train_000000.bin", 1500)
os.makedirs(f"{src}/tokenizers")
cm = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
with open(f"{root}/data/tokenizers/{cm}", "rb") as f, open(f"{src}/tokenizers/{cm}", "wb") as g:
    g.write(f.read())
with open(f"{root}/data/tokenizers/fineweb_1024_bpe.model", "rb") as f, open(f"{src}/tokenizers/fineweb_1024_bpe.model", "wb") as g:
    g.write(f.read())
with open(f"{src}/tokenizers/fineweb_1024_bpe.vocab", "w") as f:
    f.write("<pad>\t0\n<s>\t0\n")
def ds(name, tok, files_val, files_train, tokens_val, tokens_train):
    return {"name": name, "tokenizer_name": tok, "vocab_size": 1024, "bos_id": 1, "eos_id": 2,
            "stats": {"files_val": files_val, "files_train": files_train,
                      "tokens_val": tokens_val, "tokens_train": tokens_train}}
manifest = {"version": "test", "shard_size": 5000,
            "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                            "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
                           {"name": "sp_bpe_2048", "model_path": "tokenizers/none.model"},
                           {"name": "sp8192_caseops", "model_path": f"tokenizers/{cm}"}],
            "datasets": [ds("fineweb10B_sp1024", "sp_bpe_1024", 1, 3, 3000, 12345),
                         ds("fineweb10B_sp2048", "sp_bpe_2048", 1, 0, 99, 0),
                         ds("fineweb10B_sp512", "sp_bpe_1024", 1, 0, 50, 0),  # its shard is not on the server
                         dict(ds("fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", "sp8192_caseops", 1, 1, 2000,
                                 1500), vocab_size=8192, val_bytes_glob="fineweb_val_bytes_*.bin")]}
with open(f"{src}/manifest.json", "w") as f:
    json.dump(manifest, f)
EOF

cat > "$tmp/server.py" <<'EOF'
import http.server, json, os, sys, urllib.parse
root, port_file, log_file = sys.argv[1], sys.argv[2], sys.argv[3]
served = {}
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def log(self, path, status):
        with open(log_file, "a") as f:
            f.write(json.dumps({"path": path, "range": self.headers.get("Range"), "status": status,
                                "auth": self.headers.get("Authorization")}) + "\n")
    def send_body(self, status, body, headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        path = urllib.parse.unquote(self.path)
        prefix = "/datasets/test/fake-repo/resolve/main/"
        if path.startswith(prefix):  # like the Hub: resolve URLs redirect to the file's storage
            self.log(path, 302)
            self.send_response(302)
            self.send_header("Location", "/blob/" + path[len(prefix):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        rel = path[len("/blob/"):] if path.startswith("/blob/") else None
        file = os.path.join(root, rel) if rel else None
        if not file or not os.path.isfile(file):
            self.log(path, 404)
            self.send_body(404, b"not found")
            return
        try:
            ctl_path = os.path.join(root, "control.json")
            stamp = os.stat(ctl_path).st_mtime_ns
            with open(ctl_path) as f:
                ctl = json.load(f)
        except OSError:
            stamp, ctl = 0, {}
        name = os.path.basename(rel)
        key = (name, stamp)  # "once" counts from the latest control.json
        n = served[key] = served.get(key, 0) + 1
        data = open(file, "rb").read()
        if name in ctl.get("corrupt_always", []):
            data = b"\0\0\0\0" + data[4:]  # bad magic
        elif name in ctl.get("corrupt_once", []) and n == 1:
            data = data[:-2]  # truncated: size no longer 1024 + 2N
        rng = self.headers.get("Range")
        if rng and not ctl.get("ignore_range") and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
            if start >= len(data):
                self.log(path, 416)
                self.send_body(416, b"", [("Content-Range", f"bytes */{len(data)}")])
                return
            self.log(path, 206)
            self.send_body(206, data[start:], [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")])
            return
        cut = ctl.get("cut", {}).get(name)
        if cut is not None and n == 1:  # announce the whole file, send a prefix, hang up
            self.log(path, 200)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.log(path, 200)
        self.send_body(200, data)
srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
with open(port_file + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
os.rename(port_file + ".tmp", port_file)
srv.serve_forever()
EOF

log=$tmp/requests.log
python3 "$tmp/server.py" "$tmp/srv" "$tmp/port" "$log" &
server_pid=$!
for _ in $(seq 100); do [ -f "$tmp/port" ] && break; sleep 0.05; done
[ -f "$tmp/port" ] || { echo "FAIL download_setup: test server did not start"; exit 1; }
port=$(cat "$tmp/port")

export MATCHED_FINEWEB_REPO_ID=test/fake-repo MATCHED_FINEWEB_REMOTE_ROOT_PREFIX=exp HF_ENDPOINT=http://127.0.0.1:$port
unset HF_TOKEN
dest=$tmp/data
sd=$src/datasets/fineweb10B_sp1024
dd=$dest/datasets/fineweb10B_sp1024
out=$tmp/out
control() { echo "$1" > "$tmp/srv/control.json"; }
dl() { : > "$log"; scripts/download_fineweb --dest "$dest" "$@" > "$out" 2>&1; }
requests_for() { grep -c "\"/blob/.*$1" "$log"; }  # file requests (not redirects) for a name
same() { for f in "$@"; do cmp -s "$sd/$f" "$dd/$f" || return 1; done; }

# 1. fresh download of val + the first 2 train shards + tokenizer, token sent to the resolve host only
control '{}'
if HF_TOKEN=sekrit dl --train-shards 2 && same fineweb_val_000000.bin fineweb_train_000000.bin fineweb_train_000001.bin \
   && [ ! -e "$dd/fineweb_train_000002.bin" ] && cmp -s "$src/manifest.json" "$dest/manifest.json" \
   && cmp -s "$src/tokenizers/fineweb_1024_bpe.model" "$dest/tokenizers/fineweb_1024_bpe.model" \
   && cmp -s "$src/tokenizers/fineweb_1024_bpe.vocab" "$dest/tokenizers/fineweb_1024_bpe.vocab" \
   && [ -z "$(find "$dest" -name '*.part')" ]; then
    pass fresh
else
    fail fresh "$(tail -n 3 "$out")"
fi
if grep '"status": 302' "$log" | grep -q '"auth": "Bearer sekrit"' && ! grep '"status": 20' "$log" | grep -q sekrit; then
    pass token
else
    fail token "Authorization not sent to the resolve URL, or forwarded after the redirect"
fi

# the dataset folder records its tokenizer's checksum (the same fnv1a64 ./tokenize info prints), for train_gpt to check
want=$(./tokenize info "$src/tokenizers/fineweb_1024_bpe.model" 2>/dev/null | sed -n 's/^checksum: \([0-9a-f]*\) .*/\1/p')
if [ -n "$want" ] && grep -qx "tokenizer_checksum=$want" "$dd/manifest.txt" 2>/dev/null; then
    pass manifest
else
    fail manifest "$dd/manifest.txt: $(cat "$dd/manifest.txt" 2>&1 | tr '\n' ' ') (want checksum '$want')"
fi

# 2. everything present and valid: no request at all
if dl --train-shards 2 && [ ! -s "$log" ] && grep -q '3 already present' "$out"; then
    pass skip_present
else
    fail skip_present "$(wc -l < "$log") requests made; $(tail -n 1 "$out")"
fi

# 3. resume a .part with a Range request
head -c 4000 "$sd/fineweb_train_000001.bin" > "$dd/fineweb_train_000001.bin.part"
rm "$dd/fineweb_train_000001.bin"
if dl --train-shards 2 && same fineweb_train_000001.bin && grep 'train_000001' "$log" | grep -q '"range": "bytes=4000-", "status": 206'; then
    pass resume
else
    fail resume "$(grep train_000001 "$log" | tail -n 1) / $(tail -n 1 "$out")"
fi

# 4. a server that ignores Range: the .part (garbage here) is discarded, not appended to
head -c 4000 /dev/zero | tr '\0' '\377' > "$dd/fineweb_train_000001.bin.part"
rm "$dd/fineweb_train_000001.bin"
control '{"ignore_range": true}'
if dl --train-shards 2 && same fineweb_train_000001.bin && [ "$(requests_for train_000001)" = 1 ] && ! grep -q again "$out"; then
    pass ignored_range
else
    fail ignored_range "$(requests_for train_000001) requests; $(tail -n 2 "$out")"
fi

# 5. the connection drops mid-body: resumed from where it stopped
control '{"cut": {"fineweb_train_000002.bin": 3000}}'
if dl --train-shards 3 && same fineweb_train_000002.bin && [ "$(requests_for train_000002)" = 2 ] \
   && grep 'train_000002' "$log" | grep -q '"range": "bytes=3000-"'; then
    pass cut_connection
else
    fail cut_connection "$(requests_for train_000002) requests; $(tail -n 2 "$out")"
fi

# 6. a corrupt download (truncated) is detected and downloaded again
rm "$dd/fineweb_train_000000.bin"
control '{"corrupt_once": ["fineweb_train_000000.bin"]}'
if dl --train-shards 3 && same fineweb_train_000000.bin && grep -q 'fineweb_train_000000.bin: downloaded file is bad' "$out" \
   && [ "$(requests_for train_000000)" = 2 ]; then
    pass corrupt_redownload
else
    fail corrupt_redownload "$(tail -n 2 "$out")"
fi

# 7. a bad file already on disk is replaced
head -c 2000 "$sd/fineweb_val_000000.bin" > "$dd/fineweb_val_000000.bin"
control '{}'
if dl --train-shards 3 && same fineweb_val_000000.bin && grep -q 'fineweb_val_000000.bin: present but bad' "$out"; then
    pass bad_local_file
else
    fail bad_local_file "$(tail -n 2 "$out")"
fi

# 8. a shard that stays corrupt: clear error, non-zero exit, nothing left behind
rm "$dd/fineweb_train_000001.bin"
control '{"corrupt_always": ["fineweb_train_000001.bin"]}'
if dl --train-shards 3; then
    fail corrupt_permanent "exit status 0"
elif grep -q 'error: .*fineweb_train_000001.bin: still bad after a fresh download: .*magic 0' "$out" \
     && [ ! -e "$dd/fineweb_train_000001.bin" ] && [ ! -e "$dd/fineweb_train_000001.bin.part" ]; then
    pass corrupt_permanent
else
    fail corrupt_permanent "$(tail -n 2 "$out")"
fi
control '{}'

# 9. a consistent shard with a token count other than the manifest's
if dl --variant sp2048 --train-shards 0; then
    fail wrong_count "exit status 0"
elif grep -q 'fineweb_val_000000.bin: still bad .*100 tokens, expected 99' "$out"; then
    pass wrong_count
else
    fail wrong_count "$(tail -n 1 "$out")"
fi

# 10. more train shards than the manifest lists
if dl --train-shards 4; then
    fail too_many_shards "exit status 0"
elif grep -q -- '--train-shards 4: fineweb10B_sp1024 has only 3 train shards' "$out"; then
    pass too_many_shards
else
    fail too_many_shards "$(tail -n 1 "$out")"
fi

# 11b. the CaseOps variant: val shard, its byte sidecar, the CaseOps tokenizer, manifest.txt with
# transform=caseops (train_gpt refuses CaseOps shards without CASEOPS_ENABLED=1 by it); the sidecar is
# checked as a shard of the val shard's length (a wrong one is refused, nothing left behind)
cd_=$dest/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved
csd=$src/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved
ctok=fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model
if dl --variant sp8192_lossless_caps_caseops_v1_reserved --train-shards 1 \
   && cmp -s "$csd/fineweb_val_bytes_000000.bin" "$cd_/fineweb_val_bytes_000000.bin" \
   && cmp -s "$csd/fineweb_val_000000.bin" "$cd_/fineweb_val_000000.bin" \
   && cmp -s "$src/tokenizers/$ctok" "$dest/tokenizers/$ctok" \
   && grep -qx "transform=caseops" "$cd_/manifest.txt" && grep -qx "tokenizer=$ctok" "$cd_/manifest.txt" \
   && grep -qx "transform=none" "$dd/manifest.txt"; then
    pass caseops_variant
else
    fail caseops_variant "$(tail -n 2 "$out"); $(tr '\n' ' ' < "$cd_/manifest.txt" 2>&1)"
fi
rm "$cd_/fineweb_val_bytes_000000.bin"
control '{"corrupt_always": ["fineweb_val_bytes_000000.bin"]}'
if ! dl --variant sp8192_lossless_caps_caseops_v1_reserved --train-shards 1 \
   && grep -q 'fineweb_val_bytes_000000.bin: still bad' "$out" && [ ! -e "$cd_/fineweb_val_bytes_000000.bin" ]; then
    pass caseops_bad_sidecar
else
    fail caseops_bad_sidecar "$(tail -n 2 "$out")"
fi
control '{}'
# the default source of each variant (no network: the repo each would ask, from the script itself)
if python3 - "$repo_root/scripts/download_fineweb" <<'EOF'
import importlib.machinery, importlib.util, os, sys
sys.dont_write_bytecode = True
for k in ("MATCHED_FINEWEB_REPO_ID",):
    os.environ.pop(k, None)
loader = importlib.machinery.SourceFileLoader("download_fineweb", sys.argv[1])
spec = importlib.util.spec_from_loader("download_fineweb", loader)
m = importlib.util.module_from_spec(spec)
loader.exec_module(m)
want = {"sp1024": "willdepueoai/parameter-golf", "sp8192": "kevclark/parameter-golf",
        "sp8192_lossless_caps_caseops_v1_reserved": "romeerp/parameter-golf-caseops-v1"}
bad = [f"{v}: {m.Remote(v).repo}" for v, r in want.items() if m.Remote(v).repo != r]
bad += [] if m.dataset_dir_for_variant("sp8192_lossless_caps_caseops_v1_reserved") == \
    "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved" else ["caseops dataset dir"]
sys.exit(", ".join(bad) if bad else 0)
EOF
then
    pass variant_repos
else
    fail variant_repos "default repos differ"
fi

# 11. a variant the manifest does not list, and a file missing on the server
if ! dl --variant sp4096 && grep -q 'no dataset fineweb10B_sp4096' "$out" \
   && ! dl --variant sp512 --train-shards 0 && grep -q "HTTP 404 .* for http://127.0.0.1:$port/datasets/test/fake-repo/resolve/main/exp/datasets/fineweb10B_sp512/fineweb_val_000000.bin" "$out"; then
    pass missing_remote
else
    fail missing_remote "$(tail -n 1 "$out")"
fi

# 12. unreachable endpoint: one line naming the URL, quickly
closed=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start=$(date +%s)
if HF_ENDPOINT=http://127.0.0.1:$closed scripts/download_fineweb --dest "$tmp/other" > "$out" 2>&1; then
    fail unreachable "exit status 0"
elif grep -q "error: cannot reach http://127.0.0.1:$closed/datasets/test/fake-repo/resolve/main/exp/manifest.json" "$out" \
     && [ "$(wc -l < "$out")" = 1 ] && [ $(( $(date +%s) - start )) -lt 10 ]; then
    pass unreachable
else
    fail unreachable "$(cat "$out")"
fi

# 13. bad flags
if ! scripts/download_fineweb --dest "$tmp/other" --train-shards -1 > "$out" 2>&1 && grep -q -- '--train-shards: expected 0 or more' "$out" \
   && ! scripts/download_fineweb --dest "$tmp/other" --variant gpt2 > "$out" 2>&1 && grep -q -- '--variant: expected' "$out" \
   && ! scripts/download_fineweb --dest "$tmp/other" --variant sp8192_ > "$out" 2>&1 && grep -q -- '--variant: expected' "$out" \
   && ! scripts/download_fineweb --dest "$tmp/other" --variant 'sp8192_../x' > "$out" 2>&1 \
   && grep -q -- '--variant: expected' "$out"; then
    pass bad_flags
else
    fail bad_flags "$(cat "$out")"
fi

exit $failed
