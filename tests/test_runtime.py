"""The reference executor's kernels and the kernel registry the schedules name."""

import json
from importlib.resources import files

import pytest
import torch
from export_models import (
    METHOD,
    POLICY,
    cpu_device,
    expected_logits,
)
from tiny_models import tiny_model

from edge_llm.export import export
from edge_llm.luc import CompressionMethod, LUCLinear, compress_model
from edge_llm.runtime import DenseKernel, SparseKernel, load_bundle
from edge_llm.scheduling import DeviceProfile, Kernel, Workload, schedule


def test_kernels_compute_what_the_compressed_layer_computes():
    model = tiny_model("llama", 4)
    compress_model(model, POLICY, METHOD, progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    layer.use_kernel = False  # LUC's float32 reference path
    x = torch.randn(3, 32)
    torch.testing.assert_close(DenseKernel(layer, torch.float32)(x), layer(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(SparseKernel(layer)(x), layer(x), rtol=1e-5, atol=1e-6)


def test_a_schedule_with_the_int4_kernel_runs_it_and_matches_the_compressed_model(tmp_path):
    from edge_llm.runtime import Int4Kernel

    model = tiny_model("llama", 4)
    compress_model(model, [(4, 0.0), (2, 0.0), (4, 0.5), (8, 0.25)], CompressionMethod(32, "rtn", "magnitude"))
    device = cpu_device(10**9)
    device = DeviceProfile(
        device.name, device.memory_bytes, 2e10, 1e9, 1e10, {**device.kernels, "int4_packed": Kernel(1e13)}
    )
    plan = schedule(model, device, Workload(prompt_tokens=8))
    # Every LUC layer fits the int4 kernel: 2-4 bits in one 4-bit plane, 8 bits in two, pruned
    # weights as exact zeros.
    assert [p.kernel for p in plan.layers] == ["int4_packed"] * 4
    runner = load_bundle(export(model, plan, tmp_path / "bundle"))
    modules = [runner.model.model.layers[i].mlp.down_proj for i in range(4)]
    assert all(isinstance(m, Int4Kernel) for m in modules) and [m.planes for m in modules] == [1, 1, 1, 2]
    assert not any(isinstance(b, LUCLinear) for b in runner.modules())
    x = torch.randint(0, 96, (2, 9))
    expected = expected_logits(model, x)
    with torch.no_grad():
        got = runner(input_ids=x).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2  # bfloat16 activations in the kernel


def test_schemas_and_profiles_read_the_kernel_registry_as_it_is_now():
    from dataclasses import replace

    from edge_llm.scheduling.kernels import KERNELS, kernel_type, register

    for name in ("device-profile", "schedule"):
        schema = json.loads(files("edge_llm").joinpath("schemas", f"{name}.schema.json").read_text())
        assert "enum" not in schema["$defs"]["kernel"]  # one owner: the registry
    device = cpu_device(10**9).to_dict()
    with pytest.raises(ValueError, match="Invalid device profile at kernels"):
        DeviceProfile.from_dict({**device, "kernels": {"warp_drive": {"flops": 1.0}}})
    assert DeviceProfile.from_dict(device) == cpu_device(10**9)
    # A kernel registered from outside, after import, is known to the profile's check and its schema.
    dense = kernel_type("dense_fp32")
    register(replace(dense, name="npu_int4", description="an NPU's int4 matmul"))
    try:
        with_npu = {**device, "kernels": {**device["kernels"], "npu_int4": {"flops": 1e12}}}
        assert DeviceProfile.from_dict(with_npu).kernels["npu_int4"] == Kernel(1e12)
    finally:
        del KERNELS["npu_int4"]
