"""LUC for llama.cpp: one llama.cpp weight type per tensor, chosen from measured sensitivity under a
budget in bytes of the GGUF file.

The search space is the runtime's own formats (`ggml.BLOCK_TYPES` whose blocks tile the tensor's
rows). `gguf_sensitivity.py` measures what each type would cost each tensor (or rates it by a
structural rule); here `search_types` solves the multiple-choice knapsack (exact, HiGHS through
scipy) for the type per tensor that minimises the summed damage within the byte budget,
`apply_types` quantizes the model into those blocks, and `GGUFPolicy` is the choice as a file.
`compress_for_gguf` runs the three.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_llm._io import check_schema, load_schema, save_json
from edge_llm._memory import release_freed_memory
from edge_llm.luc.ggml import block_type, quantize
from edge_llm.luc.ggml_linear import GGMLEmbedding, GGMLLinear
from edge_llm.luc.gguf_sensitivity import (
    EMBEDDING,
    Candidate,
    Statistics,
    aligned,
    calibrate,
    measured_table,
    structural_table,
    tensor_shape,
    weight_count,
    weight_tensors,
)
from edge_llm.modeling import find_decoder_parts

logger = logging.getLogger(__name__)


class BudgetTooSmall(ValueError):
    """No choice of types fits the budget; `smallest` is the fewest bytes any choice takes."""

    def __init__(self, smallest: int, message: str) -> None:
        super().__init__(message)
        self.smallest = smallest


def search_types(
    table: dict[str, list[Candidate]], budget_bytes: int, max_seconds: float | None = None
) -> dict[str, str]:
    """The type per tensor that minimises the summed damage with the tensors' bytes (padded as in
    the file) at most `budget_bytes` and, given `max_seconds`, the candidates' summed seconds at
    most that (exact: a 0/1 program solved by HiGHS with no gap)."""
    limits = [] if max_seconds is None else [(lambda c: c.seconds, max_seconds)]
    choice = _choose(table, lambda c: c.damage, budget_bytes, limits)
    return {name: c.kind.name for name, c in choice.items()}


def fastest_seconds(table: dict[str, list[Candidate]], budget_bytes: int) -> float:
    """The fewest seconds any choice of types within `budget_bytes` adds (exact)."""
    choice = _choose(table, lambda c: c.seconds, budget_bytes, [])
    return sum(c.seconds for c in choice.values())


def _choose(
    table: dict[str, list[Candidate]],
    objective: Callable[[Candidate], float],
    budget_bytes: int,
    limits: list[tuple[Callable[[Candidate], float], float]],
) -> dict[str, Candidate]:
    """One candidate per tensor minimising the summed `objective` with the bytes at most
    `budget_bytes` and each `(measure, limit)`'s sum at most its limit."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(table)
    flat = [c for name in names for c in table[name]]
    costs = np.array([c.nbytes for c in flat], dtype=np.float64)
    smallest = sum(min(c.nbytes for c in table[name]) for name in names)
    if budget_bytes < smallest:
        raise BudgetTooSmall(
            smallest,
            f"The budget of {budget_bytes:,} bytes is below the smallest the candidate types allow: "
            f"{smallest:,} bytes.",
        )
    owner = np.repeat(np.arange(len(names)), [len(table[name]) for name in names])
    one_each = np.zeros((len(names), len(flat)))
    one_each[owner, np.arange(len(flat))] = 1
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(costs[None], -np.inf, float(budget_bytes))]
    for measure, limit in limits:
        values = np.array([measure(c) for c in flat], dtype=np.float64)
        constraints.append(LinearConstraint(values[None], -np.inf, limit))
    # The objective spans orders of magnitude; scaling it does not change the optimum but helps the solver.
    objective_values = np.array([objective(c) for c in flat], dtype=np.float64)
    scale = np.abs(objective_values).max() or 1.0
    result = milp(
        c=objective_values / scale,
        constraints=constraints,
        integrality=np.ones(len(flat)),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    if result.status != 0 or result.x is None:
        raise ValueError(f"No choice of types fits {budget_bytes:,} bytes and the time limits ({result.message}).")
    picked = np.flatnonzero(np.round(result.x) == 1)
    choice = {names[owner[i]]: flat[i] for i in picked}
    if len(choice) != len(names) or sum(c.nbytes for c in choice.values()) > budget_bytes:
        raise ValueError("The type search broke the byte budget; this is a bug, please report it.")
    return {name: choice[name] for name in names}


def policy_bytes(model: nn.Module, choice: dict[str, str]) -> int:
    """Bytes the chosen types take in the GGUF file (each tensor padded to the file's alignment)."""
    tensors = weight_tensors(model)
    return sum(aligned(block_type(choice[name]).tensor_bytes(*tensor_shape(m))) for name, m in tensors.items())


def apply_types(model: nn.Module, choice: dict[str, str], statistics: Statistics | None = None) -> None:
    """Quantize every tensor of `model` to its type in `choice` (with the importance measured in
    `statistics`, if given) and put the blocks in place: `GGMLLinear`s and a `GGMLEmbedding`."""
    tensors = weight_tensors(model)
    missing = sorted(set(tensors) - set(choice))
    if missing:
        raise ValueError(f"The GGUF policy names no type for {len(missing)} tensors, e.g. {missing[0]!r}.")
    from concurrent.futures import ThreadPoolExecutor

    def encode(name: str) -> np.ndarray:
        importance = statistics.importance[name] if statistics is not None else None
        return quantize(tensors[name].weight.detach().float().cpu().numpy(), block_type(choice[name]), importance)

    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        encoded = dict(zip(tensors, pool.map(encode, tensors), strict=True))
    parts = find_decoder_parts(model)
    tied = parts.head_path not in tensors
    for name, module in tensors.items():
        if name == EMBEDDING:
            embedding = GGMLEmbedding.from_blocks(module, choice[name], encoded[name])
            model.set_input_embeddings(embedding)
            if tied:
                model.set_submodule(parts.head_path, GGMLLinear.tied_to(embedding, parts.head(model).bias))
        else:
            model.set_submodule(name, GGMLLinear.from_blocks(module, choice[name], encoded[name]))


GGUF_POLICY_FORMAT = "edge-llm/gguf-policy"


@dataclass
class GGUFPolicy:
    """The llama.cpp type of every weight tensor (by module path; `EMBEDDING` for the token table)."""

    tensors: dict[str, str]
    sensitivity: str = "given"

    def to_dict(self) -> dict[str, Any]:
        return {"format": GGUF_POLICY_FORMAT, "version": 1, "sensitivity": self.sensitivity, "tensors": self.tensors}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GGUFPolicy:
        check_schema(data, load_schema("gguf-policy"), "LUC policy for llama.cpp")
        return cls(dict(data["tensors"]), data["sensitivity"])

    def save(self, path: str | Path) -> None:
        save_json(path, self.to_dict())

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for kind in self.tensors.values():
            counts[kind] = counts.get(kind, 0) + 1
        return ", ".join(f"{count} tensors {kind}" for kind, count in sorted(counts.items()))


def budget_bytes(model: nn.Module, avg_bits: float | None, weight_budget_bytes: int | None) -> int:
    """The byte budget of the policy's tensors: the smaller of `weight_budget_bytes` and `avg_bits`
    bits per weight over them."""
    budgets = [] if weight_budget_bytes is None else [weight_budget_bytes]
    if avg_bits is not None:
        budgets.append(int(avg_bits * weight_count(model) // 8))
    return min(budgets)


def compress_for_gguf(
    model: nn.Module,
    tokens: torch.Tensor | None,
    budget: int | None = None,
    sensitivity: str = "fisher",
    types: tuple[str, ...] | None = None,
    policy: GGUFPolicy | None = None,
    progress: bool = True,
    speed: Any = None,
    max_slowdown: float | None = None,
    cache_dir: str | Path | None = None,
) -> GGUFPolicy:
    """Choose (unless `policy` is given) and apply one llama.cpp type per tensor of `model` within
    `budget` bytes of those tensors in the GGUF file. `tokens`: calibration windows (importance
    matrices, and the Fisher information for `sensitivity="fisher"`); None quantizes without an
    importance matrix. `speed`: a `gguf_speed.GGUFSpeedProfile` of `model` on the device; with it,
    a request (the profile's prompt, then its generated tokens) is also at most `max_slowdown`
    (required with `speed`; `LUCConfig.gguf_max_slowdown` owns the default) slower in llama.cpp
    than with the fastest types within the budget. `cache_dir`: where the measured profile (the
    damage table and the importance vectors) is kept, so that another budget over the same model,
    calibration and types searches again without measuring (None: not kept)."""
    if speed is not None and max_slowdown is None:
        raise ValueError("compress_for_gguf(speed=...) needs max_slowdown: how much slower than the fastest types.")
    measured = policy is None and sensitivity == "fisher"
    if measured and tokens is None:
        raise ValueError("The measured (Fisher) sensitivity needs calibration data.")
    table = None
    if measured:
        table, statistics = measured_table(model, tokens, types, progress, cache_dir)
    else:
        statistics = calibrate(model, tokens, progress, fisher=False) if tokens is not None else None
    if policy is None:
        if table is None:
            table = structural_table(model, types)
        max_seconds = None
        if speed is not None:
            speed.time_table(table, model)
            max_seconds = speed.speed_limit(table, budget, max_slowdown)
        policy = GGUFPolicy(search_types(table, budget, max_seconds), sensitivity)
        if speed is not None:
            predicted = speed.predict(model, policy.tensors)
            logger.info(
                "LUC for llama.cpp: predicted %.0f prefill and %.1f decode tokens/s on %s",
                speed.prompt_tokens / predicted["prefill"],
                speed.decode_tokens / predicted["decode"],
                speed.machine,
            )
    apply_types(model, policy.tensors, statistics)
    del statistics  # the importance vectors (measured_table dropped the Fisher diagonals already)
    release_freed_memory()
    logger.info(
        "LUC for llama.cpp: %s; %.1f MiB of weights", policy.summary(), policy_bytes(model, policy.tensors) / 2**20
    )
    return policy
