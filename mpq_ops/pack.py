"""Bit packing of the canonical ("row-packed") format and its relatives.

Canonical: qweight[n, k // P] holds q[n, k] at bits (k % P) * b, P = 32 / b,
lowest bits first. GPTQ packs the same way, only along another dimension;
`dim` selects it."""
from __future__ import annotations

import sys

import torch
from torch import Tensor

W_BITS = (2, 4, 8)
# Whether int32 words may be made by viewing four bytes as one (pack).
_LITTLE_ENDIAN = sys.byteorder == "little"


def _check_bits(w_bit: int) -> int:
    if w_bit not in W_BITS:
        raise ValueError(f"w_bit must be 2, 4 or 8, got {w_bit}")
    return 32 // w_bit


def pack(q: Tensor, w_bit: int, dim: int = -1) -> Tensor:
    """Packs integer codes q (values in [0, 2^w_bit)) into int32 words along `dim`."""
    per_word = _check_bits(w_bit)
    dim = dim % q.dim()
    if q.shape[dim] % per_word:
        raise ValueError(f"pack: size {q.shape[dim]} of dim {dim} must be a multiple of "
                         f"{per_word} for w_bit={w_bit}")
    if q.is_floating_point() or q.dtype == torch.bool:
        raise TypeError(f"pack: q must be an integer tensor, got {q.dtype}")
    qm = q.movedim(dim, -1)
    if qm.numel():
        low, high = (int(v) for v in torch.aminmax(qm))   # (a uint8 tensor wraps 256 to 0)
        if low < 0 or high >= (1 << w_bit):
            raise ValueError(f"pack: codes must lie in [0, {1 << w_bit}) for w_bit={w_bit}")
    if _LITTLE_ENDIAN:
        # The codes of each byte first (uint8), then four bytes as one word:
        # byte b of a little-endian word holds its bits 8 b .. 8 b + 7.
        per_byte = 8 // w_bit
        codes = qm.to(torch.uint8).reshape(*qm.shape[:-1], -1, per_byte)
        packed = codes[..., 0].clone()
        for j in range(1, per_byte):
            packed |= codes[..., j] << (j * w_bit)
        words = packed.contiguous().view(torch.int32)
    else:
        qm = qm.to(torch.int64).reshape(*qm.shape[:-1], -1, per_word)
        shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * w_bit
        words = (qm << shifts).sum(-1)
        # Fold [2^31, 2^32) onto the negative int32 range (two's complement).
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack(words: Tensor, w_bit: int, dim: int = -1) -> Tensor:
    """Inverse of pack: int32 words -> int32 codes, P times longer along `dim`."""
    per_word = _check_bits(w_bit)
    if words.dtype != torch.int32:
        raise TypeError(f"unpack: words must be int32, got {words.dtype}")
    dim = dim % words.dim()
    w = words.movedim(dim, -1)
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * w_bit
    q = (w.unsqueeze(-1) >> shifts) & ((1 << w_bit) - 1)
    q = q.reshape(*w.shape[:-1], w.shape[-1] * per_word)
    return q.movedim(-1, dim).contiguous()
