"""Conversions from other packed-weight formats into the canonical one.

GPTQ (AutoGPTQ / GPTQModel / bitorch-engine's GPTQ path):
    qweight [K*b/32, N] int32, packed along K (the transpose of ours)
    qzeros  [G, N*b/32] int32, packed along N
    scales  [G, N]
    g_idx   [K] group of each input channel (act-order when not sorted)
    W[n, k] = (q[k, n] - z[g, n]) * s[g, n], g = g_idx[k]
  v1 files store z - 1 (so the reader adds 1); v2 files store z.

The canonical format needs each group to be a contiguous run of K, so an
act-order g_idx becomes perm = argsort(g_idx): x' = x[..., perm] and the
codes are permuted the same way, W'[:, j] = W[:, perm[j]]."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .pack import W_BITS, pack, unpack


class CanonicalWeight(NamedTuple):
    qweight: Tensor            # [N, K*w_bit/32] int32
    scales: Tensor             # [N, G]
    zeros: Tensor              # [N, G]
    perm: Optional[Tensor]     # [K] int32 or None
    w_bit: int
    group_size: int            # real group length (K when one group per row)


def zeros_from_offsets(scales: Tensor, offsets: Tensor, dtype: torch.dtype):
    """Weights q s + offset per group as the canonical (q - z) s: z = -offset
    / s, computed in float64, then scales and zeros in dtype. A group whose z
    dtype cannot hold (s = 0, or an offset over dtype's largest value of steps
    from 0; finite s and offset) is the one value `offset`, to within its
    range q s: its scale becomes the offset and its zero -1, and `flat` (the
    third result) marks it; the caller sets its codes to 0. Non-finite scales
    or offsets pass through (their weights are not finite either)."""
    s, off = scales.double(), offsets.double()
    z = -off / s
    flat = torch.isfinite(s) & torch.isfinite(off) & ~(z.abs() <= torch.finfo(dtype).max)
    s = torch.where(flat, off, s)
    z = torch.where(flat, torch.full_like(z, -1.0), z)
    return s.to(dtype), z.to(dtype), flat


def perm_from_g_idx(g_idx: Tensor, groups: int, K: int):
    """Returns (perm or None, group_size) for a g_idx, checking every group has
    K / groups members."""
    if g_idx.shape != (K,):
        raise ValueError(f"g_idx must have shape [K] = [{K}], got {tuple(g_idx.shape)}")
    if K % groups:
        raise ValueError(f"K={K} is not a multiple of the number of groups {groups}")
    gs = K // groups
    g = g_idx.to(torch.int64)
    expected = torch.arange(K, device=g.device) // gs
    if torch.equal(g, expected):
        return None, gs
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], expected):
        raise ValueError("g_idx must assign exactly K/groups input channels to every group")
    return perm.to(torch.int32), gs


def codes_from_gptq(qweight: Tensor, w_bit: int, g_idx: Optional[Tensor], groups: int):
    """GPTQ-oriented codes [K*b/32, N] (packed along K) -> (canonical codes
    [N, K*b/32], perm or None, group_size): transpose, and permute the inputs
    so that every group is a contiguous run (see perm_from_g_idx)."""
    q = unpack(qweight, w_bit, dim=0)                 # [K, N]
    K = q.shape[0]
    if K % groups:
        raise ValueError(f"K={K} is not a multiple of the number of groups {groups}")
    perm, gs = perm_from_g_idx(
        g_idx if g_idx is not None else torch.arange(K, device=q.device) // (K // groups),
        groups, K)
    q = q.t()
    if perm is not None:
        q = q[:, perm.long()]
    return pack(q.contiguous(), w_bit), perm, gs


def from_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, w_bit: int,
              g_idx: Optional[Tensor] = None, zero_convention: str = "v1",
              dtype: Optional[torch.dtype] = None) -> CanonicalWeight:
    """GPTQ tensors -> canonical format (see the module docstring)."""
    if w_bit not in W_BITS:
        raise ValueError(f"w_bit must be 2, 4 or 8, got {w_bit}")
    if zero_convention not in ("v1", "v2"):
        raise ValueError(f"zero_convention must be 'v1' or 'v2', got {zero_convention!r}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    N = qweight.shape[1]
    if scales.dim() != 2 or scales.shape[1] != N:
        raise ValueError(f"scales must have shape [G, N={N}], got {tuple(scales.shape)}")
    G = scales.shape[0]
    z = unpack(qzeros, w_bit, dim=1)[:, :N]           # [G, N]
    if z.shape[0] != G:
        raise ValueError(f"qzeros must have {G} rows like scales, got {tuple(qzeros.shape)}")
    if zero_convention == "v1":
        z = z + 1
    dtype = dtype or scales.dtype
    codes, perm, gs = codes_from_gptq(qweight, w_bit, g_idx, G)
    return CanonicalWeight(codes, scales.t().to(dtype).contiguous(),
                           z.t().to(dtype).contiguous(), perm, w_bit, gs)
