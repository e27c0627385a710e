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

import torch

PRUNE_METHODS = ("wanda", "magnitude")
PRUNE_STRUCTURES = ("unstructured", "nm")
NM_GROUP = 4


def check_sparsity(sparsity: float, structure: str = "unstructured") -> None:
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}.")
    if structure == "nm" and abs(sparsity * NM_GROUP - round(sparsity * NM_GROUP)) > 1e-9:
        raise ValueError(
            f"N:{NM_GROUP} pruning keeps a whole number of every {NM_GROUP} weights: sparsity must be 0, 0.25, 0.5 "
            f"or 0.75, got {sparsity!r}."
        )


def prune_mask(
    weight: torch.Tensor,
    sparsity: float,
    method: str = "wanda",
    structure: str = "unstructured",
    input_norms: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The mask of weights to keep, or None when `sparsity` is 0."""
    check_sparsity(sparsity, structure)
    if method not in PRUNE_METHODS:
        raise ValueError(f"Unknown pruning method {method!r}; use one of {PRUNE_METHODS}.")
    if structure not in PRUNE_STRUCTURES:
        raise ValueError(f"Unknown pruning structure {structure!r}; use one of {PRUNE_STRUCTURES}.")
    if sparsity == 0:
        return None
    score = weight.detach().float().abs()
    if method == "wanda":
        if input_norms is None:
            raise ValueError("Wanda pruning scores weights by their input activations: pass calibration data.")
        score = score * input_norms.float().unsqueeze(0)
    out_features, in_features = score.shape
    if structure == "nm":
        if in_features % NM_GROUP:
            raise ValueError(f"N:{NM_GROUP} pruning needs in_features divisible by {NM_GROUP}, got {in_features}.")
        keep_per_group = round(NM_GROUP * (1 - sparsity))
        grouped = score.view(out_features, in_features // NM_GROUP, NM_GROUP)
        kept = grouped.topk(keep_per_group, dim=-1).indices
        return torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, kept, True).view(out_features, in_features)
    keep_per_row = in_features - round(sparsity * in_features)
    kept = score.topk(keep_per_row, dim=1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, kept, True)
