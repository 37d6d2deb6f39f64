"""Fake kernels, autograd and typed wrappers for the mpq ops.

The schema and the CPU/CUDA kernels are in C++ (csrc/). Every check the C++
kernels make (csrc/checks.cpp) is repeated here with torch._check so that
tracing under torch.compile / torch.export rejects the same inputs, and
symbolic shapes flow through.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["matmul", "dequantize"]

W_BITS = (2, 4, 8)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(cond, msg) -> None:
    """torch._check, with a fast exit for plain Python True: eager callers (the
    MLX bridge) pay a few hundred ns per check instead of microseconds, while
    symbolic conditions under tracing still go to torch._check."""
    if cond is not True:
        torch._check(cond, msg)


def _check_value(cond, msg) -> None:
    if cond is not True:
        torch._check_value(cond, msg)


def _check_weight(op: str, qweight: Tensor, scales: Tensor, zeros: Tensor, w_bit: int,
                  group_size: int, K) -> int:
    """Mirror of mpq::check_weight; returns the number of groups."""
    _check_value(w_bit in W_BITS, lambda: f"{op}: w_bit must be 2, 4 or 8, got {w_bit}")
    _check(qweight.dtype == torch.int32,
                 lambda: f"{op}: qweight must be int32, got {qweight.dtype}")
    _check(qweight.dim() == 2, lambda: (
        f"{op}: qweight must be 2-D [N, K*w_bit/32], got {qweight.dim()}-D tensor of shape "
        f"{tuple(qweight.shape)}"))
    _check(K % 32 == 0, lambda: f"{op}: in_features K must be a multiple of 32, got K={K}")
    N = qweight.shape[0]
    words = K * w_bit // 32
    _check(qweight.shape[1] == words, lambda: (
        f"{op}: qweight must have shape [N, {words}] for K={K} and w_bit={w_bit}, "
        f"got {tuple(qweight.shape)}"))
    _check_value(group_size == -1 or (group_size > 0 and group_size % 32 == 0), lambda: (
        f"{op}: group_size must be -1 or a positive multiple of 32, got {group_size}"))
    gs = K if group_size == -1 else group_size
    _check_value(group_size == -1 or K % gs == 0,
                       lambda: f"{op}: group_size {group_size} must divide in_features K={K}")
    groups = 1 if group_size == -1 else K // gs
    for name, t in (("scales", scales), ("zeros", zeros)):
        _check(t.dim() == 2 and t.shape[0] == N and t.shape[1] == groups, lambda: (
            f"{op}: {name} must have shape [N, K/group_size] = [{N}, {groups}], "
            f"got {tuple(t.shape)}"))
        _check(t.device == qweight.device, lambda: (
            f"{op}: {name} must be on the same device as qweight ({qweight.device}), "
            f"got {t.device}"))
    _check(scales.dtype in FLOAT_DTYPES, lambda: (
        f"{op}: scales must be float16, bfloat16 or float32, got {scales.dtype}"))
    _check(zeros.dtype == scales.dtype, lambda: (
        f"{op}: zeros must have the dtype of scales ({scales.dtype}), got {zeros.dtype}"))
    return groups


def _check_matmul(x, qweight, scales, zeros, w_bit, group_size, perm, bias):
    op = "mpq::matmul"
    _check(x.dim() >= 1,
                 lambda: f"{op}: x must have at least 1 dimension [..., K], got a scalar")
    _check(x.dtype in FLOAT_DTYPES,
                 lambda: f"{op}: x must be float16, bfloat16 or float32, got {x.dtype}")
    _check(qweight.device == x.device, lambda: (
        f"{op}: qweight must be on the same device as x ({x.device}), got {qweight.device}"))
    _check(scales.dtype == x.dtype, lambda: (
        f"{op}: scales must have the dtype of x ({x.dtype}), got {scales.dtype}"))
    K = x.shape[-1]
    _check_weight(op, qweight, scales, zeros, w_bit, group_size, K)
    N = qweight.shape[0]
    if perm is not None:
        _check(perm.dim() == 1 and perm.shape[0] == K, lambda: (
            f"{op}: perm must have shape [K] = [{K}], got {tuple(perm.shape)}"))
        _check(perm.dtype in (torch.int32, torch.int64),
                     lambda: f"{op}: perm must be int32 or int64, got {perm.dtype}")
        _check(perm.device == x.device, lambda: (
            f"{op}: perm must be on the same device as x ({x.device}), got {perm.device}"))
    if bias is not None:
        _check(bias.dim() == 1 and bias.shape[0] == N, lambda: (
            f"{op}: bias must have shape [N] = [{N}], got {tuple(bias.shape)}"))
        _check(bias.dtype == x.dtype, lambda: (
            f"{op}: bias must have the dtype of x ({x.dtype}), got {bias.dtype}"))
        _check(bias.device == x.device, lambda: (
            f"{op}: bias must be on the same device as x ({x.device}), got {bias.device}"))
    return N, K


@torch.library.register_fake("mpq::matmul")
def _matmul_fake(x, qweight, scales, zeros, w_bit, group_size, perm=None, bias=None):
    N, _ = _check_matmul(x, qweight, scales, zeros, w_bit, group_size, perm, bias)
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("mpq::dequantize")
def _dequantize_fake(qweight, scales, zeros, w_bit, group_size):
    torch._check_value(w_bit in W_BITS,
                       lambda: f"mpq::dequantize: w_bit must be 2, 4 or 8, got {w_bit}")
    torch._check(qweight.dim() == 2, lambda: (
        f"mpq::dequantize: qweight must be 2-D [N, K*w_bit/32], got {qweight.dim()}-D tensor "
        f"of shape {tuple(qweight.shape)}"))
    K = qweight.shape[1] * (32 // w_bit)
    _check_weight("mpq::dequantize", qweight, scales, zeros, w_bit, group_size, K)
    return scales.new_empty((qweight.shape[0], K))


# ---------------------------------------------------------------------------
# Autograd. Gradients flow to x, scales, zeros and bias; qweight and perm are
# integer tensors and get none. W = (q - z) * s, so with dW = dY^T X':
#   dL/ds[n, g] = sum_{k in g} dW[n, k] * (q[n, k] - z[n, g])
#   dL/dz[n, g] = -s[n, g] * sum_{k in g} dW[n, k]
# (q - z) is itself an mpq::dequantize with unit scales.
# ---------------------------------------------------------------------------

def _group_grads(dW: Tensor, qweight, scales, zeros, w_bit, group_size, need_s, need_z):
    N, K = dW.shape
    groups = scales.shape[1]
    dWg = dW.float().reshape(N, groups, K // groups)
    d_scales = d_zeros = None
    if need_s:
        q_minus_z = torch.ops.mpq.dequantize(qweight, torch.ones_like(scales), zeros, w_bit,
                                             group_size)
        d_scales = (dWg * q_minus_z.float().reshape(N, groups, -1)).sum(-1).to(scales.dtype)
    if need_z:
        d_zeros = (-dWg.sum(-1) * scales.float()).to(zeros.dtype)
    return d_scales, d_zeros


def _matmul_setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, w_bit, group_size, perm, bias = inputs
    ctx.w_bit, ctx.group_size = w_bit, group_size
    # Which inputs want a gradient, taken here rather than from
    # ctx.needs_input_grad, whose length varies with the None optionals.
    ctx.need = (x.requires_grad, scales.requires_grad, zeros.requires_grad,
                bias is not None and bias.requires_grad)
    # x is only needed for the scale/zero gradients; don't keep it alive otherwise.
    keep_x = scales.requires_grad or zeros.requires_grad
    ctx.save_for_backward(x if keep_x else None, qweight, scales, zeros, perm)


def _matmul_backward(ctx, grad):
    x, qweight, scales, zeros, perm = ctx.saved_tensors
    need_x, need_s, need_z, need_b = ctx.need
    grad_x = d_scales = d_zeros = grad_bias = None
    if need_x:
        W = torch.ops.mpq.dequantize(qweight, scales, zeros, ctx.w_bit, ctx.group_size)
        grad_xp = torch.matmul(grad.to(W.dtype), W)
        grad_x = grad_xp if perm is None else torch.zeros_like(grad_xp).index_copy(
            -1, perm.long(), grad_xp)
    if need_s or need_z:
        K = x.shape[-1]
        xp = x if perm is None else x.index_select(-1, perm.long())
        dW = grad.reshape(-1, grad.shape[-1]).float().t() @ xp.reshape(-1, K).float()
        d_scales, d_zeros = _group_grads(dW, qweight, scales, zeros, ctx.w_bit,
                                         ctx.group_size, need_s, need_z)
    if need_b:
        grad_bias = grad.reshape(-1, grad.shape[-1]).float().sum(0).to(grad.dtype)
    return grad_x, None, d_scales, d_zeros, None, None, None, grad_bias


def _dequantize_setup_context(ctx, inputs, output):
    qweight, scales, zeros, w_bit, group_size = inputs
    ctx.w_bit, ctx.group_size = w_bit, group_size
    ctx.need = (scales.requires_grad, zeros.requires_grad)
    ctx.save_for_backward(qweight, scales, zeros)


def _dequantize_backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    need_s, need_z = ctx.need
    d_scales, d_zeros = _group_grads(grad, qweight, scales, zeros, ctx.w_bit, ctx.group_size,
                                     need_s, need_z)
    return None, d_scales, d_zeros, None, None


torch.library.register_autograd("mpq::matmul", _matmul_backward,
                                setup_context=_matmul_setup_context)
torch.library.register_autograd("mpq::dequantize", _dequantize_backward,
                                setup_context=_dequantize_setup_context)


# ---------------------------------------------------------------------------
# Typed wrappers.
# ---------------------------------------------------------------------------

# The overload itself: calling the packet (torch.ops.mpq.matmul) resolves it on
# every call.
_matmul_op = torch.ops.mpq.matmul.default

def matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, w_bit: int,
           group_size: int, perm: Optional[Tensor] = None, bias: Optional[Tensor] = None
           ) -> Tensor:
    """y = x[..., perm] @ W^T + bias with W = (q - zeros) * scales per group.

    x: [..., K] float16/bfloat16 (float32 on CPU/MPS); qweight: [N, K*w_bit/32]
    int32; scales, zeros: [N, K/group_size] in x.dtype; returns [..., N].

    Without grad mode this calls the op below autograd: its autograd kernel
    (Python, register_autograd above) would still run on every call under
    no_grad (inference_mode skips it) only to step below autograd itself,
    about 5 us a call on the host, which is the whole call for small layers
    at batch 1. Traced code keeps the plain call."""
    # perm and bias go to the op only when present: a None argument costs the
    # dispatcher's argument parsing about 0.5 us.
    args = (x, qweight, scales, zeros, w_bit, group_size)
    if perm is not None or bias is not None:
        args += (perm, bias)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _matmul_op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return _matmul_op(*args)


def dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor, w_bit: int,
               group_size: int) -> Tensor:
    """W [N, K] in scales.dtype from the canonical packed format."""
    return torch.ops.mpq.dequantize(qweight, scales, zeros, w_bit, group_size)
