"""Whole-folder saves of a compressed model: `save_pretrained` writes into a new folder beside the
target and swaps it in when complete, so a save killed midway leaves the previous checkpoint
loadable, and every file there that a model save does not own is kept.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from edge_llm._io import atomic_directory


def saves_whole_folders(model: nn.Module) -> None:
    """Make `model.save_pretrained(folder)` switch `folder` over as a whole (see `_save_whole`).

    A `partial` holding the model, not a closure: `copy.deepcopy(model)` then gives a copy whose
    `save_pretrained` saves the copy."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = functools.partial(_save_whole, model)


# What a model's `save_pretrained` writes (config, generation config, weights and their shards, in
# either format); any other file in the folder is the user's and is kept.
_MODEL_FILES = re.compile(
    r"(config|generation_config)\.json"
    r"|(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)"
    r"|(model\.safetensors|pytorch_model\.bin)\.index\.json"
)


def owned_by_model_save(name: str) -> bool:
    """Whether `save_pretrained` of a transformers model writes a file of this name."""
    return _MODEL_FILES.fullmatch(name) is not None


def _save_whole(model: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """`save_pretrained` that writes into a new folder beside `save_directory` and swaps it in
    when complete: a save killed midway leaves the previous checkpoint loadable. Every file there
    the model save does not own (a tokenizer, an adapter, training arguments, other weights) is
    carried over as a hard link."""
    out = Path(save_directory)
    if kwargs.get("push_to_hub") and "repo_id" not in kwargs:
        kwargs["repo_id"] = out.name  # transformers names the repository after the folder it saves to
    with atomic_directory(out, carry_over=lambda name: not owned_by_model_save(name)) as staging:
        type(model).save_pretrained(model, staging, *args, **kwargs)
