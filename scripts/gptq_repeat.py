"""GPTQ w4 g64 on SmolLM2 as the demo runs it (act-order, clip, true_sequential),
several times in one process: the perplexity of each run and the layers whose
qweight, scales, zeros or perm differ bit for bit from the first run's.

    HF_HUB_OFFLINE=1 python scripts/gptq_repeat.py [--runs 3]

(scripts/results/gptq_repeat_cpu.log)"""
import argparse
import copy
import time

import torch

from mpq_ops import MPQLinear
from mpq_ops.calibration import shipped
from mpq_ops.demo import eval_ids, load_smollm2, perplexity
from mpq_ops.model import quantize_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    base, tok = load_smollm2("cpu", torch.float32)
    ids = eval_ids(tok, "cpu")
    calibration = shipped(tok)
    first = None
    for r in range(args.runs):
        model = copy.deepcopy(base)
        t = time.perf_counter()
        quantize_model(model, w_bit=4, group_size=64, method="gptq", calibration=calibration,
                       act_order=True, gptq_options={"clip": True, "true_sequential": True},
                       progress=False)
        seconds = time.perf_counter() - t
        layers = {n: {k: v.clone() for k, v in m.state_dict().items()}
                  for n, m in model.named_modules() if isinstance(m, MPQLinear)}
        print(f"run {r}: {seconds:.1f} s, perplexity {perplexity(model, ids):.4f}, "
              f"{len(layers)} layers", flush=True)
        if first is None:
            first = layers
            continue
        differ = [n for n in layers
                  if any(not torch.equal(v, first[n][k]) for k, v in layers[n].items())]
        print(f"  layers differing from run 0: {len(differ)} {differ[:3]}", flush=True)


if __name__ == "__main__":
    main()
