"""GPTQ into the canonical MPQ format.

Per layer (GPTQ, Frantar et al. 2022): accumulate H = 2/n * sum x x^T over
calibration inputs, dampen its diagonal, take the upper Cholesky factor of
H^-1, then quantize the weight one column at a time in blocks, pushing each
column's rounding error onto the columns not yet quantized (lazy batch
updates across blocks). Scales and zero points are chosen per group from the
error-updated weights as each group is reached. With act_order, columns go in
order of decreasing H diagonal; the groups are contiguous in that order, which
is exactly the canonical format's `perm` (x' = x[..., perm]).

Model level: `gptq_quantize_model` walks the model's repeated blocks (e.g. the
decoder layers) one at a time: it records the block's inputs, collects H for
the block's Linear layers (group by group in the order they run, each group
seeing the earlier ones quantized), quantizes them, replaces them with
MPQLinear and runs the block again to produce the next block's inputs, so
only one block's activations are held at a time."""
from __future__ import annotations

import time
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .layers import MPQLinear
from .pack import W_BITS, pack
from .quantize import clipped_group_params, group_params, resolve_group_size


class GPTQ:
    """Hessian statistics of one Linear layer and its GPTQ quantization."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        K = layer.in_features
        self.H = torch.zeros(K, K, dtype=torch.float32, device=layer.weight.device)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, inp: Tensor, xtx: Optional[Tensor] = None) -> None:
        """Adds the layer inputs `inp` [..., K] to H; `xtx` = x^T x of those
        rows in float32 when the caller has it already (layers that read the
        same input share one product)."""
        x = inp.reshape(-1, inp.shape[-1])
        m = x.shape[0]
        if xtx is None:
            xf = x.float()
            xtx = xf.t() @ xf
        self.H *= self.nsamples / (self.nsamples + m)
        self.nsamples += m
        self.H += xtx * (2.0 / self.nsamples)

    @torch.no_grad()
    def quantize(self, w_bit: int, group_size: int = 128, symmetric: bool = False,
                 integer_zeros: bool = False, act_order: bool = False, damp: float = 0.01,
                 block_size: int = 128, static_groups: bool = False,
                 clip: bool = False, dtype: Optional[torch.dtype] = None) -> MPQLinear:
        """Returns an MPQLinear holding the GPTQ-quantized weight.

        static_groups: take every group's scale and zero point from the
        original weight up front instead of from the error-updated one.
        clip: choose each group's range by a search over shrunk ranges
        (quantize.clipped_group_params) instead of the plain min..max."""
        if w_bit not in W_BITS:
            raise ValueError(f"w_bit must be 2, 4 or 8, got {w_bit}")
        if self.nsamples == 0:
            raise RuntimeError("GPTQ.quantize: no calibration inputs were added")
        lin = self.layer
        N, K = lin.weight.shape
        gs = resolve_group_size(K, group_size)
        dtype = dtype or lin.weight.dtype
        W = lin.weight.detach().float().clone()
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
            W, H = W[:, perm], H[perm][:, perm]
        H += damp * torch.mean(torch.diag(H)) * torch.eye(K, device=H.device)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        # Blocks hold whole groups, so a group's parameters come from weights
        # that have received every earlier column's error.
        block = gs * max(1, block_size // gs) if gs < K else block_size
        codes = torch.zeros(N, K, dtype=torch.int32, device=W.device)
        G = K // gs
        scales = torch.empty(N, G, dtype=dtype, device=W.device)
        zeros = torch.empty(N, G, dtype=dtype, device=W.device)
        sf = zf = None
        maxq = 2**w_bit - 1
        params = clipped_group_params if clip else group_params
        if static_groups:
            s_all, z_all = params(W.reshape(N, G, gs), w_bit, symmetric, dtype, integer_zeros)
        for i1 in range(0, K, block):
            i2 = min(i1 + block, K)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if col % gs == 0:
                    g = col // gs
                    if static_groups:
                        scale, zero = s_all[:, g], z_all[:, g]
                    else:
                        span = torch.cat([W1[:, i:], W[:, i2:col + gs]], dim=1)[:, :gs]
                        scale, zero = params(span, w_bit, symmetric, dtype, integer_zeros)
                    scales[:, g], zeros[:, g] = scale, zero
                    # the stored (rounded) scale and zero point, as quantize_codes uses them
                    sf, zf = scale.float(), zero.float()
                # One column: quantize_codes and the dequantization written out
                # with the group's float32 scale and zero point taken once, the
                # same operations in the same order (this loop runs K times per
                # layer, each operation a separate call).
                w = W1[:, i]
                q = torch.round(w / sf + zf).clamp_(0, maxq)
                codes[:, col] = q
                err = (w - (q - zf) * sf) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        out = MPQLinear(K, N, w_bit, group_size, bias=lin.bias is not None, dtype=dtype,
                        device=W.device, act_order=act_order)
        out.load_canonical(pack(codes, w_bit), scales, zeros,
                           None if perm is None else perm.to(torch.int32))
        if lin.bias is not None:
            out.bias.copy_(lin.bias.detach())
        return out


def _blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The model's longest ModuleList of blocks that contain Linear layers."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and \
                any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError("gptq: the model has no ModuleList of blocks with Linear layers")
    return best


class _Stop(Exception):
    pass


# Whether a calibration pass of a group of layers (true_sequential) ends once
# the group has seen its inputs (tests turn it off to compare).
_STOP_AFTER_GROUP = True


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, calibration: Iterable[Tensor], w_bit: int = 4,
                        group_size: int = 128,
                        overrides: Optional[Dict[str, Tuple[int, int]]] = None,
                        skip: Iterable[str] = ("lm_head",), symmetric: bool = False,
                        integer_zeros: bool = False, act_order: bool = False,
                        damp: float = 0.1, static_groups: bool = False, clip: bool = False,
                        true_sequential: bool = False, dtype: Optional[torch.dtype] = None,
                        progress: bool = True) -> dict:
    """Quantizes the Linear layers inside the model's repeated blocks with GPTQ,
    block by block, in place. `calibration`: input_ids tensors ([1, T] or [B, T]).
    Linear layers outside the blocks (and those matching `skip`) stay float.

    damp defaults to 0.1 of the mean Hessian diagonal, not GPTQ's usual 0.01:
    with a few thousand calibration tokens (mpq_ops.calibration) the larger
    value measured better on SmolLM2 (w4 g64: +14.6% perplexity against +24.8%).

    true_sequential: inside a block, the Linear layers are quantized in the
    order they run, in groups that read the same input (q/k/v, then o, then
    gate/up, then down in a decoder layer), each group calibrated on inputs
    computed with the groups before it already quantized, so that it also
    corrects their error (each of its passes stops once the group has its
    inputs: SmolLM2, the demo's w4 g64 on 2 CPU cores, 216 and 227 s against
    295 s with whole passes, the same perplexity). Off by default: on SmolLM2
    (w4, act-order, 16 x 128 self-generated tokens, calibration seeds 0/1/2) it
    moved g64 from +14.6/+13.1/+18.4% to +14.4/+9.2/+14.6% perplexity but g32
    with integer zeros from +9.8/+12.8/+14.4% to +12.7/+10.9/+13.2%: within the spread
    between calibration samples. With the ~25k shipped tokens
    (mpq_ops.calibration.shipped) and clip, g64 measured +8.4% with it and
    +11.2..12.3% without, so the demo uses it at g64 (not at g32)."""
    from .model import _layer_setting, _match, _module_bytes, _progress, _set_by_name
    overrides = dict(overrides or {})
    skip = tuple(skip)
    t0 = time.perf_counter()
    prefix, blocks = _blocks(model)
    samples = [c for c in calibration]
    if not samples:
        raise ValueError("gptq: calibration is empty")
    # Samples may come from anywhere (mpq_ops.calibration.shipped gives CPU
    # tensors): they go where the model's first parameter lives.
    device = next(iter(model.parameters()), torch.empty(0)).device

    # Inputs of the first block, with whatever keyword arguments it gets.
    captured: List[Tuple[tuple, dict]] = []

    def grab(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in samples:
            try:
                _forward(model, ids.to(device))
            except _Stop:
                pass
    finally:
        handle.remove()

    summary = {"layers": 0, "config": {}, "skipped": [], "linear_bytes_before": 0,
               "linear_bytes_after": 0, "model_bytes_before": _module_bytes(model)}
    for b in _progress(range(len(blocks)), "quantize (gptq)", progress):
        block = blocks[b]
        linears = {n: m for n, m in block.named_modules() if type(m) is nn.Linear}
        groups, calls = _input_groups(block, linears, captured[0], counts=True) \
            if true_sequential else ([list(linears)], {})
        for group in groups:
            stats, hooks = {}, []
            # x^T x per input tensor of the current forward: layers that read the
            # same tensor (q/k/v, gate/up) share one product. The tensor is held
            # with its product until the forward ends, so its id is not reused.
            products: Dict[int, Tuple[Tensor, Tensor]] = {}
            seen: Dict[str, int] = {}

            def record(inp, st, n):
                x = inp[0]
                hit = products.get(id(x))
                if hit is None or hit[0] is not x:
                    xf = x.reshape(-1, x.shape[-1]).float()
                    hit = products[id(x)] = (x, xf.t() @ xf)
                st.add_batch(x, hit[1])
                seen[n] = seen.get(n, 0) + 1
                if stop and all(seen.get(m, 0) >= c for m, c in expected.items()):
                    raise _Stop

            for n in group:
                full = f"{prefix}.{b}.{n}"
                if _match(full, skip):
                    summary["skipped"].append(full)
                    continue
                stats[n] = GPTQ(linears[n])
                hooks.append(linears[n].register_forward_hook(
                    lambda _m, inp, _out, s=stats[n], n=n: record(inp, s, n)))
            if not stats:
                continue
            # A group's pass ends once each of its layers has run as often as in
            # the first sample: what the block computes after that is not used
            # (in a decoder layer after q/k/v, o and gate/up: about 85%, 75%
            # and 25% of its Linear layers' work). A group with a layer that
            # did not run in the first sample keeps its passes whole.
            expected = {n: calls.get(n, 0) for n in stats}
            stop = _STOP_AFTER_GROUP and true_sequential and all(expected.values())
            try:
                for args, kwargs in captured:
                    seen.clear()
                    try:
                        block(*args, **kwargs)
                    except _Stop:
                        pass
                    products.clear()
            finally:
                for h in hooks:
                    h.remove()
            for n, st in stats.items():
                full = f"{prefix}.{b}.{n}"
                if st.nsamples == 0:  # never ran on the calibration data: left float
                    summary["skipped"].append(full)
                    continue
                bits, gs = _layer_setting(full, overrides, w_bit, group_size)
                q = st.quantize(bits, gs, symmetric=symmetric, integer_zeros=integer_zeros,
                                act_order=act_order, damp=damp, static_groups=static_groups,
                                clip=clip, dtype=dtype)
                summary["linear_bytes_before"] += _module_bytes(linears[n])
                summary["linear_bytes_after"] += _module_bytes(q)
                _set_by_name(block, n, q)
                summary["config"][full] = {"w_bit": bits, "group_size": gs}
                summary["layers"] += 1
        # The next block sees the outputs of this block with its weights quantized.
        new = []
        for args, kwargs in captured:
            out = block(*args, **kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            new.append(((out,) + tuple(args[1:]), kwargs) if args else
                       ((), {**kwargs, "hidden_states": out}))
        captured = new
    summary["model_bytes_after"] = _module_bytes(model)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _input_groups(block: nn.Module, linears: Dict[str, nn.Linear],
                  sample: Tuple[tuple, dict], counts: bool = False):
    """The block's Linear layers in the order they run, consecutive layers that
    read the same input tensor grouped together; layers that never run form a
    last group (they get no calibration inputs and stay float). With counts,
    also how many times each layer ran: (groups, {name: calls})."""
    # Each call holds the tensor it read until the grouping is done, and inputs
    # are compared by identity. (A key of id and data pointer is not enough: a
    # layer's input freed when the layer returns can leave both to the next
    # layer's new input, which then joined its group; on SmolLM2 that put
    # o_proj with gate/up in 4 of 240 probes, so that GPTQ with true_sequential
    # changed from run to run.)
    calls: List[Tuple[str, Tensor]] = []
    hooks = [lin.register_forward_pre_hook(lambda _m, inp, n=n: calls.append((n, inp[0])))
             for n, lin in linears.items()]
    try:
        args, kwargs = sample
        block(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: List[List[str]] = []
    placed, last = set(), None
    for n, key in calls:
        if n in placed:
            continue
        if groups and key is last:
            groups[-1].append(n)
        else:
            groups.append([n])
        placed.add(n)
        last = key
    rest = [n for n in linears if n not in placed]
    groups += [rest] if rest else []
    if not counts:
        return groups
    ran: Dict[str, int] = {}
    for n, _ in calls:
        ran[n] = ran.get(n, 0) + 1
    return groups, ran


def _forward(model: nn.Module, ids: Tensor):
    """model(input_ids) without a KV cache where the model has one."""
    import inspect
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "use_cache" in params:
        return model(input_ids=ids, use_cache=False)
    return model(ids)
