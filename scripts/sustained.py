"""mpq::matmul and cuBLAS's F.linear run back to back for seconds at a time,
with the GPU's SM clock, power draw and throttle reasons sampled alongside
(nvidia-smi every 50 ms): each function's time per call at the clock it
settles to, not a short burst's. Where rows of x are many the kernels are
bound by the tensor cores, and a GPU held at its power limit lowers its clock
by how much power each kernel draws, so a kernel's speed under load may
differ from do_bench's short runs after an idle moment.

    python scripts/sustained.py --cells 'fp16,4,128,28672,8192,4096' [--seconds 3] \\
        [--phases 4] [--settings 'fused:;dq:MPQ_OPS_CUDA_KERNEL=dequantize'] [--do-bench] \\
        [--out s.json]

Each cell runs `--phases` phases per setting (and for F.linear on the
dequantized weight, `dense`), settings in turn, the order reversed every
phase; a phase calls its function for `--seconds` without a pause and
reports the median call (CUDA events), the mean SM clock and power of the
samples inside it and the throttle reasons seen. --do-bench fills each phase
with do_bench's runs instead (bench.py's timer: L2 flushed before each run,
about 0.1 s of runs per median) and reports the median of their medians: the
clocks the benchmark's own figures see."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpq_ops  # noqa: E402,F401  (registers the ops)
from bench import bench  # noqa: E402
from cells import cell_calls, make_cell  # noqa: E402
from shape_args import parse_settings, with_env  # noqa: E402

QUERY = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def start_sampler(out):
    """nvidia-smi sampling QUERY every 50 ms into the open file `out`, or None without it."""
    try:
        return subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", "50",
             "-i", str(torch.cuda.current_device())],
            stdout=out, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def read_samples(path):
    """[(unix time, SM MHz, W, C, throttle bits)] from the sampler's file."""
    out = []
    for line in open(path):
        f = [v.strip() for v in line.split(",")]
        if len(f) != 5:
            continue
        try:
            t = time.mktime(time.strptime(f[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
            t += float("0." + f[0].split(".")[1]) if "." in f[0] else 0.0
            out.append((t, float(f[1]), float(f[2]), float(f[3]), int(f[4], 16)))
        except ValueError:
            continue
    return out


def phase(fn, seconds, do_bench=False):
    """(median us per call, start, end unix times) of fn called for `seconds`
    (do_bench: the median of do_bench's medians over that time)."""
    if do_bench:
        start = time.time()
        medians = []
        while time.time() - start < seconds:
            medians.append(bench(fn))
        medians.sort()
        return medians[len(medians) // 2], start, time.time()
    fn()
    torch.cuda.synchronize()
    events = []
    start = time.time()
    while time.time() - start < seconds:
        pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        pair[0].record()
        fn()
        pair[1].record()
        events.append(pair)
        if len(events) % 16 == 0:
            events[-16][1].synchronize()  # (keep the host a few calls ahead, no more)
    torch.cuda.synchronize()
    end = time.time()
    times = sorted(s.elapsed_time(e) * 1e3 for s, e in events)
    return times[len(times) // 2], start, end


def run_cells(args, settings):
    """Each cell's phases: [{"cell", "phases": [{"setting", "us", "start", "end"}]}]."""
    rows = []
    for cell in args.cells.split(";"):
        mpq, dense = cell_calls(*make_cell(cell))
        fns = {name: (dense, {}) if env is None else (mpq, env) for name, env in settings}
        phases = []
        for p in range(args.phases):
            for name, _ in (settings if p % 2 == 0 else settings[::-1]):
                fn, env = fns[name]
                us, t0, t1 = with_env(env, lambda fn=fn: phase(fn, args.seconds, args.do_bench))
                phases.append({"setting": name, "us": us, "start": t0, "end": t1})
        rows.append({"cell": cell, "phases": phases})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", required=True)
    ap.add_argument("--settings", default="fused:")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--phases", type=int, default=4)
    ap.add_argument("--do-bench", action="store_true",
                    help="fill each phase with do_bench runs (L2 flushed before each)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    settings = parse_settings(args.settings) + [("dense", None)]
    timer = "do_bench medians" if args.do_bench else "back to back, median call"
    print(f"device: {torch.cuda.get_device_name()}; us per call ({timer}), SM MHz, W, throttle")
    with tempfile.TemporaryDirectory() as tmp:
        samples_path = os.path.join(tmp, "samples.csv")
        with open(samples_path, "w") as out:
            sampler = start_sampler(out)
            time.sleep(0.5)
            try:
                rows = run_cells(args, settings)
                time.sleep(0.3)
            finally:
                if sampler is not None:
                    sampler.terminate()
                    sampler.wait()
        samples = read_samples(samples_path) if sampler is not None else []
    for row in rows:
        for ph in row["phases"]:
            # (the second half of a phase: the clock it settles to)
            mid = (ph["start"] + ph["end"]) / 2
            inside = [s for s in samples if mid <= s[0] <= ph["end"]]
            ph["samples"] = len(inside)
            ph["mhz"] = sum(s[1] for s in inside) / len(inside) if inside else None
            ph["watts"] = sum(s[2] for s in inside) / len(inside) if inside else None
            ph["celsius"] = max(s[3] for s in inside) if inside else None
            bits = 0
            for s in inside:
                bits |= s[4]
            ph["throttle"] = hex(bits)
        print(row["cell"])
        for ph in row["phases"]:
            mhz = f"{ph['mhz']:6.0f}" if ph["mhz"] is not None else "     -"
            watts = f"{ph['watts']:5.0f}" if ph["watts"] is not None else "    -"
            print(f"  {ph['setting']:8} {ph['us']:9.1f} us  {mhz} MHz {watts} W  "
                  f"{ph['celsius']} C  throttle {ph['throttle']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
