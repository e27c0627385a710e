"""llama.cpp's weight formats: quantized by llama.cpp's own library, decoded by gguf-py.

Why bindings and not a port: ggml's quantizers are the reference for every block type llama.cpp
runs (the scale/min search per block, `make_qkx2_quants` for the K-quants, importance-weighted
rounding when given an importance matrix, IQ4_NL's non-linear grid). A second implementation
would drift from the runtime that ships the model; `ggml_quantize_chunk`, called through ctypes
from the library llama-cpp-python ships, gives the very bytes `llama-quantize` writes for the same
weights and importance matrix. What edge-llm adds is which type each tensor gets
(`luc/gguf_policy.py`).

Decoding (what PyTorch computes with) is ggml's own `to_float` where llama-cpp-python is installed
(5-10x faster than numpy: a compressed layer decodes its weight at every call rather than keep a
float copy), else gguf-py's numpy decoders, so a model that holds these blocks loads and runs
without llama-cpp-python. The tests hold the two bit-exact for every type offered here.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_llm._warnings import quiet_native_output

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "edge-llm[gguf]" (llama-cpp-python, which compiles llama.cpp: several minutes)'


@dataclass(frozen=True)
class BlockType:
    """One llama.cpp weight type: `block` weights per block of `block_bytes` bytes."""

    name: str
    block: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block

    def fits(self, row_length: int) -> bool:
        return row_length % self.block == 0

    def row_bytes(self, row_length: int) -> int:
        return row_length // self.block * self.block_bytes

    def tensor_bytes(self, rows: int, row_length: int) -> int:
        return rows * self.row_bytes(row_length)

    @property
    def ggml_id(self) -> int:
        from gguf import GGMLQuantizationType

        return int(GGMLQuantizationType[self.name])


# The types a LUC policy for llama.cpp chooses from: every type llama.cpp's CPU backend runs that
# gguf-py decodes and that needs no importance matrix to be usable. K-quants hold 256 weights a
# block (rows must be multiples of 256); the others 32.
BLOCK_TYPES: dict[str, BlockType] = {
    t.name: t
    for t in (
        BlockType("Q2_K", 256, 84),
        BlockType("Q3_K", 256, 110),
        BlockType("Q4_K", 256, 144),
        BlockType("Q5_K", 256, 176),
        BlockType("Q6_K", 256, 210),
        BlockType("IQ4_XS", 256, 136),
        BlockType("Q4_0", 32, 18),
        BlockType("IQ4_NL", 32, 18),
        BlockType("Q4_1", 32, 20),
        BlockType("Q5_0", 32, 22),
        BlockType("Q5_1", 32, 24),
        BlockType("Q8_0", 32, 34),
        BlockType("F16", 1, 2),
    )
}


def block_type(name: str) -> BlockType:
    try:
        return BLOCK_TYPES[name]
    except KeyError:
        raise ValueError(f"Unknown llama.cpp weight type {name!r}; choose from {', '.join(BLOCK_TYPES)}.") from None


def types_for_row(row_length: int, names: tuple[str, ...] | None = None) -> list[BlockType]:
    """The types (of `names`, default all) whose blocks tile rows of `row_length` weights."""
    chosen = BLOCK_TYPES.values() if names is None else [block_type(n) for n in names]
    return [t for t in chosen if t.fits(row_length)]


class _TypeTraits(ctypes.Structure):
    """ggml.h's `struct ggml_type_traits` (its leading fields: `_to_float` checks the layout)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)),
    ]


@functools.cache
def _library() -> ctypes.CDLL:
    """ggml's base library from the llama-cpp-python installation."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Quantizing for llama.cpp uses llama.cpp's own quantizer: {INSTALL_HINT}.")
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    candidates = sorted(lib_dir.glob("*ggml-base*")) + sorted(lib_dir.glob("*ggml.*"))
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
            lib.ggml_quantize_chunk  # noqa: B018 - raises AttributeError when absent
        except (OSError, AttributeError):
            continue
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        return lib
    raise ModuleNotFoundError(f"llama-cpp-python is installed but its ggml library was not found in {lib_dir}.")


def quantize(weight: np.ndarray, kind: BlockType, importance: np.ndarray | None = None) -> np.ndarray:
    """`weight` (rows x columns, float) as `kind`'s blocks: uint8 (rows x row bytes).

    `importance`: one non-negative weight per column (llama.cpp's importance matrix: the mean square
    of the inputs each column multiplies), which the block search minimises the weighted error of.
    """
    rows, columns = weight.shape
    if not kind.fits(columns):
        raise ValueError(f"{kind.name} holds rows of a multiple of {kind.block} weights, got {columns}.")
    source = np.ascontiguousarray(weight, dtype=np.float32)
    if kind.name == "F16":
        return source.astype(np.float16).view(np.uint8).reshape(rows, -1)
    lib = _library()
    if lib.ggml_row_size(kind.ggml_id, columns) != kind.row_bytes(columns):
        raise RuntimeError(f"This llama.cpp build stores {kind.name} in another block size than edge-llm expects.")
    out = np.empty((rows, kind.row_bytes(columns)), dtype=np.uint8)
    imatrix = None
    if importance is not None:
        imatrix = np.ascontiguousarray(importance, dtype=np.float32)
        if imatrix.shape != (columns,):
            raise ValueError(f"The importance vector has shape {imatrix.shape}, expected ({columns},).")
        imatrix = imatrix.ctypes.data_as(ctypes.c_void_p)
    written = lib.ggml_quantize_chunk(
        kind.ggml_id,
        source.ctypes.data_as(ctypes.c_void_p),
        out.ctypes.data_as(ctypes.c_void_p),
        0,
        rows,
        columns,
        imatrix,
    )
    if written != out.nbytes:
        raise RuntimeError(f"ggml wrote {written} bytes of {kind.name}, expected {out.nbytes}.")
    return out


@functools.cache
def _to_float(name: str):  # -> the C decoder of type `name`, or None
    """ggml's decoder of one type, where llama-cpp-python's library has one whose traits match
    edge-llm's block size and bytes (else None: gguf-py decodes)."""
    try:
        lib = _library()
    except ModuleNotFoundError:
        return None
    kind = block_type(name)
    traits = lib.ggml_get_type_traits(kind.ggml_id).contents
    known = (traits.type_name or b"").decode().upper() == name.upper()
    if not known or (traits.blck_size, traits.type_size) != (kind.block, kind.block_bytes) or not traits.to_float:
        return None
    return traits.to_float


def dequantize(blocks: np.ndarray | torch.Tensor, kind: BlockType, columns: int) -> np.ndarray:
    """The float32 weights (rows x `columns`) that llama.cpp computes with for `kind`'s blocks."""
    data = np.ascontiguousarray(blocks.numpy() if isinstance(blocks, torch.Tensor) else blocks)
    if kind.name == "F16":
        return data.view(np.float16).astype(np.float32).reshape(-1, columns)
    decode = _to_float(kind.name)
    if decode is not None:
        out = np.empty((data.size // kind.row_bytes(columns), columns), dtype=np.float32)
        decode(data.ctypes.data, out.ctypes.data, out.size)  # releases the GIL: threads decode in parallel
        return out
    return gguf_dequantize(data, kind, columns)


def llama_quantize(
    source: str | Path, target: str | Path, mix: str, importance: dict[str, np.ndarray] | None = None, threads: int = 2
) -> Path:
    """`llama-quantize source target MIX [--imatrix]` through llama-cpp-python's
    `llama_model_quantize`: llama.cpp's own mixes (`"Q4_K_M"`, `"Q3_K_S"`, ... as in
    `LLAMA_FTYPE_MOSTLY_<MIX>`), the baseline a llama.cpp user already has. `importance`: an
    importance vector per tensor, by llama.cpp tensor name (what `llama-imatrix` writes)."""
    try:
        import llama_cpp
    except ImportError:
        raise ModuleNotFoundError(f"llama-quantize runs in llama.cpp: {INSTALL_HINT}.") from None
    params = llama_cpp.llama_model_quantize_default_params()
    try:
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    except AttributeError:
        raise ValueError(f"llama.cpp has no quantization mix {mix!r} (e.g. Q4_K_M, Q3_K_S, Q8_0).") from None
    params.nthread = threads
    keep = []  # the names and arrays the C structs point into, alive until the call returns
    if importance:
        entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
        for entry, (name, values) in zip(entries, importance.items(), strict=False):
            data = np.ascontiguousarray(values, dtype=np.float32)
            keep.append((name.encode(), data))
            entry.name = keep[-1][0]
            entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = data.size
        params.imatrix = entries
    target = Path(target)
    with quiet_native_output(logger):  # llama.cpp writes a line per tensor
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize failed to make {mix} from {source}.")
    return target


def gguf_dequantize(data: np.ndarray, kind: BlockType, columns: int) -> np.ndarray:
    """gguf-py's numpy decoder (no llama-cpp-python needed): bit-exact to ggml's."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as decode

    return decode(data, GGMLQuantizationType[kind.name]).reshape(-1, columns).astype(np.float32, copy=False)
