"""Exit voting: combine the next-token distributions of several exits into one.

All rules work in log space (log-softmax, logsumexp) so that tiny probabilities neither underflow
to zero nor turn into `-inf` log-likelihoods, and they accumulate exit by exit instead of stacking
`num_exits` copies of the vocabulary-sized logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def vote(exit_logits: Sequence[torch.Tensor], rule: str) -> torch.Tensor:
    """Combine per-exit logits, lowest exit first, by `rule`.

    - `"last"`: the last exit's logits, unchanged.
    - `"mean"`: `log(mean_i softmax(z_i))`.
    - `"confidence"` (Edge-LLM's rule): `q = max_i softmax(z_i)` element-wise over the vocabulary,
      renormalised: `log(q / sum(q))`.

    For `"mean"` and `"confidence"` the result is a float32 tensor of log-probabilities: its
    softmax is the voted distribution.
    """
    if not exit_logits:
        raise ValueError("vote() needs the logits of at least one exit.")
    if rule == "last":
        return exit_logits[-1]
    if rule not in ("mean", "confidence"):
        raise ValueError(f"Unknown voting rule {rule!r}; use 'last', 'mean' or 'confidence'.")
    combined = None
    for logits in exit_logits:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if combined is None:
            combined = log_probs
        elif rule == "mean":
            combined = torch.logaddexp(combined, log_probs)
        else:
            combined = torch.maximum(combined, log_probs)
    if rule == "mean":
        return combined - math.log(len(exit_logits))
    return combined - torch.logsumexp(combined, dim=-1, keepdim=True)
