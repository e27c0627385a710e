"""Planning a training run to a whole-process memory budget (`edge_llm.tuner.planning`)."""

import re

import pytest
import torch
from peft import get_peft_model
from tiny_models import _COMMON
from trainer_helpers import counting_dataset, edge_model, training_args
from transformers import LlamaConfig, LlamaForCausalLM

from edge_llm import EdgeLLMConfig, EdgeTrainer
from edge_llm import _memory as edge_memory
from edge_llm._memory import TensorBytesTracker
from edge_llm.tuner import planning
from edge_llm.tuner.planning import fits, micro_batch_sizes, plan_training, probe_step, smallest_budget, step_bytes

RESIDENT = 300 * 2**20  # what the process holds before training, fixed so that plans are exact


@pytest.fixture(autouse=True)
def fixed_resident_memory(monkeypatch):
    monkeypatch.setattr(edge_memory, "_limited", True)  # as if bounded before the model was loaded
    monkeypatch.setattr(planning, "resident_bytes", lambda: RESIDENT)
    monkeypatch.setattr(planning, "peak_resident_bytes", lambda: RESIDENT)  # no overhead beyond the tensors


def _real_step_peak(model, exit_layer: int, batch: torch.Tensor, micro: int) -> int:
    """Peak tensor bytes of a real step (micro-batches, backward, AdamW's first update) at the
    adapter's current settings, with the optimizer state made inside it."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    with TensorBytesTracker() as tracker, model.base_model.exit_at(exit_layer):
        for chunk in batch.split(micro):
            model(input_ids=chunk, labels=chunk).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # The peak is what the process must hold; the moments stay for the next step.
        moments = sum(m.numel() * m.element_size() for st in optimizer.state.values() for m in st.values() if m.ndim)
    assert tracker.live_bytes >= moments > 0  # the optimizer state was counted
    return tracker.peak_bytes


def test_a_generous_budget_gets_the_whole_window_without_checkpointing_and_the_estimate_holds_a_real_step():
    model = edge_model(exit_layers=[7], backprop_depth=2)
    plan = plan_training(model, 10**10, batch_size=4, seq_len=32)
    assert (plan.backprop_depth, plan.gradient_checkpointing, plan.micro_batch_size) == (8, False, 4)
    assert plan.estimated_peak_bytes == RESIDENT + plan.step_bytes
    assert model.peft_config["default"].backprop_depth == 2  # planning changes nothing by itself
    model.peft_config["default"].backprop_depth = 8
    real = _real_step_peak(model, 7, torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1)), 4)
    assert 0.9 * plan.step_bytes <= real <= 1.1 * plan.step_bytes


def test_the_estimate_is_linear_in_the_window_and_holds_with_checkpointing_and_micro_batches():
    model = edge_model(exit_layers=[7], backprop_depth=2)
    probe = probe_step(model, batch_size=2, seq_len=64, checkpointing=True)
    planned = step_bytes(probe, 6, [7])
    model.peft_config["default"].backprop_depth = 6
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        real = _real_step_peak(model, 7, torch.randint(0, 96, (8, 64), generator=torch.Generator().manual_seed(2)), 2)
    finally:
        model.get_base_model().activation_checkpointing_disable()
    assert 0.9 * planned <= real <= 1.1 * planned


def test_tight_budgets_keep_the_deepest_window_with_checkpointing_then_micro_batches_and_refuse_naming_the_smallest():
    model = edge_model(exit_layers=[7], backprop_depth=2)
    plain = {m: probe_step(model, m, 64, checkpointing=False) for m in (1, 8)}
    checkpointed = {m: probe_step(model, m, 64, checkpointing=True) for m in (1, 8)}
    # The whole window fits checkpointed at the whole batch, and unchecked one sequence at a time:
    # the whole batch is faster (a split batch repeats every per-call cost).
    budget = smallest_budget(RESIDENT + step_bytes(checkpointed[8], 8, [7]))
    assert fits(RESIDENT + step_bytes(plain[1], 8, [7]), budget)
    assert not fits(RESIDENT + step_bytes(plain[8], 8, [7]), budget)
    plan = plan_training(model, budget, 8, 64)
    assert (plan.backprop_depth, plan.gradient_checkpointing, plan.micro_batch_size) == (8, True, 8)
    assert fits(plan.estimated_peak_bytes, budget) and plan.estimated_peak_bytes <= 0.95 * budget
    # A 6-layer window at the whole batch, or the whole 8 in a split batch: the deeper window is
    # taken (its depth is worth more than the unsplit batch's speed), in the largest micro-batch
    # that holds it.
    budget = smallest_budget(RESIDENT + step_bytes(checkpointed[8], 6, [7]))
    assert fits(RESIDENT + step_bytes(plain[1], 8, [7]), budget)
    plan = plan_training(model, budget, 8, 64)
    assert (plan.backprop_depth, plan.gradient_checkpointing) == (8, True) and 1 < plan.micro_batch_size < 8
    assert plan.micro_batch_size * plan.accumulation_steps == 8
    # Room for the whole window only when checkpointed, one sequence at a time.
    budget = smallest_budget(RESIDENT + max(step_bytes(checkpointed[1], 8, [7]), plain[1].peak_bytes))
    assert not fits(RESIDENT + step_bytes(plain[1], 8, [7]), budget)
    plan = plan_training(model, budget, 8, 64)
    assert (plan.backprop_depth, plan.gradient_checkpointing, plan.micro_batch_size) == (8, True, 1)
    assert plan.accumulation_steps == 8
    with pytest.raises(ValueError, match=r"smallest budget that fits is ([\d,]+) bytes") as refused:
        plan_training(model, RESIDENT + 1000, 8, 64)
    smallest = int(re.search(r"fits is ([\d,]+) bytes", str(refused.value)).group(1).replace(",", ""))
    assert plan_training(model, smallest, 8, 64).micro_batch_size == 1
    with pytest.raises(ValueError, match=r"cannot hold this run.* 5% of the budget is kept free"):
        plan_training(model, smallest - 1, 8, 64)
    for bad in (-5, 0, 1.5, True):
        with pytest.raises(ValueError, match="memory budget must be a positive number of bytes"):
            plan_training(model, bad, 8, 64)


def test_a_lean_loss_chunk_is_planned_where_the_adapters_own_does_not_fit_and_the_trainer_sets_it(
    tmp_path, monkeypatch
):
    # A vocabulary of 8192 words over a hidden size of 32: the logits of "auto"'s one chunk of all
    # 4 x 15 targets are most of the step, and a lean chunk of 2 tokens leaves room for the window.
    monkeypatch.setattr(planning, "lean_chunk_size", lambda vocab: 2)
    config = LlamaConfig(num_hidden_layers=8, **{**_COMMON, "vocab_size": 8192})
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(config), EdgeLLMConfig(r=4, target_modules=["q_proj", "v_proj"], exit_layers=[7])
    )
    assert planning.loss_chunks(model, 4, 16) == [(2, 2), ("auto", 128)]
    assert model.peft_config["default"].loss_chunk_size == "auto"
    probes = {(gc, chunk): probe_step(model, 4, 16, gc, chunk) for gc in (True, False) for chunk in ("auto", 2)}
    assert model.peft_config["default"].loss_chunk_size == "auto"  # probing restores the adapter's chunk
    lean, asked = probes[True, 2], probes[True, "auto"]
    assert lean.activations_one_layer < asked.activations_one_layer
    assert lean.activations_per_layer == asked.activations_per_layer  # the chunk is a fixed cost
    # Room for the whole window with the lean chunk only (and the probe without checkpointing that
    # the planner makes where a checkpointed step leaves room): the planner does not probe the
    # adapter's own chunk, whose logits alone would not fit.
    budget = smallest_budget(RESIDENT + max(step_bytes(lean, 8, [7]), probes[False, 2].peak_bytes))
    assert not fits(RESIDENT + step_bytes(asked, 8, [7]), budget)
    monkeypatch.setattr(planning, "micro_batch_sizes", lambda batch: [batch])  # one micro-batch: 4
    plan = plan_training(model, budget, 4, 16)
    assert (plan.backprop_depth, plan.micro_batch_size, plan.loss_chunk_size) == (8, 4, 2)
    assert "loss in chunks of 2 tokens" in plan.describe()
    assert plan_training(model, 10**10, 4, 16).loss_chunk_size == "auto"  # room: the adapter's own chunk

    trainer = EdgeTrainer(
        model=model, args=training_args(tmp_path), train_dataset=counting_dataset(), memory_budget_bytes=budget
    )
    assert trainer.plan_memory().loss_chunk_size == 2 and model.peft_config["default"].loss_chunk_size == 2
    trainer.memory_budget_bytes = 10**10  # planned again: from the chunk asked for, not the one set
    assert trainer.plan_memory().loss_chunk_size == "auto" == model.peft_config["default"].loss_chunk_size


def test_micro_batches_split_the_batch_evenly():
    assert micro_batch_sizes(8) == [8, 4, 2, 1]
    assert micro_batch_sizes(12) == [12, 6, 3]
    assert micro_batch_sizes(7) == [7]


def test_edge_trainer_runs_the_plan_for_its_budget_and_reports_the_peak(tmp_path):
    model = edge_model(exit_layers=[7], backprop_depth=2)
    plain, checkpointed = (probe_step(model, 1, 16, checkpointing=gc) for gc in (False, True))
    budget = smallest_budget(RESIDENT + max(step_bytes(checkpointed, 8, [7]), plain.peak_bytes))
    assert not fits(RESIDENT + step_bytes(plain, 8, [7]), budget)
    trainer = EdgeTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=counting_dataset(),
        memory_budget_bytes=budget,
    )
    output = trainer.train()
    plan = trainer.memory_plan
    assert (plan.backprop_depth, plan.gradient_checkpointing, plan.micro_batch_size) == (8, True, 1)
    assert model.peft_config["default"].backprop_depth == 8
    assert trainer.args.activation_checkpointing and model.get_base_model().is_activation_checkpointing
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (1, 4)
    again = trainer.plan_memory()  # planned again: from the batch asked for, not the micro-batch set
    assert again.micro_batch_size * again.accumulation_steps == 4
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (1, 4)
    assert output.metrics["train_peak_resident_bytes"] > 0


def test_edge_trainer_plans_without_training_as_train_would_after_keeping_the_exits_that_predict(tmp_path):
    # With exit_layers="auto", train() keeps the exits that predict before it plans; plan() answers
    # for that run, not for the exits asked for (whose windows would all hold optimizer moments).
    model = edge_model(exit_layers="auto", backprop_depth=None)
    asked = list(model.peft_config["default"].exit_layers)
    trainer = EdgeTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=counting_dataset(),
        memory_budget_bytes=2**34,
    )
    plan = trainer.plan()
    kept = model.peft_config["default"].exit_layers
    assert len(asked) > 1 and len(kept) < len(asked) and trainer.memory_plan is plan
    assert plan.backprop_depth == kept[-1] + 1  # a generous budget: the deepest window below the top exit
    trainer.train()
    assert trainer.memory_plan == plan
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        EdgeTrainer(model=model, args=training_args(tmp_path), train_dataset=counting_dataset()).plan()


def test_a_budget_given_after_the_allocator_kept_freed_memory_warns_how_to_bound_it(tmp_path, monkeypatch):
    model, args = edge_model(exit_layers=[7], backprop_depth=2), training_args(tmp_path)
    monkeypatch.setattr(edge_memory, "_limited", False)
    monkeypatch.setattr(edge_memory, "_glibc", lambda: object())  # as on glibc, whatever this machine runs
    with pytest.warns(UserWarning, match=r"Call edge_llm.limit_allocator_reserve\(\) before loading the model"):
        EdgeTrainer(model=model, args=args, train_dataset=counting_dataset(), memory_budget_bytes=9e8)


def test_a_memory_budget_is_any_whole_number_of_bytes_and_nothing_else(tmp_path):
    import numpy as np

    model = edge_model(exit_layers=[7], backprop_depth=2)
    make = lambda budget: EdgeTrainer(  # noqa: E731
        model=model, args=training_args(tmp_path), train_dataset=counting_dataset(), memory_budget_bytes=budget
    )
    assert make(np.int64(10**9)).memory_budget_bytes == 10**9 and make(1.5e9).memory_budget_bytes == 1_500_000_000
    for bad in (1.5, True, "1GiB", 0):
        with pytest.raises(ValueError, match=r"memory_budget_bytes=...\) must be a positive whole number"):
            make(bad)


def test_bounding_the_allocator_reserve_moves_arrows_buffers_to_malloc_unless_the_user_chose_a_pool(monkeypatch):
    import pyarrow

    monkeypatch.delenv(edge_memory.ARROW_POOL_VARIABLE, raising=False)
    before = pyarrow.default_memory_pool()
    own = pyarrow.mimalloc_memory_pool()  # Arrow's default pool in these wheels
    try:
        pyarrow.set_memory_pool(own)
        assert edge_memory.limit_allocator_reserve()
        assert pyarrow.default_memory_pool().backend_name == "system"
        assert edge_memory.os.environ[edge_memory.ARROW_POOL_VARIABLE] == "system"  # for a pyarrow loaded later
        pyarrow.set_memory_pool(own)
        monkeypatch.setenv(edge_memory.ARROW_POOL_VARIABLE, "mimalloc")
        edge_memory.limit_allocator_reserve()
        assert pyarrow.default_memory_pool().backend_name == "mimalloc"
    finally:
        pyarrow.set_memory_pool(before)
