"""CUDA-only checks: every kernel path (the fused GEMV's tiles, the staged fused
kernel, also with a partial last step, the wgmma kernel on Hopper, the
dequantize + cuBLAS path, shapes the fused kernels do not take), each also
forced for every M it can serve, and CUDA graphs. Outputs are checked against
a float64 reference, with the caching allocator poisoned with NaN first.
Skipped without a GPU."""
import re

import numpy as np
import pytest
import torch
from torch import nn

from helpers import (REL_TOL, capture_graph, check_matmul, launched_kernels, make_weight,
                     make_x, poison_allocator, random_gguf_blocks, ref_dequantize,
                     ref_dequantize_t, ref_matmul, rel_err)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("kernel", (None, "gemv", "gemm", "sm90", "dequantize"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("w_bit", (2, 4, 8))
@pytest.mark.parametrize("N,K,group_size", [(100, 512, 128), (4096, 1024, -1), (45, 96, 32),
                                            (512, 768, 256), (33, 2048, 64), (72, 1536, 384),
                                            (40, 1280, 32), (64, 768, 96)])
def test_all_paths_match_reference(dtype, w_bit, N, K, group_size, kernel, monkeypatch):
    if kernel is not None:
        # Read by the CUDA dispatch on every call; a path that cannot serve M falls back.
        monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", kernel)
    weight = make_weight(N, K, w_bit, group_size, dtype, "cuda")
    bias = torch.randn(N, device="cuda").to(dtype)
    for M in (1, 3, 5, 8, 9, 16, 17, 25, 32, 33, 40, 41, 64, 65, 100, 129, 256, 300):
        x = make_x((M,), K, dtype, "cuda", noncontig=M % 2 == 1)
        check_matmul(x, weight, w_bit, group_size, bias, (M,))


@pytest.mark.parametrize("kernel", (None, "gemv", "gemm", "sm90", "dequantize"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("type_name", ("Q4_0", "Q4_K", "Q5_K", "Q8_0"))
def test_gguf_blocks_every_path(type_name, dtype, kernel, monkeypatch):
    """Weights from GGUF blocks (mpq_ops.gguf_format), which RTN and GPTQ
    never make: scales of either sign, zeros from -1 (flat groups: codes 0)
    to 128, through every path, outputs poisoned."""
    from mpq_ops.gguf_format import from_gguf_blocks
    if kernel is not None:
        monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", kernel)
    seed = np.random.randint(1 << 30)
    data = random_gguf_blocks(type_name, 200, 768, np.random.default_rng(seed), 8, (-12, -7))
    cw = from_gguf_blocks(data, type_name, (200, 768), dtype)
    assert (cw.zeros == -1).any() and (cw.scales < 0).any()
    weight = tuple(t.cuda() for t in cw[:3])
    for M in (1, 5, 16, 33, 64, 129):
        check_matmul(make_x((M,), 768, dtype, "cuda"), weight, cw.w_bit, 32, None, (seed, M))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("group_size", (32, 64, 128, -1))
@pytest.mark.parametrize("w_bit", (2, 4, 8))
def test_sm90_kernel_many_tiles(w_bit, dtype, group_size, monkeypatch):
    """The wgmma kernel (2-, 4- and 8-bit codes, Hopper) over several tiles of x rows and weight
    rows, with ragged edges in both: few tiles and a long K (64 steps, split
    over the SMs), and many tiles in groups of x-row tiles, the last group
    partial; a last wave of tiles split over K where it would leave most SMs
    idle (on 132 SMs: 182 tiles, 50 of them in 2 splits, K > 4096; 160 tiles,
    28 in 4) and kept whole where two splits of a short K would not pay (726
    tiles, 66 last), or taken by a second launch of 128-row tiles where it is
    at most half full (320 tiles, the last 56 as 112 narrow ones, ragged N);
    128-row tiles past one wave where they take fewer waves' time (1536 rows,
    32 weight tiles: 384 tiles) or where both take one wave (320 rows, 40
    weight tiles), and up to 384 rows where the wide tiles' last wave would
    be split (320 rows, 86 weight tiles: 258 narrow tiles); 64-row tiles
    past 64 rows where they fill one wave unsplit (80 rows, 64 weight tiles:
    128 tiles); K split in as many ways as keep one wave (384 rows, 16
    weight tiles: 48 tiles in 2); with and without bias; up to 64 rows
    against more weight tiles than SMs (two blocks per SM), in tiles of 16,
    32 and 48 rows of x too, whole where they fill 3/4 of a wave (13 and 40
    rows, 235 weight tiles) and split by the wave rule (24 rows, 133 tiles,
    K = 1024: 1 split; 45 rows, 40 tiles, K = 4096: 3 splits), and 16 rows
    against 224 weight tiles, which on 132 SMs run stream-K over the 264
    slots (K = 1024 and 8192; 8-bit codes whole tiles, their scales three
    units ahead), 30 and 64 rows against them whole tiles (with 8-bit codes
    these 64 rows and 50 against 133 weight tiles take the 4-stage ring, 40
    rows against 235 the 5-stage one). Elsewhere the dispatch falls back and
    the same checks hold."""
    monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", "sm90")
    for M, N, K, with_bias in ((128, 128, 4096, False), (383, 300, 4096, True),
                               (1000, 1152, 4096, True), (2600, 8448, 512, True),
                               (1000, 5100, 1024, True), (400, 11600, 4608, False),
                               (1536, 4096, 1024, True), (1000, 10200, 1024, True),
                               (150, 16896, 1024, False), (320, 5100, 4096, False),
                               (80, 8150, 2048, True), (384, 2000, 2048, True),
                               (320, 11000, 2048, False),
                               (50, 17000, 1024, True), (13, 30000, 512, False),
                               (24, 17000, 1024, True), (40, 30000, 512, False),
                               (45, 5000, 4096, True),
                               (16, 28672, 1024, True), (16, 28672, 8192, False),
                               (30, 28672, 1024, False), (64, 28672, 1024, True)):
        weight = make_weight(N, K, w_bit, group_size, dtype, "cuda")
        bias = torch.randn(N, device="cuda").to(dtype) if with_bias else None
        x = make_x((M,), K, dtype, "cuda")
        check_matmul(x, weight, w_bit, group_size, bias, (M, N))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("w_bit", (2, 4, 8))
def test_default_policy_many_rows(w_bit, dtype):
    """The default path on both sides of where the wgmma kernel stops serving
    4-bit codes (4096 rows) and of where the staged kernel stops (128): each
    against the float64 reference, outputs poisoned."""
    N, K, group_size = 136, 512, 64
    weight = make_weight(N, K, w_bit, group_size, dtype, "cuda")
    bias = torch.randn(N, device="cuda").to(dtype)
    for M in (128, 129, 1025, 2048, 4096, 4097):
        x = make_x((M,), K, dtype, "cuda")
        check_matmul(x, weight, w_bit, group_size, bias, (M,))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("w_bit", (2, 4, 8))
def test_default_policy_wide_weights(w_bit, dtype):
    """The default path for 8 to 33 rows against weights whose 128-row tiles
    outnumber the SMs: on Hopper the wgmma kernel takes 4-bit codes from 9
    rows here where the DRAM is fast (16-row tiles; the H200, below) and from
    17 (32-row tiles), the staged kernel the rest; each against the float64
    reference, outputs poisoned."""
    N, K, group_size = 17000, 512, 128
    weight = make_weight(N, K, w_bit, group_size, dtype, "cuda")
    bias = torch.randn(N, device="cuda").to(dtype)
    for M in (8, 9, 16, 17, 32, 33):
        x = make_x((M,), K, dtype, "cuda", noncontig=M % 2 == 1)
        check_matmul(x, weight, w_bit, group_size, bias, (M,))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_wide_weights_policy_by_bandwidth(dtype, monkeypatch):
    """9 to 16 rows of 4-bit codes against weights whose tiles cover 3/4 of
    the SMs: on Hopper the wgmma kernel where the DRAM's peak bandwidth
    (memory clock x 2 x bus width) is 4 TB/s or more (H200), else the staged
    kernel (H100); each against float64."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel runs on compute capability 9.0")
    props = torch.cuda.get_device_properties(0)
    khz, bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not khz or not bits:
        pytest.skip("this torch does not report the memory clock and bus width")
    monkeypatch.delenv("MPQ_OPS_CUDA_KERNEL", raising=False)
    kernel = "gemm_sm90_kernel" if 2 * khz * bits / 8 / 1e6 >= 4000 else "gemm_cuda_kernel"
    N = 128 * props.multi_processor_count
    weight = make_weight(N, 512, 4, 128, dtype, "cuda")
    for M in (9, 16):
        x = make_x((M,), 512, dtype, "cuda", noncontig=M % 2 == 1)
        check_matmul(x, weight, 4, 128, None, (M,))
        names = launched_kernels(lambda: torch.ops.mpq.matmul(x, *weight, 4, 128))
        assert any(kernel in n for n in names), (M, khz, bits, names)


# K not a whole number of the fused kernels' steps (128 inputs for 4-bit codes,
# 256 for 2-bit, 64 for 8-bit), but of a lane's 16 bytes of codes: shorter than
# one step, and one or more steps and a part (SmolLM2's hidden size, 576).
K_TAIL_CASES = [(4, 96, 32), (4, 576, 64), (4, 608, -1), (4, 32, -1),
                (2, 64, 32), (2, 576, 32), (2, 960, -1), (2, 448, 64),
                (8, 96, -1), (8, 608, 32), (8, 32, -1)]


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("w_bit,K,group_size", K_TAIL_CASES)
def test_staged_kernel_takes_a_partial_last_step(w_bit, K, group_size, dtype):
    """Such a K takes the staged kernel with a partial last step (x's chunks past K
    copied as zeros, the codes' loads kept inside their rows), not dequantize +
    cuBLAS: for every M the staged kernel serves (to 128 rows; K splits at the
    few rows that leave the GPU idle, 8- to 64-row tiles), odd N, bias, x not
    contiguous for odd M; against the float64 reference, outputs poisoned."""
    N = 203
    weight = make_weight(N, K, w_bit, group_size, dtype, "cuda")
    bias = torch.randn(N, device="cuda").to(dtype)
    for M in (1, 2, 3, 5, 8, 13, 16, 17, 31, 33, 64, 70, 128, 129):
        x = make_x((M,), K, dtype, "cuda", noncontig=M % 2 == 1)
        check_matmul(x, weight, w_bit, group_size, bias, (M,))
    names = launched_kernels(
        lambda: torch.ops.mpq.matmul(make_x((3,), K, dtype, "cuda"), *weight, w_bit, group_size,
                                     None, None))
    assert any("gemm_cuda_kernel" in n for n in names), names
    assert not any("dequantize" in n for n in names), names


def test_partial_last_step_large_weights():
    """A partial last step behind full ones on a weight of many row blocks and a
    long K (split over K at one row of x), and for tiles of 16 and 64 rows."""
    for w_bit, K, group_size in ((4, 4160, 64), (2, 4160, 64), (8, 4128, -1)):
        weight = make_weight(3000, K, w_bit, group_size, torch.float16, "cuda")
        for M in (1, 4, 16, 64):
            x = make_x((M,), K, torch.float16, "cuda")
            check_matmul(x, weight, w_bit, group_size, None, (w_bit, K, M))


@pytest.mark.parametrize("split_sum", ("cluster", "workspace"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("w_bit", (2, 4, 8))
def test_split_k_sums(w_bit, dtype, split_sum, monkeypatch):
    """The staged kernel with K split over 2 to 8 blocks per weight tile (few
    weight rows, long K), its splits added up in a thread block cluster where
    the policy takes one (Hopper, one x tile of 4- or 8-bit codes) or forced
    through the float32 workspace; ragged N, with and without bias, one row of x (its slice resident
    in shared memory) and several (the ring of staged steps; more than 8 splits
    take the workspace either way)."""
    monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", "gemm")
    if split_sum == "workspace":
        monkeypatch.setenv("MPQ_OPS_CUDA_SPLIT_SUM", "workspace")
    for N, K, group_size, with_bias in ((64, 8192, 128, True), (200, 4096, 64, False),
                                        (1000, 2048, -1, True), (40, 24576, 256, True)):
        weight = make_weight(N, K, w_bit, group_size, dtype, "cuda")
        bias = torch.randn(N, device="cuda").to(dtype) if with_bias else None
        for M in (1, 3, 6, 9, 16, 17):
            x = make_x((M,), K, dtype, "cuda")
            check_matmul(x, weight, w_bit, group_size, bias, (N, K, M))


@pytest.mark.parametrize("small_grid", (True, False), ids=("small_grid", "128_row_tiles"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("w_bit", (2, 4, 8))
def test_small_grids(w_bit, dtype, small_grid, monkeypatch):
    """9 to 128 rows of x against few weight rows, through the staged kernel
    (forced, so that every width takes it): 64-row weight tiles, x tiles of 16
    or 32 rows, K split down to single steps, the splits added up in a thread
    block cluster (4- and 8-bit codes; on Hopper no second kernel runs) or
    through the workspace (2-bit), or with MPQ_OPS_CUDA_SMALL_GRID=0 the
    128-row tiles. SmolLM2's shapes (K = 576: a partial last step for 2- and
    4-bit codes), ragged N, steps that do not divide evenly among the splits,
    more steps than a cluster has blocks (K = 8192), groups within a step, of
    whole steps and per row, with and without bias; every x tile count, partial
    tiles, odd M from a non-contiguous x."""
    monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", "gemm")
    if not small_grid:
        monkeypatch.setenv("MPQ_OPS_CUDA_SMALL_GRID", "0")
    for N, K, group_size, with_bias in ((1536, 576, 32, False), (576, 1536, 64, True),
                                        (192, 576, 64, True), (1000, 2048, 128, False),
                                        (200, 8192, -1, True), (4096, 1024, 128, False)):
        weight = make_weight(N, K, w_bit, group_size, dtype, "cuda")
        bias = torch.randn(N, device="cuda").to(dtype) if with_bias else None
        for M in (9, 16, 17, 32, 33, 64, 65, 128):
            x = make_x((M,), K, dtype, "cuda", noncontig=M % 2 == 1)
            check_matmul(x, weight, w_bit, group_size, bias, (N, K, M))
    if small_grid and w_bit != 2 and torch.cuda.get_device_capability() == (9, 0):
        weight = make_weight(1536, 576, w_bit, 32, dtype, "cuda")
        for M in (16, 32, 64):
            x = make_x((M,), 576, dtype, "cuda")
            names = launched_kernels(lambda: torch.ops.mpq.matmul(x, *weight, w_bit, 32))
            assert any("gemm_cuda_kernel" in n for n in names), (M, names)
            assert not any("finish_split" in n for n in names), (M, names)


def check_policy(cases, w_bit, dtype, monkeypatch):
    """Each case ((N, K), M, small grids on, kernel): the result against
    float64 and that the default policy launched that kernel, g64."""
    for (N, K), M, small_grid, kernel in cases:
        monkeypatch.setenv("MPQ_OPS_CUDA_SMALL_GRID", "1" if small_grid else "0")
        weight = make_weight(N, K, w_bit, 64, dtype, "cuda")
        x = make_x((M,), K, dtype, "cuda", noncontig=M % 2 == 1)
        check_matmul(x, weight, w_bit, 64, None, (N, K, M, small_grid))
        names = launched_kernels(lambda: torch.ops.mpq.matmul(x, *weight, w_bit, 64))
        assert any(kernel in n for n in names), (N, K, M, small_grid, names)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_two_bit_codes_policy(dtype, monkeypatch):
    """The default policy on Hopper for 2-bit codes from 17 to 64 rows: the
    staged kernel's small grids against few weight rows, the wgmma kernel
    against many, and the wgmma kernel again with the small grids turned off
    (MPQ_OPS_CUDA_SMALL_GRID=0); each against float64."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel runs on compute capability 9.0")
    monkeypatch.delenv("MPQ_OPS_CUDA_KERNEL", raising=False)
    cases = (((1024, 1024), 24, True, "gemm_cuda_kernel"),
             ((1024, 1024), 64, True, "gemm_cuda_kernel"),
             ((1000, 2048), 33, True, "gemm_cuda_kernel"),
             ((1024, 1024), 48, False, "gemm_sm90_kernel"),
             ((14336, 4096), 48, True, "gemm_sm90_kernel"),
             ((1024, 1024), 65, True, "gemm_sm90_kernel"))
    check_policy(cases, 2, dtype, monkeypatch)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_four_bit_codes_policy(dtype, monkeypatch):
    """The default policy on Hopper for 4-bit codes from 65 to 96 rows: the
    staged kernel's small grids against weights of at most 1536 inputs and
    outputs, the wgmma kernel at 64 rows or fewer, past 96, against larger
    weights and with the small grids turned off; each against float64."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel runs on compute capability 9.0")
    monkeypatch.delenv("MPQ_OPS_CUDA_KERNEL", raising=False)
    cases = (((1536, 576), 65, True, "gemm_cuda_kernel"),
             ((576, 1536), 96, True, "gemm_cuda_kernel"),
             ((1000, 1024), 77, True, "gemm_cuda_kernel"),
             ((1536, 1536), 65, True, "gemm_cuda_kernel"),
             ((1024, 1024), 64, True, "gemm_sm90_kernel"),
             ((1024, 1024), 97, True, "gemm_sm90_kernel"),
             ((2048, 1024), 72, True, "gemm_sm90_kernel"),
             ((1024, 1024), 72, False, "gemm_sm90_kernel"))
    check_policy(cases, 4, dtype, monkeypatch)


def staged_launches(names):
    """Template arguments of each staged-kernel launch among the profiler's
    (demangled) kernel names: gemm_cuda_kernel<T, W, N_TILES, RT, WARPS,
    STAGES, U, MIN_BLOCKS, PAIRED, LATE, KR, XR, WIDE, SK, TAIL, MB>."""
    found = [re.search(r"gemm_cuda_kernel<([^>]*)>", n) for n in names]
    return [[a.strip() for a in m.group(1).split(",")] for m in found if m]


def tiles_splits(row_blocks, steps):
    """K splits of the staged kernel's grid of several x tiles (gemm.cuh's
    tiles_splits): until about two blocks per SM, at least 4 steps a split."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return max(1, min(2 * sms // row_blocks, max(1, steps // 4)))


def expect_ring_stream_k(N, K, w_bit):
    """Whether the 16-row staged kernel takes stream-K against an [N, K]
    weight (gemm.cuh's launch_kernel): where its grid of 128-row blocks is
    left unsplit (K split until about two blocks per SM: more row blocks than
    SMs) yet leaves slots idle, and each block of one wave gets 8 steps or
    more. Two blocks per SM for 4- and 8-bit codes, three for 2-bit."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    step, runs_of = {2: (256, 1), 4: (128, 2), 8: (64, 2)}[w_bit]
    row_blocks, steps = N // 128, K // step
    slots = (3 if w_bit == 2 else 2) * sms
    return (N % 128 == 0 and K % step == 0 and steps % runs_of == 0
            and tiles_splits(row_blocks, steps) == 1
            and row_blocks < slots and row_blocks * steps >= 8 * slots)


@pytest.mark.parametrize("stream_k,ring_sync", (
    (True, "mbarrier"), (True, "barrier"), (False, "mbarrier")),
    ids=("stream_k", "stream_k-barrier", "split_grid"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("w_bit", (2, 4, 8))
def test_sixteen_row_stream_k(w_bit, dtype, stream_k, ring_sync, monkeypatch):
    """The staged 16-row kernel over one wave in stream-K: blocks of equal
    work across row-block boundaries, x copied through the ring step by step
    from one row block into the next, a row block's parts in as many
    workspace slots as blocks it spans and zeros past its last part; or with
    MPQ_OPS_CUDA_STREAM_K=0 the split grid; and where stream-K is not taken
    (N not a whole number of row blocks, a grid that splits K, a partial
    last step: K 32 inputs or one lane's 16 bytes of codes past whole steps,
    whichever is more). 9 to 16 rows, and for 4-bit codes 5 to 8 rows in the
    16-row kernel too (MPQ_OPS_CUDA_X16=1); groups of whole steps (late
    scaling), within a step and per row; with and without bias; odd M from a
    non-contiguous x. Stream-K's ring of paired x (4- and 8-bit codes) syncs
    through mbarriers on sm_90, or with MPQ_OPS_CUDA_RING_SYNC=barrier through
    a block barrier per step. Which kernel ran is checked from the profiler's
    kernel names."""
    monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", "gemm")
    monkeypatch.setenv("MPQ_OPS_CUDA_X16", "1")
    monkeypatch.setenv("MPQ_OPS_CUDA_STREAM_K", "1" if stream_k else "0")
    monkeypatch.setenv("MPQ_OPS_CUDA_RING_SYNC", ring_sync)
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    k = 4096 if w_bit == 2 else 2048
    lane = 4 * 32 // w_bit  # inputs in a lane's 16 bytes of codes
    # (K a multiple of 32, as the format asks: 8-bit codes' tail is two lanes' chunks)
    tail = max(lane, 32)
    shapes = ((28672, k, 128, True), (28672, k, -1, False), (20480, 2 * k, 64, True),
              (28600, k, 128, False), (4096, 16384, 128, True), (28672, k + tail, -1, True))
    rows = (5, 8, 9, 12, 16) if w_bit == 4 else (9, 12, 16)
    for N, K, group_size, with_bias in shapes:
        weight = make_weight(N, K, w_bit, group_size, dtype, "cuda")
        bias = torch.randn(N, device="cuda").to(dtype) if with_bias else None
        expected = stream_k and expect_ring_stream_k(N, K, w_bit)
        for M in rows:
            x = make_x((M,), K, dtype, "cuda", noncontig=M % 2 == 1)
            # (the workspace, float32 and larger than y, then starts as NaN too)
            poison_allocator(1 << 24, torch.float32)
            check_matmul(x, weight, w_bit, group_size, bias, (N, K, M))
            launches = staged_launches(launched_kernels(
                lambda: torch.ops.mpq.matmul(x, *weight, w_bit, group_size, None, bias)))
            assert len(launches) == 1 and launches[0][2] == "2", (N, K, M, launches)
            assert (launches[0][13] == "true") == expected, (N, K, M, launches)
            mb = expected and w_bit != 2 and sm90 and ring_sync == "mbarrier"
            assert (launches[0][15] == "true") == mb, (N, K, M, launches)
    if stream_k and torch.cuda.get_device_properties(0).multi_processor_count in range(100, 200):
        # (where 28672 rows are more row blocks than SMs and fewer than slots)
        assert expect_ring_stream_k(28672, k, w_bit)


def expect_x_tiles(N, K, w_bit, M):
    """The staged kernel's x tiles of 8 rows for M rows (gemm.cuh's
    gemm_bits): two from 9 rows, and for 5 to 8 rows of 4-bit codes where
    K > N and the 16-row kernel's split grid fills nine tenths of two blocks
    per SM (x16_for_few_rows)."""
    if M > 8:
        return 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    row_blocks, steps = -(-N // 128), -(-K // 128)
    few = (w_bit == 4 and M >= 5 and K > N
           and 10 * row_blocks * tiles_splits(row_blocks, steps) >= 18 * sms)
    return 2 if few else 1


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_few_rows_sixteen_row_policy(dtype, monkeypatch):
    """5 to 8 rows of 4-bit codes: the 16-row staged kernel where K > N and
    its split grid fills the SMs, the 8-row one elsewhere (K <= N, few
    blocks); 2- and 8-bit codes always the 8-row one; each against float64."""
    monkeypatch.delenv("MPQ_OPS_CUDA_X16", raising=False)
    monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", "gemm")
    cases = ((4, (4096, 14336), 5), (4, (4096, 14336), 8), (4, (1024, 4096), 6),
             (4, (14336, 4096), 7), (4, (4096, 4096), 8), (4, (4096, 14336), 4),
             (4, (4096, 14336), 9), (8, (4096, 14336), 6), (2, (4096, 14336), 6))
    for w_bit, (N, K), M in cases:
        weight = make_weight(N, K, w_bit, 128, dtype, "cuda")
        x = make_x((M,), K, dtype, "cuda", noncontig=M % 2 == 1)
        check_matmul(x, weight, w_bit, 128, None, (w_bit, N, K, M))
        launches = staged_launches(launched_kernels(
            lambda: torch.ops.mpq.matmul(x, *weight, w_bit, 128)))
        tiles = str(expect_x_tiles(N, K, w_bit, M))
        assert len(launches) == 1 and launches[0][2] == tiles, (w_bit, N, K, M, launches)
    if torch.cuda.get_device_properties(0).multi_processor_count in range(100, 200):
        assert expect_x_tiles(4096, 14336, 4, 8) == 2 and expect_x_tiles(4096, 4096, 4, 8) == 1


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("w_bit", (4, 8))
def test_one_row_k_ranges(w_bit, dtype):
    """One row of x, 4- and 8-bit codes: each weight row as eight k ranges
    where that grid (N / 8 blocks) fits one wave, as two ranges (k-paired)
    past it; ragged N on both sides, K a multiple of eight ranges or only of
    two, groups per step and per row, with bias."""
    for N, K, group_size in ((1000, 2048, 128), (12001, 2048, 128), (12000, 1536, 128),
                             (1003, 4096, -1), (40000, 1024, -1)):
        weight = make_weight(N, K, w_bit, group_size, dtype, "cuda")
        bias = torch.randn(N, device="cuda").to(dtype)
        x = make_x((1,), K, dtype, "cuda")
        check_matmul(x, weight, w_bit, group_size, bias, (N, K))


@pytest.mark.parametrize("shares", ("whole", "even", "rule"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("w_bit", (4, 8))
def test_one_row_stream_k(w_bit, dtype, shares, monkeypatch):
    """One row of x against more k-paired row blocks (32 rows) than one wave
    of blocks holds: one block per slot, each taking an even share of (row
    block, step) items across row-block boundaries (stream-K), its segments
    in two workspace slots added up after (on 132 SMs of five blocks: past
    21120 rows); or, where the row blocks divide evenly into a grid that fits
    the slots, shares of whole row blocks that write y themselves
    (MPQ_OPS_CUDA_SK_WHOLE=1; =0 keeps the even shares; unset, gemm.cuh's
    rule picks). Shares just over one row block (22016 rows) and of several
    (40000; 63360, three whole row blocks per block), one run of steps per
    row block (K = 512) up to the longest resident x (K = 20480), groups
    within a step, of whole steps and per row, with and without bias; the
    workspace is poisoned too (a NaN block large enough for y and both
    slots)."""
    if shares == "rule":
        monkeypatch.delenv("MPQ_OPS_CUDA_SK_WHOLE", raising=False)
    else:
        monkeypatch.setenv("MPQ_OPS_CUDA_SK_WHOLE", "1" if shares == "whole" else "0")
    for N, K, group_size, with_bias in ((22016, 1536, 64, True), (40000, 512, 128, False),
                                        (63360, 512, 128, True),
                                        (28672, 8192, 128, True), (22016, 20480, -1, False),
                                        (40000, 2048, 32, True)):
        weight = make_weight(N, K, w_bit, group_size, dtype, "cuda")
        bias = torch.randn(N, device="cuda").to(dtype) if with_bias else None
        x = make_x((1,), K, dtype, "cuda")
        poison_allocator(6 * N, torch.float16)
        check_matmul(x, weight, w_bit, group_size, bias, (N, K, group_size))
        if shares != "rule" and N == 40000 and K == 512 and (
                torch.cuda.get_device_properties(0).multi_processor_count in range(100, 200)):
            # (1250 row blocks, past one wave of slots: stream-K; whole shares
            # of two row blocks need no kernel that adds parts)
            names = launched_kernels(
                lambda: torch.ops.mpq.matmul(x, *weight, w_bit, group_size, None, bias))
            launches = staged_launches(names)
            assert len(launches) == 1 and launches[0][13] == "true", (shares, names)
            summed = any("finish_split" in n for n in names)
            assert summed == (shares == "even"), (shares, names)


def two_bit_pairs_by_rule(N, K, sms, blocks_per_sm):
    """gemm.cuh's launch_kernel rule for one row of x against 2-bit codes,
    written out again: k-paired rows (32-row blocks, 512-input steps, 35 of
    them in a resident slice) where one range per row (64-row blocks,
    256-input steps, 63 per slice) would split K and the k-paired grid fills
    one wave unsplit; each grid split as a streaming GEMV's."""
    if K % 512:
        return False
    slots = sms * blocks_per_sm

    def splits(blocks, steps, most_steps):
        if blocks > slots:
            return 2  # (past one wave: not taken either way)
        fill = max(1, min(4 * slots // (5 * blocks), 8, max(1, steps // 4)))
        return max(fill, -(-steps // most_steps))

    pair_blocks = -(-N // 32)
    return (splits(-(-N // 64), K // 256, 63) > 1 and pair_blocks <= slots
            and splits(pair_blocks, K // 512, 35) == 1)


@pytest.mark.parametrize("ranges", ("pairs", "one", "default"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_two_bit_one_row_late_scaling(dtype, ranges, monkeypatch):
    """One row of x, 2-bit codes, groups of 64 or more: late scaling with each
    lane's range of a step in its own B column (gemm_kernel.cuh's COLS), for
    groups of a quarter, a half and a whole step and per row; ragged N, with
    bias, x centred and offset (sum(x) large against sum(x * code)). With
    MPQ_OPS_CUDA_W2_RANGES=2 k-paired rows (two ranges per step, 32-row
    blocks) where K is a whole number of their 512-input steps, with =1 one
    range per row, and by default as the rule picks (two_bit_pairs_by_rule, at
    four or five blocks per SM; where the two counts disagree either kernel
    passes); which ran is checked from the profiler's kernel names. A split's
    slice of x must fit the shared memory it may take (63 steps of one range,
    35 of two): 65 steps on 300 row blocks, which alone would take one split
    (on 132 SMs), take two; K = 8448 (33 steps of one range) on 120 rows
    leaves a split of the eight with no step, as K = 16896 does (33 of two).
    96 rows per SM (ragged) with K = 4096: one range per row would split K in
    two, k-paired rows fill the wave unsplit, so the rule takes them."""
    monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", "gemm")
    if ranges == "default":
        monkeypatch.delenv("MPQ_OPS_CUDA_W2_RANGES", raising=False)
    else:
        monkeypatch.setenv("MPQ_OPS_CUDA_W2_RANGES", "2" if ranges == "pairs" else "1")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for N, K, group_size in ((1000, 4096, 64), (1003, 4096, 128), (517, 8192, 256),
                             (200, 6144, -1), (64, 65536, 128), (64, 65536, 256),
                             (120, 8448, 64), (120, 16896, 64), (19200, 16640, 128),
                             (19200, 16384, 128), (96 * sms - 5, 4096, 128)):
        weight = make_weight(N, K, 2, group_size, dtype, "cuda")
        bias = torch.randn(N, device="cuda").to(dtype)
        for offset in (0.0, 8.0):
            x = (make_x((1,), K, torch.float32, "cuda") + offset).to(dtype)
            check_matmul(x, weight, 2, group_size, bias, (N, K, group_size, offset))
        launches = staged_launches(launched_kernels(
            lambda: torch.ops.mpq.matmul(x, *weight, 2, group_size, None, bias)))
        if ranges == "default":
            by_rule = {two_bit_pairs_by_rule(N, K, sms, b) for b in (4, 5)}
            krs = {"2" if pairs else "1" for pairs in by_rule}
            if N == 96 * sms - 5:
                assert krs == {"2"}, (N, K)
        else:
            krs = {"2" if ranges == "pairs" and K % 512 == 0 else "1"}
        # (KR, XR, WIDE: the resident x in late scaling over B columns)
        assert len(launches) == 1 and launches[0][10] in krs, (N, K, launches)
        assert launches[0][11:13] == [launches[0][10], "true"], (N, K, launches)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("w_bit,kernel", [(4, None), (8, None), (2, "sm90"), (4, "sm90"), (8, "sm90")])
def test_late_scaling_with_offset_x(w_bit, kernel, dtype, monkeypatch):
    """Late scaling (groups of whole steps) sums bare codes in the MMAs and
    applies each group's scale and zero point to the sums: float16 codes as
    subnormals (exact), 4-bit bfloat16 codes biased by the magic value 128,
    which leaves with the zero point. x far from zero mean makes sum(x) large
    against sum(x * code), where a bias costs the tensor cores' float32 sums
    the most. One row (its k ranges), 3 and 16 rows (staged tiles), long K;
    each within the float64 reference's tolerance, outputs poisoned. Forced
    "sm90": the wgmma kernel, which scales before its MMAs, under the same x."""
    if kernel is not None:
        monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", kernel)
    N, K, group_size = 1024, 8192, 128
    weight = make_weight(N, K, w_bit, group_size, dtype, "cuda")
    # (8-bit codes: zero points up to 255 make y overflow float16 already at
    # an offset of 16)
    for offset in (4.0, 64.0) if w_bit <= 4 else (1.0, 2.0):
        for M in (1, 3, 16):
            x = (make_x((M,), K, torch.float32, "cuda") + offset).to(dtype)
            check_matmul(x, weight, w_bit, group_size, None, (offset, M))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("w_bit", (2, 4, 8))
def test_small_x_within_tolerance(w_bit, dtype):
    """x far below 1 (scaled by 2^-14 and 2^-16: float16 subnormals and near
    them) within the float64 reference's tolerance, as at the scale of 1: the
    kernels take x as given, where rescaling its values (to spare an
    instruction on the codes' side, tile::WeightRows::mma_sums) would push
    them into float16's subnormal range and lose their low bits. One row (its
    k ranges), 3 and 16 rows (staged tiles), 64 rows (wgmma kernel)."""
    N, K, group_size = 1024, 8192, 128
    weight = make_weight(N, K, w_bit, group_size, dtype, "cuda")
    for e in (14, 16):
        for M in (1, 3, 16, 64):
            x = (make_x((M,), K, torch.float32, "cuda") * 2.0 ** -e).to(dtype)
            check_matmul(x, weight, w_bit, group_size, None, (e, M))


@pytest.mark.parametrize("kernel", ("gemv", "gemm", "sm90", "dequantize"))
def test_opcheck_each_forced_path(kernel, monkeypatch):
    """opcheck (schema, fake kernel, autograd registration, dynamic shapes) with
    each CUDA path forced, so that the paths the default policy picks only for
    many rows (the wgmma kernel above 64, dequantize + cuBLAS) are checked at
    opcheck's small sizes too; a path that cannot serve an input falls back."""
    from torch.library import opcheck
    monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", kernel)
    # (M, group_size, perm, bias, non-contiguous x, grad)
    cases = ((1, 64, False, True, False, False), (13, -1, True, False, True, True),
             (33, 128, False, True, True, False), (70, 64, True, True, False, True))
    for w_bit in (2, 4, 8):
        for dtype in (torch.float16, torch.bfloat16):
            for M, group_size, with_perm, with_bias, noncontig, grad in cases:
                # (K = 320 and 128 rows: a partial last step of the staged kernel)
                K, N = (320, 128) if M == 13 else (256, 96)
                qweight, scales, zeros = make_weight(N, K, w_bit, group_size, dtype, "cuda")
                x = make_x((M,), K, dtype, "cuda", noncontig).requires_grad_(grad)
                perm = torch.randperm(K, device="cuda").to(torch.int32) if with_perm else None
                bias = torch.randn(N, device="cuda").to(dtype) if with_bias else None
                opcheck(torch.ops.mpq.matmul.default,
                        (x, qweight, scales, zeros, w_bit, group_size, perm, bias))


def test_float32_on_cuda_through_dequantize_path():
    qweight, scales, zeros = make_weight(64, 256, 4, 64, torch.float32, "cuda")
    x = make_x((7,), 256, torch.float32, "cuda")
    y = torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, 64)
    assert rel_err(y, ref_matmul(x, qweight, scales, zeros, 4, 64)) < 1e-5


def cuda_kernels_run_by(fn):
    """Names of the CUDA kernels that fn() launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("group_size", (32, 64))
@pytest.mark.parametrize("w_bit", (2, 4, 8))
def test_sm90_fine_groups_need_aligned_scales(w_bit, group_size, dtype, monkeypatch):
    """Groups of 32 and 64: the wgmma kernel reads the scales and zeros of a
    pair of steps in one 8- or 4-byte load, so it takes them only at that
    alignment (Hopper); scales and zeros one element further on go to the
    staged kernel. Both against float64, outputs poisoned."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel runs on compute capability 9.0")
    monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", "sm90")
    N, K, M = 1000, 2048, 40
    qweight, scales, zeros = make_weight(N, K, w_bit, group_size, dtype, "cuda")
    x = make_x((M,), K, dtype, "cuda")
    for offset in (0, 1):
        s, z = (torch.empty(t.numel() + 1, device="cuda", dtype=dtype)[offset:offset + t.numel()]
                .view_as(t).copy_(t) for t in (scales, zeros))
        names = cuda_kernels_run_by(lambda: check_matmul(x, (qweight, s, z), w_bit, group_size,
                                                         context=(offset,)))
        assert any("gemm_sm90_kernel" in n for n in names) == (offset == 0), (offset, names)


def test_misaligned_views_are_handled():
    qweight, scales, zeros = make_weight(64, 512, 4, 128, torch.float16, "cuda")
    base = torch.randn(3, 512 + 1, device="cuda", dtype=torch.float16)
    x = base[:, 1:]  # 2-byte offset: not 16-byte aligned
    y = torch.ops.mpq.matmul(x, qweight, scales, zeros, 4, 128)
    assert rel_err(y, ref_matmul(x, qweight, scales, zeros, 4, 128)) < REL_TOL[torch.float16]


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("w_bit", (2, 4, 8))
@pytest.mark.parametrize("N,K,group_size", [(1, 32, 32), (37, 96, 32), (300, 768, 256),
                                            (129, 1536, 384), (1027, 4096, 128), (5, 2048, -1)])
def test_dequantize_fully_written(dtype, w_bit, N, K, group_size):
    """mpq::dequantize into a poisoned block: thread blocks take runs of slots
    that cross rows and end ragged; every element against float64."""
    weight = make_weight(N, K, w_bit, group_size, dtype, "cuda")
    poison_allocator(N * K, dtype)
    W = torch.ops.mpq.dequantize(*weight, w_bit, group_size)
    ref = torch.from_numpy(ref_dequantize(*weight, w_bit, group_size))
    assert rel_err(W, ref) < REL_TOL[dtype]


def test_dequantize_w8_codes_at_4_byte_offset():
    """8-bit codes whose storage starts 4 bytes past an 8-byte boundary (a
    contiguous view into a larger buffer) cannot take 8-byte loads."""
    N, K = 67, 640
    qweight, scales, zeros = make_weight(N, K, 8, 64, torch.float16, "cuda")
    buf = torch.empty(qweight.numel() + 1, dtype=torch.int32, device="cuda")
    shifted = buf[1:].view(qweight.shape)
    shifted.copy_(qweight)
    assert shifted.data_ptr() % 8 == 4 and shifted.is_contiguous()
    poison_allocator(N * K, torch.float16)
    W = torch.ops.mpq.dequantize(shifted, scales, zeros, 8, 64)
    ref = torch.from_numpy(ref_dequantize(qweight, scales, zeros, 8, 64))
    assert rel_err(W, ref) < REL_TOL[torch.float16]


def test_dequantize_past_2_31_slots():
    """The kernel indexes slots of 8 outputs with 32 bits, so weights of 2^31
    slots (2^34 outputs) or more go in slices of whole rows: the rows on both
    sides of the slice edge and the last rows against float64, the output
    over a poisoned block and all finite."""
    K, w_bit, group_size = 4096, 2, 128
    slots = K // 8
    N = (1 << 31) // slots + 2
    edge = ((1 << 31) - 1) // slots  # first row of the second slice
    if torch.cuda.mem_get_info()[0] < 48 << 30:
        pytest.skip("needs 48 GiB of free GPU memory")
    # Full 32-bit random words (every code value): 4 GiB of codes, 32 GiB out.
    qweight = torch.randint(-2**15, 2**15, (N, K * w_bit // 16), dtype=torch.int16,
                            device="cuda").view(torch.int32)
    scales = torch.rand(N, K // group_size, device="cuda").to(torch.float16) * 0.04 + 0.01
    zeros = torch.rand(N, K // group_size, device="cuda").to(torch.float16) * 3
    poison_allocator(N * K, torch.float16)
    W = torch.ops.mpq.dequantize(qweight, scales, zeros, w_bit, group_size)
    assert all(torch.isfinite(part).all() for part in W.split(1 << 18))
    rows = torch.tensor([0, 1, edge - 2, edge - 1, edge, edge + 1, N - 1], device="cuda")
    ref = ref_dequantize(qweight[rows], scales[rows], zeros[rows], w_bit, group_size)
    assert rel_err(W[rows], torch.from_numpy(ref)) < REL_TOL[torch.float16]


@pytest.mark.parametrize("split_sum", ("cluster", "workspace"))
def test_concurrent_streams(split_sum, monkeypatch):
    """Calls on four streams at once, all enqueued before any result is read,
    so that their kernels share the SMs: stream-K grids sized to the slots,
    split sums in clusters or through the workspace (each call's own, from the
    allocator of its stream), the wgmma kernel and dequantize + cuBLAS. No
    kernel's blocks may wait on blocks that another kernel keeps off the SMs."""
    monkeypatch.setenv("MPQ_OPS_CUDA_SPLIT_SUM", split_sum)
    # (w_bit, N, K, M)
    cases = [(4, 22016, 1024, 1), (4, 28672, 1024, 16), (8, 1024, 8192, 1), (2, 1024, 8192, 4),
             (4, 4096, 2048, 300), (2, 28672, 1024, 1), (8, 4096, 2048, 9), (4, 4096, 1024, 5000)]
    weights = {c: make_weight(c[1], c[2], c[0], 128, torch.float16, "cuda") for c in cases}
    streams = [torch.cuda.Stream() for _ in range(4)]
    torch.cuda.synchronize()
    runs = []
    for rep in range(3):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                for c in cases[i::2] + cases[rep::3]:
                    x = make_x((c[3],), c[2], torch.float16, "cuda")
                    runs.append((c, x, torch.ops.mpq.matmul(x, *weights[c], c[0], 128)))
    torch.cuda.synchronize()
    for (w_bit, N, K, M), x, y in runs:
        ref = ref_matmul(x, *weights[(w_bit, N, K, M)], w_bit, 128)
        assert rel_err(y, ref) < REL_TOL[torch.float16], (w_bit, N, K, M)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        from mpq_ops import MPQLinear
        self.a = MPQLinear.from_linear(nn.Linear(512, 1024, dtype=torch.float16).cuda(), 4, 128)
        self.b = MPQLinear.from_linear(nn.Linear(1024, 512, dtype=torch.float16).cuda(), 2, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_reduce_overhead_runs_under_cuda_graphs():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = Model().eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for step in range(5):
            x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
            out = compiled(x).clone()
            torch.testing.assert_close(out, model(x), rtol=2e-3, atol=2e-3)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] >= 0


@pytest.mark.parametrize("N,K,M", [(256, 1024, 2), (22016, 1024, 1), (64, 8192, 3),
                                   (28672, 2048, 16)])
def test_raw_cuda_graph_capture_and_replay(N, K, M, monkeypatch):
    """Capture and replay with new x: the split grids' sums through the
    workspace (on Hopper in a kernel launched programmatically after the one
    before), one row of x in stream-K past one wave of blocks (22016 rows),
    16 rows in the staged 16-row kernel's stream-K (28672 rows: more row
    blocks than SMs, fewer than its slots; forced to the staged kernel)."""
    monkeypatch.setenv("MPQ_OPS_CUDA_SPLIT_SUM", "workspace")
    if M == 16:
        monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", "gemm")
    qweight, scales, zeros = make_weight(N, K, 4, 128, torch.float16, "cuda")
    static_x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    g, static_y = capture_graph(
        lambda: torch.ops.mpq.matmul(static_x, qweight, scales, zeros, 4, 128))
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        g.replay()
        ref = ref_matmul(static_x, qweight, scales, zeros, 4, 128)
        assert rel_err(static_y, ref) < REL_TOL[torch.float16]


def unit_gain_weight(N, K, w_bit, group_size, seed, dtype=torch.float16):
    """make_weight's codes with scales shrunk so that y = x @ W^T keeps x's
    size (a chain of such layers neither grows nor vanishes)."""
    qweight, scales, zeros = make_weight(N, K, w_bit, group_size, dtype, "cuda", seed)
    W = ref_dequantize_t(qweight, scales, zeros, w_bit, group_size)
    scales = (scales.double() / (W.std() * K ** 0.5)).to(dtype)
    return qweight, scales, zeros


# (w_bit, K, group_size, rows of x, dtype, the kernel's name):
# one row through the staged kernel, and 12 to 64 rows of x against weights as
# small as SmolLM2's (its small grids: K split into single steps added up in a
# cluster or, 2-bit codes, by a second kernel; a partial last step for 2- and
# 4-bit codes); many through the wgmma kernel, whole (K = 128: one pair of
# steps, nothing to split; y stored by the kernel) or split over K (partial
# sums added by a second kernel), with its permuting warps (bfloat16 4-bit
# codes, 16 rows) and each code width and group kind.
CHAIN_CASES = [
    (4, 1024, 128, 1, torch.float16, "gemm_cuda_kernel"),
    (4, 576, 32, 1, torch.float16, "gemm_cuda_kernel"),
    (2, 1024, 64, 1, torch.float16, "gemm_cuda_kernel"),
    (8, 1024, 64, 1, torch.float16, "gemm_cuda_kernel"),
    (4, 576, 32, 16, torch.float16, "gemm_cuda_kernel"),
    (8, 576, 64, 12, torch.bfloat16, "gemm_cuda_kernel"),
    (4, 576, 64, 64, torch.bfloat16, "gemm_cuda_kernel"),
    (2, 576, 64, 32, torch.float16, "gemm_cuda_kernel"),
    (4, 8192, 128, 1, torch.float16, "gemm_cuda_kernel"),
    (4, 1024, 128, 16, torch.float16, "gemm_sm90_kernel"),
    (4, 1024, 32, 16, torch.bfloat16, "gemm_sm90_kernel"),
    (4, 4096, 128, 64, torch.float16, "gemm_sm90_kernel"),
    (2, 128, 64, 48, torch.float16, "gemm_sm90_kernel"),
    (8, 1024, 128, 48, torch.bfloat16, "gemm_sm90_kernel"),
]


@pytest.mark.parametrize("w_bit,K,group_size,M,dtype,kernel", CHAIN_CASES)
@pytest.mark.parametrize("graph", (False, True), ids=("eager", "graph"))
def test_programmatic_launches_in_a_chain(w_bit, K, group_size, M, dtype, kernel, graph,
                                          monkeypatch):
    """The fused kernels start while the kernel before them ends (programmatic
    dependent launch) and wait for it before reading anything or writing. A
    chain of calls, each reading the one before's output (which the kernels
    let start before they end) and writing into memory the allocator took
    back from an input two calls earlier: the same bits as in plain stream
    order (MPQ_OPS_CUDA_PDL=0), close to float64, eagerly and replayed from a
    CUDA graph with new x. The wgmma kernel's cases force it
    (MPQ_OPS_CUDA_KERNEL=sm90; Hopper only); the others take the staged kernel."""
    sm90 = kernel == "gemm_sm90_kernel"
    if sm90 and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel runs on compute capability 9.0")
    if sm90:
        monkeypatch.setenv("MPQ_OPS_CUDA_KERNEL", "sm90")
    layers = [unit_gain_weight(K, K, w_bit, group_size, seed, dtype) for seed in range(6)]

    def chain(x):
        for qweight, scales, zeros in layers:
            x = torch.ops.mpq.matmul(x, qweight, scales, zeros, w_bit, group_size)
        return x

    def reference(x):
        y = x.double()
        for qweight, scales, zeros in layers:
            y = y @ ref_dequantize_t(qweight, scales, zeros, w_bit, group_size).T
        return y

    def check(y, x):
        monkeypatch.setenv("MPQ_OPS_CUDA_PDL", "0")
        plain = chain(x)
        monkeypatch.delenv("MPQ_OPS_CUDA_PDL")
        assert torch.equal(y, plain)
        assert rel_err(y, reference(x)) < 6 * REL_TOL[dtype]

    x = torch.randn(M, K, device="cuda", dtype=dtype)
    assert any(kernel in name for name in launched_kernels(lambda: chain(x)))
    if graph:
        g, y = capture_graph(lambda: chain(x))
    for _ in range(3):
        if graph:
            x.copy_(torch.randn_like(x))
            g.replay()
        else:
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            y = chain(x)
        check(y, x)
