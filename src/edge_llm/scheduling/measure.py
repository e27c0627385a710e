"""`profile_this_machine()`: measure the rates the cost model needs, on the machine it runs on.

Micro-benchmarks (fastest of a few repeats each): memory copy bandwidth, elementwise bandwidth,
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
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from edge_llm.luc.linear import LUCLinear
from edge_llm.luc.prune import prune_mask
from edge_llm.luc.quantize import quantize_rtn
from edge_llm.scheduling.devices import DeviceProfile, Kernel

logger = logging.getLogger(__name__)


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed runs (after a warm-up): what the hardware sustains, without the
    stalls other processes cause on a shared machine (`timeit`'s advice)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


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


def _dequant_kernels(shape: tuple[int, int], dense_flops: float, repeats: int) -> dict[str, Kernel]:
    """`dequant_int2..8`: how fast `LUCLinear` expands packed weights of `shape`, and pruned ones."""
    rows, columns = shape
    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(0)) * 0.02
    linear = torch.nn.Linear(columns, rows, bias=False)
    linear.weight.data = weight
    seconds = {}
    for bits in (2, 3, 4, 5, 6, 7, 8):
        layer = LUCLinear.from_linear(linear, bits, 0.0, 128, quantize_rtn(weight, bits, 128))
        seconds[bits] = _best_seconds(layer.dequantize_weight, repeats)
    # A pruned layer also scatters its kept weights through the mask: time that extra at 50%.
    mask = prune_mask(weight, 0.5, "magnitude")
    layer = LUCLinear.from_linear(linear, 4, 0.5, 128, quantize_rtn(weight, 4, 128, mask), mask)
    extra = _best_seconds(layer.dequantize_weight, repeats) - seconds[4] / 2
    unmask_per_s = rows * columns / extra if extra > 0 else 0.0
    return {
        f"dequant_int{bits}": Kernel(dense_flops, dequant_per_s=rows * columns / t, unmask_per_s=unmask_per_s)
        for bits, t in seconds.items()
    }


@torch.no_grad()
def profile_this_machine(
    memory_bytes: int | None = None,
    weight_shape: tuple[int, int] = (1024, 1024),
    tokens: int = 256,
    repeats: int = 5,
    storage_dir: str | None = None,
) -> DeviceProfile:
    """Measure this machine (CPU) into a `DeviceProfile`.

    Matmul and dequantization rates depend on the sizes involved (caches), so the micro-benchmarks
    run at a typical Linear of the model to be scheduled and a typical prompt length.

    Args:
        memory_bytes: memory the model may use; default: the memory available now.
        weight_shape: (out, in) of the Linear the kernels are measured on (default: 1024 x 1024;
            pass the shape of your model's MLP projections for a closer fit).
        tokens: tokens per matmul (a prompt's length).
        repeats: timed repeats per micro-benchmark (the fastest is kept).
        storage_dir: where the storage benchmark writes its temporary file (default: the temp dir).
    """
    big = torch.randn(32 * 1024 * 1024)  # 128 MiB
    copy = torch.empty_like(big)
    seconds = _best_seconds(lambda: copy.copy_(big), repeats)
    memory_bandwidth = 2 * big.numel() * 4 / seconds
    a, b = torch.randn(8 * 1024 * 1024), torch.randn(8 * 1024 * 1024)
    seconds = _best_seconds(lambda: torch.add(a, b, out=copy[: a.numel()]), repeats)
    elementwise_bandwidth = 3 * a.numel() * 4 / seconds

    rows, columns = weight_shape
    x, w = torch.randn(tokens, columns), torch.randn(rows, columns) * 0.02
    dense_flops = 2 * tokens * rows * columns / _best_seconds(lambda: x @ w.t(), repeats)
    kernels = {"dense_fp32": Kernel(dense_flops), **_dequant_kernels(weight_shape, dense_flops, repeats)}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        sparse = (w * (torch.rand_like(w) < 0.5)).to_sparse_csr()
    sparse_seconds = _best_seconds(lambda: torch.sparse.mm(sparse, x.t()), repeats)
    kernels["sparse_unstructured"] = Kernel(2 * sparse.values().numel() * tokens / sparse_seconds)

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
