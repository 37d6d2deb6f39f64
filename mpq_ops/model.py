"""Whole-model quantization: nn.Linear -> MPQLinear in place."""
from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .layers import MPQLinear


def _module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _match(name: str, patterns: Iterable[str]) -> Optional[str]:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") or name == p:
            return p
    return None


def _layer_setting(name: str, overrides: Dict[str, Tuple[int, int]], w_bit: int,
                   group_size: int) -> Tuple[int, int]:
    """(w_bit, group_size) for a layer: the first matching override, else the defaults."""
    pat = _match(name, overrides)
    return overrides[pat] if pat else (w_bit, group_size)


def _progress(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, disable=not enabled, leave=False)


def linear_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]


def _set_by_name(model: nn.Module, name: str, new) -> None:
    """Sets the submodule or parameter at dotted `name` to `new`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _names_of_parameters(model: nn.Module, meta_only: bool = False) -> List[List[str]]:
    """Each parameter's names, several for a tied one (one Parameter held by
    several modules); meta_only: those on the meta device."""
    names: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.is_meta or not meta_only:
            names.setdefault(id(p), []).append(name)
    return list(names.values())


def _tie_float_head(model: nn.Module) -> bool:
    """Where a transformers model's config ties the embeddings and its lm_head
    is (still) a float nn.Linear of the embedding's shape, the head takes the
    embedding's Parameter (as from_pretrained ties them); True if so."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or \
            not hasattr(model, "get_output_embeddings"):
        return False
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if type(out) is not nn.Linear or out.weight.shape != inp.weight.shape:
        return False
    out.weight = inp.weight
    return True


@torch.no_grad()
def quantize_model(model: nn.Module, w_bit: int = 4, group_size: int = 128,
                   overrides: Optional[Dict[str, Tuple[int, int]]] = None,
                   skip: Iterable[str] = ("lm_head",), symmetric: bool = False,
                   integer_zeros: bool = False,
                   dtype: Optional[torch.dtype] = None, method: str = "rtn",
                   calibration: Optional[Iterable[torch.Tensor]] = None,
                   act_order: bool = False, progress: bool = True,
                   gptq_options: Optional[dict] = None) -> dict:
    """Replaces the model's nn.Linear layers with MPQLinear, in place.

    method "rtn": round-to-nearest. method "gptq": GPTQ over `calibration`
    (input_ids tensors), block by block (mpq_ops.gptq), optionally act_order;
    gptq_options passes damp, static_groups, clip and true_sequential on to
    mpq_ops.gptq.gptq_quantize_model.

    overrides maps a name pattern (fnmatch, e.g. "*.mlp.down_proj") to
    (w_bit, group_size) for mixed precision; layers matching `skip` stay
    float. Returns a summary: layers quantized/skipped, per-layer settings,
    linear-weight and whole-model bytes before and after."""
    if method == "gptq":
        if calibration is None:
            raise ValueError("quantize_model(method='gptq') needs calibration: input_ids "
                             "tensors, e.g. mpq_ops.calibration.self_generated(model, tokenizer)")
        options = dict(gptq_options or {})
        unknown = sorted(set(options) - {"damp", "static_groups", "clip", "true_sequential"})
        if unknown:
            raise ValueError(f"gptq_options: unknown option(s) {unknown}; expected damp, "
                             "static_groups, clip or true_sequential")
        from .gptq import gptq_quantize_model
        return gptq_quantize_model(model, calibration, w_bit=w_bit, group_size=group_size,
                                   overrides=overrides, skip=skip, symmetric=symmetric,
                                   integer_zeros=integer_zeros, act_order=act_order,
                                   dtype=dtype, progress=progress, **options)
    if method != "rtn":
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    if gptq_options:
        raise ValueError("gptq_options is for method='gptq'")
    overrides = dict(overrides or {})
    skip = tuple(skip)
    # By name, each layer fetched in its turn: the float layers replaced so far
    # are freed as the loop goes on (a list of the modules would hold them all).
    names = [n for n, _ in linear_layers(model)]
    model_bytes_before = _module_bytes(model)
    summary = {"layers": 0, "skipped": [], "config": {}, "linear_bytes_before": 0,
               "linear_bytes_after": 0, "model_bytes_before": model_bytes_before}
    for name in _progress(names, f"quantize ({method})", progress):
        lin = model.get_submodule(name)
        if _match(name, skip):
            summary["skipped"].append(name)
            continue
        bits, gs = _layer_setting(name, overrides, w_bit, group_size)
        if gs != -1 and lin.in_features % gs:
            raise ValueError(f"quantize_model: group_size {gs} does not divide in_features "
                             f"{lin.in_features} of layer {name!r}; use overrides or skip")
        q = MPQLinear.from_linear(lin, w_bit=bits, group_size=gs, symmetric=symmetric,
                                  dtype=dtype, integer_zeros=integer_zeros)
        summary["linear_bytes_before"] += _module_bytes(lin)
        summary["linear_bytes_after"] += _module_bytes(q)
        summary["config"][name] = {"w_bit": bits, "group_size": gs}
        _set_by_name(model, name, q)
        summary["layers"] += 1
    summary["model_bytes_after"] = _module_bytes(model)
    return summary
