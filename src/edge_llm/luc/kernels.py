"""Fused low-bit matmul for `LUCLinear`: LUC's codes in the layout of PyTorch's int4 kernel.

PyTorch ships an int4 "tinygemm" matmul (`aten._weight_int4pack_mm` on CUDA,
`aten._weight_int4pack_mm_for_cpu` on CPUs): 4-bit codes with one bfloat16 scale `s` and offset
`m` per (group of input columns, output row), computing with `(q - 8) * s + m`, in bfloat16. LUC
stores `(q - z) * s` with an integer zero-point `z` per group, which is the same weight with
`m = (8 - z) * s`; 2- and 3-bit codes are 4-bit codes that use fewer values. So every LUC layer of
at most 4 bits enters the kernel with its codes unchanged (nothing is re-rounded); only scale and
offset are rounded to bfloat16, and activations run in bfloat16. Codes of fewer than 4 bits are
shifted up by a whole number per group, `(q + c) - (z + c)`, so that `z + c` sits near 8 and the
offset `m` near 0, where its bfloat16 rounding costs least.

The kernel reads the weight once per call instead of expanding it to a dense float matrix first,
which is what makes compressed layers faster than dense ones at decoding. Layers it does not fit
(more than 4 bits, pruned layers, group sizes it has no tiles for) and calls with more than
`INT4_MAX_ROWS` rows keep LUC's dequantize-then-matmul path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Group sizes the int4 kernels are built for.
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_MAX_BITS = 4
# The int4 kernels are built for few rows (decoding, small batches). With more rows, expanding the
# weight once and running the dense matmul is faster (on an H200, tinygemm takes 2.4x the dequantize
# path at 2,048 rows and is 1.5x faster at 256; see docs/results.md).
INT4_MAX_ROWS = 256


@dataclass(frozen=True)
class Int4Weight:
    """A weight in the int4 kernel's layout (built once per layer and device, see `LUCLinear`)."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # (groups, out_features, 2), bfloat16
    group_size: int
    out_features: int


def int4_available(device: torch.device) -> bool:
    """Whether this PyTorch build has the int4 kernel for `device`."""
    name = "_weight_int4pack_mm" if device.type == "cuda" else "_weight_int4pack_mm_for_cpu"
    return device.type in ("cpu", "cuda") and hasattr(torch.ops.aten, name)


def int4_fits(bits: int, sparsity: float, group_size: int, in_features: int, out_features: int) -> bool:
    """Whether a LUC layer of this shape and setting can run through the int4 kernel."""
    return (
        bits <= INT4_MAX_BITS
        and sparsity == 0  # pruned weights are code 0, which is not weight 0 unless z == 0
        and group_size in INT4_GROUP_SIZES
        and in_features % group_size == 0
        and in_features % 32 == 0
        and out_features % 8 == 0
    )


def _inner_k_tiles(in_features: int) -> int:
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


def to_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int) -> Int4Weight:
    """Build the kernel layout from LUC's dense `bits`-bit codes (out x in), float16 scales and
    integer zero-points (out x groups)."""
    scales32 = scales.float()
    shift = (8 - zeros.float()).round().clamp(0, (1 << INT4_MAX_BITS) - (1 << bits))
    codes = codes.to(torch.int32) + shift.to(torch.int32).repeat_interleave(group_size, dim=1)
    offsets = (8 - zeros.float() - shift) * scales32
    scales_and_zeros = torch.stack([scales32, offsets], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    tiles = _inner_k_tiles(codes.shape[1])
    if codes.is_cuda:
        nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, tiles)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, tiles)
    return Int4Weight(packed, scales_and_zeros, group_size, codes.shape[0])


def int4_matmul(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """`x @ W^T` for `W` in the int4 layout; bfloat16 inside, `x`'s dtype out."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if flat.is_cuda:
        out = torch.ops.aten._weight_int4pack_mm(flat, weight.packed, weight.group_size, weight.scales_and_zeros)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, weight.packed, weight.group_size, weight.scales_and_zeros
        )
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)
