"""LUC vs one uniform setting at equal weight bytes, on SmolLM2-135M-Instruct (real weights).

For each uniform (bits, sparsity) setting: compress every decoder layer with it, and compress
with LUC under a byte budget equal to the uniform policy's bytes; report held-out perplexity
(sonnets 131-154) and multiple-choice accuracy (ARC-Easy by default), with the original model as reference.

    python benchmarks/luc.py                        # default grid, KL profile (about 20 min on 2 CPU cores)
    python benchmarks/luc.py --metric output_mse    # faster profile

Caveat: the SmolLM2 weights ship as dequantized Q4_1 (4-bit, blocks of 32), so 4-bit settings are
close to lossless here; the differences are real at 2-3 bits and with pruning.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine

UNIFORM = [(3, 0.0), (3, 0.25), (2, 0.25), (4, 0.5), (3, 0.5)]


def decoder_weight_bytes(model: torch.nn.Module) -> int:
    from edge_llm.luc import LUCLinear
    from edge_llm.modeling import find_decoder_parts

    total = 0
    for module in find_decoder_parts(model).layers(model).modules():
        if isinstance(module, LUCLinear):
            total += module.storage_bytes()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * 2
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metric", default="kl", choices=("kl", "output_mse"))
    parser.add_argument("--quant", default="rtn", choices=("rtn", "gptq"))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--task", default="arc_easy", help="multiple-choice task (see edge_llm.evaluation)")
    parser.add_argument("--items", type=int, default=150)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_llm._cache import cache_dir
    from edge_llm.assets import smollm2_135m
    from edge_llm.data import sonnets
    from edge_llm.evaluation import multiple_choice_accuracy, perplexity, task_items
    from edge_llm.luc import (
        Budget,
        CompressionMethod,
        LUCPolicy,
        calibration_tokens,
        compress_model,
        profile_sensitivity,
    )

    path = smollm2_135m()
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    held = tokenizer("\n\n".join(sonnets("test")), return_tensors="pt").input_ids[0]
    held = held[: (len(held) // 256) * 256].view(-1, 256)
    calibration = calibration_tokens(sonnets("train"), tokenizer, args.samples, args.seq_len)
    items = task_items(args.task, limit=args.items)
    method = CompressionMethod(args.group_size, args.quant, "wanda", "unstructured")

    def evaluate(model: torch.nn.Module) -> dict:
        return {
            "perplexity": perplexity(model, held)["model"],
            "accuracy": multiple_choice_accuracy(model, tokenizer, items)["model"],
            "bytes": decoder_weight_bytes(model),
        }

    rows = {"original (16-bit)": evaluate(original)}
    start = time.perf_counter()
    bits = sorted({b for b, _ in UNIFORM} | {8})
    sparsities = sorted({s for _, s in UNIFORM})
    profile = profile_sensitivity(
        original,
        calibration,
        tuple(bits),
        tuple(sparsities),
        method,
        args.metric,
        cache_dir=cache_dir() / "luc-profiles",
    )
    profile_seconds = time.perf_counter() - start
    num_layers = len(profile.damage)
    for setting in UNIFORM:
        uniform_policy = LUCPolicy([setting] * num_layers, method)
        budget = profile.policy_bytes(uniform_policy)
        luc_policy = profile.search(Budget(weight_budget_bytes=budget))
        for name, policy in (
            (f"uniform {setting[0]}-bit, {setting[1]:.0%} sparse", uniform_policy),
            (f"LUC at the same bytes ({setting[0]}-bit/{setting[1]:.0%} budget)", luc_policy),
        ):
            model = copy.deepcopy(original)
            compress_model(model, policy.layers, policy.method, calibration, progress=False)
            rows[name] = {**evaluate(model), "policy": [list(x) for x in policy.layers]}
            del model

    lines = [
        f"machine: {machine()}",
        f"SmolLM2-135M-Instruct, {args.quant.upper()} group {args.group_size}, Wanda pruning, calibration "
        f"{args.samples}x{args.seq_len} tokens of sonnets 1-120, {args.metric} sensitivity profile "
        f"({profile_seconds:.0f} s); held-out: sonnets 131-154 ({held.numel()} tokens), {args.task} first "
        f"{len(items)} items",
        "",
        f"| model | decoder weight MiB | held-out perplexity | {args.task} accuracy |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['bytes'] / 2**20:.1f} | {row['perplexity']:.2f} | {row['accuracy']:.3f} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "rows": rows, "args": vars(args) | {"json": None}}, indent=2, default=str)
        )


if __name__ == "__main__":
    main()
