"""Causal-LM loss of an exit without materialising the full-vocabulary logits of the batch.

At large batch the float32 logits of the whole batch (and their log-softmax and gradient) are most
of the peak memory of a depth-limited training step. Here the LM head runs over chunks of tokens;
each chunk's logits live only while its loss and the gradient with respect to the chunk's hidden
states are computed, during the forward pass. Backward then only scales the stored gradients, so
no logits are recomputed (the same FLOPs as the plain loss, a fraction of its memory).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

IGNORE_INDEX = -100


def shift_for_causal_lm(
    hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions `t` predict `labels[t + 1]`; keep only positions with a real target."""
    targets = labels[:, 1:].reshape(-1)
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    keep = targets != ignore_index
    return states[keep], targets[keep]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, targets, head_fn, chunk_size, denominator, *params):
        grad_states = torch.zeros_like(states)
        grad_params = [torch.zeros_like(p) for p in params]
        total = states.new_zeros((), dtype=torch.float32)
        for start in range(0, states.shape[0], chunk_size):
            with torch.enable_grad():
                chunk = states[start : start + chunk_size].detach().requires_grad_(True)
                logits = head_fn(chunk).float()
                loss = nn.functional.cross_entropy(logits, targets[start : start + chunk_size], reduction="sum")
                grads = torch.autograd.grad(loss, [chunk, *params])
            grad_states[start : start + chunk_size] = grads[0]
            for accumulated, grad in zip(grad_params, grads[1:], strict=True):
                accumulated += grad
            total += loss.detach()
        ctx.save_for_backward(grad_states, *grad_params)
        ctx.denominator = denominator
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad_states, *grad_params = ctx.saved_tensors
        scale = grad_output / ctx.denominator
        return (grad_states * scale.to(grad_states.dtype), None, None, None, None, *(g * scale for g in grad_params))


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head_fn: Callable[[torch.Tensor], torch.Tensor],
    trainable_params: list[nn.Parameter],
    chunk_size: int = 1024,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean next-token cross-entropy of `head_fn(hidden)` against `labels`, computed in chunks.

    Args:
        hidden: `(batch, seq, hidden)` normed hidden states, as the LM head receives them.
        labels: `(batch, seq)` token ids, `ignore_index` where there is no target (not shifted).
        head_fn: maps `(n, hidden)` states to `(n, vocab)` logits (LM head plus post-processing).
        trainable_params: parameters inside `head_fn` that need gradients (e.g. a per-exit head).
        chunk_size: tokens per chunk; peak extra memory is about `chunk_size * vocab * 8` bytes.
        num_items_in_batch: divide the summed loss by this (as transformers does under gradient
            accumulation) instead of by the number of targets here.
    """
    states, targets = shift_for_causal_lm(hidden, labels, ignore_index)
    if num_items_in_batch is None:
        denominator = max(int(targets.numel()), 1)
    else:
        denominator = num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    if states.shape[0] == 0:
        return hidden.sum() * 0.0
    return _ChunkedLinearCrossEntropy.apply(states, targets, head_fn, chunk_size, denominator, *trainable_params)
