"""mpq::matmul with 4-bit codes at group sizes 32, 64, 128 and per row, side by
side with cuBLAS fp16 F.linear, in one run on the GPU: the cost of finer groups
(more scales and zeros to read and apply) at each M. Times are medians of
triton.testing.do_bench (L2 flushed between runs); %floor = the kernel's
compulsory bytes (codes, scales, zeros, x, y) over the measured copy bandwidth,
against its time.

    python scripts/bench_groups.py --out bench_groups.json [--shapes 8192x28672] [--ms 16,64]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import bench, copy_bandwidth, packed_bytes  # noqa: E402
from shape_args import add_shape_args, chosen_shapes  # noqa: E402

import mpq_ops  # noqa: E402,F401
from mpq_ops.quantize import quantize_rtn  # noqa: E402

SHAPES = [(4096, 14336), (8192, 28672), (28672, 8192)]
MS = [1, 16, 64, 256, 1024]
GROUPS = [32, 64, 128, -1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_groups.json")
    add_shape_args(ap, "8192x28672,4096x4096")
    args = ap.parse_args()
    shapes, ms = chosen_shapes(args, SHAPES, MS)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s",
          flush=True)
    rows = []
    for K, N in shapes:
        lin_w = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
        weights = {g: quantize_rtn(lin_w, 4, g) for g in GROUPS}
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            row = {"K": K, "N": N, "M": M, "fp16_us": bench(lambda: F.linear(x, lin_w))}
            for g, qw in weights.items():
                row[f"g{g}_us"] = bench(
                    lambda: torch.ops.mpq.matmul(x, qw.qweight, qw.scales, qw.zeros, 4, g))
                row[f"g{g}_floor_us"] = (packed_bytes(qw) + 2 * M * (K + N)) / bw * 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": rows}, f,
                  indent=1)
    print(f"\nw4, fp16 x, us (%floor, x fp16); copy {bw / 1e12:.2f} TB/s")
    names = [f"g{g}" if g > 0 else "per row" for g in GROUPS]
    print(f"{'K x N':>11} {'M':>5} {'fp16':>7} " + " ".join(f"{n:>21}" for n in names))
    for r in rows:
        cells = []
        for g in GROUPS:
            t = r[f"g{g}_us"]
            cells.append(f"{t:7.1f} ({100 * r[f'g{g}_floor_us'] / t:3.0f}%, "
                         f"{r['fp16_us'] / t:4.2f}x)")
        print(f"{r['K']:>5}x{r['N']:<5} {r['M']:>5} {r['fp16_us']:7.1f} " + " ".join(
            f"{c:>21}" for c in cells))


if __name__ == "__main__":
    main()
