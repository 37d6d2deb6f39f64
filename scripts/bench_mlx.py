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
itself makes one; the bridge, too, hands MLX a new array each time. Median of
many runs, each bridge interleaved with the direct call in the same mode (in
turn first and second); a bridge's overhead is the median over rounds of its
time minus the direct call's in the same round. The bridge's MLX weight
arrays are its own copies, so the table also gives the same difference for
the direct call on a second copy of the weight arrays ('copies'): how much
where the buffers lie moves a call that reads them, the resolution of the
overhead on shapes whose call takes milliseconds. JSON + a printed table.

    python scripts/bench_mlx.py --out bench_mlx.json [--shapes 4096x32 --ms 1]
"""
import argparse
import json
import statistics

import mlx.core as mx
import torch

import mpq_ops  # noqa: F401
from mpq_ops import mlx_bridge
from mpq_ops.quantize import quantize_rtn

import timing
from shape_args import add_shape_args, chosen_shapes

# (4096, 32) has almost no arithmetic: it shows the bridge's fixed cost per call.
SHAPES = [(4096, 32), (4096, 4096), (4096, 14336)]
MS = [1, 16, 256]


def timed_rounds(fns, budget_s=3.0):
    """Each function's time (s) in every round: 5 to 2000 rounds."""
    return timing.timed_rounds(fns, budget_s, max_rounds=2000)


def median_us(times):
    return statistics.median(times) * 1e6


def overhead_us(times, base):
    """Median over rounds of times[i] - base[i] (us)."""
    return statistics.median(t - b for t, b in zip(times, base)) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_mlx.json")
    add_shape_args(ap, "4096x32")
    args = ap.parse_args()
    shapes, ms = chosen_shapes(args, SHAPES, MS)
    torch.manual_seed(0)
    rows = []
    for K, N in shapes:
        qw = quantize_rtn(torch.randn(N, K) * 0.02, 4, 64, dtype=torch.float32)
        w_q, s, b = mlx_bridge.weight_arrays(qw.qweight, qw.scales, qw.zeros, torch.float32)
        copies = [mx.array(a) + 0 for a in (w_q, s, b)]  # new buffers, same values
        mx.eval(*copies)
        for M in ms:
            x = torch.randn(M, K)
            xa = mx.array(x.numpy())

            def direct():
                mx.eval(mx.quantized_matmul(xa, w_q, s, b, transpose=True, group_size=64, bits=4))

            # The direct call as an application makes it: a new MLX array of x
            # per call (the bridge, too, hands MLX a new array every time).
            def direct_copies():
                mx.eval(mx.quantized_matmul(xa, *copies, transpose=True, group_size=64, bits=4))

            def direct_new_x():
                mx.eval(mx.quantized_matmul(mx.array(x.numpy()), w_q, s, b, transpose=True,
                                            group_size=64, bits=4))

            def bridge():
                torch.ops.mpq.matmul(x, qw.qweight, qw.scales, qw.zeros, 4, 64)

            has_cpp = mlx_bridge.cpp_bridge()
            nan = float("nan")
            direct_us = cpp_us = direct_grad_us = cpp_grad_us = new_x_us = nan
            cpp_over = cpp_grad_over = copies_over = nan
            if has_cpp:
                mlx_bridge.set_cpu_backend("mlx", "cpp")
                with torch.inference_mode():
                    t_direct, t_cpp, t_new_x, t_copies = timed_rounds(
                        [direct, bridge, direct_new_x, direct_copies])
                copies_over = overhead_us(t_copies, t_direct)
                direct_us, cpp_us, new_x_us = map(median_us, (t_direct, t_cpp, t_new_x))
                cpp_over = overhead_us(t_cpp, t_direct)
                t_direct_grad, t_cpp_grad = timed_rounds([direct, bridge])
                direct_grad_us, cpp_grad_us = map(median_us, (t_direct_grad, t_cpp_grad))
                cpp_grad_over = overhead_us(t_cpp_grad, t_direct_grad)
            else:
                direct_us = median_us(timed_rounds([direct])[0])
            mlx_bridge.set_cpu_backend("mlx", "python")
            t_direct_py, t_python = timed_rounds([direct, bridge])
            python_us = median_us(t_python)
            mlx_bridge.set_cpu_backend("native")
            native_us = median_us(timed_rounds([bridge])[0])  # the C++ CPU kernel, for reference
            row = {"K": K, "N": N, "M": M, "mlx_direct_us": direct_us,
                   "cpp_bridge_us": cpp_us, "cpp_overhead_us": cpp_over,
                   "cpp_overhead_pct": 100 * cpp_over / direct_us,
                   "mlx_direct_new_x_us": new_x_us,
                   "direct_on_copies_minus_direct_us": copies_over,
                   "mlx_direct_grad_mode_us": direct_grad_us,
                   "cpp_bridge_grad_mode_us": cpp_grad_us,
                   "cpp_grad_mode_overhead_us": cpp_grad_over,
                   "python_bridge_us": python_us,
                   "python_overhead_us": overhead_us(t_python, t_direct_py),
                   "native_cpu_us": native_us}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    print("\nMLX bridge on the CPU (float32; median us). 'overhead': the median over rounds of "
          "the bridge's time minus that of mx.quantized_matmul on the same arrays in the same "
          "round, in the same mode")
    print(f"{'K':>6} {'N':>6} {'M':>4} | {'mx direct':>10} {'new x':>10} {'copies':>8} | "
          f"{'C++ bridge':>10} {'overhead':>9} "
          f"{'%':>6} | {'grad on':>10} {'overhead':>9} | {'Py bridge':>10} {'overhead':>9} | "
          f"{'native':>9}")
    for r in rows:
        print(f"{r['K']:>6} {r['N']:>6} {r['M']:>4} | {r['mlx_direct_us']:10.1f} "
              f"{r['mlx_direct_new_x_us']:10.1f} "
              f"{r['direct_on_copies_minus_direct_us']:8.1f} | "
              f"{r['cpp_bridge_us']:10.1f} {r['cpp_overhead_us']:9.1f} "
              f"{r['cpp_overhead_pct']:6.1f} | "
              f"{r['cpp_bridge_grad_mode_us']:10.1f} {r['cpp_grad_mode_overhead_us']:9.1f} | "
              f"{r['python_bridge_us']:10.1f} {r['python_overhead_us']:9.1f} | "
              f"{r['native_cpu_us']:9.1f}")


if __name__ == "__main__":
    main()
