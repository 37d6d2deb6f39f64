"""mpq::matmul timed with several builds of the extension, side by side: each
build is a copy of mpq_ops/_C.abi3.so (e.g. one compiled with another -D in
NVCC_APPEND_FLAGS). A round puts each build in place in turn, alternating the
order from round to round, and times every cell in a fresh process
(do_bench median, L2 flushed; with --clean-l2 L2 emptied by a read instead,
bench_clean_l2), checked against float64 with its output allocated over a
NaN-filled block (ppm of the output's norm); the median over rounds is
reported.

    python scripts/compare_builds.py --builds 'base:/tmp/base.so;pf256:/tmp/pf.so' \\
        --cells 'fp16,2,128,8192,28672,1;fp16,4,128,8192,28672,1' [--rounds 3] [--out c.json] \\
        [--clean-l2]

Cells as scripts/cells.py reads them: dtype, w_bit, group_size, K, N, M.
The build in place at the start is put back at the end. A round that fails
or outlasts --timeout seconds (a hung kernel) is reported and left out; the
other builds' rounds go on."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
SO = os.path.join(HERE, "..", "mpq_ops", "_C.abi3.so")

# One round of one build: every cell once, a JSON line per cell.
ROUND = r"""
import json, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[3]]
import mpq_ops
from bench import bench, bench_clean_l2
from cells import make_cell
from helpers import poison_allocator, ref_matmul, rel_err
for cell in sys.argv[2].split(";"):
    x, qw, sc, ze, w, g = make_cell(cell)
    call = lambda: torch.ops.mpq.matmul(x, qw, sc, ze, w, g, None, None)
    poison_allocator(x.shape[0] * qw.shape[0], x.dtype)
    out = call()
    # (NaN for non-finite outputs: builds with parts left out compute garbage.)
    finite = bool(torch.isfinite(out).all())
    err = rel_err(out, ref_matmul(x, qw, sc, ze, w, g)) * 1e6 if finite else float("nan")
    us = (bench_clean_l2 if sys.argv[4] == "clean" else bench)(call)
    print(json.dumps({"cell": cell, "us": us, "ppm": err}), flush=True)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--builds", required=True)
    ap.add_argument("--cells", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per round of a build")
    ap.add_argument("--clean-l2", action="store_true",
                    help="L2 emptied by a read before each run instead of do_bench's zero-fill")
    args = ap.parse_args()
    builds = [b.split(":", 1) for b in args.builds.split(";")]
    # (asked in a process of its own, so that this one holds no CUDA context
    # while the rounds run)
    device = subprocess.run([sys.executable, "-c",
                             "import torch; print(torch.cuda.get_device_name())"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    print(f"device: {device}; do_bench median, "
          f"{'L2 emptied by a read' if args.clean_l2 else 'L2 flushed by a write'}; "
          "us (error against float64, ppm)", flush=True)
    tests = os.path.join(HERE, "..", "tests")
    saved = tempfile.NamedTemporaryFile(suffix=".so", delete=False).name
    shutil.copyfile(SO, saved)
    results = {name: {} for name, _ in builds}
    try:
        for r in range(args.rounds):
            for name, path in builds if r % 2 == 0 else builds[::-1]:
                shutil.copyfile(path, SO)
                # Lines are echoed as they come, so a run cut short still shows them.
                with subprocess.Popen([sys.executable, "-c", ROUND, tests, args.cells, HERE,
                                       "clean" if args.clean_l2 else "dirty"],
                                      stdout=subprocess.PIPE, text=True) as proc:
                    timer = threading.Timer(args.timeout, proc.kill)
                    timer.start()
                    for line in proc.stdout:
                        row = json.loads(line)
                        print(f"round {r} {name}: {line.strip()}", file=sys.stderr, flush=True)
                        results[name].setdefault(row["cell"], []).append(row)
                timer.cancel()
                if proc.returncode:
                    why = (f"stopped after {args.timeout:.0f} s" if proc.returncode == -9
                           else f"exit status {proc.returncode}")
                    print(f"round {r} of build {name} failed ({why})", file=sys.stderr, flush=True)
    finally:
        shutil.copyfile(saved, SO)
        os.unlink(saved)
    rows = []
    for cell in args.cells.split(";"):
        row = {"cell": cell}
        for name, _ in builds:
            runs = results[name].get(cell, [])
            us = sorted(run["us"] for run in runs)
            row[name] = {"us": us[len(us) // 2] if us else None,
                         "rounds": [run["us"] for run in runs],
                         "ppm": runs[0]["ppm"] if runs else None}
        rows.append(row)
        print(f"{cell:28}" + "".join(
            f"  {name} {row[name]['us']:7.1f} ({row[name]['ppm']:.0f})" if row[name]["us"]
            else f"  {name}  failed" for name, _ in builds))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
