"""Where the warps of a profiled kernel stalled, per SASS instruction: reads
the source page of an Nsight Compute report exported as CSV (`ncu --import
r.ncu-rep --page source --csv --print-source sass`) and prints the stall
samples by opcode, by stall reason where the export has a column per reason,
and the instructions with the most samples.

    python scripts/ncu_source_summary.py r.sass.csv [--top 40]

The columns are found by name, not position: the warp-stall sampling count
("Warp Stall Sampling (All Samples)"), the SASS text ("Source"), the address."""
import argparse
import collections
import csv
import re
import sys


def number(text):
    text = (text or "").replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return 0.0


def read_rows(path):
    """(header, rows) from the first line that names a Source column."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    for i, line in enumerate(lines):
        if "Source" in line and any("Sampl" in c for c in line):
            return line, [r for r in lines[i + 1:] if len(r) == len(line)]
    raise SystemExit(f"{path}: no header with a Source column and a sampling column "
                     f"(first lines: {lines[:3]})")


def opcode(sass):
    """The instruction's opcode without predicate or modifiers: @!P0 BRA -> BRA."""
    words = re.sub(r"^\s*@!?U?P\w+\s+", "", sass).split()
    return words[0].split(".")[0] if words else "?"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    header, rows = read_rows(args.csv)
    col = {name: i for i, name in enumerate(header)}
    samples_col = next(i for i, c in enumerate(header) if c.startswith("Warp Stall Sampling (All"))
    src = col["Source"]
    addr = col.get("Address", col.get("# Address"))
    samples = [number(r[samples_col]) for r in rows]
    total = sum(samples) or 1.0
    print(f"{len(rows)} instructions, {total:.0f} stall samples ({header[samples_col]})")

    by_op = collections.Counter()
    for r, s in zip(rows, samples):
        by_op[opcode(r[src])] += s
    print("\nby opcode:")
    for op, s in by_op.most_common(15):
        print(f"  {op:14} {100 * s / total:5.1f}%")

    # Columns that break the samples down by reason, where the export has them.
    reasons = [i for i, c in enumerate(header)
               if i != samples_col and re.search(r"stall", c, re.I)
               and not c.startswith("Warp Stall Sampling")]
    if reasons:
        sums = {header[i]: sum(number(r[i]) for r in rows) for i in reasons}
        # Samples whose reason has no column (e.g. warps at a wgmma): the
        # all-samples count less the per-reason ones (not the Not Issued split).
        named = sum(s for name, s in sums.items() if "Not Issued" not in name)
        sums["(no reason column)"] = total - named
        print("\nby reason:")
        for name, s in sorted(sums.items(), key=lambda kv: -kv[1])[:15]:
            if s > 0:
                print(f"  {name:48} {100 * s / total:5.1f}%")

    print(f"\ntop {args.top} instructions:")
    order = sorted(range(len(rows)), key=lambda i: -samples[i])[:args.top]
    for i in order:
        where = rows[i][addr] if addr is not None else str(i)
        print(f"  {where:>8} {100 * samples[i] / total:5.1f}%  {rows[i][src].strip()[:90]}")


if __name__ == "__main__":
    sys.exit(main())
