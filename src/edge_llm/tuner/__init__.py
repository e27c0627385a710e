"""Adaptive layer tuning and exit voting as a PEFT method (`peft_type="EDGE_LLM"`).

Importing this package registers the method with peft, so that `get_peft_model`,
`PeftModel.from_pretrained`, `PeftConfig.from_pretrained` and `AutoPeftModelForCausalLM` handle
Edge-LLM adapters like any built-in method.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from edge_llm.tuner.config import EdgeLLMConfig
from edge_llm.tuner.model import EdgeLLMModel, edge_config_of
from edge_llm.tuner.peft_type import EDGE_LLM_PEFT_TYPE, PEFT_TYPE_NAME


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
