"""Pruning masks: which weights of a Linear layer stay (True) and which become zero.

Scores: `"magnitude"` is |W|; `"wanda"` (Sun et al., 2023) is |W| * ||X_j||, the weight's magnitude
times the L2 norm of its input channel over calibration tokens. Weights are compared within each
output row, so every row keeps the same number of weights (which keeps the packed storage of a
pruned layer rectangular).

Structures: `"unstructured"` keeps the best `(1 - sparsity)` of each row; `"nm"` keeps the best `N`
of every `M = 4` consecutive weights of a row, with `N = 4 * (1 - sparsity)` (sparsity 0.5 is the
2:4 pattern that sparse tensor cores run; 0.25 is 3:4 and 0.75 is 1:4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edge_llm._registry import Registry

NM_GROUP = 4


@dataclass(frozen=True)
class Pruner:
    """A pruning score (`CompressionMethod.prune_method` names it): `score(|W|, input_norms)`, the
    higher the more worth keeping; `needs_calibration` says it reads the input channels' norms
    (then they are never None)."""

    name: str
    score: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    needs_calibration: bool = False


@dataclass(frozen=True)
class PruneStructure:
    """Which weights a mask may drop (`CompressionMethod.prune_structure` names it): `mask(score,
    sparsity)` keeps the best-scored weights of each row in this structure; `check(sparsity)` raises
    for a sparsity the structure cannot hold."""

    name: str
    mask: Callable[[torch.Tensor, float], torch.Tensor]
    check: Callable[[float], None] = lambda sparsity: None


PRUNERS: Registry[Pruner] = Registry("pruning method")
PRUNE_STRUCTURES: Registry[PruneStructure] = Registry("pruning structure")

PRUNERS.register(Pruner("wanda", lambda magnitude, norms: magnitude * norms.float().unsqueeze(0), True))
PRUNERS.register(Pruner("magnitude", lambda magnitude, norms: magnitude))


def _unstructured(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    in_features = score.shape[1]
    kept = score.topk(in_features - round(sparsity * in_features), dim=1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, kept, True)


def _check_nm(sparsity: float) -> None:
    if abs(sparsity * NM_GROUP - round(sparsity * NM_GROUP)) > 1e-9:
        raise ValueError(
            f"N:{NM_GROUP} pruning keeps a whole number of every {NM_GROUP} weights: sparsity must be 0, 0.25, 0.5 "
            f"or 0.75, got {sparsity!r}."
        )


def _nm(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    out_features, in_features = score.shape
    if in_features % NM_GROUP:
        raise ValueError(f"N:{NM_GROUP} pruning needs in_features divisible by {NM_GROUP}, got {in_features}.")
    grouped = score.view(out_features, in_features // NM_GROUP, NM_GROUP)
    kept = grouped.topk(round(NM_GROUP * (1 - sparsity)), dim=-1).indices
    return torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, kept, True).view(out_features, in_features)


PRUNE_STRUCTURES.register(PruneStructure("unstructured", _unstructured))
PRUNE_STRUCTURES.register(PruneStructure("nm", _nm, _check_nm))


def check_sparsity(sparsity: float, structure: str = "unstructured") -> None:
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}.")
    PRUNE_STRUCTURES.lookup(structure).check(sparsity)


def prune_mask(
    weight: torch.Tensor,
    sparsity: float,
    method: str = "wanda",
    structure: str = "unstructured",
    input_norms: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The mask of weights to keep, or None when `sparsity` is 0."""
    check_sparsity(sparsity, structure)
    pruner = PRUNERS.lookup(method)
    if sparsity == 0:
        return None
    if pruner.needs_calibration and input_norms is None:
        raise ValueError(
            f"{method.capitalize()} pruning scores weights by their input activations: pass calibration data."
        )
    score = pruner.score(weight.detach().float().abs(), input_norms)
    return PRUNE_STRUCTURES.lookup(structure).mask(score, sparsity)
