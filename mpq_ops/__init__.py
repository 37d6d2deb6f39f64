"""mpq_ops: mixed-precision quantized matmul as PyTorch custom ops.

Importing this package loads the compiled library (schema, CPU and CUDA
kernels) and registers the fake kernels and autograd formulas."""
import torch  # noqa: F401  (the extension needs libtorch loaded first)

try:
    from . import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only when the build is missing or broken
    raise ImportError(
        "mpq_ops: the compiled extension mpq_ops._C could not be loaded "
        f"({e}). Build it with `pip install --no-build-isolation -e .`."
    ) from e

from . import ops  # noqa: E402,F401
# MPS kernels (through MLX) are registered even without mlx installed: a call
# then fails with the install hint instead of "no kernel for MPS".
from . import mlx_bridge  # noqa: E402,F401
from .formats import CanonicalWeight, from_gptq  # noqa: E402
from .layers import (MPQLinear, MPQLinearBase, MPQLinearCuda, MPQLinearMlx,  # noqa: E402
                     prepare_bie_layers)
from .ops import dequantize, matmul  # noqa: E402
from .pack import pack, unpack  # noqa: E402
from .quantize import QuantizedWeight, quantize_rtn  # noqa: E402

__all__ = [
    "matmul", "dequantize", "pack", "unpack", "quantize_rtn", "QuantizedWeight", "from_gptq",
    "CanonicalWeight", "MPQLinear", "MPQLinearBase", "MPQLinearCuda", "MPQLinearMlx",
    "prepare_bie_layers",
]
