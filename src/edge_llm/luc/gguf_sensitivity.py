"""What LUC for llama.cpp measures: per weight tensor, what each llama.cpp type would cost it.

`gguf_policy.py` chooses and applies the types from what this module measures; two steps:

1. `calibrate`: one pass over the calibration windows collects, for every weight matrix, llama.cpp's
   importance matrix (the mean square of each input column) and the diagonal of the empirical
   Fisher information (the summed squares of the loss gradient per weight, one window at a time).
2. `damage_table`: every (tensor, type) is quantized by llama.cpp's quantizer with the importance
   matrix, so what is measured is what ships, and its damage estimated as the Fisher-weighted
   squared error `sum F * (W - Q)^2` — the second-order estimate of the loss increase. It costs one
   quantization per candidate, no extra forward pass: a 135M model's profile takes well under two
   minutes on two cores. `measured_table` keeps both results in a cache folder.

`structural_table` replaces the measurement by a rule of the kind llama.cpp's mixes encode
(embedding/head, attn_v, ffn_down and the first and last layers weigh more): the baseline the
measured policy must beat at equal bytes.

The embedding table is a tensor like the others; with tied embeddings it is also the LM head, and
its gradient (hence its Fisher information) holds both uses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_llm._io import atomic_file, atomic_write_text
from edge_llm.luc.calibration import iterate
from edge_llm.luc.ggml import BlockType, block_type, dequantize, quantize, types_for_row
from edge_llm.luc.ggml_linear import GGMLEmbedding, GGMLLinear
from edge_llm.modeling import find_decoder_parts

logger = logging.getLogger(__name__)

SENSITIVITIES = ("fisher", "structural")

# GGUF pads every tensor's data to this many bytes (`general.alignment`'s default).
GGUF_ALIGNMENT = 32
EMBEDDING = "embedding"  # the key of the token embedding table in a policy


def aligned(nbytes: int) -> int:
    return -(-nbytes // GGUF_ALIGNMENT) * GGUF_ALIGNMENT


def weight_tensors(model: nn.Module) -> dict[str, nn.Module]:
    """The tensors a GGUF policy covers: every Linear of every decoder layer (by module path), the
    token embedding (`EMBEDDING`) and an untied LM head (by its path)."""
    parts = find_decoder_parts(model)
    tensors: dict[str, nn.Module] = {EMBEDDING: model.get_input_embeddings()}
    layers_path = parts.layers_path
    for index, layer in enumerate(parts.layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, (nn.Linear, GGMLLinear)):
                tensors[f"{layers_path}.{index}.{name}"] = module
    head = parts.head(model)
    if head.weight is not tensors[EMBEDDING].weight:
        tensors[parts.head_path] = head
    return tensors


def tensor_shape(module: nn.Module) -> tuple[int, int]:
    """(rows, row length) of a tensor's weight, float or already in llama.cpp blocks."""
    if isinstance(module, GGMLLinear):
        return module.out_features, module.in_features
    if isinstance(module, GGMLEmbedding):
        return module.num_embeddings, module.embedding_dim
    return tuple(module.weight.shape)


@dataclass
class Statistics:
    """What calibration measured per tensor: importance (one value per input column, llama.cpp's
    imatrix; None for an untied embedding table) and the Fisher diagonal (same shape as the weight;
    empty when calibration did not measure it)."""

    importance: dict[str, np.ndarray | None]
    fisher: dict[str, torch.Tensor]


def calibrate(model: nn.Module, tokens: torch.Tensor, progress: bool = True, fisher: bool = True) -> Statistics:
    """Importance matrices and (with `fisher`) Fisher diagonals of every tensor of
    `weight_tensors(model)`, from one forward (and backward) pass per calibration window. Without
    `fisher` (a given policy, the structural rule: only the quantizer's importance is needed) the
    passes run without autograd and `Statistics.fisher` is empty."""
    tensors = weight_tensors(model)
    parts = find_decoder_parts(model)
    head = parts.head(model)
    squares: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            squares[name] = squares.get(name, 0) + x.square().sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    # The embedding table as a matrix multiplies the head's input (when tied); as a lookup it
    # multiplies nothing, and llama.cpp has no importance for it.
    observed = {name: module for name, module in tensors.items() if name != EMBEDDING}
    tied = parts.head_path not in tensors
    if tied:
        observed[EMBEDDING] = head
    handles = [module.register_forward_hook(accumulate(name)) for name, module in observed.items()]
    device = next(model.parameters()).device
    try:
        if fisher:  # the forward passes of the Fisher measurement feed the hooks too
            fishers = _fisher(model, tensors, tokens, progress)
        else:
            fishers = {}
            with torch.no_grad():
                for window in iterate(tokens, len(tokens), "LUC calibration (importance)", progress):
                    model(input_ids=window[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    importance: dict[str, np.ndarray | None] = {
        name: (squares[name] / counts[name]).cpu().numpy() if name in squares else None for name in tensors
    }
    return Statistics(importance, fishers)


def _fisher(model: nn.Module, tensors: dict[str, nn.Module], tokens: torch.Tensor, progress: bool) -> dict:
    """Summed squared loss gradients of every tensor's weight, one calibration window at a time;
    every parameter's `requires_grad` is as it was afterwards."""
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {name: module.weight for name, module in tensors.items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    fisher = {name: torch.zeros_like(weight, dtype=torch.float32) for name, weight in weights.items()}
    device = weights[EMBEDDING].device
    try:
        for window in iterate(tokens, len(tokens), "LUC calibration (importance and Fisher)", progress):
            ids = window[None].to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, list(weights.values()))
            for name, grad in zip(weights, grads, strict=True):
                fisher[name].add_(grad.float().square())
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
    return fisher


@dataclass
class Candidate:
    kind: BlockType
    nbytes: int  # in the GGUF file, with its alignment padding
    damage: float
    # Seconds this choice adds to a request (prompt, then generation) in llama.cpp beyond the speed
    # profile's reference type (`GGUFSpeedProfile.time_table`; 0 when not timed).
    seconds: float = 0.0


def candidate_types(columns: int, names: tuple[str, ...] | None) -> list[BlockType]:
    kinds = types_for_row(columns, names)
    if not kinds:
        raise ValueError(f"None of the weight types {names} tiles rows of {columns} weights; add F16 or Q8_0.")
    return kinds


# Rows of one tensor whose damage is measured: quantization is row by row, so a larger table (the
# token embedding: 49,152 rows in SmolLM2) is measured on evenly spaced rows and scaled up.
MAX_MEASURED_ROWS = 8192


def _damage(weight: torch.Tensor, fisher: torch.Tensor, kind: BlockType, importance: np.ndarray | None) -> float:
    rows = weight.shape[0]
    step = -(-rows // MAX_MEASURED_ROWS)
    weight, fisher = weight[::step].contiguous(), fisher[::step]
    restored = torch.from_numpy(dequantize(quantize(weight.numpy(), kind, importance), kind, weight.shape[1]))
    return float((fisher * (weight - restored).square()).sum()) * rows / weight.shape[0]


def damage_table(
    model: nn.Module,
    statistics: Statistics,
    types: tuple[str, ...] | None = None,
    progress: bool = True,
) -> dict[str, list[Candidate]]:
    """Every tensor's candidates: bytes in the file and Fisher-weighted squared error. The
    quantizations run on as many threads as torch uses (ggml releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    tensors = weight_tensors(model)
    jobs = {}
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        for name, module in tensors.items():
            weight = module.weight.detach().float().cpu()
            fisher = statistics.fisher[name].cpu()
            for kind in candidate_types(weight.shape[1], types):
                future = pool.submit(_damage, weight, fisher, kind, statistics.importance[name])
                jobs[(name, kind.name)] = (kind, aligned(kind.tensor_bytes(*weight.shape)), future)
        table: dict[str, list[Candidate]] = {name: [] for name in tensors}
        done = iterate(jobs.items(), len(jobs), "LUC damage per tensor and type", progress)
        for (name, _), (kind, nbytes, future) in done:
            table[name].append(Candidate(kind, nbytes, future.result()))
    return table


def structural_table(model: nn.Module, types: tuple[str, ...] | None = None) -> dict[str, list[Candidate]]:
    """Damage by rule, not measurement: `role weight x weights x 2^(-2 bits per weight)` (the
    squared rounding error of a uniform grid), with the roles llama.cpp's mixes favour weighing 4x
    (token embedding / head, attn_v, ffn_down) and the first and last eighth of the layers 2x."""
    tensors = weight_tensors(model)
    num_layers = len(find_decoder_parts(model).layers(model))
    edge = max(1, num_layers // 8)
    table: dict[str, list[Candidate]] = {}
    for name, module in tensors.items():
        rows, columns = tensor_shape(module)
        weight = 4.0 if name == EMBEDDING or name.endswith(("v_proj", "down_proj", "lm_head")) else 1.0
        index = _layer_index(name)
        if index is not None and (index < edge or index >= num_layers - edge):
            weight *= 2.0
        table[name] = [
            Candidate(
                kind,
                aligned(kind.tensor_bytes(rows, columns)),
                weight * rows * columns * 2.0 ** (-2 * kind.bits_per_weight),
            )
            for kind in candidate_types(columns, types)
        ]
    return table


def _layer_index(name: str) -> int | None:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def weight_count(model: nn.Module) -> int:
    """Weights in the tensors a GGUF policy covers."""
    return sum(rows * columns for rows, columns in map(tensor_shape, weight_tensors(model).values()))


# Part of the key of a kept profile: raise it when what `calibrate` or `damage_table` measure changes.
GGUF_PROFILE_VERSION = 1


def measured_table(
    model: nn.Module,
    tokens: torch.Tensor,
    types: tuple[str, ...] | None,
    progress: bool,
    cache_dir: str | Path | None,
) -> tuple[dict[str, list[Candidate]], Statistics]:
    """The damage table and the importance vectors of `model` on `tokens` (`calibrate`, then
    `damage_table`), read from `cache_dir` when measured before: keyed by the model's values, the
    tokens and the candidate types; a damaged or foreign entry is measured again. The Fisher
    diagonals are not kept: the table holds what they were for."""
    from edge_llm.luc.profile import cache_folder, weights_fingerprint

    settings = {"kind": "gguf-fisher", "types": types, "rows": MAX_MEASURED_ROWS, "version": GGUF_PROFILE_VERSION}
    stem = None
    if cache_dir is not None:
        stem = cache_folder(cache_dir) / f"gguf-profile-{weights_fingerprint(model, tokens, settings)[:24]}"
        cached = _read_profile(stem, model, types)
        if cached is not None:
            logger.info("Using the cached profile for llama.cpp %s.json", stem)
            return cached
    statistics = calibrate(model, tokens, progress, fisher=True)
    table = damage_table(model, statistics, types, progress)
    statistics.fisher.clear()  # one float per weight
    if stem is not None:
        _write_profile(stem, table, statistics)
    return table, statistics


def _write_profile(stem: Path, table: dict[str, list[Candidate]], statistics: Statistics) -> None:
    from safetensors.numpy import save_file

    with atomic_file(stem.with_suffix(".safetensors")) as temporary:
        vectors = {
            n: np.ascontiguousarray(v, dtype=np.float32) for n, v in statistics.importance.items() if v is not None
        }
        save_file(vectors, str(temporary))
    rows = {name: [[c.kind.name, c.nbytes, c.damage] for c in candidates] for name, candidates in table.items()}
    atomic_write_text(stem.with_suffix(".json"), json.dumps({"version": GGUF_PROFILE_VERSION, "tensors": rows}))


def _read_profile(
    stem: Path, model: nn.Module, types: tuple[str, ...] | None
) -> tuple[dict[str, list[Candidate]], Statistics] | None:
    """The cached table and importance if both files are there and describe `model`'s tensors
    with finite values; else None (and a warning when something was there but not usable)."""
    from safetensors.numpy import load_file

    json_path, vectors_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not (json_path.is_file() and vectors_path.is_file()):
        return None
    try:
        data = json.loads(json_path.read_text())
        vectors = load_file(str(vectors_path))
        tensors = weight_tensors(model)
        if data.get("version") != GGUF_PROFILE_VERSION or set(data["tensors"]) != set(tensors):
            raise ValueError("it describes other tensors")
        table = {}
        for name, module in tensors.items():
            rows, columns = tensor_shape(module)
            expected = {kind.name for kind in candidate_types(columns, types)}
            entries = data["tensors"][name]
            if {entry[0] for entry in entries} != expected or len(entries) != len(expected):
                raise ValueError(f"{name} has other candidate types")
            table[name] = [Candidate(block_type(kind), int(nbytes), float(damage)) for kind, nbytes, damage in entries]
            if not all(np.isfinite(c.damage) and c.damage >= 0 for c in table[name]):
                raise ValueError(f"{name} has a damage that is not a finite number >= 0")
            if any(c.nbytes != aligned(c.kind.tensor_bytes(rows, columns)) for c in table[name]):
                raise ValueError(f"{name} has sizes of another shape")
            vector = vectors.get(name)
            if vector is not None and (vector.shape != (columns,) or not np.isfinite(vector).all()):
                raise ValueError(f"{name}'s importance vector does not fit")
        importance = {name: vectors.get(name) for name in tensors}
    except (ValueError, KeyError, TypeError, IndexError, OSError) as error:
        logger.warning("Ignoring the cached profile for llama.cpp %s (%s); measuring again.", json_path, error)
        return None
    return table, Statistics(importance, {})
