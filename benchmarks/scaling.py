"""Whole-process training memory where the weights dominate: a 1B-parameter Llama-shaped config.

The config (`common.CONFIGS["llama-1b"]`: 22 layers, hidden 2048, vocabulary 32000, 1.1 B
parameters) has random weights: these runs measure memory and time, never quality. Each method
trains a few steps on random tokens in its own process, with glibc's allocator reserve bounded
from the start (`edge_llm.limit_allocator_reserve`, every method alike), and reports the peak
resident memory of the whole process during `trainer.train()`, the memory before it, and the
median step.

Methods (`benchmarks/methods.py`): `lora`, `lora_gc_chunked`, `qlora_gc_chunked` (the same over
bitsandbytes' NF4 base, QLoRA), `edge_deep_gc` (edge-llm's
recommended dense point: one exit at the top, a window of two-thirds of the layers, gradient
checkpointing) and `luc_gguf_edge_deep_gc`, here over a base LUC compressed for llama.cpp at
`--gguf-bits` with the structural policy (random weights have no sensitivity to measure) and the
run planned to `--memory-budget` by `EdgeTrainer(memory_budget_bytes=...)`.

    python benchmarks/scaling.py --json benchmarks/results/scaling_llama1b.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import add_worker_arguments, in_own_processes, load_model, machine, ran_as_worker, training_arguments
from methods import LABELS, LOAD_OPTIONS, METHODS, Setup, default_depth

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_METHODS = ["lora", "lora_gc_chunked", "qlora_gc_chunked", "edge_deep_gc", "luc_gguf_edge_deep_gc"]
GIB = 2**30


def save_random_model(name: str, folder: str) -> None:
    load_model(name, torch.float32, "cpu")[0].save_pretrained(folder)


def own_copies(model: torch.nn.Module) -> None:
    """Copy the tensors a quantized load left as views of the memory-mapped checkpoint (bitsandbytes
    keeps the embedding and head in float, viewing the file): the whole file stays mapped and its
    pages, read while quantizing, count as resident (3.7 GiB of 4.6 for the 1B config) although
    the model holds 0.9 GiB. With copies the mapping is released and the process holds what QLoRA
    needs."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if type(tensor) in (torch.Tensor, torch.nn.Parameter):  # not a quantized subclass
                tensor.data = tensor.data.clone()
    import gc

    gc.collect()


def run_worker(args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    from edge_llm._memory import limit_allocator_reserve, peak_resident_bytes, reset_peak_resident, resident_bytes

    limit_allocator_reserve()
    if args.worker in LOAD_OPTIONS:  # a base quantized while loading, from a checkpoint
        import multiprocessing

        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as folder:
            # The random float32 model is made and saved by a child process: this one never holds it,
            # as a QLoRA user's process never holds more than the checkpoint it loads from.
            child = multiprocessing.get_context("spawn").Process(target=save_random_model, args=(args.model, folder))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise RuntimeError(f"saving the random {args.model} failed (exit code {child.exitcode})")
            model = AutoModelForCausalLM.from_pretrained(folder, **LOAD_OPTIONS[args.worker]())
            own_copies(model)
    else:
        model, _ = load_model(args.model, torch.float32, "cpu")
    layers, vocab = model.config.num_hidden_layers, model.config.vocab_size
    setup = Setup(
        rank=args.rank,
        targets=TARGETS,
        depth=default_depth(layers),
        gguf_bits=args.gguf_bits,
        gguf_sensitivity="structural",
    )
    prepared = METHODS[args.worker](model, setup)
    ids = torch.randint(0, vocab, (args.steps * args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    steps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *unused, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *unused, **kwargs):
            steps.append(time.perf_counter() - self.start)

    budget = {"memory_budget_bytes": args.memory_budget} if args.worker.startswith("luc") else {}
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = prepared.trainer_cls(
            model=prepared.model,
            args=training_arguments(output_dir, args, use_cpu=True, **prepared.training_overrides),
            train_dataset=data,
            callbacks=[Timer()],
            **budget,
        )
        before = resident_bytes()
        reset_peak_resident()
        trainer.train()
        peak = peak_resident_bytes()
    result = {"peak_bytes": peak, "before_training_bytes": before, "median_step_s": statistics.median(steps[1:])}
    plan = getattr(trainer, "memory_plan", None)
    if plan is not None:
        result["memory_plan"] = {**vars(plan), "estimated_peak_bytes": plan.estimated_peak_bytes}
        result["memory_budget_bytes"] = args.memory_budget
    if hasattr(prepared.model.base_model, "exit_layers"):
        result["backprop_depth"] = prepared.model.peft_config["default"].backprop_depth
    return result


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"machine: {machine()}",
        f"{args.model} (random weights), {args.steps} steps of batch {args.batch} x {args.seq} tokens, "
        f"LoRA r={args.rank} on all linear layers; llama.cpp base {args.gguf_bits} bits per weight (structural "
        "policy); every method with glibc's allocator reserve bounded",
        "",
        "| method | train() peak, whole process (GiB) | before training (GiB) | median step (s) | memory vs LoRA |",
        "|---|---|---|---|---|",
    ]
    lora = results.get("lora", {}).get("peak_bytes")
    for method, row in results.items():
        label = LABELS[method.split("@")[0]] + (
            f", planned to {row['memory_budget_bytes'] / GIB:.2f} GiB" if "memory_budget_bytes" in row else ""
        )
        ratio = f"{lora / row['peak_bytes']:.2f}x" if lora else ""
        lines.append(
            f"| {label} | {row['peak_bytes'] / GIB:.2f} | {row['before_training_bytes'] / GIB:.2f} | "
            f"{row['median_step_s']:.1f} | {ratio} |"
        )
    for method, row in results.items():
        if "memory_plan" in row:
            plan = row["memory_plan"]
            lines.append(
                f"\n{method}: plan {plan['backprop_depth']}-layer window, checkpointing "
                f"{plan['gradient_checkpointing']}, micro-batch {plan['micro_batch_size']}; estimated peak "
                f"{plan['estimated_peak_bytes'] / GIB:.2f} GiB, measured {row['peak_bytes'] / GIB:.2f} GiB "
                f"({row['peak_bytes'] / plan['estimated_peak_bytes']:.3f} of the estimate)"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gguf-bits", type=float, default=4.5)
    parser.add_argument("--memory-budget", type=int, default=2 * GIB, help="bytes for the planned LUC-base run")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path)
    add_worker_arguments(parser)
    args = parser.parse_args()
    if ran_as_worker(args, run_worker):
        return
    if args.from_json:
        results = json.loads(args.from_json.read_text())["results"]
    else:
        # Methods run again replace their earlier result in --json; the others are kept. A planned
        # run is stored per budget (`<method>@<MiB>MiB`).
        results = json.loads(args.json.read_text())["results"] if args.json and args.json.exists() else {}
        for method, result, seconds in in_own_processes(__file__, args.methods):
            key = f"{method}@{args.memory_budget // 2**20}MiB" if "memory_budget_bytes" in result else method
            results[key] = result
            print(f"{key}: {result['peak_bytes'] / GIB:.2f} GiB ({seconds:.0f} s)", flush=True)
            if args.json:
                record = {"machine": machine(), "args": vars(args), "results": results}
                args.json.write_text(json.dumps(record, indent=2, default=str))
    print(table(results, args))


if __name__ == "__main__":
    main()
