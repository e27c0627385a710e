"""Layers that hold a weight as llama.cpp blocks (`ggml.BLOCK_TYPES`) and compute with exactly the
weights llama.cpp computes with.

`GGMLLinear` and `GGMLEmbedding` keep the blocks as their state (`weight`: uint8, rows x row
bytes; the type's name in `weight_type`); an LM head tied to the embedding is a `GGMLLinear` over
the same blocks tensor. `write_gguf` writes the blocks unchanged.

A layer keeps only its blocks, as QLoRA keeps only the 4-bit base: the float weight is decoded at
each call (ggml's own decoder, float32: the values are exact; about a millisecond for a 576 x 1536
Q4_K weight on one core) and, under autograd, decoded again in backward instead of being saved, so
training over these layers holds the blocks plus one layer's decoded weight at a time. llama.cpp's
matmul quantizes activations to 8 bits on the fly, which PyTorch does not copy, so the agreement
is in the weights, not in every rounding of the product.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edge_llm.luc.ggml import BlockType, block_type, dequantize, quantize
from edge_llm.luc.linear import CompressedMatmul

# Weights decoded at a time by a product (8 MiB in float32); SmolLM2's decoder weights are one block.
DECODE_BLOCK = 2**21


def _decoded(blocks: torch.Tensor, kind: BlockType, columns: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(dequantize(blocks.cpu(), kind, columns)).to(device=blocks.device, dtype=dtype)


class GGMLLinear(nn.Module):
    """A frozen Linear whose weight is stored in a llama.cpp block type."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_type: str,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        kind = block_type(weight_type)
        if not kind.fits(in_features):
            raise ValueError(f"{weight_type} holds rows of a multiple of {kind.block} weights, not {in_features}.")
        self.in_features, self.out_features, self.weight_type = in_features, out_features, weight_type
        row_bytes = kind.row_bytes(in_features)
        self.register_buffer("weight", torch.empty(out_features, row_bytes, dtype=torch.uint8, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_blocks(cls, linear: nn.Linear, weight_type: str, blocks: np.ndarray) -> GGMLLinear:
        layer = cls(
            linear.in_features,
            linear.out_features,
            weight_type,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        layer.weight.copy_(torch.from_numpy(blocks))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @classmethod
    def tied_to(cls, embedding: GGMLEmbedding, bias: nn.Parameter | None = None) -> GGMLLinear:
        """An LM head tied to `embedding`: the same blocks tensor, read as (vocab x hidden) weights."""
        layer = cls(embedding.embedding_dim, 1, embedding.weight_type, device="meta")
        layer.out_features = embedding.num_embeddings
        layer.weight = embedding.weight  # the very tensor: tied, as transformers ties the Parameter
        layer.bias = bias
        return layer

    @property
    def kind(self) -> BlockType:
        return block_type(self.weight_type)

    def dense_weight(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The decoded weight (rows `start:stop` of out x in) in `dtype`, decoded afresh from the blocks."""
        return _decoded(self.weight[start:stop], self.kind, self.in_features, dtype)

    def _row_blocks(self) -> range:
        """Row starts of the blocks of at most `DECODE_BLOCK` weights the products decode one at a
        time: a large weight (a 49152 x 576 LM head) never exists decoded as a whole."""
        return range(0, self.out_features, max(1, DECODE_BLOCK // self.in_features))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W^T` without the bias (in the input's dtype: float32 keeps llama.cpp's weights exact)."""
        starts = self._row_blocks()
        if len(starts) == 1:
            return nn.functional.linear(x, self.dense_weight(x.dtype))
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in starts:
            stop = start + starts.step
            out[..., start:stop] = nn.functional.linear(x, self.dense_weight(x.dtype, start, stop))
        return out

    def input_grad(self, grad_output: torch.Tensor) -> torch.Tensor:
        """`grad_output @ W`, the weight decoded again block by block."""
        starts = self._row_blocks()
        grad = None
        for start in starts:
            stop = start + starts.step
            part = grad_output[..., start:stop] @ self.dense_weight(grad_output.dtype, start, stop)
            grad = part if grad is None else grad.add_(part)
        return grad

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Store a dense weight (out x in) in this layer's block type, in place (a merged LoRA
        update): ggml's quantizer, without the importance matrix the policy's codes were rounded with."""
        self.weight.copy_(torch.from_numpy(quantize(weight.detach().float().cpu().numpy(), self.kind)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        out = CompressedMatmul.apply(x, self) if needs_grad else self.matmul(x)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight_type={self.weight_type}"


class GGMLEmbedding(nn.Module):
    """A token embedding table stored in a llama.cpp block type (`weight`: uint8, one row of blocks
    per token); a lookup decodes only the rows it reads, into `output_dtype`.

    A head tied to the table (SmolLM2's) becomes a `GGMLLinear` over the same blocks tensor
    (`GGMLLinear.tied_to`): the table is stored once, in its type, as llama.cpp stores it."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        weight_type: str,
        output_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        kind = block_type(weight_type)
        if not kind.fits(embedding_dim):
            raise ValueError(f"{weight_type} holds rows of a multiple of {kind.block} weights, not {embedding_dim}.")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight_type, self.output_dtype = weight_type, output_dtype
        shape = (num_embeddings, kind.row_bytes(embedding_dim))
        self.register_buffer("weight", torch.empty(shape, dtype=torch.uint8, device=device))

    @classmethod
    def from_blocks(cls, embedding: nn.Embedding, weight_type: str, blocks: np.ndarray) -> GGMLEmbedding:
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            weight_type,
            output_dtype=embedding.weight.dtype,
            device=embedding.weight.device,
        )
        layer.weight.copy_(torch.from_numpy(blocks))
        return layer

    @property
    def kind(self) -> BlockType:
        return block_type(self.weight_type)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole table as floats (vocabulary x dimension), as a lookup decodes its rows."""
        return _decoded(self.weight, self.kind, self.embedding_dim, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.index_select(0, input_ids.reshape(-1))
        values = _decoded(rows, self.kind, self.embedding_dim, self.output_dtype)
        return values.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight_type={self.weight_type}"
