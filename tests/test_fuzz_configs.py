"""Property-style bad values for every public config field: each is accepted as a valid value or
refused with one ValueError/TypeError that names the field — never a NaN let through, never an
error from deep inside (AttributeError, ZeroDivisionError, KeyError, ...)."""

import math

import pytest

from edge_llm import EdgeLLMConfig, LUCConfig
from edge_llm.luc import CompressionMethod
from edge_llm.scheduling import DeviceProfile, Kernel, Workload

HOSTILE = [
    float("nan"),
    float("inf"),
    -float("inf"),
    -1,
    0,
    0.5,
    10**15,
    True,
    "x",
    "",
    None,
    [],
    [float("nan")],
    {"a": 1},
    object(),
]


def _kernels():
    return {"dense_fp32": Kernel(1e11)}


BUILDERS = {
    "EdgeLLMConfig": (
        lambda **kw: EdgeLLMConfig(target_modules=["q_proj"], **kw),
        [
            "r",
            "lora_alpha",
            "lora_dropout",
            "exit_layers",
            "select_exits",
            "backprop_depth",
            "exit_sampling",
            "window_input",
            "voting",
            "exit_weights",
            "exit_head",
            "exit_head_rank",
            "loss_chunk_size",
            "base_compression",
        ],
    ),
    "LUCConfig": (
        lambda **kw: LUCConfig(**({"dataset": [[1, 2, 3]]} | kw)),
        [
            "avg_bits",
            "avg_sparsity",
            "weight_budget_bytes",
            "group_size",
            "bits",
            "sparsities",
            "quant_algorithm",
            "prune_method",
            "prune_structure",
            "metric",
            "num_samples",
            "seq_len",
            "targets",
        ],
    ),
    "CompressionMethod": (
        lambda **kw: CompressionMethod(**kw),
        ["group_size", "quant_method", "prune_method", "prune_structure"],
    ),
    "Workload": (lambda **kw: Workload(**kw), ["mode", "batch_size", "prompt_tokens", "decode_tokens", "seq_len"]),
    "Kernel": (
        lambda **kw: Kernel(**({"flops": 1e11} | kw)),
        ["flops", "dequant_per_s", "unmask_per_s", "call_overhead_s"],
    ),
    "DeviceProfile": (
        lambda **kw: DeviceProfile(
            **(
                dict(
                    name="d",
                    memory_bytes=2**30,
                    memory_bandwidth=1e10,
                    storage_bandwidth=1e9,
                    elementwise_bandwidth=1e10,
                    kernels=_kernels(),
                )
                | kw
            )
        ),
        [
            "memory_bytes",
            "memory_bandwidth",
            "storage_bandwidth",
            "elementwise_bandwidth",
            "kernels",
            "layer_overhead_s",
        ],
    ),
}
CASES = [(owner, field) for owner, (_, fields) in BUILDERS.items() for field in fields]


def _numbers(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item)


@pytest.mark.parametrize(("owner", "field"), CASES, ids=[f"{o}.{f}" for o, f in CASES])
def test_every_field_accepts_or_refuses_each_hostile_value_by_name(owner, field):
    build, _ = BUILDERS[owner]
    for value in HOSTILE:
        try:
            built = build(**{field: value})
        except (ValueError, TypeError) as error:
            assert field in str(error), f"{owner}.{field}={value!r}: the error does not name the field: {error}"
            continue
        # Accepted: then it must be a value the field can hold, never a non-finite number.
        stored = getattr(built, field, value)
        assert all(math.isfinite(x) for x in _numbers(stored)), f"{owner}.{field} accepted {value!r}"
