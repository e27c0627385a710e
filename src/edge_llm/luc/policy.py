"""LUC policies: one (bits, sparsity) per decoder layer, and the exact search for the best one.

A policy is a small JSON document a user can read, edit and reuse:

    {"format": "edge-llm/luc-policy", "version": 1,
     "method": {"group_size": 128, "quant_method": "rtn", "prune_method": "wanda", "prune_structure": "unstructured"},
     "targets": null,
     "layers": [{"bits": 4, "sparsity": 0.5}, ...]}

It is checked against `schemas/luc-policy.schema.json` before use.

The search is a multiple-choice knapsack: pick one candidate per layer to minimise the summed
profiled damage under the budgets. It is solved as a 0/1 integer program with HiGHS (through
`scipy.optimize.milp`) with a zero optimality gap, so the optimum is exact, not a greedy guess.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_llm._io import check_schema, load_json, load_schema, save_json
from edge_llm.luc.linear import UNQUANTIZED_BITS, kept_per_row
from edge_llm.luc.method import CompressionMethod
from edge_llm.luc.pack import packed_size
from edge_llm.luc.prune import PRUNE_STRUCTURES, PRUNERS
from edge_llm.luc.quantize import QUANTIZERS

POLICY_FORMAT = "edge-llm/luc-policy"
POLICY_VERSION = 1


def policy_schema() -> dict[str, Any]:
    """The policy's JSON schema with the registered quantizers, pruning scores and structures as
    the method's choices (the schema file leaves those lists to the registries)."""
    schema = load_schema("luc-policy")
    fields = schema["properties"]["method"]["properties"]
    for name, registry in (
        ("quant_method", QUANTIZERS),
        ("prune_method", PRUNERS),
        ("prune_structure", PRUNE_STRUCTURES),
    ):
        fields[name]["enum"] = list(registry)
    return schema


@dataclass
class LUCPolicy:
    """Per-layer bits and sparsity, plus how to compress (shared by all layers)."""

    layers: list[tuple[int, float]]
    method: CompressionMethod = field(default_factory=CompressionMethod)
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        def pair(layer: object) -> bool:
            return (
                isinstance(layer, (list, tuple))
                and len(layer) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in layer)
            )

        if not isinstance(self.layers, (list, tuple)) or not self.layers or not all(map(pair, self.layers)):
            raise ValueError(
                "LUCPolicy.layers must be a non-empty list of (bits, sparsity) pairs, one per decoder layer, e.g. "
                f"[(4, 0.0), (3, 0.25)]; got {self.layers!r:.80}."
            )
        self.layers = [(int(bits), float(sparsity)) for bits, sparsity in self.layers]
        # JSON schema bounds let NaN through (every comparison with it is false)
        not_finite = [i for i, (_, s) in enumerate(self.layers) if not math.isfinite(s)]
        if not_finite:
            raise ValueError(f"Invalid LUC policy: layers {not_finite} have a sparsity that is not a finite number.")
        if not isinstance(self.method, CompressionMethod):
            raise ValueError(f"LUCPolicy.method must be a CompressionMethod, got {type(self.method).__name__}.")
        if self.targets is not None and (
            not isinstance(self.targets, (list, tuple)) or not all(isinstance(t, str) for t in self.targets)
        ):
            raise ValueError(f"LUCPolicy.targets must be None or a list of module names, got {self.targets!r:.80}.")
        self.targets = None if self.targets is None else list(self.targets)

    def to_dict(self) -> dict[str, Any]:
        method = asdict(self.method)
        if method["grid"] == CompressionMethod().grid:
            # The default grid is left out: a policy written before grids existed keeps its bytes,
            # and so the SHA-256 its checkpoints carry.
            del method["grid"]
        return {
            "format": POLICY_FORMAT,
            "version": POLICY_VERSION,
            "method": method,
            "targets": self.targets,
            "layers": [{"bits": bits, "sparsity": sparsity} for bits, sparsity in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LUCPolicy:
        """Build a policy from its JSON form, after checking it against the schema."""
        check_schema(data, policy_schema(), "LUC policy")
        method = CompressionMethod(**data["method"])
        layers = [(int(layer["bits"]), float(layer["sparsity"])) for layer in data["layers"]]
        structure = PRUNE_STRUCTURES[method.prune_structure]
        for index, (_, sparsity) in enumerate(layers):
            try:
                structure.check(sparsity)
            except ValueError as error:
                raise ValueError(f"Invalid LUC policy at layers/{index}: {error}") from None
        return cls(layers=layers, method=method, targets=data.get("targets"))

    def save(self, path: str | Path) -> None:
        save_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LUCPolicy:
        return cls.from_dict(load_json(path, "LUC policy"))

    def summary(self) -> str:
        rows = [f"layer {i:>3}: {b:>2} bits, sparsity {s:.2f}" for i, (b, s) in enumerate(self.layers)]
        return "\n".join(rows)


def linear_storage_bytes(out_features: int, in_features: int, bits: int, sparsity: float, group_size: int) -> int:
    """Bytes a Linear weight takes in `LUCLinear` storage (codes + scales + zero-points + mask)."""
    kept = out_features * kept_per_row(in_features, sparsity)
    mask = packed_size(out_features * in_features, 1) if sparsity > 0 else 0
    if bits == UNQUANTIZED_BITS:
        return kept * 2 + mask
    groups = -(-in_features // group_size)
    return packed_size(kept, bits) + 2 * 2 * out_features * groups + mask


@dataclass
class Budget:
    """What the policy must respect; any subset may be set.

    - `avg_bits`: parameter-weighted mean bit-width of the compressed layers at most this.
    - `avg_sparsity`: parameter-weighted mean sparsity at least this.
    - `weight_budget_bytes`: total `LUCLinear` storage of the compressed layers at most this.
    """

    avg_bits: float | None = None
    avg_sparsity: float | None = None
    weight_budget_bytes: int | None = None


def search_policy(
    damage: np.ndarray,
    candidates: list[tuple[int, float]],
    layer_params: list[int],
    layer_bytes: np.ndarray,
    budget: Budget,
) -> list[int]:
    """The candidate index per layer that minimises total damage within the budget (exact).

    Args:
        damage: `(layers, candidates)` profiled damage of each choice.
        candidates: the `(bits, sparsity)` of each candidate column.
        layer_params: compressed parameters per layer (weights the averages).
        layer_bytes: `(layers, candidates)` storage bytes of each choice.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    damage = np.asarray(damage, dtype=np.float64)
    num_layers, num_candidates = damage.shape
    params = np.asarray(layer_params, dtype=np.float64)
    bits = np.array([b for b, _ in candidates], dtype=np.float64)
    sparsity = np.array([s for _, s in candidates], dtype=np.float64)
    rows, lower, upper = _budget_rows(params, bits, sparsity, np.asarray(layer_bytes, dtype=np.float64), budget)
    one_per_layer = np.kron(np.eye(num_layers), np.ones(num_candidates))
    constraints = [LinearConstraint(one_per_layer, 1, 1)]
    if rows:
        constraints.append(LinearConstraint(np.array(rows), lower, upper))
    result = milp(
        c=damage.reshape(-1),
        constraints=constraints,
        integrality=np.ones(damage.size),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    if result.status != 0 or result.x is None:
        raise ValueError(_infeasible_message(params, bits, sparsity, np.asarray(layer_bytes), budget))
    choice = result.x.reshape(num_layers, num_candidates).argmax(axis=1).tolist()
    _check_budget(choice, params, bits, sparsity, np.asarray(layer_bytes), budget)
    return choice


def _budget_rows(params, bits, sparsity, layer_bytes, budget: Budget):
    rows, lower, upper = [], [], []
    total = params.sum()
    if budget.avg_bits is not None:
        rows.append(np.outer(params, bits).reshape(-1))
        lower.append(-np.inf)
        upper.append(budget.avg_bits * total)
    if budget.avg_sparsity is not None:
        rows.append(np.outer(params, sparsity).reshape(-1))
        lower.append(budget.avg_sparsity * total - 1e-9 * total)
        upper.append(np.inf)
    if budget.weight_budget_bytes is not None:
        rows.append(layer_bytes.reshape(-1))
        lower.append(-np.inf)
        upper.append(float(budget.weight_budget_bytes))
    return rows, lower, upper


def _check_budget(choice, params, bits, sparsity, layer_bytes, budget: Budget) -> None:
    """The chosen policy must meet the budget exactly (no solver tolerance)."""
    total = params.sum()
    picked = np.array(choice)
    layers = np.arange(len(choice))
    if budget.avg_bits is not None and (params * bits[picked]).sum() / total > budget.avg_bits + 1e-12:
        raise ValueError("The policy solver exceeded the bits budget; this is a bug, please report it.")
    if budget.avg_sparsity is not None and (params * sparsity[picked]).sum() / total < budget.avg_sparsity - 1e-9:
        raise ValueError("The policy solver missed the sparsity budget; this is a bug, please report it.")
    if budget.weight_budget_bytes is not None and layer_bytes[layers, picked].sum() > budget.weight_budget_bytes:
        raise ValueError("The policy solver exceeded the byte budget; this is a bug, please report it.")


def _infeasible_message(params, bits, sparsity, layer_bytes, budget: Budget) -> str:
    """Say which budget cannot be met and the smallest (or largest) value that could."""
    problems = []
    if budget.avg_bits is not None and budget.avg_bits < bits.min():
        problems.append(f"avg_bits={budget.avg_bits} is below the smallest candidate, {bits.min():g} bits")
    if budget.avg_sparsity is not None and budget.avg_sparsity > sparsity.max():
        problems.append(f"avg_sparsity={budget.avg_sparsity} is above the largest candidate, {sparsity.max():g}")
    # Only with a byte budget: the inner search below has none, so this cannot recurse.
    smallest_bytes = None
    if budget.weight_budget_bytes is not None:
        smallest_bytes = _smallest_feasible_bytes(params, bits, sparsity, layer_bytes, budget)
    if smallest_bytes is not None and budget.weight_budget_bytes < smallest_bytes:
        problems.append(
            f"weight_budget_bytes={budget.weight_budget_bytes:,} is too small: the smallest policy meeting the other "
            f"budgets takes {smallest_bytes:,} bytes"
        )
    if not problems:
        problems.append("the budgets cannot be met together; relax avg_bits, avg_sparsity or weight_budget_bytes")
    return "No LUC policy fits the budget: " + "; ".join(problems) + "."


def _smallest_feasible_bytes(params, bits, sparsity, layer_bytes, budget: Budget) -> int | None:
    """Fewest bytes of any policy that meets the bits/sparsity budgets (None if none does)."""
    return _min_resource(layer_bytes, params, bits, sparsity, Budget(budget.avg_bits, budget.avg_sparsity, None))


def _min_resource(cost, params, bits, sparsity, budget: Budget) -> int | None:
    try:
        choice = search_policy(cost, list(zip(bits, sparsity, strict=True)), list(params), cost, budget)
    except ValueError:
        return None
    return int(cost[np.arange(len(choice)), choice].sum())
