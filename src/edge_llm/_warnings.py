"""Upstream warnings that say nothing to an edge-llm user, silenced where edge-llm owns the output
(the CLI and the demo), never globally in the library; and llama.cpp's own chatter on the
terminal (`quiet_native_output`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

# (category, message regex): each is raised by transformers/torch code that edge-llm calls as
# documented, and has no action the user could take.
KNOWN_HARMLESS = (
    # transformers' Trainer asks every model this deprecated question itself.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # torch's DataLoader on a machine without an accelerator, with Trainer's default pin_memory.
    (UserWarning, r".*'pin_memory' argument is set as true but no accelerator is found"),
)

# Raised inside ExecuTorch's lowering of the program edge-llm builds (`export/executorch.py`); none
# concerns the user's model.
EXECUTORCH_LOWERING = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (DeprecationWarning, r"read_binary is deprecated"),
    # transformers' output capturing, seen by torch.export: it does not enter the program.
    (UserWarning, r"While compiling, we found certain side effects"),
    # The static KV cache is a buffer the program updates in place, as ExecuTorch's own LLM exports
    # do; the positions a call attends to are written by that call or an earlier one.
    (UserWarning, r"Mutation on a buffer in the model is detected"),
    # ExecuTorch's own shape functions of its attention ops still use a check PyTorch deprecates.
    (FutureWarning, r"_check_is_size will be removed"),
)


@contextlib.contextmanager
def quiet_upstream_warnings(known: tuple[tuple[type[Warning], str], ...] = KNOWN_HARMLESS) -> Iterator[None]:
    with warnings.catch_warnings():
        for category, message in known:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def warn_loudly(logger: logging.Logger, message: str, stacklevel: int = 2) -> None:
    """Log `message` and raise it as a UserWarning: a plain script shows the warning (it never
    shows info logs), an application that configures logging keeps the log line."""
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


@contextlib.contextmanager
def quiet_native_output(logger: logging.Logger) -> Iterator[None]:
    """Send what C code (llama.cpp) writes to standard output and error to /dev/null, unless
    `logger` shows debug messages: llama.cpp reports each tensor it quantizes and each adapter
    tensor it places, which says nothing to a user."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
