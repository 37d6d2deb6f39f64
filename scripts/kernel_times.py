"""Where an op's time goes on the GPU: each kernel's own time inside one call
of mpq::matmul (and of cuBLAS fp16 F.linear alongside), against the interval
that do_bench would time around the call, under the same L2 flush.

    python scripts/kernel_times.py [--shapes 8192x28672] [--ms 1,16] [--bits 4] [--out t.json]

The interval is the median of CUDA events recorded around each call after a
256 MB zero-fill (do_bench's flush); the kernels' times come from the PyTorch
profiler (CUPTI) over the same calls, averaged per kernel. A kernel launched
programmatically after the one before (the split sums' kernel on Hopper)
starts early and waits, so its time includes that wait and overlaps the
kernel before it; the main kernel's time is the one to read against the
interval."""
import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpq_ops  # noqa: E402,F401  (registers the ops)
from helpers import make_weight  # noqa: E402
from shape_args import add_shape_args, chosen_shapes  # noqa: E402

CALLS = 30


def kernel_times(fn, flush):
    """(median event interval, {kernel name: (mean time, launches per call)}), us."""
    for _ in range(5):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(CALLS)]
    # (one cycle per profiler; acc_events only keeps its warning quiet)
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
    interval = sorted(s.elapsed_time(e) * 1e3 for s, e in events)[CALLS // 2]
    kernels = {}
    for evt in prof.key_averages():
        name = evt.key
        # (the flush's fill kernel is not part of the call)
        if evt.device_type != torch.autograd.DeviceType.CUDA or "fill" in name.lower() \
                or "FillFunctor" in name:
            continue
        kernels[name] = (evt.device_time_total / max(evt.count, 1), evt.count / CALLS)
    return interval, kernels


def main():
    ap = argparse.ArgumentParser()
    add_shape_args(ap, "8192x28672,28672x8192")
    ap.add_argument("--bits", default="4", help="code widths, e.g. 2,4,8")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes, ms = chosen_shapes(args, [(8192, 28672), (28672, 8192)], [1, 16])
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    rows = []
    print(f"device: {torch.cuda.get_device_name()}; us per call; kernel names cut at 70")
    for K, N in shapes:
        wt = torch.randn(N, K, device="cuda", dtype=torch.float16)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            fns = {"fp16": lambda: torch.nn.functional.linear(x, wt)}
            for b in (int(v) for v in args.bits.split(",")):
                qw, sc, ze = make_weight(N, K, b, args.group_size, torch.float16, "cuda")
                fns[f"w{b}"] = (lambda qw=qw, sc=sc, ze=ze, b=b: torch.ops.mpq.matmul(
                    x, qw, sc, ze, b, args.group_size, None, None))
            for name, fn in fns.items():
                interval, kernels = kernel_times(fn, flush)
                rows.append({"K": K, "N": N, "M": M, "op": name, "interval_us": interval,
                             "kernels": {k: {"us": t, "per_call": c}
                                         for k, (t, c) in kernels.items()}})
                print(f"{K:>6} x {N:<6} M={M:<4} {name:>5}: interval {interval:7.1f}", flush=True)
                for k, (t, c) in kernels.items():
                    print(f"{'':30}{t:7.1f}  x{c:.0f}  {k[:70]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
