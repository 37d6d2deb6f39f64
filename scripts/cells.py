"""One benchmark cell, as the A/B and profiling scripts (compare_env.py,
compare_builds.py, run_cell.py, sustained.py) name it: "dtype,w_bit,group_size,K,N,M",
dtype one of bench.py's DTYPES. Callers put tests/ on sys.path (helpers)."""
import torch

from bench import DTYPES
from helpers import make_weight, make_x


def make_cell(text, device="cuda"):
    """(x, qweight, scales, zeros, w_bit, group_size) for the cell `text`: the
    same random weights (seed 0) and x for the same cell, in every process."""
    fields = text.split(",")
    if len(fields) != 6 or fields[0] not in DTYPES:
        raise SystemExit(f"cell {text!r}: expected dtype,w_bit,group_size,K,N,M "
                         f"with dtype one of {sorted(DTYPES)}")
    dt = DTYPES[fields[0]]
    w, g, K, N, M = (int(v) for v in fields[1:])
    torch.manual_seed(0)
    qweight, scales, zeros = make_weight(N, K, w, g, dt, device, seed=0)
    x = make_x((M,), K, dt, device)
    return x, qweight, scales, zeros, w, g


def cell_calls(x, qweight, scales, zeros, w_bit, group_size, dense=True):
    """(mpq, dense): mpq::matmul on the cell, and cuBLAS's F.linear on its
    weight dequantized once here (the anchor; None where dense is False)."""
    def mpq():
        return torch.ops.mpq.matmul(x, qweight, scales, zeros, w_bit, group_size, None, None)
    if not dense:
        return mpq, None
    weight = torch.ops.mpq.dequantize(qweight, scales, zeros, w_bit, group_size)

    def linear():
        return torch.nn.functional.linear(x, weight)
    return mpq, linear
