"""Test inputs and an independent float64 reference (numpy, or torch on a CUDA
device; no mpq_ops code), the check that holds the CUDA op to it, and the
runner of scripts in a fresh process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import torch

# ||out - ref|| / ||ref|| bounds, by activation dtype: the output is rounded to
# this dtype once, the accumulation is float32.
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def np_pack_rows(q: np.ndarray, w_bit: int) -> np.ndarray:
    """Packs codes [N, K] along K: element k sits at bits (k % P) * w_bit of word k // P."""
    per = 32 // w_bit
    N, K = q.shape
    out = np.zeros((N, K // per), dtype=np.uint64)
    for j in range(per):
        out |= q[:, j::per].astype(np.uint64) << np.uint64(j * w_bit)
    return out.astype(np.uint32).view(np.int32)


def np_unpack_rows(words: np.ndarray, w_bit: int) -> np.ndarray:
    per = 32 // w_bit
    u = words.view(np.uint32).astype(np.uint64)
    N, W = u.shape
    q = np.zeros((N, W * per), dtype=np.int64)
    for j in range(per):
        q[:, j::per] = (u >> np.uint64(j * w_bit)) & np.uint64((1 << w_bit) - 1)
    return q


def torch_pack_rows(q: torch.Tensor, w_bit: int) -> torch.Tensor:
    """np_pack_rows in torch, on q's device (int64 codes [N, K] -> int32 words)."""
    per = 32 // w_bit
    out = torch.zeros(q.shape[0], q.shape[1] // per, dtype=torch.int64, device=q.device)
    for j in range(per):
        out |= q[:, j::per].to(torch.int64) << (j * w_bit)
    # words of 2^31 and up as their int32 bit patterns
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def torch_unpack_rows(words: torch.Tensor, w_bit: int) -> torch.Tensor:
    """np_unpack_rows in torch, on the words' device."""
    per = 32 // w_bit
    u = words.to(torch.int64) & 0xFFFFFFFF
    q = torch.empty(u.shape[0], u.shape[1] * per, dtype=torch.int64, device=u.device)
    for j in range(per):
        q[:, j::per] = (u >> (j * w_bit)) & ((1 << w_bit) - 1)
    return q


def make_weight(N: int, K: int, w_bit: int, group_size: int, dtype, device="cpu", seed=None):
    """Random codes, positive scales and fractional zero points (never zeros).
    For a CUDA device they are drawn and packed there (torch_pack_rows): the
    CUDA tests' weights of up to 450M codes would take most of their time on
    the host."""
    seed = seed if seed is not None else np.random.randint(1 << 30)
    G = 1 if group_size == -1 else K // group_size
    if torch.device(device).type == "cuda":
        g = torch.Generator(device).manual_seed(seed)
        q = torch.randint(0, 2**w_bit, (N, K), generator=g, device=device)
        scales = torch.rand(N, G, generator=g, device=device) * 0.04 + 0.01
        zeros = torch.rand(N, G, generator=g, device=device) * (2**w_bit - 1)
        return torch_pack_rows(q, w_bit), scales.to(dtype), zeros.to(dtype)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**w_bit, (N, K), generator=g)
    qweight = torch.from_numpy(np_pack_rows(q.numpy(), w_bit))
    scales = (torch.rand(N, G, generator=g) * 0.04 + 0.01).to(dtype)
    zeros = (torch.rand(N, G, generator=g) * (2**w_bit - 1)).to(dtype)
    return qweight.to(device), scales.to(device), zeros.to(device)


def ref_dequantize(qweight, scales, zeros, w_bit, group_size) -> np.ndarray:
    q = np_unpack_rows(qweight.cpu().numpy(), w_bit).astype(np.float64)
    s = scales.cpu().double().numpy()
    z = zeros.cpu().double().numpy()
    K = q.shape[1]
    gs = K if group_size == -1 else group_size
    return (q - np.repeat(z, gs, axis=1)) * np.repeat(s, gs, axis=1)


def ref_dequantize_t(qweight, scales, zeros, w_bit, group_size) -> torch.Tensor:
    """ref_dequantize in torch float64 on the weight's device."""
    q = torch_unpack_rows(qweight, w_bit).double()
    gs = q.shape[1] if group_size == -1 else group_size
    return ((q - zeros.double().repeat_interleave(gs, dim=1))
            * scales.double().repeat_interleave(gs, dim=1))


def ref_matmul_t(x, qweight, scales, zeros, w_bit, group_size, perm=None, bias=None):
    """ref_matmul in torch float64 on x's device (on a GPU: float64 cuBLAS)."""
    W = ref_dequantize_t(qweight, scales, zeros, w_bit, group_size)
    xd = x.detach().double()
    if perm is not None:
        xd = xd[..., perm.long()]
    y = xd @ W.T
    return y + bias.detach().double() if bias is not None else y


def ref_matmul(x, qweight, scales, zeros, w_bit, group_size, perm=None, bias=None):
    """float64 x @ W.T (+ bias) in numpy; for CUDA tensors ref_matmul_t, whose
    result stays on the GPU (rel_err compares there)."""
    if x.is_cuda:
        return ref_matmul_t(x, qweight, scales, zeros, w_bit, group_size, perm, bias)
    W = ref_dequantize(qweight, scales, zeros, w_bit, group_size)
    xd = x.detach().cpu().double().numpy()
    if perm is not None:
        xd = xd[..., perm.cpu().numpy()]
    y = xd @ W.T
    if bias is not None:
        y = y + bias.detach().cpu().double().numpy()
    return torch.from_numpy(y)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64, on ref's device."""
    out = out.detach().to(ref.device).double()
    assert torch.isfinite(out).all(), "output has non-finite values"
    if ref.numel() == 0:
        return 0.0
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# GGUF block types (mpq_ops.gguf_format): inputs and bytes per block, and the
# byte offsets of their float16 fields (d, and m or dmin).
GGUF_BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
              "Q5_1": (32, 24), "Q4_K": (256, 144), "Q5_K": (256, 176)}
GGUF_HALVES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
                "Q4_K": (0, 2), "Q5_K": (0, 2)}


def random_gguf_blocks(type_name, N, K, rng, flat_blocks=2, exponents=(-10, -1)):
    """A GGUF tensor [N, K] of random bytes in every field (uint8 [N, row
    bytes]), its float16 fields random values of either sign (exponents in
    [exponents)), `flat_blocks` blocks with d = 0 (rng: numpy's Generator)."""
    per, size = GGUF_BLOCK[type_name]
    blocks = rng.integers(0, 256, size=(N, K // per, size), dtype=np.uint8)
    for at in GGUF_HALVES[type_name]:
        v = rng.uniform(0.5, 1.0, (N, K // per)) * 2.0 ** rng.integers(*exponents, (N, K // per))
        v *= rng.choice([-1.0, 1.0], (N, K // per))
        blocks[..., at:at + 2] = v.astype(np.float16)[..., None].view(np.uint8)
    for _ in range(flat_blocks):
        n, b = rng.integers(0, N), rng.integers(0, K // per)
        blocks[n, b, 0:2] = np.float16(0).reshape(1).view(np.uint8)
    return blocks.reshape(N, -1)


def make_x(lead, K, dtype, device="cpu", noncontig=False):
    """Random activations; noncontig gives a strided view of a wider tensor."""
    if noncontig:
        base = torch.randn(*lead, 2 * K, dtype=torch.float32).to(dtype).to(device)
        return base[..., ::2]
    return torch.randn(*lead, K, dtype=torch.float32).to(dtype).to(device)


def launched_kernels(fn):
    """Names of the CUDA kernels one call of fn launches (torch.profiler), after a
    call that warms it up (tests/test_cuda.py, scripts/bench_overhead.py)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def poison_allocator(numel, dtype, device="cuda"):
    """Leaves a NaN-filled block in `device`'s caching allocator, so that an
    output allocated next (at::empty) starts as NaN and unwritten elements show."""
    torch.full((numel,), float("nan"), device=device, dtype=dtype)


def check_matmul(x, weight, w_bit, group_size, bias=None, context=()):
    """mpq::matmul of x against weight = (qweight, scales, zeros) on x's
    device, its output allocated over a poisoned block, on that device and
    within REL_TOL of the float64 reference; context names the case in the
    failure message."""
    qweight, scales, zeros = weight
    poison_allocator(x.shape[0] * qweight.shape[0], x.dtype, x.device)
    y = torch.ops.mpq.matmul(x, qweight, scales, zeros, w_bit, group_size, None, bias)
    assert y.device == x.device, (*context, y.device)
    err = rel_err(y, ref_matmul(x, qweight, scales, zeros, w_bit, group_size, None, bias))
    assert err < REL_TOL[x.dtype], (*context, err)


def capture_graph(fn):
    """fn() warmed up on a side stream (first calls may allocate or set
    things up, which a capture must not), then captured into a CUDA graph on
    the current device; returns (graph, fn's output, which replays refill)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def meta_skeleton(model):
    """The model's architecture with its parameters on the meta device (its
    buffers real, as load_quantized needs them)."""
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):
        return type(model)(model.config)


def run_script(body, timeout=600):
    """Runs body in a fresh Python process that has imported only torch and
    mpq_ops (the op registrations) and has tests/ on its path; fails with its
    exit status and stderr unless it printed OK. Returns its output."""
    script = ("import sys, torch, mpq_ops\n"
              f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
              + textwrap.dedent(body) + "\nprint('OK')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0 and "OK" in out.stdout, (out.returncode, out.stderr[-4000:])
    return out.stdout
