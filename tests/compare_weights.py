#!/usr/bin/env python3
"""Two runs' trained weights (OUT_DIR/final_model.safetensors, fp32) tensor by tensor: the worst element
difference over the tensor's largest magnitude must stay within the tolerance.
Usage: compare_weights.py NAME A.safetensors B.safetensors TOLERANCE [REGEX of the tensors compared]"""
import json, re, struct, sys, array


def tensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] != "F32":
            sys.exit(f"FAIL {sys.argv[1]}: {path}: tensor {name} is {t['dtype']}, expected F32")
        b, e = t["data_offsets"]
        a = array.array("f")
        a.frombytes(data[8 + n + b:8 + n + e])
        out[name] = a
    return out


name, pa, pb, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
a, b = tensors(pa), tensors(pb)
if len(sys.argv) > 5:
    keep = re.compile(sys.argv[5])
    a = {k: v for k, v in a.items() if keep.search(k)}
    b = {k: v for k, v in b.items() if keep.search(k)}
if sorted(a) != sorted(b) or not a:
    sys.exit(f"FAIL {name}: the two files hold different tensors")
worst, where = 0.0, ""
for k in a:
    if len(a[k]) != len(b[k]):
        sys.exit(f"FAIL {name}: {k} has {len(a[k])} and {len(b[k])} elements")
    scale = max(max(abs(x) for x in a[k]), 1e-12)
    d = max(abs(x - y) for x, y in zip(a[k], b[k])) / scale
    if d != d or d > worst:
        worst, where = d, k
if worst <= tol:
    print(f"PASS {name} (worst tensor {where}: max difference {worst:.2e} of its largest weight; tolerance {tol:g})")
else:
    print(f"FAIL {name}: tensor {where} differs by {worst:.3g} of its largest weight (tolerance {tol:g})")
    sys.exit(1)
