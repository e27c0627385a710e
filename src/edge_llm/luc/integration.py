"""The module surgery of LUC in a transformers model: compress it (`apply_luc`), build empty
compressed layers for a checkpoint to load into, and record what it holds (reading the policy back
is `facts.policy_of`; saving it as a whole folder is `saving.saves_whole_folders`).

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LUCConfig(
        avg_bits=3.0, avg_sparsity=0.25, dataset=texts, tokenizer=tokenizer))
    model.save_pretrained("compressed/")                    # packed weights, policy in config.json
    model = AutoModelForCausalLM.from_pretrained("compressed/")   # after `import edge_llm`
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoTokenizer
from transformers.quantizers.auto import AutoHfQuantizer

from edge_llm._cache import cache_dir
from edge_llm._memory import release_freed_memory
from edge_llm.luc.calibration import calibration_tokens, target_linears
from edge_llm.luc.checks import add_marker
from edge_llm.luc.compress import compress_layers
from edge_llm.luc.config import LUCConfig
from edge_llm.luc.facts import QUANT_METHOD
from edge_llm.luc.ggml_linear import GGMLEmbedding, GGMLLinear
from edge_llm.luc.gguf_policy import BudgetTooSmall, GGUFPolicy, budget_bytes, compress_for_gguf
from edge_llm.luc.gguf_sensitivity import weight_count
from edge_llm.luc.gguf_speed import GGUFSpeedProfile, gguf_speed_cache_path, measure_gguf_speed
from edge_llm.luc.linear import LUCLinear
from edge_llm.luc.policy import LUCPolicy
from edge_llm.luc.profile import profile_sensitivity
from edge_llm.luc.saving import saves_whole_folders
from edge_llm.modeling import find_decoder_parts


def replace_with_luc_shells(model: nn.Module, policy: LUCPolicy) -> None:
    """Swap the targeted Linear layers for empty `LUCLinear`s shaped by `policy` (before loading)."""
    add_marker(model, policy)
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
            layer.set_submodule(name, shell)


@functools.wraps(compress_layers, assigned=("__annotations__",))
def compress_model(*args: Any, **kwargs: Any) -> LUCPolicy:
    """`compress_layers` (same arguments: every decoder layer `l` gets `LUCLinear`s with
    `settings[l]`), then the policy recorded in `model.config.quantization_config`, so that
    `save_pretrained` writes a loadable LUC checkpoint. Returns the policy."""
    model = args[0] if args else kwargs["model"]
    policy = compress_layers(*args, **kwargs)
    mark_compressed(model, policy)
    release_freed_memory()
    return policy


def mark_compressed(model: nn.Module, policy: LUCPolicy, config: LUCConfig | None = None) -> None:
    """Record that `model` holds LUC-compressed layers, as transformers' quantizers do."""
    config = config or LUCConfig(policy=policy)
    config.policy = policy
    record_quantization(model, config)
    add_marker(model, policy)
    saves_whole_folders(model)


def record_quantization(model: nn.Module, config: LUCConfig) -> None:
    """Attach `config` to `model` as `from_pretrained` attaches a quantization config: the config,
    and the quantizer Trainer asks whether the quantized model can be trained (found through
    transformers' registry of quantizers, where edge_llm registers LUC's on import)."""
    if hasattr(model, "config"):
        model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=True)


def _config_tokenizer(config: LUCConfig) -> Any:
    tokenizer = config.tokenizer
    return AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer


def config_tokens(config: LUCConfig):
    return calibration_tokens(config.dataset, _config_tokenizer(config), config.num_samples, config.seq_len)


def _gguf_budget(model: nn.Module, config: LUCConfig) -> int:
    """Bytes for the policy's tensors: `weight_budget_bytes` is the whole GGUF file, so its fixed
    part (header, vocabulary, norms: what `write_gguf` writes with `config.tokenizer`) comes off."""
    file_budget = None
    if config.weight_budget_bytes is not None:
        from edge_llm.export.gguf import gguf_fixed_bytes

        tokenizer = _config_tokenizer(config)
        if tokenizer is None:
            raise ValueError(
                "LUCConfig(target='gguf', weight_budget_bytes=...) budgets the GGUF file, whose vocabulary comes "
                "from the tokenizer: pass LUCConfig(tokenizer=...)."
            )
        fixed = gguf_fixed_bytes(model, tokenizer)
        if config.weight_budget_bytes <= fixed:
            raise ValueError(
                f"LUCConfig.weight_budget_bytes={config.weight_budget_bytes:,} does not even hold the GGUF file's "
                f"fixed part ({fixed:,} bytes: header, vocabulary, norms)."
            )
        file_budget = config.weight_budget_bytes - fixed
    return budget_bytes(model, config.avg_bits, file_budget)


def _gguf_speed(model: nn.Module, config: LUCConfig, progress: bool) -> GGUFSpeedProfile | None:
    """`config.gguf_speed` as a profile of `model`: given, or measured on this machine (once: kept
    in the edge-llm cache under the machine, llama.cpp build, threads and the model's shapes)."""
    if config.gguf_speed is None:
        return None
    if config.gguf_speed != "measure":
        return GGUFSpeedProfile.from_dict(config.gguf_speed)
    tokenizer = _config_tokenizer(config)
    if tokenizer is None:
        raise ValueError("LUCConfig(gguf_speed='measure') writes GGUF files to time: pass LUCConfig(tokenizer=...).")
    path = gguf_speed_cache_path(model, Path(config.profile_cache_dir or cache_dir() / "luc-profiles"))
    if path.exists():
        return GGUFSpeedProfile.load(path)
    profile = measure_gguf_speed(model, tokenizer, progress=progress)
    profile.save(path)
    return profile


def apply_gguf_luc(model: nn.Module, config: LUCConfig, progress: bool = True) -> GGUFPolicy:
    """`LUCConfig(target="gguf")`: one llama.cpp type per tensor (see `luc/gguf_policy.py`)."""
    policy = config.policy
    tokens = config_tokens(config) if config.dataset is not None else None
    budget = None if policy is not None else _gguf_budget(model, config)
    types = tuple(config.gguf_types) if config.gguf_types else None
    speed = _gguf_speed(model, config, progress) if policy is None else None
    try:
        slowdown, profiles = config.gguf_max_slowdown, config.profile_cache_dir or cache_dir() / "luc-profiles"
        policy = compress_for_gguf(
            model, tokens, budget, config.sensitivity, types, policy, progress, speed, slowdown, profiles
        )
    except BudgetTooSmall as error:
        smallest_bits = 8 * error.smallest / weight_count(model)
        raise ValueError(
            f"No choice of llama.cpp types fits the budget (avg_bits={config.avg_bits}, weight_budget_bytes="
            f"{config.weight_budget_bytes}): the smallest this model's tensors allow is {error.smallest:,} bytes of "
            f"weights, {smallest_bits:.2f} bits per weight; raise avg_bits to at least {smallest_bits:.2f}."
        ) from None
    config.policy = policy
    record_quantization(model, config)
    return policy


def apply_luc(model: nn.Module, config: LUCConfig, progress: bool = True) -> LUCPolicy | GGUFPolicy:
    """Profile (unless `config.policy` is set), search the policy and compress `model` in place."""
    if any(isinstance(module, (GGMLLinear, GGMLEmbedding)) for module in model.modules()):
        raise ValueError(
            "This model already holds llama.cpp blocks (loaded from a GGUF file, or compressed with "
            "target='gguf'): LUC compresses from the original weights; load the original model."
        )
    if config.target == "gguf":
        return apply_gguf_luc(model, config, progress)
    # A given policy carries its own compression method, and needs data only where it uses it.
    given = config.policy
    needs_data = given is None or given.method.needs_calibration_for(s for _, s in given.layers)
    tokens = config_tokens(config) if needs_data else None
    if given is not None:
        policy = given
    else:
        profile = profile_sensitivity(
            model,
            tokens,
            bits=tuple(config.bits),
            sparsities=tuple(config.sparsities),
            method=config.method,
            metric=config.metric,
            targets=config.targets,
            cache_dir=config.profile_cache_dir or cache_dir() / "luc-profiles",
            progress=progress,
        )
        policy = profile.search(config.budget)
    compress_layers(model, policy.layers, policy.method, tokens, policy.targets, progress)
    mark_compressed(model, policy, config)
    return policy
