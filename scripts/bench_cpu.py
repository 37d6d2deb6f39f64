"""mpq::matmul on the CPU against the anchors, in one run: float32 F.linear on
the unquantized weight (what the quantized layer replaces), and a pure-PyTorch
dequantize + F.linear (what the op would be without its kernel). Our kernel
is timed in its AVX2 build and its baseline build (MPQ_OPS_CPU_ISA=baseline)
where the CPU has AVX2. The caches are flushed before every call (a 64 MB
buffer read), so the weights come from memory as in a model too large for
the caches; median of many runs, the functions interleaved; JSON + a printed
table.

    python scripts/bench_cpu.py --out bench_cpu.json [--shapes 4096x4096 --ms 1,16 --bits 4]
        [--groups 32,64] [--threads 1]
"""
import argparse
import json
import os
import platform
import statistics

import torch
import torch.nn.functional as F

import mpq_ops  # noqa: F401
from mpq_ops.quantize import quantize_rtn

import timing
from shape_args import add_shape_args, chosen_shapes

# (K, N): a 7B-class projection and SmolLM2-135M's MLP projection.
SHAPES = [(4096, 4096), (576, 1536)]
MS = [1, 4, 16, 64, 256]
BITS = [2, 4, 8]
GROUP = 64

_flush = torch.ones(16 * 1024 * 1024, dtype=torch.float32)  # written once: pages of its own


def flush():
    # Read, not written: written lines would be written back to memory inside
    # the next timed call.
    _flush.sum()


def median_us(fns, budget_s):
    """Median time (us) of each function, each call after a cache flush, as
    many rounds as fit in the budget (5 to 500)."""
    return [statistics.median(ts) * 1e6
            for ts in timing.timed_rounds(fns, budget_s, max_rounds=500, before=flush)]


def add_run_args(ap, budget_s):
    """--threads and --budget (seconds per row), which the CPU benchmarks share."""
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's, the cores)")
    ap.add_argument("--budget", type=float, default=budget_s, help="seconds per row")


def set_threads(args):
    if args.threads:
        torch.set_num_threads(args.threads)


def isa(name, fn):
    """fn run with the kernel's ISA forced (the variable is read per call)."""
    def run():
        if name == "baseline":
            os.environ["MPQ_OPS_CPU_ISA"] = "baseline"
        try:
            return fn()
        finally:
            os.environ.pop("MPQ_OPS_CPU_ISA", None)
    return run


def cpu_info():
    """(model name, whether the CPU has AVX2, FMA and F16C: the AVX2 build's
    needs) from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), set()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return name, {"avx2", "fma", "f16c"} <= flags


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_cpu.json")
    add_shape_args(ap, "4096x4096")
    ap.add_argument("--bits", default=",".join(map(str, BITS)))
    ap.add_argument("--groups", default=str(GROUP), help="group sizes, comma-separated")
    add_run_args(ap, budget_s=1.5)
    args = ap.parse_args()
    set_threads(args)
    shapes, ms = chosen_shapes(args, SHAPES, MS)
    bits = [int(v) for v in args.bits.split(",")]
    groups = [int(v) for v in args.groups.split(",")]
    cpu, avx2 = cpu_info()

    torch.manual_seed(0)
    rows = []
    print(f"CPU: {cpu}, threads {torch.get_num_threads()},"
          f" torch {torch.__version__}, AVX2 {avx2}; x float32, median us")
    head = (f"{'K':>6} {'N':>6} {'w':>2} {'g':>4} {'M':>4} {'fp32':>9} {'deq+mm':>9} {'mpq':>9}"
            f" {'mpq-base':>9} {'vs fp32':>8} {'vs deq':>7}")
    print(head)
    for K, N in shapes:
        lin = torch.randn(N, K) / K ** 0.5
        # group sizes that do not divide K are left out for that shape
        for w_bit, gs in [(w, g) for w in bits for g in groups if g == -1 or K % g == 0]:
            qw, s, z = quantize_rtn(lin, w_bit, gs)[:3]
            for M in ms:
                x = torch.randn(M, K)

                def fp32():
                    return F.linear(x, lin)

                def deq_mm():
                    w = torch.ops.mpq.dequantize(qw, s, z, w_bit, gs)
                    return F.linear(x, w)

                def mpq():
                    return torch.ops.mpq.matmul(x, qw, s, z, w_bit, gs)

                fns = [fp32, deq_mm, mpq] + ([isa("baseline", mpq)] if avx2 else [])
                with torch.inference_mode():
                    t = median_us(fns, args.budget)
                row = {"K": K, "N": N, "w_bit": w_bit, "group_size": gs, "M": M,
                       "fp32_linear_us": t[0], "dequant_linear_us": t[1], "mpq_us": t[2],
                       "mpq_baseline_us": t[3] if avx2 else None}
                rows.append(row)
                base = f"{t[3]:9.1f}" if avx2 else f"{'-':>9}"
                print(f"{K:>6} {N:>6} {w_bit:>2} {gs:>4} {M:>4} {t[0]:9.1f} {t[1]:9.1f} {t[2]:9.1f}"
                      f" {base} {t[0] / t[2]:7.2f}x {t[1] / t[2]:6.2f}x", flush=True)
    meta = {"cpu": cpu, "avx2": avx2,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
