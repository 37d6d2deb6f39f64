"""Overhead of the MLX bridge on the CPU: torch.ops.mpq.matmul routed through
MLX (mpq_ops.mlx_bridge.use_mlx_on_cpu) against mx.quantized_matmul called
directly on the same MLX arrays (float32, what the bridge feeds MLX's CPU
kernel). Both bridges: the C++ one (mpq_ops._mlx), called under
torch.inference_mode() as inference runs and with autograd on (the op's
autograd kernel, in Python, then runs first), and the Python one. The native
C++ CPU kernel is timed alongside for reference. Median of many runs, the
contenders interleaved; JSON + a printed table.

    python scripts/bench_mlx.py --out bench_mlx.json
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
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e6 for ts in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_mlx.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for K, N in SHAPES:
        qw = quantize_rtn(torch.randn(N, K) * 0.02, 4, 64, dtype=torch.float32)
        w_q, s, b = mlx_bridge.weight_arrays(qw.qweight, qw.scales, qw.zeros, torch.float32)
        for M in MS:
            x = torch.randn(M, K)
            xa = mx.array(x.numpy())

            def direct():
                mx.eval(mx.quantized_matmul(xa, w_q, s, b, transpose=True, group_size=64, bits=4))

            def bridge():
                torch.ops.mpq.matmul(x, qw.qweight, qw.scales, qw.zeros, 4, 64)

            def bridge_inference():
                with torch.inference_mode():
                    torch.ops.mpq.matmul(x, qw.qweight, qw.scales, qw.zeros, 4, 64)

            has_cpp = mlx_bridge.cpp_bridge()
            mlx_bridge.set_cpu_backend("mlx", "cpp" if has_cpp else "python")
            fns = [direct, bridge_inference, bridge] if has_cpp else [direct]
            times = median_us(fns)
            mlx_bridge.set_cpu_backend("mlx", "python")
            (python_us,) = median_us([bridge])
            mlx_bridge.set_cpu_backend("native")
            (native_us,) = median_us([bridge])  # the C++ CPU kernel, for reference
            direct_us = times[0]
            cpp_us, cpp_grad_us = (times[1], times[2]) if has_cpp else (float("nan"),) * 2
            row = {"K": K, "N": N, "M": M, "mlx_direct_us": direct_us,
                   "cpp_bridge_us": cpp_us, "cpp_overhead_us": cpp_us - direct_us,
                   "cpp_overhead_pct": 100 * (cpp_us / direct_us - 1),
                   "cpp_bridge_grad_mode_us": cpp_grad_us,
                   "python_bridge_us": python_us, "python_overhead_us": python_us - direct_us,
                   "native_cpu_us": native_us}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    print("\nMLX bridge on the CPU (float32; median us). C++ bridge under inference_mode; "
          "'grad on': the same with autograd enabled")
    print(f"{'K':>6} {'N':>6} {'M':>4} | {'mx direct':>10} | {'C++ bridge':>10} {'overhead':>9} "
          f"{'%':>6} | {'grad on':>10} | {'Py bridge':>10} {'overhead':>9} | {'native':>9}")
    for r in rows:
        print(f"{r['K']:>6} {r['N']:>6} {r['M']:>4} | {r['mlx_direct_us']:10.1f} | "
              f"{r['cpp_bridge_us']:10.1f} {r['cpp_overhead_us']:9.1f} {r['cpp_overhead_pct']:6.1f} | "
              f"{r['cpp_bridge_grad_mode_us']:10.1f} | {r['python_bridge_us']:10.1f} "
              f"{r['python_overhead_us']:9.1f} | {r['native_cpu_us']:9.1f}")

if __name__ == "__main__":
    main()
