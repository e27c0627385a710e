"""`LUCLinear`: a Linear layer stored the way LUC compressed it.

Stored tensors (the state-dict keys of the module):

- `weight`: the kept weights only, as one flat uint8 tensor of packed `bits`-bit codes (row by
  row, every row keeps the same number of weights), or as flat float16 values for `bits=16`.
  It is 1-D on purpose: loaded into a float `nn.Linear` (a process that has not imported
  edge_llm), it fails with a size mismatch instead of silently producing garbage.
- `weight_scales`, `weight_zeros`: float16, one per (row, group of `group_size` input columns).
- `weight_mask`: which weights were kept, one bit each, packed (absent when nothing was pruned).
- `bias`: unchanged.

How it computes (see `kernels.py`): calls of up to `kernel_max_rows` rows (decoding, a short
prefill) go through PyTorch's fused int4 kernel on the stored codes, in bfloat16 with the result
in the input's dtype; its layout is built from the stored codes on the first call on a device and
kept. Larger calls (training batches) dequantize the weight block by block and multiply densely,
in bfloat16 where the device is faster at it; pruned layers keep mask-free expanded codes for
that (`expanded_codes`). Under autograd the dense weight is not kept for the backward pass but
dequantized again, so a compressed, frozen layer costs no weight-sized memory in training.
`use_kernel = False` selects the reference path: dequantize into the input's dtype at every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edge_llm.luc.blocks import CodeBlocks, code_blocks
from edge_llm.luc.kernels import (
    Int4Weight,
    dense_compute_dtype,
    int4_available,
    int4_fits,
    int4_matmul,
    kernel_max_rows,
    planes_for,
    shifted_codes,
    to_int4,
)
from edge_llm.luc.pack import pack_bits, packed_size, unpack_bits
from edge_llm.luc.quantize import GroupQuantized, check_bits, dequantize, quantize_rtn

UNQUANTIZED_BITS = 16
# Weights the dense path dequantizes at a time (see `LUCLinear.dense_weight`).
DEQUANTIZE_BLOCK = 2**18


def kept_per_row(in_features: int, sparsity: float) -> int:
    return in_features - round(sparsity * in_features)


class CompressedMatmul(torch.autograd.Function):
    """x @ W^T for a frozen compressed W that is dequantized again in backward instead of saved.

    `layer` is any compressed layer with `matmul(x)` (x @ W^T) and `input_grad(g)` (g @ W)
    (`LUCLinear`, `GGMLLinear`): autograd would otherwise keep every decoded weight of the step
    alive until backward, which is the float model's memory again."""

    # Backward never reads the output, so a loss may overwrite it with its gradient in place
    # (`edge_llm.tuner.loss`): an LM head's logits need one vocabulary-wide buffer, not two.
    output_saved = False

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return ctx.layer.input_grad(grad_output), None


class LUCLinear(nn.Module):
    """A compressed Linear: `bits`-bit group-wise quantized and `sparsity`-pruned weights.

    `use_kernel` (class or instance attribute): compute through the fused int4 kernel and in
    bfloat16 where that is faster (default); `False` always dequantizes into the input's dtype
    (the reference path).
    """

    use_kernel: bool = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        sparsity: float,
        group_size: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits != UNQUANTIZED_BITS:
            check_bits(bits)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.sparsity, self.group_size = bits, float(sparsity), group_size
        self.compute_dtype = dtype
        kept = out_features * kept_per_row(in_features, sparsity)
        if bits == UNQUANTIZED_BITS:
            self.register_buffer("weight", torch.empty(kept, dtype=torch.float16, device=device))
        else:
            groups = -(-in_features // group_size)
            self.register_buffer("weight", torch.empty(packed_size(kept, bits), dtype=torch.uint8, device=device))
            self.register_buffer("weight_scales", torch.empty(out_features, groups, dtype=torch.float16, device=device))
            self.register_buffer("weight_zeros", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        if sparsity > 0:
            mask_bytes = packed_size(out_features * in_features, 1)
            self.register_buffer("weight_mask", torch.empty(mask_bytes, dtype=torch.uint8, device=device))
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        # (key of the stored tensors they were built from, value): see `int4_weight`, `expanded_codes`.
        self._int4: tuple[tuple, Int4Weight | None] | None = None
        self._expanded: tuple[tuple, tuple[torch.Tensor, torch.Tensor] | None] | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int,
        sparsity: float,
        group_size: int,
        quantized: GroupQuantized | None = None,
        mask: torch.Tensor | None = None,
    ) -> LUCLinear:
        """Compress `linear`: `quantized` holds its codes (or None for `bits=16`), `mask` the kept weights."""
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            bits,
            sparsity,
            group_size,
            bias=linear.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        keep = mask if mask is not None else torch.ones_like(weight, dtype=torch.bool)
        if mask is not None and (mask.sum(dim=1) != kept_per_row(linear.in_features, sparsity)).any():
            raise ValueError("Every row of a pruning mask must keep in_features * (1 - sparsity) weights.")
        if bits == UNQUANTIZED_BITS:
            layer.weight.copy_(weight[keep].to(torch.float16))
        else:
            layer.weight.copy_(pack_bits(quantized.codes[keep.cpu()].to(weight.device), bits))
            layer.weight_scales.copy_(quantized.scales)
            layer.weight_zeros.copy_(quantized.zeros)
        if mask is not None:
            layer.weight_mask.copy_(pack_bits(mask.to(torch.uint8), 1))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def _row_range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.out_features if stop is None else stop
        # Rows from a multiple of 8 start on a whole byte of every packed tensor.
        if start % 8 or not 0 <= start < stop <= self.out_features:
            raise ValueError(f"Rows {start}:{stop} of {self.out_features}: the start must be a multiple of 8.")
        return start, stop

    def mask(self, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        """The kept-weight mask of rows `start:stop` (bool), or None when nothing was pruned."""
        if self.sparsity == 0:
            return None
        start, stop = self._row_range(start, stop)
        columns = self.in_features
        packed = self.weight_mask[start * columns // 8 :]
        return unpack_bits(packed, 1, (stop - start) * columns).view(stop - start, columns).bool()

    def dequantize_weight(
        self, dtype: torch.dtype | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """The dense weight this layer computes with (rows `start:stop` of out x in)."""
        dtype = dtype or self.compute_dtype
        start, stop = self._row_range(start, stop)
        mask = self.mask(start, stop)
        if self.bits == UNQUANTIZED_BITS:
            kept = kept_per_row(self.in_features, self.sparsity)
            values = self.weight[start * kept : stop * kept].to(dtype)
            if mask is None:
                return values.view(stop - start, self.in_features)
            return torch.zeros(mask.shape, dtype=dtype, device=values.device).masked_scatter_(mask, values)
        codes = self.codes(mask, start, stop)
        scales, zeros = self.weight_scales[start:stop], self.weight_zeros[start:stop]
        return dequantize(codes, scales, zeros, self.group_size, mask).to(dtype)

    def codes(self, mask: torch.Tensor | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The quantization codes of rows `start:stop` as a dense uint8 tensor, 0 where pruned.

        `mask`: this layer's `mask(start, stop)`, when the caller already has it.
        """
        if self.bits == UNQUANTIZED_BITS:
            raise ValueError("This layer is not quantized (bits=16): it has no codes.")
        start, stop = self._row_range(start, stop)
        rows, columns = stop - start, self.in_features
        mask = self.mask(start, stop) if mask is None else mask
        kept = kept_per_row(columns, self.sparsity)
        codes = unpack_bits(self.weight[start * kept * self.bits // 8 :], self.bits, rows * kept)
        if mask is None:
            return codes.view(rows, columns)
        return torch.zeros(rows, columns, dtype=torch.uint8, device=codes.device).masked_scatter_(mask, codes)

    def int4_weight(self) -> Int4Weight | None:
        """This layer in the int4 kernel's layout, or None where the kernel does not fit it.

        Built from the stored codes on first use and kept; rebuilt when the stored tensors change
        (loading a state dict, moving to another device, an in-place write such as
        `layer.weight_scales.mul_(2)` under `torch.no_grad()`). A write through `.data` is the one
        change it cannot see: PyTorch gives `.data` its own version counter, so such writes are
        invisible by design, and only a full read of the weights per call could catch them."""
        if not (
            self.use_kernel
            and self.bits != UNQUANTIZED_BITS
            and int4_fits(self.bits, self.group_size, self.in_features, self.out_features)
            and int4_available(self.weight.device)
        ):
            return None
        return self._cached("_int4", self.int4_layout)

    def int4_layout(self) -> Int4Weight | None:
        """This layer's stored codes in the int4 kernel's layout, built now (`int4_weight` keeps
        it); None where a pruned group's zero-point has no code."""
        return to_int4(self.code_blocks(self.group_size), self.bits)

    def code_blocks(self, block: int) -> CodeBlocks:
        """This layer's codes as blocks of `block` columns, pruned weights on their zero-points
        (`blocks.code_blocks`); for quantized layers only."""
        mask = self.mask()
        return code_blocks(self.codes(mask), self.weight_scales, self.weight_zeros, mask, self.group_size, block)

    def expanded_codes(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A pruned layer's codes as a dense uint8 matrix in which every pruned weight holds its
        group's zero-point (shifted by a whole number per group into [0, 255]), and those
        zero-points (out x groups, float32): dequantizing them needs no mask.

        Built on the first dense-path call and kept: one byte per weight, for pruned layers only,
        because expanding kept weights through their mask is a serial scatter slower than the
        matmul it feeds. None for other layers, and where a group's zero-point has no such code
        (such a layer has no int4 layout either, and scatters through its mask)."""
        if not (self.use_kernel and self.sparsity > 0 and self.bits != UNQUANTIZED_BITS):
            return None
        return self._cached("_expanded", self._build_expanded)

    def _build_expanded(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.in_features % self.group_size:
            return None
        blocks = self.code_blocks(self.group_size)
        shifted = shifted_codes(blocks, self.bits, 256)
        if shifted is None:
            return None
        codes, shift = shifted
        return codes.to(torch.uint8), blocks.zeros + shift

    def _cached(self, attribute: str, build: Callable[[], Any]) -> Any:
        """`build()`, kept in `attribute` until the stored tensors change (a state dict loaded, the
        layer moved to another device): their identity and version are the cache key."""
        key = tuple((t.data_ptr(), t._version, t.device) for _, t in self.named_buffers(recurse=False))
        cached = getattr(self, attribute)
        if cached is None or cached[0] != key:
            cached = (key, build())
            setattr(self, attribute, cached)
        return cached[1]

    def dense_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the dequantize path multiplies `x` in (unquantized layers keep full precision)."""
        return dense_compute_dtype(x) if self.use_kernel and self.bits != UNQUANTIZED_BITS else x.dtype

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W^T` without the bias: the int4 kernel for up to `kernel_max_rows` rows per 4-bit
        plane, else dequantize + matmul."""
        rows = x.numel() // self.in_features
        limit = kernel_max_rows(x.device)
        # `planes_for` is the fewest planes a layout of these bits has: a call too large for it
        # never builds one (a layer used only for training keeps no layout).
        if self.bits != UNQUANTIZED_BITS and rows * planes_for(self.bits) <= limit:
            packed = self.int4_weight()
            if packed is not None and rows * packed.planes <= limit:
                return int4_matmul(x, packed)
        dtype = self.dense_dtype(x)
        return nn.functional.linear(x.to(dtype), self.dense_weight(dtype)).to(x.dtype)

    def input_grad(self, grad_output: torch.Tensor) -> torch.Tensor:
        """`grad_output @ W`: the gradient of the input, the weight dequantized again."""
        dtype = self.dense_dtype(grad_output)
        return (grad_output.to(dtype) @ self.dense_weight(dtype)).to(grad_output.dtype)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in `dtype` for the dense path, expanded `DEQUANTIZE_BLOCK` weights
        at a time: a whole large weight expanded at once leaves the caches (4x slower per weight at
        a ~1B model's shapes), while one matmul over the whole weight keeps the matmul efficient."""
        expanded = self.expanded_codes()

        def rows_of(start: int, stop: int) -> torch.Tensor:  # float32, mask-free where possible
            if expanded is None:
                return self.dequantize_weight(torch.float32, start, stop)
            codes, zeros = expanded
            return dequantize(codes[start:stop], self.weight_scales[start:stop], zeros[start:stop], self.group_size)

        rows = max(8, DEQUANTIZE_BLOCK // self.in_features // 8 * 8)
        if rows >= self.out_features:
            return rows_of(0, self.out_features).to(dtype)
        weight = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.weight.device)
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            weight[start:stop] = rows_of(start, stop)  # one rounding to dtype
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autograd the weight is not saved for backward but dequantized again there.
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        out = CompressedMatmul.apply(x, self) if needs_grad else self.matmul(x)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Store a dense weight (out x in) in this layer's format, in place (a merged LoRA update):
        its bits, groups, pruning mask and grid (symmetric when every zero-point is the middle
        code, as symmetric quantization stores them), rounded to nearest."""
        mask = self.mask()
        keep = mask if mask is not None else torch.ones_like(weight, dtype=torch.bool)
        if self.bits == UNQUANTIZED_BITS:
            self.weight.copy_(weight[keep].to(torch.float16))
            return
        symmetric = bool((self.weight_zeros == 1 << (self.bits - 1)).all())
        quantized = quantize_rtn(weight, self.bits, self.group_size, mask, symmetric)
        self.weight.copy_(pack_bits(quantized.codes[keep], self.bits))
        self.weight_scales.copy_(quantized.scales)
        self.weight_zeros.copy_(quantized.zeros)

    def storage_bytes(self) -> int:
        """Bytes of the stored compressed weight (codes, scales, zero-points, mask), bias excluded."""
        return sum(t.numel() * t.element_size() for name, t in self.named_buffers(recurse=False))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"sparsity={self.sparsity}, group_size={self.group_size}, bias={self.bias is not None}"
        )
