"""Adaptive layer tuning and exit voting as a PEFT method (`peft_type="EDGE_LLM"`).

Importing this package registers the method with peft, so that `get_peft_model`,
`PeftModel.from_pretrained`, `PeftConfig.from_pretrained` and `AutoPeftModelForCausalLM` handle
Edge-LLM adapters like any built-in method.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "EDGE_LLM"


def _add_peft_type(name: str) -> PeftType:
    """Add `name` to peft's closed `PeftType` enum; a no-op when it is already there.

    `PeftType` is a `str` Enum that cannot be subclassed or extended through a public API, and
    `register_peft_method` only accepts names that are already members. Members live in the enum's
    member maps and as class attributes; this adds one exactly as `Enum` itself would.
    """
    member = PeftType._value2member_map_.get(name)
    if member is not None:
        return member
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


EDGE_LLM_PEFT_TYPE = _add_peft_type(PEFT_TYPE_NAME)

from edge_llm.tuner.config import EdgeLLMConfig  # noqa: E402
from edge_llm.tuner.model import EdgeLLMModel, edge_config_of  # noqa: E402


def _register() -> None:
    """Put the method into peft's registries; importing twice (or reloading) is harmless.

    `peft.utils.register_peft_method` would refuse: it insists on a prefix no other method uses,
    but Edge-LLM adapters *are* LoRA weights (`lora_A`/`lora_B`, prefix `lora_`) so that LoRA's
    layers, merging and quantized-base support apply unchanged. So the three mappings it fills are
    filled here, checking that no other method already claimed the name.
    """
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(EDGE_LLM_PEFT_TYPE)
    if registered is not None and registered.__qualname__ != EdgeLLMConfig.__qualname__:
        raise RuntimeError(f"peft already has a different method registered as {PEFT_TYPE_NAME}: {registered!r}.")
    PEFT_TYPE_TO_CONFIG_MAPPING[EDGE_LLM_PEFT_TYPE] = EdgeLLMConfig
    PEFT_TYPE_TO_TUNER_MAPPING[EDGE_LLM_PEFT_TYPE] = EdgeLLMModel
    PEFT_TYPE_TO_PREFIX_MAPPING[EDGE_LLM_PEFT_TYPE] = EdgeLLMModel.prefix


_register()

__all__ = ["EDGE_LLM_PEFT_TYPE", "EdgeLLMConfig", "EdgeLLMModel", "edge_config_of"]
