"""mpq::matmul on one cell, a few times, for a profiler to wrap (Nsight
Compute picks the launches: scripts/ncu_profile.sh). Between calls the L2 is
flushed as do_bench flushes it (a 256 MB zero-fill), so the profiled call
reads its weights from DRAM as the benchmark's do.

    python scripts/run_cell.py fp16,4,128,8192,28672,16 [--calls 4]

A cell is dtype, w_bit, group_size, K, N, M (as scripts/cells.py reads
it). Environment switches (MPQ_OPS_CUDA_KERNEL=...) apply. --dense calls cuBLAS's
F.linear on the dequantized weight instead (the anchor, profiled the same way).

    python scripts/run_cell.py fp16,4,128,14336,4096,4096 --dense"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import mpq_ops  # noqa: E402,F401  (registers the ops)
from cells import cell_calls, make_cell  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cell")
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--dense", action="store_true", help="F.linear on the dequantized weight")
    args = ap.parse_args()
    mpq, dense = cell_calls(*make_cell(args.cell), dense=args.dense)
    call = dense if args.dense else mpq
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(args.calls):
        flush.zero_()
        call()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
