"""The small optional per-exit heads: a trainable copy of the final norm (`exit_head="norm"`) or a
low-rank correction of the shared LM head (`exit_head="lora"`), and `EXIT_HEADS`, the registry
`EdgeLLMConfig.exit_head` names.

A head takes part in an exit's logits through two methods the controller calls, whatever its kind:
`normed(norm)`, the final norm module the exit uses, and `output(head)`, the LM head module it uses
(either may be the model's own, passed in)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edge_llm._registry import Registry


class ExitNorm(nn.Module):
    """A trainable copy of the model's final norm for one exit (`exit_head="norm"`)."""

    def __init__(self, final_norm: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = copy.deepcopy(final_norm).to(dtype)
        self.norm.requires_grad_(True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden_states).to(hidden_states.dtype)

    def normed(self, norm: nn.Module) -> nn.Module:
        return self

    def output(self, head: nn.Module) -> nn.Module:
        return head


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

    def normed(self, norm: nn.Module) -> nn.Module:
        return norm

    def output(self, head: nn.Module) -> nn.Module:
        return HeadWithExitLoRA(head, self)


class HeadWithExitLoRA(nn.Module):
    """The shared LM head plus one exit's LoRA; swapped in for the LM head while that exit runs."""

    def __init__(self, head: nn.Module, lora: ExitHeadLoRA) -> None:
        super().__init__()
        self.head = head
        self.lora = lora

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden_states)
        return logits + self.lora(hidden_states).to(logits.dtype)


@dataclass(frozen=True)
class ExitHeadKind:
    """A kind of per-exit head (`EdgeLLMConfig.exit_head` names it): `build(final_norm, lm_head,
    rank, dtype)` makes one exit's head — a module with `normed`/`output` (see the module
    docstring) — or is None where exits share the model's own norm and head; `uses_rank`: it reads
    `exit_head_rank`."""

    name: str
    build: Callable[[nn.Module, nn.Module, int, torch.dtype], nn.Module] | None
    uses_rank: bool = False


def _exit_head_lora(final_norm: nn.Module, lm_head: nn.Module, rank: int, dtype: torch.dtype) -> ExitHeadLoRA:
    # LoRA-wrapped or compressed heads expose the plain Linear sizes; fall back to the weight's shape.
    vocab_size = getattr(lm_head, "out_features", None) or lm_head.weight.shape[0]
    hidden_size = getattr(lm_head, "in_features", None) or lm_head.weight.shape[1]
    device = next(final_norm.parameters(), lm_head.weight).device
    return ExitHeadLoRA(hidden_size, vocab_size, rank, dtype, device)


EXIT_HEADS: Registry[ExitHeadKind] = Registry("exit head")
EXIT_HEADS.register(ExitHeadKind("shared", None))
EXIT_HEADS.register(ExitHeadKind("norm", lambda final_norm, lm_head, rank, dtype: ExitNorm(final_norm, dtype)))
EXIT_HEADS.register(ExitHeadKind("lora", _exit_head_lora, uses_rank=True))


def build_exit_heads(
    kind: str, exits: list[int], final_norm: nn.Module, lm_head: nn.Module, rank: int, dtype: torch.dtype
) -> nn.ModuleDict:
    """One trainable head per exit below the last; the last exit is the model's own output."""
    build = EXIT_HEADS.lookup(kind).build
    if build is None:
        return nn.ModuleDict()
    return nn.ModuleDict({str(layer): build(final_norm, lm_head, rank, dtype) for layer in exits[:-1]})
