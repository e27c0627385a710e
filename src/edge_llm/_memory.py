"""Give the heap that compression frees back to the operating system."""

from __future__ import annotations

import ctypes
import gc
import sys


def release_freed_memory() -> None:
    """Return freed heap to the system (glibc's `malloc_trim`; a no-op elsewhere).

    glibc keeps freed memory for reuse. Compression frees a model's float weights, yet on SmolLM2
    about 100 MiB of them stayed resident; on a device the process's resident memory is what has
    to fit, so after compressing, edge-llm hands that memory back."""
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # another C library (musl) or none to load
        return
    trim(0)
