"""`profile_this_machine()`: measure the rates the cost model needs, on the machine it runs on.

Micro-benchmarks (fastest of a few repeats each): memory copy bandwidth, elementwise bandwidth,
storage read bandwidth (a temporary file, evicted from the page cache first), matmul FLOP/s,
sparse (CSR) matmul FLOP/s, and how fast `LUCLinear` dequantizes each bit-width. Kernels are the
ones edge-llm's PyTorch reference executor runs there: on a CPU `dense_fp32`, `dequant_int2..8`
(packed weights dequantized per call, then a float32 matmul) and `sparse_unstructured`; on a CUDA
GPU the same in bfloat16 (`dense_bf16`, also `dense_fp16`/`dense_fp32`) plus `sparse_2_4`.
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

from edge_llm.luc.kernels import int4_available, int4_fits, int4_matmul
from edge_llm.luc.linear import LUCLinear
from edge_llm.luc.prune import prune_mask
from edge_llm.luc.quantize import quantize_rtn
from edge_llm.scheduling.devices import DeviceProfile, Kernel

logger = logging.getLogger(__name__)


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed runs (after a warm-up): what the hardware sustains, without the
    stalls other processes cause on a shared machine (`timeit`'s advice). CUDA work is waited for."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


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


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"this machine: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"this machine: {cpu}, {torch.get_num_threads()} threads"


def _luc_layer(shape: tuple[int, int], bits: int, group: int, device: torch.device, sparsity: float = 0.0) -> LUCLinear:
    """A LUC layer of a fixed random weight of `shape` (pruned by magnitude at `sparsity`)."""
    rows, columns = shape
    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(0)) * 0.02
    linear = torch.nn.Linear(columns, rows, bias=False)
    linear.weight.data = weight
    mask = prune_mask(weight, sparsity, "magnitude") if sparsity else None
    quantized = quantize_rtn(weight, bits, group, mask)
    return LUCLinear.from_linear(linear, bits, sparsity, group, quantized, mask).to(device)


def _dequant_seconds(shape: tuple[int, int], bits: int, repeats: int, device: torch.device, dtype: torch.dtype):
    layer = _luc_layer(shape, bits, min(128, shape[1]), device)
    return _best_seconds(lambda: layer.dequantize_weight(dtype), repeats)


def _dequant_kernels(
    shape: tuple[int, int], dense_flops: float, repeats: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Kernel]:
    """`dequant_int2..8`: how fast `LUCLinear` expands packed weights of `shape`, and pruned ones.

    A call costs a fixed part (its dozen small operations) plus a part per weight: timing a tiny
    layer as well as one of `shape` separates the two."""
    rows, columns = shape
    tiny = (64, 64)
    kernels = {}
    for bits in (2, 3, 4, 5, 6, 7, 8):
        big, small = (_dequant_seconds(s, bits, repeats, device, dtype) for s in (shape, tiny))
        per_weight = max(big - small, 1e-12) / (rows * columns - tiny[0] * tiny[1])
        kernels[bits] = (1 / per_weight, max(small - tiny[0] * tiny[1] * per_weight, 0.0), big)
    # A pruned layer also scatters its kept weights through the mask: time that extra at 50%.
    layer = _luc_layer(shape, 4, 128, device, sparsity=0.5)
    extra = _best_seconds(lambda: layer.dequantize_weight(dtype), repeats) - kernels[4][2] / 2
    unmask_per_s = rows * columns / extra if extra > 0 else 0.0
    return {
        f"dequant_int{bits}": Kernel(
            dense_flops, dequant_per_s=rate, unmask_per_s=unmask_per_s, call_overhead_s=overhead
        )
        for bits, (rate, overhead, _) in kernels.items()
    }


def _int4_kernel(shape: tuple[int, int], tokens: int, repeats: int, device: torch.device) -> dict[str, Kernel]:
    """`int4_packed`: PyTorch's fused int4 matmul on LUC codes, where this build has it."""
    rows, columns = shape
    if not (int4_available(device) and int4_fits(4, 64, columns, rows)):
        return {}
    packed = _luc_layer(shape, 4, 64, device).int4_weight()
    x = torch.randn(tokens, columns, device=device)
    return {"int4_packed": Kernel(2 * tokens * rows * columns / _best_seconds(lambda: int4_matmul(x, packed), repeats))}


def _layer_overhead(repeats: int, device: torch.device, dtype: torch.dtype) -> float:
    """Seconds of a decoder-layer call whose arithmetic is negligible: a Llama layer of hidden size
    64 on one token, i.e. what dispatching and launching a layer's operations costs."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1
    )
    config._attn_implementation = "sdpa"  # what a loaded model uses; unset, the layer warns on every call
    layer = LlamaDecoderLayer(config, 0).to(device=device, dtype=dtype).eval()
    hidden = torch.randn(1, 1, 64, device=device, dtype=dtype)
    positions = torch.zeros(1, 1, dtype=torch.long, device=device)
    rotary = LlamaRotaryEmbedding(config).to(device)(hidden, positions)
    return _best_seconds(lambda: layer(hidden, position_embeddings=rotary, position_ids=positions), repeats)


def _matmul_flops(x: torch.Tensor, w: torch.Tensor, repeats: int) -> float:
    return 2 * x.shape[0] * w.shape[0] * w.shape[1] / _best_seconds(lambda: x @ w.t(), repeats)


def _sparse_kernels(x: torch.Tensor, w: torch.Tensor, repeats: int) -> dict[str, Kernel]:
    """`sparse_unstructured` (CSR, 50% kept) everywhere; `sparse_2_4` where CUDA runs it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        sparse = (w * (torch.rand_like(w) < 0.5)).to_sparse_csr()
    seconds = _best_seconds(lambda: torch.sparse.mm(sparse, x.t()), repeats)
    kernels = {"sparse_unstructured": Kernel(2 * sparse.values().numel() * x.shape[0] / seconds)}
    if x.is_cuda:
        from torch.sparse import to_sparse_semi_structured

        keep = torch.tensor([1, 1, 0, 0], device=w.device, dtype=torch.bool).repeat(w.numel() // 4)
        half = (w.half().flatten() * keep).view_as(w)
        try:
            semi = to_sparse_semi_structured(half)
        except (RuntimeError, ValueError) as error:  # older GPUs: no sparse tensor cores
            logger.info("sparse_2_4 not measured: %s", error)
            return kernels
        xh = x.half()
        # The cost model charges sparse kernels for the kept half of the FLOPs only.
        flops = 2 * x.shape[0] * w.numel() / 2
        kernels["sparse_2_4"] = Kernel(flops / _best_seconds(lambda: torch.nn.functional.linear(xh, semi), repeats))
    return kernels


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * 1024**3


@torch.no_grad()
def profile_this_machine(
    memory_bytes: int | None = None,
    weight_shape: tuple[int, int] = (1024, 1024),
    tokens: int = 256,
    repeats: int = 5,
    storage_dir: str | None = None,
    device: str | torch.device = "cpu",
) -> DeviceProfile:
    """Measure this machine (its CPU, or a CUDA GPU with `device="cuda"`) into a `DeviceProfile`.

    Matmul and dequantization rates depend on the sizes involved (caches), so the micro-benchmarks
    run at a typical Linear of the model to be scheduled and a typical prompt length.

    Args:
        memory_bytes: memory the model may use; default: the memory available now (on the GPU for
            `device="cuda"`).
        weight_shape: (out, in) of the Linear the kernels are measured on (default: 1024 x 1024;
            pass the shape of your model's MLP projections for a closer fit).
        tokens: tokens per matmul (a prompt's length).
        repeats: timed repeats per micro-benchmark (the fastest is kept).
        storage_dir: where the storage benchmark writes its temporary file (default: the temp dir).
        device: `"cpu"` or a CUDA device. On CUDA the compute dtype is bfloat16: the dense kernels
            are `dense_bf16`/`dense_fp16`/`dense_fp32` and `dequant_int*` dequantize into bfloat16.
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"profile_this_machine(device={str(device)!r}): measures 'cpu' or a 'cuda' device.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("profile_this_machine(device='cuda'): no CUDA GPU is available; use device='cpu'.")
    big = torch.randn(32 * 1024 * 1024, device=device)  # 128 MiB
    copy = torch.empty_like(big)
    seconds = _best_seconds(lambda: copy.copy_(big), repeats)
    memory_bandwidth = 2 * big.numel() * 4 / seconds
    a, b = torch.randn(8 * 1024 * 1024, device=device), torch.randn(8 * 1024 * 1024, device=device)
    seconds = _best_seconds(lambda: torch.add(a, b, out=copy[: a.numel()]), repeats)
    elementwise_bandwidth = 3 * a.numel() * 4 / seconds

    rows, columns = weight_shape
    x, w = torch.randn(tokens, columns, device=device), torch.randn(rows, columns, device=device) * 0.02
    fp32_flops = _matmul_flops(x, w, repeats)
    kernels = {"dense_fp32": Kernel(fp32_flops)}
    compute_dtype, compute_flops = torch.float32, fp32_flops
    if device.type == "cuda":
        for name, dtype in (("dense_fp16", torch.float16), ("dense_bf16", torch.bfloat16)):
            kernels[name] = Kernel(_matmul_flops(x.to(dtype), w.to(dtype), repeats))
        compute_dtype, compute_flops = torch.bfloat16, kernels["dense_bf16"].flops
    kernels.update(_dequant_kernels(weight_shape, compute_flops, repeats, device, compute_dtype))
    kernels.update(_int4_kernel(weight_shape, tokens, repeats, device))
    kernels.update(_sparse_kernels(x, w, repeats))

    storage_bandwidth = _storage_bandwidth(storage_dir, 128 * 1024 * 1024)
    profile = DeviceProfile(
        layer_overhead_s=_layer_overhead(repeats, device, compute_dtype),
        name=machine_name(device),
        memory_bytes=int(memory_bytes if memory_bytes is not None else _available_memory(device)),
        memory_bandwidth=memory_bandwidth,
        storage_bandwidth=storage_bandwidth,
        elementwise_bandwidth=elementwise_bandwidth,
        kernels=kernels,
        source=f"measured by edge_llm.scheduling.profile_this_machine() on {time.strftime('%Y-%m-%d')}",
    )
    logger.info(
        "Measured: %.1f GB/s memory, %.1f GB/s elementwise, %.2f GB/s storage, %.1f GFLOP/s %s",
        memory_bandwidth / 1e9,
        elementwise_bandwidth / 1e9,
        storage_bandwidth / 1e9,
        compute_flops / 1e9,
        "bf16" if device.type == "cuda" else "fp32",
    )
    return profile
