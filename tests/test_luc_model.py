"""LUC on whole models: LUCLinear, profiling, transformers/Optimum integration, tuning on top."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import VOCAB, tiny_model
from trainer_helpers import counting_dataset, training_args
from transformers import AutoModelForCausalLM

import edge_llm
from edge_llm.luc import (
    Budget,
    CompressionMethod,
    LUCConfig,
    LUCLinear,
    LUCPolicy,
    LUCQuantizer,
    compress_model,
    profile_sensitivity,
)
from edge_llm.luc.checks import MARKER
from edge_llm.luc.quantize import quantize_rtn

METHOD = CompressionMethod(group_size=16, quant_method="rtn", prune_method="wanda")


def calibration(rows=8, length=32, seed=0):
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    tiny_model("llama", 4).save_pretrained(path)
    return path


@pytest.mark.parametrize(("bits", "sparsity"), [(2, 0.0), (3, 0.25), (4, 0.5), (8, 0.75), (16, 0.5)])
def test_luc_linear_stores_less_and_computes_with_its_dequantized_weight(bits, sparsity):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    mask = None
    if sparsity:
        mask = torch.zeros(32, 64, dtype=torch.bool)
        mask[:, : 64 - round(64 * sparsity)] = True
        mask = mask[:, torch.randperm(64)]
    quantized = None if bits == 16 else quantize_rtn(linear.weight.detach(), bits, 16, mask)
    layer = LUCLinear.from_linear(linear, bits, sparsity, 16, quantized, mask)
    weight = layer.dequantize_weight()
    if mask is not None:
        assert (weight[~mask] == 0).all() and torch.equal(layer.mask(), mask)
    x = torch.randn(3, 64)
    layer.use_kernel = False  # the reference path; the fast paths are tested in test_luc_kernels.py
    torch.testing.assert_close(layer(x), x @ weight.t() + linear.bias)
    assert layer.weight.dim() == 1  # never loadable into a float Linear
    dense_bytes = 32 * 64 * 2
    assert layer.storage_bytes() < dense_bytes * (bits / 16 + 0.35)


def test_luc_linear_backward_recomputes_the_weight_instead_of_saving_it():
    layer = LUCLinear.from_linear(torch.nn.Linear(64, 32), 4, 0.0, 16, quantize_rtn(torch.randn(32, 64), 4, 16))
    layer.use_kernel = False
    x = torch.randn(5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    out.sum().backward()
    assert not any(t.shape == (32, 64) for t in saved)
    torch.testing.assert_close(x.grad, torch.ones(5, 32) @ layer.dequantize_weight())


def test_profile_is_cached_and_the_search_meets_the_budget(tmp_path, monkeypatch):
    model = tiny_model("llama", 4)
    profile = profile_sensitivity(
        model, calibration(), bits=(2, 4, 8), sparsities=(0.0, 0.5), method=METHOD, cache_dir=tmp_path, progress=False
    )
    assert len(profile.damage) == 4 and len(profile.damage[0]) == 6
    # More bits and less pruning never hurt more (on average over layers).
    damage = torch.tensor(profile.damage).mean(0)
    assert damage[0] > damage[2] > damage[4] and damage[1] > damage[0]
    # A second run with the same model, data and settings reads the cache.
    import edge_llm.luc.profile as profile_module

    monkeypatch.setattr(profile_module, "_measure", lambda *a, **k: pytest.fail("profile was recomputed"))
    again = profile_sensitivity(
        model, calibration(), bits=(2, 4, 8), sparsities=(0.0, 0.5), method=METHOD, cache_dir=tmp_path, progress=False
    )
    assert again.damage == profile.damage
    monkeypatch.undo()
    # A cache entry cut short (a process killed while writing it, before writes were atomic) is
    # measured again and replaced, not a crash of every later run.
    (entry,) = tmp_path.glob("luc-profile-*.json")
    entry.write_text(entry.read_text()[:40])
    repaired = profile_sensitivity(
        model, calibration(), bits=(2, 4, 8), sparsities=(0.0, 0.5), method=METHOD, cache_dir=tmp_path, progress=False
    )
    assert repaired.damage == profile.damage and json.loads(entry.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name]  # no temporary file left
    policy = profile.search(Budget(avg_bits=4.0, avg_sparsity=0.25))
    assert sum(b for b, _ in policy.layers) <= 16 and sum(s for _, s in policy.layers) >= 1.0
    assert profile.policy_bytes(policy) <= profile.policy_bytes(LUCPolicy([(8, 0.0)] * 4, METHOD))


def test_from_pretrained_compresses_and_reloads_bit_identically(base_dir, tmp_path):
    config = LUCConfig(
        avg_bits=3.0,
        avg_sparsity=0.25,
        dataset=calibration().tolist(),
        group_size=16,
        num_samples=8,
        seq_len=32,
        bits=(2, 3, 4),
        sparsities=(0.0, 0.25, 0.5),
        profile_cache_dir=str(tmp_path / "cache"),
    )
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config)
    linears = [m for m in model.modules() if isinstance(m, LUCLinear)]
    assert len(linears) == 4 * 7
    policy = model.config.quantization_config.policy
    params = [
        sum(m.weight_scales.shape[0] * m.in_features for m in layer.modules() if isinstance(m, LUCLinear))
        for layer in model.model.layers
    ]
    assert sum(p * b for p, (b, _) in zip(params, policy.layers, strict=True)) <= 3.0 * sum(params)
    x = calibration(2, 16, seed=5)
    with torch.no_grad():
        expected = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "luc")
    stored = load_file(tmp_path / "luc" / "model.safetensors")
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert stored["model.layers.0.self_attn.q_proj.weight_scales"].dtype == torch.float16
    assert MARKER in stored
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "luc")
    assert reloaded.model.layers[0].self_attn.q_proj.weight_scales.dtype == torch.float16
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, expected)
    compressed = sum(m.storage_bytes() for m in linears)
    dense = sum(m.in_features * m.out_features * 4 for m in linears)
    assert compressed < dense / 6
    # A requested dtype applies to the uncompressed tensors; LUC's own stay bit for bit as stored.
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "luc", dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    for name, tensor in half.state_dict().items():
        if name in stored and stored[name].dtype in (torch.uint8, torch.float16):
            assert torch.equal(tensor, stored[name]), name


def test_loading_without_edge_llm_fails_loudly_and_says_to_import_it(base_dir, tmp_path):
    policy = LUCPolicy([(8, 0.0)] * 4, CompressionMethod(16, "rtn", "magnitude"))  # 8-bit: same element count
    AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=LUCConfig(policy=policy)).save_pretrained(
        tmp_path / "luc"
    )
    load = f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'luc')!r})"
    script = f"from transformers import AutoModelForCausalLM; {load}"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "size mismatch" in output or "mismatch" in output.lower()
    assert MARKER in output and "edge_llm_luc" in output


def test_optimum_style_quantizer_saves_a_loadable_model(base_dir, tmp_path):
    quantizer = LUCQuantizer.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir))
    model = quantizer.quantize(
        save_dir=tmp_path / "out",
        dataset=calibration().tolist(),
        avg_bits=4.0,
        avg_sparsity=None,
        bits=(2, 4, 8),
        sparsities=(0.0,),
        group_size=16,
        num_samples=8,
        seq_len=32,
        quant_algorithm="gptq",
        metric="output_mse",
        profile_cache_dir=str(tmp_path / "cache"),
    )
    assert isinstance(model.model.layers[0].mlp.down_proj, LUCLinear)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    x = calibration(1, 8, seed=3)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, model(input_ids=x).logits)


def test_edge_llm_tuning_on_a_compressed_base(tmp_path):
    model = tiny_model("llama", 4)
    compress_model(model, [(4, 0.5), (3, 0.25), (4, 0.0), (2, 0.5)], METHOD, calibration(), progress=False)
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    peft_model = get_peft_model(
        model, edge_llm.EdgeLLMConfig(r=4, target_modules=["q_proj", "v_proj"], exit_layers=[1], backprop_depth=2)
    )
    trainer = edge_llm.EdgeTrainer(
        model=peft_model,
        args=training_args(tmp_path, max_steps=4, learning_rate=1e-2),
        train_dataset=counting_dataset(),
    )
    trainer.train()
    # The compressed base is frozen: its packed tensors are untouched; the adapters trained.
    after = {n.split(".", 2)[-1].replace("base_layer.", ""): b for n, b in peft_model.named_buffers()}
    assert frozen.keys() <= after.keys() and all(torch.equal(after[n], b) for n, b in frozen.items())
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    peft_model.save_pretrained(tmp_path / "adapter")
    x = calibration(1, 8, seed=4)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
    base = tiny_model("llama", 4)
    compress_model(base, [(4, 0.5), (3, 0.25), (4, 0.0), (2, 0.5)], METHOD, calibration(), progress=False)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(avg_bits=1.0), "avg_bits=1.0 is outside the candidate bit-widths"),
        (dict(avg_sparsity=0.9), "avg_sparsity=0.9 is outside the candidate sparsities"),
        (dict(weight_budget_bytes=-5), "weight_budget_bytes must be a positive integer"),
        (dict(avg_bits=None, avg_sparsity=None), "needs a budget"),
        (dict(bits=(2, 9)), "bits must be one of"),
        (dict(sparsities=(0.0, 1.5)), r"sparsity must be in \[0, 1\)"),
        (dict(quant_algorithm="awq"), "LUCConfig.quant_algorithm must be one of"),
        (dict(metric="ppl"), "metric must be one of"),
        (dict(group_size=0), "group_size must be a positive integer"),
        (dict(policy={"format": "edge-llm/luc-policy", "version": 1}), "Invalid LUC policy"),
        (dict(dataset=123), "LUCConfig.dataset must be a list of strings .* got int"),
        (dict(dataset={"text": ["a"]}), "LUCConfig.dataset must be .* got dict"),
        (dict(dataset="sonnets"), "LUCConfig.dataset must be .* got str"),
    ],
)
def test_bad_luc_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LUCConfig(**kwargs)


def test_missing_calibration_data_is_a_clear_error(base_dir):
    with pytest.raises(ValueError, match="LUC needs calibration data"):
        AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=LUCConfig())
    with pytest.raises(ValueError, match="also pass the tokenizer"):
        AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=LUCConfig(dataset=["some text"]))


def test_a_given_policy_asks_for_calibration_data_only_where_it_uses_it(base_dir):
    # Round to nearest without pruning uses no data, whatever the (default: Wanda) prune method.
    policy = LUCPolicy([(4, 0.0)] * 4, CompressionMethod(16, "rtn", "wanda"))
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=LUCConfig(policy=policy))
    assert isinstance(model.model.layers[0].mlp.down_proj, LUCLinear)
    pruned = LUCPolicy([(4, 0.25)] * 4, CompressionMethod(16, "rtn", "wanda"))
    with pytest.raises(ValueError, match="LUC needs calibration data"):
        AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=LUCConfig(policy=pruned))


def test_a_checkpoint_whose_policy_is_a_path_is_refused_without_reading_it(base_dir, tmp_path):
    policy = LUCPolicy([(8, 0.0)] * 4, CompressionMethod(16, "rtn", "magnitude"))
    AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=LUCConfig(policy=policy)).save_pretrained(
        tmp_path / "luc"
    )
    config_path = tmp_path / "luc" / "config.json"
    config = json.loads(config_path.read_text())
    outside = tmp_path / "elsewhere.json"
    policy.save(outside)
    config["quantization_config"]["policy"] = str(outside)  # a tampered checkpoint pointing outside its folder
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="policy must be the LUC policy itself"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "luc")


def test_an_interrupted_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    from edge_llm._io import atomic_write_text

    path = tmp_path / "policy.json"
    atomic_write_text(path, "old")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new and longer")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["policy.json"]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda t, k: t.pop(k["codes"]), "is missing from its safetensors files"),
        (lambda t, k: t.update({k["codes"]: t[k["codes"]].float()}), "is F32"),
        (lambda t, k: t.update({k["scales"]: t[k["scales"]][:, :1].contiguous()}), "the policy in config.json implies"),
        (lambda t, k: t[k["scales"]].view(-1)[0].fill_(float("nan")), "weight_scales holds non-finite"),
        (lambda t, k: t[k["zeros"]].view(-1)[0].fill_(0.5), "weight_zeros must hold finite whole numbers"),
        (lambda t, k: t[k["mask"]].view(-1)[0].bitwise_xor_(1), "weight_mask does not keep"),
    ],
    ids=["missing-codes", "float-codes", "scales-shape", "nan-scale", "fractional-zero", "mask-popcount"],
)
def test_a_damaged_luc_checkpoint_is_refused_naming_the_tensor(base_dir, tmp_path, tamper, message):
    from safetensors.torch import load_file, save_file

    policy = LUCPolicy([(4, 0.5)] * 4, CompressionMethod(16, "rtn", "magnitude"))
    AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=LUCConfig(policy=policy)).save_pretrained(
        tmp_path / "luc"
    )
    file = tmp_path / "luc" / "model.safetensors"
    tensors = load_file(file)
    prefix = "model.layers.1.mlp.up_proj."
    keys = {"codes": prefix + "weight", "scales": prefix + "weight_scales", "zeros": prefix + "weight_zeros"}
    keys["mask"] = prefix + "weight_mask"
    tamper(tensors, keys)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path / "luc")


def test_token_lists_are_calibration_samples_as_given(caplog):
    from edge_llm.luc import calibration_tokens

    rows = calibration(rows=8, length=32).tolist()
    with caplog.at_level("INFO", logger="edge_llm.luc.calibration"):
        tokens = calibration_tokens(rows, num_samples=16, seq_len=256)  # the defaults ask for more
    assert tokens.tolist() == rows and "8 given token samples, 32 tokens each" in caplog.text
    assert calibration_tokens(rows, num_samples=4, seq_len=16).tolist() == [r[:16] for r in rows[:4]]
    assert calibration_tokens([[1, 2, 3], [4, 5]], num_samples=4, seq_len=8).tolist() == [[1, 2], [4, 5]]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        calibration_tokens([[1], [2, 3]])


def test_a_folder_written_as_a_whole_replaces_the_old_one_only_when_complete(tmp_path):
    from edge_llm._io import atomic_directory

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(out) as staging:
        (staging / "adapter_config.json").write_text("new, half written")
        raise KeyboardInterrupt
    assert (out / "adapter_config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with atomic_directory(out) as staging:
        (staging / "adapter_config.json").write_text("new")
    assert (out / "adapter_config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_policy_edited_in_config_json_after_saving_is_refused(base_dir, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    policy = LUCPolicy([(4, 0.0)] * 3 + [(16, 0.0)], CompressionMethod(16, "rtn", "magnitude"))
    AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=LUCConfig(policy=policy)).save_pretrained(
        tmp_path / "luc"
    )
    config_file = tmp_path / "luc" / "config.json"
    original = config_file.read_text()
    config = json.loads(original)
    # Groups of 17 give every layer the same number of groups as 16: no shape can tell.
    config["quantization_config"]["policy"]["method"]["group_size"] = 17
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not the one its tensors were compressed with"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "luc")
    # Without the marker the edit could not be seen: refused.
    tensors = load_file(tmp_path / "luc" / "model.safetensors")
    marker = tensors.pop(MARKER)
    save_file(tensors, tmp_path / "luc" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"has no {MARKER} tensor"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "luc")
    # A checkpoint from before the fingerprint (a one-byte marker) still loads, with a warning that
    # says an edit cannot be detected.
    config_file.write_text(original)
    tensors[MARKER] = torch.ones(1, dtype=torch.uint8)
    save_file(tensors, tmp_path / "luc" / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="edge_llm.luc.checks"):
        assert AutoModelForCausalLM.from_pretrained(tmp_path / "luc") is not None
    assert "predates policy fingerprints" in caplog.text
    # NaN in a 16-bit layer's values is refused like a NaN scale
    tensors[MARKER] = marker
    values = next(k for k in tensors if k.endswith("down_proj.weight") and tensors[k].dtype == torch.float16)
    tensors[values][0] = float("nan")
    save_file(tensors, tmp_path / "luc" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="16-bit weight values hold NaN"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "luc")


def test_a_bits_only_budget_requires_no_pruning():
    # The default asks for no sparsity: LUCConfig(avg_bits=3.0) must not prune every layer by itself.
    assert LUCConfig(avg_bits=3.0, dataset=["x"]).budget == Budget(avg_bits=3.0)


def test_long_profiling_is_announced_with_an_estimate(monkeypatch, caplog):
    from edge_llm.luc import profile as profile_module

    monkeypatch.setattr(profile_module, "LONG_PROFILE_S", 0.0)  # every run is "long" here
    with caplog.at_level(logging.WARNING, logger="edge_llm.luc.profile"):
        profile_sensitivity(
            tiny_model("llama", 4), calibration(), bits=(4, 8), sparsities=(0.0,), method=METHOD, progress=False
        )
    messages = [r.getMessage() for r in caplog.records]
    assert any("will take about" in m and "4 layers x 2 candidate settings" in m for m in messages)


def test_the_profile_cache_is_found_whatever_the_dtype_path_or_budget(tmp_path, monkeypatch):
    import edge_llm.luc.profile as profile_module

    # Values a bfloat16 checkpoint holds, loaded as float32 (an exact upcast), then as bfloat16.
    model = tiny_model("llama", 4).to(torch.bfloat16).to(torch.float32)
    settings = dict(bits=(2, 4), sparsities=(0.0,), method=METHOD, cache_dir=tmp_path, progress=False)
    first = profile_sensitivity(model, calibration(), **settings)
    monkeypatch.setattr(profile_module, "_measure", lambda *a, **k: pytest.fail("profile was recomputed"))
    again = profile_sensitivity(model.to(torch.bfloat16), calibration(), **settings)
    assert again.damage == first.damage
    # The same checkpoint from another folder, while a LUC budget is being applied to it.
    model.config._name_or_path = str(tmp_path / "a-copy")
    model.config.quantization_config = {"quant_method": "edge_llm_luc", "avg_bits": 3.0}
    assert profile_sensitivity(model, calibration(), **settings).damage == first.damage


def test_a_tampered_cache_entry_is_measured_again_and_a_bad_cache_folder_is_refused_before_profiling(
    tmp_path, monkeypatch
):
    import edge_llm.luc.profile as profile_module

    model = tiny_model("llama", 4)
    settings = dict(bits=(2, 4), sparsities=(0.0,), method=METHOD, cache_dir=tmp_path, progress=False)
    first = profile_sensitivity(model, calibration(), **settings)
    (entry,) = tmp_path.glob("luc-profile-*.json")
    data = json.loads(entry.read_text())
    data["damage"] = [[0.0] * len(row) for row in data["damage"]]  # "free" compression: not a measurement
    entry.write_text(json.dumps(data))
    assert profile_sensitivity(model, calibration(), **settings).damage == first.damage
    monkeypatch.setattr(profile_module, "_measure", lambda *a, **k: pytest.fail("profiled before the check"))
    (tmp_path / "a-file").write_text("")
    for folder, message in ((tmp_path / "a-file", "is a file"), (tmp_path / "a-file" / "sub", "cannot be made")):
        with pytest.raises(ValueError, match=f"profile_cache_dir .*{message}"):
            profile_sensitivity(model, calibration(), **{**settings, "cache_dir": folder})
