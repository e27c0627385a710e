"""LUC through the Hugging Face APIs: a quantization config for `from_pretrained`, its quantizer,
and an Optimum-style quantizer for calibrate-then-save workflows.

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LUCConfig(
        avg_bits=3.0, avg_sparsity=0.25, dataset=texts, tokenizer=tokenizer))
    model.save_pretrained("compressed/")                    # packed weights, policy in config.json
    model = AutoModelForCausalLM.from_pretrained("compressed/")   # after `import edge_llm`
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from edge_llm._io import atomic_directory
from edge_llm.assets import cache_dir
from edge_llm.luc.calibration import calibration_tokens, target_linears
from edge_llm.luc.checks import check_checkpoint_files, check_loaded_layers
from edge_llm.luc.compress import CompressionMethod, compress_model
from edge_llm.luc.linear import UNQUANTIZED_BITS, LUCLinear
from edge_llm.luc.policy import Budget, LUCPolicy
from edge_llm.luc.profile import DEFAULT_BITS, DEFAULT_SPARSITIES, METRICS, profile_sensitivity
from edge_llm.luc.prune import check_sparsity
from edge_llm.luc.quantize import check_bits
from edge_llm.modeling import find_decoder_parts

logger = logging.getLogger(__name__)

# The name shows up in transformers' "Unknown quantization type" warning when a process that has
# not imported edge_llm loads a LUC checkpoint, so it says where the method comes from.
QUANT_METHOD = "edge_llm_luc"
# A one-byte buffer saved with every LUC checkpoint. Without edge_llm, transformers' load report
# lists it as an unexpected key right above its size-mismatch error: the name is the instruction.
MARKER = "import_edge_llm_before_loading_this_checkpoint"
# Not serialised into config.json: data, and objects that are not JSON.
_RUNTIME_FIELDS = ("dataset", "tokenizer")


class LUCConfig(QuantizationConfigMixin):
    """Layer-wise unified compression (LUC) as a transformers quantization config.

    Every decoder layer gets its own bit-width and pruning sparsity, chosen from a sensitivity
    profile on calibration data so that total damage is minimal within the budget.

    Args:
        avg_bits: parameter-weighted mean bit-width of the compressed layers, at most.
        avg_sparsity: parameter-weighted mean pruning sparsity, at least.
        weight_budget_bytes: storage of the compressed layers' weights (codes, scales, masks), at most.
            Any budget may be None; at least one must be set unless `policy` is given.
        dataset: calibration data: a list of strings (with `tokenizer`), of token-id lists, or a
            `datasets.Dataset` with a `text` or `input_ids` column.
        tokenizer: a tokenizer, or the name/path to load one from.
        policy: an `LUCPolicy` (or its JSON dict, or a path to its JSON file): skips profiling.
        group_size: input columns sharing a quantization scale.
        bits, sparsities: the candidate grid of the search (16 bits = unquantized).
        quant_algorithm: `"rtn"` (round to nearest) or `"gptq"` (error-compensating, needs data).
        prune_method: `"wanda"` or `"magnitude"`; prune_structure: `"unstructured"` or `"nm"`.
        metric: sensitivity metric, `"kl"` or `"output_mse"`.
        num_samples, seq_len: calibration windows drawn from `dataset`.
        targets: names of the Linear modules to compress in each decoder layer (None: all).
        profile_cache_dir: where sensitivity profiles are cached (default: the edge-llm cache).
    """

    def __init__(
        self,
        avg_bits: float | None = 4.0,
        avg_sparsity: float | None = 0.5,
        weight_budget_bytes: int | None = None,
        dataset: Any = None,
        tokenizer: Any = None,
        policy: LUCPolicy | dict | str | Path | None = None,
        group_size: int = 128,
        bits: tuple[int, ...] = DEFAULT_BITS,
        sparsities: tuple[float, ...] = DEFAULT_SPARSITIES,
        quant_algorithm: str = "rtn",
        prune_method: str = "wanda",
        prune_structure: str = "unstructured",
        metric: str = "kl",
        num_samples: int = 16,
        seq_len: int = 256,
        targets: list[str] | None = None,
        profile_cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.avg_bits, self.avg_sparsity, self.weight_budget_bytes = avg_bits, avg_sparsity, weight_budget_bytes
        self.dataset, self.tokenizer = dataset, tokenizer
        if isinstance(policy, (str, Path)):
            policy = LUCPolicy.load(policy).to_dict()
        elif isinstance(policy, LUCPolicy):
            policy = policy.to_dict()
        self.policy = policy
        self.group_size = group_size
        self.bits, self.sparsities = _number_list("bits", bits), _number_list("sparsities", sparsities)
        self.quant_algorithm, self.prune_method, self.prune_structure = quant_algorithm, prune_method, prune_structure
        self.metric, self.num_samples, self.seq_len, self.targets = metric, num_samples, seq_len, targets
        self.profile_cache_dir = profile_cache_dir
        self.post_init()

    def post_init(self) -> None:
        """Check every field; errors name the field and what would be valid."""
        try:
            _ = self.method  # validates group_size and the method names
        except ValueError as error:  # CompressionMethod calls quant_algorithm quant_method
            raise ValueError(f"LUCConfig.{error}".replace("quant_method", "quant_algorithm")) from None
        for name in ("avg_bits", "avg_sparsity"):
            value = getattr(self, name)
            if value is not None and not _is_finite_number(value):
                raise ValueError(f"LUCConfig.{name} must be a finite number or None, got {value!r}.")
        if self.targets is not None and (
            not isinstance(self.targets, (list, tuple)) or not all(isinstance(t, str) for t in self.targets)
        ):
            raise ValueError(f"LUCConfig.targets must be None or a list of module names, got {self.targets!r}.")
        for b in self.bits:
            if b != UNQUANTIZED_BITS:
                check_bits(b)
        for s in self.sparsities:
            check_sparsity(s, self.prune_structure)
        if self.metric not in METRICS:
            raise ValueError(f"LUCConfig.metric must be one of {METRICS}, got {self.metric!r}.")
        if self.policy is not None:
            LUCPolicy.from_dict(self.policy)
            return
        if self.avg_bits is not None and not min(self.bits) <= self.avg_bits <= max(self.bits):
            raise ValueError(
                f"LUCConfig.avg_bits={self.avg_bits} is outside the candidate bit-widths {self.bits}: "
                f"use a value between {min(self.bits)} and {max(self.bits)}."
            )
        if self.avg_sparsity is not None and not 0 <= self.avg_sparsity <= max(self.sparsities):
            raise ValueError(
                f"LUCConfig.avg_sparsity={self.avg_sparsity} is outside the candidate sparsities {self.sparsities}: "
                f"use a value between 0 and {max(self.sparsities)}."
            )
        if self.weight_budget_bytes is not None and (
            not isinstance(self.weight_budget_bytes, int) or self.weight_budget_bytes <= 0
        ):
            raise ValueError(
                f"LUCConfig.weight_budget_bytes must be a positive integer, got {self.weight_budget_bytes!r}."
            )
        if self.avg_bits is None and self.avg_sparsity is None and self.weight_budget_bytes is None:
            raise ValueError("LUCConfig needs a budget (avg_bits, avg_sparsity or weight_budget_bytes) or a policy.")
        for name in ("num_samples", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LUCConfig.{name} must be a positive integer, got {value!r}.")

    @property
    def method(self) -> CompressionMethod:
        return CompressionMethod(self.group_size, self.quant_algorithm, self.prune_method, self.prune_structure)

    @property
    def budget(self) -> Budget:
        return Budget(self.avg_bits, self.avg_sparsity, self.weight_budget_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in _RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """The config as a checkpoint's `config.json` stores it. Its policy must be inline: a path
        there would let a downloaded checkpoint make `from_pretrained` read any file."""
        policy = config_dict.get("policy")
        if policy is not None and not isinstance(policy, dict):
            raise ValueError(
                "The checkpoint's quantization_config.policy must be the LUC policy itself (a JSON object), "
                f"got {type(policy).__name__} {str(policy)[:80]!r}; re-save the model with edge-llm."
            )
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_list(name: str, values: object) -> list:
    """`bits` or `sparsities` as a list, refusing anything but a non-empty sequence of numbers."""
    kind = int if name == "bits" else (int, float)
    if not isinstance(values, (list, tuple)) or not values or not all(_is_finite_number(v) for v in values):
        raise ValueError(f"LUCConfig.{name} must be a non-empty list of finite numbers, got {values!r}.")
    if not all(isinstance(v, kind) for v in values):
        raise ValueError(f"LUCConfig.{name} must be a list of whole numbers, got {values!r}.")
    return [v if name == "bits" else float(v) for v in values]


def _policy_of(config: LUCConfig) -> LUCPolicy:
    return LUCPolicy.from_dict(config.policy)


def add_marker(model: nn.Module) -> None:
    if MARKER not in dict(model.named_buffers(recurse=False)):
        device = next(model.parameters()).device
        model.register_buffer(MARKER, torch.ones(1, dtype=torch.uint8, device=device))


def replace_with_luc_shells(model: nn.Module, policy: LUCPolicy) -> None:
    """Swap the targeted Linear layers for empty `LUCLinear`s shaped by `policy` (before loading)."""
    add_marker(model)
    layers = find_decoder_parts(model).layers(model)
    if len(policy.layers) != len(layers):
        raise ValueError(f"The LUC policy covers {len(policy.layers)} layers but the model has {len(layers)}.")
    for layer, (bits, sparsity) in zip(layers, policy.layers, strict=True):
        for name, linear in target_linears(layer, policy.targets).items():
            shell = LUCLinear(
                linear.in_features,
                linear.out_features,
                bits,
                sparsity,
                policy.method.group_size,
                bias=linear.bias is not None,
                dtype=linear.weight.dtype,
                device=linear.weight.device,
            )
            owner_name, _, attribute = name.rpartition(".")
            setattr(layer.get_submodule(owner_name) if owner_name else layer, attribute, shell)


def mark_compressed(model: nn.Module, policy: LUCPolicy, config: LUCConfig | None = None) -> None:
    """Record that `model` holds LUC-compressed layers, as transformers' quantizers do."""
    config = config or LUCConfig(policy=policy)
    config.policy = policy.to_dict()
    if hasattr(model, "config"):
        model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    # What from_pretrained attaches; Trainer asks it whether the quantized model can be trained.
    model.hf_quantizer = LUCHfQuantizer(config, pre_quantized=True)
    add_marker(model)
    saves_whole_folders(model)


def saves_whole_folders(model: nn.Module) -> None:
    """Make `model.save_pretrained(folder)` switch `folder` over as a whole (see `_save_whole`).

    A `partial` holding the model, not a closure: `copy.deepcopy(model)` then gives a copy whose
    `save_pretrained` saves the copy."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = functools.partial(_save_whole, model)


# What a model's `save_pretrained` writes; any other file in the folder is the user's and is kept.
_MODEL_FILES = ("config.json", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def _save_whole(model: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """`save_pretrained` that writes into a new folder beside `save_directory` and swaps it in
    when complete: a save killed midway leaves the previous checkpoint loadable. Files there that
    the model save does not write (a tokenizer, a README) are carried over as hard links."""
    out = Path(save_directory)
    if kwargs.get("push_to_hub") and "repo_id" not in kwargs:
        kwargs["repo_id"] = out.name  # transformers names the repository after the folder it saves to
    with atomic_directory(out) as staging:
        if out.is_dir():
            for item in out.iterdir():
                if item.name not in _MODEL_FILES and not item.name.endswith(_WEIGHT_SUFFIXES):
                    _link_or_copy(item, staging / item.name)
        type(model).save_pretrained(model, staging, *args, **kwargs)


def _link_or_copy(source: Path, target: Path) -> None:
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir():
        shutil.copytree(source, target, copy_function=link)
    else:
        link(str(source), str(target))


def apply_luc(model: nn.Module, config: LUCConfig, progress: bool = True) -> LUCPolicy:
    """Profile (unless `config.policy` is set), search the policy and compress `model` in place."""
    # A given policy carries its own compression method.
    method = _policy_of(config).method if config.policy is not None else config.method
    needs_data = config.policy is None or method.needs_calibration
    tokens = None
    if needs_data:
        tokenizer = config.tokenizer
        if isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        tokens = calibration_tokens(config.dataset, tokenizer, config.num_samples, config.seq_len)
    if config.policy is not None:
        policy = _policy_of(config)
    else:
        profile = profile_sensitivity(
            model,
            tokens,
            bits=tuple(config.bits),
            sparsities=tuple(config.sparsities),
            method=method,
            metric=config.metric,
            targets=config.targets,
            cache_dir=config.profile_cache_dir or cache_dir() / "luc-profiles",
            progress=progress,
        )
        policy = profile.search(config.budget)
    compress_model(model, policy.layers, policy.method, tokens, policy.targets, progress)
    mark_compressed(model, policy, config)
    return policy


class LUCHfQuantizer(HfQuantizer):
    """Compresses after loading (profiling on the config's calibration data), or, for a saved LUC
    checkpoint, builds the compressed layers before loading so the packed tensors load as they are."""

    requires_calibration = False

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        if not isinstance(quantization_config, LUCConfig):
            quantization_config = LUCConfig(**quantization_config.to_dict())
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.pre_quantized and self.quantization_config.policy is None:
            raise ValueError("This LUC checkpoint's config.json has no policy; it was not saved by edge-llm.")

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return False

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if self.pre_quantized:
            replace_with_luc_shells(model, _policy_of(self.quantization_config))
            if kwargs.get("checkpoint_files"):
                check_checkpoint_files(model, kwargs["checkpoint_files"])

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            check_loaded_layers(model)
            saves_whole_folders(model)
        else:
            policy = apply_luc(model, self.quantization_config)
            logger.info("LUC policy:\n%s", policy.summary())
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


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


def register() -> None:
    """Register LUC with transformers (idempotent: importing edge_llm twice is harmless)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LUCConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(LUCConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LUCHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(LUCHfQuantizer)
