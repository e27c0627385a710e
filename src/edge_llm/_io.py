"""File input and output. Crash-safe writes: a temporary file in the same folder, flushed to disk, then renamed.

A reader then sees either the old file or the whole new one, never a truncated one, even when the
process is killed mid-write (`os.replace` is atomic on POSIX and Windows within one filesystem).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` so that `path` is never seen half-written."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is never seen half-written."""
    with atomic_file(path) as temporary:
        temporary.write_bytes(data)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Write one file as a whole: yields a temporary path beside `path` for a writer that takes a
    path (GGUF, safetensors); when the block ends without an error the file is flushed to disk and
    renamed to `path`; on an error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_name_length(path, len(".") + len(".") + 8 + len(".tmp"))  # ".<name>.<8 random>.tmp"
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600, not what a plain write gives
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(
    out: str | Path, carry_over: Callable[[str], bool] | None = None, overwrite: bool = True
) -> Iterator[Path]:
    """Write a folder as a whole: yields a new folder beside `out` to write into; when the block ends
    without an error its files are flushed to disk and it replaces `out` (an old `out` is kept aside
    until the new one is in place); on an error it is removed and `out` is left as it was.

    `carry_over(name)`: the entries of an old `out` the new folder keeps (hard links, or copies),
    unless the block wrote one of that name: a writer keeps every file it does not own.
    `overwrite=False`: an old `out` that an interrupted write had moved aside is put back and
    kept, and the write refused (its caller checked that `out` did not exist)."""
    out = Path(out)
    if out.is_symlink():  # write where the link points (a bigger disk, say), and keep the link
        out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # ".<name>.partial-<pid>-<8 random>" beside it, the pid up to 7 digits
    _check_name_length(out, len(".") + len(".partial-") + 7 + len("-") + 8)
    if _restore_interrupted(out) and not overwrite:
        raise FileExistsError(
            f"{out} was moved aside by an interrupted write and is now back in place; pass overwrite to replace it."
        )
    _remove_abandoned_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700, not what a plain mkdir gives
    try:
        yield staging
        if carry_over is not None and out.is_dir():
            for item in out.iterdir():
                if carry_over(item.name) and not (staging / item.name).exists():
                    _link_or_copy(item, staging / item.name)
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if out.exists() and _exchange(staging, out):
            shutil.rmtree(staging, ignore_errors=True)  # now the old folder
            return
        previous = None
        if out.exists():
            # No atomic exchange here: a kill between these two renames leaves the old folder as
            # `.<name>.previous-<pid>`, which the next `atomic_directory(out)` puts back.
            previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
            os.replace(out, previous)
        os.replace(staging, out)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_name_length(path: Path, extra: int) -> None:
    """A name the file system would refuse for the temporary copy written beside `path` is refused
    here, by name, before any work (the OS says only "File name too long")."""
    try:
        name_max = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    length = len(os.fsencode(path.name))
    if length + extra > name_max:
        raise ValueError(
            f"The name {path.name[:40]!r}... is {length} bytes; this file system allows {name_max} per name, and "
            f"writing it safely needs {extra} more for a temporary copy beside it: use a name of at most "
            f"{name_max - extra} bytes."
        )


def _umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the
    system has no such call, which leaves both untouched."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or filesystem without it
        return False
    raise OSError(error, os.strerror(error), str(second))


def _remove_abandoned_staging(out: Path) -> None:
    """Remove the staging folders that killed writers of `out` left (their process is gone)."""
    for staging in out.parent.glob(f".{out.name}.partial-*"):
        pid = staging.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _link_or_copy(source: Path, target: Path) -> None:
    """`source` at `target` as hard links (a copy where links cannot be made), folders included."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir():
        shutil.copytree(source, target, copy_function=link)
    else:
        link(str(source), str(target))


def _restore_interrupted(out: Path) -> bool:
    """Put back a folder that a killed `atomic_directory` had moved aside (see there); True if one was."""
    if out.exists():
        return False
    for previous in sorted(out.parent.glob(f".{out.name}.previous-*")):
        os.replace(previous, out)
        return True
    return False


def load_schema(name: str) -> dict[str, Any]:
    """A fresh copy of one of edge-llm's JSON schemas (`schemas/<name>.schema.json`)."""
    return json.loads(files("edge_llm").joinpath("schemas", f"{name}.schema.json").read_text())


def check_schema(data: Any, schema: dict[str, Any], what: str) -> None:
    """Validate `data` against `schema`; the error names `what` and where in the document."""
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ValueError(f"Invalid {what} at {where}: {error.message}") from None


def save_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _no_constant(name: str) -> Any:
    raise ValueError(f"it holds {name}, which is not a number JSON allows")


def load_json(path: str | Path, what: str) -> Any:
    """A JSON file's content; NaN and Infinity (which Python's json would accept) and nesting too
    deep to parse are refused with the file's name."""
    try:
        return json.loads(Path(path).read_text(), parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a JSON {what}: {error}") from None
    except ValueError as error:
        raise ValueError(f"{path} is not a valid JSON {what}: {error}.") from None
    except RecursionError:
        raise ValueError(f"{path} is not a valid JSON {what}: it is nested too deeply to read.") from None
