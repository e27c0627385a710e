"""`EdgeTrainer`: a `transformers.Trainer` that trains an Edge-LLM adapter one exit per step."""

from __future__ import annotations

import logging
import numbers
import os
from itertools import islice
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput

from edge_llm._memory import allocator_reserve_limited, peak_resident_bytes, reset_peak_resident
from edge_llm._warnings import warn_loudly
from edge_llm.tuner.loss import IGNORE_INDEX, shift_for_causal_lm
from edge_llm.tuner.model import EdgeLLMModel
from edge_llm.tuner.planning import MIB, TrainingPlan, plan_training
from edge_llm.tuner.voting import voting_rule

logger = logging.getLogger(__name__)

# Training batches that `select_exits` scores the exits on.
SELECTION_BATCHES = 4


def _warn_uniform_vote(voting: str, exits: list[int], why: str) -> None:
    # Uniform weights let exits that cannot predict vote as much as the last one: on a small model
    # that ruins the output (SmolLM2: perplexity 151 instead of 61), so this must not pass quietly.
    message = (
        f"voting={voting!r} but the exit weights of exits {exits} were not fitted ({why}): the vote stays "
        "uniform, which can be far worse than the last exit alone. Pass an eval_dataset to EdgeTrainer, call "
        "trainer.calibrate_exit_weights(dataset), or use voting='last'."
    )
    warn_loudly(logger, message, stacklevel=3)


def _refuse_sharding_engines(args: Any) -> None:
    """FSDP and DeepSpeed, asked for in the arguments or by `accelerate launch`'s environment, are
    refused before any work: each step changes which adapter weights get gradients, which sharded
    engines must be told of (or they drop or wait for gradients); that is not built or tested yet."""
    fsdp = bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    deepspeed = getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in (
        "1",
        "true",
    )
    if fsdp or deepspeed:
        engine = "FSDP" if fsdp else "DeepSpeed"
        raise ValueError(
            f"EdgeTrainer runs on one device or under DDP (accelerate launch --multi_gpu, or torchrun); {engine} is "
            "not supported yet: each step changes which adapter weights train, which a sharding engine must be told "
            "of. Launch without it (docs/scaling-out.md)."
        )


class EdgeTrainer(Trainer):
    """`transformers.Trainer` for models made with `get_peft_model(model, EdgeLLMConfig(...))`.

    Same constructor as `Trainer`. What changes:

    - every optimizer step runs with one active exit, picked by the adapter's `exit_sampling`
      from the global step and `args.seed` (so gradient-accumulation micro-batches share it and a
      resumed run continues the same sequence): the forward pass stops at that exit, gradients
      reach only the `backprop_depth` layers below it, and the loss is computed in chunks without
      full-vocabulary logits;
    - the optimizer holds every adapter weight, but parameters that got no gradient in a step are
      skipped (gradients are reset to `None`), so AdamW never allocates state for layers that did
      not train;
    - training logs add `active_exit` and `exit_<layer>_loss` (mean loss of the steps each exit
      ran since the last log);
    - evaluation runs voting passes and reports `<prefix>_exit_<layer>_loss/_accuracy` and
      `<prefix>_voted_loss/_accuracy` (next-token accuracy); `<prefix>_loss` is the voted loss per
      token too (Trainer's mean of per-batch means would weigh short batches' tokens more);
    - with `voting="weighted"` and no `exit_weights` yet, `train()` ends by fitting them on
      `eval_dataset` (`calibrate_exit_weights`);
    - with `exit_layers="auto"` it first keeps only the exits that predict (`select_exits`), and
      with `memory_budget_bytes` (the device's memory for the whole process: runtime, weights,
      data and the step) it plans the run to fit (`plan_memory`): the gradient window, gradient
      checkpointing and micro-batches (gradient accumulation keeps the batch) chosen by
      `edge_llm.tuner.planning`; the process's measured peak is
      logged beside the plan's estimate and added to the metrics as `train_peak_resident_bytes`.
    """

    def __init__(
        self,
        model: PeftModel | None = None,
        args: Any = None,
        *more: Any,
        memory_budget_bytes: int | None = None,
        **kwargs: Any,
    ) -> None:
        tuner = getattr(model, "base_model", None)
        if not isinstance(tuner, EdgeLLMModel):
            raise TypeError(
                "EdgeTrainer trains Edge-LLM adapters: pass the model returned by "
                "get_peft_model(model, edge_llm.EdgeLLMConfig(...)) (or PeftModel.from_pretrained(..., "
                f"is_trainable=True) on an Edge-LLM adapter); got {type(model).__name__}."
            )
        if args is not None and args.ddp_find_unused_parameters is False:
            raise ValueError(
                "EdgeTrainer needs ddp_find_unused_parameters=True (or unset): each step trains one window, so the "
                "other layers' adapter weights are unused in that step and DDP would wait for their gradients."
            )
        _refuse_sharding_engines(args)
        super().__init__(model, args, *more, **kwargs)
        self.tuner: EdgeLLMModel = tuner
        self.memory_budget_bytes = None if memory_budget_bytes is None else _whole_bytes(memory_budget_bytes)
        if self.memory_budget_bytes is not None and not allocator_reserve_limited():
            warn_loudly(
                logger,
                "EdgeTrainer(memory_budget_bytes=...): glibc's allocator reserve was not bounded before the model was "
                "loaded, so memory freed while loading it can come back during training and the process can exceed "
                "the plan. Call edge_llm.limit_allocator_reserve() before loading the model (edge-llm tune --memory "
                "does), or start Python with MALLOC_MMAP_THRESHOLD_=131072.",
                stacklevel=2,
            )
        self.memory_plan: TrainingPlan | None = None
        self._loss_chunk_asked: int | str | None = None  # the adapter's loss chunk before a plan set one
        self._exit_loss_sums: dict[int, torch.Tensor] = {}
        self._exit_step_counts: dict[int, float] = {}
        self._last_exit: int | None = None
        self._eval_sums: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ training

    def current_exit(self) -> int:
        """The exit of the optimizer step in progress (`state.global_step`)."""
        total = max(self.state.max_steps, 1)
        return self.tuner.exit_for_step(self.state.global_step, total, self.args.seed)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        exit_layer = self.current_exit()
        with self.tuner.exit_at(exit_layer):
            loss = super().training_step(model, inputs, num_items_in_batch)
        # `loss` is already divided over the accumulation micro-batches: their sum is the step loss.
        self._exit_loss_sums[exit_layer] = self._exit_loss_sums.get(exit_layer, 0.0) + loss.detach()
        self._exit_step_counts[exit_layer] = (
            self._exit_step_counts.get(exit_layer, 0.0) + 1.0 / self.current_gradient_accumulation_steps
        )
        self._last_exit = exit_layer
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._exit_loss_sums:  # a training log
            for layer in sorted(self._exit_loss_sums):
                total = self.accelerator.reduce(torch.as_tensor(self._exit_loss_sums[layer]), reduction="mean")
                logs[f"exit_{layer}_loss"] = round(total.item() / self._exit_step_counts[layer], 4)
            logs["active_exit"] = self._last_exit
            self._exit_loss_sums.clear()
            self._exit_step_counts.clear()
        super().log(logs, start_time)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._keep_predicting_exits()
        # The peak counts planning's probe passes too: they run in this process.
        measured = self.memory_budget_bytes is not None and reset_peak_resident()
        if self.memory_budget_bytes is not None:
            self.plan_memory()
        output = super().train(*args, **kwargs)
        if measured:
            self._report_peak(output.metrics)
        config = self.tuner.active_edge_config
        # Every rule the voting registry marks as weighted votes with fitted exit weights.
        if not voting_rule(config.voting).weighted or config.exit_weights is not None:
            return output
        if len(config.exit_layers) == 1:
            config.exit_weights = [1.0]  # one exit: nothing to fit
        elif self.eval_dataset is None:
            _warn_uniform_vote(config.voting, config.exit_layers, "EdgeTrainer has no eval_dataset to fit them on")
        else:
            try:
                self.calibrate_exit_weights()
            except ValueError as error:
                _warn_uniform_vote(config.voting, config.exit_layers, str(error))
        return output

    # ------------------------------------------------------------------ evaluation

    def calibrate_exit_weights(self, dataset: Any = None) -> list[float]:
        """Fit the adapter's `exit_weights` (for a weighted voting rule) on `dataset` or `eval_dataset`."""
        batches = (self._prepare_inputs(batch) for batch in self.get_eval_dataloader(dataset))
        return self._in_eval_mode(self.tuner.calibrate_exit_weights, batches)

    def select_exits(self, num_batches: int = SELECTION_BATCHES) -> list[int]:
        """Keep only the exits that predict (`EdgeLLMConfig.select_exits`), scored on the first
        `num_batches` training batches; `train()` calls this before the first step."""
        batches = (self._prepare_inputs(b) for b in islice(self.get_train_dataloader(), num_batches))
        return self._in_eval_mode(self.tuner.select_exits, batches)

    def _keep_predicting_exits(self) -> None:
        if self.tuner.active_edge_config.select_exits:
            self.select_exits()

    def plan(self) -> TrainingPlan:
        """The plan `train()` would run to `memory_budget_bytes`, without training: the exits that
        predict kept first (with `exit_layers="auto"`), as `train()` does, then `plan_memory`."""
        if self.memory_budget_bytes is None:
            raise ValueError("EdgeTrainer.plan() plans to a memory budget: pass EdgeTrainer(memory_budget_bytes=...).")
        self._keep_predicting_exits()
        return self.plan_memory()

    def plan_memory(self) -> TrainingPlan:
        """Plan the run so that the whole process fits `memory_budget_bytes` (see
        `edge_llm.tuner.planning`) at this Trainer's batch size and the longest training sequence,
        and set it: the adapter's `backprop_depth` and `loss_chunk_size`, gradient checkpointing,
        and the micro-batch size with the gradient accumulation that keeps the batch. `train()`
        calls this first; a later call plans the batch and the loss chunk asked for again, not the
        ones an earlier plan set."""
        config = self.tuner.active_edge_config
        split = 1
        if self.memory_plan is not None:  # plan what was asked, not what the last plan set
            split, config.loss_chunk_size = self.memory_plan.accumulation_steps, self._loss_chunk_asked
        self._loss_chunk_asked = config.loss_chunk_size
        batch_size = self.args.per_device_train_batch_size * split
        accumulation = self.args.gradient_accumulation_steps // split
        plan = plan_training(self.model, self.memory_budget_bytes, batch_size, self._longest_sequence())
        config.backprop_depth, config.loss_chunk_size = plan.backprop_depth, plan.loss_chunk_size
        base = self.model.get_base_model()
        self.args.activation_checkpointing = plan.gradient_checkpointing
        if plan.gradient_checkpointing and self.args.activation_checkpointing_kwargs is None:
            self.args.activation_checkpointing_kwargs = {"use_reentrant": False}
        elif not plan.gradient_checkpointing and base.is_activation_checkpointing:
            base.activation_checkpointing_disable()
        self.args.per_device_train_batch_size = plan.micro_batch_size
        self.args.gradient_accumulation_steps = accumulation * plan.accumulation_steps
        self._train_batch_size = self.args.train_batch_size
        self.memory_plan = plan
        logger.info("Planned to %d MiB: %s", self.memory_budget_bytes // MIB, plan.describe())
        return plan

    def _longest_sequence(self) -> int:
        """The longest training sequence: from the dataset's `input_ids` where it has them (any
        batch may be the longest), else the first batch's."""
        dataset = self.train_dataset
        column_names = getattr(dataset, "column_names", None) or []
        if "input_ids" in column_names:
            return max(len(ids) for ids in dataset["input_ids"])
        return next(iter(self.get_train_dataloader()))["input_ids"].shape[1]

    def _report_peak(self, metrics: dict[str, float]) -> None:
        peak, plan = peak_resident_bytes(), self.memory_plan
        metrics["train_peak_resident_bytes"] = peak
        logger.info(
            "Peak resident memory while training: %d MiB (planned %d MiB, budget %d MiB)",
            peak // MIB,
            plan.estimated_peak_bytes // MIB,
            self.memory_budget_bytes // MIB,
        )
        if peak > self.memory_budget_bytes:
            warn_loudly(
                logger,
                f"The training process peaked at {peak / MIB:.0f} MiB, above its memory budget of "
                f"{self.memory_budget_bytes / MIB:.0f} MiB (planned: {plan.estimated_peak_bytes / MIB:.0f} MiB). "
                "Something outside the planned step held memory (another model, a cache, a data loader worker); "
                "give the run a smaller budget.",
                stacklevel=3,
            )

    def _in_eval_mode(self, fn: Any, batches: Any) -> Any:
        """`fn(batches, all_reduce_sum)` with the model in eval mode; every process gets the result
        of all processes' batches."""
        model = self.model
        was_training = model.training
        model.eval()
        reduce = None
        if self.accelerator.num_processes > 1:
            reduce = lambda tensor: self.accelerator.reduce(tensor, reduction="sum")  # noqa: E731
        try:
            return fn(batches, all_reduce_sum=reduce)
        finally:
            model.train(was_training)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        self._eval_sums = {}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._eval_sums:
            sums = {k: self.accelerator.reduce(v, reduction="sum") for k, v in sorted(self._eval_sums.items())}
            tokens = sums.pop("tokens").clamp_min(1)
            for name, value in sums.items():
                output.metrics[f"{metric_key_prefix}_{name}"] = (value / tokens).item()
            # Trainer's own loss is a mean of per-batch means, which weighs a short batch's tokens
            # more: report the vote's loss per token, as `<prefix>_voted_loss` does.
            output.metrics[f"{metric_key_prefix}_loss"] = output.metrics[f"{metric_key_prefix}_voted_loss"]
        return output

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        labels = inputs.get("labels")
        if labels is None or self.tuner.active_exit is not None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                # Per-exit and voted sums a chunk of positions at a time: never all exits' logits at once.
                forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
                voted_loss = torch.zeros((), dtype=torch.float64, device=labels.device)
                for targets, logits_by_exit in self.tuner.exit_logit_chunks(forward_inputs, labels):
                    voted_loss += self._add_eval_sums(logits_by_exit, self.tuner.voted(logits_by_exit), targets)
                count = (labels[:, 1:] != IGNORE_INDEX).sum().clamp_min(1)
                return (voted_loss / count).float(), None, None
            outputs = model(**inputs, return_exit_logits=True)
        voted, targets = shift_for_causal_lm(outputs.logits, labels)
        by_exit = {layer: shift_for_causal_lm(logits, labels)[0] for layer, logits in outputs.exit_logits.items()}
        self._add_eval_sums(by_exit, voted, targets)
        return outputs.loss.detach(), outputs.logits.detach(), labels

    def _add_eval_sums(
        self, logits_by_exit: dict[int, torch.Tensor], voted: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Accumulate summed next-token loss and correct predictions of each exit and of the vote,
        over `targets` (flat) and the matching rows of logits; returns the vote's summed loss."""
        self._accumulate("tokens", torch.tensor(targets.numel(), device=targets.device))
        losses = {}
        for name, logits in [*((f"exit_{layer}", z) for layer, z in logits_by_exit.items()), ("voted", voted)]:
            losses[name] = nn.functional.cross_entropy(logits.float(), targets, reduction="sum").detach().double()
            self._accumulate(f"{name}_loss", losses[name])
            self._accumulate(f"{name}_accuracy", (logits.argmax(-1) == targets).sum())
        return losses["voted"]

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().double()
        self._eval_sums[name] = self._eval_sums[name] + value if name in self._eval_sums else value


def _whole_bytes(value: Any) -> int:
    """`EdgeTrainer(memory_budget_bytes=...)` as an int: any integer type (numpy's too) or a whole
    float (1.5e9), positive."""
    whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if not whole or isinstance(value, bool) or value < 1:
        raise ValueError(f"EdgeTrainer(memory_budget_bytes=...) must be a positive whole number of bytes: {value!r}.")
    return int(value)
