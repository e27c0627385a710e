"""Shared pieces of the benchmark scripts: models by name, data, and step/memory measurement."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
    TrainingArguments,
)

from edge_llm._memory import peak_resident_bytes, release_freed_memory, reset_peak_resident, resident_bytes

# Model specs by name. "smollm2" is the real pretrained model (offline, see edge_llm.assets); the
# others are configs with random weights, fine for speed and memory, never for quality.
CONFIGS = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
    ),
    "smollm2-config": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}


def load_model(name: str, dtype: torch.dtype, device: str):
    """Returns (model, tokenizer or None)."""
    if name == "smollm2":
        from edge_llm.assets import smollm2_135m

        path = smollm2_135m()
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device), AutoTokenizer.from_pretrained(path)
    if name not in CONFIGS:
        raise SystemExit(f"unknown model {name!r}; choose from smollm2, {', '.join(CONFIGS)}")
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **CONFIGS[name])
    with torch.device(device):  # initialised where it runs: a 1B model in seconds on a GPU
        return LlamaForCausalLM(config).to(dtype=dtype), None


def training_arguments(output_dir: str, args, **overrides) -> TrainingArguments:
    """The Trainer settings every benchmark run shares (constant lr, no checkpoints, no reports)."""
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=max(args.steps // 10, 1),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        disable_tqdm=True,
        **overrides,
    )


def spread(values: list[float], digits: int = 2) -> str:
    """Repeated measurements as `median [min–max]`."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {cores} cores, torch {torch.__version__} threads={torch.get_num_threads()}"


class _Saved:
    """What autograd keeps for one saved tensor; alive exactly as long as autograd holds it."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class StepMeter(TrainerCallback):
    """Times every optimizer step and measures peak memory and bytes saved for backward.

    Bytes saved for backward: the unique storages that autograd still holds for the backward pass
    when the forward pass (loss included) is done, excluding the model's parameters, peaked over
    steps. Tensors saved by short-lived local graphs (e.g. inside a chunked loss) are gone by then
    and not counted. Call `forward_done()` between forward and backward (see `measured`).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.step_seconds: list[float] = []
        self.step_exits: list[int | None] = []
        self.current_exit: int | None = None
        self.saved_bytes: list[int] = [0]
        self._stack: contextlib.ExitStack | None = None
        self._saved: weakref.WeakSet[_Saved] = weakref.WeakSet()
        self.peak_bytes = 0
        self.baseline_bytes = 0

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        saved = _Saved(tensor)
        self._saved.add(saved)
        return saved

    def forward_done(self) -> None:
        storages = {}
        for saved in list(self._saved):
            storage = saved.tensor.untyped_storage()
            if storage.data_ptr() not in self.param_storages:
                storages[storage.data_ptr()] = storage.nbytes()
        self.saved_bytes.append(sum(storages.values()))

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_bytes = torch.cuda.memory_allocated()
        else:
            # Hand memory freed before training (e.g. float32 weights LUC replaced) back to the OS
            # first: glibc keeps it mapped, and training would reuse it without raising the RSS.
            release_freed_memory()
            reset_peak_resident()
            self.baseline_bytes = resident_bytes()

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._saved = weakref.WeakSet()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor))
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - self._start)
        self.step_exits.append(self.current_exit)
        self._stack.close()

    def on_train_end(self, args, state, control, **kwargs):
        self.peak_bytes = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_resident_bytes()

    def summary(self, warmup: int, tokens_per_step: int) -> dict:
        """Step times after `warmup` steps. With exits, steps cost differently per exit: the cost of
        a whole cycle of exits is the mean of each exit's median step, which is what a run that
        visits every exit equally often averages to; without exits it is the median step."""
        timed = self.step_seconds[warmup:] or self.step_seconds
        by_exit: dict[int, list[float]] = {}
        for seconds, exit_layer in list(zip(self.step_seconds, self.step_exits, strict=True))[warmup:]:
            if exit_layer is not None:
                by_exit.setdefault(exit_layer, []).append(seconds)
        per_exit = {e: statistics.median(t) for e, t in sorted(by_exit.items())}
        # Medians on both sides: a step slowed down by the machine should not move the comparison.
        cycle = statistics.fmean(per_exit.values()) if per_exit else statistics.median(timed)
        return {
            "median_step_s": statistics.median(timed),
            "mean_step_s": cycle,
            "step_s_by_exit": per_exit,
            "tokens_per_s": tokens_per_step / cycle,
            "peak_memory_bytes": self.peak_bytes,
            "memory_before_training_bytes": self.baseline_bytes,
            "training_peak_bytes": self.peak_bytes - self.baseline_bytes,
            "saved_for_backward_bytes": max(self.saved_bytes),
        }


def measured(trainer_cls: type, meter: StepMeter) -> type:
    """`trainer_cls` that tells `meter` each step's active exit and when each training forward pass
    (loss included) is done."""

    class Measured(trainer_cls):
        def training_step(self, *args, **kwargs):
            meter.current_exit = self.current_exit() if hasattr(self, "current_exit") else None
            return super().training_step(*args, **kwargs)

        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            if self.model.training:
                meter.forward_done()
            return loss

    return Measured


def add_worker_arguments(parser) -> None:
    """The hidden arguments of a method's own process (see `in_own_processes`)."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)


def ran_as_worker(args, run_worker) -> bool:
    """In a method's own process: run it, write its result to `--out`, and say so."""
    logging.basicConfig(level=logging.WARNING)
    if not args.worker:
        return False
    args.out.write_text(json.dumps(run_worker(args), default=str))
    return True


def in_own_processes(script: str, methods: list[str]):
    """Run `script` again with this command line plus `--worker METHOD --out FILE` for each method,
    each in its own process (no method's memory carries into the next); yields (method, result,
    seconds)."""
    with tempfile.TemporaryDirectory() as scratch:
        for method in methods:
            out = Path(scratch) / f"{method}.json"
            started = time.perf_counter()
            subprocess.run([sys.executable, script, *sys.argv[1:], "--worker", method, "--out", str(out)], check=True)
            yield method, json.loads(out.read_text()), time.perf_counter() - started
