"""Edge-LLM adaptive layer tuning vs stock peft LoRA: memory, step time and held-out loss.

Both runs use the same model, data, batch, sequence length, LoRA rank/targets, optimizer and
number of steps: (a) `peft.LoraConfig` + `transformers.Trainer` (full depth), (b) `EdgeLLMConfig`
+ `EdgeTrainer`. Each run is a separate process, so peak memory is its own.

    python benchmarks/tuning.py --model tiny --batch 16 --seq 512 --steps 12       # speed/memory, CPU
    python benchmarks/tuning.py --model smollm2 --batch 4 --seq 256 --steps 100    # quality, real model
    python benchmarks/tuning.py --model llama-1b --batch 8 --seq 1024 --steps 20   # speed/memory, GPU

Models other than `smollm2` have random weights: their losses mean nothing, only speed and memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import StepMeter, load_model, machine, measured, training_arguments

METHODS = ("lora", "edge")


def token_data(tokenizer, vocab_size: int, seq: int, train_rows: int, held_out_rows: int, seed: int):
    """(train, validation, test) datasets of `seq`-token rows. With a real tokenizer: Shakespeare's
    sonnets, training on 1-120 (random windows), validation 121-130 (fits weighted voting), test
    131-154. Random tokens otherwise."""
    from datasets import Dataset

    from edge_llm.data import sonnets

    generator = torch.Generator().manual_seed(seed)
    if tokenizer is not None:

        def ids(part: list[str]) -> torch.Tensor:
            return tokenizer("\n\n".join(part), return_tensors="pt").input_ids[0]

        def windows(stream: torch.Tensor) -> torch.Tensor:
            return stream[: (len(stream) // seq) * seq].view(-1, seq)[:held_out_rows]

        train_ids = ids(sonnets("train"))
        starts = torch.randint(0, len(train_ids) - seq, (train_rows,), generator=generator)
        train = torch.stack([train_ids[s : s + seq] for s in starts.tolist()])
        validation, test = windows(ids(sonnets("validation"))), windows(ids(sonnets("test")))
    else:
        train = torch.randint(0, vocab_size, (train_rows, seq), generator=generator)
        validation = torch.randint(0, vocab_size, (held_out_rows, seq), generator=generator)
        test = torch.randint(0, vocab_size, (held_out_rows, seq), generator=generator)

    def as_dataset(rows: torch.Tensor) -> Dataset:
        return Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})

    return as_dataset(train), as_dataset(validation), as_dataset(test)


def _luc_policy(args: argparse.Namespace, num_layers: int):  # -> LUCPolicy | None
    from edge_llm.luc import CompressionMethod, LUCPolicy

    if args.luc_policy is not None:
        return LUCPolicy.load(args.luc_policy)
    if args.luc_uniform is not None:
        bits, sparsity = int(args.luc_uniform[0]), float(args.luc_uniform[1])
        return LUCPolicy([(bits, sparsity)] * num_layers, CompressionMethod(64, "rtn", "magnitude"))
    return None


def run_worker(args: argparse.Namespace) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    from edge_llm import EdgeLLMConfig, EdgeTrainer

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model, tokenizer = load_model(args.model, dtype, device)
    num_layers = model.config.num_hidden_layers
    train, validation, test = token_data(
        tokenizer, model.config.vocab_size, args.seq, args.steps * args.batch, args.eval_rows, args.seed
    )
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets, lora_dropout=0.0)
    if args.worker == "lora":
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        trainer_cls = Trainer
    else:
        policy = _luc_policy(args, num_layers)
        if policy is not None:
            from edge_llm.luc import compress_model

            calibration = torch.tensor(train["input_ids"][:8], device=device)
            compress_model(model, policy.layers, policy.method, calibration, policy.targets, progress=False)
        config = EdgeLLMConfig(
            exit_layers=args.exit_layers,
            backprop_depth=args.backprop_depth,
            exit_sampling=args.exit_sampling,
            window_input=args.window_input,
            exit_head=args.exit_head,
            voting=args.voting,
            **lora,
        )
        model = get_peft_model(model, config)
        trainer_cls = EdgeTrainer
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = training_arguments(output_dir, args, optim="adamw_torch", bf16=cuda, use_cpu=not cuda)
        meter = StepMeter(model)
        trainer = measured(trainer_cls, meter)(
            model=model, args=training_args, train_dataset=train, eval_dataset=validation, callbacks=[meter]
        )
        trainer.train()  # with voting="weighted", EdgeTrainer fits the exit weights on `validation`
        metrics = trainer.evaluate(eval_dataset=test)
        if args.save_adapters:
            model.save_pretrained(args.save_adapters / args.worker)
    result = meter.summary(args.warmup, args.batch * args.seq)
    result.update(
        method=args.worker,
        held_out_loss=metrics["eval_loss"],
        exit_losses={k: v for k, v in metrics.items() if k.startswith("eval_exit_") and k.endswith("_loss")},
        num_layers=num_layers,
        trainable_params=model.get_nb_trainable_parameters()[0],
    )
    if args.worker == "edge":
        edge = model.peft_config["default"]
        result.update(exit_layers=edge.exit_layers, backprop_depth=edge.backprop_depth, exit_weights=edge.exit_weights)
    return result


def format_table(results: dict[str, dict], args: argparse.Namespace) -> str:
    gib = 1024**3
    lora, edge = results["lora"], results["edge"]
    memory_name = "peak GPU memory (GiB)" if torch.cuda.is_available() else "peak RSS (GiB)"
    rows = [
        (memory_name, "peak_memory_bytes", gib, "{:.2f}"),
        ("memory in use before training (GiB)", "memory_before_training_bytes", gib, "{:.2f}"),
        ("training peak above that (GiB)", "training_peak_bytes", gib, "{:.3f}"),
        ("saved for backward (GiB)", "saved_for_backward_bytes", gib, "{:.3f}"),
        ("median step (s)", "median_step_s", 1, "{:.3f}"),
        ("step time over an exit cycle (s)", "mean_step_s", 1, "{:.3f}"),
        ("tokens/s", "tokens_per_s", 1, "{:.0f}"),
        ("held-out (test) loss", "held_out_loss", 1, "{:.4f}"),
    ]
    lines = [
        f"machine: {machine()}",
        f"model: {args.model} ({lora['num_layers']} layers), batch {args.batch}, seq {args.seq}, {args.steps} steps "
        f"({args.warmup} warm-up not timed), LoRA r={args.rank} on {','.join(args.targets)}, lr {args.lr}",
        (
            "edge-llm + LUC " + (str(args.luc_policy) if args.luc_policy else f"uniform {args.luc_uniform}") + "; "
            if args.luc_policy or args.luc_uniform
            else ""
        )
        + f"edge-llm: exits {edge['exit_layers']}, backprop depth {edge['backprop_depth']}, {args.exit_sampling} "
        f"exit sampling, window_input {args.window_input}, exit_head {args.exit_head}, voting {args.voting}"
        + (f" (weights {[round(w, 3) for w in edge['exit_weights']]})" if edge.get("exit_weights") else ""),
        "",
        "| | LoRA (full depth) | edge-llm | LoRA / edge-llm |",
        "|---|---|---|---|",
    ]
    for label, key, scale, fmt in rows:
        a, b = lora[key] / scale, edge[key] / scale
        ratio = f"{a / b:.2f}x" if b else "-"
        if key == "tokens_per_s":
            ratio = f"{b / a:.2f}x (edge faster)"
        elif key == "held_out_loss":
            ratio = f"{100 * (b - a) / a:+.1f}% (edge vs LoRA)"
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    if edge.get("step_s_by_exit"):
        per_exit = ", ".join(f"{e}: {v:.3f}" for e, v in edge["step_s_by_exit"].items())
        lines.append(f"\nedge-llm median step (s) per active exit: {per_exit}")
    if edge["exit_losses"]:
        per_exit = ", ".join(f"{k.split('_')[2]}: {v:.4f}" for k, v in edge["exit_losses"].items())
        lines.append(f"\nedge-llm held-out loss per exit: {per_exit}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, smollm2, smollm2-config or llama-1b")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the timing")
    parser.add_argument("--eval-rows", type=int, default=16, help="rows of the validation and test splits")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--exit-layers", type=int, nargs="+", help="default: exits tiling the model")
    parser.add_argument("--backprop-depth", type=int, default=None, help="default: a quarter of the layers")
    parser.add_argument("--exit-sampling", default="curriculum")
    parser.add_argument("--window-input", default="backbone")
    parser.add_argument("--exit-head", default="shared")
    parser.add_argument("--voting", default="weighted")
    parser.add_argument("--luc-policy", type=Path, help="full pipeline: compress the edge-llm model with this policy")
    parser.add_argument(
        "--luc-uniform",
        type=float,
        nargs=2,
        metavar=("BITS", "SPARSITY"),
        help="full pipeline with one setting for every layer (RTN, magnitude pruning)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--save-adapters", type=Path, help="save both trained adapters under this folder")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        args.out.write_text(json.dumps(run_worker(args)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for method in METHODS:
            out = Path(scratch) / f"{method}.json"
            command = [sys.executable, __file__, *sys.argv[1:], "--worker", method, "--out", str(out)]
            subprocess.run(command, check=True)
            results[method] = json.loads(out.read_text())
    print(format_table(results, args))
    if args.json:
        record = {"machine": machine(), "args": vars(args) | {"json": None}, **results}
        args.json.write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
