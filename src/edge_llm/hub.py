"""Push Edge-LLM adapters and LUC-compressed models to the Hugging Face Hub with a model card that
says what they are and how to load them (`import edge_llm` first)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from edge_llm._io import atomic_write_text
from edge_llm._version import __version__
from edge_llm.luc.facts import policy_of
from edge_llm.tuner.model import edge_config_of

logger = logging.getLogger(__name__)


def model_card(model: nn.Module, repo_id: str) -> str:
    """A README.md (with YAML metadata) for an Edge-LLM adapter or a LUC-compressed model."""
    edge = edge_config_of(model)
    policy = policy_of(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base_name = getattr(edge, "base_model_name_or_path", None) or getattr(base.config, "_name_or_path", "") or ""
    tags = (
        ["edge-llm"]
        + (["peft", "lora", "early-exit"] if edge else [])
        + (["luc", "quantized", "pruned"] if policy else [])
    )
    front = ["---", f"library_name: {'peft' if edge else 'transformers'}", "tags:"] + [f"- {t}" for t in tags]
    if base_name and not Path(base_name).exists():
        front.append(f"base_model: {base_name}")
    front.append("---")
    lines = [*front, "", f"# {repo_id}", ""]
    if edge:
        what = "an Edge-LLM adapter (LoRA with early exits and exit voting)"
        if policy:
            what += " for a LUC-compressed base model (its policy is below)"
    else:
        what = "a LUC-compressed model (per-layer quantization and pruning)" if policy else "a model"
    lines.append(
        f"This repository holds {what}, made with edge-llm {__version__} (Edge-LLM: Yu et al., "
        "DAC 2024, arXiv 2406.15758)."
    )
    lines += [
        "",
        "## Load it",
        "",
        "```python",
        "import edge_llm  # registers the EDGE_LLM PEFT method and the LUC quantizer",
    ]
    if edge:
        lines += [
            "from peft import AutoPeftModelForCausalLM",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        ]
    lines += [
        "```",
        "",
        "Without `import edge_llm` loading fails: peft does not know the `EDGE_LLM` method, and "
        "transformers refuses the packed LUC weights.",
        "",
    ]
    if edge:
        weights = edge.exit_weights or [None] * len(edge.exit_layers)
        lines += [
            "## Exits and voting",
            "",
            f"- exits after decoder layers {list(edge.exit_layers)}; backprop depth {edge.backprop_depth}; "
            f"window input `{edge.window_input}`; exit heads `{edge.exit_head}`",
            f"- voting: `{edge.voting}`" + (" with fitted weights:" if edge.exit_weights else ""),
            "",
        ]
        if edge.exit_weights:
            lines += ["| exit layer | weight |", "|---|---|"]
            lines += [f"| {layer} | {weight:.3f} |" for layer, weight in zip(edge.exit_layers, weights, strict=True)]
            lines.append("")
        lines += [f"- LoRA: r={edge.r}, alpha={edge.lora_alpha}, targets {sorted(edge.target_modules)}", ""]
    if policy:
        layers = policy.layers
        method = policy.method
        settings: dict[tuple[int, float], list[int]] = {}
        for index, layer in enumerate(layers):
            settings.setdefault(tuple(layer), []).append(index)
        lines += [
            "## LUC policy",
            "",
            f"{method.quant_method.upper()} quantization in groups of {method.group_size}, "
            f"{method.prune_method} pruning ({method.prune_structure}).",
            "",
            "| bits | sparsity | decoder layers |",
            "|---|---|---|",
        ]
        lines += [f"| {b} | {s:.2f} | {', '.join(map(str, idx))} |" for (b, s), idx in sorted(settings.items())]
        mean_bits = sum(bits for bits, _ in layers) / len(layers)
        mean_sparsity = sum(sparsity for _, sparsity in layers) / len(layers)
        lines += ["", f"Mean over layers: {mean_bits:.2f} bits, sparsity {mean_sparsity:.2f}.", ""]
    return "\n".join(lines)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    tokenizer: Any = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload with edge-llm",
) -> Any:
    """Save `model` (an Edge-LLM PeftModel: the adapter; a LUC model: the compressed checkpoint)
    with its model card and upload it to `repo_id`. Returns the commit info."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        atomic_write_text(Path(folder) / "README.md", model_card(model, repo_id))
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    logger.info("Pushed to %s", repo_id)
    return info
