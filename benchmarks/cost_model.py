"""Calibrate the scheduler's cost model on this machine: predicted vs measured latency per layer.

Measures this machine with `profile_this_machine()`, compresses SmolLM2-135M with a mixed LUC
policy, then for every decoder layer and kernel (packed `dequant_int*`, `dense_fp32`,
`sparse_unstructured` for pruned layers) times the layer's prefill forward pass as the reference
executor runs it and compares with the cost model's prediction.

    python benchmarks/cost_model.py --tokens 256
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine

POLICY = [(2, 0.0), (3, 0.25), (4, 0.5), (8, 0.0), (4, 0.0), (3, 0.5)] * 5  # 30 layers, every kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="prefill length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_llm.assets import smollm2_135m
    from edge_llm.data import sonnets
    from edge_llm.luc import CompressionMethod, LUCLinear, compress_model
    from edge_llm.luc.calibration import LayerRunner, calibration_tokens
    from edge_llm.runtime import DenseKernel, SparseKernel
    from edge_llm.scheduling import ModelSpec, profile_this_machine
    from edge_llm.scheduling.cost import layer_forward_seconds

    device = profile_this_machine()
    path = smollm2_135m()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    compress_model(model, POLICY, CompressionMethod(64, "rtn", "magnitude"), progress=False)
    spec = ModelSpec.from_model(model)
    tokens = calibration_tokens(sonnets(), tokenizer, num_samples=1, seq_len=args.tokens)
    runner = LayerRunner(model, tokens, batch_size=1)

    rows = []
    for index, layer in enumerate(runner.layers):
        kernels = [f"dequant_int{POLICY[index][0]}", "dense_fp32"] + (
            ["sparse_unstructured"] if POLICY[index][1] else []
        )
        originals = {name: m for name, m in layer.named_modules() if isinstance(m, LUCLinear)}
        for kernel in kernels:
            for name, module in originals.items():
                replacement = {
                    "dense_fp32": lambda m: DenseKernel(m, torch.float32),
                    "sparse_unstructured": SparseKernel,
                }.get(kernel, lambda m: m)(module)
                owner, _, attribute = name.rpartition(".")
                setattr(layer.get_submodule(owner) if owner else layer, attribute, replacement)
            hidden = runner.layer_input(0, index)
            with torch.no_grad():
                runner.run_layer(index, 0, hidden)  # warm-up
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    runner.run_layer(index, 0, hidden)
                    times.append(time.perf_counter() - start)
            measured = statistics.median(times)
            predicted = layer_forward_seconds(spec.layers[index], kernel, device, 1, args.tokens, args.tokens // 2)
            rows.append(
                {
                    "layer": index,
                    "bits": POLICY[index][0],
                    "sparsity": POLICY[index][1],
                    "kernel": kernel,
                    "measured_s": measured,
                    "predicted_s": predicted,
                    "error": (predicted - measured) / measured,
                }
            )
        for name, module in originals.items():
            owner, _, attribute = name.rpartition(".")
            setattr(layer.get_submodule(owner) if owner else layer, attribute, module)

    lines = [
        f"machine: {machine()}",
        f"SmolLM2-135M-Instruct, mixed LUC policy (2/3/4/8 bits, 0-50% sparsity), prefill of {args.tokens} tokens, "
        f"batch 1; device measured by profile_this_machine(): {device.memory_bandwidth / 1e9:.1f} GB/s memory, "
        f"{device.elementwise_bandwidth / 1e9:.1f} GB/s elementwise, {device.kernels['dense_fp32'].flops / 1e9:.0f} "
        "GFLOP/s fp32",
        "",
        "| kernel | layers | mean measured (ms) | mean predicted (ms) | mean abs. error | worst error |",
        "|---|---|---|---|---|---|",
    ]

    def family(kernel: str) -> str:
        return "dequant_int*" if kernel.startswith("dequant_int") else kernel

    for kernel in sorted({family(r["kernel"]) for r in rows}):
        group = [r for r in rows if family(r["kernel"]) == kernel]
        lines.append(
            f"| {kernel} | {len(group)} | "
            f"{1000 * statistics.fmean(r['measured_s'] for r in group):.2f} | "
            f"{1000 * statistics.fmean(r['predicted_s'] for r in group):.2f} | "
            f"{100 * statistics.fmean(abs(r['error']) for r in group):.1f}% | "
            f"{100 * max(abs(r['error']) for r in group):.1f}% |"
        )
    overall = statistics.fmean(abs(r["error"]) for r in rows)
    within = sum(abs(r["error"]) <= 0.25 for r in rows)
    lines.append(f"\nall {len(rows)} layer/kernel pairs: mean absolute error {100 * overall:.1f}%, {within} within 25%")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "device": device.to_dict(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
