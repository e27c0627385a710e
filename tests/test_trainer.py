"""EdgeTrainer: exit per step, frozen layers, resume, gradient accumulation, logging, DDP."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from trainer_helpers import adapter_state, counting_dataset, edge_model, training_args

from edge_llm import EdgeTrainer


def test_training_lowers_the_loss_of_every_exit(tmp_path):
    model = edge_model(exit_sampling="round_robin")
    data = counting_dataset()
    trainer = EdgeTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=30, learning_rate=2e-2),
        train_dataset=data,
        eval_dataset=data.select(range(16)),
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    for name in ("exit_3", "exit_7", "voted"):
        assert after[f"eval_{name}_loss"] < before[f"eval_{name}_loss"] - 0.2, (name, before, after)
        assert after[f"eval_{name}_accuracy"] > before[f"eval_{name}_accuracy"] + 0.2, (name, before, after)
    assert after["eval_voted_loss"] == pytest.approx(after["eval_loss"])
    # A short last batch (13 rows in batches of 4) does not make the two disagree.
    ragged = trainer.evaluate(data.select(range(13)))
    assert ragged["eval_loss"] == ragged["eval_voted_loss"]


def test_weighted_voting_is_calibrated_after_training_and_saved(tmp_path):
    model = edge_model(exit_sampling="round_robin", voting="weighted")
    data = counting_dataset()
    trainer = EdgeTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=6, learning_rate=2e-2),
        train_dataset=data,
        eval_dataset=data.select(range(16)),
    )
    uniform = trainer.evaluate()["eval_loss"]
    trainer.train()
    weights = model.peft_config["default"].exit_weights
    assert len(weights) == 2 and sum(weights) == pytest.approx(1.0) and weights != [0.5, 0.5]
    calibrated = trainer.evaluate()
    best_single = min(calibrated["eval_exit_3_loss"], calibrated["eval_exit_7_loss"])
    assert calibrated["eval_loss"] <= best_single + 1e-4  # the fitted mixture is never worse on its data
    assert calibrated["eval_loss"] < uniform
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["exit_weights"] == weights


def test_every_weighted_rule_gets_its_exit_weights_fitted_after_training(tmp_path):
    model = edge_model(voting="geometric")  # weighted in the voting registry, not named "weighted"
    data = counting_dataset()
    trainer = EdgeTrainer(
        model=model, args=training_args(tmp_path, max_steps=2), train_dataset=data, eval_dataset=data.select(range(8))
    )
    trainer.train()
    weights = model.peft_config["default"].exit_weights
    assert weights is not None and len(weights) == 2 and sum(weights) == pytest.approx(1.0)


def test_layers_in_no_window_stay_bit_identical_and_get_no_optimizer_state(tmp_path):
    model = edge_model()  # windows {2, 3} and {6, 7} of 8 layers
    before = adapter_state(model)
    trainer = EdgeTrainer(model=model, args=training_args(tmp_path), train_dataset=counting_dataset())
    trainer.train()
    after = adapter_state(model)
    for name, value in before.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        if layer in (2, 3, 6, 7):
            assert not torch.equal(after[name], value), name
        else:
            assert torch.equal(after[name], value), name
    stateful = {id(p) for p in trainer.optimizer.state}
    with_state = {n for n, p in model.named_parameters() if id(p) in stateful}
    assert with_state == {n for n in before if int(n.split(".layers.")[1].split(".")[0]) in (2, 3, 6, 7)}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_steps_follow_the_exit_sampling_rule_and_are_logged(tmp_path):
    model = edge_model(exit_sampling="curriculum")
    trainer = EdgeTrainer(model=model, args=training_args(tmp_path, max_steps=8), train_dataset=counting_dataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "active_exit" in entry]
    assert [entry["active_exit"] for entry in logs] == [3, 3, 3, 3, 7, 7, 7, 7]
    assert all(f"exit_{entry['active_exit']}_loss" in entry for entry in logs)
    assert logs[0]["exit_3_loss"] == pytest.approx(logs[0]["loss"], rel=1e-3)
    assert model.active_exit is None  # evaluation and inference after training vote


def test_resume_continues_the_same_exits_and_reaches_the_same_weights(tmp_path):
    def run(output_dir, max_steps, resume=None):
        model = edge_model(exit_sampling="uniform")
        args = training_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=3)
        trainer = EdgeTrainer(model=model, args=args, train_dataset=counting_dataset())
        trainer.train(resume_from_checkpoint=resume)
        exits = [e["active_exit"] for e in trainer.state.log_history if "active_exit" in e]
        return adapter_state(model), exits

    full_weights, full_exits = run(tmp_path / "full", 6)
    run(tmp_path / "part", 6)  # writes checkpoint-3 on the way
    resumed_weights, resumed_exits = run(tmp_path / "part", 6, resume=str(tmp_path / "part" / "checkpoint-3"))
    assert len(set(full_exits)) == 2  # uniform sampling used both exits
    # The resumed history is the checkpoint's first 3 steps plus 3 steps run after resuming.
    assert len(resumed_exits) == 6 and resumed_exits == full_exits
    for name, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=1e-7)


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    def run(batch, accumulation):
        model = edge_model(exit_sampling="round_robin")
        args = training_args(
            tmp_path,
            max_steps=2,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            learning_rate=1e-2,
            optim="sgd",
        )
        EdgeTrainer(model=model, args=args, train_dataset=counting_dataset(rows=16)).train()
        return adapter_state(model)

    big, accumulated = run(8, 1), run(4, 2)
    for name, value in big.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-6)


def test_rejects_models_without_an_edge_llm_adapter_and_ddp_without_unused_parameters(tmp_path):
    with pytest.raises(TypeError, match="EdgeTrainer trains Edge-LLM adapters"):
        EdgeTrainer(model=tiny_model(), args=training_args(tmp_path))
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True"):
        EdgeTrainer(model=edge_model(), args=training_args(tmp_path, ddp_find_unused_parameters=False))


def test_fsdp_and_deepspeed_are_refused_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="FSDP is not supported yet"):
        EdgeTrainer(model=edge_model(), args=training_args(tmp_path, fsdp=True))
    args = training_args(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with a DeepSpeed config sets
    with pytest.raises(ValueError, match="DeepSpeed is not supported yet"):
        EdgeTrainer(model=edge_model(), args=args)


def test_ddp_with_two_cpu_processes(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with socket.socket() as probe:  # a free port: a fixed one can still be held by an earlier run
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            str(worker),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # gradients were all-reduced
    exits = [e["active_exit"] for e in torch.load(tmp_path / "log0.pt", weights_only=False) if "active_exit" in e]
    assert exits == [3, 7, 3, 7, 3, 7]


def test_exit_selection_keeps_the_exits_that_predict_and_drops_the_rest_with_their_heads(tmp_path, monkeypatch):
    model = edge_model(exit_layers="auto", backprop_depth=2, exit_head="norm")  # candidates 1, 3, 5, 7
    config = model.peft_config["default"]
    assert config.select_exits and config.exit_layers == [1, 3, 5, 7]
    assert sorted(model.base_model.exit_heads["default"]) == ["1", "3", "5"]
    scored = []

    def fitted(batches, all_reduce_sum=None):  # exit 3 predicts, 1 and 5 do not
        scored.extend(batches)
        return [0.01, 0.3, 0.049, 0.641]

    monkeypatch.setattr(model.base_model, "calibrate_exit_weights", fitted)
    trainer = EdgeTrainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=counting_dataset())
    trainer.train()
    assert len(scored) == 4 and all("labels" in batch for batch in scored)
    assert config.exit_layers == [3, 7] and not config.select_exits
    assert sorted(model.base_model.exit_heads["default"]) == ["3"]
    # The optimizer never held the dropped heads; the saved adapter has the kept exits only.
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in model.base_model.exit_heads.parameters())
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["exit_layers"] == [3, 7] and saved["select_exits"] is False


def test_exit_selection_on_real_scores_always_keeps_the_last_exit(tmp_path):
    model = edge_model(exit_layers="auto", backprop_depth=2)
    trainer = EdgeTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=counting_dataset())
    kept = trainer.select_exits()
    assert kept[-1] == 7 and set(kept) <= {1, 3, 5, 7}
    assert model.peft_config["default"].exit_layers == kept and model.peft_config["default"].exit_weights is None


@pytest.mark.parametrize("voting", ["weighted", "geometric"])  # every rule the registry marks weighted
def test_weighted_voting_without_data_to_fit_on_warns_loudly(tmp_path, voting):
    model = edge_model(voting=voting)
    trainer = EdgeTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=counting_dataset())
    with pytest.warns(UserWarning, match=f"voting='{voting}' but the exit weights of exits \\[3, 7\\] were not fitted"):
        trainer.train()
    assert model.peft_config["default"].exit_weights is None


def test_negligible_fitted_weights_leave_the_vote(monkeypatch):
    import edge_llm.tuner.model as tuner_model

    model = edge_model(exit_layers=[1, 3, 7], voting="weighted")
    monkeypatch.setattr(tuner_model, "fit_exit_weights", lambda log_probs, all_reduce_sum=None: [0.004, 0.3, 0.696])
    x = counting_dataset(rows=2)[:]
    batch = {"input_ids": torch.tensor(x["input_ids"]), "labels": torch.tensor(x["labels"])}
    weights = model.calibrate_exit_weights([batch])
    assert weights[0] == 0.0 and sum(weights) == pytest.approx(1.0)
    assert weights[1] == pytest.approx(0.3 / 0.996)
