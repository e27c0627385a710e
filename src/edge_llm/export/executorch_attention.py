"""How an ExecuTorch program of a causal LM attends: the module `torch.export` traces, with its
static KV cache as the program's mutable buffers.

- `"custom"` (the default): ExecuTorch's own ops, as ExecuTorch's and optimum-executorch's LLM
  exports use them: `llama::update_cache` writes the new keys and values into the cache in place and
  `llama::custom_sdpa` attends over the filled part of the cache only. Written here as a
  transformers attention function and cache layer, because transformers' exportable module
  hard-wires its own static cache and optimum-executorch is not a dependency.
- `"sdpa"`: transformers' `TorchExportableModuleWithStaticCache`, PyTorch's SDPA over the whole
  cache through a mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The name under which edge-llm's attention with ExecuTorch's own ops is registered in transformers.
CUSTOM_SDPA = "edge_llm_executorch_sdpa"


def _custom_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention through ExecuTorch's `llama::custom_sdpa`: `key`/`value` are the whole caches
    (`_CustomOpCacheLayer`, [batch, max_seq_len, kv_heads, head_dim]); the op attends, causally, to
    the positions up to the query's last only, where stock SDPA attends over the whole static cache
    through a mask. Grouped-query heads are shared inside the op."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError(f"{type(module).__name__} does not pass position_ids to attention: use attention='sdpa'.")
    start = position_ids[0][0].item()
    torch._check(start >= 0)
    torch._check(start < key.shape[1])
    output = torch.ops.llama.custom_sdpa(query.transpose(1, 2), key, value, start, None, 0.0, True, scaling)
    return output, None


def register_custom_sdpa() -> None:
    """Register `_custom_sdpa` with transformers, and no mask for it (the op is causal itself);
    loading ExecuTorch's custom-op library gives PyTorch the ops and the Python runtime their kernels."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers torch.ops.llama)
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(CUSTOM_SDPA, _custom_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CUSTOM_SDPA, lambda *args, **kwargs: None)


def _cache_layer_class() -> type:
    """A transformers static cache layer that keeps keys and values as `llama::custom_sdpa` reads
    them ([batch, max_seq_len, kv_heads, head_dim]) and writes new ones in place with
    `llama::update_cache` (stock `index_copy_` copies the cache in the program)."""
    from transformers.cache_utils import StaticLayer

    class _CustomOpCacheLayer(StaticLayer):
        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            batch, heads, _, key_dim = key_states.shape
            self.device = key_states.device
            self.keys = torch.zeros(batch, self.max_cache_len, heads, key_dim, dtype=key_states.dtype)
            self.values = torch.zeros(batch, self.max_cache_len, heads, value_states.shape[-1], dtype=key_states.dtype)
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            start = self.cumulative_length.item()
            torch._check(start >= 0)
            torch._check(start < self.max_cache_len)
            torch.ops.llama.update_cache(key_states.transpose(1, 2), self.keys, start)
            torch.ops.llama.update_cache(value_states.transpose(1, 2), self.values, start)
            self.cumulative_length.add_(key_states.shape[-2])
            return self.keys, self.values

    return _CustomOpCacheLayer


class CustomSdpaDecoder(nn.Module):
    """The program's module with ExecuTorch's attention ops: `(input_ids, cache_position) ->
    logits`, as transformers' `TorchExportableModuleWithStaticCache`, over a cache of
    `_CustomOpCacheLayer`s whose tensors are the program's mutable buffers."""

    def __init__(self, model: nn.Module, max_seq_len: int) -> None:
        from transformers.cache_utils import StaticCache

        super().__init__()
        self.model = model
        config = model.config
        self.cache = StaticCache(max_cache_len=max_seq_len, config=config)
        layer_class = _cache_layer_class()
        self.cache.layers = [layer_class(max_seq_len) for _ in self.cache.layers]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache.early_initialization(1, config.num_key_value_heads, head_dim, model.dtype, torch.device("cpu"))
        for index, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{index}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{index}", layer.values, persistent=False)
            self.register_buffer(f"cumulative_length_{index}", layer.cumulative_length, persistent=False)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        for layer in self.cache.layers:  # the program is called at any position: it sets the cache's length
            layer.cumulative_length.copy_(cache_position[0])
        return self.model(input_ids=input_ids, attention_mask=None, past_key_values=self.cache, use_cache=True).logits


def stock_sdpa_decoder(model: nn.Module, max_seq_len: int) -> nn.Module:
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    return TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_seq_len)


def full_attention_only(config: Any) -> bool:
    """Whether every layer attends to every earlier position (what `llama::custom_sdpa` computes):
    no sliding windows."""
    layer_types = getattr(config, "layer_types", None) or []
    return getattr(config, "sliding_window", None) is None and all(t == "full_attention" for t in layer_types)


# How the program attends: "custom" (ExecuTorch's `custom_sdpa`/`update_cache` ops, over the filled
# part of the cache; the runtime needs ExecuTorch's custom-op kernels, which its LLM runner links)
# or "sdpa" (PyTorch's SDPA over the whole static cache with a mask; portable kernels only).
ATTENTIONS = ("custom", "sdpa")
