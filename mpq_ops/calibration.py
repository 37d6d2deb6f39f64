"""Calibration text with no download: samples the float model writes itself.

Prompts of varied kinds start batched, sampled generation (temperature 0.9,
top-p 0.95, fixed seed); the prompt plus the continuation is one sample. The
demo's evaluation text (data/eval.txt) is not among them.

`shipped` returns such samples written once by SmolLM2-135M (128 samples of up
to 256 new tokens, seed 0) and kept in data/calibration.json, so that the demo
and the tests calibrate on about 25k tokens without generating them again
(generation on a 2-core CPU takes minutes); `self_generated` makes new ones
for any model."""
from __future__ import annotations

import json
import os
from typing import List

import torch
from torch import Tensor

PROMPTS = [
    "The history of the city begins",
    "In mathematics, a prime number is",
    "Here is a recipe for a simple soup:",
    "The committee met on Tuesday to discuss",
    "def fibonacci(n):",
    "Dear customer, thank you for your order",
    "The weather forecast for the weekend",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village,",
    "The main causes of the war were",
    "To install the software, first",
    "Q: What is the tallest mountain in the world?\nA:",
    "The football match ended in a draw after",
    "Scientists have discovered a new species of",
    "My favourite book is",
    "The stock market fell sharply today as",
]


@torch.no_grad()
def self_generated(model, tokenizer, n_samples: int = 16, new_tokens: int = 128,
                   seed: int = 0, batch_size: int = 16) -> List[Tensor]:
    """n_samples input_ids tensors [1, T] sampled from the model itself."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_samples)]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out: List[Tensor] = []
    try:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        for i in range(0, n_samples, batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
            seqs = model.generate(**enc, do_sample=True, temperature=0.9, top_p=0.95,
                                  max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
            for row, mask in zip(seqs, enc.attention_mask):
                start = int((mask == 0).sum())  # left padding of the prompt
                ids = row[start:]
                keep = ids != tokenizer.pad_token_id
                keep[: int(mask.sum())] = True
                out.append(ids[keep].unsqueeze(0))
    finally:
        tokenizer.padding_side = side
    return out


def shipped(tokenizer) -> List[Tensor]:
    """The shipped calibration samples (data/calibration.json), tokenized: a list
    of input_ids tensors [1, T], one per sample, as self_generated returns."""
    path = os.path.join(os.path.dirname(__file__), "data", "calibration.json")
    with open(path, encoding="utf-8") as f:
        samples = json.load(f)["samples"]
    return [tokenizer(text, return_tensors="pt").input_ids for text in samples]
