"""The commands behind `edge-llm`: profile, compress, tune, evaluate, export, demo.

`edge_llm_cli` (standard library only) parses and checks the command line, then calls `run`, which
imports what the command needs. See `edge_llm_cli` for the arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edge_llm._io import atomic_directory, atomic_write_text
from edge_llm._warnings import quiet_upstream_warnings
from edge_llm.data.loading import DATA_FORMATS
from edge_llm.evaluation import task_names
from edge_llm.export.gguf_load import gguf_model_file, load_gguf
from edge_llm.export.targets import EXPORT_TARGETS, GGUF_ADAPTERS
from edge_llm.luc.config import TARGETS as LUC_TARGETS
from edge_llm.luc.config import LUCConfig
from edge_llm.luc.gguf_sensitivity import SENSITIVITIES
from edge_llm.luc.method import GRIDS
from edge_llm.luc.profile import METRICS
from edge_llm.luc.prune import PRUNE_STRUCTURES, PRUNERS
from edge_llm.luc.quantize import QUANTIZERS
from edge_llm.scheduling.devices import BUILTIN_DEVICES
from edge_llm.tuner.config import WINDOW_INPUTS, EdgeLLMConfig
from edge_llm.tuner.exits import EXIT_SAMPLERS
from edge_llm.tuner.heads import EXIT_HEADS
from edge_llm.tuner.planning import PlanDoesNotFit
from edge_llm.tuner.voting import VOTING_RULES

logger = logging.getLogger("edge_llm.cli")


def _model_path(spec: str) -> str:
    # The front checked local folders exist; `smollm2` is the packaged model.
    if spec == "smollm2":
        from edge_llm.assets import smollm2_135m

        return str(smollm2_135m())
    return str(Path(spec).expanduser()) if spec.startswith("~") else spec


def _load(
    spec: str, adapter: str | None = None, trainable: bool = False, tokenizer_needed: bool = True
) -> tuple[Any, Any]:
    """The model (with `adapter`) and its tokenizer; without `tokenizer_needed`, None when the
    folder has none."""
    from transformers import AutoModelForCausalLM

    path = _model_path(spec)
    file = gguf_model_file(path)  # a llama.cpp file: its blocks kept as they are, the tokenizer from it
    tokenizer = _tokenizer(path, tokenizer_needed)
    model = AutoModelForCausalLM.from_pretrained(path) if file is None else load_gguf(file)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    return model.eval(), tokenizer


def _tokenizer(path: str | Path, needed: bool = True) -> Any:
    """The tokenizer of the model at `path` (a llama.cpp file's from the file); without `needed`,
    None when there is none."""
    from transformers import AutoTokenizer

    file = gguf_model_file(path)
    try:
        if file is None:
            return AutoTokenizer.from_pretrained(path)
        return AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except (OSError, ValueError, TypeError):
        if needed:
            raise
        return None


def _check_uncompressed(args: argparse.Namespace) -> None:
    if gguf_model_file(_model_path(args.model)) is not None:
        raise ValueError(
            f"{args.model} is a llama.cpp file, already compressed; `edge-llm {args.command}` needs the original "
            "model (a transformers folder)."
        )


def _luc_config(args: argparse.Namespace, texts: list[str], tokenizer: Any, **budget: Any) -> Any:
    from edge_llm.luc import LUCConfig

    return LUCConfig(
        dataset=texts,
        tokenizer=tokenizer,
        group_size=args.group_size,
        bits=tuple(args.bits),
        sparsities=tuple(args.sparsities),
        quant_algorithm=args.quant,
        quant_grid=args.grid,
        prune_method=args.prune,
        prune_structure=args.structure,
        metric=args.metric,
        num_samples=args.samples,
        seq_len=args.seq_len,
        **budget,
    )


# --------------------------------------------------------------------------- commands

# Files a command's output folder owns besides a model save's (`owned_by_model_save`): replacing an
# earlier output drops them; any other file there is the user's and is carried over.
_OWNED_FILES = {
    "compress": ("luc_policy.json", "gguf_policy.json", "model.gguf"),
    "tune": (
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter_model.bin",
        "README.md",
        "model.gguf",
        "gguf_policy.json",
    ),
}


def _output_folder(args: argparse.Namespace) -> Any:
    """`atomic_directory(args.out)` keeping the files of an earlier output that this command does not own."""
    from edge_llm.luc.saving import owned_by_model_save

    owned = _OWNED_FILES[args.command]
    return atomic_directory(args.out, carry_over=lambda name: not (owned_by_model_save(name) or name in owned))


def _profile(args: argparse.Namespace) -> int:
    from edge_llm.data.loading import load_rows, texts_of
    from edge_llm.luc import CompressionMethod, calibration_tokens, profile_sensitivity

    _check_uncompressed(args)
    model, tokenizer = _load(args.model)
    tokens = calibration_tokens(texts_of(load_rows(args.data)), tokenizer, args.samples, args.seq_len)
    method = CompressionMethod(args.group_size, args.quant, args.prune, args.structure, args.grid)
    profile = profile_sensitivity(model, tokens, tuple(args.bits), tuple(args.sparsities), method, args.metric)
    atomic_write_text(args.out, profile.to_json())
    print(f"sensitivity profile of {len(profile.damage)} layers x {len(profile.candidates)} settings -> {args.out}")
    return 0


def _compress_for_llama_cpp(args: argparse.Namespace) -> int:
    """`compress --target gguf`: one llama.cpp type per tensor, written as `model.gguf`."""
    from edge_llm.data.loading import load_rows, texts_of
    from edge_llm.export import write_gguf
    from edge_llm.luc import LUCConfig, apply_luc

    if args.profile:
        raise ValueError("--profile holds a per-layer profile for --target pytorch; --target gguf measures its own.")
    model, tokenizer = _load(args.model)
    budget = {"avg_bits": args.avg_bits, "weight_budget_bytes": args.weight_budget_bytes}
    if args.policy:  # a GGUF policy (gguf_policy.json of an earlier run): no profiling
        budget = {"policy": args.policy}
    elif all(value is None for value in budget.values()):
        budget = {}
    config = LUCConfig(
        target="gguf",
        avg_sparsity=args.avg_sparsity,
        dataset=texts_of(load_rows(args.data)) if args.data else None,
        tokenizer=tokenizer,
        sensitivity=args.sensitivity,
        num_samples=args.samples,
        seq_len=args.seq_len,
        gguf_speed=args.gguf_speed,
        gguf_max_slowdown=args.max_slowdown,
        **budget,
    )
    with _output_folder(args) as staging:  # an interrupted run leaves --out as it was
        policy = apply_luc(model, config)
        write_gguf(model, staging / "model.gguf", tokenizer)
        policy.save(staging / "gguf_policy.json")
    size = (Path(args.out) / "model.gguf").stat().st_size
    print(policy.summary())
    print(f"compressed for llama.cpp -> {args.out} (model.gguf: {size / 2**20:.1f} MiB; policy: gguf_policy.json)")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from edge_llm.data.loading import load_rows, texts_of
    from edge_llm.luc import LUCPolicy, LUCQuantizer, SensitivityProfile
    from edge_llm.luc.streaming import compress_checkpoint

    _check_uncompressed(args)
    if args.target == "gguf":
        return _compress_for_llama_cpp(args)
    given = LUCPolicy.load(args.policy) if args.policy else None
    # A given policy that needs no calibration (RTN without pruning, or with magnitude pruning)
    # needs no tokenizer either.
    needs_data = given is None or given.method.needs_calibration_for(s for _, s in given.layers)
    if args.layer_by_layer:
        model, tokenizer = None, _tokenizer(_model_path(args.model), needs_data)
    else:
        model, tokenizer = _load(args.model, tokenizer_needed=needs_data)
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
    with _output_folder(args) as staging:  # an interrupted run leaves --out as it was
        if model is None:
            compress_checkpoint(_model_path(args.model), staging, config)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        else:
            LUCQuantizer(model, tokenizer).quantize(save_dir=staging, config=config)
        policy = config.policy
        policy.save(staging / "luc_policy.json")
    size = sum(file.stat().st_size for file in Path(args.out).glob("model*.safetensors"))
    print(policy.summary())
    print(f"compressed model -> {args.out} (weights: {size / 2**20:.1f} MiB; policy: luc_policy.json)")
    return 0


def _tune(args: argparse.Namespace) -> int:
    if not args.compress_to_fit:
        return _tune_over(args, None)
    with tempfile.TemporaryDirectory(prefix="edge-llm-fit-") as tries:
        base = _base_that_fits(args, Path(tries))
        return _tune_over(argparse.Namespace(**{**vars(args), "model": str(base / "model.gguf")}), base)


def _tune_over(args: argparse.Namespace, base: Path | None) -> int:
    """`tune` over `args.model`; `base`: the folder of the base `--compress-to-fit` chose, whose
    model.gguf and gguf_policy.json go into --out beside the adapter."""
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, TrainingArguments, set_seed

    from edge_llm._memory import limit_allocator_reserve
    from edge_llm.data.loading import load_rows, training_dataset
    from edge_llm.trainer import EdgeTrainer

    if args.memory is not None:
        limit_allocator_reserve()  # before loading: what loading frees must not come back while training
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
    set_seed(args.seed)  # before the adapter is made: its initial weights are the seed's too
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
        memory_budget_bytes=args.memory,
    )
    if args.plan_only:
        with scratch:
            try:
                plan = trainer.plan()
            except PlanDoesNotFit as error:  # an answer, not a failure: said with its own status
                print(f"edge-llm tune: {error}", file=sys.stderr)
                return PLAN_DOES_NOT_FIT
        layers = model.get_base_model().config.num_hidden_layers
        answer = {"plan": plan.describe(), "estimated_peak_bytes": plan.estimated_peak_bytes}
        print(json.dumps({**answer, "backprop_depth": plan.backprop_depth, "layers": layers}))
        return 0
    with scratch:
        trainer.train()
        metrics = trainer.evaluate()
    with _output_folder(args) as staging:  # an interrupted save leaves --out as it was
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if base is not None:  # the base tuned over, to ship beside the adapter
            for name in ("model.gguf", "gguf_policy.json"):
                shutil.copyfile(base / name, staging / name)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items() if "loss" in k or "accuracy" in k}, indent=1))
    print(f"adapter -> {args.out}" + (" (with the base it was tuned over: model.gguf)" if base is not None else ""))
    return 0


# `tune --plan-only`'s exit status when nothing fits the budget (2: a mistake or a failure).
PLAN_DOES_NOT_FIT = 3
# Bits per weight `tune --compress-to-fit` tries for the base, most first: about Q8_0's down to
# Q4_0's (a small model's rows leave llama.cpp little below that).
FIT_BITS = (8.5, 6.5, 5.5, 4.5)
# What the measurements rank (docs/results.md, "the frontier" and "Planned to a budget"): the
# gradient window first — 8 of SmolLM2's 30 layers 0.635 on SciQ, 20 layers 0.725, all 30 0.730 —
# then the base's bits (a 6-bit base reached LoRA's 0.730, a 4.5-bit one 0.705). So the base is the
# one with the most bits whose plan trains at least this share of the layers; if none does, the
# one whose plan trains the most layers.
FIT_DEPTH = (2, 3)


def _base_that_fits(args: argparse.Namespace, folder: Path) -> Path:
    """The folder (model.gguf, gguf_policy.json) of `args.model` compressed by LUC for llama.cpp at
    the bits of `FIT_BITS` whose tuning plan within `args.memory` is best by `FIT_DEPTH`'s rule.
    Each try compresses and plans in a process of its own: this one must hold nothing but the run
    it plans, and the compression (calibration, the float model) is no part of the device's
    process. LUC's measured profile is kept in its cache, so every try after the first searches
    without measuring again."""
    _check_uncompressed(args)
    refusal, fitting = "", {}  # bits -> (folder, window depth)
    for bits in FIT_BITS:
        out = folder / f"{bits:g}-bits"
        logger.info(
            "--compress-to-fit: LUC for llama.cpp at %g bits per weight, then a plan to %d MiB",
            bits,
            args.memory // 2**20,
        )
        compress = ["compress", args.model, "--target", "gguf", "--avg-bits", f"{bits:g}", "--data", args.data]
        _child(args, [*compress, "--out", str(out)])
        changes = {"model": str(out / "model.gguf"), "out": None, "plan_only": True, "compress_to_fit": False}
        planned = _child(args, args.command_line(changes), check=False)
        if planned.returncode == PLAN_DOES_NOT_FIT:
            refusal = _last_line(planned.stderr)
            logger.info("--compress-to-fit: %g bits per weight do not fit: %s", bits, refusal)
            shutil.rmtree(out, ignore_errors=True)
            continue
        if planned.returncode != 0:
            raise ValueError(f"tune --plan-only over the {bits:g}-bit base: {_last_line(planned.stderr)}")
        answer = json.loads(_last_line(planned.stdout))
        logger.info("--compress-to-fit: %g bits per weight fit: %s", bits, answer["plan"])
        fitting[bits] = (out, answer["backprop_depth"])
        part, whole = FIT_DEPTH
        if answer["backprop_depth"] * whole >= part * answer["layers"]:
            return out
    if not fitting:
        raise ValueError(f"--compress-to-fit: not even a {FIT_BITS[-1]:g}-bit base fits --memory: {refusal}")
    bits = max(fitting, key=lambda b: (fitting[b][1], b))
    logger.info("--compress-to-fit: no base leaves a window of two thirds of the layers; the deepest: %g bits", bits)
    return fitting[bits][0]


def _child(args: argparse.Namespace, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """`edge-llm ARGV` in a process of its own (its output captured); with `check`, its error line
    raised as a ValueError."""
    command = [sys.executable, "-m", "edge_llm_cli", *(["--verbose"] if args.verbose else []), *argv]
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ValueError(f"{' '.join(argv[:2])}: {_last_line(done.stderr)}")
    return done


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _evaluate(args: argparse.Namespace) -> int:
    from edge_llm.data.loading import load_rows, texts_of
    from edge_llm.evaluation import multiple_choice_accuracy, perplexity, task_items
    from edge_llm.luc import calibration_tokens

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
    from edge_llm.export import EXPORT_TARGETS, export
    from edge_llm.scheduling import DeviceProfile, Workload, builtin_device, profile_this_machine, schedule

    for target in args.target:  # a missing runtime package is said before minutes of loading and scheduling
        EXPORT_TARGETS[target].available()
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
    if "gguf" in args.target:
        options["gguf"] = {"adapters": "merged" if args.merge else args.gguf_adapters}
        if args.model == "smollm2":
            from edge_llm.assets import smollm2_135m_gguf

            options["gguf"]["reference_gguf"] = smollm2_135m_gguf()
        elif (file := gguf_model_file(args.model)) is not None:  # its tokenizer copied as the file holds it
            options["gguf"]["reference_gguf"] = file
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


# --------------------------------------------------------------------------- running


COMMANDS = {
    "profile": _profile,
    "compress": _compress,
    "tune": _tune,
    "evaluate": _evaluate,
    "export": _export,
    "demo": _demo,
}


def run(args: argparse.Namespace) -> int:
    """Run a command whose arguments `edge_llm_cli` parsed and checked; errors are one line, status 2."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("transformers", "peft", "accelerate", "datasets", "httpx", "huggingface_hub", "gguf"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        with quiet_upstream_warnings():
            return COMMANDS[args.command](args)
    except (ValueError, ImportError, OSError, KeyError, RuntimeError) as error:
        if args.verbose:
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"edge-llm {args.command}: error: {message}", file=sys.stderr)
        return 2


def cli_choices() -> dict[str, Any]:
    """What the command line offers that edge-llm's registries and configs own: the snapshot the
    light front (`edge_llm_cli`) reads from its `choices.json` without importing them."""
    luc = {name: p.default for name, p in inspect.signature(LUCConfig.__init__).parameters.items()}
    tuning = {name: f.default for name, f in EdgeLLMConfig.__dataclass_fields__.items()}
    return {
        "luc_defaults": {
            "group_size": luc["group_size"],
            "quant_algorithm": luc["quant_algorithm"],
            "quant_grid": luc["quant_grid"],
            "prune_method": luc["prune_method"],
            "prune_structure": luc["prune_structure"],
            "bits": list(luc["bits"]),
            "sparsities": list(luc["sparsities"]),
            "metric": luc["metric"],
            "num_samples": luc["num_samples"],
            "seq_len": luc["seq_len"],
            "avg_bits": luc["avg_bits"],
            "target": luc["target"],
            "sensitivity": luc["sensitivity"],
            "gguf_max_slowdown": luc["gguf_max_slowdown"],
        },
        "luc_targets": list(LUC_TARGETS),
        "sensitivities": list(SENSITIVITIES),
        "quant_methods": list(QUANTIZERS),
        "quant_grids": list(GRIDS),
        "prune_methods": list(PRUNERS),
        "prune_structures": list(PRUNE_STRUCTURES),
        "metrics": list(METRICS),
        "tuning_defaults": {
            name: tuning[name] for name in ("r", "exit_sampling", "window_input", "voting", "exit_head")
        },
        "exit_samplers": list(EXIT_SAMPLERS),
        "window_inputs": list(WINDOW_INPUTS),
        "voting_rules": list(VOTING_RULES),
        "exit_heads": list(EXIT_HEADS),
        "devices": list(BUILTIN_DEVICES),
        "export_targets": {t.name: f"{t.filename}, {t.runtime}" for t in EXPORT_TARGETS.values()},
        "gguf_adapters": list(GGUF_ADAPTERS),
        "data_formats": list(DATA_FORMATS),
        "tasks": task_names(),
    }


def write_choices() -> Path:
    """Write `cli_choices()` into the front's `choices.json` (after changing a registry or default)."""
    # Found, not imported: the front imports this module to run commands.
    path = Path(importlib.util.find_spec("edge_llm_cli").origin).with_name("choices.json")
    atomic_write_text(path, json.dumps(cli_choices(), indent=1) + "\n")
    return path


__all__ = ["COMMANDS", "cli_choices", "run", "write_choices"]
