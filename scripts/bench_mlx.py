"""Overhead of the MLX bridge on the CPU: torch.ops.mpq.matmul routed through
MLX (mpq_ops.mlx_bridge.use_mlx_on_cpu) against mx.quantized_matmul called
directly on the same MLX arrays (float32, what the bridge feeds MLX's CPU
kernel). Both bridges: the C++ one (mpq_ops._mlx), under
torch.inference_mode() as inference runs (entered once around the timing
loop, as an inference loop enters it once: entering it costs ~16 us of Python
per `with`, which is not the bridge's) and with autograd on (the op's autograd
kernel, in Python, then runs first), and the Python one. The native C++ CPU
kernel is timed alongside for reference, and so is the direct call with a
new MLX array of x made per call (from numpy), as an application calling MLX
itself makes one; the bridge, too, hands MLX a new array each time. Median of many runs, each bridge
interleaved with the direct call in the same mode (in turn first and second);
JSON + a printed table.

    python scripts/bench_mlx.py --out bench_mlx.json [--shapes 4096x32 --ms 1]
"""
import argparse
import json
import statistics
import time

import mlx.core as mx
import torch

import mpq_ops  # noqa: F401
from mpq_ops import mlx_bridge
from mpq_ops.quantize import quantize_rtn

# (4096, 32) has almost no arithmetic: it shows the bridge's fixed cost per call.
SHAPES = [(4096, 32), (4096, 4096), (4096, 14336)]
MS = [1, 16, 256]


def median_us(fns, budget_s=3.0):
    """Median time of each function, the functions run in turn (so that drift
    of a busy machine hits them alike): as many rounds as fit, 5 to 2000."""
    for fn in fns:
        fn()
    t = time.perf_counter()
    for fn in fns:
        fn()
    once = time.perf_counter() - t
    rounds = int(min(2000, max(5, budget_s / max(once, 1e-6))))
    times = [[] for _ in fns]
    order = list(zip(fns, times))
    for r in range(rounds):
        # Each round reverses the order of the last: a call's time depends on
        # what ran just before it (MLX's worker thread may still be awake, or
        # busy freeing the previous call's arrays), so no function always
        # follows the same one.
        for fn, ts in (order if r % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e6 for ts in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_mlx.json")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x32 (K x N)")
    ap.add_argument("--ms", default=None, help="e.g. 1,16 (rows of x)")
    args = ap.parse_args()
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    ms = [int(m) for m in args.ms.split(",")] if args.ms else MS
    torch.manual_seed(0)
    rows = []
    for K, N in shapes:
        qw = quantize_rtn(torch.randn(N, K) * 0.02, 4, 64, dtype=torch.float32)
        w_q, s, b = mlx_bridge.weight_arrays(qw.qweight, qw.scales, qw.zeros, torch.float32)
        for M in ms:
            x = torch.randn(M, K)
            xa = mx.array(x.numpy())

            def direct():
                mx.eval(mx.quantized_matmul(xa, w_q, s, b, transpose=True, group_size=64, bits=4))

            # The direct call as an application makes it: a new MLX array of x
            # per call (the bridge, too, hands MLX a new array every time).
            def direct_new_x():
                mx.eval(mx.quantized_matmul(mx.array(x.numpy()), w_q, s, b, transpose=True,
                                            group_size=64, bits=4))

            def bridge():
                torch.ops.mpq.matmul(x, qw.qweight, qw.scales, qw.zeros, 4, 64)

            has_cpp = mlx_bridge.cpp_bridge()
            nan = float("nan")
            direct_us = cpp_us = direct_grad_us = cpp_grad_us = new_x_us = nan
            if has_cpp:
                mlx_bridge.set_cpu_backend("mlx", "cpp")
                with torch.inference_mode():
                    direct_us, cpp_us, new_x_us = median_us([direct, bridge, direct_new_x])
                direct_grad_us, cpp_grad_us = median_us([direct, bridge])
            else:
                (direct_us,) = median_us([direct])
            mlx_bridge.set_cpu_backend("mlx", "python")
            direct_py_us, python_us = median_us([direct, bridge])
            mlx_bridge.set_cpu_backend("native")
            (native_us,) = median_us([bridge])  # the C++ CPU kernel, for reference
            row = {"K": K, "N": N, "M": M, "mlx_direct_us": direct_us,
                   "cpp_bridge_us": cpp_us, "cpp_overhead_us": cpp_us - direct_us,
                   "cpp_overhead_pct": 100 * (cpp_us / direct_us - 1),
                   "mlx_direct_new_x_us": new_x_us,
                   "mlx_direct_grad_mode_us": direct_grad_us,
                   "cpp_bridge_grad_mode_us": cpp_grad_us,
                   "cpp_grad_mode_overhead_us": cpp_grad_us - direct_grad_us,
                   "python_bridge_us": python_us, "python_overhead_us": python_us - direct_py_us,
                   "native_cpu_us": native_us}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    print("\nMLX bridge on the CPU (float32; median us). 'overhead': the bridge's time minus "
          "that of mx.quantized_matmul on the same arrays, timed alongside it in the same mode")
    print(f"{'K':>6} {'N':>6} {'M':>4} | {'mx direct':>10} {'new x':>10} | "
          f"{'C++ bridge':>10} {'overhead':>9} "
          f"{'%':>6} | {'grad on':>10} {'overhead':>9} | {'Py bridge':>10} {'overhead':>9} | "
          f"{'native':>9}")
    for r in rows:
        print(f"{r['K']:>6} {r['N']:>6} {r['M']:>4} | {r['mlx_direct_us']:10.1f} "
              f"{r['mlx_direct_new_x_us']:10.1f} | "
              f"{r['cpp_bridge_us']:10.1f} {r['cpp_overhead_us']:9.1f} {r['cpp_overhead_pct']:6.1f} | "
              f"{r['cpp_bridge_grad_mode_us']:10.1f} {r['cpp_grad_mode_overhead_us']:9.1f} | "
              f"{r['python_bridge_us']:10.1f} {r['python_overhead_us']:9.1f} | "
              f"{r['native_cpu_us']:9.1f}")


if __name__ == "__main__":
    main()
