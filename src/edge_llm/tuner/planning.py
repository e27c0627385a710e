"""Plan a training run to a memory budget for the whole process: the deepest window that fits.

On a device what has to fit is the process: the Python runtime and libraries, the base weights
(dense or compressed), the data, and the training step on top. The planner takes what the process
already holds as measured (its resident memory once the model and data are loaded) and measures
the step: probe passes, forward and backward at the adapter's top exit with windows of one and
two layers, count the bytes of every tensor they allocate (`edge_llm._memory.TensorBytesTracker`),
for each micro-batch size, with and without gradient checkpointing, and with the adapter's loss
chunk and a lean one (`edge_llm.tuner.loss.lean_chunk_size`: 16 MiB of logits) where that is
smaller. A step then needs, above the resident memory,

    activations(depth) + gradients(depth) + AdamW's two moments

where activations and gradients grow linearly with the window (each window layer adds the same
tensors) and the moments cover every layer any exit's window trains. Each micro-batch size is
probed rather than scaled, because a step is not proportional to its rows (the loss chunk is not).
The probes run from the smallest micro-batch and the leanest settings up, and only where they can
be of use (`_probes`): they run in this process, so their own peak counts against the budget too.

Planning first fixes glibc's allocator reserve (`limit_allocator_reserve`): with its default
thresholds the step's freed buffers stay resident and the process grows far past what its tensors
hold, which no estimate of the tensors can predict (docs/results.md, "The whole process").

The probes also measure what the process's resident memory rose above what their tensors held
(code paged in by the first backward, the allocator's slack); that overhead is added to the
estimate. Planning resets the process's peak-resident counter (`reset_peak_resident`) to measure it.

A plan fits when its estimate leaves 5% of the budget free (`HEADROOM`): measured peaks were 1.8%
below to 4.4% above the estimates. Of the plans that fit, the planner takes the deepest window
(measured on SmolLM2's sonnets: the top 10 of 30 layers' window took another 1.3% off the
held-out loss over the dense base and 1.5% over a 4.5-bit llama.cpp base, for under 40 MiB;
docs/results.md), and for that window the fastest run: the largest micro-batch (splitting a batch
repeats every per-call cost, such as decoding a compressed base's weights), then no gradient
checkpointing (a third less compute in the window), then the adapter's own loss chunk (a thinner
chunk runs the LM head more often). An impossible budget is refused with the smallest budget that
fits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from edge_llm._memory import (
    TensorBytesTracker,
    limit_allocator_reserve,
    peak_resident_bytes,
    release_freed_memory,
    reset_peak_resident,
    resident_bytes,
)
from edge_llm.tuner.exits import window
from edge_llm.tuner.loss import chunk_tokens, lean_chunk_size

logger = logging.getLogger(__name__)

MIB = 2**20
# AdamW (the Trainer's default optimizer) keeps two moments per trained parameter.
OPTIMIZER_STATES = 2
# A plan fits when its estimate leaves this share of the budget free, for what the estimate does
# not see (the Trainer's per-step objects, allocator noise; not the optimizer: the Trainer's fused
# AdamW step allocates no temporaries beyond its moments, which are counted). Measured
# whole-process peaks of planned runs (SmolLM2, a 1B config) were 1.8% below to 4.4% above their
# estimates, the most for a whole window trained one sequence at a time (800 MiB, 6.5-bit base:
# 811 MiB against 777; docs/results.md, "Planned to a budget"): 2%, the first margin, let that run
# go 11 MiB over its budget.
HEADROOM = (1, 20)  # 5%


class PlanDoesNotFit(ValueError):
    """No window, checkpointing or micro-batch fits the budget (the message names the smallest that would)."""


def usable(budget_bytes: int) -> int:
    """What of `budget_bytes` a plan may take: all but `HEADROOM`."""
    part, whole = HEADROOM
    return budget_bytes * (whole - part) // whole


def fits(estimate: int, budget_bytes: int) -> bool:
    """Whether an estimated peak leaves `HEADROOM` of `budget_bytes` free."""
    return estimate <= usable(budget_bytes)


def smallest_budget(estimate: int) -> int:
    """The smallest budget an estimated peak `fits`."""
    part, whole = HEADROOM
    return -(-estimate * whole // (whole - part))


@dataclass(frozen=True)
class StepProbe:
    """A step's tensor bytes measured at one micro-batch size, by window depth (bytes)."""

    activations_one_layer: int  # activations and transients of a one-layer window
    activations_per_layer: int  # what one more window layer adds to them
    gradients_fixed: int  # gradients outside the window layers (exit heads)
    gradients_per_layer: int  # one window layer's adapter gradients
    peak_bytes: int  # what the probe passes themselves held at most

    def activations(self, depth: int) -> int:
        return self.activations_one_layer + (depth - 1) * self.activations_per_layer

    def gradients(self, depth: int) -> int:
        return self.gradients_fixed + depth * self.gradients_per_layer


@dataclass(frozen=True)
class TrainingPlan:
    """What the run will use, and what the planner expects the process's peak to be (bytes)."""

    backprop_depth: int
    gradient_checkpointing: bool
    micro_batch_size: int
    accumulation_steps: int  # micro-batches per batch
    loss_chunk_size: int | str | None  # `EdgeLLMConfig.loss_chunk_size` to train with
    resident_bytes: int  # the process before training: runtime, weights, data
    step_bytes: int  # what the training step adds on top
    probe_bytes: int  # what planning's probe passes added at most
    overhead_bytes: int  # resident memory the probes added beyond their tensors (allocator, code)

    @property
    def estimated_peak_bytes(self) -> int:
        return self.resident_bytes + max(self.step_bytes, self.probe_bytes) + self.overhead_bytes

    def describe(self) -> str:
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        if isinstance(self.loss_chunk_size, int):
            checkpointing += f", loss in chunks of {self.loss_chunk_size} tokens"
        return (
            f"{self.backprop_depth}-layer window{checkpointing}, micro-batch {self.micro_batch_size} x "
            f"{self.accumulation_steps}; estimated peak {self.estimated_peak_bytes / MIB:.0f} MiB "
            f"({self.resident_bytes / MIB:.0f} MiB before training + "
            f"{(self.estimated_peak_bytes - self.resident_bytes) / MIB:.0f} MiB for training)"
        )


def micro_batch_sizes(batch_size: int) -> list[int]:
    """The batch itself and every power-of-two split of it that divides it evenly, largest first."""
    return [batch_size // 2**k for k in range(batch_size.bit_length()) if batch_size % 2**k == 0]


@contextmanager
def _checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    base = model.get_base_model()
    was = base.is_activation_checkpointing
    if enabled and not was:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif was and not enabled:
        base.activation_checkpointing_disable()
    try:
        yield
    finally:
        if was and not enabled:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif enabled and not was:
            base.activation_checkpointing_disable()


def _probe_pass(peft_model: nn.Module, exit_layer: int, tokens: torch.Tensor) -> tuple[int, int]:
    """(peak tensor bytes, gradient bytes) of one forward and backward pass at `exit_layer`; the
    gradients are dropped again."""
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    with TensorBytesTracker() as tracker, peft_model.base_model.exit_at(exit_layer):
        peft_model(input_ids=tokens, labels=tokens).loss.backward()
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    for parameter in trainable:
        parameter.grad = None
    return tracker.peak_bytes, gradients


def probe_step(
    peft_model: nn.Module,
    batch_size: int,
    seq_len: int,
    checkpointing: bool,
    loss_chunk_size: int | str | None = "asked",
) -> StepProbe:
    """Measure a training step of `batch_size` x `seq_len` tokens at the adapter's top exit with
    windows of one and two layers, with the adapter's loss chunk or `loss_chunk_size`
    (`backprop_depth` and the chunk are restored afterwards)."""
    tuner = peft_model.base_model
    config = tuner.active_edge_config
    if any(p.grad is not None for p in peft_model.parameters() if p.requires_grad):
        raise RuntimeError("Plan the memory before training: the adapter already holds gradients.")
    vocab = peft_model.get_base_model().config.vocab_size
    generator = torch.Generator().manual_seed(0)
    device = next(peft_model.parameters()).device
    tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    was_training, depth_before, chunk_before = peft_model.training, config.backprop_depth, config.loss_chunk_size
    peft_model.train()
    measured = {}
    try:
        if loss_chunk_size != "asked":
            config.loss_chunk_size = loss_chunk_size
        with _checkpointing(peft_model, checkpointing):
            for depth in (1, 2):
                config.backprop_depth = depth
                measured[depth] = _probe_pass(peft_model, config.exit_layers[-1], tokens)
    finally:
        config.backprop_depth, config.loss_chunk_size = depth_before, chunk_before
        peft_model.train(was_training)
    (peak_1, gradients_1), (peak_2, gradients_2) = measured[1], measured[2]
    peak = max(peak_1, peak_2)
    per_layer_gradients = max(gradients_2 - gradients_1, 0)
    activations_1 = max(peak_1 - gradients_1, 0)
    return StepProbe(
        activations_one_layer=activations_1,
        activations_per_layer=max(peak_2 - gradients_2 - activations_1, 0),
        gradients_fixed=max(gradients_1 - per_layer_gradients, 0),
        gradients_per_layer=per_layer_gradients,
        peak_bytes=peak,
    )


def _trained_layers(exit_layers: list[int], depth: int) -> int:
    """How many decoder layers the windows of all exits cover together."""
    return len(set().union(*(window(layer, depth) for layer in exit_layers)))


def step_bytes(probe: StepProbe, depth: int, exit_layers: list[int]) -> int:
    """What a step adds to the process at window `depth`, in micro-batches of the probe's size."""
    moments = OPTIMIZER_STATES * (
        probe.gradients_fixed * len(exit_layers) + probe.gradients_per_layer * _trained_layers(exit_layers, depth)
    )
    return probe.activations(depth) + probe.gradients(depth) + moments


def loss_chunks(peft_model: nn.Module, micro_batch_size: int, seq_len: int) -> list[tuple[int | str | None, int]]:
    """(loss chunk, tokens per chunk) a plan may train with at a micro-batch size, leanest first:
    the lean chunk where it holds fewer tokens than the adapter's own, then the adapter's own."""
    asked = peft_model.base_model.active_edge_config.loss_chunk_size
    config = peft_model.get_base_model().config
    lean = lean_chunk_size(config.vocab_size)
    tokens = chunk_tokens(asked, micro_batch_size * seq_len, config.hidden_size, config.vocab_size)
    return [(lean, lean), (asked, tokens)] if lean < tokens else [(asked, tokens)]


def _probes(
    peft_model: nn.Module, batch_size: int, seq_len: int, room: int, ends: list[int]
) -> dict[tuple[bool, int, int | str | None], StepProbe]:
    """Probes by (checkpointing, micro-batch size, loss chunk). The probes run in this process, so
    their own peak counts against the budget, and one is made only where it can be of use:

    - a larger micro-batch where the smaller ones of the same settings, extrapolated to it, fit
      `room` with the deepest window that fits so far (a shallower one would not be chosen);
    - a costlier setting at a micro-batch (no checkpointing; the adapter's own loss chunk rather
      than the lean one) only where the leaner one holds the whole window in `room` with room to
      spare for what the costlier one adds at least (a larger chunk: its extra float32 logits). A
      costlier setting adds to every window layer or to the step as a whole, so it can train as
      deep as the leaner one, the only case where the plans prefer it, only then.
    """
    full, vocab = ends[-1] + 1, peft_model.get_base_model().config.vocab_size
    probes: dict[tuple[bool, int, int | str | None], StepProbe] = {}
    sizes: dict[tuple[bool, int | str | None], list[int]] = {}  # micro-batches probed, by settings
    deepest = 0  # the deepest window any probe so far fits in `room`
    for micro in sorted(micro_batch_sizes(batch_size)):
        chunks = loss_chunks(peft_model, micro, seq_len)
        for checkpointing in (True, False):
            for index, (chunk, tokens) in enumerate(chunks):
                if index:  # a larger chunk: where the leaner one holds the window and these logits
                    lean_chunk, lean_tokens = chunks[index - 1]
                    leaner, extra = (checkpointing, micro, lean_chunk), (tokens - lean_tokens) * vocab * 4
                elif not checkpointing:  # where the checkpointed step holds the window
                    leaner, extra = (True, micro, chunk), 0
                else:
                    leaner = None
                if leaner is not None and (
                    leaner not in probes or step_bytes(probes[leaner], full, ends) + extra > room
                ):
                    continue
                smaller = sizes.get((checkpointing, chunk), [])
                if smaller and _extrapolated(probes, (checkpointing, chunk), smaller, micro, deepest, ends) > room:
                    continue
                probe = probe_step(peft_model, micro, seq_len, checkpointing, chunk)
                probes[checkpointing, micro, chunk] = probe
                sizes.setdefault((checkpointing, chunk), []).append(micro)
                fitting = [d for d in range(1, full + 1) if step_bytes(probe, d, ends) <= room]
                deepest = max([deepest, *fitting])
    return probes


def _extrapolated(
    probes: dict[tuple[bool, int, int | str | None], StepProbe],
    settings: tuple[bool, int | str | None],
    sizes: list[int],
    micro: int,
    deepest: int,
    ends: list[int],
) -> float:
    """What a probe at `micro` and the step it would be chosen for (the window `deepest` deep) are
    expected to need, from the probes at smaller micro-batches: a straight line through the last
    two (a step grows affinely with its rows), or scaled from a single one."""
    needed = max(deepest, 1)
    checkpointing, chunk = settings

    def need(size: int) -> int:
        probe = probes[checkpointing, size, chunk]
        return max(probe.peak_bytes, step_bytes(probe, needed, ends))

    if len(sizes) == 1:
        return need(sizes[0]) * micro / sizes[0]
    (a, b), (need_a, need_b) = sizes[-2:], (need(sizes[-2]), need(sizes[-1]))
    return need_b + (need_b - need_a) * (micro - b) / (b - a)


def plan_training(peft_model: nn.Module, budget_bytes: int, batch_size: int, seq_len: int) -> TrainingPlan:
    """The best run whose whole process stays within `budget_bytes`, for batches of `batch_size`
    sequences of up to `seq_len` tokens (see the module docstring for what "best" means).

    Call it with the model and data loaded, before training: what the process holds then is
    measured and counts against the budget.

    Raises:
        PlanDoesNotFit (a ValueError): when no window, checkpointing or micro-batch fits, naming the
            smallest budget that would.
    """
    if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 1:
        raise ValueError(f"memory budget must be a positive number of bytes, got {budget_bytes!r}.")
    limit_allocator_reserve()
    release_freed_memory()
    ends = peft_model.base_model.active_edge_config.exit_layers
    measured = reset_peak_resident()
    probes = _probes(peft_model, batch_size, seq_len, usable(budget_bytes) - resident_bytes(), ends)
    high_water = peak_resident_bytes()
    release_freed_memory()
    resident, probed = resident_bytes(), max(probe.peak_bytes for probe in probes.values())
    overhead = max(high_water - resident - probed, 0) if measured else 0
    asked = peft_model.base_model.active_edge_config.loss_chunk_size
    plans = [
        TrainingPlan(d, gc, m, batch_size // m, chunk, resident, step_bytes(probe, d, ends), probed, overhead)
        for (gc, m, chunk), probe in probes.items()
        for d in range(1, ends[-1] + 2)
    ]
    fitting = [plan for plan in plans if fits(plan.estimated_peak_bytes, budget_bytes)]
    if not fitting:
        smallest = min(plans, key=lambda plan: plan.estimated_peak_bytes)
        more = smallest.estimated_peak_bytes - resident
        needed = smallest_budget(smallest.estimated_peak_bytes)
        kept = 100 * HEADROOM[0] / HEADROOM[1]
        raise PlanDoesNotFit(
            f"A memory budget of {budget_bytes:,} bytes ({budget_bytes / MIB:.0f} MiB) cannot hold this run: the "
            f"process holds {resident / MIB:.0f} MiB before training (runtime, weights, data) and the smallest plan "
            f"({smallest.describe()}) needs {more / MIB:.0f} MiB more, and {kept:g}% of the budget is kept free for "
            f"what estimates miss. The smallest budget that fits is {needed:,} bytes ({needed / MIB:.0f} MiB); or "
            "compress the base (LUC) or shorten the sequences."
        )
    plan = max(
        fitting,
        key=lambda p: (
            p.backprop_depth,
            p.micro_batch_size,
            not p.gradient_checkpointing,
            p.loss_chunk_size == asked,
        ),
    )
    logger.info("Memory plan for %d MiB, %d x %d tokens: %s", budget_bytes // MIB, batch_size, seq_len, plan.describe())
    return plan
