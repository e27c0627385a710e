"""Quality per cost: edge-llm against the tuning recipes practitioners use, on a real model and task.

Every method trains SmolLM2-135M-Instruct with the same data, steps, batch, sequence length, LoRA
rank/targets, learning rate and seed, each in its own process (`benchmarks/methods.py` defines
the methods). Two tasks:

- `sciq`: SciQ multiple choice (800 questions to train on, 200 held out, accuracy), as in
  `benchmarks/task.py`;
- `sonnets`: domain adaptation to Shakespeare's sonnets (train on 1-120, held-out loss on
  131-154), as in `benchmarks/tuning.py`.

`--return-freed-memory` runs every method (alike) with glibc's allocator reserve bounded, as
edge-llm's memory planner sets it (`edge_llm._memory.limit_allocator_reserve`: buffers from 128 KiB
up mapped and unmapped on their own, the heap trimmed above 16 MiB). By default glibc keeps what a
step frees for reuse, and the process's resident memory stays at the first step's high-water mark
(on SmolLM2 ~400 MiB above what the tensors hold).

`--gguf-base FILE` gives the `luc_gguf` methods their base as a device gets it: the file `edge-llm
compress --target gguf` wrote, loaded with `edge_llm.export.load_gguf`, so their process never
holds the float model, its compression or llama.cpp's quantizer (as QLoRA's process never holds
its float weights).

`--memory-budget BYTES` gives edge-llm's methods that budget for the whole process
(`EdgeTrainer(memory_budget_bytes=...)`): the plan replaces their window and checkpointing
settings, and the result, stored as `<method>@<MiB>`, records the plan and its estimate beside the
measured peak (which then includes planning's probe passes).

Memory is measured the same way for every method (peak RSS: of the training, weights included;
above the loaded model; of the whole `trainer.train()` call, which for edge-llm includes fitting
the exit weights), plus the bytes autograd saved for backward; time is the whole `train()` call
and the median step. The table marks the methods on the Pareto front of (quality, training
memory of the whole process) and of (quality, training time); `--plots DIR` draws both.

    python benchmarks/frontier.py --task sciq --json benchmarks/results/frontier_sciq.json
    python benchmarks/frontier.py --task sonnets --steps 60 --json benchmarks/results/frontier_sonnets.json
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
from common import (
    StepMeter,
    add_worker_arguments,
    in_own_processes,
    machine,
    measured,
    ran_as_worker,
    training_arguments,
)
from methods import LABELS, LOAD_OPTIONS, METHODS, Setup, default_depth

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_METHODS = [
    "original",
    "lora",
    "lora_gc",
    "lora_gc_chunked",
    "topk_chunked",
    "edge",
    "edge_auto",
    "edge_deep",
    "edge_deep_gc",
    "luc_edge_deep",
]
TASKS = {"sciq": {"batch": 8, "steps": 100}, "sonnets": {"batch": 4, "steps": 60}}


def _sciq_data(tokenizer, seed: int):
    from task import sciq_split, sciq_training_data

    train_items, test_items = sciq_split(seed)
    train, validation = sciq_training_data(tokenizer, train_items)
    texts = [f"{i.context}{i.choices[i.gold]}" for i in train_items]
    return train, validation, test_items, texts


def _quality(args: argparse.Namespace, model, tokenizer, test) -> dict:
    """SciQ: accuracy of the voted prediction (the model's own for LoRA); sonnets: held-out loss."""
    model.eval()
    if args.task == "sciq":
        from edge_llm.evaluation import multiple_choice_accuracy

        accuracy = multiple_choice_accuracy(model, tokenizer, test[: args.test_items])
        return {"quality": accuracy.get("voted_weighted", accuracy.get("model")), "per_exit": accuracy}
    total, count = 0.0, 0
    with torch.no_grad():
        for row in test:
            ids = torch.tensor([row["input_ids"]])
            out = model(input_ids=ids, labels=ids)
            total += out.loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return {"quality": total / count}


def run_worker(args: argparse.Namespace) -> dict:
    from task import decoder_bytes
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, default_data_collator
    from tuning import token_data

    from edge_llm._memory import limit_allocator_reserve, peak_resident_bytes
    from edge_llm.assets import smollm2_135m
    from edge_llm.luc import calibration_tokens

    if args.return_freed_memory:
        limit_allocator_reserve()
    torch.manual_seed(args.seed)
    path = smollm2_135m()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.gguf_base and args.worker.startswith("luc_gguf"):
        from edge_llm.export.gguf_load import load_gguf

        model = load_gguf(args.gguf_base)  # the base as a device receives it: no float model here
    else:
        loading = LOAD_OPTIONS[args.worker]() if args.worker in LOAD_OPTIONS else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **loading)
    if args.task == "sciq":
        train, validation, test, texts = _sciq_data(tokenizer, args.seed)
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    else:
        train, validation, test = token_data(
            tokenizer, model.config.vocab_size, args.seq, args.steps * args.batch, 16, args.seed
        )
        texts, collator = None, default_data_collator
    result: dict = {"method": args.worker}
    if args.worker != "original":
        layers = model.config.num_hidden_layers
        calibration = None
        if args.worker.startswith("luc") and not args.gguf_base:
            from edge_llm.data import sonnets

            calibration = calibration_tokens(texts or sonnets("train"), tokenizer, num_samples=8, seq_len=128)
        setup = Setup(
            rank=args.rank,
            targets=TARGETS,
            depth=default_depth(layers),
            exit_sampling="curriculum",
            deep_depth=args.deep_depth,
            luc_policy=args.luc_policy,
            gguf_bits=args.gguf_bits,
            calibration=calibration,
        )
        prepared = METHODS[args.worker](model, setup)
        model = prepared.model
    if args.worker != "original" and not args.untuned:
        with tempfile.TemporaryDirectory() as output_dir:
            training_args = training_arguments(output_dir, args, use_cpu=True, **prepared.training_overrides)
            meter = StepMeter(model)
            budget = {"memory_budget_bytes": args.memory_budget} if hasattr(model.base_model, "exit_layers") else {}
            trainer = measured(prepared.trainer_cls, meter)(
                model=model,
                args=training_args,
                train_dataset=train,
                eval_dataset=validation,
                data_collator=collator,
                callbacks=[meter],
                **(budget if args.memory_budget else {}),
            )
            if args.plan_only:  # the plan `train()` would run, without training
                plan = trainer.plan()
                return {**result, "memory_plan": {**vars(plan), "estimated_peak_bytes": plan.estimated_peak_bytes}}
            start = time.perf_counter()
            output = trainer.train()  # edge-llm: then fits the exit weights on `validation`
            result["train_call_s"] = time.perf_counter() - start
            # The VmHWM was reset when training began: this is the peak of the whole call (with a
            # memory budget, EdgeTrainer's own measure also covers planning, before training began).
            result["train_call_peak_bytes"] = max(
                peak_resident_bytes(), output.metrics.get("train_peak_resident_bytes", 0)
            )
            plan = getattr(trainer, "memory_plan", None)
            if plan is not None:
                result["memory_plan"] = {**vars(plan), "estimated_peak_bytes": plan.estimated_peak_bytes}
                result["memory_budget_bytes"] = args.memory_budget
        result.update(meter.summary(args.warmup, 0))
        result["train_call_peak_above_model_bytes"] = (
            result["train_call_peak_bytes"] - result["memory_before_training_bytes"]
        )
        if hasattr(model.base_model, "exit_layers"):
            edge = model.peft_config["default"]
            result.update(
                exit_layers=edge.exit_layers, backprop_depth=edge.backprop_depth, exit_weights=edge.exit_weights
            )
    result.update(_quality(args, model, tokenizer, test))
    result["decoder_bytes"] = decoder_bytes(model)
    return result


def pareto(rows: dict[str, dict], cost: str, higher_is_better: bool) -> set[str]:
    """Methods no other method beats on both quality and `cost` (lower cost is better)."""

    def better(a: dict, b: dict) -> bool:
        quality = a["quality"] >= b["quality"] if higher_is_better else a["quality"] <= b["quality"]
        return quality and a[cost] <= b[cost] and (a["quality"] != b["quality"] or a[cost] != b[cost])

    trained = {m: r for m, r in rows.items() if cost in r}
    return {m for m, r in trained.items() if not any(better(o, r) for n, o in trained.items() if n != m)}


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    higher = args.task == "sciq"
    front_memory = pareto(results, "train_call_peak_bytes", higher)
    front_time = pareto(results, "train_call_s", higher)
    quality_name = "SciQ accuracy" if higher else "held-out loss"
    lora = results.get("lora", {})
    lines = [
        f"machine: {machine()}",
        f"SmolLM2-135M-Instruct, task {args.task}: {args.steps} steps of batch {args.batch}"
        + (f" x {args.seq} tokens" if args.task == "sonnets" else "")
        + f", LoRA r={args.rank} on all linear layers, lr {args.lr}, seed {args.seed}; K={default_depth(30)}, "
        f"deep window {args.deep_depth or 20}; LUC policy {args.luc_policy or '4-bit RTN'}; llama.cpp base "
        f"{args.gguf_bits} bits per weight (measured policy)"
        + ("; glibc returns freed memory at once (every method)" if args.return_freed_memory else ""),
        "",
        f"| method | {quality_name} | train() peak RSS, whole process (GiB) | train() peak above the model (GiB) | "
        "saved for backward (GiB) | train() time (s) | median step (s) | memory vs LoRA | time vs LoRA | front |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    gib = 1024**3
    for method, row in results.items():
        name, *tags = method.split("@")
        label = LABELS.get(name, "original (no tuning)") + "".join(
            f", planned to {tag}" if tag.endswith("MiB") and tag[:-3].isdigit() else f", {tag}" for tag in tags
        )
        if "train_call_s" not in row:
            lines.append(f"| {label} | {row['quality']:.4f} | | | | | | | | |")
            continue
        marks = ("M" if method in front_memory else "") + ("T" if method in front_time else "")
        memory_ratio = time_ratio = ""
        if lora.get("train_call_s"):
            peak = "train_call_peak_bytes"
            memory_ratio = f"{lora[peak] / row[peak]:.2f}x"
            time_ratio = f"{lora['train_call_s'] / row['train_call_s']:.2f}x"
        lines.append(
            f"| {label} | {row['quality']:.4f} | {row['train_call_peak_bytes'] / gib:.2f} | "
            f"{row['train_call_peak_above_model_bytes'] / gib:.3f} | {row['saved_for_backward_bytes'] / gib:.3f} | "
            f"{row['train_call_s']:.0f} | {row['median_step_s']:.2f} | {memory_ratio} | {time_ratio} | {marks} |"
        )
    lines.append(
        "\nfront: M = on the Pareto front of quality and the process's train() peak memory, "
        "T = of quality and train() time. Ratios: LoRA's figure / this method's (higher is leaner/faster)."
    )
    return "\n".join(lines + budget_table(results) + seed_table(results))


def seed_table(results: dict[str, dict]) -> list[str]:
    """For runs stored as `<method>@seed N` (`--seed N --variant "seed N"`: each seed its own split
    of the data): quality per seed, the mean over seeds, and each method's difference from LoRA +
    checkpointing + chunked loss on the same seeds."""
    by_method: dict[str, dict[int, float]] = {}
    for key, row in results.items():
        name, *tags = key.split("@")
        for tag in tags:
            if tag.startswith("seed ") and tag[5:].isdigit():
                by_method.setdefault(name, {})[int(tag[5:])] = row["quality"]
    if not by_method:
        return []
    seeds = sorted({seed for qualities in by_method.values() for seed in qualities})
    reference = by_method.get("lora_gc_chunked", {})
    lines = [
        "",
        "| method | "
        + " | ".join(f"seed {seed}" for seed in seeds)
        + " | mean | mean difference from LoRA + GC + chunked (same seeds) |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for name, qualities in by_method.items():
        shared = [seed for seed in qualities if seed in reference]
        difference = (
            f"{statistics.mean(qualities[seed] - reference[seed] for seed in shared):+.4f} ({len(shared)} seeds)"
            if shared and name != "lora_gc_chunked"
            else ""
        )
        cells = " | ".join(f"{qualities[seed]:.4f}" if seed in qualities else "" for seed in seeds)
        lines.append(f"| {LABELS[name]} | {cells} | {statistics.mean(qualities.values()):.4f} | {difference} |")
    return lines


def budget_table(results: dict[str, dict]) -> list[str]:
    """For runs with a memory budget: the plan, its estimate and the measured peak (MiB)."""
    planned = {method: row for method, row in results.items() if "memory_plan" in row}
    if not planned:
        return []
    mib = 2**20
    lines = [
        "",
        "| run | budget (MiB) | plan | estimated peak (MiB) | measured peak (MiB) | measured / estimate | fits |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in planned.items():
        plan, peak, budget = row["memory_plan"], row["train_call_peak_bytes"], row["memory_budget_bytes"]
        estimate = plan["estimated_peak_bytes"]
        shape = f"{plan['backprop_depth']}-layer window" + (", checkpointing" if plan["gradient_checkpointing"] else "")
        shape += f", micro-batch {plan['micro_batch_size']} x {plan['accumulation_steps']}"
        lines.append(
            f"| {method} | {budget / mib:.0f} | {shape} | {estimate / mib:.0f} | {peak / mib:.0f} | "
            f"{peak / estimate:.3f} | {'yes' if peak <= budget else 'NO'} |"
        )
    return lines


def plot(results: dict[str, dict], args: argparse.Namespace, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    higher = args.task == "sciq"
    folder.mkdir(parents=True, exist_ok=True)
    axes = (("train_call_peak_bytes", 1024**3, "train() peak memory of the process (GiB)"),)
    axes += (("train_call_s", 1, "train() time (s)"),)
    for key, scale, label in axes:
        front = pareto(results, key, higher)
        figure, axis = plt.subplots(figsize=(6.4, 4.2))
        points = {m: r for m, r in results.items() if key in r}
        for method, row in points.items():
            on_front = method in front
            axis.scatter(row[key] / scale, row["quality"], color="C3" if on_front else "C0", zorder=3)
            axis.annotate(
                method, (row[key] / scale, row["quality"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
        ordered = sorted((points[m][key] / scale, points[m]["quality"]) for m in front)
        axis.plot(*zip(*ordered, strict=True), color="C3", linewidth=1, label="Pareto front")
        if "original" in results:
            axis.axhline(results["original"]["quality"], color="grey", linestyle=":", label="untuned")
        axis.set_xlabel(label)
        axis.set_ylabel("SciQ accuracy" if higher else "held-out loss")
        axis.set_title(f"SmolLM2-135M, {args.task}: quality vs {label.split(' (')[0]}")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(folder / f"frontier_{args.task}_{'memory' if 'bytes' in key else 'time'}.png", dpi=120)
        plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS), default="sciq")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int, default=256, help="sonnets: tokens per row")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--test-items", type=int, default=200)
    parser.add_argument("--deep-depth", type=int, help="edge_deep's window (default: two thirds of the layers)")
    parser.add_argument("--luc-policy", help="LUC policy JSON for luc_edge_deep (default: 4-bit RTN)")
    parser.add_argument("--gguf-bits", type=float, default=4.5, help="bits per weight of luc_gguf methods' base")
    parser.add_argument("--methods", nargs="+", choices=["original", *METHODS], default=DEFAULT_METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--return-freed-memory", action="store_true", help="glibc hands freed memory back at once (every method)"
    )
    parser.add_argument(
        "--memory-budget", type=int, help="bytes for the whole process: edge-llm methods plan their run to fit"
    )
    parser.add_argument(
        "--plan-only",
        action="store_true",
        help="with --memory-budget: plan edge-llm's methods and store the plan, without training",
    )
    parser.add_argument(
        "--untuned",
        action="store_true",
        help="prepare each method (a luc method compresses its base) but do not train: the quality tuning starts "
        "from, stored as <method>@untuned",
    )
    parser.add_argument(
        "--gguf-base",
        type=Path,
        help="luc_gguf methods tune over this file (`edge-llm compress --target gguf`), loaded as a device "
        "loads it, instead of compressing the float model in their process",
    )
    parser.add_argument(
        "--variant", help="stored as <method>@<VARIANT> and labelled so (runs with other --deep-depth, --luc-policy...)"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plots", type=Path, help="folder for the two frontier plots")
    parser.add_argument("--from-json", type=Path, help="print the table (and plots) of an earlier run")
    add_worker_arguments(parser)
    args = parser.parse_args()
    for name, value in TASKS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if ran_as_worker(args, run_worker):
        return
    if args.from_json:
        results = json.loads(args.from_json.read_text())["results"]
    else:
        # Methods run again replace their earlier result in --json; the others are kept.
        results = json.loads(args.json.read_text())["results"] if args.json and args.json.exists() else {}
        for method, result, seconds in in_own_processes(__file__, args.methods):
            key = f"{method}@{args.memory_budget // 2**20}MiB" if args.memory_budget else method
            key = f"{method}@untuned" if args.untuned else key
            key = f"{key}@plan" if args.plan_only else key
            key = f"{key}@{args.variant}" if args.variant else key
            results[key] = result
            print(f"{key}: {result.get('quality', result.get('memory_plan'))} ({seconds:.0f} s)", flush=True)
            if args.json:  # keep what is done if a later method fails
                record = {"machine": machine(), "args": vars(args), "results": results}
                args.json.write_text(json.dumps(record, indent=2, default=str))
    if args.plan_only:
        return
    print(table(results, args))
    if args.plots:
        plot(results, args, args.plots)


if __name__ == "__main__":
    main()
