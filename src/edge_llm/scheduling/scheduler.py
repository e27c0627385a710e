"""The scheduler: per layer, which kernel and whether its weights stay resident or are streamed,
minimising the workload's time within the device's memory, solved exactly.

Each layer's options (from `cost.layer_options`) add their seconds and resident bytes. Streamed
layers also need a staging buffer of twice the largest streamed layer (double buffering: one layer
computes while the next is read). For every possible staging size `S` (0, or the stream size of
some option) the problem is a multiple-choice knapsack over layers, solved by dynamic programming
over memory kept as a Pareto frontier of (bytes, seconds) states: exact, with bytes as integers.
The best `S` wins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from edge_llm._io import check_schema, load_json, load_schema, save_json
from edge_llm.luc.policy import LUCPolicy
from edge_llm.scheduling.cost import LayerSpec, ModelSpec, Option, Workload, fixed_costs, layer_options
from edge_llm.scheduling.devices import DeviceProfile
from edge_llm.scheduling.kernels import with_kernel_names
from edge_llm.tuner.model import edge_config_of
from edge_llm.tuner.voting import VOTING_RULES

SCHEDULE_FORMAT = "edge-llm/schedule"
SCHEDULE_VERSION = 1


class InfeasibleScheduleError(ValueError):
    """Nothing fits in the device's memory."""


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    bits: int
    sparsity: float
    kernel: str
    placement: str
    memory_bytes: int
    stream_bytes: int
    seconds: float


@dataclass
class Schedule:
    """A device-specific plan for running (or tuning) a model, with its predicted cost."""

    device: DeviceProfile
    workload: Workload
    layers: list[LayerPlan]
    staging_bytes: int
    fixed_bytes: int
    fixed_seconds: float
    exits: list[int]
    voting: str
    window_input: str
    backprop_depth: int

    @property
    def memory_bytes(self) -> int:
        return self.fixed_bytes + self.staging_bytes + sum(p.memory_bytes for p in self.layers)

    @property
    def seconds(self) -> float:
        return self.fixed_seconds + sum(p.seconds for p in self.layers)

    def steps(self) -> list[dict[str, Any]]:
        """Execution order of one forward pass: prefetches of streamed groups, layer computations,
        exits, and the vote. A group of consecutive streamed layers is read ahead while the layer
        before it computes."""
        steps: list[dict[str, Any]] = []
        groups = self.stream_groups()
        starts = {group[0]: group for group in groups}
        for plan in self.layers:
            if plan.layer + 1 in starts:
                steps.append({"op": "prefetch", "layers": starts[plan.layer + 1]})
            if plan.layer == 0 and 0 in starts:
                steps.insert(0, {"op": "prefetch", "layers": starts[0]})
            steps.append({"op": "compute", "layer": plan.layer, "kernel": plan.kernel, "placement": plan.placement})
            if plan.layer in self.exits:
                steps.append({"op": "exit", "layer": plan.layer})
        steps.append({"op": "vote", "rule": self.voting})
        return steps

    def stream_groups(self) -> list[list[int]]:
        """Runs of consecutive streamed layers that fit the staging buffer together."""
        groups: list[list[int]] = []
        size = 0
        for plan in self.layers:
            if plan.placement != "streamed":
                continue
            contiguous = groups and groups[-1][-1] == plan.layer - 1
            if contiguous and size + plan.stream_bytes <= self.staging_bytes // 2:
                groups[-1].append(plan.layer)
                size += plan.stream_bytes
            else:
                groups.append([plan.layer])
                size = plan.stream_bytes
        return groups

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCHEDULE_FORMAT,
            "version": SCHEDULE_VERSION,
            "device": self.device.to_dict(),
            "workload": asdict(self.workload),
            "exits": self.exits,
            "voting": self.voting,
            "window_input": self.window_input,
            "backprop_depth": self.backprop_depth,
            "layers": [asdict(plan) for plan in self.layers],
            "staging_bytes": self.staging_bytes,
            "fixed_bytes": self.fixed_bytes,
            "fixed_seconds": self.fixed_seconds,
            "steps": self.steps(),
            "predicted": {
                "memory_bytes": self.memory_bytes,
                "seconds": self.seconds,
                "capacity_bytes": self.device.memory_bytes,
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        """Rebuild a schedule from JSON, after checking it against the schema and its own totals."""
        schema = with_kernel_names(load_schema("schedule"))
        schema["$defs"]["voting"]["enum"] = list(VOTING_RULES)
        if isinstance(data, dict) and data.get("format") == SCHEDULE_FORMAT and data.get("version") != SCHEDULE_VERSION:
            raise ValueError(
                f"Schedule format version {data.get('version')!r} is not supported (this edge-llm reads version "
                f"{SCHEDULE_VERSION}); re-export it with this version of edge-llm."
            )
        check_schema(data, schema, "schedule")
        schedule = cls(
            device=DeviceProfile.from_dict(data["device"]),
            workload=Workload(**data["workload"]),
            layers=[LayerPlan(**plan) for plan in data["layers"]],
            staging_bytes=data["staging_bytes"],
            fixed_bytes=data["fixed_bytes"],
            fixed_seconds=data["fixed_seconds"],
            exits=data["exits"],
            voting=data["voting"],
            window_input=data["window_input"],
            backprop_depth=data["backprop_depth"],
        )
        if [p.layer for p in schedule.layers] != list(range(len(schedule.layers))):
            raise ValueError("Invalid schedule: layers must be listed once each, in order from 0.")
        if schedule.memory_bytes > schedule.device.memory_bytes:
            raise ValueError(
                f"Invalid schedule: it needs {schedule.memory_bytes:,} bytes but its device has "
                f"{schedule.device.memory_bytes:,}."
            )
        return schedule

    def save(self, path: str | Path) -> None:
        save_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        return cls.from_dict(load_json(path, "schedule"))

    def summary(self) -> str:
        gib = 1024**3
        lines = [
            f"device: {self.device.name} ({self.device.memory_bytes / gib:.2f} GiB), workload: {self.workload.mode}",
            f"predicted: {self.seconds * 1000:.1f} ms, memory {self.memory_bytes / gib:.3f} GiB "
            f"(staging {self.staging_bytes / gib:.3f} GiB)",
        ]
        lines += [
            f"layer {p.layer:>3}: {p.bits:>2} bits, sparsity {p.sparsity:.2f} -> {p.kernel:<18} {p.placement:<9} "
            f"{p.memory_bytes / 2**20:8.2f} MiB {p.seconds * 1000:9.3f} ms"
            for p in self.layers
        ]
        return "\n".join(lines)


def pareto_knapsack(options: list[list[tuple[int, float]]], capacity: int) -> tuple[list[int], int, float] | None:
    """Pick one (bytes, seconds) option per layer: least total seconds with total bytes <= capacity.

    Exact: the DP keeps, after each layer, every state not dominated by another (fewer or equal
    bytes and seconds). Returns (choice per layer, bytes, seconds), or None when nothing fits.
    """
    frontier: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for layer_options_ in options:
        candidates = [
            (used + size, spent + seconds, (*choice, index))
            for used, spent, choice in frontier
            for index, (size, seconds) in enumerate(layer_options_)
            if used + size <= capacity
        ]
        candidates.sort(key=lambda state: (state[0], state[1]))
        frontier = []
        for state in candidates:
            if not frontier or state[1] < frontier[-1][1]:
                frontier.append(state)
        if not frontier:
            return None
    used, spent, choice = min(frontier, key=lambda state: (state[1], state[0]))
    return list(choice), used, spent


def schedule(
    model: nn.Module | ModelSpec,
    device: DeviceProfile,
    workload: Workload | None = None,
    policy: LUCPolicy | None = None,
    edge_config: Any = None,
    voting: str | None = None,
) -> Schedule:
    """The fastest plan for `model` (with its LUC `policy` and `EdgeLLMConfig`) that fits `device`.

    `policy` and `edge_config` default to the model's own (`policy_of`, `edge_config_of`): pass a
    `PeftModel` with its Edge-LLM adapter as it is. The schedule's voting rule is the adapter's
    (one rule per bundle); `voting`, if given, must agree with it.

    Raises:
        InfeasibleScheduleError: when no combination of kernels and streaming fits, saying by how
            many bytes the smallest possible plan exceeds the device's memory.
    """
    workload = workload or Workload()
    if isinstance(model, nn.Module) and edge_config is None:
        edge_config = edge_config_of(model)
    adapter_voting = getattr(edge_config, "voting", None)
    if voting is not None and adapter_voting is not None and voting != adapter_voting:
        raise ValueError(
            f"schedule(voting={voting!r}) disagrees with the adapter's voting={adapter_voting!r}; a bundle has one "
            "voting rule, the adapter's: change EdgeLLMConfig.voting instead."
        )
    spec = model if isinstance(model, ModelSpec) else ModelSpec.from_model(model, policy, edge_config)
    per_layer = [layer_options(layer, spec, device, workload) for layer in spec.layers]
    fixed_seconds, fixed_bytes = fixed_costs(spec, device, workload)
    best = _solve(per_layer, device.memory_bytes - fixed_bytes)
    if best is None:
        raise InfeasibleScheduleError(_infeasible_message(per_layer, spec, device, fixed_bytes))
    choice, staging = best
    plans = [_plan(layer, per_layer[i][c]) for i, (layer, c) in enumerate(zip(spec.layers, choice, strict=True))]
    return Schedule(
        device=device,
        workload=workload,
        layers=plans,
        staging_bytes=staging,
        fixed_bytes=fixed_bytes,
        fixed_seconds=fixed_seconds,
        exits=list(spec.exits) or [len(spec.layers) - 1],
        voting=adapter_voting or voting or "last",
        window_input=spec.window_input,
        backprop_depth=spec.backprop_depth,
    )


def _solve(per_layer: list[list[Option]], capacity: int) -> tuple[list[int], int] | None:
    """Best choice per layer and the staging buffer it needs, over every possible staging size."""
    stream_sizes = sorted({o.stream_bytes for options in per_layer for o in options if o.placement == "streamed"})
    best = None
    for largest in [0, *stream_sizes]:
        staging = 2 * largest
        allowed = [
            [(i, o) for i, o in enumerate(options) if o.placement == "resident" or o.stream_bytes <= largest]
            for options in per_layer
        ]
        if largest and not any(o.placement == "streamed" for options in allowed for _, o in options):
            continue
        result = pareto_knapsack(
            [[(o.memory_bytes, o.seconds) for _, o in options] for options in allowed], capacity - staging
        )
        if result is None:
            continue
        picks, _, seconds = result
        streamed = [
            allowed[i][p][1].stream_bytes for i, p in enumerate(picks) if allowed[i][p][1].placement == "streamed"
        ]
        # Only count the staging buffer the chosen streamed layers really need.
        needed = 2 * max(streamed, default=0)
        if best is None or seconds < best[0] - 1e-15:
            best = (seconds, [allowed[i][p][0] for i, p in enumerate(picks)], needed)
    return None if best is None else (best[1], best[2])


def _plan(layer: LayerSpec, option: Option) -> LayerPlan:
    return LayerPlan(
        layer=layer.index,
        bits=layer.bits,
        sparsity=layer.sparsity,
        kernel=option.kernel,
        placement=option.placement,
        memory_bytes=option.memory_bytes,
        stream_bytes=option.stream_bytes,
        seconds=option.seconds,
    )


def _infeasible_message(per_layer: list[list[Option]], spec: ModelSpec, device: DeviceProfile, fixed: int) -> str:
    smallest = []
    stream_sizes = sorted({o.stream_bytes for options in per_layer for o in options if o.placement == "streamed"})
    for largest in [0, *stream_sizes]:
        total = 2 * largest
        for options in per_layer:
            total += min(o.memory_bytes for o in options if o.placement == "resident" or o.stream_bytes <= largest)
        smallest.append(total)
    need = fixed + min(smallest)
    gib = 1024**3
    return (
        f"No schedule fits {device.name} ({device.memory_bytes / gib:.3f} GiB): the smallest plan needs "
        f"{need / gib:.3f} GiB ({need - device.memory_bytes:,} bytes more than the device has), of which "
        f"{fixed / gib:.3f} GiB are embeddings, LM head, KV cache/activations and buffers. Compress harder "
        "(a smaller LUC budget), shorten the context or batch, or pick a device with more memory."
    )
