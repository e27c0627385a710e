"""What a model says about how LUC compressed it, read from its `config.quantization_config`: the
policy (`policy_of`, `gguf_policy_of`) and the string an adapter records (`compression_of`); and
read off its layers, the setting of each decoder layer (`layer_setting`).

Its own module, a leaf of the LUC package, because every pillar reads these facts (the cost model,
the tuner, every export target) and none of them should import the machinery that compresses.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from edge_llm.luc.checks import policy_sha256
from edge_llm.luc.ggml_linear import GGMLLinear
from edge_llm.luc.gguf_policy import GGUFPolicy
from edge_llm.luc.linear import UNQUANTIZED_BITS, LUCLinear
from edge_llm.luc.policy import LUCPolicy

# The `quant_method` LUC registers with transformers (`LUCConfig.quant_method`).
QUANT_METHOD = "edge_llm_luc"


def _quantization_fields(model: nn.Module) -> tuple[Any, Any, Any]:
    """(quant_method, target, policy) of `model`'s (or its base model's) quantization config."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantization = getattr(getattr(base, "config", None), "quantization_config", None)
    if isinstance(quantization, dict):
        return quantization.get("quant_method"), quantization.get("target", "pytorch"), quantization.get("policy")
    fields = ("quant_method", "target", "policy")
    method, target, policy = (getattr(quantization, name, None) for name in fields)
    return method, target or "pytorch", policy


def policy_of(model: nn.Module) -> LUCPolicy | None:
    """The LUC policy `model` (or the base model of a `PeftModel`) was compressed with, from its
    `config.quantization_config`; None for a model LUC did not compress into its own layers
    (see `gguf_policy_of` for the llama.cpp target)."""
    method, target, policy = _quantization_fields(model)
    if method != QUANT_METHOD or policy is None or target != "pytorch":
        return None
    return policy if isinstance(policy, LUCPolicy) else LUCPolicy.from_dict(policy)


def gguf_policy_of(model: nn.Module) -> GGUFPolicy | None:
    """The llama.cpp types LUC chose for `model` (`LUCConfig(target="gguf")`), or None."""
    method, target, policy = _quantization_fields(model)
    if method != QUANT_METHOD or policy is None or target != "gguf":
        return None
    return policy if isinstance(policy, GGUFPolicy) else GGUFPolicy.from_dict(policy)


def compression_of(model: nn.Module) -> str:
    """What `model` was compressed with, as an adapter records it: "none", or "luc:" and the
    SHA-256 of its LUC policy (for either target). For llama.cpp types, of the types alone (how they
    were chosen is no part of the weights): a base loaded back from its GGUF file
    (`export.gguf_load`), which holds the types only, is the base the adapter was tuned over."""
    policy = policy_of(model)
    if policy is None:
        types = gguf_policy_of(model)
        policy = None if types is None else GGUFPolicy(types.tensors, "given")
    return "none" if policy is None else "luc:" + policy_sha256(policy).hex()


def layer_setting(layer: nn.Module) -> tuple[int, float]:
    """(bits, sparsity) of a decoder layer as the cost model, the schedule and the exporters see it:
    what LUC gave its `LUCLinear`s (a policy gives every Linear of a layer one setting); for a layer
    of llama.cpp blocks (`GGMLLinear`), the width of the dequantizing kernel its types fit (4 where
    none holds more than 4.5 bits per weight, else 8), unpruned; (16, 0.0) for a layer left in float."""
    blocks = [m for m in layer.modules() if isinstance(m, GGMLLinear)]
    if blocks:
        return (4 if max(m.kind.bits_per_weight for m in blocks) <= 4.5 else 8), 0.0
    compressed = next((m for m in layer.modules() if isinstance(m, LUCLinear)), None)
    return (compressed.bits, compressed.sparsity) if compressed is not None else (UNQUANTIZED_BITS, 0.0)
