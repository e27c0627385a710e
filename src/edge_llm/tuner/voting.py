"""Exit voting: combine the next-token distributions of several exits into one.

All rules work in log space (log-softmax, logsumexp) so that tiny probabilities neither underflow
to zero nor turn into `-inf` log-likelihoods, and they accumulate exit by exit instead of stacking
`num_exits` copies of the vocabulary-sized logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def vote(exit_logits: Sequence[torch.Tensor], rule: str, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Combine per-exit logits, lowest exit first, by `rule`.

    - `"last"`: the last exit's logits, unchanged.
    - `"mean"`: `log(mean_i softmax(z_i))`.
    - `"weighted"`: `log(sum_i w_i softmax(z_i))` with `weights` (summing to 1; `None`: uniform).
    - `"confidence"` (Edge-LLM's rule): `q = max_i softmax(z_i)` element-wise over the vocabulary,
      renormalised: `log(q / sum(q))`.

    For all rules but `"last"` the result is a float32 tensor of log-probabilities: its softmax is
    the voted distribution.
    """
    if not exit_logits:
        raise ValueError("vote() needs the logits of at least one exit.")
    if rule == "last":
        return exit_logits[-1]
    if rule not in ("mean", "weighted", "confidence"):
        raise ValueError(f"Unknown voting rule {rule!r}; use 'last', 'mean', 'weighted' or 'confidence'.")
    if rule == "mean" or weights is None:
        weights = [1.0 / len(exit_logits)] * len(exit_logits)
    if len(weights) != len(exit_logits):
        raise ValueError(f"Got {len(weights)} exit weights for {len(exit_logits)} exits.")
    combined = None
    for logits, weight in zip(exit_logits, weights, strict=True):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if rule != "confidence":
            if weight <= 0:
                continue
            log_probs = log_probs + math.log(weight)
        if combined is None:
            combined = log_probs
        elif rule == "confidence":
            combined = torch.maximum(combined, log_probs)
        else:
            combined = torch.logaddexp(combined, log_probs)
    if rule == "confidence":
        return combined - torch.logsumexp(combined, dim=-1, keepdim=True)
    return combined


def fit_exit_weights(
    target_log_probs: torch.Tensor,
    iterations: int = 200,
    tolerance: float = 1e-7,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """Mixture weights of the exits that maximise the likelihood of held-out tokens.

    `target_log_probs[i, t]` is exit i's log-probability of the true token at position t. The
    weighted vote `sum_i w_i p_i` is a mixture, so the weights are fitted by expectation-
    maximisation, which never decreases the likelihood and keeps the weights on the simplex.
    An exit that never helps gets a weight near zero. Under data parallelism each process passes
    its own tokens and `all_reduce_sum`, and all processes get the same weights.
    """
    reduce = all_reduce_sum or (lambda tensor: tensor)
    log_probs = target_log_probs.double()
    num_exits = log_probs.shape[0]
    num_tokens = reduce(torch.tensor([float(log_probs.shape[1])], dtype=torch.float64, device=log_probs.device))
    if num_tokens.item() == 0:
        raise ValueError("No target tokens to fit the exit weights on (every label is -100?).")
    weights = torch.full((num_exits, 1), 1.0 / num_exits, dtype=torch.float64, device=log_probs.device)
    previous = -math.inf
    for _ in range(iterations):
        joint = log_probs + weights.clamp_min(1e-300).log()
        total = torch.logsumexp(joint, dim=0, keepdim=True)
        sums = reduce(torch.cat([(joint - total).exp().sum(dim=1), total.sum().reshape(1)]))
        weights = (sums[:num_exits] / num_tokens).unsqueeze(1)
        likelihood = (sums[num_exits] / num_tokens).item()
        if likelihood - previous < tolerance:
            break
        previous = likelihood
    return weights.squeeze(1).tolist()
