"""Bundles: export, verification, overwrite and the reference executor."""

import json
import sys

import pytest
import torch
from export_models import (
    METHOD,
    adapted_model,
    cpu_device,
    expected_logits,
)
from tiny_models import VOCAB, tiny_model

import edge_llm
from edge_llm.export import export, verify_bundle, write_gguf
from edge_llm.luc import compress_model
from edge_llm.runtime import load_bundle
from edge_llm.scheduling import Workload, schedule


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
