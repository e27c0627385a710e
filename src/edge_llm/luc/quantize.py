"""Group-wise asymmetric weight quantization: round-to-nearest and GPTQ.

A weight matrix `W` (out x in) is split along its input dimension into groups of `group_size`
columns. Each (row, group) gets a float16 `scale` and integer zero-point `zero` (stored as float16)
so that its codes `q = clamp(round(w / scale) + zero, 0, 2**bits - 1)` dequantize to
`(q - zero) * scale`. The grid spans the group's kept (unpruned) weights only: the zero-point may
lie outside the code range when they all have one sign, which keeps the full resolution for them.
Every kept weight is within `scale / 2` of its dequantized value (plus float16 rounding of zero-
points beyond 2048, which only near-constant groups reach). Pruned weights dequantize to exactly
0 through the mask; their code is 0 and carries no information.

On the symmetric grid the zero-point is the middle code `2**(bits-1)`, so the codes minus the
zero-point are a symmetric kernel's signed codes (int4 in [-8, 7]), and the scale is the smallest
that reaches both ends of the group: `scale = max(-min(w) / 2**(bits-1), max(w) / (2**(bits-1) - 1))`,
so the group's extreme weight is on the grid exactly (torchao's `SYMMETRIC_NO_CLIPPING_ERR`
mapping). Its default symmetric mapping (`scale = 2 max|w| / (2**bits - 1)`) leaves the extreme
half a step off the grid; on SmolLM2-135M at 4 bits per 32 that costs 10.5% / 6.2% in
perplexity on sonnets / LAMBADA (`docs/results.md`).

GPTQ (Frantar et al., 2022) quantizes one column at a time and spreads each column's error over
the columns not yet quantized, weighted by the inverse Hessian `H = X^T X` of the layer's
calibration inputs; pruned weights are forced to zero the same way, so the update also
compensates pruning (as SparseGPT does with a fixed mask).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edge_llm._registry import Registry

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
_MIN_SCALE = 2.0**-14  # smallest normal float16


@dataclass
class GroupQuantized:
    """Codes (uint8, out x in; 0 where pruned), float16 scales and zero-points (out x groups)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} (or 16 to keep a layer unquantized), got {bits!r}.")


def _group_params(
    weights: torch.Tensor, keep: torch.Tensor | None, bits: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point (float32, exactly representable in float16) over the last dimension."""
    max_code = (1 << bits) - 1
    if keep is None:
        low, high = weights.amin(dim=-1), weights.amax(dim=-1)
    else:
        low = torch.where(keep, weights, math.inf).amin(dim=-1)
        high = torch.where(keep, weights, -math.inf).amax(dim=-1)
        empty = ~keep.any(dim=-1)
        low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
    if symmetric:
        return _symmetric_params(low, high, bits)
    scale = ((high - low) / max_code).clamp_min(_MIN_SCALE)
    # Round the scale *up* to float16 (relative spacing 2**-10), so the grid still spans [low, high].
    scale = (scale * (1 + 2.0**-10)).to(torch.float16).float()
    zero = torch.round(-low / scale).clamp(-60000, 60000).to(torch.float16).float()
    return scale, zero


def _symmetric_params(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point of the symmetric grid: the smallest scale whose codes reach both the
    group's lowest weight (at `-2**(bits-1)` steps) and its highest (at `2**(bits-1) - 1`), so the
    larger of the two lands exactly on the grid."""
    half = 1 << (bits - 1)
    scale = torch.maximum(-low / half, high / (half - 1)).clamp_min(_MIN_SCALE)
    # Float16 to nearest: the extreme is then within 2**-11 of its code and still rounds to it.
    return scale.to(torch.float16).float(), torch.full_like(scale, half)


def _pad_columns(tensor: torch.Tensor, group_size: int, value: float | bool) -> torch.Tensor:
    missing = (-tensor.shape[1]) % group_size
    if not missing:
        return tensor
    return torch.cat([tensor, tensor.new_full((tensor.shape[0], missing), value)], dim=1)


def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int, mask: torch.Tensor | None = None, symmetric: bool = False
) -> GroupQuantized:
    """Round-to-nearest group-wise quantization of `weight` (kept where `mask` is True), on the
    symmetric grid if `symmetric`."""
    check_bits(bits)
    out_features, in_features = weight.shape
    w = _pad_columns(weight.float(), group_size, 0.0)
    keep = None if mask is None else _pad_columns(mask, group_size, False)
    if keep is None and w.shape[1] != in_features:
        keep = _pad_columns(torch.ones_like(weight, dtype=torch.bool), group_size, False)
    groups = w.shape[1] // group_size
    w = w.view(out_features, groups, group_size)
    keep = None if keep is None else keep.view(out_features, groups, group_size)
    scale, zero = _group_params(w, keep, bits, symmetric)
    codes = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, (1 << bits) - 1)
    if keep is not None:
        codes = codes.masked_fill(~keep, 0)
    codes = codes.view(out_features, -1)[:, :in_features].to(torch.uint8)
    return GroupQuantized(codes, scale.half(), zero.half())


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 weights from codes (out x in), per-group float16 scales/zero-points and the mask."""
    rows, in_features = codes.shape
    groups = scales.shape[1]
    # Broadcast one scale and zero-point over each group's columns instead of expanding them, and
    # compute q * s - z * s in one fused pass (exact in float32 for codes and zero-points below 2^12).
    grouped = _pad_columns(codes, group_size, 0).view(rows, groups, group_size).float()
    scale = scales.float().unsqueeze(-1)
    weight = torch.addcmul(-zeros.float().unsqueeze(-1) * scale, grouped, scale).view(rows, -1)
    weight = weight[:, :in_features] if weight.shape[1] != in_features else weight
    return weight if mask is None else weight * mask  # codes are finite: x * 0 is 0


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    mask: torch.Tensor | None = None,
    block_size: int = 128,
    damping: float = 0.01,
    symmetric: bool = False,
) -> GroupQuantized:
    """GPTQ group-wise quantization of `weight` given `hessian` = sum of x x^T over calibration
    inputs, on the symmetric grid if `symmetric`."""
    check_bits(bits)
    max_code = (1 << bits) - 1
    w = weight.float().clone()
    out_features, in_features = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # Pruned weights keep their values until their column is reached: zeroing them then is an
    # error like any other, compensated by the columns to their right.
    h_inv = _upper_cholesky_of_inverse(h, damping)

    codes = torch.empty(out_features, in_features, dtype=torch.uint8)
    groups = math.ceil(in_features / group_size)
    scales = torch.empty(out_features, groups)
    zeros = torch.empty(out_features, groups)
    # Blocks hold whole groups, so a group's range is always read from its current (updated) values.
    block = group_size * max(1, block_size // group_size)
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:
                span = slice(i, min(i + group_size, end - start))
                keep = None if mask is None else mask[:, column : column + group_size]
                scale, zero = _group_params(w_block[:, span], keep, bits, symmetric)
                scales[:, column // group_size], zeros[:, column // group_size] = scale, zero
            values = w_block[:, i]
            q = torch.clamp(torch.round(values / scale) + zero, 0, max_code)
            restored = (q - zero) * scale
            if mask is not None:  # pruned weights become exactly 0 and their error is spread too
                q = q.masked_fill(~mask[:, column], 0)
                restored = restored.masked_fill(~mask[:, column], 0.0)
            error = (values - restored) / h_block[i, i]
            w_block[:, i:] -= error.unsqueeze(1) * h_block[i, i:].unsqueeze(0)
            errors[:, i] = error
            codes[:, column] = q.to(torch.uint8)
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return GroupQuantized(codes, scales.half(), zeros.half())


def _upper_cholesky_of_inverse(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping * mean(diag H) * I)^-1, damping more if H is singular."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    mean_diag = torch.diag(hessian).mean()
    for attempt in range(6):
        damped = hessian + (damping * 10**attempt) * mean_diag * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    raise ValueError("The calibration Hessian is not positive definite even with strong damping; use more data.")


@dataclass(frozen=True)
class Quantizer:
    """A rounding rule LUC can use (`CompressionMethod.quant_method` names it): `quantize(weight,
    bits, group_size, mask, symmetric, hessian)` gives the codes; `needs_hessian` says it reads the
    calibration inputs' Hessian (then `hessian` is never None)."""

    name: str
    quantize: Callable[[torch.Tensor, int, int, torch.Tensor | None, bool, torch.Tensor | None], GroupQuantized]
    needs_hessian: bool = False


QUANTIZERS: Registry[Quantizer] = Registry("quantizer")


def _rtn(weight, bits, group_size, mask, symmetric, hessian) -> GroupQuantized:
    return quantize_rtn(weight, bits, group_size, mask, symmetric)


def _gptq(weight, bits, group_size, mask, symmetric, hessian) -> GroupQuantized:
    return quantize_gptq(weight, hessian, bits, group_size, mask, symmetric=symmetric)


QUANTIZERS.register(Quantizer("rtn", _rtn))
QUANTIZERS.register(Quantizer("gptq", _gptq, needs_hessian=True))
