"""mpq::dequantize on the CPU against its anchors, in one run: the same
function in plain PyTorch ops (pack.unpack, then (q - z) * s in float32 per
group, cast to the scales' dtype: what the op would be without its kernel) and
a copy of the output's bytes (torch.clone of W: the memory traffic of writing
W once, reading it once). Our kernel is timed in its AVX2 build and its
baseline build (MPQ_OPS_CPU_ISA=baseline) where the CPU has them. Every call
writes a new output, as the op does; caches flushed before each call
(bench_cpu.flush); medians of many runs, the functions interleaved; JSON + a
printed table.

    python scripts/bench_cpu_dequantize.py --out bench_cpu_dequantize.json \\
        [--shapes 4096x4096,576x1536] [--bits 2,4,8] [--dtypes float16,bfloat16,float32]
"""
import argparse
import json

import torch

import mpq_ops  # noqa: F401
from mpq_ops.pack import unpack
from mpq_ops.quantize import quantize_rtn

from bench_cpu import add_run_args, cpu_info, isa, median_us, set_threads
from shape_args import add_shape_args, chosen_shapes

SHAPES = [(4096, 4096), (576, 1536)]
GROUP = 64


def torch_dequantize(qw, s, z, w_bit, gs):
    q = unpack(qw, w_bit).float()
    N, K = q.shape
    w = (q.view(N, K // gs, gs) - z.float().unsqueeze(-1)) * s.float().unsqueeze(-1)
    return w.view(N, K).to(s.dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_cpu_dequantize.json")
    add_shape_args(ap, "4096x4096")
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--dtypes", default="float16,bfloat16,float32", help="scales' dtype = W's")
    add_run_args(ap, budget_s=1.0)
    args = ap.parse_args()
    set_threads(args)
    shapes, _ = chosen_shapes(args, SHAPES, [])
    bits = [int(v) for v in args.bits.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    cpu, avx2 = cpu_info()
    torch.manual_seed(0)
    rows = []
    print(f"CPU: {cpu}, threads {torch.get_num_threads()}, torch {torch.__version__},"
          f" AVX2 {avx2}; g{GROUP}, median us, a new W per call")
    print(f"{'K':>6} {'N':>6} {'w':>2} {'dtype':>9} {'copy W':>9} {'torch':>9} {'mpq':>9}"
          f" {'mpq-base':>9} {'vs torch':>9} {'vs base':>8}")
    for K, N in shapes:
        lin = torch.randn(N, K) / K ** 0.5
        for w_bit in bits:
            qw, s32, z32 = quantize_rtn(lin, w_bit, GROUP)[:3]
            for dt in dtypes:
                s, z = s32.to(dt), z32.to(dt)
                ref = torch_dequantize(qw, s, z, w_bit, GROUP)
                got = torch.ops.mpq.dequantize(qw, s, z, w_bit, GROUP)
                torch.testing.assert_close(got, ref, rtol=0, atol=0)  # the same bits

                def mpq():
                    return torch.ops.mpq.dequantize(qw, s, z, w_bit, GROUP)

                fns = [lambda: ref.clone(), lambda: torch_dequantize(qw, s, z, w_bit, GROUP),
                       mpq] + ([isa("baseline", mpq)] if avx2 else [])
                with torch.inference_mode():
                    t = median_us(fns, args.budget)
                name = str(dt).removeprefix("torch.")
                row = {"K": K, "N": N, "w_bit": w_bit, "group_size": GROUP, "dtype": name,
                       "copy_us": t[0], "torch_us": t[1], "mpq_us": t[2],
                       "mpq_baseline_us": t[3] if avx2 else None}
                rows.append(row)
                base = f"{t[3]:9.1f}" if avx2 else f"{'-':>9}"
                vs_base = f"{t[3] / t[2]:7.2f}x" if avx2 else f"{'-':>8}"
                print(f"{K:>6} {N:>6} {w_bit:>2} {name:>9} {t[0]:9.1f} {t[1]:9.1f} {t[2]:9.1f}"
                      f" {base} {t[1] / t[2]:8.2f}x {vs_base}", flush=True)
    meta = {"cpu": cpu, "avx2": avx2, "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
