"""What each llama.cpp weight type costs in time, measured in llama.cpp on this machine, so that a
GGUF policy can be chosen for speed as well as for bytes.

Why measured and not modelled: llama.cpp's CPU backend runs every type through its own kernel,
and some types are repacked at load into interleaved layouts with much faster matmuls (Q4_0 and
IQ4_NL on x86 with AVX2/AVX-512 and on ARM with dot-product instructions, Q4_K on some builds).
Bytes do not predict speed: on a 2-core Xeon, SmolLM2-135M with Q4_1 layers prefills 2.5x
slower than with Q4_0 weights of nearly the same size. Which types are fast depends on the CPU
and the llama.cpp build, so the profile is measured where the model will run (or on a machine
like it) and saved.

The model of time is additive: a phase (a prompt of `prompt_tokens`, then `decode_tokens` one at
a time) takes the time of the model with every tensor in Q4_0 (`REFERENCE`) plus, per tensor,
its weights times its type's measured difference to Q4_0 per weight. Q4_0 is the reference
because it tiles every row of 32 and llama.cpp runs it through repacked kernels on x86 and ARM:
its timings were the steadiest on a shared machine (Q8_0's prefill varied by 25% between
identical runs, Q4_0's by 5%), and every difference is measured against it. The
difference is measured per group of tensors that a phase uses differently: the decoder layers'
matrices (`"linear"`, used by every token) and the logits' matrix (`"output"`: the tied
embedding or the LM head, used once per call). Each type's difference comes from a file that
puts one group in that type and everything else in Q4_0, timed against the all-Q4_0 file in
interleaved rounds, each timing the fastest of two requests (the least disturbed by the rest of
the machine). An untied embedding table is looked up, not multiplied: no time.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_llm._io import check_schema, load_json, load_schema, save_json
from edge_llm.luc.calibration import iterate
from edge_llm.luc.ggml import BLOCK_TYPES, block_type
from edge_llm.luc.gguf_policy import apply_types, fastest_seconds
from edge_llm.luc.gguf_sensitivity import EMBEDDING, Candidate, tensor_shape, weight_count, weight_tensors
from edge_llm.modeling import find_decoder_parts

logger = logging.getLogger(__name__)

GGUF_SPEED_FORMAT = "edge-llm/gguf-speed"
PHASES = ("prefill", "decode")
REFERENCE = "Q4_0"
REQUESTS = 2  # per file and round; the fastest counts
# Layers timed: the first ones holding at least this many weights (all of a small model). A step
# streams them all for every token, far more than any CPU cache holds, as the whole model does.
MEASURED_WEIGHTS = 128_000_000


def tensor_group(model: nn.Module, name: str) -> str | None:
    """ "output" for the tensor that computes the logits, None for an untied embedding table (looked
    up, not multiplied), "linear" for a decoder layer's matrix."""
    parts = find_decoder_parts(model)
    if name == parts.head_path:
        return "output"
    if name == EMBEDDING:
        return "output" if parts.head(model).weight is model.get_input_embeddings().weight else None
    return "linear"


def shape_fingerprint(model: nn.Module) -> str:
    """Identifies the tensors' shapes (a profile's times hold for this model only)."""
    shapes = sorted(f"{tensor_shape(m)}" for m in weight_tensors(model).values())
    digest = hashlib.sha256(";".join(shapes).encode()).hexdigest()[:16]
    return f"{len(find_decoder_parts(model).layers(model))} layers, {weight_count(model)} weights, {digest}"


@dataclass
class GGUFSpeedProfile:
    """llama.cpp's time for one model on one machine, per phase: `reference_seconds` with every
    tensor in Q4_0, and `per_weight[phase][group][type]` the seconds one weight of that group adds
    (or saves, when negative) in that type instead of Q4_0."""

    machine: str
    llama_cpp: str
    threads: int
    prompt_tokens: int
    decode_tokens: int
    model: str  # `shape_fingerprint` of the model measured
    reference_seconds: dict[str, float]
    per_weight: dict[str, dict[str, dict[str, float]]]

    def to_dict(self) -> dict[str, Any]:
        return {"format": GGUF_SPEED_FORMAT, "version": 1, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GGUFSpeedProfile:
        check_schema(data, load_schema("gguf-speed"), "llama.cpp speed profile")
        return cls(**{k: v for k, v in data.items() if k not in ("format", "version")})

    def save(self, path: str | Path) -> None:
        save_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> GGUFSpeedProfile:
        return cls.from_dict(load_json(path, "llama.cpp speed profile"))

    def check_model(self, model: nn.Module) -> None:
        if self.model != shape_fingerprint(model):
            raise ValueError(
                f"This llama.cpp speed profile was measured for another model ({self.model}); this one is "
                f"{shape_fingerprint(model)}. Measure it for this model: edge_llm.luc.measure_gguf_speed(model, ...)."
            )

    def tensor_seconds(self, group: str | None, weights: int, kind: str) -> dict[str, float]:
        """Seconds a tensor of `weights` weights in `group` adds per phase in type `kind` (beyond
        Q4_0). A type the profile did not measure is refused: its speed is unknown."""
        if group is None:
            return dict.fromkeys(PHASES, 0.0)
        if kind != REFERENCE and kind not in self.per_weight[PHASES[0]][group]:
            raise ValueError(
                f"The llama.cpp speed profile has no time for {kind} in the {group} tensors; measure it with "
                f"that type, or leave {kind} out of LUCConfig.gguf_types."
            )
        return {p: 0.0 if kind == REFERENCE else weights * self.per_weight[p][group][kind] for p in PHASES}

    def predict(self, model: nn.Module, choice: dict[str, str]) -> dict[str, float]:
        """Seconds of each phase of `model` with the types of `choice`."""
        total = dict(self.reference_seconds)
        for name, module in weight_tensors(model).items():
            group = tensor_group(model, name)
            for phase, seconds in self.tensor_seconds(group, _weights(module), choice[name]).items():
                total[phase] += seconds
        return total

    def time_table(self, table: dict[str, list[Candidate]], model: nn.Module) -> None:
        """Fill every candidate's `seconds`: what its type adds to a request (the profile's prompt, then
        its generated tokens) in llama.cpp. One figure, not one per phase: the phases' fastest types
        differ, so limits on each could not all be met, and a request is what a user waits for."""
        self.check_model(model)
        tensors = weight_tensors(model)
        for name, candidates in table.items():
            group, weights = tensor_group(model, name), _weights(tensors[name])
            for candidate in candidates:
                candidate.seconds = sum(self.tensor_seconds(group, weights, candidate.kind.name).values())

    def speed_limit(self, table: dict[str, list[Candidate]], budget_bytes: int, max_slowdown: float) -> float:
        """The most seconds the types may add so that a request is at most `max_slowdown` (0.1: 10%)
        slower than with the fastest choice of types within `budget_bytes`."""
        reference = sum(self.reference_seconds.values())
        fastest = reference + fastest_seconds(table, budget_bytes)
        if fastest <= 0:
            raise ValueError(
                f"The llama.cpp speed profile predicts {fastest:.3g} s for a request: its measurements are not "
                "consistent (a machine too busy while it was measured?); measure it again."
            )
        # A millionth more: the solver holds the fastest choice to its limit only within its tolerance.
        return (1 + max_slowdown) * fastest * (1 + 1e-6) - reference


def _weights(module: nn.Module) -> int:
    return math.prod(tensor_shape(module))


def gguf_speed_cache_path(model: nn.Module, folder: Path) -> Path:
    """Where `LUCConfig(gguf_speed="measure")` keeps `model`'s profile: one file per machine,
    llama.cpp build, thread count and model shapes (anything else times differently)."""
    import llama_cpp

    from edge_llm.scheduling.measure import machine_name

    key = f"{machine_name(torch.device('cpu'))}|{llama_cpp.__version__}|{shape_fingerprint(model)}"
    return folder / f"gguf-speed-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _trimmed_copy(model: nn.Module, layers: int) -> nn.Module:
    """A deep copy of `model` with its first `layers` decoder layers only (nothing else copied
    twice: the other layers are swapped out of the original while it is copied)."""
    parts = find_decoder_parts(model)
    full = parts.layers(model)
    if layers >= len(full):
        return copy.deepcopy(model)
    parts.swap(model, parts.layers_path, nn.ModuleList(list(full)[:layers]))
    try:
        trimmed = copy.deepcopy(model)
    finally:
        parts.swap(model, parts.layers_path, full)
    trimmed.config.num_hidden_layers = layers
    return trimmed


def _layers_to_time(model: nn.Module) -> int:
    layers = find_decoder_parts(model).layers(model)
    per_layer = sum(_weights(m) for m in layers[0].modules() if isinstance(m, nn.Linear))
    return min(len(layers), max(1, math.ceil(MEASURED_WEIGHTS / max(per_layer, 1))))


def _files_to_time(model: nn.Module, types: tuple[str, ...]) -> dict[tuple[str, str], dict[str, str]]:
    """(group, type) -> the policy of a file with that group in that type (where its rows allow)
    and every other tensor in Q4_0; (`"reference"`, Q4_0) -> every tensor in Q4_0."""
    tensors = weight_tensors(model)
    reference = dict.fromkeys(tensors, REFERENCE)
    files = {("reference", REFERENCE): reference}
    for kind in types:
        if kind == REFERENCE:
            continue
        for group in ("linear", "output"):
            fitting = {
                n
                for n, m in tensors.items()
                if tensor_group(model, n) == group and block_type(kind).fits(tensor_shape(m)[1])
            }
            if fitting:
                files[(group, kind)] = {n: kind if n in fitting else REFERENCE for n in tensors}
    return files


def _request_runner(path: Path, prompt_tokens: int, decode_tokens: int, threads: int) -> Any:
    # Imported here: the export package imports LUC's modules.
    from edge_llm.export.gguf_run import LlamaCppModel

    return LlamaCppModel.for_requests(path, prompt_tokens, decode_tokens, threads)


def _fastest(runner: Any, prompt: list[int], decode: list[int], requests: int = REQUESTS) -> dict[str, float]:
    """After a short warm-up (paging the weights in, repacking them), the fastest of `requests`
    requests, per phase."""
    runner.time(prompt[:8], decode[:1])
    measured = [runner.time(prompt, decode) for _ in range(requests)]
    return {phase: min(m[phase] for m in measured) for phase in PHASES}


def measure_gguf_speed(
    model: nn.Module,
    tokenizer: Any = None,
    reference_gguf: str | Path | None = None,
    types: tuple[str, ...] | None = None,
    threads: int | None = None,
    prompt_tokens: int = 256,
    decode_tokens: int = 32,
    rounds: int = 3,
    progress: bool = True,
) -> GGUFSpeedProfile:
    """Measure, in llama.cpp on this machine, what each type of `types` (default: every type LUC
    offers) costs in each group of `model`'s tensors (see the module docstring).

    `model`: the float model to be compressed. `tokenizer` / `reference_gguf`: what `write_gguf`
    needs for the file's vocabulary. Takes about 4 minutes for a 135M model on 2 cores (one file per
    type and group, `rounds` interleaved timings of each); the files go to a temporary folder.
    """
    import llama_cpp

    from edge_llm.export.gguf import write_gguf
    from edge_llm.scheduling.measure import machine_name

    if rounds < 1 or prompt_tokens < 1 or decode_tokens < 1:
        raise ValueError("measure_gguf_speed needs rounds, prompt_tokens and decode_tokens of at least 1.")
    types = tuple(types) if types is not None else tuple(BLOCK_TYPES)
    threads = threads or torch.get_num_threads()
    layers = _layers_to_time(model)
    trimmed_probe = _trimmed_copy(model, layers)
    files = _files_to_time(trimmed_probe, types)
    fitting = {key: _group_weights(trimmed_probe, key, policy) for key, policy in files.items()}
    logger.info(
        "Timing %d llama.cpp files (%d layers of %d, %d rounds) to measure the speed of %d types: several "
        "minutes (about 4 for a 135M model on 2 cores)",
        len(files),
        layers,
        len(find_decoder_parts(model).layers(model)),
        rounds,
        len(types),
    )
    del trimmed_probe
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(vocab, (prompt_tokens + decode_tokens,), generator=generator).tolist()
    prompt, decode = ids[:prompt_tokens], ids[prompt_tokens:]
    with tempfile.TemporaryDirectory(prefix="edge-llm-speed-") as tmp:
        paths = {}
        for index, (key, policy) in enumerate(iterate(files.items(), len(files), "llama.cpp files to time", progress)):
            trimmed = _trimmed_copy(model, layers)
            apply_types(trimmed, policy)
            paths[key] = write_gguf(trimmed, Path(tmp) / f"{index}.gguf", tokenizer, reference_gguf)
            del trimmed
        times: dict[tuple[str, str], list[dict[str, float]]] = {key: [] for key in paths}
        for _ in iterate(range(rounds), rounds, "llama.cpp speed rounds", progress):
            for key, path in paths.items():  # interleaved: the machine's drift hits every file alike
                with _request_runner(path, prompt_tokens, decode_tokens, threads) as runner:
                    times[key].append(_fastest(runner, prompt, decode))
        reference = times[("reference", REFERENCE)]
        if layers < len(find_decoder_parts(model).layers(model)):
            reference_seconds = _full_reference(model, tokenizer, reference_gguf, tmp, threads, prompt, decode, rounds)
        else:  # the reference file timed above is the whole model
            reference_seconds = {p: statistics.median(r[p] for r in reference) for p in PHASES}
    per_weight: dict[str, dict[str, dict[str, float]]] = {p: {"linear": {}, "output": {}} for p in PHASES}
    for (group, kind), measured in times.items():
        if group == "reference":
            continue
        for phase in PHASES:
            differences = [m[phase] - r[phase] for m, r in zip(measured, reference, strict=True)]
            per_weight[phase][group][kind] = statistics.median(differences) / fitting[(group, kind)]
    return GGUFSpeedProfile(
        machine=machine_name(torch.device("cpu")),
        llama_cpp=llama_cpp.__version__,
        threads=threads,
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        model=shape_fingerprint(model),
        reference_seconds=reference_seconds,
        per_weight=per_weight,
    )


def _group_weights(model: nn.Module, key: tuple[str, str], policy: dict[str, str]) -> int:
    """Weights of `key`'s group that its file holds in `key`'s type."""
    group, kind = key
    tensors = weight_tensors(model)
    return sum(_weights(tensors[n]) for n, k in policy.items() if k == kind and tensor_group(model, n) == group)


def _full_reference(
    model: nn.Module,
    tokenizer: Any,
    reference_gguf: str | Path | None,
    folder: str,
    threads: int,
    prompt: list[int],
    decode: list[int],
    rounds: int,
) -> dict[str, float]:
    """The whole model's phases with every tensor in Q4_0 (the base every policy's time adds to)."""
    from edge_llm.export.gguf import write_gguf

    full = copy.deepcopy(model)
    apply_types(full, dict.fromkeys(weight_tensors(full), REFERENCE))
    path = write_gguf(full, Path(folder) / "reference-full.gguf", tokenizer, reference_gguf)
    del full
    with _request_runner(path, len(prompt), len(decode), threads) as runner:
        measured = [_fastest(runner, prompt, decode) for _ in range(rounds)]
    return {p: statistics.median(m[p] for m in measured) for p in PHASES}
