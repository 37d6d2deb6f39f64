"""llama.cpp GGUF files as models of MPQ layers holding the file's own blocks
(the block formats themselves: mpq_ops.gguf_format).

- load_gguf_layers(model, path): a model transformers loaded from the file
  (nn.Linear layers of dequantized weights) has those layers replaced, each
  checked against the float layer it replaces; any architecture
  transformers reads.
- load_gguf_model(path): the model built from the file alone, its linear
  layers never held in float (the float model's memory is never needed);
  architectures whose tensors transformers takes as stored or, llama, with
  attn_q / attn_k rows reordered."""
from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .layers import MPQLinear
from .model import (_match, _module_bytes, _names_of_parameters, _set_by_name, _tie_float_head,
                    linear_layers)


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


class GgufFile:
    """A GGUF file's tensors by name, read as transformers reads them: the
    tensor of a module's parameter, and llama's attn_q / attn_k rows in HF's
    order."""

    def __init__(self, path: str):
        from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map
        self.path = path
        self.reader = GGUFReader(path)
        self.arch = self.field("general.architecture")
        arch_id = next((k for k, v in MODEL_ARCH_NAMES.items() if v == self.arch), None)
        if arch_id is None:
            raise ValueError(f"path: {path} is of architecture {self.arch!r}, which the gguf "
                             f"package does not name")
        self.names = get_tensor_name_map(arch_id, int(self.field(f"{self.arch}.block_count", 0)))
        self.tensors = {t.name: t for t in self.reader.tensors}
        heads = self.field(f"{self.arch}.attention.head_count")
        self.heads = {".attn_q.": heads,
                      ".attn_k.": self.field(f"{self.arch}.attention.head_count_kv", heads)}

    def field(self, key, default=None):
        fields = self.reader.fields
        return fields[key].contents() if key in fields else default

    def key(self, module_name: str, suffix: str = "weight") -> Optional[str]:
        """The tensor holding a module's parameter, None where the file has
        none; lm_head takes token_embd where the file has no output tensor
        (tied embeddings, as llama.cpp reads them)."""
        base = _gguf_name(self.names, module_name)
        if base is None:
            return None
        key = f"{base}.{suffix}"
        if base == "output" and suffix == "weight" and key not in self.tensors:
            key = "token_embd.weight"
        return key if key in self.tensors else None

    def rows(self, key: str, n_rows: int) -> Optional[torch.Tensor]:
        """HF's order of the tensor's rows (file row of each HF row), None
        where it is the file's."""
        if self.arch != "llama":
            return None
        part = next((p for p in self.heads if p in key), None)
        if part is None or not self.heads[part]:
            return None
        return torch.from_numpy(_llama_rows(n_rows, int(self.heads[part])))

    def floats(self, key: str, dtype: torch.dtype, device) -> torch.Tensor:
        """The tensor dequantized (the gguf package's own dequantization, in
        float32 a few million weights at a time), in HF's row order, as dtype."""
        from gguf import quants

        from .gguf_format import _CHUNK_WEIGHTS
        t = self.tensors[key]
        shape = tuple(int(v) for v in reversed(t.shape))
        # as rows of the first dimension (one row for a 1-D tensor), whatever the rank
        n_rows = shape[0] if len(shape) > 1 else 1
        data = t.data.reshape(n_rows, -1)
        flat = torch.empty(n_rows, int(np.prod(shape)) // n_rows, dtype=dtype, device=device)
        step = max(1, _CHUNK_WEIGHTS // max(1, flat.shape[1]))
        for r in range(0, n_rows, step):
            part = quants.dequantize(np.ascontiguousarray(data[r:r + step]), t.tensor_type)
            # (a copy: the file's float tensors are read-only views of it)
            part = np.array(part, np.float32).reshape(-1, flat.shape[1])
            flat[r:r + step] = torch.from_numpy(part)
        out = flat.reshape(shape)
        rows = self.rows(key, shape[0])
        return out if rows is None else out[rows.to(device)]

    def mpq_layer(self, key: str, dtype: torch.dtype, device, bias: bool) -> MPQLinear:
        """An MPQLinear of the tensor's blocks (a type of gguf_format.W_BIT_OF),
        rows in HF's order; the bias, where asked for, left to the caller."""
        from .gguf_format import from_gguf_tensor
        cw = from_gguf_tensor(self.tensors[key], dtype)
        N, K = cw.scales.shape[0], cw.qweight.shape[1] * 32 // cw.w_bit
        qweight, scales, zeros = cw.qweight, cw.scales, cw.zeros
        rows = self.rows(key, N)
        if rows is not None:
            qweight, scales, zeros = qweight[rows], scales[rows], zeros[rows]
        layer = MPQLinear(K, N, cw.w_bit, cw.group_size, bias=bias, dtype=dtype, device=device)
        layer.load_canonical(qweight, scales, zeros)
        return layer


def _summary(model_bytes_before: Optional[int]) -> dict:
    return {"layers": 0, "skipped": [], "skipped_why": {}, "config": {},
            "linear_bytes_before": 0, "linear_bytes_after": 0,
            "model_bytes_before": model_bytes_before}


def _leave(summary: dict, name: str, why: str) -> None:
    """Records layer `name` as left as it was, and why."""
    summary["skipped"].append(name)
    summary["skipped_why"][name] = why


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
    from .gguf_format import W_BIT_OF
    f = GgufFile(path)
    packed = [n for n, m in model.named_modules() if type(m).__name__ == "GgufLinear"]
    if packed:
        raise ValueError(f"model: {len(packed)} layers ({packed[0]!r}, ...) hold GGUF blocks in "
                         f"transformers' own modules; load the model with from_pretrained(..., "
                         f"quantization_config=GgufConfig(dequantize=True)) for nn.Linear layers")
    skip = tuple(skip)
    summary = _summary(_module_bytes(model))

    def replace(name, lin, layer, config):
        summary["linear_bytes_before"] += _module_bytes(lin)
        summary["linear_bytes_after"] += _module_bytes(layer)
        summary["config"][name] = config
        _set_by_name(model, name, layer)
        summary["layers"] += 1
    # By name, each layer fetched in its turn: the float layers replaced so far
    # are freed as the loop goes on (a list of the modules would hold them all).
    for name in [n for n, _ in linear_layers(model)]:
        lin = model.get_submodule(name)
        if _match(name, skip):
            _leave(summary, name, "skip")
            continue
        key = f.key(name)
        if key is None:
            _leave(summary, name, "not in the file")
            continue
        if lin.weight.device.type == "meta":
            raise ValueError(f"model: layer {name!r} is on the meta device; load_gguf_layers "
                             f"builds each layer on the device of the one it replaces "
                             f"(load_gguf_model builds a model from the file alone)")
        kind = f.tensors[key].tensor_type.name
        layer_dtype = dtype or lin.weight.dtype
        if kind not in W_BIT_OF:
            if requantize_others is None:
                _leave(summary, name, f"{kind} (no exact 2/4/8-bit form)")
                continue
            bits, gs = requantize_others
            layer = MPQLinear.from_linear(lin, w_bit=bits, group_size=gs, dtype=layer_dtype)
            replace(name, lin, layer, {"w_bit": bits, "group_size": layer.group_size,
                                       "gguf_type": kind, "requantized": True})
            continue
        N, K = (int(v) for v in reversed(f.tensors[key].shape))
        if (N, K) != (lin.out_features, lin.in_features):
            raise ValueError(f"model: layer {name!r} is {lin.out_features} x {lin.in_features} "
                             f"(out x in), {key} in {path} is {N} x {K}")
        layer = f.mpq_layer(key, layer_dtype, lin.weight.device, lin.bias is not None)
        if lin.bias is not None:
            layer.bias.copy_(lin.bias)
        if check:
            _check_same_weight(name, key, layer, lin.weight)
        replace(name, lin, layer, {"w_bit": layer.w_bit, "group_size": layer.group_size,
                                   "gguf_type": kind})
    if summary["skipped"] and all(v == "not in the file" for v in summary["skipped_why"].values()):
        raise ValueError(f"model: none of its {len(summary['skipped'])} nn.Linear layers (e.g. "
                         f"{summary['skipped'][0]!r}) is named as a tensor of {path} "
                         f"({f.arch} architecture)")
    summary["model_bytes_after"] = _module_bytes(model)
    return summary


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


def _as_stored(arch: str) -> bool:
    """Whether transformers takes the architecture's tensors as stored (no
    tensor processor) or, llama, with only attn_q / attn_k rows reordered,
    which GgufFile.rows does; the others' processors change tensors in ways
    of their own (merged or split experts, norms shifted by one, ...)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS
    return arch == "llama" or arch not in TENSOR_PROCESSORS


@torch.no_grad()
def load_gguf_model(path: str, dtype: torch.dtype = torch.float16, device="cpu",
                    skip: Iterable[str] = (),
                    requantize_others: Optional[Tuple[int, int]] = None):
    """A transformers causal LM built from the GGUF file `path` alone: its
    config from the file's metadata (as transformers reads it), its linear
    layers MPQLinear layers of the file's blocks as load_gguf_layers makes
    them, every other tensor (embeddings, norms, biases, layers of other
    types) the file's, dequantized, in `dtype` on `device`. No float copy of
    a quantized layer is ever made: loading takes about the memory of the
    loaded model (load_gguf_layers needs the float model first).

    skip: layers left float (from the file's tensor). requantize_others:
    (w_bit, group_size) for layers of types without an exact 2/4/8-bit form,
    quantized round-to-nearest from their float weights one at a time (left
    float otherwise). A float lm_head of a model with tied embeddings shares
    the embedding's weight. Architectures whose tensors transformers changes
    on loading beyond llama's row order are refused (load_gguf_layers takes
    them). Returns (model in eval mode, summary as load_gguf_layers', its
    model_bytes_before None)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .gguf_format import W_BIT_OF
    f = GgufFile(path)
    if not _as_stored(f.arch):
        raise ValueError(f"path: transformers changes the tensors of {f.arch!r} models on "
                         f"loading in ways load_gguf_model does not follow; load the float "
                         f"model with from_pretrained and use load_gguf_layers")
    folder, file = os.path.split(os.path.abspath(path))
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    # Parameters on the meta device; buffers (rotary frequencies) as the model makes them.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skip = tuple(skip)
    summary = _summary(None)   # (no model before)

    def file_key(name, suffix="weight"):
        key = f.key(name, suffix)
        if key is None:
            raise ValueError(f"path: {path} holds no tensor for {name}.{suffix} of the "
                             f"{type(model).__name__} its metadata describes")
        return key

    def float_linear(name, lin, key):
        out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                        device="meta", dtype=dtype)
        out.weight = nn.Parameter(f.floats(key, dtype, device))
        if lin.bias is not None:
            out.bias = nn.Parameter(f.floats(file_key(name, "bias"), dtype, device))
        return out

    for name in [n for n, _ in linear_layers(model)]:
        lin = model.get_submodule(name)
        key = file_key(name)
        kind = f.tensors[key].tensor_type.name
        N, K = (int(v) for v in reversed(f.tensors[key].shape))
        if (N, K) != (lin.out_features, lin.in_features):
            raise ValueError(f"path: {key} is {N} x {K} (out x in), the model's {name!r} "
                             f"{lin.out_features} x {lin.in_features}")
        summary["linear_bytes_before"] += (N * K + (N if lin.bias is not None else 0)) * \
            torch.finfo(dtype).bits // 8
        skipped = _match(name, skip)
        if skipped or (kind not in W_BIT_OF and requantize_others is None):
            _leave(summary, name, "skip" if skipped else f"{kind} (no exact 2/4/8-bit form)")
            if lin is model.get_output_embeddings() and _tie_float_head(model):
                continue    # the embedding's weight, read once below
            layer = float_linear(name, lin, key)
        elif kind not in W_BIT_OF:
            bits, gs = requantize_others
            layer = MPQLinear.from_linear(float_linear(name, lin, key), w_bit=bits,
                                          group_size=gs, dtype=dtype)
            summary["config"][name] = {"w_bit": bits, "group_size": layer.group_size,
                                       "gguf_type": kind, "requantized": True}
        else:
            layer = f.mpq_layer(key, dtype, device, lin.bias is not None)
            if lin.bias is not None:
                layer.bias.copy_(f.floats(file_key(name, "bias"), dtype, device))
            summary["config"][name] = {"w_bit": layer.w_bit, "group_size": layer.group_size,
                                       "gguf_type": kind}
        if isinstance(layer, MPQLinear):
            summary["layers"] += 1
            summary["linear_bytes_after"] += _module_bytes(layer)
        _set_by_name(model, name, layer)
    # The other parameters, each from its tensor; one tensor for the names
    # a parameter has (tied ones, a float lm_head of tied embeddings).
    for names in _names_of_parameters(model, meta_only=True):
        module, _, suffix = names[0].rpartition(".")
        value = nn.Parameter(f.floats(file_key(module, suffix), dtype, device))
        for name in names:
            _set_by_name(model, name, value)
    model.to(device).eval()
    summary["model_bytes_after"] = _module_bytes(model)
    return model, summary
