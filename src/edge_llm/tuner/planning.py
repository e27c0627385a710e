"""Plan a training run to a memory budget for the whole process: the deepest window that fits.

On a device what has to fit is the process: the Python runtime and libraries, the base weights
(dense or compressed), the data, and the training step on top. The planner takes what the process
already holds as measured (its resident memory once the model and data are loaded) and measures
the step: two probe passes per checkpointing setting, forward and backward at the planned batch
shape with windows of one and two layers, count the bytes of every tensor they allocate
(`edge_llm._memory.TensorBytesTracker`). A step then needs, above the resident memory,

    activations(depth) x micro-batch / batch  +  gradients(depth)  +  AdamW's two moments

where activations and gradients grow linearly with the window (each window layer adds the same
tensors) and the moments cover every layer any exit's window trains.

Planning first fixes glibc's allocator reserve (`limit_allocator_reserve`): with its default
thresholds the step's small freed buffers stay resident and the process grows far past what its
tensors hold (SmolLM2-135M, batch 8: 282 MiB above the loaded model for tensors peaking at 61 MiB),
which no estimate of the tensors can predict.

Of the plans that fit, the planner takes the deepest window (deeper windows adapt more layers:
docs/results.md), then the one without gradient checkpointing (a third less compute in the
window), then the largest micro-batch (fewer, larger matmuls). An impossible budget is refused
with the smallest budget that fits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from edge_llm._memory import TensorBytesTracker, limit_allocator_reserve, release_freed_memory, resident_bytes
from edge_llm.tuner.exits import window

logger = logging.getLogger(__name__)

MIB = 2**20
# AdamW (the Trainer's default optimizer) keeps two moments per trained parameter.
OPTIMIZER_STATES = 2


@dataclass(frozen=True)
class StepProbe:
    """A step's tensor bytes measured at the planned batch, by window depth (bytes)."""

    activations_one_layer: int  # activations and transients of a one-layer window, at the full batch
    activations_per_layer: int  # what one more window layer adds to them
    gradients_fixed: int  # gradients outside the window layers (exit heads)
    gradients_per_layer: int  # one window layer's adapter gradients

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
    resident_bytes: int  # the process before training: runtime, weights, data
    step_bytes: int  # what the training step adds on top

    @property
    def estimated_peak_bytes(self) -> int:
        return self.resident_bytes + self.step_bytes

    def describe(self) -> str:
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        return (
            f"window of {self.backprop_depth} layers{checkpointing}, micro-batch {self.micro_batch_size} x "
            f"{self.accumulation_steps}; estimated peak {self.estimated_peak_bytes / MIB:.0f} MiB "
            f"({self.resident_bytes / MIB:.0f} MiB before training + {self.step_bytes / MIB:.0f} MiB for the step)"
        )


def micro_batch_sizes(batch_size: int) -> list[int]:
    """The batch itself and every power-of-two split of it that divides it evenly, largest first."""
    return [batch_size // 2**k for k in range(batch_size.bit_length()) if batch_size % 2**k == 0]


@contextmanager
def _checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    base = model.get_base_model()
    was = base.is_gradient_checkpointing
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


def probe_step(peft_model: nn.Module, batch_size: int, seq_len: int, checkpointing: bool) -> StepProbe:
    """Measure a training step of `batch_size` x `seq_len` tokens at the adapter's top exit with
    windows of one and two layers (`backprop_depth` is restored afterwards)."""
    tuner = peft_model.base_model
    config = tuner.active_edge_config
    if any(p.grad is not None for p in peft_model.parameters() if p.requires_grad):
        raise RuntimeError("Plan the memory before training: the adapter already holds gradients.")
    vocab = peft_model.get_base_model().config.vocab_size
    generator = torch.Generator().manual_seed(0)
    device = next(peft_model.parameters()).device
    tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    was_training, depth_before = peft_model.training, config.backprop_depth
    peft_model.train()
    measured = {}
    try:
        with _checkpointing(peft_model, checkpointing):
            for depth in (1, 2):
                config.backprop_depth = depth
                measured[depth] = _probe_pass(peft_model, config.exit_layers[-1], tokens)
    finally:
        config.backprop_depth = depth_before
        peft_model.train(was_training)
    (peak_1, gradients_1), (peak_2, gradients_2) = measured[1], measured[2]
    per_layer_gradients = max(gradients_2 - gradients_1, 0)
    activations_1 = max(peak_1 - gradients_1, 0)
    return StepProbe(
        activations_one_layer=activations_1,
        activations_per_layer=max(peak_2 - gradients_2 - activations_1, 0),
        gradients_fixed=max(gradients_1 - per_layer_gradients, 0),
        gradients_per_layer=per_layer_gradients,
    )


def _trained_layers(exit_layers: list[int], depth: int) -> int:
    """How many decoder layers the windows of all exits cover together."""
    return len(set().union(*(window(layer, depth) for layer in exit_layers)))


def step_bytes(probe: StepProbe, depth: int, micro_fraction: float, exit_layers: list[int]) -> int:
    """What a step adds to the process at window `depth` with micro-batches of `micro_fraction` of
    the probed batch."""
    moments = OPTIMIZER_STATES * (
        probe.gradients_fixed * len(exit_layers) + probe.gradients_per_layer * _trained_layers(exit_layers, depth)
    )
    return int(probe.activations(depth) * micro_fraction) + probe.gradients(depth) + moments


def plan_training(peft_model: nn.Module, budget_bytes: int, batch_size: int, seq_len: int) -> TrainingPlan:
    """The best run whose whole process stays within `budget_bytes`, for batches of `batch_size`
    sequences of up to `seq_len` tokens (see the module docstring for what "best" means).

    Call it with the model and data loaded, before training: what the process holds then is
    measured and counts against the budget.

    Raises:
        ValueError: when no window, checkpointing or micro-batch fits, naming the smallest budget that would.
    """
    if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 1:
        raise ValueError(f"memory budget must be a positive number of bytes, got {budget_bytes!r}.")
    limit_allocator_reserve()
    tuner = peft_model.base_model
    ends = tuner.active_edge_config.exit_layers
    probes = {gc: probe_step(peft_model, batch_size, seq_len, gc) for gc in (False, True)}
    release_freed_memory()
    resident = resident_bytes()
    plans = [
        TrainingPlan(d, gc, micro, batch_size // micro, resident, step_bytes(probe, d, micro / batch_size, ends))
        for gc, probe in probes.items()
        for micro in micro_batch_sizes(batch_size)
        for d in range(1, ends[-1] + 2)
    ]
    fitting = [plan for plan in plans if plan.estimated_peak_bytes <= budget_bytes]
    if not fitting:
        smallest = min(plans, key=lambda plan: plan.estimated_peak_bytes)
        raise ValueError(
            f"A memory budget of {budget_bytes:,} bytes ({budget_bytes / MIB:.0f} MiB) cannot hold this run: the "
            f"process holds {resident / MIB:.0f} MiB before training (runtime, weights, data) and the smallest step "
            f"({smallest.describe()}) needs {smallest.step_bytes / MIB:.0f} MiB more. The smallest budget that fits "
            f"is {smallest.estimated_peak_bytes:,} bytes ({smallest.estimated_peak_bytes / MIB:.0f} MiB); or compress "
            "the base (LUC) or shorten the sequences."
        )
    plan = max(fitting, key=lambda p: (p.backprop_depth, not p.gradient_checkpointing, p.micro_batch_size))
    logger.info("Memory plan for %d MiB, %d x %d tokens: %s", budget_bytes // MIB, batch_size, seq_len, plan.describe())
    return plan
