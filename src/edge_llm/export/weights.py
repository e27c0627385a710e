"""What an export target reads off an (LUC-compressed, Edge-LLM-adapted) model: the float weight a
Linear computes with, which LoRA updates fold into it, each decoder layer's LUC bit-width, and which
layers carry their adapter in a single-stream runtime. GGUF and ExecuTorch lower the same facts."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from edge_llm.luc.ggml_linear import GGMLLinear
from edge_llm.luc.linear import LUCLinear
from edge_llm.tuner.exits import window


def base_layer(module: nn.Module) -> nn.Module:
    """The Linear under a LoRA wrapper (or `module` itself)."""
    from peft.tuners.lora import LoraLayer

    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def folded_adapters(module: nn.Module, with_adapter: bool) -> list[str]:
    """The LoRA adapters of `module` whose update the exported weight must include (none if merged)."""
    from peft.tuners.lora import LoraLayer

    if not with_adapter or not isinstance(module, LoraLayer) or module.disable_adapters or module.merged:
        return []
    return [adapter for adapter in module.active_adapters if adapter in module.lora_A]


@torch.no_grad()
def effective_weight(module: nn.Module, with_adapter: bool = True) -> torch.Tensor:
    """The dense float32 weight a (possibly LoRA-wrapped, possibly LUC-compressed) Linear computes with."""
    base = base_layer(module)
    if isinstance(base, LUCLinear):
        weight = base.dequantize_weight(torch.float32)
    elif isinstance(base, GGMLLinear):
        weight = base.dense_weight()
    else:
        weight = base.weight.detach().float()
    for adapter in folded_adapters(module, with_adapter):
        weight = weight + module.get_delta_weight(adapter).float()
    return weight


def adapted_layers(edge_config: Any, num_layers: int) -> set[int]:
    """The decoder layers whose adapter a single-stream runtime (the last exit) computes with: every
    layer with `window_input="adapted"`; with `"backbone"` only the last exit's window, because the
    layers below it are the backbone as that exit sees them."""
    if edge_config is not None and edge_config.window_input == "backbone":
        return set(window(edge_config.exit_layers[-1], edge_config.backprop_depth))
    return set(range(num_layers))


# A name that is safe as a file name: no separators, no "..", no leading dot.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def adapter_names(model: nn.Module) -> list[str]:
    """The LoRA adapters of a PeftModel, each with a name usable as a file name."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise ValueError(
            "The model has no adapter to export: pass a PeftModel (get_peft_model, PeftModel.from_pretrained)."
        )
    for name in configs:
        if not ADAPTER_NAME.fullmatch(name) or ".." in name:
            raise ValueError(
                f"Adapter name {name!r} cannot name a file: use letters, digits, '_', '-' and '.' "
                "(model.load_adapter(path, adapter_name=...))."
            )
    return list(configs)
