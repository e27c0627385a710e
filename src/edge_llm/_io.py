"""Crash-safe file writes: a temporary file in the same folder, flushed to disk, then renamed.

A reader then sees either the old file or the whole new one, never a truncated one, even when the
process is killed mid-write (`os.replace` is atomic on POSIX and Windows within one filesystem).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` so that `path` is never seen half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Write a folder as a whole: yields a new folder beside `out` to write into; when the block ends
    without an error its files are flushed to disk and it replaces `out` (an old `out` is kept aside
    until the new one is in place); on an error it is removed and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        previous = None
        if out.exists():
            previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
            os.replace(out, previous)
        os.replace(staging, out)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
