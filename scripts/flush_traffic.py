"""DRAM traffic inside a timed call after an L2 flush, counted by Nsight
Compute: do_bench's flush (a 256 MB zero-fill, which leaves L2 full of dirty
lines) against a flush by a 256 MB read (clean lines, as a kernel before it
that reads its own weights leaves them). For each (K, N): mpq::matmul at M = 1
(w2, w4, w8, g128) and M = 16 (w4), a plain read of the w4 bytes (bench.py's
read kernel) and float16 F.linear at M = 1. Per call: its kernels' time, the
bytes they read from and wrote to DRAM (medians of --reps calls), and the
DRAM rate those bytes make. What the flush's dirty lines cost shows as DRAM
writes inside a call that itself writes only its few KB of y.

    python scripts/flush_traffic.py [--shapes 8192x28672,28672x8192] [--reps 3] \\
        [--out traffic.json]

It runs itself under `ncu --cache-control none` (ncu then leaves the caches as
each flush left them; kernels run one at a time, so a programmatic launch
does not overlap the kernel before it here). JSON + a printed table; ncu's
raw CSV is kept beside the JSON."""
import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from shape_args import parse_shapes  # noqa: E402
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "gpu__time_duration.sum")
FLUSH_BYTES = 256 << 20


def child(shapes, reps, labels_path):
    """The calls to profile: all set up and warmed first, then for each case
    and flush `reps` times (flush kernel, the case's call). Each flush kernel
    marks where a call's kernels begin; labels_path gets their order."""
    import torch
    import torch.nn.functional as F
    import triton
    import triton.language as tl

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import mpq_ops  # noqa: F401  (registers the ops)
    from bench import read_call
    from helpers import make_weight, make_x

    # Both flushes are kernels of their own names, which mark where each
    # profiled call begins (flush_by_read: bench.py's read kernel, named apart
    # from the read that is itself a profiled call).
    @triton.jit
    def flush_by_zeros(buf, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(buf + offs, tl.zeros([BLOCK], dtype=tl.int32), mask=offs < n)

    @triton.jit
    def flush_by_read(buf, out, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(buf + offs, mask=offs < n, other=0)
        tl.store(out + tl.program_id(0), tl.sum(v, axis=0))

    n = FLUSH_BYTES // 4
    block = 1024
    grid = (triton.cdiv(n, block),)
    buf = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device="cuda")
    sink = torch.empty(grid[0], dtype=torch.int32, device="cuda")
    flushes = {
        "zero-fill": lambda: flush_by_zeros[grid](buf, n, BLOCK=block, num_warps=4),
        "read": lambda: flush_by_read[grid](buf, sink, n, BLOCK=block, num_warps=4),
    }

    cases = []
    for K, N in shapes:
        torch.manual_seed(0)
        weights = {b: make_weight(N, K, b, 128, torch.float16, "cuda", seed=b) for b in (2, 4, 8)}
        x1, x16 = make_x((1,), K, torch.float16, "cuda"), make_x((16,), K, torch.float16, "cuda")

        def mpq(x, b, w=weights):
            q, s, z = w[b]
            return lambda: torch.ops.mpq.matmul(x, q, s, z, b, 128, None, None)

        q4, s4, _ = weights[4]
        nbytes = q4.numel() * 4 + 2 * s4.numel() * 2  # codes, scales and zeros
        lin_w = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
        shape = f"{K} x {N}"
        cases += [
            (shape, "read of the w4 bytes", read_call(nbytes)),
            (shape, "mpq w4 M=1", mpq(x1, 4)),
            (shape, "mpq w2 M=1", mpq(x1, 2)),
            (shape, "mpq w8 M=1", mpq(x1, 8)),
            (shape, "mpq w4 M=16", mpq(x16, 4)),
            (shape, "fp16 F.linear M=1", lambda x=x1, w=lin_w: F.linear(x, w)),
        ]
    for fn in list(flushes.values()) + [c[2] for c in cases]:
        fn()
        fn()
    torch.cuda.synchronize()
    labels = []
    for shape, name, fn in cases:
        for flush_name, flush in flushes.items():
            for _ in range(reps):
                flush()
                fn()
                labels.append({"shape": shape, "case": name, "flush": flush_name})
    torch.cuda.synchronize()
    with open(labels_path, "w") as f:
        json.dump(labels, f)


def parse_raw(text):
    """ncu's raw page as CSV -> [{"name", metric: value in bytes / us}] in launch order."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    header, units, data = rows[0], rows[1], rows[2:]
    col = {name: i for i, name in enumerate(header)}
    scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1024, "MB": 1024**2,
             "nsecond": 1e-3, "ns": 1e-3, "usecond": 1, "us": 1, "msecond": 1e3, "ms": 1e3}
    out = []
    for r in sorted(data, key=lambda r: int(r[col["ID"]])):
        k = {"name": r[col["Kernel Name"]]}
        for m in METRICS:
            unit = units[col[m]]
            if unit not in scale:
                raise SystemExit(f"ncu reported {m} in {unit!r}, which this script does not read")
            k[m] = float(r[col[m]].replace(",", "")) * scale[unit]
        out.append(k)
    return out


def summarize(kernels, labels):
    """Each flush kernel opens a call; the kernels after it up to the next
    flush are that call's. Medians over the reps of each (shape, case, flush)."""
    calls = []
    for k in kernels:
        if "flush_by_" in k["name"]:
            calls.append([])
        elif calls:
            calls[-1].append(k)
    # (the warm-up's flushes come first)
    if len(calls) < len(labels):
        raise SystemExit(f"{len(calls)} flushes profiled for {len(labels)} calls made")
    calls = calls[len(calls) - len(labels):]
    groups = {}
    for lab, ks in zip(labels, calls):
        key = (lab["shape"], lab["case"], lab["flush"])
        groups.setdefault(key, []).append(
            (sum(k["gpu__time_duration.sum"] for k in ks),
             sum(k["dram__bytes_read.sum"] for k in ks),
             sum(k["dram__bytes_write.sum"] for k in ks), len(ks)))
    rows = []
    for (shape, case, flush), vals in groups.items():
        us, rd, wr = (statistics.median(v[i] for v in vals) for i in range(3))
        rows.append({"shape": shape, "case": case, "flush": flush, "us": us,
                     "read_MB": rd / 1e6, "write_MB": wr / 1e6, "kernels": vals[0][3],
                     "dram_TBps": (rd + wr) / us * 1e-6})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x28672,28672x8192", help="K x N, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="traffic.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes)
    if args.child:
        return child(shapes, args.reps, args.child)
    if shutil.which("ncu") is None:
        raise SystemExit("flush_traffic.py needs Nsight Compute's ncu on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        labels_path, rep = os.path.join(tmp, "labels.json"), os.path.join(tmp, "traffic")
        cmd = ["ncu", "--cache-control", "none", "--clock-control", "none",
               "--metrics", ",".join(METRICS), "-f", "-o", rep,
               sys.executable, os.path.abspath(__file__), "--shapes", args.shapes,
               "--reps", str(args.reps), "--child", labels_path]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 or not os.path.exists(labels_path):
            sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
            raise SystemExit(f"ncu run failed ({run.returncode})")
        raw = subprocess.run(["ncu", "--import", rep + ".ncu-rep", "--page", "raw", "--csv",
                              "--print-units", "base", "--metrics", ",".join(METRICS)],
                             capture_output=True, text=True, check=True).stdout
        with open(labels_path) as f:
            labels = json.load(f)
    with open(os.path.splitext(args.out)[0] + ".raw.csv", "w") as f:
        f.write(raw)
    rows = summarize(parse_raw(raw), labels)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print("DRAM traffic inside one call after each flush (ncu, medians of "
          f"{args.reps} calls; TB/s = (read + written) / time)")
    print(f"| {'K x N':>12} | {'call':<20} | {'flush':<9} | {'us':>6} | {'read MB':>8} | "
          f"{'written MB':>10} | {'TB/s':>5} |")
    print("|" + "|".join("-" * w for w in (14, 22, 11, 8, 10, 12, 7)) + "|")
    for r in rows:
        print(f"| {r['shape']:>12} | {r['case']:<20} | {r['flush']:<9} | {r['us']:6.1f} | "
              f"{r['read_MB']:8.1f} | {r['write_MB']:10.1f} | {r['dram_TBps']:5.2f} |")


if __name__ == "__main__":
    main()
