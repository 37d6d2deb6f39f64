"""GGUF (llama.cpp) block-quantized tensors in the canonical format.

Seven of ggml's block formats are the canonical format with groups of 32
inputs and the codes as stored (5-bit codes as 8-bit ones). A GGUF tensor
[N, K] holds its rows one after the other, each row's blocks in K order; d,
m and dmin are float16, and in a block of 32 4-bit codes code j is the low
nibble of byte j for j < 16 and the high nibble of byte j - 16 above (the
5-bit types add bit j of a 32-bit word qh on top):

    type  block (bytes)                          weights           canonical
    Q8_0  d, 32 int8 q (34)                      q d               w8, q + 128, zero 128, scale d
    Q4_0  d, 16 bytes of codes (18)              (q - 8) d         w4, zero 8, scale d
    Q4_1  d, m, 16 bytes of codes (20)           q d + m           w4, zero -m / d, scale d
    Q5_0  d, qh, 16 bytes (22)                   (q - 16) d        w8, zero 16, scale d
    Q5_1  d, m, qh, 16 bytes (24)                q d + m           w8, zero -m / d, scale d
    Q4_K  256 inputs (144): d, dmin, 12 bytes    d sc q - dmin mn  w4; per 32 inputs scale d sc,
          of eight 6-bit (sc, mn), 128 bytes                       zero dmin mn / (d sc)
    Q5_K  256 inputs (176): as Q4_K, 32 bytes    d sc q - dmin mn  w8, as Q4_K
          qh before the 128 bytes

The K types' 32-input sub-block 2i has its codes in the low nibbles of bytes
32 i .. 32 i + 31 of the codes, sub-block 2i + 1 in the high ones; Q5_K's
fifth bit of sub-block j's code l is bit j of qh's byte l. Where a group's
scale is 0 its weights are one value v (0, m or -dmin mn): its codes become
0, its scale v and its zero -1. So does a group whose zero point the dtype
cannot hold (float16, |z| over 65504: an offset over 65504 steps from 0),
v its offset (the weight of code 0), from which its weights differ by at
most their range, under 2^-12 of |v| (float16's own rounding of such
weights is up to 2^-11 of them; formats.zeros_from_offsets).

The other block formats have no exact form at 2, 4 or 8 bits: Q6_K, Q2_K and
Q3_K (sub-blocks of 16 inputs with scales of their own; groups are multiples
of 32), the IQ*, TQ* and FP4 codebooks."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from .formats import CanonicalWeight, zeros_from_offsets
from .pack import pack

# GGUF block type -> code width of its canonical form.
W_BIT_OF = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 8, "Q5_1": 8, "Q4_K": 4, "Q5_K": 8}
GROUP_SIZE = 32
# Inputs and bytes per block.
_BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
          "Q5_1": (32, 24), "Q4_K": (256, 144), "Q5_K": (256, 176)}


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of each block, as float64."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float64)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: the low nibbles, then the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[..., 4] bytes, a little-endian word -> [..., 32] bits 0..31 of it, times 16."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")
    return bits << 4


def _q4_k_scales(s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """[..., 12] bytes -> the eight 6-bit (sc, mn) of a Q4_K block, each [..., 8]:
    sc_j, mn_j in the low 6 bits of bytes j, j + 4 for j < 4; above, the low
    and high nibbles of byte j + 4 with the top 2 bits of bytes j - 4, j on top."""
    s = s.astype(np.int64)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, mn


def from_gguf_blocks(data: np.ndarray, type_name: str, shape: Tuple[int, int],
                     dtype: torch.dtype = torch.float32) -> CanonicalWeight:
    """A GGUF tensor's bytes (uint8, [N, row bytes] or flat) of block type
    `type_name` (a key of W_BIT_OF) and shape [N, K] -> the
    canonical weight, group_size 32, scales and zeros in `dtype` (computed in
    float64, rounded once)."""
    if type_name not in W_BIT_OF:
        raise ValueError(f"type_name: GGUF {type_name} has no exact 2/4/8-bit form; "
                         f"supported: {', '.join(W_BIT_OF)}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: scales and zeros are float32, float16 or bfloat16, got {dtype}")
    N, K = (int(v) for v in shape)
    per_block, block_bytes = _BLOCK[type_name]
    if N < 1 or K < 1 or K % per_block:
        raise ValueError(f"shape: [N, K] with K a multiple of {per_block} for {type_name}, "
                         f"got {list(shape)}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.size != N * K // per_block * block_bytes:
        raise ValueError(f"data: {N * K // per_block * block_bytes} uint8 bytes for a "
                         f"{type_name} [{N}, {K}] tensor, got {data.size} {data.dtype}")
    blocks = data.reshape(N, K // per_block, block_bytes)
    w_bit = W_BIT_OF[type_name]
    qweight = torch.empty(N, K * w_bit // 32, dtype=torch.int32)
    scales = torch.empty(N, K // GROUP_SIZE, dtype=dtype)
    zeros = torch.empty_like(scales)
    # A few million weights at a time: the float64 scales and zeros and the
    # codes' copies take a few bytes a weight (a 128256 x 4096 lm_head has
    # 525 M).
    step = max(1, _CHUNK_WEIGHTS // K)
    for r in range(0, N, step):
        codes, scale, offset = _decode_rows(blocks[r:r + step], type_name)
        if not (np.isfinite(scale).all() and np.isfinite(offset).all()):
            raise ValueError(f"data: the {type_name} blocks hold non-finite scales or offsets")
        s, z, flat = zeros_from_offsets(torch.from_numpy(scale), torch.from_numpy(offset), dtype)
        if not torch.isfinite(s).all():
            raise ValueError(f"dtype: {type_name} scales (or offsets) of up to "
                             f"{max(np.abs(scale).max(), np.abs(offset).max()):.6g} do not fit "
                             f"in {dtype}")
        codes[flat.numpy()] = 0
        scales[r:r + step], zeros[r:r + step] = s, z
        qweight[r:r + step] = pack(torch.from_numpy(codes.reshape(len(codes), K)), w_bit)
    return CanonicalWeight(qweight, scales, zeros, None, w_bit, GROUP_SIZE)


_CHUNK_WEIGHTS = 1 << 22


def _decode_rows(blocks: np.ndarray, type_name: str):
    """[n, blocks, bytes] -> codes [n, K / 32, 32] (uint8), scale and offset
    (the weight of code 0) [n, K / 32] (float64)."""
    n = blocks.shape[0]
    if type_name in ("Q8_0", "Q4_0", "Q5_0"):
        scale = _half(blocks, 0)
        offset = -{"Q8_0": 128.0, "Q4_0": 8.0, "Q5_0": 16.0}[type_name] * scale
        if type_name == "Q8_0":
            codes = blocks[..., 2:] ^ np.uint8(0x80)        # int8 q + 128
        elif type_name == "Q4_0":
            codes = _nibbles(blocks[..., 2:18])
        else:
            codes = _nibbles(blocks[..., 6:22]) | _fifth_bits(blocks[..., 2:6])
    elif type_name in ("Q4_1", "Q5_1"):
        scale, offset = _half(blocks, 0), _half(blocks, 2)
        codes = _nibbles(blocks[..., 4:20]) if type_name == "Q4_1" else \
            _nibbles(blocks[..., 8:24]) | _fifth_bits(blocks[..., 4:8])
    else:  # Q4_K, Q5_K
        d, dmin = _half(blocks, 0)[..., None], _half(blocks, 2)[..., None]
        sc, mn = _q4_k_scales(blocks[..., 4:16])
        scale = (d * sc).reshape(n, -1)                  # [n, K / 32]
        offset = (-dmin * mn).reshape(n, -1)
        qs = blocks[..., -128:].reshape(n, -1, 4, 1, 32)
        codes = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)) & 0x0F
        codes = codes.reshape(n, -1, 8, 32)
        if type_name == "Q5_K":          # bit j of byte l: sub-block j's code l
            qh = np.unpackbits(blocks[..., 16:48, None], axis=-1, bitorder="little")
            codes = codes | (qh.swapaxes(-1, -2) << 4)
    return np.ascontiguousarray(codes.reshape(n, -1, GROUP_SIZE), dtype=np.uint8), scale, offset


def from_gguf_tensor(tensor, dtype: torch.dtype = torch.float32) -> CanonicalWeight:
    """A tensor of gguf.GGUFReader (a 2-D tensor of a type in W_BIT_OF) -> the
    canonical weight, as from_gguf_blocks."""
    type_name = tensor.tensor_type.name
    if len(tensor.shape) != 2:
        raise ValueError(f"tensor: {tensor.name} is {len(tensor.shape)}-D, a linear weight "
                         f"is 2-D")
    K, N = (int(v) for v in tensor.shape)   # ggml order: the contiguous dimension first
    return from_gguf_blocks(tensor.data, type_name, (N, K), dtype)
