"""Every vocabulary is a registry read live: a new quantizer, pruning score, pruning structure,
sensitivity metric, task, exit head or exit sampler is one entry, and config and consumer take it."""

import contextlib

import pytest
import torch
from peft import get_peft_model
from test_evaluation import CharTokenizer
from tiny_models import VOCAB, lora_targets, tiny_model

from edge_llm import EdgeLLMConfig
from edge_llm.evaluation import TASKS, Item, Task, multiple_choice_accuracy, task_items
from edge_llm.luc import CompressionMethod, LUCConfig, LUCLinear, LUCPolicy, compress_model, profile_sensitivity
from edge_llm.luc.compress import compress_weight
from edge_llm.luc.profile import METRICS, SensitivityMetric
from edge_llm.luc.prune import PRUNE_STRUCTURES, PRUNERS, Pruner, PruneStructure, check_sparsity
from edge_llm.luc.quantize import QUANTIZERS, Quantizer, quantize_rtn
from edge_llm.tuner.exits import EXIT_SAMPLERS, ExitSampler, exit_for_step
from edge_llm.tuner.heads import EXIT_HEADS, ExitHeadKind


@contextlib.contextmanager
def registered(registry, entry):
    registry.register(entry)
    try:
        yield entry
    finally:
        del registry[entry.name]


def tokens(samples=2, length=16):
    return torch.randint(0, VOCAB, (samples, length), generator=torch.Generator().manual_seed(0))


def test_a_registered_quantizer_compresses_through_the_config_and_its_policy_loads():
    calls = []

    def recorded(weight, bits, group_size, mask, symmetric, hessian):
        calls.append(weight.shape)
        return quantize_rtn(weight, bits, group_size, mask, symmetric)

    model = tiny_model("llama", 2)
    with registered(QUANTIZERS, Quantizer("recorded", recorded)):
        method = LUCConfig(quant_algorithm="recorded", group_size=16, avg_bits=4).method
        policy = compress_model(model, [(4, 0.0)] * 2, method, progress=False)
        assert LUCPolicy.from_dict(policy.to_dict()) == policy  # the schema takes the live names
    layers = [m for m in model.modules() if isinstance(m, LUCLinear)]
    assert len(calls) == len(layers) == 14
    with pytest.raises(ValueError, match="method/quant_method"):
        LUCPolicy.from_dict(policy.to_dict())  # unregistered again: refused at the boundary


def test_a_registered_pruning_score_chooses_the_mask():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    smallest = Pruner("smallest", lambda magnitude, norms: -magnitude)
    with registered(PRUNERS, smallest):
        method = CompressionMethod(group_size=16, prune_method="smallest")
        assert not method.needs_calibration
        _, mask = compress_weight(weight, 16, 0.5, method)
    expected = torch.zeros_like(mask)
    expected.scatter_(1, weight.abs().topk(16, dim=1, largest=False).indices, True)
    assert torch.equal(mask, expected)


def test_a_registered_pruning_structure_checks_its_sparsities_and_shapes_the_mask():
    def one_of_two(score, sparsity):
        pairs = score.view(score.shape[0], -1, 2)
        keep = torch.zeros_like(pairs, dtype=torch.bool).scatter_(-1, pairs.argmax(-1, keepdim=True), True)
        return keep.view_as(score)

    def half_only(sparsity):
        if sparsity not in (0.0, 0.5):
            raise ValueError(f"1:2 pruning makes sparsity 0 or 0.5, got {sparsity}.")

    with registered(PRUNE_STRUCTURES, PruneStructure("pairs", one_of_two, half_only)):
        method = CompressionMethod(group_size=16, prune_method="magnitude", prune_structure="pairs")
        with pytest.raises(ValueError, match="1:2 pruning"):
            check_sparsity(0.25, "pairs")
        _, mask = compress_weight(torch.randn(4, 32), 16, 0.5, method)
        assert torch.equal(mask.view(4, 16, 2).sum(-1), torch.ones(4, 16, dtype=torch.long))
        policy = LUCPolicy(layers=[(4, 0.5), (4, 0.25)], method=method)
        with pytest.raises(ValueError, match="layers/1: 1:2 pruning"):
            LUCPolicy.from_dict(policy.to_dict())


def test_a_registered_sensitivity_metric_profiles_through_the_config():
    def absolute(runner, layer, batch, reference):
        hidden = runner.layer_input(batch, layer)
        compressed = runner.run_layer(layer, batch, hidden)
        original = reference if layer + 1 == len(runner.layers) else runner.layer_input(batch, layer + 1)
        return (compressed - original).abs().sum().item(), original.numel()

    last = SensitivityMetric(
        "output_abs",
        reference=METRICS["output_mse"].reference,
        damage=absolute,
        layers_run=lambda layer, num_layers: 1,
    )
    with registered(METRICS, last):
        config = LUCConfig(metric="output_abs", avg_bits=4, group_size=16)
        profile = profile_sensitivity(
            tiny_model("llama", 3), tokens(), bits=(2, 8), sparsities=(0.0,), method=config.method,
            metric=config.metric, progress=False,
        )  # fmt: skip
    assert profile.metric == "output_abs"
    assert all(two > eight > 0 for two, eight in profile.damage)  # 2-bit layers err more than 8-bit ones


def test_a_registered_task_is_scored_by_name():
    items = [Item("abc", (" x", " y"), gold) for gold in range(2)]
    with registered(TASKS, Task("toy", lambda rows, subject, seed: items)):
        loaded = task_items("toy", limit=1)
        assert loaded == items[:1]
        with pytest.raises(ValueError, match="Unknown task 'toy:sub'"):
            task_items("toy:sub")  # not a subject task
    result = multiple_choice_accuracy(tiny_model("llama", 2), CharTokenizer(), loaded)
    assert set(result) == {"model"}
    with pytest.raises(ValueError, match="Unknown task 'toy'"):
        task_items("toy")


class Scaled(torch.nn.Module):
    def __init__(self, head, scale) -> None:
        super().__init__()
        self.head, self.scale = head, scale

    def forward(self, hidden):
        return self.head(hidden) * self.scale


class Temperature(torch.nn.Module):
    """A test exit head: the shared head's logits times a trainable scale."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def normed(self, norm):
        return norm

    def output(self, head):
        return Scaled(head, self.scale)


def test_a_registered_exit_head_kind_is_built_per_exit_and_used_by_the_exits():
    def build(config_value):
        torch.manual_seed(0)
        return get_peft_model(
            tiny_model("llama", 4),
            EdgeLLMConfig(r=4, target_modules=lora_targets("llama"), exit_layers=[1], exit_head=config_value),
        ).eval()

    with registered(EXIT_HEADS, ExitHeadKind("temperature", lambda norm, head, rank, dtype: Temperature())):
        model = build("temperature")
    shared = build("shared")
    x = tokens()
    heads = model.base_model.exit_heads["default"]
    assert list(heads) == ["1"] and isinstance(heads["1"], Temperature)
    with torch.no_grad():
        heads["1"].scale.fill_(2.0)
        ours = model(input_ids=x, return_exit_logits=True).exit_logits
        theirs = shared(input_ids=x, return_exit_logits=True).exit_logits
        torch.testing.assert_close(ours[1], 2 * theirs[1])
        torch.testing.assert_close(ours[3], theirs[3])  # the last exit is the model's own head
        with model.exit_at(1):  # training's path: the exit's head swapped in
            torch.testing.assert_close(model(input_ids=x).logits, 2 * theirs[1])


def test_a_registered_exit_sampler_picks_the_training_exit():
    with registered(EXIT_SAMPLERS, ExitSampler("top_only", lambda exits, step, total, seed: exits[-1])):
        config = EdgeLLMConfig(r=4, target_modules=["q_proj"], exit_layers=[0, 1], exit_sampling="top_only")
        assert [exit_for_step([0, 1, 3], config.exit_sampling, step, 10, 0) for step in range(3)] == [3, 3, 3]
    with pytest.raises(ValueError, match="exit_sampling must be one of"):
        EdgeLLMConfig(r=4, target_modules=["q_proj"], exit_sampling="top_only")
