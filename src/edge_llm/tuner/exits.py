"""Where the exits are, which layers each one trains, which exit a training step uses, and the
small optional per-exit heads."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable

import torch
from torch import nn


def resolve_exits(num_layers: int, exit_layers: list[int] | None, backprop_depth: int | None) -> tuple[list[int], int]:
    """Turn the config's `exit_layers`/`backprop_depth` (either may be `None`) into concrete values.

    Defaults follow the paper's layout: windows of `backprop_depth` layers tile the model from the
    top, one exit at the top of each window, so every layer is trained by exactly one exit. Four
    exits by default (the reference code uses four on 32-layer LLaMA).
    """
    if num_layers < 1:
        raise ValueError("The model has no decoder layers.")
    if backprop_depth is not None and backprop_depth > num_layers:
        raise ValueError(
            f"EdgeLLMConfig.backprop_depth={backprop_depth} exceeds the model's {num_layers} decoder layers; "
            f"use at most {num_layers}."
        )
    if exit_layers is None:
        depth = backprop_depth or math.ceil(num_layers / 4)
        return sorted(range(num_layers - 1, -1, -depth)), depth
    out_of_range = [layer for layer in exit_layers if not 0 <= layer < num_layers]
    if out_of_range:
        raise ValueError(
            f"EdgeLLMConfig.exit_layers {out_of_range} out of range: the model has {num_layers} decoder layers, "
            f"so exits must be in 0..{num_layers - 1}."
        )
    exits = sorted(set(exit_layers) | {num_layers - 1})
    if backprop_depth is None:
        # The smallest depth whose windows still cover every layer below the top exit.
        backprop_depth = max(b - a for a, b in zip([-1, *exits[:-1]], exits, strict=True))
    return exits, backprop_depth


def window(exit_layer: int, backprop_depth: int) -> range:
    """The decoder layers that receive gradients when `exit_layer` is the active exit."""
    return range(max(0, exit_layer - backprop_depth + 1), exit_layer + 1)


def _curriculum(exits: list[int], step: int, total_steps: int, seed: int) -> int:
    """Equal consecutive phases, lowest exit first; the last phase takes the remainder."""
    steps_per_exit = max(total_steps // len(exits), 1)
    return exits[min(step // steps_per_exit, len(exits) - 1)]


def _round_robin(exits: list[int], step: int, total_steps: int, seed: int) -> int:
    return exits[step % len(exits)]


def _uniform(exits: list[int], step: int, total_steps: int, seed: int) -> int:
    return exits[random.Random(f"edge-llm/{seed}/{step}").randrange(len(exits))]


# `EdgeLLMConfig.exit_sampling` names one of these: (exits, step, total_steps, seed) -> exit. Each
# is a pure function, so a run resumed from a checkpoint continues the same exit sequence without
# any saved sampler state.
EXIT_SAMPLERS: dict[str, Callable[[list[int], int, int, int], int]] = {
    "curriculum": _curriculum,
    "round_robin": _round_robin,
    "uniform": _uniform,
}


def exit_for_step(exits: list[int], rule: str, step: int, total_steps: int, seed: int) -> int:
    """The active exit of optimizer step `step` (0-based) out of `total_steps` under `rule`."""
    if rule not in EXIT_SAMPLERS:
        raise ValueError(f"Unknown exit_sampling rule {rule!r}; use one of {', '.join(map(repr, EXIT_SAMPLERS))}.")
    return EXIT_SAMPLERS[rule](exits, step, total_steps, seed)


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
