"""`LUCConfig`: LUC as a transformers quantization config (what `from_pretrained` is given and
what a checkpoint's `config.json` stores), with every field checked."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from edge_llm._io import load_json
from edge_llm.luc.facts import QUANT_METHOD
from edge_llm.luc.gguf_policy import GGUFPolicy
from edge_llm.luc.linear import UNQUANTIZED_BITS
from edge_llm.luc.method import CompressionMethod
from edge_llm.luc.policy import Budget, LUCPolicy
from edge_llm.luc.profile import DEFAULT_BITS, DEFAULT_SPARSITIES, METRICS
from edge_llm.luc.prune import check_sparsity
from edge_llm.luc.quantize import check_bits

# The name shows up in transformers' "Unknown quantization type" warning when a process that has
# not imported edge_llm loads a LUC checkpoint, so it says where the method comes from.
# What the compressed model is for: "pytorch" (LUC's own packed layers: per-layer bits and
# sparsity) or "gguf" (llama.cpp: one llama.cpp weight type per tensor, see `luc/gguf_policy.py`).
TARGETS = ("pytorch", "gguf")
# Not serialised into config.json: data, and objects that are not JSON.
_RUNTIME_FIELDS = ("dataset", "tokenizer")


class LUCConfig(QuantizationConfigMixin):
    """Layer-wise unified compression (LUC) as a transformers quantization config.

    Every decoder layer gets its own bit-width and pruning sparsity, chosen from a sensitivity
    profile on calibration data so that total damage is minimal within the budget.

    Args:
        avg_bits: parameter-weighted mean bit-width of the compressed layers, at most.
        avg_sparsity: parameter-weighted mean pruning sparsity, at least (default None: no pruning
            is required, so a bits-only budget prunes nothing).
        weight_budget_bytes: storage of the compressed layers' weights (codes, scales, masks), at most.
            Any budget may be None; at least one must be set unless `policy` is given.
        dataset: calibration data: a list of strings (with `tokenizer`), of token-id lists, or a
            `datasets.Dataset` with a `text` or `input_ids` column.
        tokenizer: a tokenizer, or the name/path to load one from.
        policy: an `LUCPolicy` (a `GGUFPolicy` for `target="gguf"`), its JSON dict, or a path to its JSON
            file: skips profiling. Read back, `config.policy` is the policy object.
        group_size: input columns sharing a quantization scale.
        bits, sparsities: the candidate grid of the search (16 bits = unquantized).
        quant_algorithm: `"rtn"` (round to nearest) or `"gptq"` (error-compensating, needs data).
        quant_grid: `"asymmetric"` (a zero-point per group) or `"symmetric"` (the grid ExecuTorch's
            int4 kernels hold unchanged; `edge_llm.luc.method.GRIDS`).
        prune_method: `"wanda"` or `"magnitude"`; prune_structure: `"unstructured"` or `"nm"`.
        metric: sensitivity metric, `"kl"` or `"output_mse"`.
        num_samples, seq_len: calibration windows drawn from `dataset`.
        targets: names of the Linear modules to compress in each decoder layer (None: all).
        profile_cache_dir: where sensitivity profiles are cached (default: the edge-llm cache); for
            `target="gguf"` the measured damage table and importance vectors, so another budget
            over the same model, calibration and types is searched without measuring again.
        target: `"pytorch"` (default: LUC's packed layers, per-layer bits and sparsity) or `"gguf"`:
            every weight tensor, the token embedding included, gets one of llama.cpp's types
            (`gguf_types`), quantized by llama.cpp's quantizer with an importance matrix, chosen
            by measured sensitivity under the budget: `weight_budget_bytes` (those tensors' bytes
            in the GGUF file) or `avg_bits` (bits per weight over them). Needs llama-cpp-python;
            no pruning (GGUF has no sparse types); export with `edge_llm.export.write_gguf`.
        sensitivity: for `target="gguf"`, `"fisher"` (measured) or `"structural"` (a fixed rule).
        gguf_types: for `target="gguf"`, the candidate llama.cpp types (None: all of
            `edge_llm.luc.ggml.BLOCK_TYPES`).
        gguf_speed: for `target="gguf"`, what each type costs in time in llama.cpp on the device:
            None (bytes only), `"measure"` (on this machine, a few minutes for a 135M model, cached),
            a profile file saved by `edge_llm.luc.measure_gguf_speed(...).save(path)` on the device,
            or its dict. With it, types are chosen for quality within the budget *and* speed.
        gguf_max_slowdown: with `gguf_speed`, how much slower (0.5: 50%) a request (the profile's
            prompt, then its generated tokens) may be than with the fastest types the budget holds.
    """

    def __init__(
        self,
        avg_bits: float | None = 4.0,
        avg_sparsity: float | None = None,
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
        quant_grid: str = "asymmetric",
        metric: str = "kl",
        num_samples: int = 16,
        seq_len: int = 256,
        targets: list[str] | None = None,
        profile_cache_dir: str | None = None,
        target: str = "pytorch",
        sensitivity: str = "fisher",
        gguf_types: list[str] | None = None,
        gguf_speed: str | Path | dict | None = None,
        gguf_max_slowdown: float = 0.5,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.avg_bits, self.avg_sparsity, self.weight_budget_bytes = avg_bits, avg_sparsity, weight_budget_bytes
        if dataset is not None and not (
            isinstance(dataset, (list, tuple)) or hasattr(dataset, "column_names") or hasattr(dataset, "dim")
        ):
            raise ValueError(
                "LUCConfig.dataset must be a list of strings (with a tokenizer), a list of token-id lists, a 2-D "
                "tensor of token ids or a datasets.Dataset with a 'text' or 'input_ids' column; got "
                f"{type(dataset).__name__}."
            )
        self.dataset, self.tokenizer = dataset, tokenizer
        self.target = target  # before the policy: it says which kind of policy a dict is
        self.policy = load_json(policy, "LUC policy") if isinstance(policy, (str, Path)) else policy
        self.group_size = group_size
        self.bits, self.sparsities = _number_list("bits", bits), _number_list("sparsities", sparsities)
        self.quant_algorithm, self.prune_method, self.prune_structure = quant_algorithm, prune_method, prune_structure
        self.quant_grid = quant_grid
        self.metric, self.num_samples, self.seq_len, self.targets = metric, num_samples, seq_len, targets
        self.profile_cache_dir = profile_cache_dir
        self.sensitivity = sensitivity
        self.gguf_types = list(gguf_types) if isinstance(gguf_types, (list, tuple)) else gguf_types
        if isinstance(gguf_speed, (str, Path)) and str(gguf_speed) != "measure":
            gguf_speed = load_json(gguf_speed, "llama.cpp speed profile")
        self.gguf_speed, self.gguf_max_slowdown = gguf_speed, gguf_max_slowdown
        self.post_init()

    @property
    def policy(self) -> LUCPolicy | GGUFPolicy | None:
        """The policy to apply (skips profiling), or the one applied: an `LUCPolicy`, or a
        `GGUFPolicy` for `target="gguf"`. Set it to either, to its dict, or to None."""
        return self._policy

    @policy.setter
    def policy(self, value: LUCPolicy | GGUFPolicy | dict | None) -> None:
        kind = GGUFPolicy if getattr(self, "target", "pytorch") == "gguf" else LUCPolicy
        if isinstance(value, dict):
            value = kind.from_dict(value)
        elif value is not None and not isinstance(value, (LUCPolicy, GGUFPolicy)):
            raise ValueError(
                "LUCConfig.policy must be an LUCPolicy, a GGUFPolicy, its dict or JSON file, or None; got "
                f"{type(value).__name__}."
            )
        self._policy = value

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
            not isinstance(self.targets, (list, tuple))
            or not self.targets
            or not all(isinstance(t, str) for t in self.targets)
        ):
            raise ValueError(
                "LUCConfig.targets must be None (every Linear) or a non-empty list of module names, got "
                f"{self.targets!r}."
            )
        for b in self.bits:
            if b != UNQUANTIZED_BITS:
                check_bits(b)
        for s in self.sparsities:
            check_sparsity(s, self.prune_structure)
        if self.metric not in METRICS:
            raise ValueError(f"LUCConfig.metric must be one of {tuple(METRICS)}, got {self.metric!r}.")
        if self.weight_budget_bytes is not None and (
            not isinstance(self.weight_budget_bytes, int) or self.weight_budget_bytes <= 0
        ):
            raise ValueError(
                f"LUCConfig.weight_budget_bytes must be a positive integer, got {self.weight_budget_bytes!r}."
            )
        for name in ("num_samples", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LUCConfig.{name} must be a positive integer, got {value!r}.")
        if self.target not in TARGETS:
            raise ValueError(f"LUCConfig.target must be one of {TARGETS}, got {self.target!r}.")
        kind = GGUFPolicy if self.target == "gguf" else LUCPolicy
        if self.policy is not None and not isinstance(self.policy, kind):
            raise ValueError(
                f"LUCConfig.policy is a {type(self.policy).__name__}, but target={self.target!r} takes a "
                f"{kind.__name__}: pass the policy made for that target."
            )
        if self.target == "gguf":
            self._check_gguf()
            return
        if self.policy is not None:
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
        if self.avg_bits is None and self.avg_sparsity is None and self.weight_budget_bytes is None:
            raise ValueError("LUCConfig needs a budget (avg_bits, avg_sparsity or weight_budget_bytes) or a policy.")

    def _check_gguf(self) -> None:
        from edge_llm.luc.ggml import block_type
        from edge_llm.luc.gguf_sensitivity import SENSITIVITIES

        if self.sensitivity not in SENSITIVITIES:
            raise ValueError(f"LUCConfig.sensitivity must be one of {SENSITIVITIES}, got {self.sensitivity!r}.")
        if self.gguf_types is not None:
            if not self.gguf_types or not all(isinstance(t, str) for t in self.gguf_types):
                raise ValueError(f"LUCConfig.gguf_types must be None or a list of type names, got {self.gguf_types!r}.")
            for name in self.gguf_types:
                try:
                    block_type(name)
                except ValueError as error:
                    raise ValueError(f"LUCConfig.gguf_types: {error}") from None
        if self.gguf_speed is not None and self.gguf_speed != "measure" and not isinstance(self.gguf_speed, dict):
            raise ValueError(
                "LUCConfig.gguf_speed must be None, 'measure', a llama.cpp speed profile file or its dict, got "
                f"{type(self.gguf_speed).__name__}."
            )
        if isinstance(self.gguf_speed, dict):
            from edge_llm.luc.gguf_speed import GGUFSpeedProfile

            GGUFSpeedProfile.from_dict(self.gguf_speed)
        if not _is_finite_number(self.gguf_max_slowdown) or self.gguf_max_slowdown < 0:
            raise ValueError(
                f"LUCConfig.gguf_max_slowdown must be a finite number >= 0 (0.5: at most 50% slower than the "
                f"fastest types), got {self.gguf_max_slowdown!r}."
            )
        if self.avg_sparsity:
            raise ValueError("LUCConfig(target='gguf') cannot prune: GGUF has no sparse types; set avg_sparsity=None.")
        if self.policy is not None:
            return
        if self.avg_bits is None and self.weight_budget_bytes is None:
            raise ValueError("LUCConfig(target='gguf') needs a budget: avg_bits or weight_budget_bytes, or a policy.")
        if self.avg_bits is not None and not 1 <= self.avg_bits <= 16:
            raise ValueError(f"LUCConfig.avg_bits={self.avg_bits} must be between 1 and 16 bits per weight.")

    @property
    def method(self) -> CompressionMethod:
        return CompressionMethod(
            self.group_size, self.quant_algorithm, self.prune_method, self.prune_structure, self.quant_grid
        )

    @property
    def budget(self) -> Budget:
        return Budget(self.avg_bits, self.avg_sparsity, self.weight_budget_bytes)

    def to_dict(self) -> dict[str, Any]:
        fields = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in (*_RUNTIME_FIELDS, "_policy")}
        return fields | {"policy": None if self.policy is None else self.policy.to_dict()}

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
    if len(set(values)) != len(values):
        raise ValueError(f"LUCConfig.{name} lists a value twice ({list(values)}); list each candidate once.")
    return [v if name == "bits" else float(v) for v in values]
