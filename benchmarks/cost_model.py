"""Calibrate the scheduler's cost model on this machine: predicted vs measured latency per layer.

Measures this machine with `profile_this_machine()`, compresses SmolLM2-135M (or a config-built
model: the cost model needs shapes, not trained weights) with a mixed LUC policy, then for every
decoder layer and kernel (packed `dequant_int*`, `int4_packed` for unpruned layers of at most 4
bits, `dense_fp32` on a CPU / `dense_bf16` on a GPU, `sparse_unstructured` for pruned layers)
times the layer's prefill forward pass as the reference executor runs it and compares with the
cost model's prediction.

    python benchmarks/cost_model.py --tokens 256
    python benchmarks/cost_model.py --device cuda --model llama-1b --tokens 256
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
from common import load_model, machine

KINDS = [(2, 0.0), (3, 0.25), (4, 0.5), (8, 0.0), (4, 0.0), (3, 0.5)]  # every kind of layer, repeated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="prefill length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="smollm2", help="smollm2, or a config name of benchmarks/common.py")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run(args)


def run(args: argparse.Namespace) -> dict:
    """Measure, compare and print; returns what `--json` writes."""
    from edge_llm.data import sonnets
    from edge_llm.luc import CompressionMethod, LUCLinear, compress_model
    from edge_llm.luc.calibration import LayerRunner, calibration_tokens
    from edge_llm.scheduling import ModelSpec, profile_this_machine
    from edge_llm.scheduling.cost import compatible_kernels, layer_forward_seconds
    from edge_llm.scheduling.kernels import kernel_type

    cuda = args.device.startswith("cuda")
    dtype, dense = (torch.bfloat16, "dense_bf16") if cuda else (torch.float32, "dense_fp32")
    model, tokenizer = load_model(args.model, dtype, args.device)
    model.eval()
    layers = model.config.num_hidden_layers
    policy = (KINDS * layers)[:layers]
    mlp = (model.config.intermediate_size, model.config.hidden_size)
    device = profile_this_machine(weight_shape=mlp, tokens=args.tokens, device=args.device)
    compress_model(model, policy, CompressionMethod(64, "rtn", "magnitude"), progress=False)
    spec = ModelSpec.from_model(model)
    if tokenizer is not None:
        tokens = calibration_tokens(sonnets(), tokenizer, num_samples=1, seq_len=args.tokens)
    else:
        tokens = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    runner = LayerRunner(model, tokens, batch_size=1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    rows = []
    for index, layer in enumerate(runner.layers):
        wanted = [f"dequant_int{policy[index][0]}", "int4_packed", dense, "sparse_unstructured"]
        kernels = [k for k in wanted if k in compatible_kernels(spec.layers[index], device)]
        originals = {name: m for name, m in layer.named_modules() if isinstance(m, LUCLinear)}
        for kernel in kernels:
            for name, module in originals.items():
                layer.set_submodule(name, kernel_type(kernel).module(module))  # what the reference executor runs
            hidden = runner.layer_input(0, index)
            with torch.no_grad():
                runner.run_layer(index, 0, hidden)  # warm-up
                sync()
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    runner.run_layer(index, 0, hidden)
                    sync()
                    times.append(time.perf_counter() - start)
            measured = statistics.median(times)
            predicted = layer_forward_seconds(spec.layers[index], kernel, device, 1, args.tokens, args.tokens // 2)
            rows.append(
                {
                    "layer": index,
                    "bits": policy[index][0],
                    "sparsity": policy[index][1],
                    "kernel": kernel,
                    "measured_s": measured,
                    "predicted_s": predicted,
                    "error": (predicted - measured) / measured,
                }
            )
        for name, module in originals.items():
            layer.set_submodule(name, module)

    lines = [
        f"machine: {machine()}",
        f"{args.model}, mixed LUC policy (2/3/4/8 bits, 0-50% sparsity), prefill of {args.tokens} tokens, "
        f"batch 1; device measured by profile_this_machine(): {device.memory_bandwidth / 1e9:.1f} GB/s memory, "
        f"{device.elementwise_bandwidth / 1e9:.1f} GB/s elementwise, {device.kernels[dense].flops / 1e9:.0f} "
        f"GFLOP/s {dense.removeprefix('dense_')}",
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
    result = {"machine": machine(), "model": args.model, "device": device.to_dict(), "rows": rows}
    result["mean_abs_error"] = overall
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
