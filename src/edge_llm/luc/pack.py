"""Pack small unsigned integers densely into bytes, and back.

Values of `bits` bits (1..8) are written as one little-endian bit stream: value `i` occupies bits
`i*bits … i*bits+bits-1`, bit `k` of the stream is bit `k % 8` of byte `k // 8`. For 1, 2, 4 and 8
bits that is the usual layout (two 4-bit values per byte, low nibble first); 3-bit values pack 8
to 3 bytes. `n` values take `ceil(n * bits / 8)` bytes.
"""

from __future__ import annotations

import torch


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take when packed."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"Can pack 1 to 8 bits per value, got bits={bits!r}.")


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer `values` in `[0, 2**bits)` (any shape) into a 1-D uint8 tensor."""
    _check_bits(bits)
    flat = values.reshape(-1).to(torch.int32)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"Values must lie in [0, {1 << bits}) to pack into {bits} bits.")
    if 8 % bits == 0:
        # Whole values per byte: shift each value into its slot and add.
        per_byte = 8 // bits
        flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % per_byte))
        shifts = torch.arange(per_byte, dtype=torch.int32, device=flat.device) * bits
        return (flat.view(-1, per_byte) << shifts).sum(dim=1).to(torch.uint8)
    # Other widths: spell out the bit stream and regroup it by eight.
    planes = (flat.unsqueeze(1) >> torch.arange(bits, dtype=torch.int32, device=flat.device)) & 1
    stream = torch.nn.functional.pad(planes.reshape(-1), (0, (-planes.numel()) % 8))
    weights = 1 << torch.arange(8, dtype=torch.int32, device=flat.device)
    return (stream.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` values of `bits` bits from a tensor made by `pack_bits` (uint8, 1-D)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"Packed data must be a 1-D uint8 tensor, got {packed.dtype} with shape {tuple(packed.shape)}."
        )
    if packed.numel() < packed_size(count, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {count} values of {bits} bits.")
    if 8 % bits == 0:
        # Whole values per byte: shift each slot down, in uint8 (no wider copy of the weights).
        # One op per slot: a broadcast shift over a uint8 tensor is several times slower.
        mask = (1 << bits) - 1
        # The lowest slot needs no shift, the highest no mask.
        slots = [packed & mask, *((packed >> shift) & mask for shift in range(bits, 8 - bits, bits))]
        slots += [packed >> (8 - bits)] if bits < 8 else []
        return torch.stack(slots, dim=1).view(-1)[:count]
    # Other widths: 8 values fill exactly `bits` bytes. Read each group of `bits` bytes as one
    # little-endian integer (at most 56 bits) and shift the 8 values out of it: a few int64 ops per
    # value rather than one per bit.
    groups = -(-count // 8)
    data = torch.nn.functional.pad(packed[: groups * bits], (0, max(0, groups * bits - packed.numel())))
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=packed.device)
    words = (data.view(groups, bits).to(torch.int64) << byte_shifts).sum(dim=1)
    value_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=packed.device)
    values = (words.unsqueeze(1) >> value_shifts) & ((1 << bits) - 1)
    return values.reshape(-1)[:count].to(torch.uint8)
