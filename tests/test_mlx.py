"""The MLX bridge (the MPS kernels), run for real on Linux through MLX's CPU
backend: mpq_ops.mlx_bridge.use_mlx_on_cpu() routes torch.ops.mpq.* on CPU
tensors through mx.quantized_matmul / mx.dequantize. MPS itself is not
available here: its registration and the fake kernels are checked instead."""
import gc
import itertools
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("mlx.core")

import mlx.core as mx  # noqa: E402

from mpq_ops import MPQLinearMlx, mlx_bridge  # noqa: E402
from helpers import (REL_TOL, make_weight, make_x, np_pack_rows, ref_dequantize,  # noqa: E402
                     ref_matmul, rel_err)

K, N = 256, 96


BRIDGES = ("cpp", "python")


@pytest.fixture(params=BRIDGES)
def mlx_cpu(request):
    """Runs the test through the C++ bridge (mpq_ops._mlx) and the Python one."""
    if request.param == "cpp" and not mlx_bridge.cpp_bridge():
        pytest.skip("mpq_ops._mlx was not built (mlx missing at build time)")
    with mlx_bridge.use_mlx_on_cpu(bridge=request.param):
        yield request.param


def fresh_weight_goes_through_mlx(fn):
    """Runs fn and checks it built MLX weight arrays (so MLX, not C++, served it)."""
    before = mlx_bridge.cached_weights()
    out = fn()
    assert mlx_bridge.cached_weights() == before + 1
    return out


@pytest.mark.parametrize("w_bit", (2, 4, 8))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("group_size", (32, 64, 128))
def test_mlx_matmul_matches_float64(mlx_cpu, w_bit, dtype, group_size):
    for M, with_perm, with_bias in itertools.product((1, 13, 33), (False, True), (False, True)):
        qweight, scales, zeros = make_weight(N, K, w_bit, group_size, dtype)
        # 33 rows as [3, 11, K]; strided x both with and without perm (the
        # bridge converts x into MLX's buffer itself where no perm gathers it).
        lead = (3, 11) if M == 33 else (M,)
        x = make_x(lead, K, dtype, noncontig=with_perm != with_bias)
        perm = torch.randperm(K).to(torch.int32) if with_perm else None
        bias = torch.randn(N).to(dtype) if with_bias else None
        args = (x, qweight, scales, zeros, w_bit, group_size, perm, bias)
        y = fresh_weight_goes_through_mlx(lambda: torch.ops.mpq.matmul(*args))
        assert y.shape == (*lead, N) and y.dtype == dtype
        err = rel_err(y, ref_matmul(*args))
        assert err < REL_TOL[dtype], (M, with_perm, with_bias, err)


@pytest.mark.parametrize("w_bit", (2, 4, 8))
def test_opcheck_through_mlx(mlx_cpu, w_bit):
    """opcheck (schema, fake kernel, autograd registration) with the MLX kernels
    serving CPU: perm and bias, a group size MLX lacks, x and scales wanting grads."""
    from torch.library import opcheck
    for dtype, group_size, M in ((torch.float32, 64, 5), (torch.float16, 32, 1),
                                 (torch.bfloat16, 256, 13)):
        qweight, scales, zeros = make_weight(N, 512, w_bit, group_size, dtype)
        x = make_x((M,), 512, dtype).requires_grad_(True)
        perm = torch.randperm(512).to(torch.int32)
        bias = torch.randn(N).to(dtype)
        opcheck(torch.ops.mpq.matmul.default,
                (x, qweight, scales.requires_grad_(True), zeros, w_bit, group_size, perm, bias))
        opcheck(torch.ops.mpq.dequantize.default, (qweight, scales, zeros, w_bit, group_size))


@pytest.mark.parametrize("w_bit", (2, 4, 8))
def test_mlx_dequantize_matches_float64(mlx_cpu, w_bit):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        qweight, scales, zeros = make_weight(N, K, w_bit, 64, dtype)
        W = torch.ops.mpq.dequantize(qweight, scales, zeros, w_bit, 64)
        ref = torch.from_numpy(ref_dequantize(qweight, scales, zeros, w_bit, 64))
        assert W.dtype == dtype and rel_err(W, ref) < REL_TOL[dtype]


def test_float16_accumulation_error_measured_and_avoided():
    """MLX's CPU kernel accumulates in the input dtype; the bridge feeds it float32.
    Both errors are measured on a long reduction (K = 4096)."""
    Kl = 4096
    qweight, scales, zeros = make_weight(64, Kl, 4, 128, torch.float16)
    x = make_x((8,), Kl, torch.float16)
    ref = ref_matmul(x, qweight, scales, zeros, 4, 128)
    w_q = mx.array(qweight.numpy()).view(mx.uint32)
    s = mx.array(scales.numpy())
    b = mx.array((-(zeros.float() * scales.float())).half().numpy())
    direct = mx.quantized_matmul(mx.array(x.numpy()), w_q, s, b, transpose=True, group_size=128,
                                 bits=4)
    direct_err = rel_err(torch.from_numpy(__import__("numpy").array(direct)), ref)
    bridge_err = rel_err(mlx_bridge.matmul_mlx(x, qweight, scales, zeros, 4, 128), ref)
    print(f"float16 in MLX's CPU kernel: rel. error {direct_err:.2e}; through the bridge "
          f"(float32 inside): {bridge_err:.2e}")
    assert bridge_err < REL_TOL[torch.float16]
    assert bridge_err <= direct_err
    if mlx_bridge.cpp_bridge():
        cpp_err = rel_err(torch.ops.mpq_mlx.matmul(x, qweight, scales, zeros, 4, 128), ref)
        assert cpp_err < REL_TOL[torch.float16] and cpp_err <= direct_err


@pytest.mark.parametrize("group_size", (-1, 256))
def test_group_sizes_mlx_lacks_fall_back(mlx_cpu, group_size):
    qweight, scales, zeros = make_weight(N, 512, 4, group_size, torch.float16)
    x = make_x((5,), 512, torch.float16)
    before = mlx_bridge.cached_weights()
    y = torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, group_size)
    assert mlx_bridge.cached_weights() == before  # not MLX: the torch fallback
    assert rel_err(y, ref_matmul(x, qweight, scales, zeros, 4, group_size)) < 1e-3


def test_weight_arrays_cached_once_and_in_place_updates_seen(mlx_cpu):
    qweight, scales, zeros = make_weight(N, K, 4, 32, torch.float32)
    x = make_x((3,), K, torch.float32)
    before = mlx_bridge.cached_weights()
    torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, 32)
    torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, 32)
    assert mlx_bridge.cached_weights() == before + 1  # made once
    if mlx_cpu == "python":
        first = mlx_bridge.weight_arrays(qweight, scales, zeros, torch.float32)
        assert mlx_bridge.weight_arrays(qweight, scales, zeros, torch.float32) is first
    for update in (lambda: scales.mul_(2), lambda: zeros.add_(1),
                   lambda: qweight.copy_(qweight.flip(0))):
        update()  # in place: the cache must notice
        y = torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, 32)
        assert rel_err(y, ref_matmul(x, qweight, scales, zeros, 4, 32)) < 1e-5
    assert mlx_bridge.cached_weights() == before + 1  # replaced, not added
    zeros = zeros.clone()  # a new tensor in place of an old one: seen too
    zeros.sub_(2)
    y = torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, 32)
    assert rel_err(y, ref_matmul(x, qweight, scales, zeros, 4, 32)) < 1e-5
    del qweight
    gc.collect()
    assert mlx_bridge.cached_weights() == before  # weakly held: gone with the weight


def test_python_bridge_not_fooled_by_a_reused_address(monkeypatch):
    """A zeros tensor made after the old one was freed may take its Python id,
    its data pointer and its version (0): the Python bridge's cache must still
    see another tensor (each one is held weakly and compared by identity).
    Here every tensor reports one id and one address. (The C++ bridge compares
    TensorImpl pointers it holds weakly, which keeps them from being reused.)"""
    monkeypatch.setattr(torch.Tensor, "data_ptr", lambda self: 0)
    monkeypatch.setattr(mlx_bridge, "id", lambda obj: 0, raising=False)
    with mlx_bridge.use_mlx_on_cpu(bridge="python"):
        qweight, scales, zeros = make_weight(N, K, 4, 32, torch.float32)
        x = make_x((3,), K, torch.float32)
        for _ in range(3):
            y = torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, 32)
            assert rel_err(y, ref_matmul(x, qweight, scales, zeros, 4, 32)) < 1e-5
            zeros = torch.rand(zeros.shape)  # version 0, like the one it replaces


def test_gradients_through_mlx(mlx_cpu):
    qweight, scales, zeros = make_weight(N, K, 4, 64, torch.float32)
    x = make_x((4,), K, torch.float32).requires_grad_(True)
    scales.requires_grad_(True)
    y = torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, 64)
    g = torch.randn_like(y)
    gx, gs = torch.autograd.grad(y, (x, scales), g)
    W = torch.from_numpy(ref_dequantize(qweight, scales.detach(), zeros, 4, 64))
    assert rel_err(gx, g.double() @ W) < 1e-5
    mlx_bridge.set_cpu_backend("native")
    gx2, gs2 = torch.autograd.grad(torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, 64),
                                   (x, scales), g)
    mlx_bridge.set_cpu_backend("mlx")
    assert rel_err(gs, gs2.double()) < 1e-5


def test_backend_switch():
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    assert mlx_bridge.cpu_backend() == "native"
    for bridge in ("python", "cpp") if mlx_bridge.cpp_bridge() else ("python",):
        with mlx_bridge.use_mlx_on_cpu(bridge):
            assert mlx_bridge.cpu_backend() == "mlx"
            assert mlx_bridge.cpu_backend(detail=True) == bridge
            with mlx_bridge.use_mlx_on_cpu("python"):  # nested switch, restored after
                assert mlx_bridge.cpu_backend(detail=True) == "python"
            assert mlx_bridge.cpu_backend(detail=True) == bridge
        assert mlx_bridge.cpu_backend() == "native"
        assert has_kernel("mpq::matmul", "CPU")  # the native kernel is back
    with pytest.raises(ValueError, match="backend must be 'mlx' or 'native'"):
        mlx_bridge.set_cpu_backend("metal")
    with pytest.raises(ValueError, match="bridge must be 'auto', 'cpp' or 'python'"):
        mlx_bridge.set_cpu_backend("mlx", bridge="rust")


def test_native_kernels_serve_again_after_the_switch():
    """After use_mlx_on_cpu, a fresh weight is served by the C++ CPU kernel (no
    MLX arrays made), and gives the same result."""
    qweight, scales, zeros = make_weight(N, K, 4, 64, torch.float32)
    x = make_x((3,), K, torch.float32)
    for bridge in ("python", "cpp") if mlx_bridge.cpp_bridge() else ("python",):
        q1, q2 = qweight.clone(), qweight.clone()  # fresh weights, alive through the checks
        with mlx_bridge.use_mlx_on_cpu(bridge):
            through_mlx = fresh_weight_goes_through_mlx(
                lambda: torch.ops.mpq.matmul(x, q1, scales, zeros, 4, 64))
        before = mlx_bridge.cached_weights()
        native = torch.ops.mpq.matmul(x, q2, scales, zeros, 4, 64)
        assert mlx_bridge.cached_weights() == before
        torch.testing.assert_close(through_mlx, native, rtol=1e-5, atol=1e-5)


def test_missing_mlx_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx", None)
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    monkeypatch.setattr(mlx_bridge, "_mx", None)  # as in a process that never had mlx
    with pytest.raises(RuntimeError, match=r"pip install mpq_ops\[mlx\]"):
        mlx_bridge.mlx()


def test_bad_input_through_mlx(mlx_cpu):
    qweight, scales, zeros = make_weight(N, K, 4, 64, torch.float16)
    x = make_x((2,), K, torch.float16)
    with pytest.raises(ValueError, match="w_bit must be 2, 4 or 8, got 3"):
        torch.ops.mpq.matmul(x, qweight, scales, zeros, 3, 64)
    with pytest.raises(RuntimeError, match="scales must have the dtype of x"):
        torch.ops.mpq.matmul(x, qweight, scales.float(), zeros, 4, 64)
    with pytest.raises(RuntimeError, match="perm values must lie in"):
        torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, 64, torch.arange(K) + 1)


# --- MPS: registration and fakes (no MPS device here) ---------------------------

def test_mps_kernels_registered():
    for op in ("mpq::matmul", "mpq::dequantize"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "MPS"), op


def test_fake_kernels_report_mps():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 7, K, dtype=torch.float16, device="mps")
        qweight = torch.empty(N, K // 8, dtype=torch.int32, device="mps")
        scales = torch.empty(N, K // 64, dtype=torch.float16, device="mps")
        y = torch.ops.mpq.matmul(x, qweight, scales, scales, 4, 64)
        W = torch.ops.mpq.dequantize(qweight, scales, scales, 4, 64)
    assert y.device.type == "mps" and y.shape == (2, 7, N) and y.dtype == torch.float16
    assert W.device.type == "mps" and W.shape == (N, K)


def mlx_layer_model():
    """Two MPQLinearMlx layers loaded from bitorch-engine GPTQ-style buffers."""
    torch.manual_seed(0)
    layers = []
    for k, n in ((K, 128), (128, 64)):
        layer = MPQLinearMlx(k, n, w_bit=4, group_size=32, use_gba_quant=False,
                             dtype=torch.float32)
        q = torch.randint(0, 16, (k, n))
        sd = layer.state_dict()
        sd["qweight"] = torch.from_numpy(np_pack_rows(q.t().numpy(), 4).T.copy())
        sd["qzeros"] = torch.from_numpy(np_pack_rows(torch.randint(0, 15, (k // 32, n)).numpy(), 4))
        sd["scales"] = torch.rand(k // 32, n) * 0.02 + 0.01
        layer.load_state_dict(sd)
        layer.prepare_params()
        layers.append(layer)
    return nn.Sequential(layers[0], nn.GELU(), layers[1]).eval()


def test_mpq_linear_mlx_runs_through_mlx_and_exports():
    model = mlx_layer_model()
    x = torch.randn(3, 5, K)
    native = model(x)
    with mlx_bridge.use_mlx_on_cpu():
        before = mlx_bridge.cached_weights()
        through_mlx = model(x)
        assert mlx_bridge.cached_weights() == before + 2
    torch.testing.assert_close(through_mlx, native, rtol=1e-5, atol=1e-5)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b"),
                                                           1: torch.export.Dim("s")},),
                             strict=False)
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.mpq.matmul.default) == 2
    with mlx_bridge.use_mlx_on_cpu():
        torch.testing.assert_close(ep.module()(x), native, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    with mlx_bridge.use_mlx_on_cpu():
        torch.testing.assert_close(compiled(x), native, rtol=1e-5, atol=1e-5)
