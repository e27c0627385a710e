"""`LUCHfQuantizer`: the thin transformers quantizer of LUC, hooks only (the surgery is in
`integration.py`), and its registration with transformers."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from edge_llm.luc.checks import check_checkpoint_files, check_loaded_layers
from edge_llm.luc.config import LUCConfig
from edge_llm.luc.facts import QUANT_METHOD
from edge_llm.luc.integration import apply_luc, replace_with_luc_shells
from edge_llm.luc.saving import saves_whole_folders

logger = logging.getLogger(__name__)


class LUCHfQuantizer(HfQuantizer):
    """Compresses after loading (profiling on the config's calibration data), or, for a saved LUC
    checkpoint, builds the compressed layers before loading so the packed tensors load as they are."""

    requires_calibration = False

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        if not isinstance(quantization_config, LUCConfig):
            quantization_config = LUCConfig(**quantization_config.to_dict())
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.pre_quantized and self.quantization_config.target == "gguf":
            raise ValueError(
                "A model LUC compressed for llama.cpp (target='gguf') is saved as a GGUF file "
                "(edge_llm.export.write_gguf), not as a transformers checkpoint."
            )
        if self.pre_quantized and self.quantization_config.policy is None:
            raise ValueError("This LUC checkpoint's config.json has no policy; it was not saved by edge-llm.")

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return False

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if self.pre_quantized:
            policy = self.quantization_config.policy
            replace_with_luc_shells(model, policy)
            if kwargs.get("checkpoint_files"):
                check_checkpoint_files(model, policy, kwargs["checkpoint_files"])

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            check_loaded_layers(model, self.quantization_config.policy)
            saves_whole_folders(model)
        else:
            policy = apply_luc(model, self.quantization_config)
            logger.info("LUC policy:\n%s", policy.summary())
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        if self.quantization_config.target == "gguf":
            logger.warning(
                "A model LUC compressed for llama.cpp (target='gguf') is saved as a GGUF file: "
                "edge_llm.export.write_gguf(model, path) writes its blocks unchanged."
            )
            return False
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register LUC with transformers (idempotent: importing edge_llm twice is harmless)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LUCConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(LUCConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LUCHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(LUCHfQuantizer)
