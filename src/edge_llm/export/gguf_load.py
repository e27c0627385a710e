"""Load a llama.cpp GGUF file as a transformers model that keeps the file's blocks: the base to tune
an adapter on, exactly as it ships.

`load_gguf` is the inverse of `write_gguf`: every weight tensor in a type llama.cpp and edge-llm
share (`ggml.BLOCK_TYPES`: K-quants, 32-blocks, F16) becomes a `GGMLLinear` / `GGMLEmbedding`
holding the file's bytes unchanged (rows of the query and key projections put back in
transformers' rotary order, which moves whole rows of blocks, so nothing is re-rounded). The file
can be LUC's (`LUCConfig(target="gguf")` written by `write_gguf` or `edge-llm compress --target
gguf`) or `llama-quantize`'s (Q4_K_M and the other mixes); an adapter tuned over the loaded model
and written with `write_gguf_lora` runs in llama.cpp over that very file.

Why not transformers' own GGUF loading (`from_pretrained(..., gguf_file=...)`): it dequantizes
every tensor to float, so the model holds 4-8x the bytes of the file and computes with weights
that are no longer the file's once saved again. The config and the tokenizer do come from
transformers' GGUF support (`AutoConfig` / `AutoTokenizer` with `gguf_file=`). Where a float model
is wanted after all (converting a packaged GGUF once, as `assets.smollm2_135m` does),
`dequantize=True` gives transformers' weights exactly, decoded by ggml in about half the time.

Float weight tensors (F32, BF16: a dense conversion) load as plain float layers; other llama.cpp
types (IQ2/IQ3, ternary) are refused by name. Every tensor is decoded once while loading (a row
block at a time) and refused if it holds NaN or infinity: a damaged file fails here, by name, not
as NaN logits later.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_llm.export.gguf import LLAMA_TENSORS, block_tensor_name, gguf_tensor_names
from edge_llm.export.gguf_blocks import unpermute_rotary
from edge_llm.luc.ggml import BLOCK_TYPES, dequantize
from edge_llm.luc.ggml_linear import DECODE_BLOCK, GGMLEmbedding, GGMLLinear
from edge_llm.luc.gguf_policy import GGUFPolicy
from edge_llm.luc.gguf_sensitivity import EMBEDDING, weight_tensors
from edge_llm.modeling import find_decoder_parts

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)


def gguf_path(path: str | Path) -> Path:
    """`path` if it is a file, else the `model.gguf` in the folder `path`."""
    path = Path(path)
    return path / "model.gguf" if path.is_dir() else path


def gguf_model_file(spec: str | Path) -> Path | None:
    """The llama.cpp file a model argument names: a `.gguf` file, or the `model.gguf` of a folder
    that holds no transformers checkpoint (`edge-llm compress --target gguf`'s output); else None."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found = (path / "model.gguf").is_file() and not (path / "config.json").is_file()
        return path / "model.gguf" if found else None
    return path if path.suffix == ".gguf" and path.is_file() else None


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, dequantize: bool = False) -> nn.Module:
    """The Llama-architecture model in the GGUF file `path` (or a folder's `model.gguf`), its weight
    tensors kept as the file's llama.cpp blocks; `dtype` for the norms and the activations.
    `dequantize=True`: a plain float model instead, every weight decoded (ggml's decoder) into a
    `dtype` Linear / Embedding — the weights transformers' `from_pretrained(gguf_file=...)` gives,
    in about half its time (ggml's C decoder instead of gguf-py's numpy one).

    The tokenizer: `AutoTokenizer.from_pretrained(folder, gguf_file=name)`.
    """
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    file = gguf_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no GGUF file there (give a .gguf file or a folder holding model.gguf).")
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as error:  # gguf-py raises ValueError/struct.error/IndexError on a bad file
        raise ValueError(f"{file} is not a readable GGUF file: {error}") from None
    architecture = _field(reader, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{file}: architecture {architecture!r}; edge-llm loads llama.cpp's "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} files (Llama, Mistral, SmolLM2 and other Llama-style models)."
        )
    tensors = {t.name: t for t in reader.tensors}
    config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
    # Stored as float32: its shortest float32 spelling is the value the model was made with (1e-06,
    # not 9.99999997e-07), so the loaded model computes exactly as the one written.
    config.rms_norm_eps = float(str(np.float32(config.rms_norm_eps)))
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # no float weights ever made; rotary buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if config.tie_word_embeddings:  # the file has no output.weight: the head is the table
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _check_names(file, model, tensors)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    types = _load_weights(file, model, tensors, heads, dtype)
    _load_norms(file, model, tensors, dtype)
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if stray:
        raise ValueError(f"{file}: nothing in the file for {stray[:4]}.")
    if dequantize:
        _decode_blocks(model, dtype)
        logger.info("Loaded %s as float weights (%s)", file, dtype)
        return model.eval()
    policy = GGUFPolicy(types, "given") if types else None
    if policy is not None:
        _mark(model, policy)
    logger.info("Loaded %s: %s", file, policy.summary() if policy is not None else "float weights")
    return model.eval()


def _field(reader: Any, name: str) -> Any:
    field = reader.fields.get(name)
    return None if field is None else field.contents()


def _norm_names(model: nn.Module) -> dict[str, nn.Module]:
    """GGUF name -> the norm module whose weight it holds."""
    parts = find_decoder_parts(model)
    norms = {"output_norm.weight": parts.norm(model)}
    for index, layer in enumerate(parts.layers(model)):
        for suffix, gguf_name in LLAMA_TENSORS.items():
            if gguf_name.endswith("norm"):
                norms[block_tensor_name(index, suffix)] = layer.get_submodule(suffix)
    return norms


def _check_names(file: Path, model: nn.Module, tensors: dict[str, Any]) -> None:
    expected = set(gguf_tensor_names(model).values()) | set(_norm_names(model))
    missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unknown:
        raise ValueError(
            f"{file} does not hold the tensors of the model its metadata describes"
            + (f"; missing: {missing[:4]}" if missing else "")
            + (f"; not part of it: {unknown[:4]}" if unknown else "")
            + ". Is it a complete file of a plain Llama-style model?"
        )


def _data(file: Path, tensor: Any, rows: int, columns: int) -> tuple[str, np.ndarray]:
    """(type name, data as rows x bytes for block types, rows x columns floats otherwise), shape checked."""
    kind = tensor.tensor_type.name
    shape = [int(n) for n in tensor.shape][::-1]  # ggml lists the row length first
    if shape != [rows, columns]:
        raise ValueError(f"{file}: tensor {tensor.name} is {shape}, the model needs [{rows}, {columns}].")
    if kind in BLOCK_TYPES:
        if not BLOCK_TYPES[kind].fits(columns):
            raise ValueError(f"{file}: tensor {tensor.name} ({kind}) has rows of {columns}, not whole blocks.")
        data = np.asarray(tensor.data).view(np.uint8).reshape(rows, -1)
        step = max(1, DECODE_BLOCK // columns)  # decoded a row block at a time: one copy of that size
        values = (dequantize(data[i : i + step], BLOCK_TYPES[kind], columns) for i in range(0, rows, step))
    elif kind == "F32":
        data = np.asarray(tensor.data, dtype=np.float32).reshape(rows, columns)
        values = [data]
    elif kind == "BF16":  # the high half of a float32
        words = np.asarray(tensor.data).view(np.uint16).reshape(rows, columns).astype(np.uint32) << 16
        data = words.view(np.float32)
        values = [data]
    else:
        raise ValueError(
            f"{file}: tensor {tensor.name} is {kind}, a type edge-llm cannot compute with; load files whose weights "
            f"are in {', '.join(BLOCK_TYPES)}, F32 or BF16 (re-quantize with llama-quantize to one of these)."
        )
    _check_finite(file, tensor.name, values)
    return kind, data


def _check_finite(file: Path, name: str, values: Iterable[np.ndarray]) -> None:
    if not all(np.isfinite(part).all() for part in values):
        raise ValueError(f"{file}: tensor {name} holds NaN or infinite weights; the file is damaged (write it again).")


def _load_weights(
    file: Path, model: nn.Module, tensors: dict[str, Any], heads: dict[str, int], dtype: torch.dtype
) -> dict[str, str]:
    """Put every weight tensor of the file in `model`; returns the llama.cpp type of each one held
    in blocks (by policy key)."""
    parts = find_decoder_parts(model)
    names = gguf_tensor_names(model)
    modules = weight_tensors(model)
    types: dict[str, str] = {}
    for key, name in names.items():
        module = modules[key]
        if key == EMBEDDING:
            kind, data = _data(file, tensors[name], module.num_embeddings, module.embedding_dim)
            if kind in BLOCK_TYPES:
                table = GGMLEmbedding(module.num_embeddings, module.embedding_dim, kind, output_dtype=dtype)
                table.weight.copy_(_tensor(data))
            else:
                table = nn.Embedding(module.num_embeddings, module.embedding_dim, dtype=dtype)
                table.weight.data.copy_(_tensor(data))
                table.weight.requires_grad_(False)  # frozen, as every weight of the loaded base
            model.set_input_embeddings(table)
            if parts.head_path not in names:  # tied: the head reads the table
                head = GGMLLinear.tied_to(table) if kind in BLOCK_TYPES else _tied_float_head(table)
                model.set_submodule(parts.head_path, head)
        else:
            kind, data = _data(file, tensors[name], module.out_features, module.in_features)
            rotary = heads.get(name.split(".")[-2]) if name.startswith("blk.") else None
            if rotary:
                data = unpermute_rotary(data, rotary)
            model.set_submodule(key, _linear(module, kind, data, dtype))
        if kind in BLOCK_TYPES:
            types[key] = kind
    return types


def _tensor(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(data))  # a copy: the reader's arrays map the file read-only


def _tied_float_head(table: nn.Embedding) -> nn.Linear:
    head = nn.Linear(table.embedding_dim, table.num_embeddings, bias=False, device="meta")
    head.weight = table.weight
    return head


def _linear(module: nn.Linear, kind: str, data: np.ndarray, dtype: torch.dtype) -> nn.Module:
    if module.bias is not None:
        raise ValueError("GGUF loading supports Llama-style models without Linear biases.")
    if kind in BLOCK_TYPES:
        layer = GGMLLinear(module.in_features, module.out_features, kind, dtype=dtype)
        layer.weight.copy_(_tensor(data))
        return layer
    return _frozen_linear(_tensor(data).to(dtype))


def _frozen_linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def _load_norms(file: Path, model: nn.Module, tensors: dict[str, Any], dtype: torch.dtype) -> None:
    for name, norm in _norm_names(model).items():
        tensor = tensors[name]
        values = np.asarray(tensor.data)
        if tensor.tensor_type.name not in ("F32", "F16") or values.size != norm.weight.numel():
            raise ValueError(
                f"{file}: norm {name} is {tensor.tensor_type.name} of {values.size} values; the model needs "
                f"{norm.weight.numel()} F32 values."
            )
        _check_finite(file, name, [values])
        norm.weight = nn.Parameter(torch.from_numpy(values.astype(np.float32)).to(dtype), requires_grad=False)


def _decode_blocks(model: nn.Module, dtype: torch.dtype) -> None:
    """Every layer that holds llama.cpp blocks replaced by a frozen float layer of its weight,
    decoded in float32 and then cast to `dtype`, as transformers' GGUF loading does."""
    parts = find_decoder_parts(model)
    table = model.get_input_embeddings()
    tied = parts.head(model).weight is table.weight
    if isinstance(table, GGMLEmbedding):
        table = nn.Embedding.from_pretrained(table.dense_weight(torch.float32).to(dtype))
        model.set_input_embeddings(table)
    for name, module in list(model.named_modules()):
        if isinstance(module, GGMLLinear) and not (tied and name == parts.head_path):
            model.set_submodule(name, _frozen_linear(module.dense_weight(torch.float32).to(dtype)))
    if tied:
        model.set_submodule(parts.head_path, _tied_float_head(table))


def _mark(model: nn.Module, policy: GGUFPolicy) -> None:
    """Record the blocks' policy as a model LUC compressed for llama.cpp records it, so adapters
    note the base they were tuned over (`luc.facts.compression_of`) and a save is refused as for one."""
    from edge_llm.luc.config import LUCConfig
    from edge_llm.luc.integration import record_quantization

    record_quantization(model, LUCConfig(target="gguf", policy=policy))
