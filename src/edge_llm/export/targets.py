"""The runtimes a bundle can also be lowered for, one entry each: `export(..., targets=[name])`
writes each target's file into the bundle, where the manifest lists and verifies it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from edge_llm._registry import Registry
from edge_llm.export.executorch import require_executorch, write_pte
from edge_llm.export.gguf import write_gguf


@dataclass(frozen=True)
class ExportTarget:
    """A runtime format: the file it writes in the bundle and how (`write(model, path, tokenizer,
    schedule, **options)`; options are the target's own keyword arguments, from `target_options`);
    `available` raises, naming what to install, when the target cannot run here."""

    name: str
    filename: str
    runtime: str
    write: Callable[..., Path]
    available: Callable[[], None] = lambda: None


def _gguf(model: nn.Module, path: Path, tokenizer: Any, schedule: Any, **options: Any) -> Path:
    return write_gguf(model, path, tokenizer=tokenizer, schedule=schedule, **options)


def _executorch(model: nn.Module, path: Path, tokenizer: Any, schedule: Any, **options: Any) -> Path:
    # The program's KV cache holds the scheduled workload: its prompt and the tokens it generates.
    options.setdefault("max_seq_len", schedule.workload.prompt_tokens + max(schedule.workload.decode_tokens, 1))
    return write_pte(model, path, **options)


EXPORT_TARGETS: Registry[ExportTarget] = Registry("export target")
EXPORT_TARGETS.register(ExportTarget("gguf", "model.gguf", "llama.cpp", _gguf))
EXPORT_TARGETS.register(
    ExportTarget("executorch", "model.pte", "ExecuTorch (XNNPACK)", _executorch, require_executorch)
)
