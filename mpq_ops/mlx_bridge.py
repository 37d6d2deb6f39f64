"""mpq ops through MLX: the Apple-silicon ("mps") kernels, also usable on CPU.

The canonical weight format is MLX's affine `w_q` layout (uint32 words,
lowest bits first, [N, K*bits/32]); MLX's biases are -zeros * scales. So a
call is: torch -> MLX arrays, mx.quantized_matmul, MLX -> torch.

- Activations cross per call: DLPack without a copy where the platform allows
  (MLX -> torch always; torch -> MLX copies on CPU, which MLX requires), a
  numpy copy otherwise. MPS work is synchronized before MLX reads and MLX is
  evaluated before torch reads.
- Weight-side arrays (w_q, scales, biases) are made once per weight: a cache
  keyed by the qweight tensor (weakly held, so nothing leaks) that also
  records the tensors' versions, so an in-place update is seen.
- Cases MLX does not serve (group sizes other than 32/64/128, e.g. one group
  per row) fall back to mpq::dequantize + matmul in torch, which is correct on
  every device.
- MLX's CPU kernels accumulate in the input dtype; on the CPU the bridge feeds
  them float32 (see tests/test_mlx.py for the measured error), on the GPU
  (Metal) MLX accumulates in float32 itself.

Backends: the MPS dispatch key always uses this module once it is imported
(mpq_ops imports it when mlx is installed). On CPU, `use_mlx_on_cpu()` (or
MPQ_OPS_CPU_BACKEND=mlx at import) routes torch.ops.mpq.* through MLX
instead of the native C++ kernels: by default through the C++ bridge
(mpq_ops._mlx, csrc/mlx/bridge.cpp: the same steps with no Python on the call
path, built when mlx is installed at build time), else through the Python
functions here (`bridge="python"` asks for them)."""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import Optional

import torch
from torch import Tensor

MLX_GROUP_SIZES = (32, 64, 128)
MLX_BITS = (2, 4, 8)

_INSTALL_HINT = "the MLX backend needs mlx: pip install mpq_ops[mlx] (mlx[cpu] on Linux)"


_mx = None


def mlx():
    """The mlx.core module, or a clear error when it is missing."""
    global _mx
    if _mx is None:
        try:
            import mlx.core as mx
        except ImportError as e:
            raise RuntimeError(_INSTALL_HINT) from e
        _mx = mx
    return _mx


# --- crossing between torch and MLX -------------------------------------------

def to_mlx(t: Tensor):
    """torch tensor -> MLX array of the same dtype (uint32 view for int32 words)."""
    mx = mlx()
    if t.device.type == "mps":
        torch.mps.synchronize()  # MLX must not read before MPS has written
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    try:
        return mx.from_dlpack(t)
    except Exception:  # noqa: BLE001 - older MLX/torch, or a device DLPack can't carry
        cpu = t.cpu()
        if cpu.dtype == torch.bfloat16:  # numpy has no bfloat16: carry the bits
            return mx.array(cpu.view(torch.int16).numpy()).view(mx.bfloat16)
        return mx.array(cpu.numpy())


def to_torch(a, device: torch.device) -> Tensor:
    """MLX array -> torch tensor on `device` (evaluates the array first)."""
    mx = mlx()
    mx.eval(a)
    try:
        t = torch.from_dlpack(a)
    except Exception:  # noqa: BLE001 - copying fallback
        import numpy as np
        if a.dtype == mx.bfloat16:  # numpy has no bfloat16: carry the bits
            t = torch.from_numpy(np.array(a.view(mx.int16))).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.array(a))
    return t.to(device)


# --- weight cache ---------------------------------------------------------------

# id(qweight) -> (what was seen of qweight, scales and zeros, dtype, arrays).
# Keyed by identity (tensors compare elementwise, so they can't be dict keys);
# the weak reference to qweight has a callback that drops the entry when the
# weight dies, so nothing leaks.
_weight_cache: dict = {}


def _seen(*ts: Tensor):
    """Each tensor as an entry remembers it: a weak reference, compared by
    identity (a new tensor made after a freed one mostly gets the freed one's
    id, data pointer and version, so those alone can match a tensor never
    seen), the version counter (in-place updates) and the data pointer."""
    return tuple((weakref.ref(t), t._version, t.data_ptr()) for t in ts)


def _same(seen, ts) -> bool:
    return all(ref() is t and version == t._version and ptr == t.data_ptr()
               for (ref, version, ptr), t in zip(seen, ts))


def weight_arrays(qweight: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype):
    """(w_q uint32, scales, biases) as MLX arrays in `dtype`, made once per weight
    and again only after one of the three tensors changed (in place or replaced)."""
    mx = mlx()
    hit = _weight_cache.get(id(qweight))
    if hit is not None and hit[1] == dtype and _same(hit[0], (qweight, scales, zeros)):
        return hit[2]
    w_q = to_mlx(qweight).view(mx.uint32)
    s = scales.detach().to(dtype)
    biases = -(zeros.detach().to(dtype) * s)
    arrays = (w_q, to_mlx(s), to_mlx(biases))
    mx.eval(*arrays)
    ident = id(qweight)
    drop = lambda _r, ident=ident: _weight_cache.pop(ident, None)  # noqa: E731
    seen = ((weakref.ref(qweight, drop), qweight._version, qweight.data_ptr()),
            *_seen(scales, zeros))
    _weight_cache[ident] = (seen, dtype, arrays)
    return arrays


def cached_weights() -> int:
    """Number of weights whose MLX arrays are held, by the Python and the C++
    bridge together (for tests and diagnostics)."""
    return len(_weight_cache) + (torch.ops.mpq_mlx.cached_weights() if cpp_bridge() else 0)


_cpp = None


def cpp_bridge() -> bool:
    """Whether the C++ bridge (mpq_ops._mlx) is built and loads."""
    global _cpp
    if _cpp is None:
        try:
            mlx()  # loads libmlx, which mpq_ops._mlx links against
            from . import _mlx  # noqa: F401
            _cpp = True
        except (ImportError, RuntimeError):
            _cpp = False
    return _cpp


def mlx_serves(w_bit: int, group_size: int, K: int) -> bool:
    gs = K if group_size == -1 else group_size
    return w_bit in MLX_BITS and gs in MLX_GROUP_SIZES


def _compute_dtype(x: Tensor, device_type: str) -> torch.dtype:
    # MLX's CPU kernels accumulate in the input dtype: give them float32.
    return torch.float32 if device_type == "cpu" else x.dtype


def matmul_mlx(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, w_bit: int,
               group_size: int, perm: Optional[Tensor] = None,
               bias: Optional[Tensor] = None) -> Tensor:
    """mpq::matmul through mx.quantized_matmul (fallback: dequantize + matmul)."""
    from .ops import _check_matmul
    N, K = _check_matmul(x, qweight, scales, zeros, w_bit, group_size, perm, bias)
    if perm is not None and x.device.type == "cpu" and perm.numel():
        lo, hi = int(perm.min()), int(perm.max())
        if lo < 0 or hi >= K:
            raise RuntimeError(f"mpq::matmul: perm values must lie in [0, {K}), got values "
                               f"in [{lo}, {hi}]")
    lead = x.shape[:-1]
    if x.numel() == 0 or N == 0:
        return torch.zeros(*lead, N, dtype=x.dtype, device=x.device)
    if not mlx_serves(w_bit, group_size, K):
        W = torch.ops.mpq.dequantize(qweight, scales, zeros, w_bit, group_size)
        xp = x if perm is None else x.index_select(-1, perm.long())
        y = torch.matmul(xp.float(), W.float().t())
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    mx = mlx()
    cdt = _compute_dtype(x, x.device.type)
    w_q, s, b = weight_arrays(qweight, scales, zeros, cdt)
    xa = to_mlx(x.reshape(-1, K).to(cdt))
    if perm is not None:
        xa = mx.take(xa, to_mlx(perm.to(torch.int32)), axis=1)
    gs = K if group_size == -1 else group_size
    ya = mx.quantized_matmul(xa, w_q, s, b, transpose=True, group_size=gs, bits=w_bit)
    if bias is not None:
        ya = ya + to_mlx(bias.to(cdt))
    y = to_torch(ya, x.device)
    return y.to(x.dtype).reshape(*lead, N)


def dequantize_mlx(qweight: Tensor, scales: Tensor, zeros: Tensor, w_bit: int,
                   group_size: int) -> Tensor:
    """mpq::dequantize through mx.dequantize (fallback: unpack in torch)."""
    from .ops import _check_weight
    K = qweight.shape[1] * (32 // w_bit) if w_bit in MLX_BITS else 0
    torch._check_value(w_bit in MLX_BITS,
                       lambda: f"mpq::dequantize: w_bit must be 2, 4 or 8, got {w_bit}")
    torch._check(qweight.dim() == 2, lambda: "mpq::dequantize: qweight must be 2-D [N, K*w_bit/32]")
    _check_weight("mpq::dequantize", qweight, scales, zeros, w_bit, group_size, K)
    if not mlx_serves(w_bit, group_size, K) or qweight.numel() == 0:
        from .pack import unpack
        gs = K if group_size == -1 else group_size
        q = unpack(qweight, w_bit).float().reshape(qweight.shape[0], -1, gs)
        W = (q - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
        return W.reshape(qweight.shape[0], K).to(scales.dtype)
    mx = mlx()
    w_q, s, b = weight_arrays(qweight, scales, zeros, torch.float32)
    gs = K if group_size == -1 else group_size
    W = mx.dequantize(w_q, s, b, group_size=gs, bits=w_bit)
    return to_torch(W, qweight.device).to(scales.dtype)


# --- registration -----------------------------------------------------------------

_mps_lib = None
_cpu_lib = None


def register_mps() -> None:
    """Registers the MLX kernels for the MPS dispatch key (idempotent)."""
    global _mps_lib
    if _mps_lib is None:
        _mps_lib = torch.library.Library("mpq", "IMPL")
        _mps_lib.impl("matmul", matmul_mlx, "MPS")
        _mps_lib.impl("dequantize", dequantize_mlx, "MPS")


def set_cpu_backend(backend: str, bridge: str = "auto") -> None:
    """"mlx": CPU tensors go through MLX; "native": the C++ CPU kernels.
    bridge (for "mlx"): "cpp" (mpq_ops._mlx), "python" (this module), or
    "auto": the C++ one where it was built."""
    global _cpu_lib
    if backend not in ("mlx", "native"):
        raise ValueError(f"backend must be 'mlx' or 'native', got {backend!r}")
    if bridge not in ("auto", "cpp", "python"):
        raise ValueError(f"bridge must be 'auto', 'cpp' or 'python', got {bridge!r}")
    if backend == "mlx":
        mlx()  # fail now, with the install hint, if mlx is missing
        if bridge == "auto":
            bridge = "cpp" if cpp_bridge() else "python"
        if bridge == "cpp" and not cpp_bridge():
            raise RuntimeError("the C++ MLX bridge (mpq_ops._mlx) was not built: install mlx, "
                               "then rebuild mpq_ops (pip install --no-build-isolation -e .)")
        if cpu_backend(detail=True) == bridge:
            return
    # Back to the native kernels first (each bridge overrides them for CPU).
    if _cpu_lib is not None:
        _cpu_lib._destroy()
        _cpu_lib = None
    if _cpp:
        torch.ops.mpq_mlx.set_cpu_kernels(False)
    if backend == "native":
        return
    if bridge == "cpp":
        torch.ops.mpq_mlx.set_cpu_kernels(True)
    else:
        import warnings
        with warnings.catch_warnings():
            # Replacing the C++ CPU kernel is the point here, not an accident.
            warnings.simplefilter("ignore", UserWarning)
            lib = torch.library.Library("mpq", "IMPL")
            lib.impl("matmul", matmul_mlx, "CPU")
            lib.impl("dequantize", dequantize_mlx, "CPU")
        _cpu_lib = lib


def cpu_backend(detail: bool = False) -> str:
    """"mlx" or "native"; with detail, "cpp" or "python" for the MLX bridge in use."""
    if _cpu_lib is not None:
        return "python" if detail else "mlx"
    if _cpp and torch.ops.mpq_mlx.cpu_kernels_on():
        return "cpp" if detail else "mlx"
    return "native"


@contextlib.contextmanager
def use_mlx_on_cpu(bridge: str = "auto"):
    """Within the block, torch.ops.mpq.* on CPU tensors run through MLX."""
    before = cpu_backend(detail=True)
    set_cpu_backend("mlx", bridge)
    try:
        yield
    finally:
        if before == "native":
            set_cpu_backend("native")
        else:
            set_cpu_backend("mlx", before)


register_mps()
if os.environ.get("MPQ_OPS_CPU_BACKEND", "native") == "mlx":
    set_cpu_backend("mlx")
