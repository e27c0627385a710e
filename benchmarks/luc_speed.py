"""Do LUC-compressed models run faster than dense ones? Decode, prefill and a tuning step.

SmolLM2-135M-Instruct as dense float32, dense bfloat16, and LUC-compressed (a uniform 4-bit
policy and a mixed LUC policy file) as `LUCLinear` runs by default (the int4 kernel for few rows,
dequantize + bfloat16 matmul for many; see `edge_llm.luc.kernels`) and, for reference, on the
dequantize-per-call path (`LUCLinear.use_kernel = False`). Weight memory is what the model holds
after the runs: every parameter and buffer plus the int4 layouts built from the stored codes.
All variants live in one process and are timed in interleaved rounds (each round runs every
variant once, in alternating order), so the ratios are robust to a shared machine; figures are
medians over rounds with [min-max].

    python benchmarks/luc_speed.py --rounds 5 --json benchmarks/results/luc_speed_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine


def _variants(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_llm.assets import smollm2_135m
    from edge_llm.data import sonnets
    from edge_llm.luc import CompressionMethod, LUCLinear, LUCPolicy, calibration_tokens, compress_model

    dense = AutoModelForCausalLM.from_pretrained(smollm2_135m(), dtype=torch.float32).eval()
    calibration = calibration_tokens(sonnets(), AutoTokenizer.from_pretrained(smollm2_135m()), 8, 128)
    layers = dense.config.num_hidden_layers
    variants = {"dense fp32": dense, "dense bf16": copy.deepcopy(dense).to(torch.bfloat16)}
    uniform = copy.deepcopy(dense)
    compress_model(uniform, [(4, 0.0)] * layers, CompressionMethod(64, "rtn", "magnitude"), progress=False)
    variants["LUC 4-bit, kernels"] = uniform
    if args.policy:
        policy = LUCPolicy.load(args.policy)
        mixed = copy.deepcopy(dense)
        compress_model(mixed, policy.layers, policy.method, calibration, policy.targets, progress=False)
        variants[f"LUC {Path(args.policy).stem}, kernels"] = mixed
    for name in [n for n in variants if n.startswith("LUC")]:
        reference = copy.deepcopy(variants[name])
        for module in reference.modules():
            if isinstance(module, LUCLinear):
                module.use_kernel = False
        variants[name.replace("kernels", "dequantize per call")] = reference
    return variants


def _weight_bytes(model) -> int:
    """Bytes of every parameter and buffer, plus what `LUCLinear`s built from them and keep: int4
    layouts, and pruned layers' expanded codes."""
    from edge_llm.luc import LUCLinear

    tensors = [*model.parameters(), *model.buffers()]
    for module in (m for m in model.modules() if isinstance(m, LUCLinear)):
        layout, expanded = module.int4_weight(), module.expanded_codes()  # built by the runs already
        tensors += [layout.packed, layout.scales_and_zeros] if layout is not None else []
        tensors += list(expanded) if expanded is not None else []
    return sum(t.numel() * t.element_size() for t in tensors)


def _decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def _prefill_seconds(model, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    return time.perf_counter() - start


def _tuning_step_seconds(model, tokens: torch.Tensor) -> float:
    """One edge-llm exit-29 training step (forward to the exit, backward through the window)."""
    start = time.perf_counter()
    with model.exit_at(model.base_model.exit_layers[-1]):
        model(input_ids=tokens, labels=tokens).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--train-batch", type=int, nargs=2, default=(4, 256), metavar=("BATCH", "SEQ"))
    parser.add_argument("--policy", help="a LUC policy JSON to compare as well")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from peft import get_peft_model

    from edge_llm import EdgeLLMConfig

    variants = _variants(args)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 49152, (1, 16), generator=generator)
    prefill = torch.randint(0, 49152, (1, args.prefill), generator=generator)
    train = torch.randint(0, 49152, tuple(args.train_batch), generator=generator)
    tuned = {}
    for name, model in variants.items():
        if name == "dense bf16":
            continue  # training runs in float32 on a CPU; bf16 here is an inference format
        config = EdgeLLMConfig(r=8, target_modules=["q_proj", "v_proj"], exit_layers=[29], backprop_depth=8)
        tuned[name] = get_peft_model(copy.deepcopy(model), config)
    times: dict[str, dict[str, list[float]]] = {n: {"decode": [], "prefill": [], "tuning step": []} for n in variants}
    for round_index in range(args.rounds + 1):  # round 0 warms up every path and is not counted
        order = list(variants) if round_index % 2 else list(variants)[::-1]
        for name in order:
            decode = _decode_seconds(variants[name], prompt, args.new_tokens)
            prefill_s = _prefill_seconds(variants[name], prefill)
            step = _tuning_step_seconds(tuned[name], train) if name in tuned else None
            if round_index:
                times[name]["decode"].append(args.new_tokens / decode)
                times[name]["prefill"].append(prefill_s)
                if step is not None:
                    times[name]["tuning step"].append(step)
        print(f"round {round_index} done", flush=True)

    def summary(values: list[float]) -> str:
        return f"{statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]" if values else "-"

    memory = {name: _weight_bytes(model) for name, model in variants.items()}
    base = times["dense fp32"]
    lines = [
        f"machine: {machine()}",
        f"SmolLM2-135M-Instruct; decode: {args.new_tokens} greedy tokens after a 16-token prompt (KV cache); "
        f"prefill: {args.prefill} tokens; tuning step: edge-llm exit 29, window 8, LoRA r=8 q/v, batch "
        f"{args.train_batch[0]} x {args.train_batch[1]}, float32; {args.rounds} interleaved rounds, median [min-max]",
        "",
        "| variant | weights (MiB) | decode tokens/s | vs dense fp32 | prefill (s) | vs dense fp32 "
        "| tuning step (s) | vs dense fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, measured in times.items():

        def ratio(key: str, higher_is_faster: bool, measured: dict = measured) -> str:
            pairs = list(zip(base[key], measured[key], strict=False))
            if not pairs:
                return "-"
            values = [(m / b) if higher_is_faster else (b / m) for b, m in pairs]
            return f"{statistics.median(values):.2f}x [{min(values):.2f}-{max(values):.2f}]"

        lines.append(
            f"| {name} | {memory[name] / 2**20:.1f} "
            f"| {summary(measured['decode'])} | {ratio('decode', True)} | {summary(measured['prefill'])} | "
            f"{ratio('prefill', False)} | {summary(measured['tuning step'])} | {ratio('tuning step', False)} |"
        )
    print("\n".join(lines))
    if args.json:
        record = {"machine": machine(), "args": vars(args), "times": times, "weight_bytes": memory}
        args.json.write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
