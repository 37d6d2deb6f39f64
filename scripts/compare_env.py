"""mpq::matmul timed under several settings of the environment, side by side:
the CUDA paths forced (MPQ_OPS_CUDA_KERNEL=gemv|gemm|sm90|dequantize), split
sums through the workspace (MPQ_OPS_CUDA_SPLIT_SUM=workspace), or any switch a
build reads per call. Each cell runs `--rounds` rounds; a round times every
setting once (do_bench median, L2 flushed), alternating the order from round
to round so that drift hits all alike; each setting's result is checked
against the float64 reference once, its output allocated over a NaN-filled
block (error in ppm of the output's norm; nan where the output is not
finite, as an ablation's that leaves outputs unwritten is). --clean-l2 times
with L2 emptied by a read before each run (bench_clean_l2) instead of
do_bench's zero-fill, whose dirty lines are written back inside the timed call.

    python scripts/compare_env.py --settings 'policy:;staged:MPQ_OPS_CUDA_KERNEL=gemm' \\
        --cells 'fp16,4,128,8192,28672,16;bf16,4,128,28672,8192,16' [--rounds 3] [--out c.json] \\
        [--clean-l2]

A cell is dtype (fp16 / bf16 / fp32), w_bit, group_size, K, N, M; a setting is
name:VAR=value,-VAR2 (-VAR2 unsets VAR2; none: the environment as it is).
--dense times cuBLAS's F.linear on the dequantized weight in every round too
(column `dense`), so that ratios to the anchor come from the same rounds;
--random the same on a random normal weight (x 0.02, column `random`), bench.py's
anchor: cuBLAS's time may depend on the values it multiplies."""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import mpq_ops  # noqa: E402,F401  (registers the ops)
from bench import bench, bench_clean_l2  # noqa: E402
from cells import cell_calls, make_cell  # noqa: E402
from helpers import poison_allocator, ref_matmul, rel_err  # noqa: E402
from shape_args import parse_settings, with_env  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", required=True)
    ap.add_argument("--cells", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--clean-l2", action="store_true",
                    help="L2 emptied by a read before each run instead of do_bench's zero-fill")
    ap.add_argument("--dense", action="store_true",
                    help="time F.linear on the dequantized weight as well (column dense)")
    ap.add_argument("--random", action="store_true",
                    help="time F.linear on a random normal weight as well (column random)")
    args = ap.parse_args()
    settings = parse_settings(args.settings)
    for flag in ("dense", "random"):
        if getattr(args, flag):
            if any(name == flag for name, _ in settings):
                raise SystemExit(f"--settings: `{flag}` names the --{flag} column")
            settings.append((flag, {}))
    timer = bench_clean_l2 if args.clean_l2 else bench
    rows = []
    flush = "L2 emptied by a read" if args.clean_l2 else "do_bench, L2 flushed by a write"
    print(f"device: {torch.cuda.get_device_name()}; {flush}; us (error against float64, ppm)")
    for cell in args.cells.split(";"):
        x, qw, sc, ze, w, g = make_cell(cell)
        ref = ref_matmul(x, qw, sc, ze, w, g)

        call, dense_call = cell_calls(x, qw, sc, ze, w, g, dense=args.dense)
        # The anchor columns' calls, and the references of those whose weight
        # is not the cell's (the others are checked against `ref`).
        calls = {"dense": dense_call} if args.dense else {}
        refs = {}
        if args.random:
            random_weight = torch.randn(qw.shape[0], x.shape[1], device=x.device,
                                        dtype=x.dtype) * 0.02
            calls["random"] = lambda: torch.nn.functional.linear(x, random_weight)
            refs["random"] = x.double() @ random_weight.double().T  # float64, on x's device
        times = {name: [] for name, _ in settings}
        errors = {}
        for r in range(args.rounds):
            for name, env in settings if r % 2 == 0 else settings[::-1]:
                def run(name=name):
                    fn = calls.get(name, call)
                    if name not in errors:
                        poison_allocator(x.shape[0] * qw.shape[0], x.dtype)
                        out = fn()
                        finite = bool(torch.isfinite(out).all())  # (an ablation's may not be)
                        expected = refs.get(name, ref)
                        errors[name] = rel_err(out, expected) * 1e6 if finite else float("nan")
                    times[name].append(timer(fn))
                with_env(env, run)
        dt, _, _, K, N, M = cell.split(",")
        row = {"cell": f"{dt} w{w} g{g} {K}x{N} M={M}"}
        for name, _ in settings:
            ts = sorted(times[name])
            row[name] = {"us": ts[len(ts) // 2], "rounds": times[name], "ppm": errors[name]}
        rows.append(row)
        print(f"{row['cell']:34}" + "".join(
            f"  {name} {row[name]['us']:7.1f} ({row[name]['ppm']:.0f})" for name, _ in settings),
            flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
