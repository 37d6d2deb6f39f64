"""Saving and loading quantized models as safetensors, and loading GPTQ and
GGUF files.

A quantized checkpoint is the model's state dict (canonical MPQ buffers for
the quantized layers) plus, in the safetensors metadata, each MPQ layer's
settings, so that a float model skeleton can be turned into the same
quantized model before the tensors are loaded."""
from __future__ import annotations

import json
from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .formats import from_gptq
from .layers import MPQLinear
from .model import _match, _module_bytes, _set_submodule, linear_layers

_META_KEY = "mpq_ops.layers"


def _layer_config(m: MPQLinear) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features, "w_bit": m.w_bit,
            "group_size": m.group_size, "bias": m.bias is not None,
            "act_order": m.perm is not None, "dtype": str(m.scales.dtype).split(".")[-1]}


def save_quantized(model: nn.Module, path: str) -> None:
    """Writes model's tensors and the MPQ layer settings to one .safetensors file."""
    from safetensors.torch import save_model
    layers = {n: _layer_config(m) for n, m in model.named_modules() if isinstance(m, MPQLinear)}
    save_model(model, path, metadata={_META_KEY: json.dumps(layers)})


def load_quantized(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Loads a save_quantized file into a float model of the same architecture:
    its nn.Linear layers named in the file become MPQLinear first."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{path} is not an mpq_ops checkpoint (no {_META_KEY!r} metadata)")
    device = next(model.parameters()).device
    for name, cfg in json.loads(meta[_META_KEY]).items():
        old = model.get_submodule(name)
        if not isinstance(old, (nn.Linear, MPQLinear)):
            raise ValueError(f"layer {name!r} in {path} is a {type(old).__name__} in the model")
        _set_submodule(model, name, MPQLinear(
            cfg["in_features"], cfg["out_features"], cfg["w_bit"], cfg["group_size"],
            bias=cfg["bias"], dtype=getattr(torch, cfg["dtype"]), device=device,
            act_order=cfg["act_order"]))
    load_model(model, path, strict=strict, device=str(device))
    return model


@torch.no_grad()
def load_gptq_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], w_bit: int,
                         zero_convention: str = "v1", dtype=None) -> Dict[str, int]:
    """Replaces each nn.Linear whose `<name>.qweight` is in a GPTQ state dict
    (AutoGPTQ/GPTQModel: qweight, qzeros, scales, g_idx[, bias]) with an MPQLinear
    holding the same weight; loads the remaining tensors into the model.

    zero_convention: "v1" (stored z-1, AutoGPTQ and GPTQModel v1 files) or "v2"."""
    sd = dict(state_dict)
    converted = {}
    for name in [n for n, _ in linear_layers(model)]:   # (by name: see load_gguf_layers)
        if f"{name}.qweight" not in sd:
            continue
        lin = model.get_submodule(name)
        scales = sd.pop(f"{name}.scales")
        cw = from_gptq(sd.pop(f"{name}.qweight"), sd.pop(f"{name}.qzeros"), scales, w_bit,
                       g_idx=sd.pop(f"{name}.g_idx", None), zero_convention=zero_convention,
                       dtype=dtype or scales.dtype)
        bias = sd.pop(f"{name}.bias", None)
        layer = MPQLinear(lin.in_features, lin.out_features, w_bit, cw.group_size,
                          bias=bias is not None, dtype=cw.scales.dtype,
                          device=lin.weight.device, act_order=cw.perm is not None)
        layer.load_canonical(cw.qweight, cw.scales, cw.zeros, cw.perm)
        if bias is not None:
            layer.bias.copy_(bias)
        _set_submodule(model, name, layer)
        converted[name] = cw.group_size
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad_missing = [k for k in missing if k.rpartition(".")[0] not in converted]
    if unexpected or bad_missing:
        raise ValueError(f"GPTQ state dict does not fit the model: unexpected {unexpected}, "
                         f"missing {bad_missing}")
    return converted


def dequantized_gguf_kwargs() -> dict:
    """from_pretrained's arguments for a model of nn.Linear layers from a GGUF
    file: newer transformers may keep the blocks in modules of their own
    (where its kernels are at hand), of which quantize_model and
    load_gguf_layers make nothing; older ones always dequantize."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _llama_rows(n_rows: int, n_head: int) -> np.ndarray:
    """llama.cpp's converter orders each head's rows of attn_q / attn_k (the
    rotary halves interleaved, llama architecture only); HF row r is the
    file's row _llama_rows(...)[r] (as transformers reads the file)."""
    dim = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, dim, 2).swapaxes(1, 2).reshape(-1)


@torch.no_grad()
def load_gguf_layers(model: nn.Module, path: str, skip: Iterable[str] = (),
                     dtype: Optional[torch.dtype] = None, check: bool = True,
                     requantize_others: Optional[Tuple[int, int]] = None) -> dict:
    """Replaces the nn.Linear layers of a model loaded from the GGUF file
    `path` (transformers, from_pretrained(..., gguf_file=...,
    **dequantized_gguf_kwargs())) with MPQLinear
    layers holding the file's own blocks: Q4_0, Q4_1 and Q4_K as 4-bit
    codes, Q8_0, Q5_0, Q5_1 and Q5_K as 8-bit, groups of 32
    (mpq_ops.gguf_format), with no requantization. Layers whose tensor has
    another type (Q6_K, Q3_K, F16, ...) stay as they are, or with
    requantize_others=(w_bit, group_size) are quantized round-to-nearest from
    their float weights (as quantize_model does; e.g. (8, 32) for a Q4_K_M
    file's Q6_K layers).
    Layers matching `skip` stay as they are. lm_head takes token_embd where
    the file has no output tensor (tied embeddings, as llama.cpp reads them).

    dtype: of scales and zeros (the layer's weight dtype by default). check:
    each new layer's weight against the layer it replaces, which must agree
    within a few roundings of the dtype (a wrong file or a row order this
    function does not know raises ValueError naming the layer).
    Returns a summary like quantize_model's, with the reason for each layer
    left as it was in "skipped_why" and each layer's GGUF type in "config"."""
    from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map

    from .gguf_format import W_BIT_OF, from_gguf_tensor
    reader = GGUFReader(path)

    def field(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default
    arch = field("general.architecture")
    arch_id = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise ValueError(f"path: {path} is of architecture {arch!r}, which the gguf "
                         f"package does not name")
    names = get_tensor_name_map(arch_id, int(field(f"{arch}.block_count", 0)))
    tensors = {t.name: t for t in reader.tensors}
    heads = {".attn_q.weight": field(f"{arch}.attention.head_count"),
             ".attn_k.weight": field(f"{arch}.attention.head_count_kv",
                                     field(f"{arch}.attention.head_count"))}
    packed = [n for n, m in model.named_modules() if type(m).__name__ == "GgufLinear"]
    if packed:
        raise ValueError(f"model: {len(packed)} layers ({packed[0]!r}, ...) hold GGUF blocks in "
                         f"transformers' own modules; load the model with from_pretrained(..., "
                         f"quantization_config=GgufConfig(dequantize=True)) for nn.Linear layers")
    skip = tuple(skip)
    summary = {"layers": 0, "skipped": [], "skipped_why": {}, "config": {},
               "linear_bytes_before": 0, "linear_bytes_after": 0,
               "model_bytes_before": _module_bytes(model)}

    def leave(name, why):
        summary["skipped"].append(name)
        summary["skipped_why"][name] = why

    def replace(name, lin, layer, config):
        summary["linear_bytes_before"] += _module_bytes(lin)
        summary["linear_bytes_after"] += _module_bytes(layer)
        summary["config"][name] = config
        _set_submodule(model, name, layer)
        summary["layers"] += 1
    # By name, each layer fetched in its turn: the float layers replaced so far
    # are freed as the loop goes on (a list of the modules would hold them all).
    for name in [n for n, _ in linear_layers(model)]:
        lin = model.get_submodule(name)
        if _match(name, skip):
            leave(name, "skip")
            continue
        base = _gguf_name(names, name)
        key = None if base is None else base + ".weight"
        if base == "output" and key not in tensors:
            key = "token_embd.weight"
        if key not in tensors:
            leave(name, "not in the file")
            continue
        if lin.weight.device.type == "meta":
            raise ValueError(f"model: layer {name!r} is on the meta device; load_gguf_layers "
                             f"builds each layer on the device of the one it replaces")
        tensor = tensors[key]
        kind = tensor.tensor_type.name
        layer_dtype = dtype or lin.weight.dtype
        if kind not in W_BIT_OF:
            if requantize_others is None:
                leave(name, f"{kind} (no exact 2/4/8-bit form)")
                continue
            bits, gs = requantize_others
            layer = MPQLinear.from_linear(lin, w_bit=bits, group_size=gs, dtype=layer_dtype)
            replace(name, lin, layer, {"w_bit": bits, "group_size": layer.group_size,
                                       "gguf_type": kind, "requantized": True})
            continue
        cw = from_gguf_tensor(tensor, layer_dtype)
        N, K = cw.scales.shape[0], cw.qweight.shape[1] * 32 // cw.w_bit
        if (N, K) != (lin.out_features, lin.in_features):
            raise ValueError(f"model: layer {name!r} is {lin.out_features} x {lin.in_features} "
                             f"(out x in), {key} in {path} is {N} x {K}")
        qweight, scales, zeros = cw.qweight, cw.scales, cw.zeros
        suffix = key[key.rfind(".attn_"):] if ".attn_" in key else ""
        if arch == "llama" and suffix in heads and heads[suffix]:
            rows = torch.from_numpy(_llama_rows(N, int(heads[suffix])))
            qweight, scales, zeros = qweight[rows], scales[rows], zeros[rows]
        layer = MPQLinear(K, N, cw.w_bit, cw.group_size, bias=lin.bias is not None,
                          dtype=layer_dtype, device=lin.weight.device)
        layer.load_canonical(qweight, scales, zeros)
        if lin.bias is not None:
            layer.bias.copy_(lin.bias)
        if check:
            _check_same_weight(name, key, layer, lin.weight)
        replace(name, lin, layer, {"w_bit": cw.w_bit, "group_size": cw.group_size,
                                   "gguf_type": kind})
    if summary["skipped"] and all(v == "not in the file" for v in summary["skipped_why"].values()):
        raise ValueError(f"model: none of its {len(summary['skipped'])} nn.Linear layers (e.g. "
                         f"{summary['skipped'][0]!r}) is named as a tensor of {path} "
                         f"({arch} architecture)")
    summary["model_bytes_after"] = _module_bytes(model)
    return summary


def _gguf_name(names, module_name: str):
    """The GGUF name of a module (gguf's map of the architecture's names), the
    module's name shorn of leading parts where a model wraps the file's one
    ("lm.model.layers.0.mlp.up_proj" as "model.layers.0.mlp.up_proj")."""
    parts = module_name.split(".")
    for i in range(len(parts)):
        found = names.get_name(".".join(parts[i:]))
        if found is not None:
            return found
    return None


def _check_same_weight(name: str, key: str, layer: MPQLinear, old: torch.Tensor) -> None:
    """The layer's weight (from the blocks) and `old` (the file's weight as
    the model holds it) agree within 8 roundings of the coarser dtype,
    relative to each row's largest weight; a few million weights at a time."""
    from . import gguf_format
    bound = 8 * max(torch.finfo(layer.scales.dtype).eps, torch.finfo(old.dtype).eps)
    step = max(1, gguf_format._CHUNK_WEIGHTS // layer.in_features)
    for r in range(0, layer.out_features, step):
        # float32: the difference of two float32 (or narrower) values near
        # each other is exact, and the bound is far above its rounding.
        new = torch.ops.mpq.dequantize(layer.qweight[r:r + step], layer.scales[r:r + step],
                                       layer.zeros[r:r + step], layer.w_bit,
                                       layer.group_size_arg()).float()
        ref = old[r:r + step].float()
        row_max = ref.abs().amax(dim=1).clamp_min(1e-30)
        err = ((new - ref).abs_().amax(dim=1) / row_max).max().item()
        if not err <= bound:    # (NaN too)
            raise ValueError(
                f"model: layer {name!r} does not hold {key} of the file (a difference of "
                f"{err:.3g} of a row's largest weight in rows {r}..{r + len(ref) - 1}, allowed "
                f"{bound:.3g}): a model loaded from another file, or rows in an order "
                f"this function does not undo (it undoes llama's attn_q / attn_k order only)")
