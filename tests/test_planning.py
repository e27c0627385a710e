"""Sizing the gradient window from a memory budget (`edge_llm.tuner.planning`)."""

import pytest
import torch
from trainer_helpers import counting_dataset, edge_model, training_args

from edge_llm import EdgeTrainer
from edge_llm.tuner.planning import _saved_bytes, plan_backprop_depth


def test_the_plan_is_the_deepest_window_within_the_budget_and_covers_what_a_step_saves():
    model = edge_model(exit_layers=[7], backprop_depth=2)
    generous = plan_backprop_depth(model, 10**10, batch_size=4, seq_len=32)
    assert generous.backprop_depth == 8
    budget = generous.bytes_for(5) + generous.per_layer_bytes // 2
    plan = plan_backprop_depth(model, budget, batch_size=4, seq_len=32)
    assert plan.backprop_depth == 5 and plan.estimated_bytes <= budget < plan.bytes_for(6)
    assert model.peft_config["default"].backprop_depth == 2  # planning changes nothing by itself
    # What a step at that depth and batch actually saves for backward fits in the estimate.
    model.peft_config["default"].backprop_depth = 5
    tokens = torch.randint(0, 96, (4, 32))
    saved = _saved_bytes(model, 7, tokens)
    assert saved <= plan.estimated_bytes and saved >= 0.5 * (plan.estimated_bytes - plan.fixed_bytes)


def test_checkpointing_buys_a_deeper_window_and_a_budget_too_small_is_refused():
    model = edge_model(exit_layers=[7], backprop_depth=2)
    plain = plan_backprop_depth(model, 10**10, batch_size=8, seq_len=64)
    budget = plain.bytes_for(3)
    assert plan_backprop_depth(model, budget, 8, 64).backprop_depth == 3
    assert plan_backprop_depth(model, budget, 8, 64, checkpointing=True).backprop_depth > 3
    with pytest.raises(ValueError, match=r"needs at least \d+ bytes above the model"):
        plan_backprop_depth(model, 1000, 8, 64)
    with pytest.raises(ValueError, match="memory budget must be a positive number of bytes"):
        plan_backprop_depth(model, -5, 8, 64)


def test_edge_trainer_sets_the_window_from_its_memory_budget(tmp_path):
    model = edge_model(exit_layers=[7], backprop_depth=2)
    budget = plan_backprop_depth(model, 10**10, batch_size=4, seq_len=16).bytes_for(6)
    trainer = EdgeTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=counting_dataset(),
        memory_budget_bytes=budget,
    )
    trainer.train()
    assert model.peft_config["default"].backprop_depth == 6


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
