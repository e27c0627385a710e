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
from edge_llm.export.gguf_lora import write_gguf_lora
from edge_llm.export.weights import adapter_names


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


GGUF_ADAPTERS = ("separate", "merged")


def _gguf(
    model: nn.Module, path: Path, tokenizer: Any, schedule: Any, adapters: str = "separate", **options: Any
) -> Path:
    """`model.gguf`; with `adapters="separate"` (the default) the base's stored codes unchanged and
    each LoRA adapter beside it as `adapter-<name>.gguf` (llama.cpp's `--lora`): exactly the
    weights that were tuned. `"merged"` folds the adapter into `model.gguf` (re-rounded), as does
    a bundle whose adapters are merged (`merge_adapters=True`)."""
    if adapters not in GGUF_ADAPTERS:
        raise ValueError(f"target_options['gguf']['adapters'] is {adapters!r}; use one of {GGUF_ADAPTERS}.")
    names = adapter_names(model) if adapters == "separate" and _unmerged_lora(model) else []
    written = write_gguf(model, path, tokenizer=tokenizer, schedule=schedule, fold_adapters=not names, **options)
    for name in names:
        write_gguf_lora(model, path.with_name(f"adapter-{name}.gguf"), name)
    return written


def _unmerged_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) and not m.merged for m in model.modules())


def _executorch(model: nn.Module, path: Path, tokenizer: Any, schedule: Any, **options: Any) -> Path:
    # The program's KV cache holds the scheduled workload: its prompt and the tokens it generates.
    options.setdefault("max_seq_len", schedule.workload.prompt_tokens + max(schedule.workload.decode_tokens, 1))
    return write_pte(model, path, **options)


EXPORT_TARGETS: Registry[ExportTarget] = Registry("export target")
EXPORT_TARGETS.register(ExportTarget("gguf", "model.gguf", "llama.cpp", _gguf))
EXPORT_TARGETS.register(
    ExportTarget("executorch", "model.pte", "ExecuTorch (XNNPACK)", _executorch, require_executorch)
)
