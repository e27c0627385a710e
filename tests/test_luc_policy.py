"""Policy search (exact multiple-choice knapsack), budgets, and the policy file format."""

import itertools
import json

import numpy as np
import pytest

from edge_llm.luc import Budget, CompressionMethod, LUCPolicy, search_policy
from edge_llm.luc.policy import linear_storage_bytes

CANDIDATES = [(2, 0.0), (2, 0.5), (4, 0.0), (4, 0.5), (8, 0.0), (8, 0.5)]


def random_problem(seed, layers=4):
    rng = np.random.default_rng(seed)
    damage = rng.random((layers, len(CANDIDATES))) * np.array([8, 10, 2, 4, 0.1, 2])
    params = rng.integers(100, 1000, layers).tolist()
    sizes = np.array([[linear_storage_bytes(p, 64, b, s, 32) for b, s in CANDIDATES] for p in params])
    return damage, params, sizes


def brute_force(damage, params, sizes, budget):
    best, best_choice = np.inf, None
    bits = np.array([b for b, _ in CANDIDATES])
    sparsity = np.array([s for _, s in CANDIDATES])
    total = sum(params)
    weights, layers = np.array(params), range(len(params))
    for choice in itertools.product(range(len(CANDIDATES)), repeat=len(params)):
        picked = np.array(choice)
        if budget.avg_bits is not None and (weights * bits[picked]).sum() > budget.avg_bits * total:
            continue
        if budget.avg_sparsity is not None and (weights * sparsity[picked]).sum() < budget.avg_sparsity * total:
            continue
        if budget.weight_budget_bytes is not None and sizes[layers, picked].sum() > budget.weight_budget_bytes:
            continue
        cost = damage[range(len(params)), picked].sum()
        if cost < best:
            best, best_choice = cost, list(choice)
    return best, best_choice


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "budget",
    [Budget(avg_bits=4.0), Budget(avg_bits=3.0, avg_sparsity=0.25), Budget(weight_budget_bytes=None)],
    ids=["bits", "bits+sparsity", "bytes"],
)
def test_search_matches_brute_force(seed, budget):
    damage, params, sizes = random_problem(seed)
    if budget.avg_bits is None:  # a byte budget between the smallest and largest policy
        budget = Budget(weight_budget_bytes=int(sizes.min(1).sum() * 0.5 + sizes.max(1).sum() * 0.5))
    expected_cost, _ = brute_force(damage, params, sizes, budget)
    choice = search_policy(damage, CANDIDATES, params, sizes, budget)
    assert damage[range(len(params)), choice].sum() == pytest.approx(expected_cost, abs=1e-9)
    # The budget holds exactly.
    bits = np.array([CANDIDATES[c][0] for c in choice])
    sparsity = np.array([CANDIDATES[c][1] for c in choice])
    if budget.avg_bits is not None:
        assert (np.array(params) * bits).sum() <= budget.avg_bits * sum(params)
    if budget.avg_sparsity is not None:
        assert (np.array(params) * sparsity).sum() >= budget.avg_sparsity * sum(params)
    if budget.weight_budget_bytes is not None:
        assert sizes[range(len(params)), choice].sum() <= budget.weight_budget_bytes


def test_infeasible_budgets_say_what_would_fit():
    damage, params, sizes = random_problem(0)
    with pytest.raises(ValueError, match=r"avg_bits=1\.5 is below the smallest candidate, 2 bits"):
        search_policy(damage, CANDIDATES, params, sizes, Budget(avg_bits=1.5))
    with pytest.raises(ValueError, match=r"avg_sparsity=0\.8 is above the largest candidate, 0\.5"):
        search_policy(damage, CANDIDATES, params, sizes, Budget(avg_sparsity=0.8))
    smallest = int(sizes.min(1).sum())
    with pytest.raises(ValueError, match=f"the smallest policy meeting the other budgets takes {smallest:,} bytes"):
        search_policy(damage, CANDIDATES, params, sizes, Budget(weight_budget_bytes=smallest - 1))
    # With a sparsity floor the smallest feasible size is larger.
    with pytest.raises(ValueError, match="too small"):
        search_policy(damage, CANDIDATES, params, sizes, Budget(avg_sparsity=0.0, weight_budget_bytes=smallest - 1))
    assert search_policy(damage, CANDIDATES, params, sizes, Budget(weight_budget_bytes=smallest))


def test_storage_bytes_count_codes_scales_and_mask():
    # 64 x 128 at 4 bits, groups of 32: 4096 bytes of codes, 64 * 4 * (2 + 2) of scales/zeros.
    assert linear_storage_bytes(64, 128, 4, 0.0, 32) == 4096 + 1024
    # Half pruned: half the codes, plus one mask bit per weight.
    assert linear_storage_bytes(64, 128, 4, 0.5, 32) == 2048 + 1024 + 1024
    assert linear_storage_bytes(64, 128, 16, 0.0, 32) == 64 * 128 * 2


def test_policy_json_round_trip_and_schema_errors(tmp_path):
    policy = LUCPolicy([(4, 0.5), (3, 0.25), (16, 0.0)], CompressionMethod(64, "gptq", "wanda", "unstructured"))
    path = tmp_path / "policy.json"
    policy.save(path)
    assert LUCPolicy.load(path) == policy
    data = json.loads(path.read_text())
    bad = [
        ({**data, "version": 2}, "version"),
        ({**data, "layers": [{"bits": 1, "sparsity": 0.0}]}, r"layers/0/bits"),
        ({**data, "layers": [{"bits": 4, "sparsity": 1.0}]}, r"layers/0/sparsity"),
        ({**data, "method": {**data["method"], "quant_method": "awq"}}, "method/quant_method"),
        ({k: v for k, v in data.items() if k != "layers"}, "'layers' is a required property"),
        ({**data, "extra": 1}, "Additional properties"),
    ]
    for document, message in bad:
        with pytest.raises(ValueError, match=f"Invalid LUC policy.*{message}"):
            LUCPolicy.from_dict(document)
    nm = {**data, "method": {**data["method"], "prune_structure": "nm"}, "layers": [{"bits": 4, "sparsity": 0.3}]}
    with pytest.raises(ValueError, match="at layers/0: N:4 pruning keeps a whole number"):
        LUCPolicy.from_dict(nm)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON LUC policy"):
        LUCPolicy.load(path)


def test_a_policy_names_its_grid_only_when_symmetric():
    # A default (asymmetric) policy's JSON is what it was before grids existed: the SHA-256 that
    # earlier checkpoints carry still matches.
    assert "grid" not in LUCPolicy([(4, 0.0)]).to_dict()["method"]
    symmetric = LUCPolicy([(4, 0.0)], CompressionMethod(32, grid="symmetric"))
    assert symmetric.to_dict()["method"]["grid"] == "symmetric"
    assert LUCPolicy.from_dict(symmetric.to_dict()) == symmetric
    with pytest.raises(ValueError, match="method/grid"):
        LUCPolicy.from_dict({**symmetric.to_dict(), "method": {**symmetric.to_dict()["method"], "grid": "skewed"}})
    with pytest.raises(ValueError, match="grid must be one of"):
        CompressionMethod(grid="skewed")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bits", (4, 4), "lists a value twice"),
        ("sparsities", (0.0, 0.0, 0.5), "lists a value twice"),
        ("num_samples", True, "num_samples must be a positive integer"),
        ("targets", [], "non-empty list of module names"),
    ],
)
def test_config_values_that_make_no_sense_are_refused_by_name(field, value, message):
    from edge_llm import LUCConfig

    with pytest.raises(ValueError, match=f"LUCConfig.{field}.*{message}|{message}"):
        LUCConfig(avg_bits=4.0, dataset=["x"], **{field: value})


def test_a_policy_with_a_nan_sparsity_or_a_group_longer_than_any_row_is_refused_by_name():
    from edge_llm._io import load_schema
    from edge_llm.luc.method import MAX_GROUP_SIZE

    good = LUCPolicy([(4, 0.0)] * 2, CompressionMethod(32, "rtn", "magnitude")).to_dict()
    nan = json.loads(json.dumps(good))
    nan["layers"][1]["sparsity"] = float("nan")
    with pytest.raises(ValueError, match=r"layers \[1\] have a sparsity that is not a finite number"):
        LUCPolicy.from_dict(nan)
    huge = json.loads(json.dumps(good))
    huge["method"]["group_size"] = 2**40
    with pytest.raises(ValueError, match="group_size"):
        LUCPolicy.from_dict(huge)
    with pytest.raises(ValueError, match=f"group_size {2**40} is above {MAX_GROUP_SIZE}"):
        CompressionMethod(2**40, "rtn", "magnitude")
    schema = load_schema("luc-policy")
    assert schema["properties"]["method"]["properties"]["group_size"]["maximum"] == MAX_GROUP_SIZE


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layers": ["4,0.0", "3,0.25"]}, r"LUCPolicy\.layers must be a non-empty list of \(bits, sparsity\) pairs"),
        ({"layers": []}, r"LUCPolicy\.layers must be a non-empty list"),
        ({"layers": [(4, float("inf"))]}, r"layers \[0\] have a sparsity that is not a finite number"),
        ({"layers": [(4, 0.0)], "method": "rtn"}, "LUCPolicy.method must be a CompressionMethod"),
        ({"layers": [(4, 0.0)], "targets": "q_proj"}, "LUCPolicy.targets must be None or a list of module names"),
    ],
)
def test_a_policy_built_in_code_is_checked_like_one_read_from_a_file(fields, message):
    with pytest.raises(ValueError, match=message):
        LUCPolicy(**fields)
