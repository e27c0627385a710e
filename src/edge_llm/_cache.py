"""Where edge-llm keeps what it computes once and reuses (converted models, LUC's measured
profiles, the demo's phase times): one leaf module, so the library's parts can all read it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$EDGE_LLM_CACHE`, else `~/.cache/edge-llm`."""
    return Path(os.environ.get("EDGE_LLM_CACHE", Path.home() / ".cache" / "edge-llm"))
