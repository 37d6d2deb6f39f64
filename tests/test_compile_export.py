"""torch.compile, torch.export and AOTInductor over a small model of MPQ layers."""
import pytest
import torch
from torch import nn
from torch.testing._internal.common_utils import TestCase

import mpq_ops
from helpers import run_script
from mpq_ops import MPQLinear

K, H = 64, 96


class TinyMLP(nn.Module):
    """Two MPQ layers (one with act-order perm and bias) around a nonlinearity."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        up = nn.Linear(K, H, bias=True, dtype=dtype)
        down = nn.Linear(H, K, bias=False, dtype=dtype)
        self.up = MPQLinear.from_linear(up, w_bit=4, group_size=32)
        self.down = MPQLinear.from_linear(down, w_bit=8, group_size=-1)
        # Give `up` an act-order permutation, as GPTQ files with desc_act have.
        self.up.perm = torch.randperm(K).to(torch.int32)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


def make_model():
    return TinyMLP().eval()


def test_compile_fullgraph_dynamic_one_compile_no_breaks():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = make_model()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    explain = torch._dynamo.explain(model)(torch.randn(2, 5, K))
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    # Size-oblivious shapes: M=1 must not get a graph of its own.
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        for M in (1, 2, 3, 17, 257):
            x = torch.randn(2, M, K)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, counter.frame_count


def test_compiled_backward_matches_eager():
    torch._dynamo.reset()
    model = make_model()
    model.up.scales.requires_grad_(True)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for M in (3, 17):
        x = torch.randn(2, M, K, requires_grad=True)
        g = torch.randn(2, M, K)
        eager = torch.autograd.grad(model(x), (x, model.up.scales), g)
        comp = torch.autograd.grad(compiled(x), (x, model.up.scales), g)
        for a, b in zip(comp, eager):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def export(model, strict):
    batch = torch.export.Dim("batch", max=1024)
    seq = torch.export.Dim("seq", max=4096)
    x = torch.randn(2, 5, K)
    return torch.export.export(model, (x,), dynamic_shapes=({0: batch, 1: seq},), strict=strict)


class TestExport(TestCase):
    def test_graph_holds_mpq_matmul(self):
        for strict in (True, False):
            ep = export(make_model(), strict)
            ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
            self.assertEqual(ops.count(torch.ops.mpq.matmul.default), 2)
        self.assertExpectedInline(str(ep.graph_module.code).strip(), """\
def forward(self, p_up_qweight, p_down_qweight, b_up_scales, b_up_zeros, b_up_perm, b_up_bias, b_down_scales, b_down_zeros, x):
    matmul = torch.ops.mpq.matmul.default(x, p_up_qweight, b_up_scales, b_up_zeros, 4, 32, b_up_perm, b_up_bias);  x = p_up_qweight = b_up_scales = b_up_zeros = b_up_perm = b_up_bias = None
    silu = torch.ops.aten.silu.default(matmul);  matmul = None
    matmul_1 = torch.ops.mpq.matmul.default(silu, p_down_qweight, b_down_scales, b_down_zeros, 8, -1);  silu = p_down_qweight = b_down_scales = b_down_zeros = None
    return (matmul_1,)""")

    def test_run_decompositions_keeps_op(self):
        ep = export(make_model(), strict=False).run_decompositions()
        ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
        self.assertEqual(ops.count(torch.ops.mpq.matmul.default), 2)
        model = make_model()
        for M in (1, 9):
            x = torch.randn(3, M, K)
            torch.testing.assert_close(ep.module()(x), model(x))


@pytest.mark.parametrize("strict", (True, False))
def test_export_save_load_in_fresh_process(tmp_path, strict):
    model = make_model()
    ep = export(model, strict)
    path = tmp_path / "mlp.pt2"
    torch.export.save(ep, str(path))
    x = torch.randn(4, 7, K)
    torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    # The fresh process has imported only mpq_ops (for the op registrations).
    run_script(f"""
        ep = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        torch.testing.assert_close(ep.module()(io["x"]), io["y"])
    """, timeout=300)


@pytest.mark.skipif(torch.__version__ < "2.12",
                    reason="AOTInductor's CPU package crashes (SIGSEGV) inside torch 2.11 "
                           "(seen on the GPU machine); it passes on 2.13")
def test_aoti_package_matches_eager(tmp_path):
    model = make_model()
    ep = export(model, strict=False)
    path = torch._inductor.aoti_compile_and_package(
        ep, package_path=str(tmp_path / "mlp.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for M in (1, 33):
        x = torch.randn(2, M, K)
        torch.testing.assert_close(runner(x), model(x), rtol=1e-5, atol=1e-5)
