"""Layer-wise sensitivity profiling: how much each (bits, sparsity) setting of each decoder layer
alone damages the model on calibration data.

Metrics:

- `"kl"` (default): mean over calibration tokens of KL(p_original || p_compressed), the next-token
  distributions of the whole model when only that layer is compressed. End to end and additive to
  first order, which is what the policy search sums. Costs about `layers * candidates / 2` forward
  passes (each layer's run starts from its cached input).
- `"output_mse"` (the reference implementation's layer-output error, fast): the squared error of
  the layer's output, relative to the size of the layer's own update `||out - in||^2`. One layer
  forward per setting; not comparable across layers as faithfully as `"kl"`.

Results are cached as JSON, keyed by a fingerprint of the weights, calibration tokens and
settings, so profiling the same model on the same data again is instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_llm._io import atomic_write_text
from edge_llm._registry import Registry
from edge_llm.luc.calibration import LayerRunner, input_hessians, iterate, target_linears
from edge_llm.luc.compress import compressed_dense_weight
from edge_llm.luc.linear import UNQUANTIZED_BITS
from edge_llm.luc.method import CompressionMethod
from edge_llm.luc.policy import Budget, LUCPolicy, linear_storage_bytes, search_policy
from edge_llm.luc.prune import check_sparsity
from edge_llm.luc.quantize import check_bits

logger = logging.getLogger(__name__)

DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_SPARSITIES = (0.0, 0.25, 0.5, 0.75)
# Profiling predicted to take longer than this (seconds) is announced with its estimate.
LONG_PROFILE_S = 120.0
_PROFILE_VERSION = 1


@dataclass
class SensitivityProfile:
    """Damage and storage of every candidate setting of every decoder layer."""

    candidates: list[tuple[int, float]]
    damage: list[list[float]]
    layer_params: list[int]
    layer_bytes: list[list[int]]
    metric: str
    method: CompressionMethod
    targets: list[str] | None
    fingerprint: str

    def search(self, budget: Budget) -> LUCPolicy:
        """The policy with the least total damage that meets `budget` (exact, see `search_policy`)."""
        choice = search_policy(
            np.array(self.damage), self.candidates, self.layer_params, np.array(self.layer_bytes), budget
        )
        return LUCPolicy([self.candidates[c] for c in choice], self.method, self.targets)

    def policy_bytes(self, policy: LUCPolicy) -> int:
        """Storage bytes of the compressed layers under `policy`."""
        index = {candidate: i for i, candidate in enumerate(self.candidates)}
        total = 0
        for layer, setting in enumerate(policy.layers):
            if setting not in index:
                raise ValueError(f"Layer {layer} setting {setting} is not among the profiled candidates.")
            total += self.layer_bytes[layer][index[setting]]
        return total

    def to_json(self) -> str:
        data = asdict(self)
        data["version"] = _PROFILE_VERSION
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> SensitivityProfile:
        data = json.loads(text)
        if data.pop("version", None) != _PROFILE_VERSION:
            raise ValueError("The cached sensitivity profile has another format version.")
        data["candidates"] = [tuple(c) for c in data["candidates"]]
        data["method"] = CompressionMethod(**data["method"])
        return cls(**data)


# Config entries that do not change what a profile measures: where the checkpoint was loaded from
# and in which dtype (the values are hashed instead), the writing library's version, and the LUC
# budget being asked for (the method and candidates are in the settings).
_NOT_FINGERPRINTED = ("dtype", "torch_dtype", "_name_or_path", "transformers_version", "quantization_config")


def weights_fingerprint(model: nn.Module, tokens: torch.Tensor, settings: dict) -> str:
    """The model's values, not its dtype or path: the same checkpoint loaded in bfloat16 or float32
    (an exact upcast), from any folder, under any budget, finds the same cached profile."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    config = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_FINGERPRINTED}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        values = tensor.detach().cpu()
        values = values.float() if values.is_floating_point() else values
        digest.update(name.encode())
        digest.update(values.contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(tokens.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SensitivityMetric:
    """How `profile_sensitivity` scores one compressed layer (`metric=` names it).

    `reference(runner, batch)`: what the unmodified model produces for a calibration batch, once;
    `damage(runner, layer, batch, reference)`: (summed damage, count) of that batch with `layer`
    compressed — the profile is the sum over batches divided by the count; `layers_run(layer,
    num_layers)`: how many decoder layers one measurement runs (for the time estimate)."""

    name: str
    reference: Callable[[LayerRunner, int], torch.Tensor]
    damage: Callable[[LayerRunner, int, int, torch.Tensor], tuple[float, int]]
    layers_run: Callable[[int, int], int]


METRICS: Registry[SensitivityMetric] = Registry("sensitivity metric")


def _kl_damage(runner: LayerRunner, layer: int, batch: int, reference: torch.Tensor) -> tuple[float, int]:
    """KL(original || compressed) summed over tokens (`reference`: the original log-probs)."""
    log_probs = runner.run_from(layer, batch, runner.layer_input(batch, layer))
    return (reference.exp() * (reference - log_probs)).sum().item(), reference.shape[0] * reference.shape[1]


def _output_damage(runner: LayerRunner, layer: int, batch: int, reference: torch.Tensor) -> tuple[float, int]:
    """The layer's output error relative to its own update (`reference`: the last layer's original
    output; every other layer's original output is the next layer's captured input)."""
    hidden = runner.layer_input(batch, layer)
    compressed = runner.run_layer(layer, batch, hidden)
    original = reference if layer + 1 == len(runner.layers) else runner.layer_input(batch, layer + 1)
    error = (compressed - original).float().pow(2).sum().item()
    return error / max((original - hidden).float().pow(2).sum().item(), 1e-12), 1


METRICS.register(
    SensitivityMetric(
        "kl",
        reference=lambda runner, batch: runner.run_from(0, batch, runner.layer_input(batch, 0)),
        damage=_kl_damage,
        layers_run=lambda layer, num_layers: num_layers - layer,
    )
)
METRICS.register(
    SensitivityMetric(
        "output_mse",
        reference=lambda runner, batch: runner.run_layer(
            len(runner.layers) - 1, batch, runner.layer_input(batch, len(runner.layers) - 1)
        ),
        damage=_output_damage,
        layers_run=lambda layer, num_layers: 1,
    )
)


def profile_sensitivity(
    model: nn.Module,
    tokens: torch.Tensor,
    bits: tuple[int, ...] = DEFAULT_BITS,
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES,
    method: CompressionMethod | None = None,
    metric: str = "kl",
    targets: list[str] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> SensitivityProfile:
    """Measure the damage of every (bits, sparsity) candidate of every decoder layer.

    Args:
        model: the uncompressed causal LM.
        tokens: `(samples, seq_len)` calibration token ids (see `calibration_tokens`).
        bits, sparsities: the candidate grid (16 bits means "not quantized").
        method: how layers are compressed (group size, RTN/GPTQ, Wanda/magnitude, structure).
        metric: `"kl"` or `"output_mse"` (see the module docstring).
        targets: Linear module names to compress in each layer (None: all).
        cache_dir: where to keep the JSON result; None disables caching.
    """
    method = method or CompressionMethod()
    if metric not in METRICS:
        raise ValueError(f"Unknown sensitivity metric {metric!r}; use one of {tuple(METRICS)}.")
    for b in bits:
        if b != UNQUANTIZED_BITS:
            check_bits(b)
    for s in sparsities:
        check_sparsity(s, method.prune_structure)
    candidates = [(int(b), float(s)) for b in bits for s in sparsities]
    settings = {"candidates": candidates, "method": asdict(method), "metric": metric, "targets": targets}
    fingerprint = weights_fingerprint(model, tokens, settings | {"version": _PROFILE_VERSION})
    cache_file = cache_folder(cache_dir) / f"luc-profile-{fingerprint[:24]}.json" if cache_dir is not None else None
    if cache_file is not None and cache_file.exists():
        try:
            cached = _plausible(SensitivityProfile.from_json(cache_file.read_text()))
        except (ValueError, KeyError, TypeError) as error:  # a damaged entry is measured again, not fatal
            logger.warning("Ignoring the unreadable cached profile %s (%s); profiling again.", cache_file, error)
        else:
            logger.info("Using the cached sensitivity profile %s", cache_file)
            return cached

    model_was_training = model.training
    model.eval()
    try:
        profile = _measure(model, tokens, candidates, method, metric, targets, fingerprint, progress)
    finally:
        model.train(model_was_training)
    if cache_file is not None:
        atomic_write_text(cache_file, profile.to_json())
    return profile


def cache_folder(cache_dir: str | Path) -> Path:
    """The profile cache folder, made and checked writable before any profiling (not after it)."""
    folder = Path(cache_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"profile_cache_dir {folder} is a file; name a folder (or None to cache nothing).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"profile_cache_dir {folder} cannot be made: {error.strerror}.") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"profile_cache_dir {folder} is not writable; name another folder (or None).")
    return folder


def _plausible(profile: SensitivityProfile) -> SensitivityProfile:
    """A cached profile as measured: finite, non-negative damage, and some compression that costs
    something (a real model always loses something at its fewest bits)."""
    values = [d for row in profile.damage for d in row]
    if not all(math.isfinite(d) and d >= 0 for d in values) or not any(d > 0 for d in values):
        raise ValueError("its damage values are not a measurement (negative, non-finite or all zero)")
    return profile


@torch.no_grad()
def _measure(model, tokens, candidates, method, metric, targets, fingerprint, progress) -> SensitivityProfile:
    runner = LayerRunner(model, tokens)
    num_layers = len(runner.layers)
    batches = range(len(runner.batches))
    scorer = METRICS[metric]
    reference = [scorer.reference(runner, b) for b in batches]
    damage, layer_params, layer_bytes = [], [], []
    steps = iterate(range(num_layers), num_layers, f"LUC sensitivity ({metric})", progress)
    start = time.perf_counter()
    for layer in steps:
        if layer == 1:
            warn_if_long(time.perf_counter() - start, num_layers, len(candidates), scorer)
        row, params, nbytes = measure_layer(runner, layer, candidates, method, targets, scorer, reference)
        damage.append(row)
        layer_params.append(params)
        layer_bytes.append(nbytes)
    return SensitivityProfile(candidates, damage, layer_params, layer_bytes, metric, method, targets, fingerprint)


def measure_layer(
    runner: LayerRunner,
    layer: int,
    candidates: list[tuple[int, float]],
    method: CompressionMethod,
    targets: list[str] | None,
    scorer: SensitivityMetric,
    reference: list[torch.Tensor],
) -> tuple[list[float], int, list[int]]:
    """Damage of every candidate setting of decoder layer `layer` alone, its compressed
    parameters and its storage bytes under each candidate; the layer is left as it was."""
    linears = target_linears(runner.layers[layer], targets)
    # Only where a candidate uses them (GPTQ, or Wanda at a sparsity above 0): a 1B model's down
    # projection alone has a 256 MiB Hessian.
    needed = method.needs_calibration_for(s for _, s in candidates)
    hessians = input_hessians(runner, layer, linears) if needed else {}
    # Compression returns new tensors and leaves these unchanged: kept by reference, not copied.
    originals = {name: m.weight.data for name, m in linears.items()}
    shapes = [(m.out_features, m.in_features) for m in linears.values()]
    nbytes = [sum(linear_storage_bytes(o, i, b, s, method.group_size) for o, i in shapes) for b, s in candidates]
    row = []
    try:
        for b, s in candidates:
            for name, module in linears.items():
                module.weight.data = compressed_dense_weight(originals[name], b, s, method, hessians.get(name))
            row.append(_damage(runner, layer, scorer, reference))
    finally:
        for name, module in linears.items():
            module.weight.data = originals[name]
    return row, sum(m.weight.numel() for m in linears.values()), nbytes


# What makes a long in-memory profile faster, said with its time estimate.
_IN_MEMORY_ADVICE = (
    "The result is cached for the next run; fewer candidate bits/sparsities, fewer calibration samples or "
    "metric='output_mse' make it faster."
)


def warn_if_long(
    first_layer_s: float,
    num_layers: int,
    num_candidates: int,
    scorer: SensitivityMetric,
    advice: str = _IN_MEMORY_ADVICE,
) -> None:
    """Say early, with an estimate, when profiling will take long: the first layer's time scaled by
    the decoder layers all measurements run against the first layer's (with "kl" each measurement
    runs the model from its layer to the end, so later layers cost less)."""
    layers_run = [scorer.layers_run(layer, num_layers) for layer in range(num_layers)]
    total = first_layer_s * sum(layers_run) / layers_run[0]
    if total > LONG_PROFILE_S:
        logger.warning(
            "LUC sensitivity profiling will take about %.0f min here (%d layers x %d candidate settings). %s",
            total / 60,
            num_layers,
            num_candidates,
            advice,
        )


def _damage(runner: LayerRunner, layer: int, scorer: SensitivityMetric, reference: list[torch.Tensor]) -> float:
    """The metric's damage of `layer` as now compressed, over every calibration batch."""
    total, count = 0.0, 0
    for batch, batch_reference in enumerate(reference):
        damage, items = scorer.damage(runner, layer, batch, batch_reference)
        total, count = total + damage, count + items
    return total / count
