"""The small optional per-exit heads: a trainable copy of the final norm (`exit_head="norm"`) or a
low-rank correction of the shared LM head (`exit_head="lora"`)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ExitNorm(nn.Module):
    """A trainable copy of the model's final norm for one exit (`exit_head="norm"`)."""

    def __init__(self, final_norm: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = copy.deepcopy(final_norm).to(dtype)
        self.norm.requires_grad_(True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden_states).to(hidden_states.dtype)


class ExitHeadLoRA(nn.Module):
    """A low-rank correction to the shared LM head for one exit (`exit_head="lora"`).

    `up` starts at zero, so a fresh exit head is exactly the shared head.
    """

    def __init__(self, hidden_size: int, vocab_size: int, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, vocab_size, bias=False, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(hidden_states.to(self.down.weight.dtype)))


class HeadWithExitLoRA(nn.Module):
    """The shared LM head plus one exit's LoRA; swapped in for the LM head while that exit runs."""

    def __init__(self, head: nn.Module, lora: ExitHeadLoRA) -> None:
        super().__init__()
        self.head = head
        self.lora = lora

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden_states)
        return logits + self.lora(hidden_states).to(logits.dtype)


def build_exit_heads(
    kind: str, exits: list[int], final_norm: nn.Module, lm_head: nn.Module, rank: int, dtype: torch.dtype
) -> nn.ModuleDict:
    """One trainable head per exit below the last; the last exit is the model's own output."""
    heads = nn.ModuleDict()
    if kind == "shared":
        return heads
    # LoRA-wrapped or compressed heads expose the plain Linear sizes; fall back to the weight's shape.
    vocab_size = getattr(lm_head, "out_features", None) or lm_head.weight.shape[0]
    hidden_size = getattr(lm_head, "in_features", None) or lm_head.weight.shape[1]
    device = next(final_norm.parameters(), lm_head.weight).device
    for layer in exits[:-1]:
        if kind == "norm":
            heads[str(layer)] = ExitNorm(final_norm, dtype)
        else:
            heads[str(layer)] = ExitHeadLoRA(hidden_size, vocab_size, rank, dtype, device)
    return heads
