"""Device profiles, cost model, exact scheduler and the schedule file format."""

import itertools
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from edge_llm.luc import CompressionMethod, LUCPolicy
from edge_llm.scheduling import (
    BUILTIN_DEVICES,
    DeviceProfile,
    InfeasibleScheduleError,
    Schedule,
    Workload,
    builtin_device,
    profile_this_machine,
    schedule,
)
from edge_llm.scheduling.cost import Option, compatible_kernels
from edge_llm.scheduling.scheduler import _solve, pareto_knapsack


def meta_model(layers=6):
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def brute_force(per_layer, capacity):
    best = None
    for combo in itertools.product(*per_layer):
        streamed = [o.stream_bytes for o in combo if o.placement == "streamed"]
        memory = sum(o.memory_bytes for o in combo) + 2 * max(streamed, default=0)
        if memory <= capacity:
            seconds = sum(o.seconds for o in combo)
            best = seconds if best is None else min(best, seconds)
    return best


def random_options(rng, layers):
    per_layer = []
    for _ in range(layers):
        options = []
        for kernel in ("dense_fp16", "dequant_int4", "sparse_2_4")[: rng.randint(1, 3)]:
            size = rng.randint(10, 100)
            seconds = rng.uniform(1, 10)
            options.append(Option(kernel, "resident", size, 0, seconds))
            if rng.random() < 0.6:
                options.append(Option(kernel, "streamed", 0, rng.randint(5, 60), seconds + rng.uniform(0, 20)))
        per_layer.append(options)
    return per_layer


@pytest.mark.parametrize("seed", range(25))
def test_scheduler_optimum_matches_brute_force_and_fits(seed):
    rng = random.Random(seed)
    per_layer = random_options(rng, rng.randint(2, 4))
    capacity = rng.randint(40, 300)
    expected = brute_force(per_layer, capacity)
    result = _solve(per_layer, capacity)
    if expected is None:
        assert result is None
        return
    choice, staging = result
    picked = [per_layer[i][c] for i, c in enumerate(choice)]
    assert sum(o.seconds for o in picked) == pytest.approx(expected)
    assert sum(o.memory_bytes for o in picked) + staging <= capacity
    assert staging == 2 * max((o.stream_bytes for o in picked if o.placement == "streamed"), default=0)


def test_pareto_knapsack_returns_none_when_nothing_fits():
    assert pareto_knapsack([[(5, 1.0)], [(6, 1.0)]], 10) is None
    assert pareto_knapsack([[(5, 1.0), (2, 3.0)], [(6, 1.0)]], 10) == ([1, 0], 8, 4.0)


def test_schedules_respect_memory_and_stream_when_short():
    model = meta_model()
    policy = LUCPolicy([(4, 0.5)] * 6, CompressionMethod(group_size=64, prune_structure="nm"))
    device = builtin_device("raspberry-pi-5-8gb")
    roomy = schedule(model, device, Workload(prompt_tokens=64, decode_tokens=8), policy)
    assert all(p.placement == "resident" for p in roomy.layers)
    # Give it a little more than the fixed costs: some layers must be streamed from storage.
    tight_memory = roomy.fixed_bytes + sum(p.memory_bytes for p in roomy.layers) // 2
    tight = schedule(model, device.with_memory(tight_memory), Workload(prompt_tokens=64, decode_tokens=8), policy)
    assert tight.memory_bytes <= tight_memory
    assert any(p.placement == "streamed" for p in tight.layers) and tight.seconds > roomy.seconds
    assert tight.staging_bytes == 2 * max(p.stream_bytes for p in tight.layers if p.placement == "streamed")
    prefetches = [s for s in tight.steps() if s["op"] == "prefetch"]
    assert prefetches and all(s["layers"] for s in prefetches)


def test_infeasible_device_says_by_how_much():
    device = builtin_device("raspberry-pi-5-8gb").with_memory(1024)
    with pytest.raises(InfeasibleScheduleError, match=r"the smallest plan needs .* bytes more than the device has"):
        schedule(meta_model(), device, Workload())


def test_kernels_match_the_layer_format():
    model = meta_model(2)
    device = builtin_device("jetson-orin-nano-8gb")
    nm = LUCPolicy([(4, 0.5), (3, 0.0)], CompressionMethod(prune_structure="nm"))
    plan = schedule(model, device, Workload(prompt_tokens=16, decode_tokens=2), nm)
    from edge_llm.scheduling.cost import ModelSpec

    spec = ModelSpec.from_model(model, nm)
    assert "sparse_2_4" in compatible_kernels(spec.layers[0], device)
    assert "sparse_2_4" not in compatible_kernels(spec.layers[1], device)
    assert "dequant_int4" not in compatible_kernels(spec.layers[1], device)
    assert plan.layers[1].kernel in compatible_kernels(spec.layers[1], device)


def test_schedule_file_round_trip_and_rejects_bad_files(tmp_path):
    plan = schedule(meta_model(), builtin_device("jetson-orin-nano-8gb"), Workload(prompt_tokens=32))
    path = tmp_path / "schedule.json"
    plan.save(path)
    loaded = Schedule.load(path)
    assert loaded.to_dict() == plan.to_dict()
    data = json.loads(path.read_text())
    with pytest.raises(ValueError, match="Schedule format version 2 is not supported"):
        Schedule.from_dict({**data, "version": 2})
    with pytest.raises(ValueError, match="Invalid schedule at layers/0/kernel"):
        Schedule.from_dict({**data, "layers": [{**data["layers"][0], "kernel": "magic"}, *data["layers"][1:]]})
    with pytest.raises(ValueError, match=r"Invalid schedule at \(top level\): 'format' is a required property"):
        Schedule.from_dict({k: v for k, v in data.items() if k != "format"})
    over = {**data, "fixed_bytes": data["device"]["memory_bytes"] + 1}
    with pytest.raises(ValueError, match=r"it needs .* bytes but its device has"):
        Schedule.from_dict(over)
    path.write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match="is not a JSON schedule"):
        Schedule.load(path)


def test_device_profiles_round_trip_and_validate(tmp_path):
    for device in BUILTIN_DEVICES.values():
        assert device.source and device.memory_bytes > 0
        path = tmp_path / "device.json"
        device.save(path)
        assert DeviceProfile.load(path) == device
    data = builtin_device("raspberry-pi-5-8gb").to_dict()
    with pytest.raises(ValueError, match="Invalid device profile at kernels"):
        DeviceProfile.from_dict({**data, "kernels": {"warp_drive": {"flops": 1.0}}})
    with pytest.raises(ValueError, match="Invalid device profile at memory_bandwidth"):
        DeviceProfile.from_dict({**data, "memory_bandwidth": -1})
    with pytest.raises(ValueError, match="Unknown device 'toaster'"):
        builtin_device("toaster")


def test_pruned_layers_pay_for_unmasking_only_under_per_call_dequantization():
    from dataclasses import replace

    from edge_llm.scheduling import ModelSpec
    from edge_llm.scheduling.cost import layer_forward_seconds
    from edge_llm.scheduling.devices import Kernel

    dense = ModelSpec.from_model(meta_model(2), LUCPolicy([(4, 0.0), (4, 0.5)], CompressionMethod())).layers
    device = DeviceProfile(
        "unit",
        2**30,
        1e10,
        1e9,
        1e10,
        {"dense_fp32": Kernel(1e11), "dequant_int4": Kernel(1e11, dequant_per_s=1e9, unmask_per_s=2e8)},
    )
    unpruned, pruned = dense

    def seconds(layer, kernel, dev=device):
        return layer_forward_seconds(layer, kernel, dev, batch=1, tokens=8, context=8)

    # Half the weights to dequantize, all of them to expand through the mask.
    extra = pruned.params / 2e8 - 0.5 * pruned.params / 1e9
    assert seconds(pruned, "dequant_int4") - seconds(unpruned, "dequant_int4") == pytest.approx(extra)
    assert seconds(pruned, "dense_fp32") == pytest.approx(seconds(unpruned, "dense_fp32"))
    free = replace(device, kernels={**device.kernels, "dequant_int4": Kernel(1e11, dequant_per_s=1e9)})
    assert seconds(pruned, "dequant_int4", free) < seconds(unpruned, "dequant_int4", free)


def test_profile_this_machine_measures_positive_rates(tmp_path):
    profile = profile_this_machine(
        memory_bytes=2**30, weight_shape=(128, 256), tokens=16, repeats=1, storage_dir=str(tmp_path)
    )
    assert profile.memory_bytes == 2**30
    assert profile.memory_bandwidth > 1e8 and profile.storage_bandwidth > 1e6
    assert {"dense_fp32", "dequant_int4", "sparse_unstructured"} <= profile.kernels.keys()
    assert all(k.flops > 0 for k in profile.kernels.values())
    assert profile.kernels["dequant_int4"].dequant_per_s > 0
    assert DeviceProfile.from_dict(profile.to_dict()) == profile


def test_a_layer_takes_the_larger_of_its_launch_costs_and_its_work():
    from dataclasses import replace

    from edge_llm.scheduling import ModelSpec
    from edge_llm.scheduling.cost import layer_forward_seconds
    from edge_llm.scheduling.devices import Kernel

    layer = ModelSpec.from_model(meta_model(1), LUCPolicy([(4, 0.0)], CompressionMethod())).layers[0]
    kernels = {"dense_fp32": Kernel(1e11), "dequant_int4": Kernel(1e11, dequant_per_s=1e9, call_overhead_s=1e-3)}
    device = DeviceProfile("unit", 2**30, 1e10, 1e9, 1e10, kernels)

    def seconds(kernel, dev, tokens):
        return layer_forward_seconds(layer, kernel, dev, batch=1, tokens=tokens, context=tokens)

    work = seconds("dense_fp32", device, 4)  # no launch costs: the roofline work alone
    assert seconds("dense_fp32", replace(device, layer_overhead_s=work / 2), 4) == pytest.approx(work)
    assert seconds("dense_fp32", replace(device, layer_overhead_s=10 * work), 4) == pytest.approx(10 * work)
    # A dequantizing kernel launches extra operations per compressed Linear (7 in a Llama layer).
    launch = seconds("dequant_int4", replace(device, layer_overhead_s=1.0), 4)
    assert launch == pytest.approx(1.0 + len(layer.linears) * 1e-3)
    restored = DeviceProfile.from_dict(replace(device, layer_overhead_s=2e-4).to_dict())
    assert restored.layer_overhead_s == 2e-4 and restored.kernels["dequant_int4"].call_overhead_s == 1e-3
    with pytest.raises(ValueError, match="layer_overhead_s"):
        DeviceProfile.from_dict({**device.to_dict(), "layer_overhead_s": -1.0})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda K: DeviceProfile("x", 2**30, float("nan"), 1e9, 1e10, {"dense_fp32": K(1e11)}), "memory_bandwidth"),
        (lambda K: DeviceProfile("x", 2**30, 1e10, -1.0, 1e10, {"dense_fp32": K(1e11)}), "storage_bandwidth"),
        (lambda K: DeviceProfile("x", 0, 1e10, 1e9, 1e10, {"dense_fp32": K(1e11)}), "memory_bytes"),
        (lambda K: DeviceProfile(" ", 2**30, 1e10, 1e9, 1e10, {"dense_fp32": K(1e11)}), "name must be a non-empty"),
        (lambda K: DeviceProfile("x", 2**30, 1e10, 1e9, 1e10, {}), "kernels must be a non-empty dict"),
        (lambda K: DeviceProfile("x", 2**30, 1e10, 1e9, 1e10, {"warp_drive": K(1e11)}), "unknown kernels"),
        (lambda K: K(0.0), "Kernel.flops"),
        (lambda K: K(1e11, dequant_per_s=float("inf")), "Kernel.dequant_per_s"),
        (lambda K: Workload(batch_size=1.5), "Workload.batch_size must be an integer"),
        (lambda K: Workload(prompt_tokens=True), "Workload.prompt_tokens must be an integer"),
        (lambda K: Workload(decode_tokens=-1), "Workload.decode_tokens must be an integer of at least 0"),
    ],
)
def test_profiles_and_workloads_built_in_python_are_validated(build, message):
    from edge_llm.scheduling.devices import Kernel

    with pytest.raises(ValueError, match=message):
        build(Kernel)


def test_a_2_4_pruned_model_scheduled_without_its_policy_can_use_sparse_2_4():
    from tiny_models import tiny_model

    from edge_llm.luc import compress_model
    from edge_llm.scheduling.cost import ModelSpec

    model = tiny_model("llama", 2)
    compress_model(model, [(4, 0.5), (4, 0.0)], CompressionMethod(16, "rtn", "magnitude", "nm"), progress=False)
    spec = ModelSpec.from_model(model)  # no policy=: the model's own
    assert [layer.structure for layer in spec.layers] == ["nm", "nm"]
    assert "sparse_2_4" in compatible_kernels(spec.layers[0], builtin_device("jetson-orin-nano-8gb"))


def test_an_uncompressed_model_is_not_offered_streaming_the_runtime_cannot_do():
    from edge_llm.scheduling.cost import ModelSpec, layer_options

    spec = ModelSpec.from_model(meta_model(2))
    device = builtin_device("jetson-orin-nano-8gb")
    for layer in spec.layers:
        assert {o.placement for o in layer_options(layer, spec, device, Workload())} == {"resident"}


def test_the_linears_a_targeted_policy_leaves_in_float_count_in_memory():
    from tiny_models import tiny_model

    from edge_llm.luc import compress_model
    from edge_llm.scheduling.cost import ModelSpec

    model = tiny_model("llama", 2)
    plain = ModelSpec.from_model(model)
    targets = ["q_proj", "v_proj"]
    policy = LUCPolicy([(4, 0.0)] * 2, CompressionMethod(16), targets)
    untargeted = sum(
        m.weight.numel() * 2
        for name, m in model.model.layers.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in targets
    )
    attention = model.model.layers[0].self_attn
    targeted = tuple((m.out_features, m.in_features) for m in (attention.q_proj, attention.v_proj))
    assert untargeted > 0
    # Described from the policy before compressing, and from the compressed model: the same spec,
    # the untargeted Linears' float16 bytes resident beside the embeddings.
    before = ModelSpec.from_model(model, policy=policy)
    compress_model(model, policy.layers, policy.method, targets=targets, progress=False)
    after = ModelSpec.from_model(model)
    for spec in (before, after):
        assert spec.other_bytes == plain.other_bytes + untargeted
        assert spec.layers[0].linears == targeted
    assert before.layers == after.layers
