"""LUC for llama.cpp: per-tensor llama.cpp types, quantized by llama.cpp's own quantizer, written
unchanged into GGUF and computing in PyTorch with exactly the weights llama.cpp computes with."""

import itertools

import numpy as np
import pytest
import torch
from export_models import ToyTokenizer, gguf_llama, llama_cpp_and_pytorch_logits
from tiny_models import VOCAB

from edge_llm.export import write_gguf
from edge_llm.export.gguf import gguf_tensor_names
from edge_llm.luc import ggml
from edge_llm.luc.ggml_linear import GGMLEmbedding, GGMLLinear
from edge_llm.luc.gguf_policy import apply_types, policy_bytes, search_types
from edge_llm.luc.gguf_sensitivity import (
    EMBEDDING,
    Candidate,
    calibrate,
    damage_table,
    structural_table,
    weight_count,
    weight_tensors,
)

pytest.importorskip("llama_cpp")


def ggml_to_float(blocks: np.ndarray, kind: ggml.BlockType, columns: int) -> np.ndarray:
    """llama.cpp's own decoder (`ggml_get_type_traits(type)->to_float`): the reference."""
    decode = ggml._to_float(kind.name)
    assert decode is not None, f"llama.cpp's {kind.name} decoder was not found or its traits differ"
    data = np.ascontiguousarray(blocks)
    out = np.empty((data.shape[0], columns), dtype=np.float32)
    decode(data.ctypes.data, out.ctypes.data, out.size)
    return out


@pytest.mark.parametrize("name", list(ggml.BLOCK_TYPES))
@pytest.mark.parametrize("with_importance", [False, True])
def test_every_type_decodes_in_pytorch_exactly_as_in_llama_cpp(name, with_importance):
    kind = ggml.block_type(name)
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(16, 512, generator=generator) * torch.rand(512, generator=generator)).numpy()
    importance = torch.rand(512, generator=generator).numpy() if with_importance else None
    blocks = ggml.quantize(weight, kind, importance)
    assert blocks.shape == (16, kind.row_bytes(512))
    ours = ggml.dequantize(blocks, kind, 512)
    # Both decoders PyTorch may use are bit-exact to llama.cpp's: ggml's own (with llama-cpp-python)
    # and gguf-py's numpy one (without).
    reference = ggml_to_float(blocks, kind, 512) if name != "F16" else ours
    assert np.array_equal(ours, reference) and np.array_equal(ggml.gguf_dequantize(blocks, kind, 512), reference)
    # and it is a quantization of the weight: the error halves with every bit of the codes
    code_bits = int(name.lstrip("IQ")[0]) if name != "F16" else 11  # F16: 11 significant bits
    relative = np.linalg.norm(ours - weight) / np.linalg.norm(weight)
    assert relative < 2.0 ** (2 - code_bits), relative


def test_importance_steers_the_rounding_toward_important_columns():
    kind = ggml.block_type("Q4_0")
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 256, generator=generator).numpy()
    importance = np.ones(256, dtype=np.float32)
    importance[:32] = 100.0
    plain = ggml.dequantize(ggml.quantize(weight, kind), kind, 256)
    weighted = ggml.dequantize(ggml.quantize(weight, kind, importance), kind, 256)
    error = lambda q: float((importance * (q - weight) ** 2).sum())  # noqa: E731
    assert error(weighted) < error(plain)


def test_types_that_do_not_tile_the_rows_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        ggml.quantize(np.zeros((2, 576), dtype=np.float32), ggml.block_type("Q4_K"))
    assert [t.name for t in ggml.types_for_row(576, ("Q4_K", "Q4_0", "F16"))] == ["Q4_0", "F16"]
    with pytest.raises(ValueError, match=r"Unknown llama\.cpp weight type 'Q9_K'"):
        ggml.block_type("Q9_K")


def test_the_search_is_the_exact_optimum_within_the_budget_to_the_byte():
    rng = np.random.default_rng(0)
    kinds = [ggml.block_type(n) for n in ("Q4_0", "Q5_0", "Q8_0")]
    table = {
        f"t{i}": [Candidate(k, int(rng.integers(50, 200)) * 32, float(rng.random())) for k in kinds] for i in range(6)
    }
    for budget in (6 * 200 * 32, 4000, 2900, 2500):
        try:
            choice = search_types(table, budget)
        except ValueError as error:
            assert "below the smallest" in str(error)
            assert budget < sum(min(c.nbytes for c in cs) for cs in table.values())
            continue
        picked = {n: next(c for c in table[n] if c.kind.name == choice[n]) for n in table}
        assert sum(c.nbytes for c in picked.values()) <= budget
        best = min(
            sum(c.damage for c in combo)
            for combo in itertools.product(*table.values())
            if sum(c.nbytes for c in combo) <= budget
        )
        assert sum(c.damage for c in picked.values()) == pytest.approx(best, rel=1e-9)


def tied_gguf_llama():
    """`gguf_llama` with the LM head tied to the embedding table, as SmolLM2's, and embeddings large
    enough that its next-token distributions are peaked like a trained model's (a random model's
    near-ties would flip under llama.cpp's 8-bit activations and say nothing of the weights)."""
    model = gguf_llama().eval()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def calibrated():
    model = tied_gguf_llama()
    tokens = torch.randint(1, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    return model, calibrate(model, tokens, progress=False)


def test_calibration_measures_every_tensor_and_leaves_the_model_frozen_as_it_was(calibrated):
    model, statistics = calibrated
    names = set(weight_tensors(model))
    assert EMBEDDING in names and "model.layers.3.mlp.down_proj" in names and len(names) == 1 + 4 * 7
    assert set(statistics.fisher) == names
    assert all((statistics.fisher[n] >= 0).all() and statistics.fisher[n].sum() > 0 for n in names)
    assert statistics.importance[EMBEDDING].shape == (256,)  # tied: the head's input
    assert statistics.importance["model.layers.0.mlp.down_proj"].shape == (512,)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # as built


def test_a_measured_policy_writes_its_blocks_unchanged_and_llama_cpp_agrees(calibrated, tmp_path):
    import gguf

    original, statistics = calibrated
    table = damage_table(original, statistics, progress=False)
    assert set(table) == set(weight_tensors(original))
    # more bits, less damage, for every tensor
    for candidates in table.values():
        by_bits = sorted(candidates, key=lambda c: c.kind.bits_per_weight)
        assert by_bits[0].damage > by_bits[-1].damage
    f16 = policy_bytes(original, dict.fromkeys(table, "F16"))
    budget = f16 * 5 // 16
    choice = search_types(table, budget)
    assert policy_bytes(original, choice) <= budget
    assert len(set(choice.values())) > 1  # a mixed policy
    model = tied_gguf_llama()
    apply_types(model, choice, statistics)
    assert isinstance(model.model.embed_tokens, GGMLEmbedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert isinstance(model.model.layers[0].mlp.down_proj, GGMLLinear)

    path = write_gguf(model, tmp_path / "model.gguf", tokenizer=ToyTokenizer())
    dense = write_gguf(original, tmp_path / "dense.gguf", tokenizer=ToyTokenizer())
    # the file is the fixed part (header, vocabulary, norms) plus the policy's bytes, to the byte
    assert path.stat().st_size - policy_bytes(model, choice) == dense.stat().st_size - f16
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    # every tensor of the policy is in the file under the name gguf_tensor_names gives, at its type
    assert {key: tensors[name].tensor_type.name for key, name in gguf_tensor_names(model).items()} == choice
    down = model.model.layers[2].mlp.down_proj
    stored = tensors["blk.2.ffn_down.weight"]
    assert stored.tensor_type.name == choice["model.layers.2.mlp.down_proj"]
    assert np.array_equal(np.asarray(stored.data).reshape(down.weight.shape), down.weight.numpy())
    embed = tensors["token_embd.weight"]
    assert embed.tensor_type.name == choice[EMBEDDING]
    assert np.array_equal(
        np.asarray(embed.data).reshape(model.model.embed_tokens.weight.shape),
        model.model.embed_tokens.weight.numpy(),
    )
    # PyTorch computes with the weights the file holds
    assert torch.equal(down.dense_weight(), torch.from_numpy(ggml_to_float(down.weight.numpy(), down.kind, 512)))

    theirs, ours = llama_cpp_and_pytorch_logits(model, path, seed=3)
    agreement = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    assert agreement >= 0.99, agreement


def test_calibration_without_fisher_measures_the_same_importance(calibrated):
    model, statistics = calibrated
    tokens = torch.randint(1, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))  # as `calibrated`
    light = calibrate(model, tokens, progress=False, fisher=False)
    assert light.fisher == {}
    for name, values in statistics.importance.items():
        assert np.array_equal(light.importance[name], values)


def test_an_untied_head_is_a_tensor_of_its_own():
    model = gguf_llama().eval()
    statistics = calibrate(model, torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4)), False)
    assert "lm_head" in statistics.fisher and statistics.importance[EMBEDDING] is None
    assert statistics.importance["lm_head"].shape == (256,)
    assert gguf_tensor_names(model)["lm_head"] == "output.weight"


def test_the_structural_rule_favours_the_roles_llama_cpp_favours(calibrated):
    model, _ = calibrated
    table = structural_table(model)
    budget = policy_bytes(model, dict.fromkeys(table, "F16")) * 5 // 16
    choice = search_types(table, budget)
    bits = {name: ggml.block_type(t).bits_per_weight for name, t in choice.items()}
    assert bits["model.layers.1.self_attn.v_proj"] >= bits["model.layers.1.self_attn.q_proj"]
    assert bits["model.layers.0.mlp.up_proj"] >= bits["model.layers.1.mlp.up_proj"]


def test_from_pretrained_with_the_gguf_target_meets_its_bits_budget_and_exports(tiny_dir, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_llm import LUCConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = LUCConfig(
        target="gguf",
        avg_bits=6.0,
        dataset=["a line of calibration text " * 20] * 4,
        tokenizer=tokenizer,
        num_samples=2,
        seq_len=32,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config)
    policy = model.config.quantization_config.policy.to_dict()
    assert policy["format"] == "edge-llm/gguf-policy" and policy["sensitivity"] == "fisher"
    tensors = weight_tensors(model)
    weights = sum(
        m.out_features * m.in_features if isinstance(m, GGMLLinear) else m.weight.shape[0] * 64
        for m in tensors.values()
    )
    assert weights == weight_count(model)
    assert policy_bytes(model, policy["tensors"]) <= 6.0 * weights / 8
    assert all(isinstance(m, (GGMLLinear, GGMLEmbedding)) for m in tensors.values())
    path = write_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_down.weight"] == policy["tensors"]["model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "checkpoint")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"avg_sparsity": 0.25}, "cannot prune"),
        ({"gguf_types": ["Q4_0", "Q7_0"]}, r"gguf_types: Unknown llama\.cpp weight type 'Q7_0'"),
        ({"sensitivity": "hessian"}, "sensitivity must be one of"),
        ({"avg_bits": None}, "needs a budget"),
        ({"avg_bits": 40.0}, "between 1 and 16"),
        (
            {
                "policy": {
                    "format": "edge-llm/gguf-policy",
                    "version": 1,
                    "sensitivity": "given",
                    "tensors": {"x": "Q9"},
                }
            },
            "Invalid LUC policy for llama.cpp at tensors/x",
        ),
    ],
)
def test_gguf_target_settings_are_checked_at_the_boundary(fields, message):
    from edge_llm import LUCConfig

    with pytest.raises(ValueError, match=message):
        LUCConfig(target="gguf", **fields)


def test_a_budget_below_the_smallest_types_says_the_smallest(calibrated):
    model, _ = calibrated
    table = structural_table(model, ("Q4_0", "Q8_0"))
    smallest = policy_bytes(model, dict.fromkeys(table, "Q4_0"))
    assert search_types(table, smallest) == dict.fromkeys(table, "Q4_0")
    with pytest.raises(ValueError, match=f"smallest the candidate types allow: {smallest:,} bytes"):
        search_types(table, smallest - 1)


def test_a_file_budget_is_the_size_of_the_gguf_file_to_the_byte(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_llm import LUCConfig
    from edge_llm.export.gguf import gguf_fixed_bytes

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir)
    fixed = gguf_fixed_bytes(dense, tokenizer)
    f16 = policy_bytes(dense, dict.fromkeys(weight_tensors(dense), "F16"))
    data = dict(dataset=["calibration text, " * 40] * 4, tokenizer=tokenizer, num_samples=2, seq_len=32)
    budget = fixed + f16 * 6 // 16
    config = LUCConfig(target="gguf", avg_bits=None, weight_budget_bytes=budget, **data)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config)
    path = write_gguf(model, tmp_path / "model.gguf", tokenizer)
    assert path.stat().st_size == fixed + policy_bytes(model, model.config.quantization_config.policy.tensors)
    assert 0.97 * budget <= path.stat().st_size <= budget
    config = LUCConfig(target="gguf", avg_bits=2.0, gguf_types=["Q4_0", "Q8_0"], **data)
    with pytest.raises(ValueError, match=r"the smallest .* 4\.50 bits per weight; raise avg_bits to at least 4\.50"):
        AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config)
    with pytest.raises(ValueError, match="does not even hold the GGUF file's fixed part"):
        config = LUCConfig(target="gguf", avg_bits=None, weight_budget_bytes=fixed, **data)
        AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config)


def test_without_llama_cpp_python_the_error_says_what_to_install(monkeypatch):
    ggml._library.cache_clear()
    monkeypatch.setattr(ggml.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(ModuleNotFoundError, match=r"edge-llm\[gguf\]"):
            ggml.quantize(np.zeros((1, 32), dtype=np.float32), ggml.block_type("Q4_0"))
    finally:
        monkeypatch.undo()
        ggml._library.cache_clear()
    assert ggml.quantize(np.zeros((1, 32), dtype=np.float32), ggml.block_type("Q4_0")).shape == (1, 18)


def test_a_measured_profile_is_kept_and_a_second_budget_measures_nothing(tmp_path, monkeypatch, caplog):
    import logging

    from edge_llm.luc import gguf_sensitivity

    tokens = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    first = gguf_sensitivity.measured_table(tied_gguf_llama(), tokens, ("Q4_0", "Q8_0", "Q4_K"), False, tmp_path)

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(gguf_sensitivity, "calibrate", no_measuring)
    again = gguf_sensitivity.measured_table(tied_gguf_llama(), tokens, ("Q4_0", "Q8_0", "Q4_K"), False, tmp_path)
    (table, statistics), (cached, kept) = first, again
    entries = {n: [(c.kind.name, c.nbytes, c.damage) for c in cs] for n, cs in table.items()}
    assert entries == {n: [(c.kind.name, c.nbytes, c.damage) for c in cs] for n, cs in cached.items()}
    assert all(np.array_equal(statistics.importance[n], kept.importance[n]) for n in table)
    # another model, other tokens or other types are another entry
    with pytest.raises(AssertionError, match="measured again"):
        gguf_sensitivity.measured_table(tied_gguf_llama(), tokens[:1], ("Q4_0", "Q8_0", "Q4_K"), False, tmp_path)
    with pytest.raises(AssertionError, match="measured again"):
        gguf_sensitivity.measured_table(tied_gguf_llama(), tokens, ("Q4_0", "Q8_0"), False, tmp_path)
    # a damaged entry is measured again, with a warning
    (entry,) = tmp_path.glob("gguf-profile-*.json")
    entry.write_text(entry.read_text().replace('"Q8_0"', '"Q5_0"', 1))
    with caplog.at_level(logging.WARNING), pytest.raises(AssertionError, match="measured again"):
        gguf_sensitivity.measured_table(tied_gguf_llama(), tokens, ("Q4_0", "Q8_0", "Q4_K"), False, tmp_path)
    assert "Ignoring the cached profile for llama.cpp" in caplog.text
