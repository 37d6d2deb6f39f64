"""Eager cost per call of small layers, where a batch-1 decode of a small
model is bound by the host: MPQLinear against nn.Linear on SmolLM2-135M's
layer shapes (K x N), M = 1, under torch.no_grad() as generation runs
(float16 on CUDA, float32 on the CPU). For each layer: 'eager', the time per
call of many calls issued back to back (the host's cost or the device's,
whichever is larger, as in a decode loop); 'op', the same for
torch.ops.mpq.matmul called directly (no module; its autograd kernel runs under
no_grad, which the layer steps past); on CUDA also 'graph', the time per call
replayed from a CUDA graph of the same calls (the GPU's alone: the mean over
20 replays of 50 calls), and the kernels one call launches (torch.profiler).
L2 is not flushed: these layers' weights (0.1-1 MB) stay in it between calls,
so 'graph' is the kernels' time on cached weights and launch gaps, not a
memory-bound figure (scripts/bench.py is that). Eager columns: medians of
rounds in which the layers take turns. JSON + a printed table.

    python scripts/bench_overhead.py --out overhead.json [--rounds 7] [--device cpu] \\
        [--dtype bf16] [--bias]

--dtype sets x's dtype (and the float layer's), --bias gives every layer a bias.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import mpq_ops  # noqa: E402,F401  (registers the ops)
from helpers import launched_kernels  # noqa: E402
from mpq_ops import MPQLinear  # noqa: E402
from timing import graph_of, replay_us  # noqa: E402

# SmolLM2-135M: q/o, k/v, gate/up, down.
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
CONFIGS = [("float", None, None), ("w4 g32", 4, 32), ("w4 g64", 4, 64), ("w8 g64", 8, 64)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def per_call(fn, calls, device):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t) / calls * 1e6


def graph_per_call(fn, calls, replays=20):
    def many():
        for _ in range(calls):
            fn()
    return replay_us(graph_of(many), replays) / calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="overhead.json")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="x's dtype (default: fp16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--bias", action="store_true", help="layers with a bias")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = args.device
    cuda = dev == "cuda"
    dtype_name = args.dtype or ("fp16" if cuda else "fp32")
    dtype = DTYPES[dtype_name]
    rows = []
    device_name = (torch.cuda.get_device_name() if cuda
                   else f"CPU, {torch.get_num_threads()} threads")
    print(f"device: {device_name}; M = 1, {str(dtype)[6:]} x"
          f"{', with bias' if args.bias else ''}; us per call")
    print(f"| {'K x N':>10} | {'layer':>8} | {'eager':>6} | {'op':>6} | {'graph':>6} | kernels |")
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 9}|")
    with torch.no_grad():
        for K, N in SHAPES:
            lin = nn.Linear(K, N, bias=args.bias, dtype=dtype, device=dev)
            x = torch.randn(1, K, dtype=dtype, device=dev)
            layers = []
            for name, w_bit, gs in CONFIGS:
                if w_bit is None:
                    layers.append((dtype_name, lin, None))
                    continue
                q = MPQLinear.from_linear(lin, w_bit, gs)
                args_ = (x, q.qweight, q.scales, q.zeros, w_bit, q.group_size_arg(), None, q.bias)
                layers.append((name, q, lambda a=args_: torch.ops.mpq.matmul(*a)))
            eager = {name: [] for name, _, _ in layers}
            op = {name: [] for name, _, _ in layers}
            for r in range(args.rounds):
                for name, layer, direct in (layers if r % 2 == 0 else layers[::-1]):
                    eager[name].append(per_call(lambda: layer(x), args.calls, dev))
                    if direct is not None:
                        op[name].append(per_call(direct, args.calls, dev))
            for name, layer, direct in layers:
                row = {"K": K, "N": N, "layer": name,
                       "eager_us": statistics.median(eager[name]),
                       "op_us": statistics.median(op[name]) if op[name] else None,
                       "graph_us": graph_per_call(lambda: layer(x), 50) if cuda else None,
                       "kernels": len(launched_kernels(lambda: layer(x))) if cuda else None}
                rows.append(row)
                op_s = f"{row['op_us']:6.1f}" if row["op_us"] is not None else f"{'':>6}"
                graph_s = f"{row['graph_us']:6.1f}" if cuda else f"{'':>6}"
                kernels_s = f"{row['kernels']:7d}" if cuda else f"{'':>7}"
                print(f"| {f'{K} x {N}':>10} | {name:>8} | {row['eager_us']:6.1f} | {op_s} | "
                      f"{graph_s} | {kernels_s} |", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
