"""`edge_llm.export(model, schedule, out_dir)`: a self-describing bundle for edge runtimes.

out_dir/
  manifest.json       format, version, files with sizes and SHA-256, exits, voting, policy
  schedule.json       the device schedule (schema: schemas/schedule.schema.json)
  config.json         the transformers config (its quantization_config holds the LUC policy)
  model.safetensors   the weights as LUC stores them (packed codes, scales, masks), adapters
                      merged into them when `merge_adapters=True`
  adapter/            the Edge-LLM adapter (peft format); merged: only its exit heads
  tokenizer files     when a tokenizer is given
  model.gguf          with `targets=["gguf"]`: the same model for llama.cpp (see `gguf.py`): the
                      base, its codes unchanged, with each adapter beside it as
                      adapter-<name>.gguf (see `gguf_lora.py`; `{"gguf": {"adapters": "merged"}}`
                      folds them in instead)
  model.pte           with `targets=["executorch"]`: the same model for ExecuTorch (see `executorch.py`)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from edge_llm._io import atomic_directory
from edge_llm._version import __version__
from edge_llm.export.targets import EXPORT_TARGETS, ExportTarget
from edge_llm.export.weights import adapter_names
from edge_llm.luc.facts import layer_setting, policy_of
from edge_llm.modeling import find_decoder_parts
from edge_llm.scheduling.scheduler import Schedule
from edge_llm.tuner.model import edge_config_of

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "edge-llm/bundle"
BUNDLE_VERSION = 1
# Files every bundle has; `verify_bundle` refuses a manifest that does not list them.
REQUIRED_FILES = ("model.safetensors", "config.json", "schedule.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_schedule_matches(base: nn.Module, schedule: Schedule, fix: str = "schedule the model you export") -> None:
    """Refuse a schedule made for other layers than `base`'s (count, bits, sparsity)."""
    layers = list(find_decoder_parts(base).layers(base))
    if len(layers) != len(schedule.layers):
        raise ValueError(f"The schedule plans {len(schedule.layers)} layers but the model has {len(layers)}: {fix}.")
    for plan, layer in zip(schedule.layers, layers, strict=True):
        bits, sparsity = layer_setting(layer)
        if (plan.bits, plan.sparsity) != (bits, sparsity):
            raise ValueError(
                f"The schedule was made for layer {plan.layer} at {plan.bits} bits / sparsity {plan.sparsity}, but the "
                f"model's layer has {bits} bits / sparsity {sparsity}: {fix}."
            )


def base_state_dict(base: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The base model's tensors under their transformers names (LoRA wrappers and weights removed).

    With `dtype`, float32/float64 tensors (what LUC left uncompressed: embeddings, norms, biases) are
    cast to it; LUC's own tensors (packed codes, masks, float16 scales) are stored as they are.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter_prefixes = set()
    for name, module in base.named_modules():
        if isinstance(module, BaseTunerLayer):
            adapter_prefixes.update(f"{name}.{child}" for child, _ in module.named_children() if child != "base_layer")
    state = {}
    for key, tensor in base.state_dict().items():
        if any(key == p or key.startswith(p + ".") for p in adapter_prefixes):
            continue
        tensor = tensor.detach()
        if dtype is not None and tensor.dtype in (torch.float32, torch.float64):
            tensor = tensor.to(dtype)
        state[key.replace(".base_layer.", ".")] = tensor.contiguous().clone()
    # Tied weights are stored once, as transformers does.
    for tied in getattr(base, "_tied_weights_keys", None) or {}:
        if base.config.tie_word_embeddings and tied in state:
            del state[tied]
    return state


def export(
    model: nn.Module,
    schedule: Schedule,
    out_dir: str | Path,
    merge_adapters: bool = False,
    tokenizer: Any = None,
    targets: Sequence[str] = (),
    target_options: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` (LUC-compressed, with or without an Edge-LLM adapter) and `schedule` as a bundle.

    Refuses to write into a non-empty `out_dir`; `overwrite=True` replaces an existing bundle there
    as a whole (a non-empty folder that is not a bundle is always refused). The bundle is written
    into a new folder beside `out_dir` and switched in only when complete, so an interrupted export
    leaves the previous bundle as it was. `targets` also lowers the model for runtimes named in
    `EXPORT_TARGETS`: "gguf" (`model.gguf`, llama.cpp) and "executorch" (`model.pte`, ExecuTorch with
    XNNPACK); `target_options` passes each its own keyword arguments, e.g.
    `{"gguf": {"reference_gguf": path}, "executorch": {"max_seq_len": 1024}}` (see `write_gguf` and
    `write_pte`). With `dtype` (e.g. `torch.bfloat16` for a model tuned in float32 on a CPU) the
    float32 tensors LUC left uncompressed (embeddings, norms) are stored in it; the default keeps
    them as they are.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose a new directory or pass overwrite=True.")
        if not (out / "manifest.json").is_file():
            raise FileExistsError(
                f"{out} is not empty and is not an edge-llm bundle; overwrite=True only replaces a bundle. "
                "Choose a new directory."
            )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    edge_config = edge_config_of(model)
    if hasattr(model, "peft_config"):
        adapter_names(model)  # each saved in a folder of its name, inside the bundle
    check_schedule_matches(base, schedule)
    lowerings = _lowerings(targets, target_options)
    if merge_adapters and any(options.get("adapters") == "separate" for _, options in lowerings):
        raise ValueError(
            "merge_adapters=True merges the adapters into the weights, so none is left to write apart: drop "
            "target_options' adapters='separate', or merge_adapters."
        )
    if edge_config is not None and schedule.voting != edge_config.voting:
        raise ValueError(
            f"The schedule votes with {schedule.voting!r} but the adapter with {edge_config.voting!r}; a bundle has "
            "one voting rule: schedule the adapted model as it is."
        )
    with atomic_directory(out, overwrite=overwrite) as staging:
        _write_bundle(staging, model, base, edge_config, schedule, merge_adapters, tokenizer, lowerings, dtype)
    logger.info("Exported bundle to %s", out)
    return out


def _lowerings(
    targets: Sequence[str], target_options: Mapping[str, Mapping[str, Any]] | None
) -> list[tuple[ExportTarget, dict[str, Any]]]:
    """The export targets asked for, each with its options; unknown names refused before any work."""
    if isinstance(targets, str):
        raise TypeError(f"targets must be a list of target names, e.g. [{targets!r}], not a string.")
    chosen = [EXPORT_TARGETS.lookup(name) for name in dict.fromkeys(targets)]
    for target in chosen:
        target.available()
    options = dict(target_options or {})
    for name in options:
        if name not in {target.name for target in chosen}:
            raise ValueError(f"target_options names {name!r}, which is not among the targets {list(targets)}.")
    return [(target, dict(options.get(target.name, {}))) for target in chosen]


def _write_bundle(
    out: Path,
    model: nn.Module,
    base: nn.Module,
    edge_config: Any,
    schedule: Schedule,
    merge_adapters: bool,
    tokenizer: Any,
    lowerings: list[tuple[ExportTarget, dict[str, Any]]],
    dtype: torch.dtype | None,
) -> None:
    merged = False
    if edge_config is not None and merge_adapters:
        model.merge_adapter()
        merged = True
    try:
        save_file(base_state_dict(base, dtype), out / "model.safetensors", metadata={"format": "pt"})
        for target, options in lowerings:
            target.write(model, out / target.filename, tokenizer, schedule, **options)
    finally:
        if merged:
            model.unmerge_adapter()
    base.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if edge_config is not None:
        adapter_dir = out / "adapter"
        model.save_pretrained(adapter_dir)
        if merged:  # the LoRA deltas live in model.safetensors; keep only the exit heads
            _keep_only_exit_heads(adapter_dir)
    schedule.save(out / "schedule.json")
    _write_manifest(out, base, edge_config, merged)


def _keep_only_exit_heads(adapter_dir: Path) -> None:
    """Strip the LoRA weights from a merged bundle's adapter; zero-initialised ones replace them."""
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if "exit_heads" in k}
    save_file(tensors, weights, metadata={"format": "pt"})
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["init_lora_weights"] = True  # LoRA B starts at zero: the missing LoRA weights add nothing
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _write_manifest(out: Path, base: nn.Module, edge_config: Any, merged: bool) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    policy = policy_of(base)
    policy = policy.to_dict() if policy is not None else None
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "created_with": f"edge-llm {__version__}",
        "model_type": base.config.model_type,
        "policy": policy,
        "adapter": None
        if edge_config is None
        else {
            "merged": merged,
            "exits": list(edge_config.exit_layers),
            "voting": edge_config.voting,
            "exit_weights": edge_config.exit_weights,
            "window_input": edge_config.window_input,
        },
        "files": {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Check a bundle's manifest and every file's size and SHA-256; returns the manifest."""
    root = Path(path)
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{root} has no manifest.json: it is not an edge-llm bundle.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{manifest_path} is corrupt: {error}") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{root} is not an edge-llm bundle (format {manifest.get('format')!r}).")
    if manifest.get("version") != BUNDLE_VERSION:
        raise ValueError(
            f"Bundle format version {manifest.get('version')!r} is not supported (this edge-llm reads version "
            f"{BUNDLE_VERSION})."
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ValueError(f"{manifest_path} lists no files: the bundle is incomplete; export it again.")
    inside = root.resolve()
    for name, entry in files.items():
        file = (root / name).resolve()
        # A manifest names files of its own bundle only: no absolute paths, no way out through "..".
        if Path(name).is_absolute() or not file.is_relative_to(inside):
            raise ValueError(f"{manifest_path} names {name!r}, which is outside the bundle; refusing it.")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("bytes"), int)
            or not isinstance(entry.get("sha256"), str)
            or len(entry["sha256"]) != 64
        ):
            raise ValueError(
                f"{manifest_path}: the entry of {name!r} needs an integer 'bytes' and a SHA-256 hex digest."
            )
        if not file.is_file():
            raise ValueError(f"Bundle file {name} is missing.")
        if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            raise ValueError(f"Bundle file {name} does not match its manifest (corrupt or modified).")
    listed = {(root / name).resolve() for name in files}
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"):
        if file.resolve() not in listed:
            raise ValueError(
                f"Bundle file {file.relative_to(root)} is not in the manifest, so it cannot be verified: remove it "
                "or export the bundle again."
            )
    for required in REQUIRED_FILES:
        if required not in files:
            raise ValueError(f"{manifest_path} does not list {required}: the bundle is incomplete; export it again.")
    return manifest
