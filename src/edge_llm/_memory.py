"""The process's memory: what it holds, its allocator's reserve, and what its tensors hold.

On a device the process's resident memory is what has to fit. glibc's malloc keeps freed memory
for reuse, so the resident memory of a PyTorch process can sit far above what its tensors hold;
these helpers hand that memory back, bound the reserve, and measure both sides.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Buffers from 128 KiB up get their own mapping, unmapped when freed. glibc's default starts there
# too but raises the threshold to the largest buffer freed so far (up to 32 MiB), after which a
# training step's freed activations stay in the heap. Even at a fixed 1 MiB the heap kept a step's
# freed sub-megabyte buffers: SmolLM2-135M's edge-llm step (SciQ, batch 8) rose 282 MiB above the
# loaded model, and 97 MiB at 128 KiB (docs/results.md, "The whole process").
RESERVE_MMAP_THRESHOLD = 128 * 2**10
RESERVE_TRIM_THRESHOLD = 16 * 2**20
# Apache Arrow (under `datasets`, which the Trainer imports) allocates from its own pool, mimalloc
# or jemalloc, which keeps what it frees: SmolLM2's tokenized sonnets left 16 MiB resident through
# it, 7 MiB through glibc's bounded malloc.
ARROW_POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"
# Whether the reserve was bounded in this process, by `limit_allocator_reserve` or by glibc's
# environment variables read at start-up.
_limited = "MALLOC_MMAP_THRESHOLD_" in os.environ


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 -- glibc has both; musl has neither
    except (OSError, AttributeError):
        return None
    return libc


def limit_allocator_reserve() -> bool:
    """Fix glibc's mmap threshold at 128 KiB and its trim threshold at 16 MiB, so that what the
    process frees leaves its resident memory; returns whether the allocator is glibc's.

    Call it before loading the model: memory freed before it stays in the heap, and a later
    training step that reuses it brings it back into resident memory. The cost is a page fault
    per fresh buffer of 128 KiB and more: slower steps, most over llama.cpp-block layers, which
    decode their weights into fresh buffers at every call (docs/results.md).

    Arrow's memory pool (datasets' tables) is switched to the system allocator too, so that its
    buffers obey the same bounds."""
    global _limited
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(M_MMAP_THRESHOLD, RESERVE_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, RESERVE_TRIM_THRESHOLD)
    _arrow_uses_malloc()
    _limited = True
    return True


def _arrow_uses_malloc() -> None:
    """Arrow allocates through malloc: now if it is loaded, else once it is (its variable names the
    pool it starts with); unless the user named a pool in that variable."""
    if ARROW_POOL_VARIABLE in os.environ:
        return
    os.environ[ARROW_POOL_VARIABLE] = "system"
    arrow = sys.modules.get("pyarrow")
    if arrow is not None:
        arrow.set_memory_pool(arrow.system_memory_pool())


def allocator_reserve_limited() -> bool:
    """Whether `limit_allocator_reserve` (or glibc's MALLOC_MMAP_THRESHOLD_) bounded the reserve
    in this process already, or the allocator is not glibc's (nothing to bound)."""
    return _limited or _glibc() is None


def resident_bytes() -> int:
    """The process's resident memory now (0 where /proc is not there)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """The process's peak resident memory (VmHWM) since it started or since `reset_peak_resident`."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def reset_peak_resident() -> bool:
    """Start `peak_resident_bytes` again from the resident memory now (Linux); returns whether it did."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def release_freed_memory() -> None:
    """Return freed heap to the system (glibc's `malloc_trim`; a no-op elsewhere).

    glibc keeps freed memory for reuse. Compression frees a model's float weights, yet on SmolLM2
    about 100 MiB of them stayed resident; on a device the process's resident memory is what has
    to fit, so after compressing, edge-llm hands that memory back."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class TensorBytesTracker(TorchDispatchMode):
    """Counts the bytes of the tensors allocated while it is active and still alive, and their peak.

    Every operator's new output storage is counted until that storage is freed (a weak reference
    sees it go); views and in-place results share an input's storage and are not counted again.
    This sees what autograd, checkpoint recomputation and the optimizer allocate, on any device,
    which the process's resident memory mixes with the allocator's own reserve. It does not see
    buffers an operator allocates and frees inside itself.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage(), inputs)
        return out

    def _count(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        pointer = storage.data_ptr()
        if not pointer or pointer in inputs or pointer in self._sizes:
            return
        self._sizes[pointer] = storage.nbytes()
        self.live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._free, pointer)

    def _free(self, pointer: int) -> None:
        self.live_bytes -= self._sizes.pop(pointer, 0)
