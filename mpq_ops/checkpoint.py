"""Saving and loading quantized models as safetensors, and loading GPTQ and
GGUF files.

A quantized checkpoint is the model's state dict (canonical MPQ buffers for
the quantized layers) plus, in the safetensors metadata, each MPQ layer's
settings, so that a float model skeleton can be turned into the same
quantized model before the tensors are loaded."""
from __future__ import annotations

import json
from typing import Dict, Mapping

import torch
from torch import nn

from .formats import from_gptq
# GGUF files: mpq_ops.gguf_load (named here too, where they were first).
from .gguf_load import dequantized_gguf_kwargs, load_gguf_layers, load_gguf_model  # noqa: F401
from .layers import MPQLinear
from .model import _names_of_parameters, _set_by_name, _tie_float_head, linear_layers

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


def load_quantized(model: nn.Module, path: str, strict: bool = True,
                   device=None) -> nn.Module:
    """Loads a save_quantized file into a float model of the same architecture:
    its nn.Linear layers named in the file become MPQLinear first.

    The model may be a skeleton on the meta device (e.g. made under
    accelerate's init_empty_weights), so that no float weights are ever
    allocated: the file's tensors then become its parameters on `device`
    (default: the CPU), names tied in the skeleton (one Parameter) all from
    the one the file holds, and a float lm_head of tied embeddings (the
    config's tie_word_embeddings) shares the embedding as in the saved model;
    a parameter the file does not hold is refused by name. With real
    parameters the tensors load onto the model's device (`device` must then
    be it or None)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, load_model
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{path} is not an mpq_ops checkpoint (no {_META_KEY!r} metadata)")
    on_meta = any(p.is_meta for p in model.parameters())
    here = next(model.parameters()).device
    if on_meta:
        device = torch.device(device if device is not None else "cpu")
    elif device is not None and torch.device(device) != here:
        raise ValueError(f"device: {device} is not the model's ({here}); a model on the meta "
                         f"device loads onto any")
    else:
        device = here
    for name, cfg in json.loads(meta[_META_KEY]).items():
        old = model.get_submodule(name)
        if not isinstance(old, (nn.Linear, MPQLinear)):
            raise ValueError(f"layer {name!r} in {path} is a {type(old).__name__} in the model")
        _set_by_name(model, name, MPQLinear(
            cfg["in_features"], cfg["out_features"], cfg["w_bit"], cfg["group_size"],
            bias=cfg["bias"], dtype=getattr(torch, cfg["dtype"]),
            device="meta" if on_meta else device, act_order=cfg["act_order"]))
    if not on_meta:
        load_model(model, path, strict=strict, device=str(device))
        return model
    # A float lm_head of tied embeddings, which the skeleton may hold apart,
    # is tied first: then it is one more tied parameter below.
    _tie_float_head(model)
    tied = _names_of_parameters(model)
    tensors = load_file(path, device=str(device))
    # save_model keeps one name of tensors that share memory: a tied
    # parameter's other names take it too.
    for names in tied:
        held = [n for n in names if n in tensors]
        if held:
            for n in names:
                tensors.setdefault(n, tensors[held[0]])
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if strict and (missing or unexpected):
        raise ValueError(f"path: {path} does not fit the model: missing {missing}, unexpected "
                         f"{unexpected}")
    # assign gives each name a Parameter of its own: tied names share one again
    for names in tied:
        for n in names[1:]:
            _set_by_name(model, n, model.get_parameter(names[0]))
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"path: {path} holds no tensor for {left} (still on the meta device)")
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"model: buffers {left} are on the meta device and not in {path}; make "
                         f"the skeleton with its buffers (accelerate's "
                         f"init_empty_weights(include_buffers=False))")
    return model.to(device)


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
        _set_by_name(model, name, layer)
        converted[name] = cw.group_size
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad_missing = [k for k in missing if k.rpartition(".")[0] not in converted]
    if unexpected or bad_missing:
        raise ValueError(f"GPTQ state dict does not fit the model: unexpected {unexpected}, "
                         f"missing {bad_missing}")
    return converted
