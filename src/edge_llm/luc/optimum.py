"""`LUCQuantizer`: the Optimum-style entry point, `LUCQuantizer.from_pretrained(model).quantize(...)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimum.quantization_base import OptimumQuantizer
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from edge_llm.luc.config import LUCConfig
from edge_llm.luc.integration import apply_luc


class LUCQuantizer(OptimumQuantizer):
    """Optimum-style entry point: `LUCQuantizer.from_pretrained(model).quantize(dataset=..., save_dir=...)`."""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, model_or_path: nn.Module | str | Path, **kwargs: Any) -> LUCQuantizer:
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path, kwargs.pop("tokenizer", None))
        model = AutoModelForCausalLM.from_pretrained(model_or_path, **kwargs)
        return cls(model, AutoTokenizer.from_pretrained(model_or_path))

    def quantize(
        self,
        save_dir: str | Path | None = None,
        file_prefix: str | None = None,
        dataset: Any = None,
        config: LUCConfig | None = None,
        **config_kwargs: Any,
    ) -> nn.Module:
        """Compress the model with LUC (config fields as keyword arguments) and save it if `save_dir`."""
        if file_prefix is not None:
            raise ValueError("LUCQuantizer saves with save_pretrained; file_prefix is not used.")
        config = config or LUCConfig(
            dataset=dataset, tokenizer=config_kwargs.pop("tokenizer", self.tokenizer), **config_kwargs
        )
        apply_luc(self.model, config)
        if save_dir is not None:
            self.model.save_pretrained(save_dir)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(save_dir)
        return self.model
