"""LUC for llama.cpp with speed: the measured profile, the exact search under bytes and time, and
the settings that carry it."""

import itertools
import json

import numpy as np
import pytest
from export_models import ToyTokenizer
from test_gguf_policy import tied_gguf_llama

from edge_llm.luc import ggml
from edge_llm.luc.gguf_policy import fastest_seconds, search_types
from edge_llm.luc.gguf_sensitivity import Candidate, structural_table, weight_count, weight_tensors
from edge_llm.luc.gguf_speed import (
    PHASES,
    REFERENCE,
    GGUFSpeedProfile,
    measure_gguf_speed,
    shape_fingerprint,
    tensor_group,
)

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def measured():
    model = tied_gguf_llama()
    profile = measure_gguf_speed(
        model,
        ToyTokenizer(),
        types=("Q4_0", "Q4_K", "Q8_0"),
        prompt_tokens=16,
        decode_tokens=4,
        rounds=1,
        progress=False,
    )
    return model, profile


def test_the_profile_times_every_type_in_every_group_it_fits_against_q8_0(measured, tmp_path):
    model, profile = measured
    assert profile.model == shape_fingerprint(model)
    for phase in PHASES:
        assert profile.reference_seconds[phase] > 0
        # Rows of 256 and 512: both types tile the layers' matrices and the tied embedding (the head).
        assert set(profile.per_weight[phase]["linear"]) == {"Q4_K", "Q8_0"}  # Q4_0 is the reference
        assert set(profile.per_weight[phase]["output"]) == {"Q4_K", "Q8_0"}
        assert all(np.isfinite(v) for g in profile.per_weight[phase].values() for v in g.values())
    # Every tensor in Q4_0 is the reference itself; time adds per weight and type.
    tensors = weight_tensors(model)
    assert profile.predict(model, dict.fromkeys(tensors, REFERENCE)) == profile.reference_seconds
    one = dict.fromkeys(tensors, REFERENCE) | {"model.layers.0.mlp.down_proj": "Q8_0"}
    added = profile.predict(model, one)["decode"] - profile.reference_seconds["decode"]
    assert added == pytest.approx(256 * 512 * profile.per_weight["decode"]["linear"]["Q8_0"])
    profile.save(tmp_path / "speed.json")
    assert GGUFSpeedProfile.load(tmp_path / "speed.json") == profile


def test_a_profile_of_another_model_is_refused(measured):
    _, profile = measured
    other = tied_gguf_llama()
    other.model.layers = other.model.layers[:2]
    with pytest.raises(ValueError, match=r"measured for another model .* Measure it for this model"):
        profile.time_table(structural_table(other, ("Q4_0",)), other)


def test_a_type_the_profile_did_not_time_is_refused_not_guessed(measured):
    model, profile = measured
    table = structural_table(model, ("Q5_0", "Q8_0"))
    with pytest.raises(ValueError, match=r"no time for Q5_0 .* leave Q5_0 out of LUCConfig\.gguf_types"):
        profile.time_table(table, model)


def test_the_embedding_is_the_output_when_tied_and_free_when_looked_up_only():
    tied = tied_gguf_llama()
    assert tensor_group(tied, "embedding") == "output"
    assert tensor_group(tied, "model.layers.1.self_attn.v_proj") == "linear"
    from export_models import gguf_llama

    untied = gguf_llama()
    assert tensor_group(untied, "embedding") is None and tensor_group(untied, "lm_head") == "output"


def _random_table(seed: int) -> dict[str, list[Candidate]]:
    rng = np.random.default_rng(seed)
    kinds = [ggml.block_type(n) for n in ("Q4_0", "Q4_1", "Q8_0")]
    return {
        f"t{i}": [
            Candidate(k, int(rng.integers(50, 200)) * 32, float(rng.random()), float(rng.normal())) for k in kinds
        ]
        for i in range(6)
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_search_under_bytes_and_time_is_the_exact_optimum(seed):
    table = _random_table(seed)
    combos = list(itertools.product(*table.values()))
    budget = int(np.median([sum(c.nbytes for c in combo) for combo in combos]))
    fits = [combo for combo in combos if sum(c.nbytes for c in combo) <= budget]
    fastest = min(sum(c.seconds for c in combo) for combo in fits)
    assert fastest_seconds(table, budget) == pytest.approx(fastest, abs=1e-9)
    for limit in (fastest + 1e-9, fastest + 0.5, fastest + 2.0, None):
        choice = search_types(table, budget, limit)
        picked = [next(c for c in table[n] if c.kind.name == choice[n]) for n in table]
        allowed = [combo for combo in fits if limit is None or sum(c.seconds for c in combo) <= limit]
        assert sum(c.nbytes for c in picked) <= budget
        assert limit is None or sum(c.seconds for c in picked) <= limit + 1e-9
        assert sum(c.damage for c in picked) == pytest.approx(min(sum(c.damage for c in x) for x in allowed))


def _profile_for(model, slow: str) -> GGUFSpeedProfile:
    """A profile by hand: `slow` costs 10 ns a weight more than Q4_0 in every group, Q8_0 1 ns more."""
    per_type = {slow: 1e-8, "Q8_0": 1e-9}
    return GGUFSpeedProfile(
        machine="test",
        llama_cpp="0",
        threads=1,
        prompt_tokens=16,
        decode_tokens=4,
        model=shape_fingerprint(model),
        reference_seconds={"prefill": 0.5, "decode": 0.25},
        per_weight={p: {"linear": dict(per_type), "output": dict(per_type)} for p in PHASES},
    )


def test_the_slowdown_bounds_the_predicted_request_time():
    model = tied_gguf_llama()
    types = ("Q4_0", "Q4_1", "Q8_0")
    profile = _profile_for(model, slow="Q4_1")
    table = structural_table(model, types)
    profile.time_table(table, model)
    budget = sum(c.nbytes for c in (next(c for c in cs if c.kind.name == "Q4_1") for cs in table.values()))
    unconstrained = search_types(table, budget)
    assert "Q4_1" in unconstrained.values()  # the rule's damage favours Q4_1's extra bits
    reference = sum(profile.reference_seconds.values())
    fastest = reference + fastest_seconds(table, budget)
    for slowdown in (0.0, 0.2):
        choice = search_types(table, budget, profile.speed_limit(table, budget, slowdown))
        request = sum(profile.predict(model, choice).values())
        assert request <= (1 + slowdown) * fastest * (1 + 1e-6)
    assert set(search_types(table, budget, profile.speed_limit(table, budget, 0.0)).values()) == {"Q4_0"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"gguf_max_slowdown": -0.1}, "gguf_max_slowdown must be a finite number >= 0"),
        ({"gguf_max_slowdown": float("nan")}, "gguf_max_slowdown must be a finite number >= 0"),
        ({"gguf_max_slowdown": "fast"}, "gguf_max_slowdown must be a finite number >= 0"),
        ({"gguf_speed": 3}, "gguf_speed must be None, 'measure', a llama.cpp speed profile file or its dict"),
        ({"gguf_speed": {"format": "edge-llm/gguf-speed"}}, "Invalid llama.cpp speed profile"),
    ],
)
def test_speed_settings_are_checked_at_the_boundary(fields, message):
    from edge_llm import LUCConfig

    with pytest.raises(ValueError, match=message):
        LUCConfig(target="gguf", avg_bits=6.0, **fields)


def test_a_speed_profile_file_is_read_and_checked_when_the_config_is_made(tmp_path):
    from edge_llm import LUCConfig

    model = tied_gguf_llama()
    _profile_for(model, "Q4_1").save(tmp_path / "speed.json")
    config = LUCConfig(target="gguf", avg_bits=6.0, gguf_speed=tmp_path / "speed.json")
    assert GGUFSpeedProfile.from_dict(config.gguf_speed) == _profile_for(model, "Q4_1")
    (tmp_path / "bad.json").write_text(json.dumps({"reference_seconds": float("nan")}))
    with pytest.raises(ValueError, match=r"bad\.json"):
        LUCConfig(target="gguf", avg_bits=6.0, gguf_speed=tmp_path / "bad.json")


def test_from_pretrained_measures_the_speed_once_and_keeps_it(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_llm import LUCConfig
    from edge_llm.luc import integration

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    measured = []
    real = integration.measure_gguf_speed

    def measure(model, tokenizer, progress=True):
        measured.append(1)
        return real(
            model, tokenizer, types=("Q5_0", "Q8_0"), prompt_tokens=8, decode_tokens=2, rounds=1, progress=False
        )

    monkeypatch.setattr(integration, "measure_gguf_speed", measure)

    def compress():
        config = LUCConfig(
            target="gguf",
            avg_bits=6.0,
            gguf_types=["Q4_0", "Q5_0", "Q8_0"],
            gguf_speed="measure",
            gguf_max_slowdown=0.0,
            dataset=["a line of calibration text " * 20] * 2,
            tokenizer=tokenizer,
            num_samples=2,
            seq_len=16,
            profile_cache_dir=str(tmp_path),
        )
        return AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config)

    first = compress()
    assert len(measured) == 1 and len(list(tmp_path.glob("gguf-speed-*.json"))) == 1
    second = compress()
    assert len(measured) == 1  # the cached profile
    profile = GGUFSpeedProfile.load(next(tmp_path.glob("gguf-speed-*.json")))
    policy = first.config.quantization_config.policy.tensors
    assert policy == second.config.quantization_config.policy.tensors
    # gguf_max_slowdown=0: a request as fast as with the fastest types the 6-bit budget holds.
    table = structural_table(first, ("Q4_0", "Q5_0", "Q8_0"))
    profile.time_table(table, first)
    fastest = sum(profile.reference_seconds.values()) + fastest_seconds(table, int(6.0 * weight_count(first) // 8))
    assert sum(profile.predict(first, policy).values()) <= fastest * (1 + 1e-6)
