"""Exit voting: combine the next-token distributions of several exits into one.

All rules work in log space (log-softmax, logsumexp) so that tiny probabilities neither underflow
to zero nor turn into `-inf` log-likelihoods, and they accumulate exit by exit instead of stacking
`num_exits` copies of the vocabulary-sized logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from edge_llm._registry import Registry


@dataclass(frozen=True)
class VotingRule:
    """One way to combine the exits' next-token distributions.

    `combine(exit_logits, weights)`: the voted logits (or log-probabilities) from per-exit logits,
    lowest exit first, and one weight per exit (summing to 1). `weighted`: the rule uses the
    adapter's `exit_weights` (uniform until fitted), so exits of weight 0 can be left out of the
    pass. `last_only`: only the last exit is needed, so a pass never runs the other exits."""

    name: str
    description: str
    combine: Callable[[Sequence[torch.Tensor], Sequence[float]], torch.Tensor]
    weighted: bool = False
    last_only: bool = False


VOTING_RULES: Registry[VotingRule] = Registry("voting rule")
register_voting_rule = VOTING_RULES.register
voting_rule = VOTING_RULES.lookup


def vote(
    exit_logits: Sequence[torch.Tensor] | Mapping[int, torch.Tensor], rule: str, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Combine per-exit logits, lowest exit first, by the registered rule `rule` (see
    `VOTING_RULES`; `weights`: one per exit for weighted rules, `None` for uniform).
    `exit_logits` may be the `{layer: logits}` dict a voting pass returns (`return_exit_logits`).

    For all rules but `"last"` the result is a float32 tensor of log-probabilities: its softmax is
    the voted distribution.
    """
    chosen = voting_rule(rule)
    if isinstance(exit_logits, Mapping):
        exit_logits = [exit_logits[layer] for layer in sorted(exit_logits)]
    if not exit_logits:
        raise ValueError("vote() needs the logits of at least one exit.")
    if not chosen.weighted or weights is None:
        weights = [1.0 / len(exit_logits)] * len(exit_logits)
    if len(weights) != len(exit_logits):
        raise ValueError(f"Got {len(weights)} exit weights for {len(exit_logits)} exits.")
    return chosen.combine(exit_logits, weights)


def _last(exit_logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    return exit_logits[-1]


def _mixture(exit_logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`log(sum_i w_i softmax(z_i))`, accumulated in log space exit by exit."""
    combined = None
    for logits, weight in zip(exit_logits, weights, strict=True):
        if weight <= 0:
            continue
        log_probs = torch.log_softmax(logits.float(), dim=-1) + math.log(weight)
        combined = log_probs if combined is None else torch.logaddexp(combined, log_probs)
    return combined


def _confidence(exit_logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`q = max_i softmax(z_i)` element-wise over the vocabulary, renormalised."""
    combined = None
    for logits in exit_logits:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        combined = log_probs if combined is None else torch.maximum(combined, log_probs)
    return combined - torch.logsumexp(combined, dim=-1, keepdim=True)


def _geometric(exit_logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`prod_i p_i^{w_i}`, renormalised (log-linear pooling): a token wins only if every voting
    exit gives it probability, where a mixture lets one confident exit carry it."""
    combined = None
    for logits, weight in zip(exit_logits, weights, strict=True):
        if weight <= 0:
            continue
        log_probs = torch.log_softmax(logits.float(), dim=-1) * weight
        combined = log_probs if combined is None else combined + log_probs
    return combined - torch.logsumexp(combined, dim=-1, keepdim=True)


register_voting_rule(VotingRule("last", "the last exit's logits, unchanged", _last, last_only=True))
register_voting_rule(VotingRule("mean", "log(mean_i p_i): the exits' mixture, uniform", _mixture))
register_voting_rule(VotingRule("weighted", "log(sum_i w_i p_i) with the fitted exit_weights", _mixture, weighted=True))
register_voting_rule(VotingRule("confidence", "Edge-LLM's rule: max_i p_i element-wise, renormalised", _confidence))
register_voting_rule(
    VotingRule("geometric", "prod_i p_i^w_i renormalised, with the fitted exit_weights", _geometric, weighted=True)
)


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
