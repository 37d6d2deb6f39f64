"""Linear layers over torch.ops.mpq.matmul.

MPQLinear holds the canonical format and works on every device.
MPQLinearBase / MPQLinearCuda / MPQLinearMlx keep bitorch-engine's API and
checkpoint buffers (GPTQ: qweight [K*b/32, N], qzeros, scales, g_idx; GBA:
qstatistic / qscales / qzeros_zeros / qzeros_scales / qscales_zeros /
qscales_scales), so their checkpoints load with load_state_dict;
prepare_params() converts them once into the canonical format."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .formats import codes_from_gptq, from_gptq, zeros_from_offsets
from .ops import matmul
from .pack import W_BITS, pack, unpack
from .quantize import quantize_rtn, resolve_group_size


class MPQLinear(nn.Module):
    """y = x @ W^T (+ bias) with W stored as w_bit codes, scales and zero points.

    Buffers (canonical format, see CONTRACT): qweight [N, K*w_bit/32] int32,
    scales/zeros [N, K/group_size] in `dtype`, perm [K] (act-order) or None,
    bias [N] or None."""

    def __init__(self, in_features: int, out_features: int, w_bit: int = 4,
                 group_size: int = -1, bias: bool = False, dtype: torch.dtype = torch.float16,
                 device=None, act_order: bool = False) -> None:
        super().__init__()
        if w_bit not in W_BITS:
            raise ValueError(f"w_bit must be 2, 4 or 8, got {w_bit}")
        gs = resolve_group_size(in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.w_bit, self.group_size = w_bit, gs
        G = in_features // gs
        self.qweight = nn.Parameter(
            torch.zeros(out_features, in_features * w_bit // 32, dtype=torch.int32, device=device),
            requires_grad=False)
        self.register_buffer("scales", torch.ones(out_features, G, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, G, dtype=dtype, device=device))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device)
                             if act_order else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device)
                             if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, w_bit: int = 4, group_size: int = -1,
                    symmetric: bool = False, dtype: Optional[torch.dtype] = None,
                    integer_zeros: bool = False) -> "MPQLinear":
        """Round-to-nearest quantization of an nn.Linear (grid: quantize.group_params)."""
        w = linear.weight
        dtype = dtype or w.dtype
        layer = cls(linear.in_features, linear.out_features, w_bit, group_size,
                    bias=linear.bias is not None, dtype=dtype, device=w.device)
        qw = quantize_rtn(w, w_bit, group_size, symmetric=symmetric, dtype=dtype,
                          integer_zeros=integer_zeros)
        layer.load_canonical(qw.qweight, qw.scales, qw.zeros)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def load_canonical(self, qweight: Tensor, scales: Tensor, zeros: Tensor,
                       perm: Optional[Tensor] = None) -> None:
        """Takes canonical tensors (checked against this layer's shape)."""
        for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
            ref = getattr(self, name)
            if t.shape != ref.shape:
                raise ValueError(f"{name} must have shape {tuple(ref.shape)}, got {tuple(t.shape)}")
        self.qweight.data = qweight.to(self.qweight.device, torch.int32).contiguous()
        self.scales = scales.to(self.scales.device, self.scales.dtype).contiguous()
        self.zeros = zeros.to(self.zeros.device, self.zeros.dtype).contiguous()
        self.perm = None if perm is None else perm.to(self.qweight.device, torch.int32)

    def group_size_arg(self) -> int:
        return -1 if self.group_size == self.in_features else self.group_size

    def forward(self, x: Tensor) -> Tensor:
        # The tensors come from the module's own dicts: attribute access falls
        # through to nn.Module.__getattr__ for parameters and buffers, about
        # 0.5 us a name, and on small layers at batch 1 the host's time is
        # the call's time (ops.matmul steps below autograd without grad mode).
        buffers = self._buffers
        return matmul(x, self._parameters["qweight"], buffers["scales"], buffers["zeros"],
                      self.w_bit, self.group_size_arg(), buffers["perm"], buffers["bias"])

    def dequantize(self) -> Tensor:
        """The float weight [N, K] in nn.Linear's column order (perm undone)."""
        W = torch.ops.mpq.dequantize(self.qweight, self.scales, self.zeros, self.w_bit,
                                     self.group_size_arg())
        if self.perm is None:
            return W
        return torch.empty_like(W).index_copy_(1, self.perm.long(), W)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"w_bit={self.w_bit}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, act_order={self.perm is not None}, "
                f"dtype={self.scales.dtype}")


class MPQLinearBase(MPQLinear):
    """bitorch-engine's MPQ layer API on top of MPQLinear.

    Construct with the seeds' arguments, load_state_dict a bitorch-engine
    checkpoint, then call prepare_params() (or prepare_bie_layers(model))."""

    def __init__(self, in_channels: int, out_channels: int, a_bit: int = 16, w_bit: int = 4,
                 dtype=torch.half, group_size: int = -1, use_gba_quant: bool = True,
                 dq_group_size: int = -1, dq_mode: int = 2, disable_bias: bool = True,
                 asym: bool = False, requires_grad: bool = True) -> None:
        super().__init__(in_channels, out_channels, w_bit, group_size, bias=not disable_bias,
                         dtype=dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.a_bit, self.dtype = a_bit, dtype
        self.use_gba_quant, self.dq_mode = use_gba_quant, dq_mode
        self.disable_bias, self.asym, self.requires_grad = disable_bias, asym, requires_grad
        self.check_parameters()
        self.maxq = 2**w_bit - 1
        self.dq_group_size = out_channels if dq_group_size == -1 else dq_group_size
        self.prepared = False
        self._init_checkpoint_buffers()

    # -- checkpoint layout ------------------------------------------------
    def _init_checkpoint_buffers(self) -> None:
        K, N, b = self.in_channels, self.out_channels, self.w_bit
        G = K // self.group_size
        # The checkpoint's qweight is GPTQ-oriented; prepare_params repacks it.
        self.qweight = nn.Parameter(torch.zeros(K * b // 32, N, dtype=torch.int32),
                                    requires_grad=False)
        self.register_buffer("g_idx", (torch.arange(K) // self.group_size).to(torch.int32))
        # Bit offsets bitorch-engine keeps for unpacking; only here so its checkpoints load.
        self.register_buffer("wf", torch.arange(0, 32, b, dtype=torch.int32).unsqueeze(0))
        self.register_buffer("bias", torch.zeros(N, dtype=self.dtype))
        self.register_buffer("scales", torch.ones(G, N, dtype=self.dtype))
        self.register_buffer("zeros", torch.zeros(G, N, dtype=self.dtype))
        packed_zeros = (G, math.ceil(N * b / 32))
        if not self.use_gba_quant:
            self.register_buffer("qzeros", torch.zeros(packed_zeros, dtype=torch.int32))
            self.asym = True
            return
        dq = self.dq_group_size
        shape1 = (G, math.ceil(N / dq), 1)
        shape2 = (G, math.ceil(N / dq), dq)
        if self.asym:
            self.register_buffer("qzeros", torch.zeros(packed_zeros, dtype=torch.int32))
            self.register_buffer("qscales", torch.ones(shape2 if b == 4 else (G, N),
                                                       dtype=torch.uint8))
        else:
            self.register_buffer("qstatistic", torch.ones(shape2, dtype=torch.uint8))
            self.register_buffer("qzeros_zeros", torch.zeros(shape1, dtype=self.dtype))
            self.register_buffer("qzeros_scales", torch.ones(shape1, dtype=self.dtype))
        qs_shape = (1, N, 1) if self.dq_mode == 1 else shape1
        self.register_buffer("qscales_zeros", torch.zeros(qs_shape, dtype=self.dtype))
        self.register_buffer("qscales_scales", torch.ones(qs_shape, dtype=self.dtype))

    def check_parameters(self) -> None:
        if self.w_bit not in W_BITS:
            raise ValueError(f"{type(self).__name__}: w_bit must be 2, 4 or 8, got {self.w_bit}")
        if self.a_bit != 16:
            raise ValueError(f"{type(self).__name__}: a_bit must be 16, got {self.a_bit}")
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{type(self).__name__}: dtype must be float16, bfloat16 or "
                             f"float32, got {self.dtype}")

    # -- conversion ---------------------------------------------------------
    def _double_quantized(self, codes: Tensor, G: int, N: int) -> Tensor:
        """GBA second-level dequantization: (codes - zeros) * scales, [G, N]."""
        qs_zeros, qs_scales = self.qscales_zeros, self.qscales_scales
        if self.dq_mode == 1:  # one (zero, scale) per output channel: [1, N, 1]
            return (codes.reshape(G, N).to(self.dtype) - qs_zeros.reshape(1, N)) * \
                qs_scales.reshape(1, N)
        dq = self.dq_group_size
        c = codes.reshape(G, math.ceil(N / dq), -1).to(self.dtype)
        return ((c - qs_zeros) * qs_scales).reshape(G, -1)[:, :N]

    @torch.no_grad()
    def prepare_params(self) -> None:
        """Converts the loaded checkpoint buffers into the canonical format, once."""
        if self.prepared:
            return
        K, N, b = self.in_channels, self.out_channels, self.w_bit
        G = K // self.group_size
        dev = self.qweight.device
        if not self.use_gba_quant:                 # GPTQ, v1 zero points
            cw = from_gptq(self.qweight.data, self.qzeros, self.scales, b, g_idx=self.g_idx,
                           zero_convention="v1", dtype=self.dtype)
            scales, zeros, perm, codes = cw.scales, cw.zeros, cw.perm, cw.qweight
            del self.qzeros
        else:
            if self.group_size < 256:
                if self.asym:
                    scales = self._double_quantized(self.qscales, G, N)
                else:
                    stat = self.qstatistic.to(torch.uint8)
                    scales = self._double_quantized((stat & 0xF0) >> 4, G, N)
                    zq = (stat & 0x0F).reshape(G, math.ceil(N / self.dq_group_size), -1)
                    zoff = ((zq.to(self.dtype) - self.qzeros_zeros) * self.qzeros_scales)
                    self.zeros = zoff.reshape(G, -1)[:, :N].contiguous()
            else:
                scales = self.scales
            codes, perm, _ = codes_from_gptq(self.qweight.data, b, self.g_idx, G)
            if self.asym:   # packed integer zeros, stored minus one (as GPTQ v1)
                z = (unpack(self.qzeros, b, dim=1)[:, :N] + 1).to(torch.float32)
                scales, zeros = scales.t().to(self.dtype), z.t().to(self.dtype)
            else:           # pre-scaled offsets: W = q*s - offset, z = offset / s
                codes, scales, zeros = _offsets_as_zeros(codes, scales.t(), self.zeros.t(), b,
                                                         self.group_size, self.dtype)
            for name in ("qstatistic", "qscales", "qzeros", "qzeros_zeros", "qzeros_scales",
                         "qscales_zeros", "qscales_scales"):
                if hasattr(self, name):
                    delattr(self, name)
        del self.g_idx, self.wf
        self.qweight = nn.Parameter(codes.to(dev), requires_grad=False)
        self.scales = scales.contiguous().to(dev)
        self.zeros = zeros.contiguous().to(dev)
        self.perm = None if perm is None else perm.to(dev)
        if self.disable_bias:
            self.bias = None
        self.prepared = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.prepared:
            raise RuntimeError(f"{type(self).__name__}: call prepare_params() (or "
                               "prepare_bie_layers(model)) after loading the checkpoint and "
                               "before forward()")
        return super().forward(x)


def _offsets_as_zeros(codes: Tensor, scales: Tensor, offsets: Tensor, w_bit: int,
                      group_size: int, dtype: torch.dtype):
    """GBA's W = q s - offset per group ([N, G] scales and offsets) as the
    canonical (q - z) s, z = offset / s; a group whose z the dtype cannot hold
    (s = 0, as a double-quantized scale can come out, or s tiny against the
    offset) the one value -offset (formats.zeros_from_offsets), its codes 0."""
    s, z, flat = zeros_from_offsets(scales, -offsets.double(), dtype)
    if flat.any():
        q = unpack(codes, w_bit)                                 # [N, K]
        q.view(q.shape[0], -1, group_size)[flat] = 0
        codes = pack(q, w_bit)
    return codes, s, z


class MPQLinearCuda(MPQLinearBase):
    """The seeds' CUDA layer: w_bit 2/4/8, a_bit 16. Runs on any device through
    torch.ops.mpq.matmul; on CUDA tensors it uses the CUDA kernels."""


class MPQLinearMlx(MPQLinearBase):
    """The seeds' Apple-silicon layer: w_bit 2/4/8, a_bit 16, group_size
    32/64/128 (the group sizes MLX's quantized_matmul supports)."""

    def check_parameters(self) -> None:
        super().check_parameters()
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"MPQLinearMlx: group_size must be 32, 64 or 128, got "
                             f"{self.group_size}")


def prepare_bie_layers(model: nn.Module) -> nn.Module:
    """Calls prepare_params() on every MPQ layer of the model."""
    for module in model.modules():
        if isinstance(module, MPQLinearBase):
            module.prepare_params()
    return model
