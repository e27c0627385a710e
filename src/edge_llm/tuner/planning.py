"""Size the gradient window from a memory budget: the deepest window whose training step fits.

A deeper window adapts more layers (better models, see docs/results.md) and keeps more activations
for backward. What a step holds above the loaded model is, per token, a fixed part (embedding, exit
head, loss) plus one part per window layer, and it grows linearly with the number of tokens (flash
attention keeps no T x T matrix). Both parts are *measured*, not modelled: two probe passes over a
short random batch, with windows of one and two layers, count the bytes autograd saves for backward.
On top come the optimizer's state of the adapters (gradients and two AdamW moments) and the largest
transient buffer, the loss chunk's logits.

With gradient checkpointing a window layer keeps only its input, plus one layer's activations while
it is recomputed: the same budget then buys a much deeper window, for about a third more compute in
the window.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from edge_llm.tuner.loss import auto_chunk_size

logger = logging.getLogger(__name__)

PROBE_TOKENS = 64


@dataclass(frozen=True)
class WindowPlan:
    """The deepest window that fits a budget, and what the estimate is made of (bytes)."""

    backprop_depth: int
    estimated_bytes: int
    fixed_bytes: int  # adapters' optimizer state + loss transient + per-token fixed part
    per_layer_bytes: int  # one more window layer, at the planned batch

    def bytes_for(self, depth: int) -> int:
        return self.fixed_bytes + depth * self.per_layer_bytes


def _saved_bytes(peft_model: nn.Module, exit_layer: int, tokens: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one exit pass (parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), peft_model.exit_at(exit_layer):
        loss = peft_model(input_ids=tokens, labels=tokens).loss
    del loss
    return sum(storages.values())


def plan_backprop_depth(
    peft_model: nn.Module,
    budget_bytes: int,
    batch_size: int,
    seq_len: int,
    checkpointing: bool = False,
) -> WindowPlan:
    """The deepest window (at the top exit) whose training step needs at most `budget_bytes` above the
    loaded model, for batches of `batch_size` x `seq_len` tokens.

    The probes run on the adapter's own top exit with the current settings (LoRA targets, exit head,
    loss chunking, dtype); the adapter's `backprop_depth` is restored afterwards.

    Raises:
        ValueError: when not even a one-layer window fits, naming the smallest budget that would.
    """
    if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 1:
        raise ValueError(f"memory budget must be a positive number of bytes, got {budget_bytes!r}.")
    tuner = peft_model.base_model
    config = tuner.active_edge_config
    layers = len(tuner._controller.layers)
    top = config.exit_layers[-1]
    device = next(peft_model.parameters()).device
    vocab = peft_model.get_base_model().config.vocab_size
    probe = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0)).to(device)
    was_training, depth_before = peft_model.training, config.backprop_depth
    peft_model.train()
    try:
        measured = {}
        for depth in (1, 2):
            config.backprop_depth = depth
            measured[depth] = _saved_bytes(peft_model, top, probe)
    finally:
        config.backprop_depth = depth_before
        peft_model.train(was_training)
    tokens = batch_size * seq_len
    per_token_layer = max(measured[2] - measured[1], 0) / PROBE_TOKENS
    per_token_fixed = max(measured[1] - per_token_layer * PROBE_TOKENS, 0) / PROBE_TOKENS
    hidden = peft_model.get_base_model().config.hidden_size
    if checkpointing:
        # A checkpointed layer keeps its input; the one being recomputed holds its full activations.
        per_token_fixed += per_token_layer
        per_token_layer = hidden * next(peft_model.parameters()).element_size()
    trainable = sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad)
    if config.loss_chunk_size is None:  # full logits: their gradient comes on top of what is saved
        loss_transient = tokens * vocab * 4
    else:
        chunk = auto_chunk_size(tokens, hidden, vocab) if config.loss_chunk_size == "auto" else config.loss_chunk_size
        loss_transient = min(chunk, tokens) * vocab * 4
    fixed = int(3 * trainable + loss_transient + tokens * per_token_fixed)
    per_layer = int(tokens * per_token_layer)
    fitting = [d for d in range(1, layers + 1) if fixed + d * per_layer <= budget_bytes]
    if not fitting:
        raise ValueError(
            f"A training step of {batch_size} x {seq_len} tokens needs at least {fixed + per_layer} bytes above the "
            f"model (a one-layer window); the budget is {budget_bytes}. Raise the budget, lower the batch or the "
            "sequence length, or turn on gradient checkpointing."
        )
    plan = WindowPlan(fitting[-1], fixed + fitting[-1] * per_layer, fixed, per_layer)
    logger.info(
        "Window for a %d-byte budget at %d x %d tokens: %d of %d layers (estimated %d bytes%s)",
        budget_bytes,
        batch_size,
        seq_len,
        plan.backprop_depth,
        layers,
        plan.estimated_bytes,
        ", checkpointed" if checkpointing else "",
    )
    return plan
