"""Device profiles: what a target device offers to the scheduler's cost model.

A profile is a small JSON document (schema: `schemas/device-profile.schema.json`):

- `memory_bytes`: memory the model may use (weights, KV cache, activations, buffers).
- `memory_bandwidth`: bytes/s between that memory and the compute units.
- `storage_bandwidth`: bytes/s from where streamed (offloaded) weights are read (flash, SSD, host).
- `kernels`: the matmul kernels the device runs, each with its sustained FLOP/s and, for kernels
  that dequantize packed weights on the fly, how many weights per second they dequantize (and,
  for pruned layers, expand through the pruning mask).
  Kernel names are those of the registry in `scheduling/kernels.py`.
- `elementwise_bandwidth`: bytes/s that norms, activations and other elementwise work reach.
- `layer_overhead_s`: fixed seconds of every decoder-layer call whatever its size (dispatching
  and launching its few dozen operations); it dominates small-batch decoding on a GPU.

Built-in profiles take their figures from public spec sheets (cited in `source`), derated by the
efficiency stated there; `profile_this_machine()` measures the machine it runs on instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_llm._io import check_schema, load_json, load_schema, save_json
from edge_llm.scheduling.kernels import KERNELS, with_kernel_names

DEVICE_FORMAT = "edge-llm/device-profile"
DEVICE_VERSION = 1


@dataclass(frozen=True)
class Kernel:
    """A matmul kernel: sustained FLOP/s, and weights/s for on-the-fly dequantization (0: none).

    `unmask_per_s`: weights/s for expanding a pruned layer's kept weights through its mask, paid on
    top of dequantization on every call (0: free, or not modelled for this device).
    `call_overhead_s`: fixed seconds per Linear call beyond a dense matmul's (the extra operations
    a dequantizing kernel launches), whatever the layer's size.
    """

    flops: float
    dequant_per_s: float = 0.0
    unmask_per_s: float = 0.0
    call_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        _check_rate("Kernel.flops", self.flops, positive=True)
        for name in ("dequant_per_s", "unmask_per_s", "call_overhead_s"):
            _check_rate(f"Kernel.{name}", getattr(self, name), positive=False)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_bytes: int
    memory_bandwidth: float
    storage_bandwidth: float
    elementwise_bandwidth: float
    kernels: dict[str, Kernel] = field(default_factory=dict)
    source: str = ""
    layer_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        # Profiles built in Python get the checks the schema gives loaded ones: the cost model
        # divides by these rates, so a zero, negative or NaN rate would give nonsense silently.
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"DeviceProfile.name must be a non-empty string (it names the device), got {self.name!r}.")
        if not isinstance(self.memory_bytes, int) or isinstance(self.memory_bytes, bool) or self.memory_bytes < 1:
            raise ValueError(f"DeviceProfile.memory_bytes must be a positive integer, got {self.memory_bytes!r}.")
        for name in ("memory_bandwidth", "storage_bandwidth", "elementwise_bandwidth"):
            _check_rate(f"DeviceProfile.{name}", getattr(self, name), positive=True)
        _check_rate("DeviceProfile.layer_overhead_s", self.layer_overhead_s, positive=False)
        if not isinstance(self.kernels, dict) or not self.kernels:
            raise ValueError(f"DeviceProfile.kernels must be a non-empty dict of Kernel, got {self.kernels!r}.")
        # The registry as it is now: kernels registered after import are known too.
        unknown = sorted(set(self.kernels) - set(KERNELS))
        if unknown:
            raise ValueError(f"DeviceProfile.kernels has unknown kernels {unknown}; known: {', '.join(KERNELS)}.")
        for name, kernel in self.kernels.items():
            if not isinstance(kernel, Kernel):
                raise ValueError(f"DeviceProfile.kernels[{name!r}] must be a Kernel, got {type(kernel).__name__}.")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kernels"] = {name: asdict(kernel) for name, kernel in self.kernels.items()}
        return {"format": DEVICE_FORMAT, "version": DEVICE_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceProfile:
        """Build a profile from its JSON form, after checking it against the schema."""
        check_schema(data, with_kernel_names(load_schema("device-profile")), "device profile")
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        fields["kernels"] = {name: Kernel(**spec) for name, spec in data["kernels"].items()}
        return cls(**fields)

    def save(self, path: str | Path) -> None:
        save_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> DeviceProfile:
        return cls.from_dict(load_json(path, "device profile"))

    def with_memory(self, memory_bytes: int) -> DeviceProfile:
        """The same device with another memory budget (e.g. what is left for the model)."""
        return DeviceProfile(**{**asdict(self), "kernels": self.kernels, "memory_bytes": int(memory_bytes)})


def _check_rate(name: str, value: object, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a finite, {bound} number, got {value!r}.")


GB = 1e9
GIB = 1024**3


def _gpu_kernels(fp16_flops: float, int8_ops: float, sparse_fp16_flops: float, efficiency: float) -> dict[str, Kernel]:
    dense = fp16_flops * efficiency
    kernels = {
        "dense_fp32": Kernel(dense / 4),
        "dense_fp16": Kernel(dense),
        "dense_bf16": Kernel(dense),
        "sparse_2_4": Kernel(sparse_fp16_flops * efficiency),
        "dequant_int8": Kernel(int8_ops * efficiency / 2, dequant_per_s=dense / 8),
    }
    for bits in (2, 3, 4):
        # Packed low-bit weights are dequantized to fp16 in registers: fp16 tensor-core rate, plus
        # a few operations per weight.
        kernels[f"dequant_int{bits}"] = Kernel(dense * 0.8, dequant_per_s=dense / 8)
    return kernels


def _arm_cpu_kernels(fp32_flops: float, efficiency: float) -> dict[str, Kernel]:
    dense = fp32_flops * efficiency
    kernels = {
        "dense_fp32": Kernel(dense),
        "dense_fp16": Kernel(2 * dense),  # ARMv8.2 FP16 arithmetic: twice the fp32 lanes
        "sparse_unstructured": Kernel(dense / 8),
    }
    for bits in (2, 3, 4, 8):
        kernels[f"dequant_int{bits}"] = Kernel(2 * dense, dequant_per_s=dense / 4)
    return kernels


# Spec-sheet figures; "efficiency" derates peak FLOP/s and bandwidth to what sustained kernels reach.
BUILTIN_DEVICES: dict[str, DeviceProfile] = {
    "jetson-orin-nano-8gb": DeviceProfile(
        name="NVIDIA Jetson Orin Nano 8GB",
        memory_bytes=int(7.0 * GIB),  # 8 GB LPDDR5 shared with the OS and CUDA context
        memory_bandwidth=68 * GB * 0.7,
        storage_bandwidth=1.5 * GB,  # NVMe SSD on PCIe Gen3 x4 (M.2 Key M)
        elementwise_bandwidth=68 * GB * 0.5,
        kernels=_gpu_kernels(fp16_flops=10e12, int8_ops=20e12, sparse_fp16_flops=20e12, efficiency=0.5),
        source=(
            "NVIDIA Jetson Orin Nano Series Data Sheet (DS-11105-001): 8GB module, 1024-core Ampere GPU with "
            "32 Tensor Cores at 625 MHz, 40 INT8 TOPS (sparse) = 20 dense, FP16 dense taken as half of INT8; "
            "8GB 128-bit LPDDR5, 68 GB/s. Derated: 50% of peak FLOP/s, 70% of bandwidth."
        ),
    ),
    "jetson-agx-orin-64gb": DeviceProfile(
        name="NVIDIA Jetson AGX Orin 64GB",
        memory_bytes=int(60 * GIB),
        memory_bandwidth=204.8 * GB * 0.7,
        storage_bandwidth=2.0 * GB,  # 64GB eMMC 5.1 / NVMe
        elementwise_bandwidth=204.8 * GB * 0.5,
        kernels=_gpu_kernels(fp16_flops=42.5e12, int8_ops=85e12, sparse_fp16_flops=85e12, efficiency=0.5),
        source=(
            "NVIDIA Jetson AGX Orin Series Data Sheet (DS-10662-001): 64GB module, 2048-core Ampere GPU with 64 "
            "Tensor Cores, 275 INT8 TOPS sparse (GPU 170 sparse, i.e. 85 dense), 64GB 256-bit LPDDR5, "
            "204.8 GB/s. FP16 dense taken as half of INT8 dense. Derated: 50% FLOP/s, 70% bandwidth."
        ),
    ),
    "raspberry-pi-5-8gb": DeviceProfile(
        name="Raspberry Pi 5 (8GB)",
        memory_bytes=int(7.0 * GIB),
        memory_bandwidth=17 * GB * 0.6,
        storage_bandwidth=0.09 * GB,  # microSD (SDR104)
        elementwise_bandwidth=17 * GB * 0.4,
        kernels=_arm_cpu_kernels(fp32_flops=4 * 2.4e9 * 16, efficiency=0.5),
        source=(
            "Raspberry Pi 5 product brief: quad-core Arm Cortex-A76 at 2.4 GHz (2x128-bit NEON FMA per core: 16 "
            "fp32 FLOP/cycle), LPDDR4X-4267 on a 32-bit bus (17 GB/s), microSD SDR104 (~90 MB/s). Derated: 50% "
            "FLOP/s, 60% bandwidth."
        ),
    ),
}


def builtin_device(name: str) -> DeviceProfile:
    """A built-in device profile by name (see `BUILTIN_DEVICES`)."""
    if name not in BUILTIN_DEVICES:
        raise ValueError(f"Unknown device {name!r}; built-in devices: {', '.join(BUILTIN_DEVICES)}.")
    return BUILTIN_DEVICES[name]
