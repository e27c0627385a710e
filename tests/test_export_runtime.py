"""Bundles: export, verification, the reference executor, and GGUF lowering."""

import json
import sys
from importlib.resources import files

import numpy as np
import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, tiny_model

import edge_llm
from edge_llm.export import export, verify_bundle, write_gguf
from edge_llm.export.gguf import quantize_tensor
from edge_llm.luc import CompressionMethod, LUCLinear, compress_model
from edge_llm.runtime import DenseKernel, SparseKernel, load_bundle
from edge_llm.scheduling import DeviceProfile, Kernel, Workload, schedule

POLICY = [(4, 0.5), (3, 0.25), (8, 0.0), (2, 0.5)]
METHOD = CompressionMethod(group_size=16, prune_method="magnitude")


class _ToyTokenizer:
    """The vocabulary a llama.cpp file needs, for models of the toy vocabulary."""

    all_special_ids = (0,)
    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 0, 0, None, None

    def get_vocab(self):
        return {f"t{i}": i for i in range(VOCAB)}

    class backend_tokenizer:
        @staticmethod
        def to_str():
            return json.dumps({"model": {"merges": ["t 1"]}})


def cpu_device(memory_bytes):
    rate = 5e10
    kernels = {"dense_fp32": Kernel(rate), "sparse_unstructured": Kernel(rate / 2)}
    kernels.update({f"dequant_int{b}": Kernel(rate, dequant_per_s=1e9) for b in (2, 3, 4, 8)})
    return DeviceProfile("test cpu", memory_bytes, 2e10, 1e9, 1e10, kernels, "synthetic")


def adapted_model(window_input="backbone"):
    model = tiny_model("llama", 4)
    compress_model(model, POLICY, METHOD, progress=False)
    model = get_peft_model(
        model,
        edge_llm.EdgeLLMConfig(
            r=4,
            target_modules=["q_proj", "v_proj"],
            exit_layers=[1],
            backprop_depth=2,
            voting="mean",
            window_input=window_input,
            init_lora_weights=False,
        ),
    )
    return model.eval()


def expected_logits(model, x):
    """The compressed model's logits on LUC's reference path (dequantize into float32 every call),
    which the dequant_int* and dense_fp32 kernels reproduce."""
    from edge_llm.luc import LUCLinear

    default, LUCLinear.use_kernel = LUCLinear.use_kernel, False
    try:
        with torch.no_grad():
            return model(input_ids=x).logits
    finally:
        LUCLinear.use_kernel = default


@pytest.mark.parametrize("merge", [False, True])
def test_bundle_round_trip_through_the_reference_executor(tmp_path, merge):
    # Merging folds every window's adapter into one stream: only window_input="adapted" allows it.
    model = adapted_model("adapted" if merge else "backbone")
    edge = model.peft_config["default"]
    roomy = schedule(model, cpu_device(10**9), Workload(prompt_tokens=16, decode_tokens=4), edge_config=edge)
    # Force the executor through every path: dense, sparse and packed kernels, and one streamed layer.
    plans = roomy.layers
    plans[0] = plans[0].__class__(**{**plans[0].__dict__, "kernel": "dense_fp32"})
    plans[1] = plans[1].__class__(**{**plans[1].__dict__, "kernel": "sparse_unstructured"})
    plans[3] = plans[3].__class__(
        **{**plans[3].__dict__, "placement": "streamed", "memory_bytes": 0, "stream_bytes": 1000}
    )
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    if merge:
        model.merge_adapter()
        expected = expected_logits(model, x)
        model.unmerge_adapter()
    else:
        expected = expected_logits(model, x)
    out = export(model, roomy, tmp_path / "bundle", merge_adapters=merge)
    manifest = verify_bundle(out)
    assert manifest["adapter"]["merged"] is merge and manifest["adapter"]["exits"] == [1, 3]
    assert {"model.safetensors", "schedule.json", "config.json", "adapter/adapter_config.json"} <= manifest[
        "files"
    ].keys()
    runner = load_bundle(out)
    kinds = [type(m).__name__ for m in runner.modules()]
    assert "DenseKernel" in kinds and "SparseKernel" in kinds
    with torch.no_grad():
        actual = runner(input_ids=x).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    # The streamed layer holds no weights between passes.
    layer3 = runner.model.get_base_model().model.layers[3]
    assert all(b.numel() == 0 for n, b in layer3.named_buffers() if n.endswith(("weight", "weight_scales")))


def test_export_stores_uncompressed_tensors_in_the_requested_dtype(tmp_path):
    from safetensors.torch import load_file

    model = adapted_model()
    plan = schedule(model, cpu_device(10**9), Workload(prompt_tokens=8), edge_config=model.peft_config["default"])
    kept = load_file(export(model, plan, tmp_path / "kept") / "model.safetensors")
    half = load_file(export(model, plan, tmp_path / "half", dtype=torch.bfloat16) / "model.safetensors")
    assert kept.keys() == half.keys()
    for key, tensor in kept.items():
        if tensor.dtype == torch.float32:  # embeddings, norms: cast
            assert half[key].dtype == torch.bfloat16
            torch.testing.assert_close(half[key], tensor.to(torch.bfloat16), rtol=0, atol=0)
        else:  # LUC's packed codes, masks and float16 scales: stored bit for bit
            assert torch.equal(half[key], tensor)
    assert half["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert any(t.dtype == torch.float16 for t in half.values())  # the scales were not re-rounded
    # The bfloat16 bundle still runs, and agrees with the model up to bfloat16 rounding.
    x = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        actual = load_bundle(tmp_path / "half")(input_ids=x).logits.float()
    torch.testing.assert_close(actual, expected_logits(model, x), rtol=0.05, atol=0.05)
    # Asked to, the executor computes in float32 from the bfloat16 storage.
    wide = load_bundle(tmp_path / "half", dtype=torch.float32)
    assert wide.model.get_base_model().model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        assert wide(input_ids=x).logits.dtype == torch.float32


def test_export_refuses_to_overwrite_and_checks_the_schedule(tmp_path):
    model = adapted_model()
    plan = schedule(model, cpu_device(10**9), Workload(prompt_tokens=8), edge_config=model.peft_config["default"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not empty"):
        export(model, plan, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    other = tiny_model("llama", 4)
    compress_model(other, [(8, 0.0)] * 4, METHOD, progress=False)
    with pytest.raises(ValueError, match="schedule the model you export"):
        export(other, plan, tmp_path / "other")


def test_corrupt_or_foreign_bundles_are_rejected(tmp_path):
    model = adapted_model()
    plan = schedule(model, cpu_device(10**9), Workload(prompt_tokens=8), edge_config=model.peft_config["default"])
    out = export(model, plan, tmp_path / "bundle")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its manifest"):
        load_bundle(out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 7}))
    with pytest.raises(ValueError, match="Bundle format version 7 is not supported"):
        verify_bundle(out)
    with pytest.raises(FileNotFoundError, match="not an edge-llm bundle"):
        verify_bundle(tmp_path)


def _rewrite_listed(bundle, name: str, text: str) -> None:
    """Replace a bundle file and its manifest entry, as a consistent but wrong bundle would have it."""
    import hashlib

    (bundle / name).write_text(text)
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = {"bytes": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "files": {**manifest["files"], name: entry}}))


def test_a_schedule_with_nan_or_made_for_other_layers_is_refused_on_load(tmp_path):
    model = adapted_model()
    plan = schedule(model, cpu_device(10**9), Workload(prompt_tokens=8), edge_config=model.peft_config["default"])
    out = export(model, plan, tmp_path / "bundle")
    original = (out / "schedule.json").read_text()
    data = json.loads(original)
    _rewrite_listed(out, "schedule.json", json.dumps({**data, "fixed_seconds": float("nan")}))
    with pytest.raises(ValueError, match=r"schedule\.json is not a valid JSON schedule: it holds NaN"):
        load_bundle(out)
    layers = [{**data["layers"][0], "bits": 8}, *data["layers"][1:]]
    _rewrite_listed(out, "schedule.json", json.dumps({**data, "layers": layers}))
    with pytest.raises(ValueError, match=r"layer 0 at 8 bits .*schedule\.json is not this bundle's schedule"):
        load_bundle(out)
    _rewrite_listed(out, "schedule.json", original)
    load_bundle(out)


def test_a_manifest_cannot_reach_outside_its_bundle_nor_leave_files_unverified(tmp_path):
    model = adapted_model()
    plan = schedule(model, cpu_device(10**9), Workload(prompt_tokens=8), edge_config=model.peft_config["default"])
    out = export(model, plan, tmp_path / "bundle")
    manifest = json.loads((out / "manifest.json").read_text())
    outside = tmp_path / "secret.txt"
    outside.write_text("not the bundle's")
    entry = {"bytes": outside.stat().st_size, "sha256": "0" * 64}
    for name in ("../secret.txt", str(outside)):
        (out / "manifest.json").write_text(json.dumps({**manifest, "files": {**manifest["files"], name: entry}}))
        with pytest.raises(ValueError, match="outside the bundle"):
            verify_bundle(out)
    # Unlisting the weights (and then editing them) is caught: every file must be verified.
    files = {k: v for k, v in manifest["files"].items() if k != "model.safetensors"}
    (out / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
    with pytest.raises(ValueError, match=r"model\.safetensors is not in the manifest"):
        verify_bundle(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"does not list model\.safetensors"):
        verify_bundle(out)


def test_overwrite_replaces_a_bundle_whole_and_an_interrupted_export_keeps_the_old_one(tmp_path, monkeypatch):
    bundle_module = edge_llm.export.bundle

    model = adapted_model()
    plan = schedule(model, cpu_device(10**9), Workload(prompt_tokens=8), edge_config=model.peft_config["default"])
    out = export(model, plan, tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the user stops the export half-way: weights written, manifest not

    monkeypatch.setattr(bundle_module, "_write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        export(model, plan, out, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no partial folder left behind
    verify_bundle(out)
    (out / "leftover.gguf").write_bytes(b"from an older export")
    export(model, plan, out, overwrite=True)
    assert not (out / "leftover.gguf").exists()
    verify_bundle(out)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an edge-llm bundle"):
        export(model, plan, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_kernels_compute_what_the_compressed_layer_computes():
    model = tiny_model("llama", 4)
    compress_model(model, POLICY, METHOD, progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    layer.use_kernel = False  # LUC's float32 reference path
    x = torch.randn(3, 32)
    torch.testing.assert_close(DenseKernel(layer, torch.float32)(x), layer(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(SparseKernel(layer)(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qtype_name", ["Q2_K", "Q3_K", "Q4_1", "Q5_1", "Q8_0"])
def test_gguf_encoders_produce_blocks_gguf_decodes(qtype_name):
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    values = (np.random.default_rng(0).standard_normal((4, 512)) * 0.05).astype(np.float32)
    encoded = quantize_tensor(values, qtype)
    decoded = gguf.quants.dequantize(encoded, qtype)
    assert decoded.shape == values.shape
    relative = np.sqrt(((decoded - values) ** 2).mean()) / np.sqrt((values**2).mean())
    # Expected RMS error of a good 2/3/4/5/8-bit block quantizer on Gaussian data.
    assert relative < {"Q2_K": 0.4, "Q3_K": 0.2, "Q4_1": 0.1, "Q5_1": 0.05, "Q8_0": 0.01}[qtype_name]


@pytest.mark.parametrize(
    ("bits", "sparsity", "type_name"), [(4, 0.0, "Q4_1"), (3, 0.5, "Q4_1"), (2, 0.25, "Q4_1"), (5, 0.5, "Q5_1")]
)
def test_luc_codes_go_into_gguf_blocks_unchanged(bits, sparsity, type_name):
    import gguf

    from edge_llm.export.gguf import luc_blocks, pack_q4_1, pack_q5_1

    model = tiny_model("llama", 1)
    compress_model(model, [(bits, sparsity)], CompressionMethod(64, "rtn", "magnitude"), progress=False)
    layer = model.model.layers[0].mlp.down_proj
    blocks = luc_blocks(layer, 4 if type_name == "Q4_1" else 5)
    assert blocks is not None
    packed = (pack_q4_1 if type_name == "Q4_1" else pack_q5_1)(*blocks)
    decoded = gguf.quants.dequantize(packed, getattr(gguf.GGMLQuantizationType, type_name))
    expected = layer.dequantize_weight(torch.float32).numpy()
    assert decoded.shape == expected.shape
    # The same codes and scales: only m = -zero * scale is rounded to float16 (half an ulp of m).
    tolerance = np.abs(blocks[1].astype(np.float32)).max() * 2.0**-11
    assert np.abs(decoded - expected).max() <= tolerance
    if sparsity:  # pruned weights decode to zero
        assert np.abs(decoded[~layer.mask().numpy()]).max() <= tolerance


def test_luc_codes_that_do_not_fit_a_gguf_type_are_refused():
    from edge_llm.export.gguf import luc_blocks

    model = tiny_model("llama", 1)
    compress_model(model, [(8, 0.0)], CompressionMethod(64, "rtn", "magnitude"), progress=False)
    assert luc_blocks(model.model.layers[0].mlp.down_proj, 4) is None  # 8-bit codes, 4-bit type
    model = tiny_model("llama", 1)
    compress_model(model, [(4, 0.0)], CompressionMethod(16, "rtn", "magnitude"), progress=False)
    assert luc_blocks(model.model.layers[0].mlp.down_proj, 4) is None  # groups of 16 < blocks of 32


def gguf_llama():
    """A 4-layer Llama whose rows (256 and 512) fill K-quant blocks, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def adapted_gguf_llama(policy, grid="asymmetric"):
    """`gguf_llama` LUC-compressed with `policy` (RTN, magnitude, groups of 32, on `grid`) and an
    Edge-LLM adapter on q_proj at exit 1 (voting "last"), LoRA initialised non-zero."""
    model = gguf_llama()
    compress_model(model, policy, CompressionMethod(32, "rtn", "magnitude", grid=grid), progress=False)
    return get_peft_model(
        model,
        edge_llm.EdgeLLMConfig(r=4, target_modules=["q_proj"], exit_layers=[1], voting="last", init_lora_weights=False),
    ).eval()


def test_gguf_file_has_per_layer_types_and_edge_metadata(tmp_path):
    import gguf

    model = gguf_llama()
    compress_model(
        model,
        [(2, 0.0), (3, 0.0), (4, 0.5), (8, 0.0)],
        CompressionMethod(group_size=32, prune_method="magnitude"),
        progress=False,
    )
    model = get_peft_model(model, edge_llm.EdgeLLMConfig(r=4, target_modules=["q_proj"], exit_layers=[1]))

    small = write_gguf(model, tmp_path / "small.gguf", tokenizer=_ToyTokenizer(), k_quants=True)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(small)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q2_K" and types["blk.1.ffn_down.weight"] == "Q3_K"
    path = write_gguf(model, tmp_path / "model.gguf", tokenizer=_ToyTokenizer())
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    # By default 2/3-bit codes go into Q4_1 blocks unchanged.
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.1.ffn_down.weight"] == "Q4_1"
    assert types["blk.2.attn_v.weight"] == "Q4_1" and types["blk.3.ffn_up.weight"] == "Q8_0"
    assert small.stat().st_size < path.stat().st_size
    assert reader.fields["edge_llm.voting"].contents() == "weighted"
    assert reader.fields["edge_llm.exits"].contents() == [1, 3]
    policy = json.loads(reader.fields["edge_llm.luc_policy"].contents())
    assert [(layer["bits"], layer["sparsity"]) for layer in policy["layers"]] == [
        (2, 0.0),
        (3, 0.0),
        (4, 0.5),
        (8, 0.0),
    ]


def llama_cpp_and_pytorch_logits(model, path, seed: int, lora_path=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of llama.cpp running the GGUF at `path` (with the adapter GGUF at `lora_path`) and
    of `model`, on 48 seeded tokens."""
    import llama_cpp

    runtime = llama_cpp.Llama(
        model_path=str(path),
        lora_path=None if lora_path is None else str(lora_path),
        n_ctx=64,
        logits_all=True,
        verbose=False,
        n_threads=2,
    )
    try:
        tokens = torch.randint(1, VOCAB, (48,), generator=torch.Generator().manual_seed(seed)).tolist()
        runtime.eval(tokens)
        theirs = torch.tensor(np.array(runtime.scores[: len(tokens)]))
    finally:
        runtime.close()
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([tokens])).logits[0]
    return theirs, ours


def test_llama_cpp_loads_the_gguf_and_agrees_with_pytorch(tmp_path):
    pytest.importorskip("llama_cpp")
    # 2- to 5-bit codes go into Q4_1/Q5_1 blocks unchanged, 8-bit into Q8_0.
    # The last exit's window carries the adapter (folded in: re-quantized); llama.cpp also quantizes
    # activations to 8 bits.
    model = adapted_gguf_llama([(2, 0.0), (3, 0.5), (5, 0.0), (8, 0.0)])
    path = write_gguf(model, tmp_path / "model.gguf", tokenizer=_ToyTokenizer())
    theirs, ours = llama_cpp_and_pytorch_logits(model, path, seed=1)
    # llama.cpp re-encodes weights in GGUF blocks and computes in its own precision: the
    # distributions agree closely, not bit for bit.
    agreement = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(
        theirs.log_softmax(-1), ours.log_softmax(-1), log_target=True, reduction="batchmean"
    ).item()
    assert agreement >= 0.9 and kl < 1e-3, (agreement, kl)


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


def test_a_bundle_has_one_voting_rule_the_adapters(tmp_path):
    from dataclasses import replace

    model = adapted_model()  # voting="mean"
    device = cpu_device(10**9)
    plan = schedule(model, device, Workload(prompt_tokens=8, decode_tokens=2))  # no edge_config=: the adapter's
    assert plan.voting == "mean" and plan.exits == model.peft_config["default"].exit_layers
    with pytest.raises(ValueError, match="disagrees with the adapter's voting='mean'"):
        schedule(model, device, Workload(prompt_tokens=8, decode_tokens=2), voting="confidence")
    with pytest.raises(ValueError, match="a bundle has one voting rule"):
        export(model, replace(plan, voting="confidence"), tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_edge_llm_export_is_callable_and_keeps_its_submodules():
    import edge_llm.export.gguf

    assert callable(edge_llm.export) and edge_llm.export.gguf.write_gguf is write_gguf
    assert edge_llm.export.bundle.verify_bundle is verify_bundle


@pytest.mark.parametrize(
    ("bits", "sparsity", "grid"),
    [
        (2, 0.0, "asymmetric"),
        (3, 0.5, "asymmetric"),
        (4, 0.0, "asymmetric"),
        (4, 0.5, "asymmetric"),
        (4, 0.0, "symmetric"),
    ],
)
def test_luc_layers_go_into_executorch_int4_exactly(bits, sparsity, grid):
    pytest.importorskip("torchao")
    from collections import Counter

    from edge_llm.export.executorch import ZeroPointLinear, int4_block, int4_linear

    model = gguf_llama()
    method = CompressionMethod(64, "rtn", "magnitude", grid=grid)
    compress_model(model, [(bits, sparsity)] * 4, method, progress=False)
    luc = model.model.layers[0].mlp.down_proj  # 256 rows of 512: 8 groups each
    counts = Counter()
    block = int4_block(luc, 512)
    lowered = int4_linear(torch.nn.Linear(512, 256, bias=False), luc, False, block, counts)
    assert block == 64 and counts["int4 blocks holding LUC's codes"] == 256 * 8
    # 2-3-bit codes fit int4 as `code - zero_point`; asymmetric 4-bit codes span 16 levels around
    # the zero-point, so the zero-points ride in per-block offsets; symmetric ones are int4's own.
    offsets = bits == 4 and grid == "asymmetric"
    assert isinstance(lowered, ZeroPointLinear) == offsets
    int4 = (lowered.linear if offsets else lowered).weight
    assert int4.qdata.min() >= -8 and int4.qdata.max() <= 7
    int4.activation_quantization = None  # XNNPACK also quantizes activations: compare weights alone
    x = torch.randn(3, 512)
    reference = luc.dequantize_weight(torch.float32)
    torch.testing.assert_close(lowered(x), x @ reference.T, rtol=1e-5, atol=1e-5)


def test_export_targets_are_checked_before_any_work(tmp_path, monkeypatch):
    from edge_llm.export.targets import EXPORT_TARGETS

    model = adapted_model()
    plan = schedule(model, cpu_device(10**9), Workload(prompt_tokens=16, decode_tokens=4))
    assert set(EXPORT_TARGETS) == {"gguf", "executorch"}
    with pytest.raises(ValueError, match="Unknown export target 'onnx'; known: 'gguf', 'executorch'"):
        export(model, plan, tmp_path / "a", targets=["onnx"])
    with pytest.raises(TypeError, match=r"a list of target names, e.g. \['gguf'\]"):
        export(model, plan, tmp_path / "b", targets="gguf")
    with pytest.raises(ValueError, match="target_options names 'executorch', which is not among the targets"):
        export(model, plan, tmp_path / "c", targets=["gguf"], target_options={"executorch": {"max_seq_len": 8}})
    monkeypatch.setitem(sys.modules, "executorch", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install executorch"):
        export(model, plan, tmp_path / "d", targets=["executorch"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("grid", ["asymmetric", "symmetric"])
def test_executorch_runs_the_exported_program_and_agrees_with_pytorch(tmp_path, grid):
    pytest.importorskip("executorch")
    import executorch.kernels.quantized  # noqa: F401  (the int8 embedding table's kernel)
    from executorch.runtime import Runtime

    # 2-4-bit layers go to int4 blocks holding LUC's codes, 8-bit to int8 per channel; the last
    # exit's window carries the adapter (folded in: re-quantized); XNNPACK also quantizes
    # activations to int8 per token. The symmetric grid's scales carry signs (XNNPACK takes them).
    model = adapted_gguf_llama([(2, 0.0), (3, 0.5), (4, 0.0), (8, 0.0)], grid)
    plan = schedule(model, cpu_device(10**9), Workload(prompt_tokens=48, decode_tokens=8))
    out = export(model, plan, tmp_path / "bundle", targets=["executorch"])
    assert "model.pte" in verify_bundle(out)["files"]
    program = Runtime.get().load_program(str(out / "model.pte"))
    assert program.load_method("get_max_seq_len").execute([])[0] == 56  # the scheduled prompt + decode tokens
    forward = program.load_method("forward")
    tokens = torch.randint(1, VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    theirs = forward.execute([tokens, torch.arange(48)])[0][0]
    with torch.no_grad():
        ours = model(input_ids=tokens).logits[0]
    agreement = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(
        theirs.log_softmax(-1), ours.log_softmax(-1), log_target=True, reduction="batchmean"
    ).item()
    assert agreement >= 0.8 and kl < 1e-3, (agreement, kl)
    # The same program decodes: a prompt of 40, then token 41 through the KV cache, gives what one
    # pass over 41 tokens gives.
    forward.execute([tokens[:, :40], torch.arange(40)])
    step = forward.execute([tokens[:, 40:41], torch.tensor([40])])[0][0, -1]
    torch.testing.assert_close(step, theirs[40], rtol=1e-4, atol=1e-4)


def test_executorch_embedding_table_settings():
    pytest.importorskip("torchao")
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    from edge_llm.export.executorch import quantize_for_xnnpack

    model = adapted_gguf_llama([(4, 0.0)] * 4)
    table = model.get_base_model().get_input_embeddings().weight.detach()
    plain, counts = quantize_for_xnnpack(model)  # int8 per row by default
    stored = plain.get_input_embeddings().weight
    assert isinstance(stored, IntxUnpackedToInt8Tensor) and counts["int8 embedding tables"] == 1
    assert stored.qdata.dtype == torch.int8 and stored.scale.shape[0] == table.shape[0]
    # within half a step of each row's scale: round to nearest, symmetric
    step = table.abs().amax(1, keepdim=True) / 127
    assert ((stored.dequantize() - table).abs() <= step / 2 + 1e-6).all()
    assert plain.get_output_embeddings().weight is not stored  # the head is not a lookup
    plain, _ = quantize_for_xnnpack(model, embedding_bits=16)
    assert plain.get_input_embeddings().weight.dtype == torch.float16
    plain, _ = quantize_for_xnnpack(model, head_bits=None, embedding_bits=32)
    assert torch.equal(plain.get_input_embeddings().weight, table)
    with pytest.raises(ValueError, match=r"embedding_bits must be 8 .* got 12"):
        quantize_for_xnnpack(model, embedding_bits=12)


def test_executorch_refuses_an_adapter_it_would_lose():
    pytest.importorskip("torchao")
    from edge_llm.export.executorch import quantize_for_xnnpack

    model = tiny_model("gpt2", 2)  # Conv1D layers: LoRA wraps them, the float copy has no Linear there
    model = get_peft_model(model, edge_llm.EdgeLLMConfig(r=4, target_modules=["c_attn"], exit_layers=[1]))
    with pytest.raises(ValueError, match=r"class; transformer\.h\.0\.attn\.c_attn is a Conv1D there"):
        quantize_for_xnnpack(model)
