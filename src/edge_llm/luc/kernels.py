"""How a `LUCLinear` computes: PyTorch's fused int4 matmul on LUC's codes, or dequantize + matmul.

**The int4 kernel.** PyTorch ships an int4 "tinygemm" matmul (`aten._weight_int4pack_mm` on CUDA,
`aten._weight_int4pack_mm_for_cpu` on CPUs): 4-bit codes with one bfloat16 scale `s` and offset
`m` per (group of input columns, output row), computing `(q - 8) * s + m` in bfloat16. LUC stores
`(q - z) * s` with an integer zero-point `z` per group, which is the same weight with
`m = (8 - z) * s`. Every LUC layer enters the kernel with its codes unchanged (nothing is
re-rounded; only scales, offsets and activations are rounded to bfloat16):

- codes of at most 4 bits are 4-bit codes that use fewer values. They are shifted up by a whole
  number per group, `(q + c) - (z + c)`, so that `z + c` sits near 8 and the offset near 0, where
  its bfloat16 rounding costs least.
- codes of 5 to 8 bits are split into two 4-bit planes, `q = 16 h + l`: the kernel runs once over
  an inner dimension twice as long, `[x, x] @ [16 s (h - 8) | s (l - 8)]^T`, plus the offset
  `(136 - z) s`, which is split over the two planes as a bfloat16 pair (16 significant bits).
- a pruned weight takes the code `z + c`, which is weight exactly 0. This needs `z + c` inside
  the code range, true for every group whose kept weights do not all share one sign; a layer
  with such a group cannot use the kernel.

The kernel reads the weight once per call instead of expanding it to a dense float matrix first,
which is what makes compressed layers faster than dense ones at decoding. It is built for few
rows: above `kernel_max_rows` rows a call (prefill, training) the weight is dequantized and
multiplied densely — in bfloat16 where the device multiplies bfloat16 faster than float32
(CUDA GPUs, CPUs with AVX-512 BF16 or AMX), which is the compute dtype QLoRA uses too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from edge_llm.luc.blocks import CodeBlocks

# Group sizes the int4 kernels are built for.
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_BITS = 4
MAX_KERNEL_BITS = 2 * INT4_BITS  # two 4-bit planes
# Rows per call (times the layer's planes) up to which the int4 kernel beats dequantize + dense
# matmul. On an H200 tinygemm is 1.5x faster than the dequantize path at 256 rows and takes 2.4x
# its time at 2,048; on a 2-core AVX-512 BF16 CPU a 256-token prefill is faster through it than
# through dequantize + bfloat16 matmul for a whole model, while a 1,024-row training batch is not
# (see docs/results.md and benchmarks/luc_kernels.py).
KERNEL_MAX_ROWS = {"cuda": 256, "cpu": 256}


@dataclass(frozen=True)
class Int4Weight:
    """A weight in the int4 kernel's layout (built once per layer and device, see `LUCLinear`).

    `planes`: 1 for codes of at most 4 bits, 2 for 5 to 8 bits (the kernel's inner dimension is
    `planes * in_features`)."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # (planes * groups, out_features, 2), bfloat16
    group_size: int
    out_features: int
    planes: int = 1


def planes_for(bits: int) -> int:
    """4-bit planes the int4 kernel needs for codes of `bits` bits."""
    return 1 if bits <= INT4_BITS else 2


def int4_available(device: torch.device) -> bool:
    """Whether this PyTorch build has the int4 kernel for `device`."""
    name = "_weight_int4pack_mm" if device.type == "cuda" else "_weight_int4pack_mm_for_cpu"
    return device.type in ("cpu", "cuda") and hasattr(torch.ops.aten, name)


def int4_fits(bits: int, group_size: int, in_features: int, out_features: int) -> bool:
    """Whether a LUC layer of this shape and setting has the int4 kernel's layout.

    Pruned layers fit too, unless a group's kept weights all share one sign (see the module
    docstring): `to_int4` is the final word."""
    return (
        bits <= MAX_KERNEL_BITS
        and group_size in INT4_GROUP_SIZES
        and in_features % group_size == 0
        and in_features % 32 == 0
        and out_features % 8 == 0
    )


def kernel_max_rows(device: torch.device) -> int:
    return KERNEL_MAX_ROWS.get(device.type, 0)


@functools.cache
def _fast_bfloat16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def dense_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a compressed layer's dense matmul runs in for input `x`: half-precision inputs keep
    their dtype; float32 inputs run in bfloat16 where the device is faster at it."""
    if x.dtype in (torch.float16, torch.bfloat16) or not _fast_bfloat16(x.device.type):
        return x.dtype
    return torch.bfloat16


def _inner_k_tiles(in_features: int) -> int:
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


def _center(levels: int) -> int:
    """The code the kernel reads as weight 0 before offsets: 8 for one plane, 136 = 16*8 + 8 for two."""
    return 8 * (levels - 1) // 15


def shifted_codes(blocks: CodeBlocks, bits: int, levels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`blocks`' codes (one block per group) in [0, levels) with each group's zero-point moved near
    the middle, pruned weights on it; and the shift per group. None when a pruned weight cannot be 0."""
    shift = (_center(levels) - blocks.zeros).round().clamp(0, levels - (1 << bits))
    if not blocks.pruned_on_grid(levels, shift).all():
        return None
    return blocks.codes + shift.to(torch.int32).repeat_interleave(blocks.block, dim=1), shift


def _pack(codes: torch.Tensor) -> torch.Tensor:
    tiles = _inner_k_tiles(codes.shape[1])
    if codes.is_cuda:
        nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(nibbles, tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, tiles)


def to_int4(blocks: CodeBlocks, bits: int) -> Int4Weight | None:
    """Build the kernel layout from a layer's `bits`-bit codes in blocks of its group size.

    None when a pruned weight cannot be represented (see the module docstring); a layer of at
    most 4 bits whose pruned weights do not fit one plane gets two."""
    zeros32, group_size = blocks.zeros, blocks.block
    scale = blocks.scales.to(torch.bfloat16).float()  # what the kernel multiplies with
    planes = planes_for(bits)
    shifted = shifted_codes(blocks, bits, 16**planes)
    if shifted is None and planes == 1:
        planes = 2
        shifted = shifted_codes(blocks, bits, 256)
    if shifted is None:
        return None
    codes, shift = shifted
    # (q - z) * s = (q' - center) * s + offset with q' = q + shift; the offset is an integer
    # multiple of the bfloat16 scale, exact in float32.
    offset = (_center(16**planes) - zeros32 - shift) * scale
    if planes == 1:
        scales_and_zeros = torch.stack([scale, offset], dim=-1)
    else:
        high = offset.to(torch.bfloat16).float()
        scales_and_zeros = torch.cat(
            [torch.stack([16 * scale, high], dim=-1), torch.stack([scale, offset - high], dim=-1)], dim=1
        )
        codes = torch.cat([codes >> 4, codes & 15], dim=1)
    scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)
    return Int4Weight(_pack(codes), scales_and_zeros, group_size, codes.shape[0], planes)


def int4_matmul(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """`x @ W^T` for `W` in the int4 layout; bfloat16 inside, `x`'s dtype out."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()  # the kernels take row-major A only
    if weight.planes == 2:
        flat = torch.cat([flat, flat], dim=1)
    if flat.is_cuda:
        out = torch.ops.aten._weight_int4pack_mm(flat, weight.packed, weight.group_size, weight.scales_and_zeros)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, weight.packed, weight.group_size, weight.scales_and_zeros
        )
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)
