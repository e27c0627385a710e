"""`profile_this_machine()`: measure the rates the cost model needs, on the machine it runs on.

Micro-benchmarks (median of a few repeats each): memory copy bandwidth, elementwise bandwidth,
storage read bandwidth (a temporary file, evicted from the page cache first), float32 matmul
FLOP/s, sparse (CSR) matmul FLOP/s, and how fast `LUCLinear` dequantizes each bit-width. Kernels
are the ones edge-llm's PyTorch reference executor runs here: `dense_fp32`, `dequant_int2..8`
(packed weights dequantized per call, then a float32 matmul) and `sparse_unstructured`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from edge_llm.luc.linear import LUCLinear
from edge_llm.luc.quantize import quantize_rtn
from edge_llm.scheduling.devices import DeviceProfile, Kernel

logger = logging.getLogger(__name__)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _available_memory() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * 1024**3


def _storage_bandwidth(directory: str | None, size: int) -> float:
    data = os.urandom(1 << 20) * (size >> 20)
    with tempfile.NamedTemporaryFile(dir=directory, delete=False) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
        path = handle.name
    try:
        with open(path, "rb") as handle:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read from storage, not cache
            start = time.perf_counter()
            while handle.read(1 << 24):
                pass
            return size / (time.perf_counter() - start)
    finally:
        os.unlink(path)


def _machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"this machine: {cpu}, {torch.get_num_threads()} threads"


@torch.no_grad()
def profile_this_machine(
    memory_bytes: int | None = None, size: int = 2048, repeats: int = 5, storage_dir: str | None = None
) -> DeviceProfile:
    """Measure this machine (CPU) into a `DeviceProfile`.

    Args:
        memory_bytes: memory the model may use; default: the memory available now.
        size: matrix size of the micro-benchmarks (2048: a few seconds in all).
        repeats: timed repeats per micro-benchmark (the median is kept).
        storage_dir: where the storage benchmark writes its temporary file (default: the temp dir).
    """
    big = torch.randn(32 * 1024 * 1024)  # 128 MiB
    copy = torch.empty_like(big)
    seconds = _median_seconds(lambda: copy.copy_(big), repeats)
    memory_bandwidth = 2 * big.numel() * 4 / seconds
    a, b = torch.randn(8 * 1024 * 1024), torch.randn(8 * 1024 * 1024)
    seconds = _median_seconds(lambda: torch.add(a, b, out=copy[: a.numel()]), repeats)
    elementwise_bandwidth = 3 * a.numel() * 4 / seconds

    x, w = torch.randn(size, size), torch.randn(size, size)
    dense_flops = 2 * size**3 / _median_seconds(lambda: x @ w.t(), repeats)
    kernels = {"dense_fp32": Kernel(dense_flops)}

    weight = torch.randn(size, size) * 0.02
    linear = torch.nn.Linear(size, size, bias=False)
    linear.weight.data = weight
    for bits in (2, 3, 4, 5, 6, 7, 8):
        layer = LUCLinear.from_linear(linear, bits, 0.0, 128, quantize_rtn(weight, bits, 128))
        rate = size * size / _median_seconds(layer.dequantize_weight, repeats)
        kernels[f"dequant_int{bits}"] = Kernel(dense_flops, dequant_per_s=rate)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        sparse = (weight * (torch.rand_like(weight) < 0.5)).to_sparse_csr()
    sparse_seconds = _median_seconds(lambda: torch.sparse.mm(sparse, x.t()), max(2, repeats // 2))
    kernels["sparse_unstructured"] = Kernel(2 * sparse.values().numel() * size / sparse_seconds)

    storage_bandwidth = _storage_bandwidth(storage_dir, 128 * 1024 * 1024)
    profile = DeviceProfile(
        name=_machine_name(),
        memory_bytes=int(memory_bytes if memory_bytes is not None else _available_memory()),
        memory_bandwidth=memory_bandwidth,
        storage_bandwidth=storage_bandwidth,
        elementwise_bandwidth=elementwise_bandwidth,
        kernels=kernels,
        source=f"measured by edge_llm.scheduling.profile_this_machine() on {time.strftime('%Y-%m-%d')}",
    )
    logger.info(
        "Measured: %.1f GB/s memory, %.1f GB/s elementwise, %.2f GB/s storage, %.1f GFLOP/s fp32",
        memory_bandwidth / 1e9,
        elementwise_bandwidth / 1e9,
        storage_bandwidth / 1e9,
        dense_flops / 1e9,
    )
    return profile
