"""Packing, round-to-nearest quantization, GPTQ / bitorch-engine conversions and the layers.

Checkpoints here are built with an independent numpy packer (tests/helpers.py),
and the dequantized weights are compared exactly with the weights the files
describe."""
import importlib

import numpy as np
import pytest
import torch
from torch import nn

import mpq_ops
from mpq_ops import (MPQLinear, MPQLinearCuda, MPQLinearMlx, from_gptq, pack,
                     prepare_bie_layers, quantize_rtn, unpack)
from helpers import (REL_TOL, make_weight, make_x, np_pack_rows, ref_dequantize,
                     ref_matmul, rel_err)


@pytest.mark.parametrize("w_bit", (2, 4, 8))
@pytest.mark.parametrize("codes_dtype", (torch.int64, torch.int32, torch.uint8))
@pytest.mark.parametrize("byte_view", (True, False))
def test_pack_matches_independent_packer_and_roundtrips(w_bit, codes_dtype, byte_view,
                                                        monkeypatch):
    """pack() against the numpy packer, both ways it makes words (bytes viewed
    as words on little-endian hosts, shifts and sums elsewhere)."""
    monkeypatch.setattr(importlib.import_module("mpq_ops.pack"), "_LITTLE_ENDIAN", byte_view)
    q = torch.randint(0, 2**w_bit, (7, 128)).to(codes_dtype)
    q[0, :16] = 2**w_bit - 1     # a word of all ones (int32 -1)
    words = pack(q, w_bit)
    assert words.dtype == torch.int32 and words.shape == (7, 128 * w_bit // 32)
    assert torch.equal(words, torch.from_numpy(np_pack_rows(q.numpy(), w_bit)))
    assert torch.equal(unpack(words, w_bit), q.to(torch.int32))
    # Along dim 0 (GPTQ's qweight orientation).
    assert torch.equal(unpack(pack(q.t(), w_bit, dim=0), w_bit, dim=0), q.t().to(torch.int32))


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="w_bit must be 2, 4 or 8, got 3"):
        pack(torch.zeros(2, 32, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        pack(torch.full((2, 32), 16), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(2, 12, dtype=torch.int32), 4)


@pytest.mark.parametrize("w_bit", (2, 4, 8))
@pytest.mark.parametrize("group_size", (32, 64, 128, -1))
@pytest.mark.parametrize("mode", ("affine", "integer_zeros", "symmetric"))
def test_rtn_error_within_half_a_step(w_bit, group_size, mode):
    N, K = 48, 256
    w = torch.randn(N, K, dtype=torch.float64) * 0.05
    qw = quantize_rtn(w, w_bit, group_size, symmetric=mode == "symmetric", dtype=torch.float32,
                      integer_zeros=mode == "integer_zeros")
    gs = K if group_size == -1 else group_size
    W = mpq_ops.dequantize(qw.qweight, qw.scales, qw.zeros, w_bit, group_size).double()
    step = qw.scales.double().repeat_interleave(gs, 1)
    err = (W - w).abs()
    if mode == "integer_zeros":
        # The rounded zero point shifts the grid by up to half a step at the ends.
        assert (err <= step + 1e-7).all()
        assert err.mean() < step.mean() / 3
        assert ((qw.zeros - qw.zeros.round()) == 0).all()
    else:
        assert (err <= step / 2 * (1 + 1e-5)).all()
    if mode == "affine":
        # Both ends of every group are on the grid.
        wg, Wg = w.reshape(N, -1, gs), W.reshape(N, -1, gs)
        torch.testing.assert_close(Wg.amin(-1), wg.amin(-1), rtol=0, atol=1e-6)
        torch.testing.assert_close(Wg.amax(-1), wg.amax(-1), rtol=0, atol=1e-6)


EDGE_GROUPS = {
    # float16 weights one ulp apart near 10: an 8-bit step of 3e-5 would need
    # a zero point of -3.3e5, past float16's 65504
    "fp16 one ulp off 0": (lambda: torch.tensor([10.0, 10.0078125] * 16).repeat(3, 1).half(),
                           None),
    # float32 weights near 10 within 1e-4, scales and zeros in float16
    "fp32 near 10 -> fp16": (lambda: 10 + torch.rand(3, 32) * 1e-4, torch.float16),
    # steps below float16's least subnormal (6e-8), which rounded them to 0
    "fp32 below 1e-7 -> fp16": (lambda: torch.rand(3, 32) * 1e-7, torch.float16),
    "fp16 subnormals": (lambda: (torch.rand(3, 32) * 1e-6).half(), None),
    "bf16 near 1e-30": (lambda: (torch.rand(3, 32) * 1e-30).bfloat16(), None),
    "fp16 one value": (lambda: torch.full((3, 32), -0.3).half(), None),
}


@pytest.mark.parametrize("case", EDGE_GROUPS)
@pytest.mark.parametrize("w_bit", (2, 4, 8))
@pytest.mark.parametrize("mode", ("affine", "integer_zeros", "symmetric"))
def test_rtn_groups_at_the_dtypes_edges(case, w_bit, mode):
    """Groups whose step or zero point the scales' dtype cannot hold as such
    (far from 0 against their spread, or spread below the least subnormal):
    finite scales and zeros, weights within a step (half a step affine) plus
    the rounding of the weight to the dtype (dequantize's output: relative,
    or one least subnormal)."""
    make, dtype = EDGE_GROUPS[case]
    w = make()
    qw = quantize_rtn(w, w_bit, 32, symmetric=mode == "symmetric", dtype=dtype,
                      integer_zeros=mode == "integer_zeros")
    assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
    assert torch.isfinite(qw.zeros).all()
    W = mpq_ops.dequantize(qw.qweight, qw.scales, qw.zeros, w_bit, 32).double()
    step = qw.scales.double().repeat_interleave(32, 1)
    fi = torch.finfo(qw.scales.dtype)
    limit = (step * (0.5 if mode == "affine" else 1.0) * (1 + 1e-3)
             + 4 * fi.eps * w.double().abs() + fi.tiny * fi.eps)
    assert ((W - w.double()).abs() <= limit).all(), (W - w.double()).abs().max()


def test_rtn_bad_input():
    with pytest.raises(ValueError, match="w_bit must be 2, 4 or 8, got 5"):
        quantize_rtn(torch.randn(4, 64), 5)
    with pytest.raises(ValueError, match="group_size 96 must divide"):
        quantize_rtn(torch.randn(4, 128), 4, 96)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rtn(torch.randn(4, 40), 4)


# --- GPTQ files ---------------------------------------------------------------

def gptq_tensors(K, N, w_bit, groups, act_order, convention, dtype=torch.float16, seed=0):
    """A GPTQ layer's tensors from an independent packer, with the weight they describe."""
    rng = np.random.default_rng(seed)
    gs = K // groups
    q = rng.integers(0, 2**w_bit, (K, N))
    z = rng.integers(1, 2**w_bit, (groups, N))   # >= 1 so v1's z-1 stays in range
    s = torch.from_numpy(rng.uniform(0.01, 0.05, (groups, N))).to(dtype)
    g_idx = np.arange(K) // gs
    if act_order:
        g_idx = rng.permutation(g_idx)
    stored_z = z - 1 if convention == "v1" else z
    qweight = torch.from_numpy(np_pack_rows(q.T, w_bit).T.copy())         # [K*b/32, N]
    qzeros = torch.from_numpy(np_pack_rows(stored_z, w_bit))               # [G, N*b/32]
    W = (q.T - z[g_idx].T) * s.double().numpy()[g_idx].T                   # [N, K]
    return qweight, qzeros, s, torch.from_numpy(g_idx).to(torch.int32), torch.from_numpy(W)


def canonical_to_linear_order(cw):
    W = mpq_ops.dequantize(cw.qweight, cw.scales, cw.zeros, cw.w_bit, cw.group_size)
    if cw.perm is not None:
        W = torch.empty_like(W).index_copy_(1, cw.perm.long(), W)
    return W.double()


@pytest.mark.parametrize("w_bit", (2, 4, 8))
@pytest.mark.parametrize("convention", ("v1", "v2"))
@pytest.mark.parametrize("act_order", (False, True))
def test_from_gptq_exact(w_bit, convention, act_order):
    K, N, G = 256, 64, 4
    qweight, qzeros, s, g_idx, W = gptq_tensors(K, N, w_bit, G, act_order, convention,
                                                dtype=torch.float32)
    cw = from_gptq(qweight, qzeros, s, w_bit, g_idx=g_idx, zero_convention=convention)
    assert (cw.perm is not None) == act_order
    assert torch.equal(canonical_to_linear_order(cw), W.float().double())
    # The op with perm computes x @ W^T for the original column order.
    x = torch.randn(5, K)
    y = mpq_ops.matmul(x, cw.qweight, cw.scales, cw.zeros, w_bit, cw.group_size, cw.perm)
    assert rel_err(y, x.double() @ W.T) < 1e-5


def test_from_gptq_rejects_uneven_groups():
    qweight, qzeros, s, g_idx, _ = gptq_tensors(128, 32, 4, 4, False, "v1")
    g_idx[0] = 1
    with pytest.raises(ValueError, match="exactly K/groups"):
        from_gptq(qweight, qzeros, s, 4, g_idx=g_idx)


# --- bitorch-engine layers ----------------------------------------------------

@pytest.mark.parametrize("w_bit", (2, 4, 8))
@pytest.mark.parametrize("act_order", (False, True))
def test_bitorch_gptq_checkpoint_loads(w_bit, act_order):
    K, N, gs = 256, 64, 64
    qweight, qzeros, s, g_idx, W = gptq_tensors(K, N, w_bit, K // gs, act_order, "v1")
    src = MPQLinearCuda(K, N, w_bit=w_bit, group_size=gs, use_gba_quant=False, dtype=torch.float16)
    sd = src.state_dict()
    sd.update(qweight=qweight, qzeros=qzeros, scales=s, g_idx=g_idx)
    layer = MPQLinearCuda(K, N, w_bit=w_bit, group_size=gs, use_gba_quant=False,
                          dtype=torch.float16)
    layer.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="call prepare_params"):
        layer(torch.randn(2, K, dtype=torch.float16))
    prepare_bie_layers(nn.Sequential(layer))
    assert torch.equal(layer.dequantize().double(), W.half().double())
    x = make_x((3,), K, torch.float16)
    assert rel_err(layer(x), x.double() @ W.T) < REL_TOL[torch.float16]


@pytest.mark.parametrize("dq_mode", (1, 2))
def test_bitorch_gba_symmetric_checkpoint_loads(dq_mode):
    K, N, gs, dq = 256, 64, 64, 16
    G = K // gs
    rng = np.random.default_rng(1)
    layer = MPQLinearCuda(K, N, w_bit=4, group_size=gs, use_gba_quant=True, dq_group_size=dq,
                          dq_mode=dq_mode, asym=False, dtype=torch.float32)
    q = rng.integers(0, 16, (K, N))
    qs, qz = rng.integers(0, 16, (G, N)), rng.integers(0, 16, (G, N))
    sd = layer.state_dict()
    sd["qweight"] = torch.from_numpy(np_pack_rows(q.T, 4).T.copy())
    sd["qstatistic"] = torch.from_numpy((qs << 4 | qz).astype(np.uint8)).reshape(G, N // dq, dq)
    qs_shape = sd["qscales_zeros"].shape
    sd["qscales_zeros"] = torch.rand(qs_shape) * 2
    sd["qscales_scales"] = torch.rand(qs_shape) * 0.01 + 0.001
    sd["qzeros_zeros"] = torch.rand(G, N // dq, 1) * 2
    sd["qzeros_scales"] = torch.rand(G, N // dq, 1) * 0.01
    layer.load_state_dict(sd)
    # What the checkpoint means, computed directly: W = q*s - offset.
    if dq_mode == 1:
        s = (qs - sd["qscales_zeros"].reshape(1, N).numpy()) * sd["qscales_scales"].reshape(1, N).numpy()
    else:
        s = ((qs.reshape(G, N // dq, dq) - sd["qscales_zeros"].numpy()) *
             sd["qscales_scales"].numpy()).reshape(G, N)
    off = ((qz.reshape(G, N // dq, dq) - sd["qzeros_zeros"].numpy()) *
           sd["qzeros_scales"].numpy()).reshape(G, N)
    g = np.arange(K) // gs
    W = (q * s[g] - off[g]).T
    layer.prepare_params()
    assert rel_err(layer.dequantize(), torch.from_numpy(W)) < 1e-5


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_bitorch_gba_symmetric_zero_and_tiny_scales(dtype):
    """Double-quantized scales that come out 0 (a scale code equal to its
    integer zero point: W = -offset, one value) or tiny against the offset
    (z = offset / s past float16's range): finite weights, as the checkpoint
    means them (z = offset / s made them inf or NaN)."""
    K, N, gs, dq = 256, 64, 64, 16
    G = K // gs
    rng = np.random.default_rng(np.random.randint(1 << 30))
    layer = MPQLinearCuda(K, N, w_bit=4, group_size=gs, use_gba_quant=True, dq_group_size=dq,
                          dq_mode=2, asym=False, dtype=dtype)
    q = rng.integers(0, 16, (K, N))
    qs, qz = rng.integers(0, 16, (G, N)), rng.integers(0, 16, (G, N))
    qs[0, :8] = 3                       # scale codes equal to their zero point 3: s = 0
    sd = layer.state_dict()
    sd["qweight"] = torch.from_numpy(np_pack_rows(q.T, 4).T.copy())
    sd["qstatistic"] = torch.from_numpy((qs << 4 | qz).astype(np.uint8)).reshape(G, N // dq, dq)
    qs_zeros = torch.from_numpy(rng.integers(0, 4, sd["qscales_zeros"].shape)).to(dtype)
    qs_zeros[0, 0] = 3
    qs_scales = (torch.rand(sd["qscales_scales"].shape) * 0.01 + 0.001).to(dtype)
    qs_scales[1, 1] = 1e-7 if dtype == torch.float16 else 1e-30  # z = offset / s past the range
    sd["qscales_zeros"], sd["qscales_scales"] = qs_zeros, qs_scales
    sd["qzeros_zeros"] = (torch.rand(G, N // dq, 1) * 2).to(dtype)
    sd["qzeros_scales"] = (torch.rand(G, N // dq, 1) * 0.01 + 0.01).to(dtype)
    layer.load_state_dict(sd)
    s = ((qs.reshape(G, N // dq, dq) - qs_zeros.double().numpy()) *
         qs_scales.double().numpy()).reshape(G, N)
    s = torch.from_numpy(s).to(dtype).double().numpy()     # the dtype's scales, as the layer's
    off = ((qz.reshape(G, N // dq, dq) - sd["qzeros_zeros"].double().numpy()) *
           sd["qzeros_scales"].double().numpy()).reshape(G, N)
    off = torch.from_numpy(off).to(dtype).double().numpy()
    assert (s == 0).sum() >= 8
    W = (q * s[np.arange(K) // gs] - off[np.arange(K) // gs]).T
    layer.prepare_params()
    out = layer.dequantize()
    assert torch.isfinite(out).all()
    assert rel_err(out, torch.from_numpy(W)) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_bitorch_gba_asymmetric_checkpoint_loads():
    K, N, gs, dq, w_bit = 128, 64, 32, 32, 4
    G = K // gs
    rng = np.random.default_rng(2)
    layer = MPQLinearMlx(K, N, w_bit=w_bit, group_size=gs, use_gba_quant=True, dq_group_size=dq,
                         asym=True, dtype=torch.float32)
    q = rng.integers(0, 16, (K, N))
    z = rng.integers(1, 16, (G, N))
    qs = rng.integers(0, 256, (G, N)).astype(np.uint8)
    sd = layer.state_dict()
    sd["qweight"] = torch.from_numpy(np_pack_rows(q.T, 4).T.copy())
    sd["qzeros"] = torch.from_numpy(np_pack_rows(z - 1, 4))
    sd["qscales"] = torch.from_numpy(qs).reshape(G, N // dq, dq)
    sd["qscales_zeros"] = torch.rand(G, N // dq, 1)
    sd["qscales_scales"] = torch.rand(G, N // dq, 1) * 0.001
    layer.load_state_dict(sd)
    s = ((qs.reshape(G, N // dq, dq) - sd["qscales_zeros"].numpy()) *
         sd["qscales_scales"].numpy()).reshape(G, N)
    g = np.arange(K) // gs
    W = ((q - z[g]) * s[g]).T
    layer.prepare_params()
    assert rel_err(layer.dequantize(), torch.from_numpy(W)) < 1e-6


def test_layer_parameter_checks():
    with pytest.raises(ValueError, match="w_bit must be 2, 4 or 8, got 3"):
        MPQLinearCuda(64, 32, w_bit=3)
    with pytest.raises(ValueError, match="a_bit must be 16, got 8"):
        MPQLinearCuda(64, 32, a_bit=8)
    with pytest.raises(ValueError, match="MPQLinearMlx: group_size must be 32, 64 or 128, got 256"):
        MPQLinearMlx(512, 32, group_size=256)
    with pytest.raises(ValueError, match="group_size 96 must divide"):
        MPQLinear(128, 32, group_size=96)
    layer = MPQLinearCuda(64, 32, w_bit=4, group_size=32, use_gba_quant=False)
    layer.a_bit = 4
    with pytest.raises(ValueError, match="a_bit must be 16"):
        layer.check_parameters()


@pytest.mark.parametrize("w_bit,tol", ((8, 0.01), (4, 0.15), (2, 0.6)))
def test_from_linear_close_to_float(w_bit, tol):
    lin = nn.Linear(256, 64, bias=True)
    layer = MPQLinear.from_linear(lin, w_bit=w_bit, group_size=64)
    x = torch.randn(9, 256)
    err = rel_err(layer(x), lin(x).detach().double())
    assert err < tol, err
    # And exactly what its own codes say (independent reference).
    W = ref_dequantize(layer.qweight, layer.scales, layer.zeros, w_bit, 64)
    ref = x.double() @ torch.from_numpy(W).T + lin.bias.detach().double()
    assert rel_err(layer(x), ref) < REL_TOL[torch.float32]


@pytest.mark.parametrize("act_order,bias", ((False, False), (True, False), (False, True),
                                             (True, True)))
def test_layer_forward_in_every_grad_mode(act_order, bias):
    """forward() steps below autograd itself when grad mode is off: the same
    output as with grad on (bitwise), against float64, and no graph recorded;
    with grad on, gradients still reach x and the scales."""
    K, N = 128, 48
    layer = MPQLinear(K, N, w_bit=4, group_size=32, bias=bias, dtype=torch.float32,
                      act_order=act_order)
    qweight, scales, zeros = make_weight(N, K, 4, 32, torch.float32)
    perm = torch.randperm(K).to(torch.int32) if act_order else None
    layer.load_canonical(qweight, scales, zeros, perm)
    if bias:
        layer.bias.copy_(torch.randn(N))
    x = make_x((3, 5), K, torch.float32).requires_grad_()
    ref = ref_matmul(x, qweight, scales, zeros, 4, 32, perm, layer.bias)
    with torch.enable_grad():
        y_grad = layer(x)
    assert y_grad.grad_fn is not None
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y = layer(x)
        assert y.grad_fn is None and not y.requires_grad, mode
        assert torch.equal(y, y_grad.detach()), mode
    assert rel_err(y_grad, ref) < REL_TOL[torch.float32]
    layer.scales.requires_grad_()
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.scales.grad is not None
    assert x.grad.abs().sum() > 0 and layer.scales.grad.abs().sum() > 0


def test_layer_state_dict_roundtrip():
    lin = nn.Linear(128, 32)
    a = MPQLinear.from_linear(lin, w_bit=4, group_size=32, dtype=torch.bfloat16)
    b = MPQLinear(128, 32, w_bit=4, group_size=32, bias=True, dtype=torch.bfloat16)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert torch.equal(a(x), b(x))


def test_load_gptq_state_dict_into_model(tmp_path):
    """A GPTQ model file (v2 zeros, desc_act on one layer) loads into MPQ layers exactly."""
    from mpq_ops.checkpoint import load_gptq_state_dict, load_quantized, save_quantized
    model = nn.Sequential(nn.Linear(128, 64, bias=True), nn.ReLU(), nn.Linear(64, 32))
    sd, weights = {}, {}
    for idx, (K, N, act) in {"0": (128, 64, True), "2": (64, 32, False)}.items():
        qweight, qzeros, s, g_idx, W = gptq_tensors(K, N, 4, K // 32, act, "v2",
                                                    dtype=torch.float32, seed=int(idx))
        sd.update({f"{idx}.qweight": qweight, f"{idx}.qzeros": qzeros, f"{idx}.scales": s,
                   f"{idx}.g_idx": g_idx})
        weights[idx] = W
    sd["0.bias"] = torch.randn(64)
    converted = load_gptq_state_dict(model, sd, w_bit=4, zero_convention="v2")
    assert converted == {"0": 32, "2": 32}
    assert model[0].perm is not None and model[2].perm is None
    assert torch.equal(model[0].dequantize(), weights["0"].float())
    assert torch.equal(model[2].dequantize(), weights["2"].float())
    x = torch.randn(5, 128)
    ref = torch.relu(x.double() @ weights["0"].T + sd["0.bias"].double()) @ weights["2"].T
    assert rel_err(model(x), ref) < 1e-5
    # And the result round-trips through the quantized safetensors checkpoint.
    path = str(tmp_path / "m.safetensors")
    save_quantized(model, path)
    fresh = load_quantized(nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)), path)
    assert torch.equal(fresh(x), model(x))


class TiedModule(nn.Module):
    """An embedding, a layer to quantize and a head sharing the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid = nn.Embedding(50, 64), nn.Linear(64, 64)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


def test_load_quantized_into_meta_module_with_shared_weights(tmp_path):
    """A plain module on the meta device whose head shares the embedding's
    Parameter: the one name the file keeps fills both, still one tensor."""
    from accelerate import init_empty_weights
    from mpq_ops.checkpoint import load_quantized, save_quantized
    torch.manual_seed(0)
    model = TiedModule()
    model.mid = MPQLinear.from_linear(model.mid, w_bit=4, group_size=32)
    save_quantized(model, str(tmp_path / "m.safetensors"))
    with init_empty_weights():
        skeleton = TiedModule()
    skeleton.head.weight = skeleton.emb.weight     # (init_empty_weights unties them)
    fresh = load_quantized(skeleton, str(tmp_path / "m.safetensors"))
    assert fresh.head.weight is fresh.emb.weight and isinstance(fresh.mid, MPQLinear)
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(fresh(ids), model(ids))


def test_load_quantized_rejects_plain_file(tmp_path):
    from safetensors.torch import save_file
    from mpq_ops.checkpoint import load_quantized
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an mpq_ops checkpoint"):
        load_quantized(nn.Linear(32, 2), str(tmp_path / "plain.safetensors"))


def test_quantize_model_frees_float_layers_as_it_goes(monkeypatch):
    """quantize_model keeps no reference to a float layer it has replaced: each
    is gone by the time the next one is quantized (peak memory: the float
    model once)."""
    import gc
    import weakref
    from mpq_ops.model import quantize_model
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    gone = [weakref.ref(m) for m in model]
    seen, original = [], MPQLinear.from_linear

    def from_linear(lin, **kwargs):
        gc.collect()
        seen.append([r() is None for r in gone])
        return original(lin, **kwargs)
    monkeypatch.setattr(MPQLinear, "from_linear", staticmethod(from_linear))
    quantize_model(model, w_bit=4, group_size=32, progress=False)
    assert seen == [[j < i for j in range(4)] for i in range(4)]
    assert all(isinstance(m, MPQLinear) for m in model)
