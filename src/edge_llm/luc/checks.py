"""Consistency checks of a saved LUC checkpoint against its policy, before any tensor is used.

A LUC layer is only right if its stored tensors agree with each other and with the policy: the
packed codes' size with the bit-width and kept count, the scales' shape with the group size, the
mask's popcount with the sparsity. transformers loads whatever tensors a file holds (and leaves
missing ones uninitialised), so a damaged or edited checkpoint would compute garbage silently.
These checks name the file, the tensor and what was expected instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from edge_llm.luc.linear import UNQUANTIZED_BITS, LUCLinear, kept_per_row
from edge_llm.luc.policy import LUCPolicy

logger = logging.getLogger(__name__)

_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}

# A buffer saved with every LUC checkpoint. Without edge_llm, transformers' load report lists it as
# an unexpected key right above its size-mismatch error: the name is the instruction. It holds
# the SHA-256 of the policy the tensors were made with, so that a config.json edited afterwards
# (a group size changed with the same group count, say) is caught; checkpoints of earlier
# edge-llm versions hold one byte instead, and load without that check.
MARKER = "import_edge_llm_before_loading_this_checkpoint"
_LEGACY_MARKER_SHAPE = (1,)


def policy_sha256(policy: LUCPolicy) -> bytes:
    """SHA-256 of the policy's canonical JSON."""
    return hashlib.sha256(json.dumps(policy.to_dict(), sort_keys=True, separators=(",", ":")).encode()).digest()


def policy_fingerprint(policy: LUCPolicy) -> torch.Tensor:
    """`policy_sha256` as 32 uint8 values (the marker buffer's contents)."""
    return torch.tensor(list(policy_sha256(policy)), dtype=torch.uint8)


def add_marker(model: nn.Module, policy: LUCPolicy, shape: tuple[int, ...] | None = None) -> None:
    """(Re)set `model`'s marker buffer to `policy`'s fingerprint (or, with a legacy `shape`, one byte)."""
    device = next(model.parameters()).device
    value = torch.ones(shape, dtype=torch.uint8) if shape == _LEGACY_MARKER_SHAPE else policy_fingerprint(policy)
    model.register_buffer(MARKER, value.to(device))


def _expected(model: nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every LUC buffer of `model` (built from the policy, before loading): dtype and shape."""
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, LUCLinear):
            for buffer_name, buffer in module.named_buffers(recurse=False):
                expected[f"{name}.{buffer_name}"] = (buffer.dtype, tuple(buffer.shape))
    return expected


def check_checkpoint_files(model: nn.Module, policy: LUCPolicy, checkpoint_files: Iterable[str | Path]) -> None:
    """Every LUC tensor the policy implies is in the files, with the dtype and shape it implies
    (read from the safetensors headers only)."""
    expected = _expected(model)
    expected[MARKER] = (torch.uint8, (32,))
    found: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            continue
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                if key in expected:
                    piece = handle.get_slice(key)
                    found[key] = (Path(file).name, piece.get_dtype(), tuple(piece.get_shape()))
    if MARKER not in found:
        raise ValueError(
            f"LUC checkpoint has no {MARKER} tensor, which every edge-llm save writes: the weights file was "
            "edited or is not this model's. Re-save the model with edge-llm."
        )
    if found[MARKER][2] == _LEGACY_MARKER_SHAPE:
        logger.warning(
            "LUC checkpoint %s predates policy fingerprints: an edit of its config.json (group size, bits) cannot "
            "be detected. Re-save it with edge-llm to add one.",
            found[MARKER][0],
        )
        add_marker(model, policy, _LEGACY_MARKER_SHAPE)  # saved before fingerprints: load it as it is
        found.pop(MARKER)
        del expected[MARKER]
    for key, (dtype, shape) in expected.items():
        if key not in found:
            raise ValueError(
                f"LUC checkpoint is incomplete: tensor {key} is missing from its safetensors files; the policy in "
                "config.json needs it. Re-save the model with edge-llm."
            )
        file, stored_dtype, stored_shape = found[key]
        if _DTYPES.get(stored_dtype) != dtype or stored_shape != shape:
            raise ValueError(
                f"LUC checkpoint {file}: tensor {key} is {stored_dtype} {list(stored_shape)}, but the policy in "
                f"config.json implies {dtype} {list(shape)}. The file and the policy disagree (edited or damaged)."
            )


def check_loaded_layers(model: nn.Module, policy: LUCPolicy) -> None:
    """Values the shapes cannot show: the policy the tensors were made with; finite, positive
    scales; integer zero-points; a pruning mask that keeps exactly the policy's count in every row."""
    marker = dict(model.named_buffers(recurse=False)).get(MARKER)
    fingerprinted = marker is not None and tuple(marker.shape) != _LEGACY_MARKER_SHAPE
    if fingerprinted and not torch.equal(marker.cpu(), policy_fingerprint(policy)):
        raise ValueError(
            "LUC checkpoint: the policy in config.json is not the one its tensors were compressed with (it "
            "was edited after saving: group size, bits, sparsity, method or targets). Restore config.json "
            "or re-save the model with edge-llm."
        )
    for name, module in model.named_modules():
        if not isinstance(module, LUCLinear):
            continue
        if hasattr(module, "weight_scales"):
            scales, zeros = module.weight_scales.float(), module.weight_zeros.float()
            if not (torch.isfinite(scales).all() and (scales > 0).all()):
                raise ValueError(f"LUC layer {name}: weight_scales holds non-finite or non-positive values.")
            if not (torch.isfinite(zeros).all() and torch.equal(zeros, zeros.round())):
                raise ValueError(f"LUC layer {name}: weight_zeros must hold finite whole numbers.")
        if module.bits == UNQUANTIZED_BITS and not torch.isfinite(module.weight).all():
            raise ValueError(f"LUC layer {name}: its 16-bit weight values hold NaN or infinity.")
        if module.bias is not None and not torch.isfinite(module.bias).all():
            raise ValueError(f"LUC layer {name}: its bias holds NaN or infinity.")
        mask = module.mask()
        if mask is not None:
            columns = module.in_features
            kept = kept_per_row(columns, module.sparsity)
            if not (mask.sum(dim=1) == kept).all():
                raise ValueError(
                    f"LUC layer {name}: weight_mask does not keep {kept} of {columns} weights in every row, as "
                    f"sparsity {module.sparsity} implies; the mask and the packed weights disagree."
                )
