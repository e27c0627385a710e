"""LUC layer by layer (`luc/streaming.py`): the same checkpoint as in-memory LUC, tensor for tensor,
with one decoder layer in memory at a time."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

import edge_llm  # noqa: F401  (registers LUC with transformers)
from edge_llm.luc import LUCConfig, LUCPolicy, streaming
from edge_llm.luc.streaming import compress_checkpoint

TOKENS = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))


def _tensors(folder):
    found = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                found[key] = handle.get_tensor(key)
    return found


def _assert_same_checkpoint(a, b):
    first, second = _tensors(a), _tensors(b)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    tiny_model("llama", 4).save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    return folder


def test_layer_by_layer_saves_what_in_memory_luc_saves_bit_for_bit(sharded, tmp_path, monkeypatch):
    """Profiled (output_mse, every candidate), searched and compressed with GPTQ and Wanda pruning,
    each layer calibrated on the compressed layers below it: the same tensors, the same config,
    and no more than one decoder layer off the meta device at any time."""
    settings = dict(
        avg_bits=3.0,
        avg_sparsity=0.25,
        metric="output_mse",
        dataset=TOKENS,
        bits=(2, 4, 8),
        sparsities=(0.0, 0.5),
        quant_algorithm="gptq",
        group_size=16,
        profile_cache_dir=str(tmp_path / "cache"),
    )
    in_memory = AutoModelForCausalLM.from_pretrained(sharded, quantization_config=LUCConfig(**settings))
    in_memory.save_pretrained(tmp_path / "in_memory")

    materialize, held = streaming.materialize, []

    def counting(module, prefix, checkpoint):
        held.append(prefix)
        materialize(module, prefix, checkpoint)

    monkeypatch.setattr(streaming, "materialize", counting)
    real_layers = []
    original_compress = streaming.compress_layer

    def watched(runner, layers, index, *args):
        real_layers.append(sum(1 for layer in layers if next(layer.parameters()).device.type != "meta"))
        return original_compress(runner, layers, index, *args)

    monkeypatch.setattr(streaming, "compress_layer", watched)
    policy = compress_checkpoint(sharded, tmp_path / "streamed", LUCConfig(**settings), progress=False)

    assert policy == in_memory.config.quantization_config.policy
    assert len({bits for bits, _ in policy.layers}) > 1  # a mixed policy, not one setting everywhere
    _assert_same_checkpoint(tmp_path / "in_memory", tmp_path / "streamed")
    assert real_layers == [1, 1, 1, 1]  # one decoder layer materialized at a time
    assert sum(p.startswith("model.layers.") for p in held) == 8  # each layer read once per pass
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert torch.equal(loaded(TOKENS[:2]).logits, in_memory(TOKENS[:2]).logits)


def test_a_given_policy_without_calibration_reads_no_data_and_keeps_tied_bfloat16_weights(tmp_path):
    """RTN without pruning needs no tokens; a single-file bfloat16 model with a tied head saves the
    embedding once, in bfloat16, as save_pretrained does."""
    model = tiny_model("llama", 3)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.to(torch.bfloat16).save_pretrained(tmp_path / "model")
    policy = LUCPolicy([(4, 0.0), (8, 0.0), (16, 0.0)])
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "model", quantization_config=LUCConfig(policy=policy))
    in_memory.save_pretrained(tmp_path / "in_memory")
    compress_checkpoint(tmp_path / "model", tmp_path / "streamed", LUCConfig(policy=policy), progress=False)
    _assert_same_checkpoint(tmp_path / "in_memory", tmp_path / "streamed")
    stored = _tensors(tmp_path / "streamed")
    assert "lm_head.weight" not in stored and stored["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_refusals_name_the_setting_or_file(sharded, tmp_path):
    with pytest.raises(ValueError, match="metric='output_mse'"):
        compress_checkpoint(sharded, tmp_path / "out", LUCConfig(avg_bits=4.0, dataset=TOKENS), progress=False)
    with pytest.raises(ValueError, match="target='gguf'"):
        compress_checkpoint(sharded, tmp_path / "out", LUCConfig(avg_bits=4.5, target="gguf"), progress=False)
    with pytest.raises(ValueError, match="holds no safetensors weights"):
        compress_checkpoint(tmp_path, tmp_path / "out", LUCConfig(policy=LUCPolicy([(4, 0.0)] * 4)), progress=False)
    with pytest.raises(ValueError, match="covers 2 layers but the model has 4"):
        compress_checkpoint(sharded, tmp_path / "out", LUCConfig(policy=LUCPolicy([(4, 0.0)] * 2)), progress=False)
    assert not (tmp_path / "out").exists()


def _copy(source, target):
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_a_shard_outside_the_folder_a_missing_or_misshapen_tensor_is_refused(sharded, tmp_path):
    policy = LUCConfig(policy=LUCPolicy([(4, 0.0)] * 4))
    outside = _copy(sharded, tmp_path / "outside")
    index = json.loads((outside / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../secret.safetensors"
    (outside / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=r"names the shard '\.\./secret\.safetensors', which is not a file in its folder"
    ):
        compress_checkpoint(outside, tmp_path / "out", policy, progress=False)

    missing = _copy(sharded, tmp_path / "missing")
    index = json.loads((missing / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    (missing / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lacks the tensors \['model.layers.2.mlp.up_proj.weight'\]"):
        compress_checkpoint(missing, tmp_path / "out", policy, progress=False)

    misshapen = _copy(sharded, tmp_path / "misshapen")
    config = json.loads((misshapen / "config.json").read_text())
    config["intermediate_size"] = 48
    (misshapen / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(64, 32\), the config says"):
        compress_checkpoint(misshapen, tmp_path / "out", policy, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_run_that_fails_midway_leaves_the_old_output_and_a_finished_one_keeps_the_users_files(
    sharded, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    config = LUCConfig(policy=LUCPolicy([(4, 0.0)] * 4))
    compress_checkpoint(sharded, out, config, progress=False)
    (out / "notes.txt").write_text("mine")
    before = _tensors(out)
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return original(*args)

    original = streaming.compress_layer
    monkeypatch.setattr(streaming, "compress_layer", failing)
    with pytest.raises(RuntimeError, match="killed"):
        compress_checkpoint(sharded, out, LUCConfig(policy=LUCPolicy([(8, 0.0)] * 4)), progress=False)
    after = _tensors(out)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not list(tmp_path.glob(".out.partial-*"))
    monkeypatch.setattr(streaming, "compress_layer", original)
    compress_checkpoint(sharded, out, LUCConfig(policy=LUCPolicy([(8, 0.0)] * 4)), progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert LUCPolicy.from_dict(json.loads((out / "config.json").read_text())["quantization_config"]["policy"]).layers[
        0
    ] == (8, 0.0)


def test_compressed_layers_hold_no_graph_back_to_the_float_weights():
    """Compressing a layer whose weights require grad (as a loaded model's do) outside no_grad:
    the LUC buffers carry no autograd graph, which would keep every float weight alive (the
    layer-by-layer run grew by one float layer per layer before)."""
    from edge_llm.luc.compress import compress_layer
    from edge_llm.luc.method import CompressionMethod

    model = tiny_model("llama", 2)
    assert all(p.requires_grad for p in model.parameters())
    layers = model.model.layers
    compress_layer(None, layers, 0, (4, 0.0), CompressionMethod(group_size=16), None)
    buffers = list(layers[0].buffers())
    assert buffers and all(b.grad_fn is None and not b.requires_grad for b in buffers)
