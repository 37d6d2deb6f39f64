"""Layers back to back, as a model's forward pass runs them: a stack of
up/down projection pairs (K -> N -> K, default 4 pairs of (4096, 14336), 8
layers whose weights, 235 MB at 4 bits, do not fit in L2) replayed from a CUDA
graph, each layer reading the one before's output. Per layer (us): float16
F.linear, and mpq::matmul at each code width with its kernels launched to
overlap the end of the kernel before (programmatic dependent launch, on by
default) and in plain stream order (MPQ_OPS_CUDA_PDL=0), a graph captured
under each; or under the environments that --settings names. Unlike
bench.py's single calls after an L2 flush, nothing but the chain's own
kernels runs between them. Times: the mean over --replays replays of the
graph, the median of --rounds rounds in which the settings
take turns (the order alternating). JSON + a printed table.

    python scripts/bench_chain.py [--shapes 4096x14336] [--ms 1,16,64] [--pairs 4] \\
        [--bits 4] [--group-size 128] \\
        [--settings 'pdl:-MPQ_OPS_CUDA_PDL;plain:MPQ_OPS_CUDA_PDL=0'] \\
        [--out chain.json]
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import mpq_ops  # noqa: F401  (registers the ops)
from mpq_ops.quantize import quantize_rtn
from shape_args import add_shape_args, chosen_shapes, parse_settings, with_env
from timing import graph_of, replay_us

SHAPES = [(4096, 14336)]
MS = [1, 16, 64]


def main():
    ap = argparse.ArgumentParser()
    add_shape_args(ap, "4096x14336")
    ap.add_argument("--pairs", type=int, default=4, help="up/down pairs of layers")
    ap.add_argument("--bits", default="4", help="code widths, e.g. 2,4,8")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--settings", default="pdl:-MPQ_OPS_CUDA_PDL;plain:MPQ_OPS_CUDA_PDL=0",
                    help="name:VAR=value,-VAR,...;name:... (each a graph captured under "
                         "it; -VAR unsets VAR)")
    ap.add_argument("--out", default="chain.json")
    args = ap.parse_args()
    shapes, ms = chosen_shapes(args, SHAPES, MS)
    bits = [int(b) for b in args.bits.split(",")]
    gs = args.group_size
    torch.manual_seed(0)
    dt = torch.float16
    print(f"device: {torch.cuda.get_device_name()}; {args.pairs} pairs of layers K -> N -> K, "
          f"float16 x, g{gs}; us per layer, replayed from a CUDA graph")
    settings = parse_settings(args.settings)
    cols = ["fp16"] + [f"w{b} {name}" for b in bits for name, _ in settings]
    print(f"| {'K x N':>12} | {'M':>4} | " + " | ".join(f"{c:>9}" for c in cols) + " |")
    print(f"|{'-' * 14}|{'-' * 6}|" + "|".join("-" * 11 for _ in cols) + "|")
    rows = []
    for K, N in shapes:
        if gs != -1 and (K % gs or N % gs):  # both are a layer's K in the chain
            print(f"| {f'{K} x {N}':>12} | left out: g{gs} does not divide both", flush=True)
            continue
        # Weights of unit gain (a chain neither grows nor vanishes), each
        # quantized from its float16 original.
        dense = []
        for i in range(2 * args.pairs):
            n_in, n_out = (K, N) if i % 2 == 0 else (N, K)
            dense.append(torch.randn(n_out, n_in, device="cuda", dtype=dt) / n_in ** 0.5)
        quantized = {b: [quantize_rtn(w, b, gs) for w in dense] for b in bits}
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=dt)

            def fp16_chain():
                h = x
                for w in dense:
                    h = F.linear(h, w)
                return h

            def mpq_chain(b):
                def run():
                    h = x
                    for q in quantized[b]:
                        h = torch.ops.mpq.matmul(h, q.qweight, q.scales, q.zeros, b, gs)
                    return h
                return run

            graphs = [("fp16", graph_of(fp16_chain))]
            for b in bits:
                for name, env in settings:
                    graphs.append((f"w{b} {name}",
                                   with_env(env, lambda b=b: graph_of(mpq_chain(b)))))
            times = {name: [] for name, _ in graphs}
            for r in range(args.rounds):
                for name, g in (graphs if r % 2 == 0 else graphs[::-1]):
                    times[name].append(replay_us(g, args.replays) / len(dense))
            row = {"K": K, "N": N, "M": M, "layers": len(dense), "group_size": gs}
            for name, _ in graphs:
                row[name.replace(" ", "_") + "_us"] = statistics.median(times[name])
            rows.append(row)
            print(f"| {f'{K} x {N}':>12} | {M:>4} | "
                  + " | ".join(f"{row[c.replace(' ', '_') + '_us']:9.1f}" for c in cols) + " |",
                  flush=True)
            del graphs
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
