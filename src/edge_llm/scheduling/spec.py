"""`LayerSpec`: what the cost model and the kernels know about one decoder layer (its own module,
so that the kernels' fit and storage rules and the cost model both read it without importing each
other)."""

from __future__ import annotations

from dataclasses import dataclass

from edge_llm.luc.policy import linear_storage_bytes


@dataclass(frozen=True)
class LayerSpec:
    """What the cost model needs to know about one decoder layer."""

    index: int
    linears: tuple[tuple[int, int], ...]  # (out_features, in_features) of each compressed Linear
    bits: int
    sparsity: float
    structure: str
    group_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    luc: bool = True  # stored as LUC stores layers (what the runtime can stream), or plain float
    # The layer's bytes where it holds llama.cpp blocks (a model compressed for llama.cpp): what it
    # stores is then known exactly, not derived from `bits`.
    stored_bytes: int | None = None

    @property
    def params(self) -> int:
        return sum(o * i for o, i in self.linears)

    def packed_bytes(self) -> int:
        """Storage of the layer's weights as LUC stores them (what streaming reads)."""
        if self.stored_bytes is not None:
            return self.stored_bytes
        return sum(linear_storage_bytes(o, i, self.bits, self.sparsity, self.group_size) for o, i in self.linears)
