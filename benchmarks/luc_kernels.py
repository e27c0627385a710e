"""Do compressed Linear layers compute faster than dense ones? One layer of each projection shape.

For each projection shape of a model config (SmolLM2-135M's, a ~1B Llama's) and each phase —
decode (1 row), prefill (256 rows), a training micro-batch (1,024 rows, forward plus the input
gradient, as a frozen layer in a tuned window) — this times:

- `dense fp32` / `dense bf16`: `nn.functional.linear` on the dense weight;
- `LUC <setting>, dequantize`: `LUCLinear` on its reference path (`use_kernel = False`: expand the
  packed weight into the input's dtype at every call);
- `LUC <setting>, kernel`: `LUCLinear` as it runs by default (the int4 kernel for few rows, else
  dequantize + matmul in bfloat16 where the device is faster at it; see `edge_llm.luc.kernels`),

for LUC 4-bit, 8-bit and 4-bit with half the weights pruned (groups of 64, RTN). All variants
of one (shape, phase) are timed in interleaved rounds (every round runs each once, order
alternating), so their ratios hold on a shared machine; figures are medians with [min-max] over
rounds, and each LUC output's relative error against its dequantized float32 reference.

    python benchmarks/luc_kernels.py --rounds 5 --json benchmarks/results/luc_kernels_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import CONFIGS, machine

PHASES = {"decode": 1, "prefill": 256, "train": 1024}
CALLS = {"decode": 50, "prefill": 5, "train": 1}  # calls per timing, so that each takes milliseconds
SETTINGS = {"4-bit": (4, 0.0), "8-bit": (8, 0.0), "4-bit 50% pruned": (4, 0.5)}


def _shapes(config: dict) -> dict[str, tuple[int, int]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    return {
        "q/o_proj": (hidden, hidden),
        "k/v_proj": (kv, hidden),
        "gate/up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def _compressed(weight: torch.Tensor, bits: int, sparsity: float, device: str):
    from edge_llm.luc import LUCLinear
    from edge_llm.luc.prune import prune_mask
    from edge_llm.luc.quantize import quantize_rtn

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    mask = prune_mask(weight, sparsity, "magnitude") if sparsity else None
    return LUCLinear.from_linear(linear, bits, sparsity, 64, quantize_rtn(weight, bits, 64, mask), mask).to(device)


def _call(fn, x: torch.Tensor, train: bool) -> torch.Tensor:
    if not train:
        with torch.no_grad():
            return fn(x)
    x = x.detach().requires_grad_()
    out = fn(x)
    out.backward(torch.ones_like(out))
    return x.grad


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _variants(weight: torch.Tensor, device: str) -> dict:
    dense32 = weight.to(device)
    dense16 = dense32.to(torch.bfloat16)
    variants = {
        "dense fp32": (partial(torch.nn.functional.linear, weight=dense32), torch.float32, None),
        "dense bf16": (partial(torch.nn.functional.linear, weight=dense16), torch.bfloat16, None),
    }
    for setting, (bits, sparsity) in SETTINGS.items():
        layer = _compressed(weight, bits, sparsity, device)
        reference = layer.dequantize_weight(torch.float32)
        slow = _compressed(weight, bits, sparsity, device)
        slow.use_kernel = False
        variants[f"LUC {setting}, dequantize"] = (slow, torch.float32, reference)
        variants[f"LUC {setting}, kernel"] = (layer, torch.float32, reference)
    return variants


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    rows = []
    for model in args.models:
        for shape_name, (out_features, in_features) in _shapes(CONFIGS[model]).items():
            weight = torch.randn(out_features, in_features) * 0.02
            variants = _variants(weight, args.device)
            for phase, tokens in PHASES.items():
                train = phase == "train"
                x = torch.randn(tokens, in_features, device=args.device)
                times: dict[str, list[float]] = {name: [] for name in variants}
                names = list(variants)
                for round_index in range(args.rounds + 1):  # round 0 warms up
                    for name in names if round_index % 2 else names[::-1]:
                        fn, dtype, _ = variants[name]
                        _sync(args.device)
                        start = time.perf_counter()
                        for _ in range(CALLS[phase]):
                            _call(fn, x.to(dtype), train)
                        _sync(args.device)
                        if round_index:
                            times[name].append((time.perf_counter() - start) / CALLS[phase])
                for name, (fn, _, reference) in variants.items():
                    row = {"model": model, "shape": shape_name, "out_in": [out_features, in_features]}
                    row |= {"phase": phase, "rows": tokens, "variant": name}
                    row |= {"seconds": statistics.median(times[name]), "min": min(times[name]), "max": max(times[name])}
                    if reference is not None:
                        got = _call(fn, x, train).float()
                        expected = _call(partial(torch.nn.functional.linear, weight=reference), x, train)
                        row["relative_error"] = ((got - expected).norm() / expected.norm()).item()
                    rows.append(row)
                logging.info("%s %s %s done", model, shape_name, phase)
    return {"machine": machine(), "rounds": args.rounds, "rows": rows}


def table(result: dict) -> str:
    """Markdown: per (model, shape, phase), each variant's time and its speed against dense fp32."""
    lines = [
        "| model | shape | phase | variant | time (ms) | speed vs dense fp32 [min-max] | rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {(r["model"], r["shape"], r["phase"]): r for r in result["rows"] if r["variant"] == "dense fp32"}
    for r in result["rows"]:
        ref = base[(r["model"], r["shape"], r["phase"])]
        speed = ref["seconds"] / r["seconds"]
        spread = f"[{ref['min'] / r['max']:.2f}-{ref['max'] / r['min']:.2f}]"
        error = f"{r['relative_error']:.4f}" if "relative_error" in r else ""
        lines.append(
            f"| {r['model']} | {r['shape']} {tuple(r['out_in'])} | {r['phase']} ({r['rows']}) | {r['variant']} "
            f"| {1000 * r['seconds']:.3f} | {speed:.2f}x {spread} | {error} |"
        )
    return "\n".join(lines)


# How many Linears of each shape a Llama decoder layer has.
PER_LAYER = {"q/o_proj": 2, "k/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}


def decoder_layer_table(result: dict) -> str:
    """Markdown: per model and phase, the seven Linears of one decoder layer together (medians
    summed), each variant's speed against dense fp32."""
    totals: dict[tuple[str, str, str], float] = {}
    for r in result["rows"]:
        key = (r["model"], r["phase"], r["variant"])
        totals[key] = totals.get(key, 0.0) + PER_LAYER[r["shape"]] * r["seconds"]
    variants = list(dict.fromkeys(r["variant"] for r in result["rows"]))
    lines = ["| model | phase | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for model, phase in dict.fromkeys((m, p) for m, p, _ in totals):
        base = totals[(model, phase, "dense fp32")]
        cells = [f"{base / totals[(model, phase, v)]:.2f}x" for v in variants]
        lines.append(f"| {model} | {phase} ({PHASES[phase]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-config", "llama-1b"], choices=sorted(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(f"Machine: {result['machine']}\n")
    print(table(result))
    print("\nOne decoder layer (its seven Linears), speed against dense fp32:\n")
    print(decoder_layer_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
