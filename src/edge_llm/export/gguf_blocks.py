"""The data of one GGUF tensor: the type a LUC bit-width gets (`gguf_type_for_bits`), LUC's own
codes packed unchanged into Q4_1/Q5_1 blocks (`luc_blocks`, `pack_q4_1`, `pack_q5_1`), any other
weight quantized (`quantize_tensor`: gguf-py, or llama.cpp's quantizer for the K-quants), and the
row order of the rotary projections in llama.cpp (`permute_rotary`, `unpermute_rotary`).

The writer (`gguf.py`) decides per layer which of these a tensor gets; the loader
(`gguf_load.py`) undoes the row order.
"""

from __future__ import annotations

import numpy as np
import torch

from edge_llm.luc.ggml import block_type, quantize
from edge_llm.luc.linear import UNQUANTIZED_BITS, LUCLinear


def gguf_type_for_bits(
    bits: int, row_length: int | None = None, k_quants: bool = False
):  # -> gguf.GGMLQuantizationType
    """The GGUF type of a LUC bit-width; rows that do not fill its blocks fall back to the next
    type that fits (K-quants need multiples of 256, the others of 32), as llama.cpp's converter does.

    2- and 3-bit layers go to Q4_1, which holds their codes exactly, unless `k_quants=True` asks for
    the smaller Q2_K / Q3_K (2.6 / 3.4 bits per weight instead of 5), into which they must be
    re-quantized."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if bits == UNQUANTIZED_BITS:
        return T.F16
    low_bit = {2: T.Q2_K, 3: T.Q3_K} if k_quants else {2: T.Q4_1, 3: T.Q4_1}
    preferred = {**low_bit, 4: T.Q4_1, 5: T.Q5_1}.get(bits, T.Q8_0)
    for qtype in (preferred, T.Q4_1 if bits <= 4 else T.Q5_1, T.Q8_0, T.F16):
        if row_length is None or row_length % GGML_QUANT_SIZES[qtype][0] == 0:
            return qtype
    return T.F16


def quantize_tensor(values: np.ndarray, qtype) -> np.ndarray:
    """Quantize a 2-D float32 array (rows of a multiple of the block size) to GGUF bytes: F16 and
    the 32-blocks by gguf-py, the K-quants by llama.cpp's own quantizer (`luc.ggml.quantize`, the
    scale and min search `llama-quantize` runs; needs llama-cpp-python)."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16)
    if qtype in (gguf.GGMLQuantizationType.Q2_K, gguf.GGMLQuantizationType.Q3_K):
        return quantize(values.astype(np.float32), block_type(qtype.name))
    return gguf.quants.quantize(values.astype(np.float32), qtype)


GGUF_BLOCK = 32  # Q4_1 / Q5_1 block length


def luc_blocks(layer: LUCLinear, type_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """`layer`'s own codes as Q4_1/Q5_1 blocks (`type_bits` 4 or 5), with nothing re-quantized.

    Both formats compute `d * q + m` per block of 32; LUC computes `(q - zero) * scale` per group, so
    `d = scale`, `m = -zero * scale` (float16-rounded) and `q` = LUC's code hold the same weights.
    Returns (d, m) as float16 (rows x blocks) and q as uint8 (rows x columns), or None where that
    cannot hold: more bits than the type has, groups that are not whole blocks, or a pruned weight
    in a group whose zero-point has no code (its zero would not be exactly zero).
    """
    if layer.bits > type_bits or layer.group_size % GGUF_BLOCK or layer.in_features % GGUF_BLOCK:
        return None
    blocks = layer.code_blocks(GGUF_BLOCK)  # pruned weights on the zero code: d * zero + m = 0
    if not blocks.pruned_on_grid(1 << type_bits).all():
        return None
    d = blocks.scales.to(torch.float16)
    m = (-blocks.zeros * blocks.scales).to(torch.float16)
    return d.numpy(), m.numpy(), blocks.codes.to(torch.uint8).numpy()


def pack_q4_1(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(d, m, q) from `luc_blocks` -> Q4_1 bytes (rows x 20 * blocks): d, m, 16 bytes of nibbles."""
    rows = q.shape[0]
    values = q.reshape(-1, GGUF_BLOCK).astype(np.uint8)
    nibbles = values[:, :16] | (values[:, 16:] << 4)
    return np.concatenate([d.reshape(-1, 1).view(np.uint8), m.reshape(-1, 1).view(np.uint8), nibbles], axis=1).reshape(
        rows, -1
    )


def pack_q5_1(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(d, m, q) from `luc_blocks` -> Q5_1 bytes (rows x 24 * blocks): d, m, the fifth bits, nibbles."""
    rows = q.shape[0]
    values = q.reshape(-1, GGUF_BLOCK).astype(np.uint32)
    high = ((values >> 4) & 1) << np.arange(GGUF_BLOCK, dtype=np.uint32)
    high_bits = high.sum(axis=1, dtype=np.uint32).astype("<u4").reshape(-1, 1).view(np.uint8)
    nibbles = ((values[:, :16] & 0xF) | ((values[:, 16:] & 0xF) << 4)).astype(np.uint8)
    return np.concatenate(
        [d.reshape(-1, 1).view(np.uint8), m.reshape(-1, 1).view(np.uint8), high_bits, nibbles], axis=1
    ).reshape(rows, -1)


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotate-half rotary layout -> llama.cpp's interleaved one (as convert_hf_to_gguf)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved rotary layout -> transformers' rotate-half one (`permute_rotary`
    undone); rows move whole, so blocks of a quantized weight move unchanged."""
    return (
        weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )
