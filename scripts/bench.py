"""Benchmark of mpq::matmul on the GPU against the anchors, in one run.

For each (K, N) and M: cuBLAS fp16 F.linear, mpq w4 g128 (and w2/w8 at small
M, at every M with --all-widths), PyTorch's int4 kernel aten._weight_int4pack_mm (bf16, g128) and a
pure-PyTorch dequantize + matmul under torch.compile. Times are medians of
triton.testing.do_bench (L2 flushed between runs). "floor" is the kernel's
compulsory bytes (packed weights, scales, zeros, x, y) over the measured
device-to-device copy bandwidth; %floor = floor / time. At M = 1 each weight
format's bytes are also read by a plain streaming kernel under the same flush
("read"): what reading them costs here, where the write-back of the flush's
dirty lines lands inside every timed run (a reference, not a strict bound:
where the bytes fit L2 a kernel may come in under it).
--clean-l2 adds, for M <= 16, times with L2 emptied by a read instead
(bench_clean_l2), and at M = 1 the plain read so timed. For each (K, N) mpq::dequantize is timed too (w2/w4/w8
g128 to fp16, or --deq-dtype bf16/fp32): its bytes (codes, scales and zeros
read, the weight written) over the copy bandwidth, against its time.

--rounds R times fp16 and mpq::matmul in R rounds per cell, the order
reversed each round, and reports each one's median round: at many rows of x
both run at the board's power limit, and a single do_bench median catches
the power state the kernel timed before it left.

    python scripts/bench.py --out bench.json [--quick] [--clean-l2] [--all-widths] [--rounds 3]
"""
import argparse
import json
import os
import sys

# Inductor compiles in the calling process. With its pool of compile workers
# (started after the first compile) single cells of short kernels read 120-170
# us in two of three H100 runs (do_bench times from an event recorded before
# the host launches the op, so a host short of CPU shows up as GPU time); with
# one compile thread three runs had none, a fourth one cell 40% high (the
# anchors' "compiled" column stays the noisiest at small shapes).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

import mpq_ops  # noqa: F401
from mpq_ops.quantize import quantize_rtn
from shape_args import add_shape_args, chosen_shapes

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]
MS = [1, 16, 64, 256, 1024, 4096]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


def bench_rounds(fns, rounds, row=None):
    """{name: median over `rounds` rounds of bench(fn)}: each round times every
    function once, in the order given and then reversed from round to round,
    so that the power state one leaves the GPU in (at many rows of x the
    tensor cores run at the board's power limit) does not favour one of them.
    With `row`, each name's times per round go into row[name + "_rounds"]."""
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[name].append(bench(fns[name]))
    if row is not None and rounds > 1:
        for name, ts in times.items():
            row[f"{name}_rounds"] = ts
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def bench_clean_l2(fn, reps=200):
    """Median time (us) of fn with L2 emptied by a 256 MB read before each run.
    do_bench empties it by writing zeros, which leaves L2 full of dirty lines
    whose write-back to memory then lands inside the timed kernel; a read
    leaves clean lines, as a preceding kernel that reads weights would."""
    buf = torch.empty(2**26, dtype=torch.float32, device="cuda").uniform_()
    sink = torch.empty((), dtype=torch.float32, device="cuda")
    for _ in range(10):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        torch.sum(buf, 0, out=sink)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2] * 1e3


@triton.jit
def _read_kernel(src, out, n, BLOCK: tl.constexpr):
    # Each program reads BLOCK int32 words and writes their sum (so that the
    # loads stay). Of blocks of 1024 to 8192 words, 1 to 16 per program, 4 or 8
    # warps, this was the fastest on the H100: 52.6 us for 125 MB (2.38 TB/s)
    # under do_bench, 2.11 TB/s for torch.sum; a CUDA kernel with four 16-byte
    # loads in flight per thread read 117 MB at 2.49 TB/s after the same kind of
    # flush (2.83 TB/s after a flush by reading).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src + offs, mask=offs < n, other=0)
    tl.store(out + tl.program_id(0), tl.sum(v, axis=0))


def read_call(nbytes):
    """A plain streaming read of nbytes: one int32 buffer of that size, read
    once per call of the function returned."""
    n = (nbytes + 3) // 4
    src = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device="cuda")
    block = 1024
    grid = (triton.cdiv(n, block),)
    out = torch.empty(grid[0], dtype=torch.int32, device="cuda")
    return lambda: _read_kernel[grid](src, out, n, BLOCK=block, num_warps=4)


def read_us(nbytes, timer=bench):
    """Time (us; by `timer`, do_bench's by default) of read_call(nbytes)."""
    return timer(read_call(nbytes))


def copy_bandwidth():
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()  # 1 GiB
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (t * 1e-6)  # bytes read + written per second


def dequant_matmul_torch(x, qweight, scales, zeros, w_bit: int, group_size: int):
    """What a user without mpq_ops would write: unpack, dequantize, matmul."""
    shifts = torch.arange(0, 32, w_bit, device=qweight.device, dtype=torch.int32)
    q = (qweight.unsqueeze(-1) >> shifts) & ((1 << w_bit) - 1)
    N = qweight.shape[0]
    q = q.reshape(N, -1, group_size).to(x.dtype)
    W = ((q - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(N, -1)
    return x @ W.t()


def dequant_matmul_w4g128(x, qweight, scales, zeros):
    # Bit width and group size as constants, as in a user's model code.
    return dequant_matmul_torch(x, qweight, scales, zeros, 4, 128)


def int4pack_weights(N, K):
    w = torch.randint(0, 16, (N, K), dtype=torch.int32, device="cuda")
    w_u8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(w_u8, 8)
    sz = torch.rand(K // 128, N, 2, dtype=torch.bfloat16, device="cuda") * 0.01
    return packed, sz


def packed_bytes(qw, scale_bytes=2):
    """Bytes of a quantized weight as the kernels read it: codes, scales and zeros."""
    return qw.qweight.numel() * 4 + 2 * qw.scales.numel() * scale_bytes


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def dequantize_row(K, N, weights, bw, dtype=torch.float16):
    """mpq::dequantize of each width's weight (g128; output in the scales' dtype): time and
    floor (us)."""
    row = {"K": K, "N": N, "dtype": str(dtype).removeprefix("torch.")}
    esize = torch.empty(0, dtype=dtype).element_size()
    for b, qw in weights.items():
        args = (qw.qweight, qw.scales.to(dtype), qw.zeros.to(dtype), b, 128)
        row[f"w{b}_us"] = bench(lambda: torch.ops.mpq.dequantize(*args))
        nbytes = packed_bytes(qw, esize) + N * K * esize
        row[f"w{b}_floor_us"] = nbytes / bw * 1e6
    return row


def print_dequantize(rows):
    dt = rows[0]["dtype"] if rows else "float16"
    print(f"\nmpq::dequantize to {dt}, g128 (us; %floor = bytes read and written over the copy "
          "bandwidth / time)")
    print(f"{'K':>6} {'N':>6} | " + " | ".join(f"{'w' + str(b):>7} {'%fl':>4}" for b in (2, 4, 8)))
    for r in rows:
        print(f"{r['K']:>6} {r['N']:>6} | " + " | ".join(
            f"{r[f'w{b}_us']:7.1f} {100 * r[f'w{b}_floor_us'] / r[f'w{b}_us']:4.0f}"
            for b in (2, 4, 8)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--quick", action="store_true", help="first shape, M in 1/16 only")
    add_shape_args(ap, "8192x28672,4096x4096")
    ap.add_argument("--deq-dtype", default="fp16", choices=sorted(DTYPES),
                    help="output dtype of the mpq::dequantize table (scales cast to it)")
    ap.add_argument("--mpq-only", action="store_true",
                    help="time mpq only (no anchors): for comparing kernel variants")
    ap.add_argument("--clean-l2", action="store_true",
                    help="for M <= 16 also time fp16, mpq and int4pack with L2 emptied by a "
                         "read instead of do_bench's zero-fill (bench_clean_l2)")
    ap.add_argument("--all-widths", action="store_true",
                    help="time w2 and w8 at every M (default: at M <= 16 only, w4 at every M)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time fp16 and mpq::matmul in this many alternating rounds per cell "
                         "and report each one's median round (default 1)")
    ap.add_argument("--kernels", default=None,
                    help="also time each CUDA path forced, e.g. gemv,gemm,dequantize "
                         "(MPQ_OPS_CUDA_KERNEL; a path that cannot serve M falls back)")
    args = ap.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds: expected 1 or more, got {args.rounds}")
    shapes, ms = chosen_shapes(args, SHAPES[:1] if args.quick else SHAPES,
                               [1, 16] if args.quick else MS)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s",
          flush=True)
    compiled = torch.compile(dequant_matmul_w4g128, dynamic=True)
    rows, deq_rows = [], []
    for K, N in shapes:
        lin_w = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
        weights = {b: quantize_rtn(lin_w, b, 128) for b in (2, 4, 8)}
        deq_rows.append(dequantize_row(K, N, weights, bw, DTYPES[args.deq_dtype]))
        print(json.dumps(deq_rows[-1]), flush=True)
        try:
            packed, sz = int4pack_weights(N, K)
        except Exception as e:  # noqa: BLE001 - an anchor that is missing is reported, not fatal
            print(f"_weight_int4pack_mm unavailable: {e}", file=sys.stderr)
            packed = None
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            xb = x.to(torch.bfloat16)
            row = {"K": K, "N": N, "M": M}
            # The compiled anchor is compiled for this M before anything is
            # timed, so that no compilation overlaps the timings (single cells
            # had measured ~40 us slow, which their reruns did not repeat).
            qw4 = weights[4]
            if not args.mpq_only:
                compiled(x, qw4.qweight, qw4.scales, qw4.zeros)
                torch.cuda.synchronize()
            bits = (2, 4, 8) if M <= 16 or args.all_widths else (4,)
            # fp16 and each width's mpq::matmul, in alternating rounds
            timed = {} if args.mpq_only else {"fp16": lambda: F.linear(x, lin_w)}
            for b in bits:
                qw = weights[b]
                timed[f"mpq_w{b}"] = (
                    lambda qw=qw, b=b: torch.ops.mpq.matmul(x, qw.qweight, qw.scales, qw.zeros,
                                                            b, 128))
            medians = bench_rounds(timed, args.rounds, row)
            row["fp16_us"] = medians.get("fp16", float("nan"))
            for b in bits:
                qw = weights[b]
                # codes, scales and zeros; + x and y for the floor
                weight_bytes = packed_bytes(qw)
                nbytes = weight_bytes + M * K * 2 + M * N * 2
                row[f"mpq_w{b}_us"] = medians[f"mpq_w{b}"]
                row[f"mpq_w{b}_floor_us"] = nbytes / bw * 1e6
                if M == 1 and not args.mpq_only:
                    row[f"read_w{b}_us"] = read_us(weight_bytes)
                    row[f"read_w{b}_bytes"] = weight_bytes
            for kernel in (args.kernels.split(",") if args.kernels else ()):
                os.environ["MPQ_OPS_CUDA_KERNEL"] = kernel
                try:
                    for b in bits:
                        qw = weights[b]
                        row[f"mpq_w{b}_{kernel}_us"] = bench(
                            lambda: torch.ops.mpq.matmul(x, qw.qweight, qw.scales, qw.zeros, b,
                                                         128))
                finally:
                    del os.environ["MPQ_OPS_CUDA_KERNEL"]
            if args.mpq_only:
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            if args.clean_l2 and M <= 16:
                row["fp16_clean_us"] = bench_clean_l2(lambda: F.linear(x, lin_w))
                for b in bits:
                    qw = weights[b]
                    row[f"mpq_w{b}_clean_us"] = bench_clean_l2(
                        lambda: torch.ops.mpq.matmul(x, qw.qweight, qw.scales, qw.zeros, b, 128))
                    if M == 1:
                        row[f"read_w{b}_clean_us"] = read_us(packed_bytes(qw), bench_clean_l2)
                if packed is not None:
                    row["int4pack_clean_us"] = bench_clean_l2(
                        lambda: torch.ops.aten._weight_int4pack_mm(xb, packed, 128, sz))
            if packed is not None:
                row["int4pack_us"] = bench(
                    lambda: torch.ops.aten._weight_int4pack_mm(xb, packed, 128, sz))
            row["compiled_dq_mm_us"] = bench(
                lambda: compiled(x, qw4.qweight, qw4.scales, qw4.zeros))
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": rows,
                   "dequantize": deq_rows}, f, indent=1)
    print_table(rows)
    print_dequantize(deq_rows)
    print_read(rows)
    if args.clean_l2:
        print_clean(rows)
    if args.kernels:
        print_kernels(rows, args.kernels.split(","))


def print_kernels(rows, kernels):
    print("\nwith each CUDA path forced (us; default = the policy's choice)")
    print(f"{'K':>6} {'N':>6} {'M':>5} {'bits':>4} | {'default':>8} | "
          + " ".join(f"{k:>10}" for k in kernels))
    for r in rows:
        for b in (2, 4, 8):
            if f"mpq_w{b}_us" in r:
                print(f"{r['K']:>6} {r['N']:>6} {r['M']:>5} {b:>4} | {r[f'mpq_w{b}_us']:8.1f} | "
                      + " ".join(f"{r[f'mpq_w{b}_{k}_us']:10.1f}" for k in kernels))


def print_read(rows, clean=False):
    """M = 1 against a plain read of the same bytes, under do_bench's flush or
    (clean) with L2 emptied by a read."""
    sfx = "_clean_us" if clean else "_us"
    rows = [r for r in rows if f"read_w4{sfx}" in r]
    if not rows:
        return
    flush = "L2 emptied by a read" if clean else "under the same flush"
    print(f"\nM = 1 against a plain read of the same bytes, {flush} (us; "
          "%read = read / time; read TB/s = the read's bytes / its time)")
    print(f"{'K':>6} {'N':>6} | " + " | ".join(f"{'w' + str(b):>7} {'read':>7} {'%read':>5} "
                                                 f"{'TB/s':>5}" for b in (2, 4, 8)))
    for r in rows:
        cells = []
        for b in (2, 4, 8):
            t, rd = r[f"mpq_w{b}{sfx}"], r[f"read_w{b}{sfx}"]
            tbs = r[f"read_w{b}_bytes"] / rd * 1e-6
            cells.append(f"{t:7.1f} {rd:7.1f} {100 * rd / t:5.0f} {tbs:5.2f}")
        print(f"{r['K']:>6} {r['N']:>6} | " + " | ".join(cells))


def print_clean(rows):
    print("\nM <= 16 with L2 emptied by a read (us; %floor = memory floor / time)")
    print(f"{'K':>6} {'N':>6} {'M':>5} | {'fp16':>8} | {'int4pk':>8} | "
          + " | ".join(f"{'w' + str(b):>7} {'%fl':>4} {'x':>5}" for b in (2, 4, 8)))
    for r in rows:
        if "fp16_clean_us" not in r:
            continue
        cells = []
        for b in (2, 4, 8):
            t = r[f"mpq_w{b}_clean_us"]
            cells.append(f"{t:7.1f} {100 * r[f'mpq_w{b}_floor_us'] / t:4.0f} "
                         f"{r['fp16_clean_us'] / t:5.2f}")
        print(f"{r['K']:>6} {r['N']:>6} {r['M']:>5} | {r['fp16_clean_us']:8.1f} | "
              f"{r.get('int4pack_clean_us', float('nan')):8.1f} | " + " | ".join(cells))
    print_read(rows, clean=True)


def print_table(rows):
    hdr = (f"{'K':>6} {'N':>6} {'M':>5} | {'fp16':>8} | {'w4 g128':>8} {'%floor':>6} {'x fp16':>6}"
           f" | {'int4pk':>8} {'cmp dq':>8} | {'w2':>7} {'%fl':>4} {'x':>5} | {'w8':>7} {'%fl':>4}"
           f" {'x':>5}")
    print("\ntimes in us (median, L2 flushed); %floor = memory floor / time; x = speedup over fp16")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        def cell(b):
            if f"mpq_w{b}_us" not in r:
                return f"{'':>7} {'':>4} {'':>5}"
            t = r[f"mpq_w{b}_us"]
            return (f"{t:7.1f} {100 * r[f'mpq_w{b}_floor_us'] / t:4.0f} "
                    f"{r['fp16_us'] / t:5.2f}")
        t4 = r["mpq_w4_us"]
        print(f"{r['K']:>6} {r['N']:>6} {r['M']:>5} | {r['fp16_us']:8.1f} | {t4:8.1f} "
              f"{100 * r['mpq_w4_floor_us'] / t4:6.0f} {r['fp16_us'] / t4:6.2f} | "
              f"{r.get('int4pack_us', float('nan')):8.1f} "
              f"{r.get('compiled_dq_mm_us', float('nan')):8.1f} | "
              f"{cell(2)} | {cell(8)}")


if __name__ == "__main__":
    main()
