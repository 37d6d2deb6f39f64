"""mpq::matmul and mpq::dequantize: numbers against a float64 reference,
opcheck, autograd, and errors on bad input."""
import itertools

import numpy as np
import pytest
import torch
from torch.library import opcheck

import mpq_ops
from conftest import devices
from helpers import (REL_TOL, make_weight, make_x, np_unpack_rows, ref_dequantize, ref_matmul,
                     rel_err)

W_BITS = (2, 4, 8)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUPS = (32, 64, 128, -1)
MS = (0, 1, 13, 33)
K, N = 256, 96


def dtypes_for(device):
    # float32 activations are a CPU/MPS feature; CUDA serves fp16/bf16.
    return DTYPES if device == "cpu" else DTYPES[:2]


def sample(device, w_bit, dtype, group_size, M, with_perm, with_bias, noncontig, lead=None):
    qweight, scales, zeros = make_weight(N, K, w_bit, group_size, dtype, device)
    x = make_x(lead if lead is not None else (M,), K, dtype, device, noncontig)
    perm = torch.randperm(K, device=device).to(torch.int32) if with_perm else None
    bias = torch.randn(N, device=device).to(dtype) if with_bias else None
    return (x, qweight, scales, zeros, w_bit, group_size, perm, bias)


# --- numbers ------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("w_bit", W_BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul_matches_float64_reference(device, w_bit, group_size, dtype):
    if dtype not in dtypes_for(device):
        pytest.skip("float32 is not served on this device")
    for M, with_perm, with_bias, noncontig in itertools.product(
            MS, (False, True), (False, True), (False, True)):
        args = sample(device, w_bit, dtype, group_size, M, with_perm, with_bias, noncontig)
        y = torch.ops.mpq.matmul(*args)
        assert y.shape == (M, N) and y.dtype == dtype and y.device.type == device
        err = rel_err(y, ref_matmul(*args))
        assert err < REL_TOL[dtype], (M, with_perm, with_bias, noncontig, err)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("lead", [(2, 3), (1, 1, 5), (4, 0), ()], ids=str)
def test_matmul_leading_dims(device, lead):
    dtype = torch.float16
    args = sample(device, 4, dtype, 64, None, True, True, False, lead=lead)
    y = torch.ops.mpq.matmul(*args)
    assert y.shape == (*lead, N)
    assert rel_err(y, ref_matmul(*args)) < REL_TOL[dtype]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("w_bit", W_BITS)
def test_matmul_without_inputs(device, w_bit):
    """K = 0: y is exactly the bias, or zeros, for row counts that each of
    the CUDA paths would take (1, 16, 40, 200) and for none."""
    for dtype, M, group_size, with_bias in itertools.product(
            dtypes_for(device), (0, 1, 16, 40, 200), (32, -1), (False, True)):
        qweight = torch.zeros(N, 0, dtype=torch.int32, device=device)
        scales = torch.zeros(N, 0, dtype=dtype, device=device)
        bias = torch.randn(N, device=device).to(dtype) if with_bias else None
        x = torch.randn(M, 0, dtype=dtype, device=device)
        y = torch.ops.mpq.matmul(x, qweight, scales, scales.clone(), w_bit, group_size, None,
                                 bias)
        expected = torch.zeros(M, N, dtype=dtype, device=device)
        if with_bias:
            expected += bias
        assert torch.equal(y, expected), (dtype, M, group_size, with_bias)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("w_bit", W_BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_dequantize_matches_float64_reference(device, w_bit, group_size):
    for dtype in dtypes_for(device):
        qweight, scales, zeros = make_weight(N, K, w_bit, group_size, dtype, device)
        W = torch.ops.mpq.dequantize(qweight, scales, zeros, w_bit, group_size)
        assert W.shape == (N, K) and W.dtype == dtype
        ref = torch.from_numpy(ref_dequantize(qweight, scales, zeros, w_bit, group_size))
        # One rounding of each element to dtype.
        assert rel_err(W, ref) < REL_TOL[dtype]


def test_matmul_output_fully_written():
    """Run into a poisoned allocation pool: every output element must be written."""
    for _ in range(3):
        torch.full((4096,), float("nan")).sum()  # leave NaNs in freed memory
        args = sample("cpu", 4, torch.float16, 32, 13, True, False, False)
        y = torch.ops.mpq.matmul(*args)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("isa", ("native", "baseline"))
@pytest.mark.parametrize("w_bit", W_BITS)
@pytest.mark.parametrize("K,group_size", [(32, -1), (96, 32), (160, 32), (224, -1), (384, 128),
                                          (576, 32), (320, 64), (192, 96), (2048, 64)])
def test_cpu_kernel_tiles_and_tails(w_bit, K, group_size, isa, monkeypatch):
    """The CPU kernels' corners: rows of x in every tile mix (8, 4, 2, 1) up to
    the fused kernel's limit (16 to 40 rows by K with AVX2, 8 without) and past
    it (blocked dequantize + BLAS, a thread's last block short), words past the last
    block of eight (K = 32 .. 224), blocks that straddle groups (groups of 96)
    or hold two or four of them (groups of 32, 2-bit groups of 64),
    float32 so that the tolerance is tight; the fused kernel's AVX2 build where
    the CPU has it and its baseline build."""
    if isa == "baseline":
        monkeypatch.setenv("MPQ_OPS_CPU_ISA", "baseline")
    N = 1000 if K == 2048 else 37
    qweight, scales, zeros = make_weight(N, K, w_bit, group_size, torch.float32)
    for M in (1, 2, 3, 5, 7, 8, 9, 11, 15, 16, 17, 23, 24, 25, 40, 41):
        x = make_x((M,), K, torch.float32)
        y = torch.ops.mpq.matmul(x, qweight, scales, zeros, w_bit, group_size)
        err = rel_err(y, ref_matmul(x, qweight, scales, zeros, w_bit, group_size))
        assert err < REL_TOL[torch.float32], (M, err)


@pytest.mark.parametrize("isa", ("native", "baseline"))
@pytest.mark.parametrize("bias", (False, True), ids=("no_bias", "bias"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("w_bit", W_BITS)
@pytest.mark.parametrize("K,group_size", [(96, 32), (160, 32), (576, 64), (384, -1)])
def test_cpu_half_as_their_float32_values(w_bit, K, group_size, dtype, bias, isa, monkeypatch):
    """float16 / bfloat16 x, scales, zeros and bias on the CPU give bit for bit
    the float32 op's y on the same values, rounded to dtype: the fused kernel
    converts x before it, each thread the scales and zeros of its weight rows
    and its columns of y (times the row's power of two, plus bias, rounded),
    eight at a time in the AVX2 build and the rest one by one; its tiles take
    the scales a turn of rows at a time, which must neither lose nor shift a
    row. Ragged N (37: a last turn of 5 rows, threads' shares not multiples
    of 8), groups per row from 1 to 9, row counts of each tile and past the
    fused kernel's limit; rows of x that make y overflow float16, a row with
    an infinity and one with a NaN (compared as NaN)."""
    if isa == "baseline":
        monkeypatch.setenv("MPQ_OPS_CPU_ISA", "baseline")
    N = 37
    qweight, scales, zeros = make_weight(N, K, w_bit, group_size, dtype)
    b = torch.randn(N).to(dtype) if bias else None
    for M in (1, 3, 8, 13, 41):
        x = make_x((M,), K, dtype)
        if M >= 3:
            x[0] *= 1000  # |y| past float16's 65504: infinities, not bfloat16's
            x[1, K // 2] = float("inf")
            x[2, 1] = float("nan")
        y = torch.ops.mpq.matmul(x, qweight, scales, zeros, w_bit, group_size, None, b)
        y32 = torch.ops.mpq.matmul(x.float(), qweight, scales.float(), zeros.float(), w_bit,
                                   group_size, None, None if b is None else b.float())
        assert y.dtype == dtype
        torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, M=M: f"M = {M}: {m}")
        finite = 3 if M >= 3 else 0  # (and the float32 op against float64)
        ref = ref_matmul(x[finite:], qweight, scales, zeros, w_bit, group_size, None, b)
        assert rel_err(y32[finite:], ref) < REL_TOL[torch.float32], M


@pytest.mark.parametrize("isa", ("native", "baseline"))
@pytest.mark.parametrize("w_bit", W_BITS)
@pytest.mark.parametrize("K,group_size", [(576, 32), (2048, 64), (384, -1)])
def test_cpu_one_row_tile_rows_of_any_magnitude(w_bit, K, group_size, isa, monkeypatch):
    """The CPU kernel's one-row tile scales late, with x multiplied by up to
    2^-28 per code and sums of codes times x: rows of x from 1e-35 (whose
    products would be subnormal unless the row is first scaled) to 1e34 in
    float32, a row of zeros, each alone (M = 1) and as the one-row tile after
    a tile of four (M = 5), against float64."""
    if isa == "baseline":
        monkeypatch.setenv("MPQ_OPS_CPU_ISA", "baseline")
    qweight, scales, zeros = make_weight(53, K, w_bit, group_size, torch.float32)
    for magnitude in (1e-35, 1e-20, 1.0, 1e20, 1e34, 0.0):
        x = make_x((5,), K, torch.float32) * magnitude
        ref = ref_matmul(x, qweight, scales, zeros, w_bit, group_size)
        for rows in (slice(4, 5), slice(0, 5)):
            y = torch.ops.mpq.matmul(x[rows], qweight, scales, zeros, w_bit, group_size)
            if magnitude == 0.0:
                assert torch.equal(y, torch.zeros_like(y))
                continue
            # rel_err's floor on the norm (1e-30) would hide the smallest rows' errors
            assert torch.isfinite(y).all()
            err = ((y.double() - ref[rows]).norm() / ref[rows].norm()).item()
            assert err < REL_TOL[torch.float32], (magnitude, rows, err)


@pytest.mark.parametrize("w_bit", W_BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,group_size", [(576, 64), (1056, 32), (384, 128), (288, -1)])
def test_cpu_dequantize_rounds_once_in_both_builds(w_bit, dtype, K, group_size, monkeypatch):
    """mpq::dequantize on the CPU gives each weight as (q - z) * s in float32,
    each operation rounded once, then rounded to the scales' dtype: the same
    bits from the AVX2 build (where the CPU has it) and the baseline build,
    including weights past float16's range, float16 subnormals, and scales that
    are infinite or not a number (NaN where the baseline gives NaN)."""
    qweight, scales, zeros = make_weight(45, K, w_bit, group_size, dtype)
    scales[0, 0], scales[1, 0], scales[2, 0], scales[3, 0] = float("inf"), float("nan"), 1e-6, 6e4
    q = torch.from_numpy(np_unpack_rows(qweight.numpy(), w_bit).astype(np.float32))
    gs = K if group_size == -1 else group_size
    z = zeros.float().repeat_interleave(gs, dim=1)
    s = scales.float().repeat_interleave(gs, dim=1)
    expected = ((q - z) * s).to(dtype)  # float32 ops, then one rounding to dtype
    W = torch.ops.mpq.dequantize(qweight, scales, zeros, w_bit, group_size)
    monkeypatch.setenv("MPQ_OPS_CPU_ISA", "baseline")
    W_base = torch.ops.mpq.dequantize(qweight, scales, zeros, w_bit, group_size)
    bits = {2: torch.int16, 4: torch.int32}[W.element_size()]
    assert torch.equal(W.view(bits), W_base.view(bits))
    nan = expected.isnan()
    assert nan[1, :gs].all() and torch.equal(W.isnan(), nan)
    assert torch.equal(W[~nan], expected[~nan])


# --- opcheck ------------------------------------------------------------------

def opcheck_samples(device):
    """Every (w_bit, dtype, group_size); M, perm, bias, strides and grad cycle through."""
    combos = list(itertools.product(W_BITS, dtypes_for(device), GROUPS))
    flags = list(itertools.product(MS, (False, True), (False, True), (False, True)))
    for i, (w_bit, dtype, gs) in enumerate(combos):
        for j in range(2):
            M, with_perm, with_bias, noncontig = flags[(2 * i + j * 7) % len(flags)]
            args = sample(device, w_bit, dtype, gs, M, with_perm, with_bias, noncontig)
            if j == 1:
                args[0].requires_grad_(True)
            yield pytest.param(args, id=f"w{w_bit}-{str(dtype)[6:]}-g{gs}-M{M}-p{int(with_perm)}"
                                        f"-b{int(with_bias)}-nc{int(noncontig)}-grad{j}")


@pytest.mark.parametrize("args", list(opcheck_samples("cpu")))
def test_opcheck_matmul_cpu(args):
    opcheck(torch.ops.mpq.matmul.default, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_opcheck_matmul_cuda():
    for p in opcheck_samples("cuda"):
        args = p.values[0]
        opcheck(torch.ops.mpq.matmul.default, args)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("w_bit", W_BITS)
@pytest.mark.parametrize("group_size", (32, -1))
def test_opcheck_dequantize(device, w_bit, group_size):
    for dtype in dtypes_for(device):
        qweight, scales, zeros = make_weight(N, K, w_bit, group_size, dtype, device)
        scales.requires_grad_(True)
        opcheck(torch.ops.mpq.dequantize.default, (qweight, scales, zeros, w_bit, group_size))


def test_opcheck_scale_and_zero_grads():
    args = list(sample("cpu", 4, torch.float32, 64, 5, True, True, False))
    for i in (0, 2, 3, 7):
        args[i].requires_grad_(True)
    opcheck(torch.ops.mpq.matmul.default, tuple(args))


def test_every_op_has_a_fake_kernel():
    from torch._library.simple_registry import singleton
    ns = torch.ops.mpq
    names = [n for n in dir(ns) if isinstance(getattr(ns, n), torch._ops.OpOverloadPacket)]
    assert sorted(names) == ["dequantize", "matmul"]
    for name in names:
        for overload in getattr(ns, name).overloads():
            op = getattr(getattr(ns, name), overload)
            assert singleton.find(op.name()).fake_impl.kernel is not None, op.name()


def test_fake_kernel_shapes_under_symbolic_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    args = sample("cpu", 4, torch.bfloat16, 64, 7, True, True, False)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake = [mode.from_tensor(a, static_shapes=False) if isinstance(a, torch.Tensor) else a
                for a in args]
        y = torch.ops.mpq.matmul(*fake)
        assert y.dtype == torch.bfloat16 and y.dim() == 2 and y.shape[1] == N
        W = torch.ops.mpq.dequantize(*fake[1:6])
        assert W.shape[0] == N and W.dtype == torch.bfloat16


# --- autograd -----------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("with_perm,with_bias", ((False, False), (True, True), (False, True)))
def test_typed_wrapper_in_every_grad_mode(device, with_perm, with_bias):
    """mpq_ops.matmul calls the op below autograd when grad mode is off: the
    op's output bit for bit, no graph; with grad on, the op's autograd."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    args = sample(device, 4, dtype, 64, 5, with_perm, with_bias, False)
    args[0].requires_grad_(True)
    with torch.enable_grad():
        y_op = torch.ops.mpq.matmul(*args)
        y = mpq_ops.matmul(*args)
    assert y.grad_fn is not None and torch.equal(y, y_op)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y = mpq_ops.matmul(*args)
        assert y.grad_fn is None and not y.requires_grad and torch.equal(y, y_op.detach()), mode
    assert rel_err(y, ref_matmul(*args)) < REL_TOL[dtype]
    # Below autograd the op's own checks still answer bad input.
    other = torch.bfloat16 if dtype != torch.bfloat16 else torch.float16
    with torch.no_grad(), pytest.raises(RuntimeError, match="scales must have the dtype of x"):
        mpq_ops.matmul(args[0], args[1], args[2].to(other), *args[3:])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("with_perm", (False, True))
def test_gradients_match_float64(device, with_perm):
    dtype = torch.float32 if device == "cpu" else torch.float16
    x, qweight, scales, zeros, w_bit, gs, perm, bias = sample(
        device, 4, dtype, 64, 9, with_perm, True, False, lead=(3, 3))
    for t in (x, scales, zeros, bias):
        t.requires_grad_(True)
    y = torch.ops.mpq.matmul(x, qweight, scales, zeros, w_bit, gs, perm, bias)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, scales, zeros, bias), g)

    # float64 reference built from plain torch ops on the unpacked codes.
    from helpers import np_unpack_rows
    q = torch.from_numpy(np_unpack_rows(qweight.cpu().numpy(), w_bit)).double()
    s64, z64, x64, b64 = (t.detach().cpu().double().requires_grad_(True)
                          for t in (scales, zeros, x, bias))
    W = (q - z64.repeat_interleave(gs, 1)) * s64.repeat_interleave(gs, 1)
    xp = x64 if perm is None else x64[..., perm.cpu().long()]
    y64 = xp @ W.T + b64
    ref = torch.autograd.grad(y64, (x64, s64, z64, b64), g.cpu().double())
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for name, a, r in zip(("x", "scales", "zeros", "bias"), grads, ref):
        assert a.dtype == dtype, name
        assert rel_err(a, r) < tol, (name, rel_err(a, r))


def test_dequantize_gradients_match_float64():
    qweight, scales, zeros = make_weight(N, K, 2, 32, torch.float32)
    scales.requires_grad_(True)
    zeros.requires_grad_(True)
    W = torch.ops.mpq.dequantize(qweight, scales, zeros, 2, 32)
    g = torch.randn_like(W)
    ds, dz = torch.autograd.grad(W, (scales, zeros), g)
    s64 = scales.detach().double().requires_grad_(True)
    z64 = zeros.detach().double().requires_grad_(True)
    from helpers import np_unpack_rows
    q = torch.from_numpy(np_unpack_rows(qweight.numpy(), 2)).double()
    W64 = (q - z64.repeat_interleave(32, 1)) * s64.repeat_interleave(32, 1)
    rs, rz = torch.autograd.grad(W64, (s64, z64), g.double())
    assert rel_err(ds, rs) < 1e-5 and rel_err(dz, rz) < 1e-5


# --- bad input ----------------------------------------------------------------

def good(**over):
    args = dict(zip(("x", "qweight", "scales", "zeros", "w_bit", "group_size", "perm", "bias"),
                    sample("cpu", 4, torch.float16, 64, 3, True, True, False)))
    args.update(over)
    return args


def call(args):
    return torch.ops.mpq.matmul(args["x"], args["qweight"], args["scales"], args["zeros"],
                                args["w_bit"], args["group_size"], args["perm"], args["bias"])


BAD = {
    "w_bit3": (dict(w_bit=3), ValueError, "w_bit must be 2, 4 or 8, got 3"),
    "w_bit5": (dict(w_bit=5), ValueError, "w_bit must be 2, 4 or 8, got 5"),
    "w_bit16": (dict(w_bit=16), ValueError, "w_bit must be 2, 4 or 8, got 16"),
    "group_not_dividing": (dict(group_size=96), ValueError, "group_size 96 must divide"),
    "group_not_mult32": (dict(group_size=48), ValueError, "positive multiple of 32, got 48"),
    "x_int": (dict(x=torch.ones(3, K, dtype=torch.int32)), RuntimeError, "x must be float16"),
    "x_float64": (dict(x=torch.ones(3, K, dtype=torch.float64)), RuntimeError,
                  "x must be float16, bfloat16 or float32, got"),
    "scales_dtype": (dict(scales=torch.ones(N, K // 64, dtype=torch.bfloat16)), RuntimeError,
                     "scales must have the dtype of x"),
    "zeros_dtype": (dict(zeros=torch.ones(N, K // 64)), RuntimeError,
                    "zeros must have the dtype of scales"),
    "qweight_dtype": (dict(qweight=torch.ones(N, K // 8, dtype=torch.int64)), RuntimeError,
                      "qweight must be int32"),
    "qweight_shape": (dict(qweight=torch.ones(N, K // 4, dtype=torch.int32)), RuntimeError,
                      "qweight must have shape [N, 32]"),
    "x_K_mismatch": (dict(x=torch.ones(3, K + 32, dtype=torch.float16)), RuntimeError,
                     "qweight must have shape"),
    "K_not_mult32": (dict(x=torch.ones(3, 40, dtype=torch.float16)), RuntimeError,
                     "multiple of 32"),
    "scales_shape": (dict(scales=torch.ones(N, 3, dtype=torch.float16)), RuntimeError,
                     "scales must have shape [N, K/group_size] = [96, 4]"),
    "zeros_shape": (dict(zeros=torch.ones(N + 1, 4, dtype=torch.float16)), RuntimeError,
                    "zeros must have shape"),
    "perm_shape": (dict(perm=torch.arange(K - 1)), RuntimeError, "perm must have shape [K]"),
    "perm_dtype": (dict(perm=torch.arange(K).float()), RuntimeError, "perm must be int32 or int64"),
    "perm_range": (dict(perm=torch.arange(K) + 1), RuntimeError, "perm values must lie in"),
    "bias_shape": (dict(bias=torch.ones(N + 1, dtype=torch.float16)), RuntimeError,
                   "bias must have shape [N]"),
    "bias_dtype": (dict(bias=torch.ones(N)), RuntimeError, "bias must have the dtype of x"),
    "scalar_x": (dict(x=torch.tensor(1.0, dtype=torch.float16)), RuntimeError,
                 "at least 1 dimension"),
    "device_meta": (dict(scales=torch.ones(N, 4, dtype=torch.float16, device="meta")),
                    RuntimeError, "scales must be on the same device as qweight"),
}


@pytest.mark.parametrize("case", list(BAD), ids=str)
def test_bad_input_raises_clear_error(case):
    over, exc, msg = BAD[case]
    with pytest.raises(exc, match=_re(msg)):
        call(good(**over))


@pytest.mark.parametrize("case", [c for c in BAD if c not in ("perm_range",)], ids=str)
def test_fake_kernel_makes_the_same_checks(case):
    """Same errors while tracing (FakeTensor), as torch.compile/export see them."""
    over, exc, msg = BAD[case]
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = good(**over)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                for k, v in args.items()}
        with pytest.raises(exc, match=_re(msg)):
            call(fake)


@pytest.mark.parametrize("perm_dtype", (torch.int32, torch.int64), ids=str)
def test_cpu_perm_values_checked_on_both_paths(perm_dtype):
    """perm values outside [0, K) raise on the CPU whichever path serves the
    rows: the fused kernel, which checks them as it gathers x's columns, and
    the blocked path past its row limit (index_select's own error would not
    name perm); a valid perm gathers alike on both (against float64)."""
    qweight, scales, zeros = make_weight(N, K, 4, 64, torch.float32)
    for M in (1, 3, 200):
        x = make_x((M,), K, torch.float32)
        for bad, seen in ((torch.arange(K) + 1, f"[1, {K}]"),
                          (torch.arange(K) - 2, f"[-2, {K - 3}]")):
            with pytest.raises(RuntimeError, match=_re(f"perm values must lie in [0, {K}), "
                                                       f"got values in {seen}")):
                torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, 64, bad.to(perm_dtype))
        perm = torch.randperm(K).to(perm_dtype)
        y = torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, 64, perm)
        ref = ref_matmul(x, qweight, scales, zeros, 4, 64, perm)
        assert rel_err(y, ref) < REL_TOL[torch.float32], M


def test_dequantize_bad_input():
    qweight, scales, zeros = make_weight(N, K, 4, 64, torch.float16)
    with pytest.raises(ValueError, match="w_bit must be 2, 4 or 8, got 3"):
        torch.ops.mpq.dequantize(qweight, scales, zeros, 3, 64)
    with pytest.raises(RuntimeError, match="scales must have shape"):
        torch.ops.mpq.dequantize(qweight, scales[:, :2], zeros, 4, 64)
    with pytest.raises(RuntimeError, match="zeros must have the dtype of scales"):
        torch.ops.mpq.dequantize(qweight, scales, zeros.float(), 4, 64)
    with pytest.raises(RuntimeError, match="qweight must be 2-D"):
        torch.ops.mpq.dequantize(qweight.flatten(), scales, zeros, 4, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices_raise():
    args = good()
    with pytest.raises(RuntimeError, match="qweight must be on the same device as x"):
        call(dict(args, x=args["x"].cuda()))
    with pytest.raises(RuntimeError, match="bias must be on the same device as x"):
        call({k: (v.cuda() if isinstance(v, torch.Tensor) and k != "bias" else v)
              for k, v in args.items()})


def _re(msg):
    import re
    return re.escape(msg)


def test_dispatcher_registrations():
    for op in ("mpq::matmul", "mpq::dequantize"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd") or \
            torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutogradCPU")
