"""LUC's codes as a runtime's blocks: the one place that lays a compressed layer out as blocks of
`block` input columns, each with its scale and zero-point, and puts every pruned weight on its
block's zero-point, so that `(code - zero) * scale` is the layer's weight — its pruned zeros
included — with no mask.

The int4 kernel (`kernels.py`), the GGUF writer and the ExecuTorch lowering all read a layer this
way; each then asks what its own format can hold: `pruned_on_grid(levels)`, whether a block's
pruned weights have a code among the format's `levels` (a group whose kept weights all share one
sign has its zero-point outside its codes, and then its pruned weights have none).

It works on tensors, not on `LUCLinear` (which builds its kernel layout from it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CodeBlocks:
    """A layer's codes in blocks: `codes` (rows x columns, int32, pruned weights at their block's
    zero-point), `scales` and `zeros` (rows x blocks, float32; zero-points are whole numbers) and
    `pruned` (rows x blocks, bool: the block holds a pruned weight)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    pruned: torch.Tensor

    @property
    def block(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def pruned_on_grid(self, levels: int, shift: torch.Tensor | float = 0.0) -> torch.Tensor:
        """(rows x blocks) bool: the block's zero-point, moved up by `shift` codes, is a code in
        [0, levels) or the block has no pruned weight to put on it."""
        zero = self.zeros + shift
        return ~self.pruned | ((zero >= 0) & (zero < levels))


def code_blocks(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    mask: torch.Tensor | None,
    group_size: int,
    block: int,
) -> CodeBlocks:
    """LUC's dense codes (rows x columns), float16 scales and zero-points (rows x groups) and kept-
    weight mask (None: nothing pruned) as blocks of `block` columns, a divisor of `group_size`
    and of the row length: the blocks of one group share its scale and zero-point."""
    rows, columns = codes.shape
    if group_size % block or columns % block:
        raise ValueError(f"Blocks of {block} columns must divide the group size {group_size} and the row {columns}.")
    blocks, per_group = columns // block, group_size // block
    scales = scales.float().repeat_interleave(per_group, dim=1)[:, :blocks]
    zeros = zeros.float().repeat_interleave(per_group, dim=1)[:, :blocks]
    codes = codes.to(torch.int32)
    if mask is None:
        return CodeBlocks(codes, scales, zeros, torch.zeros(rows, blocks, dtype=torch.bool, device=codes.device))
    codes = torch.where(mask, codes, zeros.to(torch.int32).repeat_interleave(block, dim=1))
    return CodeBlocks(codes, scales, zeros, (~mask).view(rows, blocks, block).any(dim=-1))
