"""Two GPUs: the CUDA ops on a device other than the current one (every path,
the launches that keep state per device: occupancy and cluster counts,
shared-memory limits, workspaces, programmatic launches), each device's first
call in a process of its own, threads driving both devices from a cold
start, the current stream of the tensors' device (not of the current device),
CUDA graphs and torch.compile on the second device, autograd there, a model
split across both, nn.DataParallel, and the inputs of one call on different
devices. Outputs against a float64 reference, allocators poisoned with NaN.
Skipped without two GPUs. MPQ_OPS_TEST_DEVICES=0,0 runs them with both
devices the same GPU (the tests' own logic on one GPU; those that need two
distinct devices skip)."""
import os
import textwrap
import threading

import pytest
import torch
from torch import nn

import helpers
from helpers import (REL_TOL, capture_graph, check_matmul, make_weight, make_x,
                     poison_allocator, ref_dequantize_t, ref_matmul, rel_err, torch_unpack_rows)

_INDICES = [int(i) for i in os.environ.get("MPQ_OPS_TEST_DEVICES", "0,1").split(",")]
D0, D1 = (torch.device("cuda", i) for i in _INDICES)
pytestmark = pytest.mark.skipif(torch.cuda.device_count() <= max(_INDICES),
                                reason="needs two CUDA GPUs")
distinct = pytest.mark.skipif(D0 == D1, reason="needs two distinct devices")

# (N, K, group_size, rows of x): small grids; 128-row tiles and the wgmma
# kernel's tile widths; one row past a wave of blocks (stream-K); 16 rows
# against 224 weight tiles (stream-K in the staged and the wgmma kernel); a
# long K over few rows of weights (K split, the parts added in a cluster or
# through the workspace by a second kernel launched programmatically).
CASES = ((100, 512, 128, (1, 5, 16, 33, 129)),
         (4096, 2048, 64, (1, 9, 16, 64, 300)),
         (22016, 1024, 128, (1,)),
         (28672, 1024, 128, (16,)),
         (1024, 8192, -1, (1, 4, 16)))


@pytest.mark.parametrize("split_sum", ("cluster", "workspace"))
@pytest.mark.parametrize("kernel", (None, "gemv", "gemm", "sm90", "dequantize"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("w_bit", (2, 4, 8))
def test_every_path_on_the_device_that_is_not_current(w_bit, dtype, kernel, split_sum,
                                                      monkeypatch):
    """cuda:0 current, every tensor on cuda:1: the op runs there (its device
    guard), with cuda:1's limits, and leaves cuda:0 current."""
    if kernel is not None:
        monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", kernel)
    if split_sum == "workspace":
        monkeypatch.setenv("MPQ_OPS_CUDA_SPLIT_SUM", "workspace")
    torch.cuda.set_device(D0)
    for N, K, group_size, ms in CASES:
        weight = make_weight(N, K, w_bit, group_size, dtype, D1)
        bias = torch.randn(N, device=D1).to(dtype)
        for M in ms:
            x = make_x((M,), K, dtype, D1, noncontig=M % 2 == 1)
            check_matmul(x, weight, w_bit, group_size, bias if M % 2 else None, (N, K, M))
            assert torch.cuda.current_device() == D0.index


def test_dequantize_on_the_device_that_is_not_current():
    torch.cuda.set_device(D0)
    for w_bit, (N, K, group_size) in ((2, (300, 768, 256)), (4, (4096, 2048, 64)),
                                      (8, (37, 96, 32))):
        qweight, scales, zeros = make_weight(N, K, w_bit, group_size, torch.float16, D1)
        poison_allocator(N * K, torch.float16, D1)
        W = torch.ops.mpq.dequantize(qweight, scales, zeros, w_bit, group_size)
        assert W.device == D1
        ref = ref_dequantize_t(qweight, scales, zeros, w_bit, group_size)
        assert rel_err(W, ref) < REL_TOL[torch.float16], (w_bit, N, K)


def run_script(body):
    """helpers.run_script with the checks of helpers imported."""
    return helpers.run_script("from helpers import check_matmul, make_weight, make_x\n"
                              + textwrap.dedent(body))


# Calls that reach each path's per-device state under the default policy:
# (w_bit, N, K, group_size, M).
COLD_CALLS = ((4, 22016, 1024, 128, 1), (8, 1024, 8192, 128, 1), (2, 28672, 1024, 128, 1),
              (4, 28672, 1024, 128, 16), (8, 4096, 2048, 64, 9), (4, 4096, 2048, 64, 300),
              (2, 4096, 2048, 64, 64), (4, 100, 512, 128, 33), (4, 4096, 2048, 128, 5000))


@pytest.mark.parametrize("second_first", (True, False),
                         ids=("second_device_first", "current_device_first"))
def test_each_device_first_in_a_fresh_process(second_first):
    """In a process whose first call runs on one device, the other device's
    first calls find nothing that the first one's calls set up for it."""
    a, b = (D1.index, D0.index) if second_first else (D0.index, D1.index)
    run_script(f"""
        for d in {(a, b, a)}:
            device = torch.device("cuda", d)
            for w_bit, N, K, group_size, M in {COLD_CALLS}:
                weight = make_weight(N, K, w_bit, group_size, torch.float16, device)
                x = make_x((M,), K, torch.float16, device)
                check_matmul(x, weight, w_bit, group_size, None, (d, N, K, M))
    """)


def test_threads_drive_both_devices_from_a_cold_start():
    """Two threads, one per device, from the process's first call on: the
    per-device state each path keeps is set up by both at once."""
    run_script(f"""
        import threading
        errors = []
        def work(d):
            try:
                device = torch.device("cuda", d)
                torch.cuda.set_device(device)
                for rep in range(3):
                    for w_bit, N, K, group_size, M in {COLD_CALLS}:
                        weight = make_weight(N, K, w_bit, group_size, torch.bfloat16, device)
                        x = make_x((M,), K, torch.bfloat16, device)
                        check_matmul(x, weight, w_bit, group_size, None, (d, rep, N, K, M))
            except BaseException as e:
                errors.append((d, repr(e)))
        threads = [threading.Thread(target=work, args=(d,)) for d in {(D0.index, D1.index)}]
        for t in threads: t.start()
        for t in threads: t.join()
        assert not errors, errors
    """)


@pytest.mark.parametrize("kernel", (None, "gemv", "gemm", "sm90", "dequantize"))
def test_current_stream_of_the_tensors_device(kernel, monkeypatch):
    """With cuda:0 current and a side stream current on cuda:1, the op on
    cuda:1's tensors runs on that side stream: x is written there behind a
    sleep, so a launch on any other stream would read the NaN it held."""
    if kernel is not None:
        monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", kernel)
    torch.cuda.set_device(D0)
    for N, K, M in ((22016, 1024, 1), (4096, 2048, 16), (1024, 8192, 4), (4096, 2048, 300)):
        qweight, scales, zeros = make_weight(N, K, 4, 128, torch.float16, D1)
        src = make_x((M,), K, torch.float16, D1)
        x = torch.full_like(src, float("nan"))
        torch.cuda.synchronize(D1)
        side = torch.cuda.Stream(D1)
        before = torch.cuda.current_stream(D1)
        with torch.cuda.device(D1):
            torch.cuda.set_stream(side)
            torch.cuda._sleep(100_000_000)  # ~60 ms
            x.copy_(src)
        try:
            assert torch.cuda.current_device() == D0.index
            assert torch.cuda.current_stream(D1) == side
            y = torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, 128)
            side.synchronize()
        finally:
            with torch.cuda.device(D1):
                torch.cuda.set_stream(before)
        assert rel_err(y, ref_matmul(src, qweight, scales, zeros, 4, 128)) < REL_TOL[
            torch.float16], (kernel, N, K, M)


@pytest.mark.parametrize("N,K,M,kernel", [(22016, 1024, 1, None), (28672, 2048, 16, "gemm"),
                                          (28672, 1024, 16, "sm90"), (1024, 8192, 3, None)])
def test_cuda_graph_on_the_second_device(N, K, M, kernel, monkeypatch):
    """Captured on cuda:1 (stream-K and split sums through the workspace,
    whose kernels launch programmatically), replayed with new x while cuda:0
    is current."""
    monkeypatch.setenv("MPQ_OPS_CUDA_SPLIT_SUM", "workspace")
    if kernel is not None:
        monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", kernel)
    qweight, scales, zeros = make_weight(N, K, 4, 128, torch.float16, D1)
    static_x = torch.randn(M, K, device=D1, dtype=torch.float16)
    with torch.cuda.device(D1):
        g, static_y = capture_graph(
            lambda: torch.ops.mpq.matmul(static_x, qweight, scales, zeros, 4, 128))
    torch.cuda.set_device(D0)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        g.replay()
        torch.cuda.synchronize(D1)
        ref = ref_matmul(static_x, qweight, scales, zeros, 4, 128)
        assert rel_err(static_y, ref) < REL_TOL[torch.float16]


def two_layers(device_a, device_b):
    from mpq_ops import MPQLinear
    a = MPQLinear.from_linear(nn.Linear(512, 1024, dtype=torch.float16, device=device_a), 4, 128)
    b = MPQLinear.from_linear(nn.Linear(1024, 384, dtype=torch.float16, device=device_b), 2, 64)
    return a, b


def ref_two_layers(a, b, x):
    """float64: b(relu(a(x))) on x's device, each layer's weight dequantized
    by the reference."""
    def layer(m, h):
        W = ref_dequantize_t(m.qweight, m.scales, m.zeros, m.w_bit, m.group_size_arg())
        return h @ W.to(h.device).T + m.bias.double().to(h.device)
    return layer(b, torch.relu(layer(a, x.double())))


class TwoLayers(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_compile_reduce_overhead_on_the_second_device():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.cuda.set_device(D0)
    model = TwoLayers(*two_layers(D1, D1)).eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(4, 512, device=D1, dtype=torch.float16)
            out = compiled(x).clone()
            assert out.device == D1
            assert rel_err(out, ref_two_layers(model.a, model.b, x)) < 2 * REL_TOL[torch.float16]
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_autograd_on_the_second_device():
    """Gradients for x, scales and zeros of a call on cuda:1 (the backward's
    mpq::dequantize there too), against float64."""
    torch.cuda.set_device(D0)
    N, K, g = 384, 1024, 128
    qweight, scales, zeros = make_weight(N, K, 4, g, torch.float16, D1)
    scales.requires_grad_()
    zeros.requires_grad_()
    x = make_x((5,), K, torch.float16, D1).requires_grad_()
    grad = torch.randn(5, N, device=D1, dtype=torch.float16)
    torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, g).backward(grad)
    for t in (x, scales, zeros):
        assert t.grad is not None and t.grad.device == D1
    xd, sd, zd = (t.detach().double().requires_grad_() for t in (x, scales, zeros))
    q = torch_unpack_rows(qweight, 4).double()
    W = (q - zd.repeat_interleave(g, 1)) * sd.repeat_interleave(g, 1)
    (xd @ W.T).backward(grad.double())
    for t, r in ((x, xd), (scales, sd), (zeros, zd)):
        assert rel_err(t.grad, r.grad) < 2 * REL_TOL[torch.float16]


def test_model_split_across_devices():
    """A layer on each GPU (as a device map places them), the activations
    moved between."""
    a, b = two_layers(D0, D1)
    x = make_x((7,), 512, torch.float16, D0)
    with torch.no_grad():
        y = b(torch.relu(a(x)).to(D1))
    assert y.device == D1
    assert rel_err(y, ref_two_layers(a, b, x).to(D1)) < 2 * REL_TOL[torch.float16]


@distinct
def test_data_parallel_replicas():
    """nn.DataParallel: the layers replicated to both GPUs and run in a
    thread per device, the batch split between them."""
    model = TwoLayers(*two_layers(D0, D0)).eval()
    dp = nn.DataParallel(model, device_ids=[D0, D1])
    x = make_x((10,), 512, torch.float16, D0)
    with torch.no_grad():
        y = dp(x)
    assert y.device == D0 and y.shape == (10, 384)
    assert rel_err(y, ref_two_layers(model.a, model.b, x)) < 2 * REL_TOL[torch.float16]


@distinct
def test_inputs_on_different_devices_are_rejected():
    N, K = 256, 512
    qweight, scales, zeros = make_weight(N, K, 4, 128, torch.float16, D1)
    x = make_x((3,), K, torch.float16, D1)
    bias = torch.zeros(N, device=D1, dtype=torch.float16)
    perm = torch.arange(K, device=D1, dtype=torch.int32)
    mm = torch.ops.mpq.matmul
    cases = (
        (lambda: mm(x.to(D0), qweight, scales, zeros, 4, 128), "qweight must be on the same"),
        (lambda: mm(x, qweight, scales.to(D0), zeros, 4, 128), "scales must be on the same"),
        (lambda: mm(x, qweight, scales, zeros.to(D0), 4, 128), "zeros must be on the same"),
        (lambda: mm(x, qweight, scales, zeros, 4, 128, perm.to(D0)), "perm must be on the same"),
        (lambda: mm(x, qweight, scales, zeros, 4, 128, None, bias.to(D0)),
         "bias must be on the same"),
        (lambda: torch.ops.mpq.dequantize(qweight, scales.to(D0), zeros, 4, 128),
         "scales must be on the same"))
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_threads_share_a_device_with_the_other_busy():
    """Threads of one process on both devices at once, in the warm state the
    tests above left: each device's results stay its own."""
    errors = []

    def work(device, seed):
        try:
            torch.cuda.set_device(device)
            weight = make_weight(4096, 2048, 4, 128, torch.float16, device, seed)
            for M in (1, 16, 64, 1, 300) * 4:
                x = make_x((M,), 2048, torch.float16, device)
                check_matmul(x, weight, 4, 128, None, (str(device), M))
        except BaseException as e:  # reported by the main thread
            errors.append((str(device), repr(e)))

    jobs = ((D0, 1), (D1, 2), (D1, 3), (D0, 4))
    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
