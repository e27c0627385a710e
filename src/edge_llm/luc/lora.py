"""LoRA adapters over compressed layers (`LUCLinear`, `GGMLLinear`): higher-precision adapters on a
frozen compressed base, as QLoRA does over 4-bit weights. The base keeps only its stored bytes;
each call decodes its weight (and decodes it again in backward rather than saving it).

`EdgeLLMConfig` registers this layer with peft automatically; for a plain `peft.LoraConfig` call
`config._register_custom_module(edge_llm.luc.lora.CUSTOM_MODULES)` before `get_peft_model`.

Merging decodes the base weight, adds the LoRA update and stores it again in the layer's own format
(`requantize_`: LUC's bits, groups and mask; or the llama.cpp block type), so a merged layer stays
compressed; the original bytes are kept to unmerge exactly. To ship an adapter without re-rounding
the base, export it on its own (`edge_llm.export.gguf_lora`).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from edge_llm.luc.ggml_linear import GGMLLinear
from edge_llm.luc.linear import LUCLinear


class CompressedLoraLinear(nn.Module, LoraLayer):
    """LoRA on a compressed base layer (any layer with `dense_weight(dtype)` and `requantize_`)."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1, **kwargs: Any
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError("DoRA is not supported on compressed layers; set use_dora=False.")
        self._active_adapter = adapter_name
        self._unmerged_state: dict[str, torch.Tensor] | None = None
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return base.in_features, base.out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            x_cast = self._cast_input_dtype(x, lora_a.weight.dtype)
            delta = lora_b(lora_a(self.lora_dropout[adapter](x_cast))) * self.scaling[adapter]
            result = result + delta.to(result_dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        names = [a for a in (adapter_names or self.active_adapters) if a in self.lora_A]
        if not names:
            return
        if self._unmerged_state is None:
            self._unmerged_state = {k: v.clone() for k, v in base.named_buffers(recurse=False)}
        weight = base.dense_weight(torch.float32)
        for adapter in names:
            weight = weight + self.get_delta_weight(adapter).float()
            self.merged_adapters.append(adapter)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs or infinities in the merged weights of adapters {names}; not merging.")
        base.requantize_(weight)

    def unmerge(self) -> None:
        if self._unmerged_state is None:
            return
        base = self.get_base_layer()
        for name, value in self._unmerged_state.items():
            getattr(base, name).copy_(value)
        self._unmerged_state = None
        self.merged_adapters.clear()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


CUSTOM_MODULES = {LUCLinear: CompressedLoraLinear, GGMLLinear: CompressedLoraLinear}
