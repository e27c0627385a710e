"""Where the exits are, which layers each one trains, and which exit a training step uses."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from edge_llm._registry import Registry


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


@dataclass(frozen=True)
class ExitSampler:
    """A rule for which exit a training step uses (`EdgeLLMConfig.exit_sampling` names it):
    `choose(exits, step, total_steps, seed) -> exit`. A pure function of its arguments, so a run
    resumed from a checkpoint continues the same exit sequence without any saved sampler state."""

    name: str
    choose: Callable[[list[int], int, int, int], int]


EXIT_SAMPLERS: Registry[ExitSampler] = Registry("exit_sampling rule")
EXIT_SAMPLERS.register(ExitSampler("curriculum", _curriculum))
EXIT_SAMPLERS.register(ExitSampler("round_robin", _round_robin))
EXIT_SAMPLERS.register(ExitSampler("uniform", _uniform))


def exit_for_step(exits: list[int], rule: str, step: int, total_steps: int, seed: int) -> int:
    """The active exit of optimizer step `step` (0-based) out of `total_steps` under `rule`."""
    return EXIT_SAMPLERS.lookup(rule).choose(exits, step, total_steps, seed)
