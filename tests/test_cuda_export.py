"""torch.compile, torch.export and AOTInductor on CUDA: a float16 model of MPQ
layers of every width (act-order perm and bias on one) exported with dynamic
batch and sequence, run at row counts that take each fused kernel (on
Hopper: 2 and 16 rows the staged kernel, but for 8-bit codes at 16 rows; 66
and 300 the wgmma kernel), saved and loaded in a fresh process, and compiled
ahead of time into a package. The exported program runs the same op on the
same inputs as eager, so its outputs must be eager's bit for bit; code that
Inductor generates around the op (silu) may round differently, so there the
comparison allows float16's rounding. Skipped without a GPU (the CPU
versions are in test_compile_export.py)."""
import pytest
import torch
from torch import nn

from helpers import run_script
from mpq_ops import MPQLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

K, H = 512, 768
# x is [2, M, K]: 2 x M rows per call (2, 16, 66, 300).
MS = (1, 8, 33, 150)


class ThreeWidths(nn.Module):
    """Up (4-bit g128, perm, bias), across (2-bit g64) and down (8-bit per row)."""

    def __init__(self, device="cuda"):
        super().__init__()
        torch.manual_seed(0)

        def lin(k, n, bias):
            return nn.Linear(k, n, bias=bias, dtype=torch.float16).to(device)

        self.up = MPQLinear.from_linear(lin(K, H, True), w_bit=4, group_size=128)
        self.up.perm = torch.randperm(K, device=device).to(torch.int32)
        self.across = MPQLinear.from_linear(lin(H, H, False), w_bit=2, group_size=64)
        self.down = MPQLinear.from_linear(lin(H, K, False), w_bit=8, group_size=-1)

    def forward(self, x):
        return self.down(self.across(torch.nn.functional.silu(self.up(x))))


def make_model(device="cuda"):
    return ThreeWidths(device).eval()


def make_x(M):
    return torch.randn(2, M, K, device="cuda", dtype=torch.float16)


def export(model, strict):
    batch = torch.export.Dim("batch", max=1024)
    seq = torch.export.Dim("seq", max=4096)
    return torch.export.export(model, (make_x(5),), dynamic_shapes=({0: batch, 1: seq},),
                               strict=strict)


# Where Inductor's code sits between the MPQ layers: outputs of order 0.1-1,
# a few of float16's units in the last place.
RTOL = ATOL = 2e-3


def save_inputs_and_outputs(model, path):
    """x for each M in MS (x1, x8, ...) and the model's eager outputs (y1, ...)."""
    with torch.no_grad():
        io = {f"x{M}": make_x(M) for M in MS}
        io.update({f"y{M}": model(io[f"x{M}"]) for M in MS})
    torch.save(io, path)


def assert_near_eager(out, ref):
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("strict", (True, False))
def test_export_on_cuda_matches_eager_bit_for_bit(strict):
    model = make_model()
    ep = export(model, strict)
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.mpq.matmul.default) == 3, ops
    module = ep.module()
    with torch.no_grad():
        for M in MS:
            x = make_x(M)
            out, ref = module(x), model(x)
            assert out.device == x.device and out.dtype == torch.float16
            assert torch.equal(out, ref), (M, (out - ref).abs().max().item())
    # run_decompositions leaves the op whole (it has no decomposition)
    decomposed = ep.run_decompositions()
    ops = [n.target for n in decomposed.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.mpq.matmul.default) == 3, ops


def test_export_save_load_on_cuda_in_fresh_process(tmp_path):
    model = make_model()
    ep = export(model, strict=False)
    path = tmp_path / "three.pt2"
    torch.export.save(ep, str(path))
    save_inputs_and_outputs(model, tmp_path / "io.pt")
    # The fresh process has imported only mpq_ops (for the op registrations).
    run_script(f"""
        ep = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        with torch.no_grad():
            for M in {MS!r}:
                out = ep.module()(io[f"x{{M}}"])
                assert out.is_cuda and torch.equal(out, io[f"y{{M}}"]), M
    """)


@pytest.mark.skipif(torch.__version__ < "2.12",
                    reason="on torch 2.11 (H100) loading an AOTInductor package ends in "
                           "SIGSEGV, a plain nn.Linear model's too (scripts/aoti_check.py, "
                           "scripts/results/aoti_check_h100_torch211.log)")
def test_aoti_package_on_cuda_matches_eager(tmp_path):
    """Compiled, loaded and run in a fresh process, which imports only mpq_ops
    (so a crash inside AOTInductor fails this test, not the whole run)."""
    model = make_model()
    torch.export.save(export(model, strict=False), str(tmp_path / "three.pt2"))
    save_inputs_and_outputs(model, tmp_path / "io.pt")
    run_script(f"""
        ep = torch.export.load({str(tmp_path / 'three.pt2')!r})
        path = torch._inductor.aoti_compile_and_package(
            ep, package_path={str(tmp_path / 'three_aoti.pt2')!r})
        runner = torch._inductor.aoti_load_package(path)
        io = torch.load({str(tmp_path / 'io.pt')!r})
        with torch.no_grad():
            for M in {MS!r}:
                out = runner(io[f"x{{M}}"])
                assert out.is_cuda and out.shape == (2, M, {K}), (M, out.shape)
                torch.testing.assert_close(out, io[f"y{{M}}"], rtol={RTOL}, atol={ATOL})
    """, timeout=900)


def test_compile_on_cuda_one_graph_over_rows():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = make_model()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        for M in MS:
            x = make_x(M)
            assert_near_eager(compiled(x), model(x))
    assert counter.frame_count == 1, counter.frame_count
