"""GGUF block formats in the canonical format (mpq_ops.gguf_format) and a
model's layers from a GGUF file (mpq_ops.checkpoint.load_gguf_layers).

The reference is the gguf package's own numpy dequantization of the same
random blocks (llama.cpp's formats as its maintainers wrote them down), and
the files are written with its GGUFWriter."""
import numpy as np
import pytest
import torch
from torch import nn

from mpq_ops.gguf_format import from_gguf_blocks
from helpers import (GGUF_BLOCK as BLOCK, GGUF_HALVES as HALVES, REL_TOL, make_x, meta_skeleton,
                     random_gguf_blocks as random_blocks, ref_dequantize, ref_matmul, rel_err)

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

TYPES_ALL = tuple(BLOCK)
EIGHT_BIT = ("Q8_0", "Q5_0", "Q5_1", "Q5_K")


def gguf_weight(data, type_name, N, K):
    """The gguf package's dequantization, float64 [N, K]."""
    return quants.dequantize(data, Q[type_name]).reshape(N, K).astype(np.float64)


@pytest.mark.parametrize("type_name", TYPES_ALL)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_blocks_are_the_files_weights(type_name, dtype):
    """Canonical weights from random blocks (flat ones included) against the
    gguf package's dequantization: within one rounding of the dtype's scales
    and zeros (float32: of float32's); the op's dequantize and matmul (CPU,
    and CUDA where present) against float64."""
    seed = np.random.randint(1 << 30)
    rng = np.random.default_rng(seed)
    N, K = 7, 3 * BLOCK[type_name][0]
    data = random_blocks(type_name, N, K, rng)
    cw = from_gguf_blocks(data, type_name, (N, K), dtype)
    assert (cw.w_bit, cw.group_size, cw.perm) == (8 if type_name in EIGHT_BIT else 4, 32, None)
    assert cw.scales.dtype == dtype and cw.scales.shape == (N, K // 32)
    ref = gguf_weight(data, type_name, N, K)
    ours = ref_dequantize(cw.qweight, cw.scales, cw.zeros, cw.w_bit, 32)
    # per weight: the scale's rounding and the zero's (|z| s of it), of eps each
    eps = torch.finfo(dtype).eps
    s = cw.scales.double().repeat_interleave(32, 1).numpy()
    z = cw.zeros.double().repeat_interleave(32, 1).numpy()
    bound = 2 * eps * (np.abs(ref) + np.abs(z * s) + 1e-12)
    assert (np.abs(ours - ref) <= bound).all(), (seed, np.abs(ours - ref).max())
    assert (ref == 0).sum() < ref.size // 4, "random blocks should rarely give 0"
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        args = (cw.qweight.to(device), cw.scales.to(device), cw.zeros.to(device), cw.w_bit, 32)
        W = torch.ops.mpq.dequantize(*args)
        assert rel_err(W, torch.from_numpy(ours)) <= REL_TOL[dtype], (seed, device)
        if device == "cpu" or dtype != torch.float32:
            x = make_x((5,), K, dtype, device)
            y = torch.ops.mpq.matmul(x, *args)
            assert rel_err(y, ref_matmul(x, *args)) <= REL_TOL[dtype], (seed, device)


@pytest.mark.parametrize("type_name", ("Q8_0", "Q4_1", "Q4_K", "Q5_K"))
@pytest.mark.parametrize("bridge", ("cpp", "python"))
def test_blocks_through_mlx(type_name, bridge):
    """The MLX bridge (MLX's CPU backend) on the same weights: negative scales,
    flat groups' zero of -1."""
    pytest.importorskip("mlx.core")
    from mpq_ops import mlx_bridge
    if bridge == "cpp" and not mlx_bridge.cpp_bridge():
        pytest.skip("mpq_ops._mlx was not built (mlx missing at build time)")
    seed = np.random.randint(1 << 30)
    N, K = 9, 2 * BLOCK[type_name][0]
    cw = from_gguf_blocks(random_blocks(type_name, N, K, np.random.default_rng(seed)),
                          type_name, (N, K), torch.float16)
    args = (make_x((3,), K, torch.float16), cw.qweight, cw.scales, cw.zeros, cw.w_bit, 32)
    with mlx_bridge.use_mlx_on_cpu(bridge=bridge):
        y = torch.ops.mpq.matmul(*args)
    assert rel_err(y, ref_matmul(*args)) <= REL_TOL[torch.float16], seed


def test_flat_groups_hold_their_one_value():
    """A block whose scale is 0 is one value (m for Q4_1, -dmin mn for Q4_K, 0
    for the others); its codes become 0 and the value is its scale."""
    rng = np.random.default_rng(0)
    for type_name in TYPES_ALL:
        per, _ = BLOCK[type_name]
        data = random_blocks(type_name, 1, per, rng, flat_blocks=0)
        data[0, 0:2] = np.float16(0).reshape(1).view(np.uint8)
        cw = from_gguf_blocks(data, type_name, (1, per), torch.float32)
        ref = gguf_weight(data, type_name, 1, per)
        ours = ref_dequantize(cw.qweight, cw.scales, cw.zeros, cw.w_bit, 32)
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
        assert (cw.qweight == 0).all() and (cw.zeros == -1).all()
        assert len(np.unique(ref[0, :32])) == 1


@pytest.mark.parametrize("type_name", ("Q4_1", "Q5_1", "Q4_K", "Q5_K"))
def test_zero_points_past_float16_make_flat_groups(type_name):
    """An offset over 65504 steps from 0 (d = 2^-14, m or -dmin mn = 16): its
    zero point past float16's range, the group becomes its offset, within its
    range plus float16's rounding of the file's weights; bfloat16 and float32
    hold the zero point itself."""
    per, _ = BLOCK[type_name]
    data = random_blocks(type_name, 2, per, np.random.default_rng(np.random.randint(1 << 30)),
                         0, (-8, -6))
    d_at, m_at = HALVES[type_name]
    data[0, d_at:d_at + 2] = np.array([2.0 ** -14], dtype=np.float16).view(np.uint8)
    data[0, m_at:m_at + 2] = np.array([16.0 if "_1" in type_name else -16.0 / 63],
                                      dtype=np.float16).view(np.uint8)
    if type_name.endswith("_K"):        # every sub-block's (sc, mn) = (1, 63)
        data[0, 4:16] = np.array([1] * 4 + [0xFF] * 4 + [0xF1] * 4, dtype=np.uint8)
    ref = gguf_weight(data, type_name, 2, per)
    assert np.abs(ref[0] - 16).max() < 0.01     # (-16 / 63 as float16, times 63: 15.996)
    cw = from_gguf_blocks(data, type_name, (2, per), torch.float16)
    ours = ref_dequantize(cw.qweight, cw.scales, cw.zeros, cw.w_bit, 32)
    assert (cw.zeros[0] == -1).all() and (cw.qweight[0] == 0).all()
    assert np.isfinite(ours).all()
    top = 31 if type_name.startswith("Q5") else 15
    assert np.abs(ours[0] - ref[0]).max() <= 16 * 2.0 ** -11 + top * 2.0 ** -14
    s = cw.scales[1].double().repeat_interleave(32).numpy()
    z = cw.zeros[1].double().repeat_interleave(32).numpy()
    assert (np.abs(ours[1] - ref[1]) <= 2 * 2.0 ** -10 * (np.abs(ref[1]) + np.abs(z * s))).all()
    for dtype in (torch.bfloat16, torch.float32):
        cw = from_gguf_blocks(data, type_name, (2, per), dtype)
        assert (cw.zeros[0].abs() > 65504).all()


def test_from_gguf_blocks_bad_input():
    data = np.zeros((2, 18 * 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="type_name: GGUF Q6_K has no exact"):
        from_gguf_blocks(data, "Q6_K", (2, 64))
    with pytest.raises(ValueError, match=r"shape: \[N, K\] with K a multiple of 32"):
        from_gguf_blocks(data, "Q4_0", (2, 48))
    with pytest.raises(ValueError, match="shape"):
        from_gguf_blocks(data, "Q4_K", (2, 64))
    with pytest.raises(ValueError, match="data: 72 uint8 bytes .* got 36"):
        from_gguf_blocks(data[:1], "Q4_0", (2, 64))
    with pytest.raises(ValueError, match="dtype: scales and zeros are float32, float16 or "
                                         "bfloat16, got torch.int32"):
        from_gguf_blocks(data, "Q4_0", (2, 64), torch.int32)
    with pytest.raises(ValueError, match="data: .* got 72 int16"):
        from_gguf_blocks(data.astype(np.int16), "Q4_0", (2, 64))
    q4_k = np.zeros((1, 144), dtype=np.uint8)        # d 60000, sc 63: a scale of 3.8e6
    q4_k[0, 0:2] = np.array([60000.0], dtype=np.float16).view(np.uint8)
    q4_k[0, 4:8] = 63
    with pytest.raises(ValueError, match="dtype: Q4_K scales .* of up to 3.78e\\+06 do not fit "
                                         "in torch.float16"):
        from_gguf_blocks(q4_k, "Q4_K", (1, 256), torch.float16)
    assert torch.isfinite(from_gguf_blocks(q4_k, "Q4_K", (1, 256), torch.bfloat16).scales).all()
    q4_1 = np.zeros((1, 20), dtype=np.uint8)
    q4_1[0, 0:4] = np.array([2.0 ** -14, np.nan], dtype=np.float16).view(np.uint8)
    with pytest.raises(ValueError, match="data: the Q4_1 blocks hold non-finite"):
        from_gguf_blocks(q4_1, "Q4_1", (1, 32))


# A two-block llama, and a GGUF file of it written as llama.cpp's converter
# writes one: attn_q / attn_k rows reordered per head (rotary halves
# interleaved), each weight quantized by the gguf package (Q4_K and Q5_K,
# which it does not quantize: random blocks).
HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 256, 4, 2, 96, 128
TYPES = {"attn_q": "Q4_0", "attn_k": "Q5_K", "attn_v": "Q5_0", "attn_output": "Q5_1",
         "ffn_gate": "Q4_K", "ffn_up": "F16", "ffn_down": "Q8_0"}


def converter_rows(w, n_head):
    """llama.cpp convert_hf_to_gguf's reordering of q / k rows, forward."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def tiny_model(arch="llama", tie=False):
    """A two-block llama, or Qwen2 (q / k / v with biases, drawn nonzero; its
    GGUF rows in HF's order); tie: lm_head tied to the embedding."""
    transformers = pytest.importorskip("transformers")
    Config, Model = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                     "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    config = Config(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                    intermediate_size=FFN, num_hidden_layers=2, vocab_size=VOCAB,
                    tie_word_embeddings=tie)
    torch.manual_seed(np.random.randint(1 << 30))
    model = Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
            elif "norm" in name:    # not all ones: a norm out of place shows
                p.uniform_(0.5, 1.5)
    return model


def write_gguf(model, path, output_type="Q8_0", arch="llama", leave_out=()):
    """Writes model's weights as a GGUF file (output_type None: no output
    tensor, lm_head from token_embd), with the metadata transformers builds
    the model's config from and its norms and biases (float32), and sets the
    model's weights to what the file holds, as transformers would load them.
    Tensors named in leave_out are not written. Returns {layer: type}."""
    w = gguf.GGUFWriter(str(path), arch)
    config = model.config
    w.add_block_count(2)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                               or config.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(VOCAB)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 2)
    types = {}
    for name, p in model.named_parameters():
        module, _, suffix = name.rpartition(".")
        gname = f"{names.get_name(module)}.{suffix}"
        if p.dim() == 1 and gname not in leave_out:   # norms, biases: as they are
            w.add_tensor(gname, p.detach().float().numpy())

    def put(gname, weight, type_name, hf_rows=None):
        if gname in leave_out:
            return
        a = weight.detach().float().numpy()
        if hf_rows is not None:
            a = converter_rows(a, hf_rows)
        if type_name == "F16":
            w.add_tensor(gname, a.astype(np.float16))
            back = a.astype(np.float16).astype(np.float32)
        else:
            blocks = quants.quantize(a, Q[type_name]) if not type_name.endswith("_K") else \
                random_blocks(type_name, *a.shape, np.random.default_rng(), 1, (-12, -9))
            w.add_tensor(gname, blocks, raw_shape=blocks.shape, raw_dtype=Q[type_name])
            back = quants.dequantize(blocks, Q[type_name])
        if hf_rows is not None:   # back to HF's order, as transformers reads it
            n = a.shape[0] // hf_rows // 2
            back = back.reshape(hf_rows, n, 2, -1).swapaxes(1, 2).reshape(a.shape)
        weight.data.copy_(torch.from_numpy(back))
    put("token_embd.weight", model.model.embed_tokens.weight, "Q8_0")
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        gname = names.get_name(name)
        if gname == "output":
            if output_type is None:
                lin.weight.data.copy_(model.model.embed_tokens.weight)
                types[name] = "Q8_0"
                continue
            type_name = output_type
        else:
            type_name = TYPES[gname.split(".")[-1]]
        heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(gname.split(".")[-1]) \
            if arch == "llama" else None
        put(gname + ".weight", lin.weight, type_name, heads)
        types[name] = type_name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


@pytest.mark.parametrize("output_type", ("Q8_0", "Q4_1", None))
def test_load_gguf_layers_tiny_llama(tmp_path, output_type):
    """Every layer of a supported type becomes an MPQLinear of the file's
    blocks (q / k rows put back in HF's order), F16 layers and skipped ones
    stay float; the model's logits as the float model's holding the file's
    weights."""
    from mpq_ops import MPQLinear
    from mpq_ops.checkpoint import load_gguf_layers
    model = tiny_model()
    types = write_gguf(model, tmp_path / "m.gguf", output_type)
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
    summary = load_gguf_layers(model, str(tmp_path / "m.gguf"), skip=["*.1.mlp.gate_proj"])
    assert summary["skipped_why"] == {"model.layers.0.mlp.up_proj": "F16 (no exact 2/4/8-bit form)",
                                      "model.layers.1.mlp.gate_proj": "skip",
                                      "model.layers.1.mlp.up_proj": "F16 (no exact 2/4/8-bit form)"}
    assert summary["layers"] == 2 * 7 + 1 - 3
    for name, m in model.named_modules():
        if name in types and name not in summary["skipped"]:
            assert isinstance(m, MPQLinear), name
            assert m.w_bit == (8 if types[name] in EIGHT_BIT else 4) and m.group_size == 32
            assert summary["config"][name]["gguf_type"] == types[name]
    assert summary["linear_bytes_after"] < summary["linear_bytes_before"] / 2
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert rel_err(out, ref) < 1e-5


def test_rows_converted_and_checked_a_few_at_a_time(tmp_path, monkeypatch):
    """Large tensors go through in chunks of rows (the last one short): the
    same weights as in one piece, and the check sees every chunk (a wrong
    row in the last one is refused)."""
    from mpq_ops import gguf_format
    from mpq_ops.checkpoint import load_gguf_layers
    rng = np.random.default_rng(np.random.randint(1 << 30))
    data = random_blocks("Q4_K", 11, 512, rng)
    whole = from_gguf_blocks(data, "Q4_K", (11, 512))
    monkeypatch.setattr(gguf_format, "_CHUNK_WEIGHTS", 3 * 512)
    parts = from_gguf_blocks(data, "Q4_K", (11, 512))
    for a, b in zip(whole[:3], parts[:3]):
        assert torch.equal(a, b)
    model = tiny_model()
    write_gguf(model, tmp_path / "m.gguf")
    down = model.model.layers[1].mlp.down_proj.weight
    down.data[-1] += 0.25 * down.data[-1].abs().max()   # row 255: the last of 16 chunks
    with pytest.raises(ValueError, match="layer 'model.layers.1.mlp.down_proj' does not hold"):
        load_gguf_layers(model, str(tmp_path / "m.gguf"))


def test_gguf_model_saves_and_loads(tmp_path):
    """A model of the file's blocks (negative scales, flat groups' zero of -1,
    F16 layers left float) through save_quantized / load_quantized into a fresh
    float skeleton: the same logits, bit for bit."""
    from mpq_ops.checkpoint import load_gguf_layers, load_quantized, save_quantized
    model = tiny_model()
    write_gguf(model, tmp_path / "m.gguf")
    load_gguf_layers(model, str(tmp_path / "m.gguf"))
    save_quantized(model, str(tmp_path / "m.safetensors"))
    fresh = load_quantized(tiny_model(), str(tmp_path / "m.safetensors"))
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_gguf_layers_requantizes_other_types_when_asked(tmp_path):
    """requantize_others=(8, 32): the F16 layers quantized round-to-nearest as
    MPQLinear.from_linear would, marked in the summary; the rest from the file."""
    from mpq_ops import MPQLinear
    from mpq_ops.checkpoint import load_gguf_layers
    model = tiny_model()
    write_gguf(model, tmp_path / "m.gguf")
    up = model.model.layers[0].mlp.up_proj
    expected = MPQLinear.from_linear(up, w_bit=8, group_size=32)
    summary = load_gguf_layers(model, str(tmp_path / "m.gguf"), requantize_others=(8, 32))
    assert summary["layers"] == 15 and summary["skipped"] == []
    assert summary["config"]["model.layers.0.mlp.up_proj"] == {
        "w_bit": 8, "group_size": 32, "gguf_type": "F16", "requantized": True}
    got = model.model.layers[0].mlp.up_proj
    assert torch.equal(got.qweight, expected.qweight) and torch.equal(got.scales, expected.scales)
    assert torch.equal(got.zeros, expected.zeros)


def test_load_gguf_layers_qwen2(tmp_path):
    """Another architecture: its rows as they are (llama's reordering is
    llama's alone), the layers' biases kept; the logits as the float model's."""
    from mpq_ops import MPQLinear
    from mpq_ops.checkpoint import load_gguf_layers
    model = tiny_model("qwen2")
    write_gguf(model, tmp_path / "q.gguf", arch="qwen2")
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
    summary = load_gguf_layers(model, str(tmp_path / "q.gguf"))
    assert summary["layers"] == 13
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, MPQLinear) and q.bias is not None and q.bias.abs().sum() > 0
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, ref) < 1e-5


def test_load_gguf_layers_refuses_another_models_weights(tmp_path):
    """check=True compares each new layer with the one it replaces: a model not
    loaded from the file is refused, naming the layer; check=False takes it."""
    from mpq_ops.checkpoint import load_gguf_layers
    write_gguf(tiny_model(), tmp_path / "m.gguf")
    other = tiny_model()
    with pytest.raises(ValueError, match="layer 'model.layers.0.self_attn.q_proj' does not "
                                         "hold blk.0.attn_q.weight"):
        load_gguf_layers(other, str(tmp_path / "m.gguf"))
    assert load_gguf_layers(tiny_model(), str(tmp_path / "m.gguf"), check=False)["layers"] == 13
    nan = tiny_model()
    write_gguf(nan, tmp_path / "m.gguf")
    nan.model.layers[1].mlp.down_proj.weight.data[7, 3] = float("nan")
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj' does not hold .*"
                                         r"\(a difference of nan"):
        load_gguf_layers(nan, str(tmp_path / "m.gguf"))


def test_float_layers_freed_as_they_are_replaced(tmp_path, monkeypatch):
    """Each replaced float layer is gone (no reference left) by the time the
    next one is converted, so that the loading needs the float model's memory
    once, not twice."""
    import gc
    import weakref
    from mpq_ops import gguf_format
    from mpq_ops.checkpoint import load_gguf_layers
    model = tiny_model()
    write_gguf(model, tmp_path / "m.gguf")
    gone = {n: weakref.ref(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    converted, original = [], gguf_format.from_gguf_tensor

    def convert(tensor, dtype):
        gc.collect()
        converted.append([n for n, r in gone.items() if r() is None])
        return original(tensor, dtype)
    monkeypatch.setattr(gguf_format, "from_gguf_tensor", convert)
    summary = load_gguf_layers(model, str(tmp_path / "m.gguf"))
    replaced = list(summary["config"])
    assert len(converted) == len(replaced) == 13
    for i, dead in enumerate(converted):
        assert set(replaced[:i]) <= set(dead), (i, replaced[:i], dead)


def test_load_gguf_layers_in_a_wrapping_module(tmp_path):
    """A model held by another module (its layers' names prefixed) loads as
    itself; a model none of whose layers the file names is refused."""
    from mpq_ops.checkpoint import load_gguf_layers
    model = tiny_model()
    write_gguf(model, tmp_path / "m.gguf")
    wrapper = nn.ModuleDict({"lm": model})
    summary = load_gguf_layers(wrapper, str(tmp_path / "m.gguf"))
    assert summary["layers"] == 13 and "lm.model.layers.1.mlp.down_proj" in summary["config"]
    other = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    with pytest.raises(ValueError, match=r"model: none of its 2 nn.Linear layers \(e.g. '0'\) "
                                         r"is named as a tensor of .* \(llama architecture\)"):
        load_gguf_layers(other, str(tmp_path / "m.gguf"))


def test_load_gguf_layers_refuses_transformers_packed_layers(tmp_path):
    """Layers transformers keeps in GGUF blocks of its own (GgufLinear) have no
    float weight to check nor nn.Linear to replace: refused, with the way out."""
    from mpq_ops.checkpoint import load_gguf_layers
    model = tiny_model()
    write_gguf(model, tmp_path / "m.gguf")
    GgufLinear = type("GgufLinear", (nn.Module,), {})
    model.model.layers[0].mlp.up_proj = GgufLinear()
    with pytest.raises(ValueError, match=r"model: 1 layers \('model.layers.0.mlp.up_proj', "
                                         r"...\) hold GGUF blocks .*=GgufConfig\(dequantize=True"):
        load_gguf_layers(model, str(tmp_path / "m.gguf"))


def test_load_gguf_layers_dtype_and_shape_checks(tmp_path):
    """Scales and zeros in the dtype asked for; a layer of another shape is
    refused naming the layer and the tensor."""
    from mpq_ops.checkpoint import load_gguf_layers
    model = tiny_model()
    write_gguf(model, tmp_path / "m.gguf")
    half = load_gguf_layers(model.to(torch.bfloat16), str(tmp_path / "m.gguf"))
    assert half["layers"] == 13
    assert model.model.layers[0].self_attn.q_proj.scales.dtype == torch.bfloat16
    meta = tiny_model()
    meta.model.layers[0].self_attn.v_proj.to("meta")
    with pytest.raises(ValueError, match="layer 'model.layers.0.self_attn.v_proj' is on the meta"):
        load_gguf_layers(meta, str(tmp_path / "m.gguf"), check=False)
    wrong = tiny_model()
    wrong.model.layers[1].self_attn.o_proj = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
    with pytest.raises(ValueError, match=r"layer 'model.layers.1.self_attn.o_proj' is 512 x 256 "
                                         r"\(out x in\), blk.1.attn_output.weight .* is 256 x 256"):
        load_gguf_layers(wrong, str(tmp_path / "m.gguf"), check=False)


def two_step_load(folder, file, dtype, **kwargs):
    """transformers' float model of the file, then load_gguf_layers."""
    from transformers import AutoModelForCausalLM
    from mpq_ops.checkpoint import dequantized_gguf_kwargs, load_gguf_layers
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file, dtype=dtype,
                                                 **dequantized_gguf_kwargs()).eval()
    return model, load_gguf_layers(model, str(folder / file), **kwargs)


@pytest.mark.parametrize("arch,output_type,dtype", [
    ("llama", "Q8_0", torch.float32), ("llama", None, torch.float32),
    ("llama", "Q4_1", torch.bfloat16), ("qwen2", "Q8_0", torch.float32),
    ("qwen2", None, torch.float16)])
def test_load_gguf_model_is_the_two_step_load(tmp_path, arch, output_type, dtype):
    """The model built from the file alone holds what transformers' float model
    of the file holds after load_gguf_layers, tensor for tensor (norms,
    embeddings, biases, F16 layers, llama's q / k rows), with the same
    summary; its logits are those of the model the file was written from."""
    from mpq_ops import MPQLinear
    from mpq_ops.checkpoint import load_gguf_model
    source = tiny_model(arch)
    types = write_gguf(source, tmp_path / "m.gguf", output_type, arch=arch)
    model, summary = load_gguf_model(str(tmp_path / "m.gguf"), dtype=dtype)
    two, two_summary = two_step_load(tmp_path, "m.gguf", dtype)
    assert type(model) is type(source) and not model.training
    for key in ("layers", "skipped", "skipped_why", "config", "linear_bytes_after"):
        assert summary[key] == two_summary[key], key
    assert summary["layers"] == 13 and set(summary["skipped"]) == {
        "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"}
    ours, theirs = model.state_dict(), two.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    for name, m in model.named_modules():
        if name in types and name not in summary["skipped"]:
            assert isinstance(m, MPQLinear), name
    assert all(p.device.type == "cpu" for p in model.parameters())
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        assert torch.equal(out, two(input_ids=ids).logits)
        if dtype == torch.float32:
            assert rel_err(out, source(input_ids=ids).logits.double()) < 1e-5


def test_load_gguf_model_float_layers(tmp_path, monkeypatch):
    """skip and the types without an exact form leave float layers of the
    file's tensors; a float lm_head of tied embeddings shares the embedding's
    weight; requantize_others quantizes such layers as load_gguf_layers does."""
    from mpq_ops import MPQLinear, gguf_load
    from mpq_ops.checkpoint import load_gguf_model
    source = tiny_model()
    write_gguf(source, tmp_path / "m.gguf", output_type=None)
    read = []
    floats = gguf_load.GgufFile.floats
    monkeypatch.setattr(gguf_load.GgufFile, "floats",
                        lambda self, key, *a: read.append(key) or floats(self, key, *a))
    model, summary = load_gguf_model(str(tmp_path / "m.gguf"), dtype=torch.float32,
                                     skip=["lm_head", "*.0.self_attn.q_proj"])
    assert summary["skipped_why"]["lm_head"] == "skip"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert read.count("token_embd.weight") == 1     # no float copy for lm_head
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and torch.equal(q.weight, source.model.layers[0].self_attn.q_proj
                                                .weight)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, source(input_ids=ids).logits.double()) < 1e-5
    model, summary = load_gguf_model(str(tmp_path / "m.gguf"), dtype=torch.float32,
                                     requantize_others=(8, 32))
    two, two_summary = two_step_load(tmp_path, "m.gguf", torch.float32,
                                     requantize_others=(8, 32))
    assert summary["config"] == two_summary["config"] and summary["skipped"] == []
    up, two_up = model.model.layers[1].mlp.up_proj, two.model.layers[1].mlp.up_proj
    assert isinstance(up, MPQLinear) and up.w_bit == 8
    for name in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(up, name), getattr(two_up, name)), name


def test_load_gguf_model_refusals(tmp_path, monkeypatch):
    """A file without a tensor the model needs is refused naming the tensor's
    parameter; an architecture whose tensors transformers changes on loading
    beyond llama's row order is refused, pointing to load_gguf_layers."""
    from transformers import modeling_gguf_pytorch_utils
    from mpq_ops.checkpoint import load_gguf_model
    write_gguf(tiny_model(), tmp_path / "m.gguf", leave_out=("blk.1.ffn_norm.weight",))
    with pytest.raises(ValueError, match=r"holds no tensor for model.layers.1."
                                         r"post_attention_layernorm.weight of the "
                                         r"LlamaForCausalLM"):
        load_gguf_model(str(tmp_path / "m.gguf"))
    write_gguf(tiny_model(), tmp_path / "d.gguf", leave_out=("blk.0.ffn_down.weight",))
    with pytest.raises(ValueError, match=r"holds no tensor for model.layers.0.mlp.down_proj"):
        load_gguf_model(str(tmp_path / "d.gguf"))
    write_gguf(tiny_model("qwen2"), tmp_path / "q.gguf", arch="qwen2")
    monkeypatch.setitem(modeling_gguf_pytorch_utils.TENSOR_PROCESSORS, "qwen2",
                        modeling_gguf_pytorch_utils.TensorProcessor)
    with pytest.raises(ValueError, match=r"changes the tensors of 'qwen2' models .* "
                                         r"load_gguf_layers"):
        load_gguf_model(str(tmp_path / "q.gguf"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_gguf_model_on_cuda(tmp_path):
    """device="cuda": every parameter and buffer there, the tensors those of
    the same load on the CPU, and the logits within float16's tolerance of
    the float32 model the file was written from (the CPU load in float16: 2.1e-3
    to 2.7e-3)."""
    from mpq_ops.checkpoint import load_gguf_model
    source = tiny_model()
    write_gguf(source, tmp_path / "m.gguf")
    model, _ = load_gguf_model(str(tmp_path / "m.gguf"), dtype=torch.float16, device="cuda")
    on_cpu, _ = load_gguf_model(str(tmp_path / "m.gguf"), dtype=torch.float16)
    assert all(t.is_cuda for t in [*model.parameters(), *model.buffers()])
    ours, theirs = model.state_dict(), on_cpu.state_dict()
    for k in ours:
        assert torch.equal(ours[k].cpu(), theirs[k]), k
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        out = model(input_ids=ids.cuda()).logits.cpu()
        assert rel_err(out, source(input_ids=ids).logits.double()) < 6 * REL_TOL[torch.float16]


@pytest.mark.parametrize("case", ["rtn", "rtn_tied", "gguf_tied", "qwen2"])
def test_load_quantized_into_a_meta_skeleton(tmp_path, case):
    """A save_quantized file into a skeleton on the meta device (no float
    weights allocated): every tensor the saved model's, a float lm_head of
    tied embeddings sharing the embedding again, buffers (rotary) as made,
    the same logits; a missing tensor is refused by name."""
    from mpq_ops import MPQLinear
    from mpq_ops.checkpoint import load_gguf_model, load_quantized, save_quantized
    from mpq_ops.model import quantize_model
    if case.startswith("gguf"):
        write_gguf(tiny_model(tie=True), tmp_path / "m.gguf", output_type=None)
        model, _ = load_gguf_model(str(tmp_path / "m.gguf"), dtype=torch.float32)
    else:
        model = tiny_model("qwen2" if case == "qwen2" else "llama", tie=case.endswith("tied"))
        quantize_model(model, w_bit=4, group_size=32, skip=["lm_head"], progress=False)
    path = str(tmp_path / "m.safetensors")
    save_quantized(model, path)
    fresh = load_quantized(meta_skeleton(model), path)
    assert not any(t.is_meta for t in [*fresh.parameters(), *fresh.buffers()])
    ours, theirs = fresh.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    if case == "rtn_tied":
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert isinstance(fresh.lm_head, MPQLinear) == case.startswith("gguf")
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_quantized_meta_refusals(tmp_path):
    """A meta skeleton the file does not fill is refused naming what is left;
    a device other than a real model's is refused."""
    from safetensors.torch import load_file, save_file
    from mpq_ops.checkpoint import load_quantized, save_quantized
    from mpq_ops.model import quantize_model
    model = tiny_model()
    quantize_model(model, w_bit=4, group_size=32, skip=["lm_head"], progress=False)
    save_quantized(model, str(tmp_path / "m.safetensors"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(tmp_path / "m.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "less.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"does not fit the model: missing \['model.norm.weight'"):
        load_quantized(meta_skeleton(model), str(tmp_path / "less.safetensors"))
    with pytest.raises(ValueError, match=r"holds no tensor for \['model.norm.weight'\]"):
        load_quantized(meta_skeleton(model), str(tmp_path / "less.safetensors"), strict=False)
    with torch.device("meta"):
        all_meta = type(model)(model.config)
    with pytest.raises(ValueError,
                       match=r"buffers \['model.rotary_emb.inv_freq'.* are on the meta"):
        load_quantized(all_meta, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="device: meta is not the model's"):
        load_quantized(tiny_model(), str(tmp_path / "m.safetensors"), device="meta")


@pytest.mark.parametrize("type_name,shape", [("F32", (6,)), ("F16", (5, 64)),
                                             ("Q8_0", (3, 4, 64)), ("Q4_K", (2, 3, 256))])
def test_gguf_file_floats_of_any_rank(tmp_path, type_name, shape, monkeypatch):
    """GgufFile.floats: a tensor of any rank and type as the gguf package
    dequantizes it, in chunks of rows of its first dimension."""
    from mpq_ops import gguf_format
    from mpq_ops.gguf_load import GgufFile
    monkeypatch.setattr(gguf_format, "_CHUNK_WEIGHTS", 2 * shape[-1])   # several chunks
    rng = np.random.default_rng(np.random.randint(1 << 30))
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    a = rng.standard_normal(shape).astype(np.float32)
    if type_name == "F32":
        w.add_tensor("t", a)
    elif type_name == "F16":
        w.add_tensor("t", a.astype(np.float16))
    else:
        rows = int(np.prod(shape[:-1]))
        blocks = (random_blocks(type_name, rows, shape[-1], rng, 1, (-12, -9))
                  if type_name.endswith("_K") else quants.quantize(a, Q[type_name]))
        blocks = blocks.reshape(*shape[:-1], -1)
        w.add_tensor("t", blocks, raw_shape=blocks.shape, raw_dtype=Q[type_name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GgufFile(str(tmp_path / "t.gguf"))
    t = f.tensors["t"]
    expected = quants.dequantize(t.data, t.tensor_type).reshape(shape)
    got = f.floats("t", torch.float32, "cpu")
    assert got.shape == shape and torch.equal(got, torch.from_numpy(np.array(expected)))
