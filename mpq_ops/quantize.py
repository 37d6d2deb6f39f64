"""Round-to-nearest quantization of a float weight into the canonical format."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .pack import W_BITS, pack


class QuantizedWeight(NamedTuple):
    qweight: Tensor   # [N, K*w_bit/32] int32
    scales: Tensor    # [N, K/group_size]
    zeros: Tensor     # [N, K/group_size]
    w_bit: int
    group_size: int   # as given (-1 = one group per row)


def resolve_group_size(K: int, group_size: int) -> int:
    """Validates group_size for in_features K and returns the real group length."""
    if K % 32:
        raise ValueError(f"in_features K must be a multiple of 32, got K={K}")
    if group_size != -1 and (group_size <= 0 or group_size % 32):
        raise ValueError(f"group_size must be -1 or a positive multiple of 32, got {group_size}")
    gs = K if group_size == -1 else group_size
    if K % gs:
        raise ValueError(f"group_size {group_size} must divide in_features K={K}")
    return gs


def group_params(w: Tensor, w_bit: int, symmetric: bool, dtype: torch.dtype,
                 integer_zeros: bool = False):
    """Scale and zero point for each row of w [..., group] (last dim is one group).

    Asymmetric (default): the 2^b codes span exactly min..max of the group,
    with a fractional zero point (MLX's affine mode; an affine grid such as a
    GGUF Q4_1 block is reproduced exactly). integer_zeros=True instead rounds
    the zero point and widens the range to include 0 (GPTQ's convention, so
    the result converts to GPTQ files exactly).
    Symmetric: z = 2^(b-1), scale = absmax / (2^(b-1) - 1)."""
    maxq = 2**w_bit - 1
    w = w.float()
    if symmetric:
        half = 2 ** (w_bit - 1)
        scale = _stored_scale(w.abs().amax(-1) / max(half - 1, 1), dtype)
        return scale, torch.full_like(scale, half)
    lo, hi = w.amin(-1), w.amax(-1)
    if integer_zeros:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    # A group far from 0 against its spread (weights near 10 within 1e-4, say)
    # would need a zero point past what float16 holds: a coarser step keeps
    # |zero| under half its largest value (its error, with the zero point's
    # own rounding, a few float16 roundings of the weights).
    scale = torch.maximum((hi - lo) / maxq, lo.abs() / (torch.finfo(dtype).max / 2))
    scale = _stored_scale(scale, dtype)
    zero = -lo / scale.float()
    if integer_zeros:
        zero = torch.round(zero).clamp(0, maxq)
    return scale, zero.to(dtype)


def _stored_scale(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """scale (float32) in dtype: 1 for a group of one value, and never 0 where
    a step smaller than dtype's least subnormal would round to it (float16:
    weights of 6e-8 and 0 in one group)."""
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).to(dtype)
    least = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    return torch.where(scale == 0, torch.full_like(scale, least), scale)


def clipped_group_params(w: Tensor, w_bit: int, symmetric: bool, dtype: torch.dtype,
                         integer_zeros: bool = False, max_shrink: float = 0.2, steps: int = 20,
                         norm: float = 2.4):
    """group_params with the range shrunk where that lowers the group's error.

    Tries shrinking the min..max range (absmax for symmetric) by factors
    1, 1 - max_shrink/steps, ..., 1 - max_shrink and keeps, per group, the one
    with the least sum |w - dequant(quant(w))|^norm: clipping a few outliers
    buys a finer grid for the rest (GPTQ's "mse" grid search)."""
    w = w.float()
    best_s, best_z = group_params(w, w_bit, symmetric, dtype, integer_zeros)
    best_err = _group_error(w, best_s, best_z, w_bit, norm)
    for i in range(1, steps + 1):
        p = 1 - max_shrink * i / steps
        s, z = group_params(w * p, w_bit, symmetric, dtype, integer_zeros)
        err = _group_error(w, s, z, w_bit, norm)
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_err = torch.where(better, err, best_err)
    return best_s, best_z


def _group_error(w: Tensor, scale: Tensor, zero: Tensor, w_bit: int, norm: float) -> Tensor:
    q = quantize_codes(w, scale, zero, w_bit).float()
    deq = (q - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return (w - deq).abs().pow(norm).sum(-1)


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, w_bit: int) -> Tensor:
    """Codes q = clamp(round(w / s + z)) with the stored (rounded) s and z."""
    q = torch.round(w.float() / scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1))
    return q.clamp(0, 2**w_bit - 1).to(torch.int32)


@torch.no_grad()
def quantize_rtn(weight: Tensor, w_bit: int, group_size: int = -1, symmetric: bool = False,
                 dtype: Optional[torch.dtype] = None, integer_zeros: bool = False
                 ) -> QuantizedWeight:
    """Quantizes weight [N, K] (nn.Linear orientation) to w_bit codes per group.

    scales and zeros come out in `dtype` (default: weight.dtype, float32 for
    float64 input); see group_params for the grid."""
    if w_bit not in W_BITS:
        raise ValueError(f"w_bit must be 2, 4 or 8, got {w_bit}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor [N, K], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    N, K = weight.shape
    gs = resolve_group_size(K, group_size)
    if dtype is None:
        dtype = torch.float32 if weight.dtype == torch.float64 else weight.dtype
    wg = weight.reshape(N, K // gs, gs)
    scale, zero = group_params(wg, w_bit, symmetric, dtype, integer_zeros)
    q = quantize_codes(wg, scale, zero, w_bit).reshape(N, K)
    return QuantizedWeight(pack(q, w_bit), scale, zero, w_bit, group_size)
