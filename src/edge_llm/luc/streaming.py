"""LUC on a model larger than memory: profile and compress one decoder layer at a time, reading
the safetensors files as memory maps and writing each compressed layer as soon as it is done.

    policy = compress_checkpoint("big-model/", "big-model-luc/", LUCConfig(
        avg_bits=4.0, metric="output_mse", dataset=texts, tokenizer="big-model/"))

The model is built on the meta device; a layer's tensors are read from their file only while that
layer is worked on, and the file is closed (its pages unmapped) before the next. Calibration runs
as in memory (GPTQ's sequential scheme): the hidden states of the calibration batches are the only
thing carried from layer to layer. Peak memory is about one float layer, its compressed copies
and the calibration activations, whatever the depth. Two passes over the files: the sensitivity
profile (uncompressed inputs, as `profile_sensitivity` measures) and, after the search, the
compression (each layer calibrated on the compressed layers below it, as `compress_layers` does).
The result is what in-memory LUC with the same settings saves, tensor for tensor; it is written
as one shard per decoder layer and per tensor outside them (the embedding, the norm, the head),
which `from_pretrained` loads as any sharded checkpoint.

Written here because no library does it: transformers' quantizers and accelerate's offloading
load or map the whole model and LUC then holds every compressed layer; `llama-quantize` streams
tensors but has no calibration. Limits: the `"kl"` metric runs the model above each layer for every
candidate (every later layer read again per layer), so profiling out of core measures
`"output_mse"` (or takes a given policy); the llama.cpp target (`target="gguf"`) measures Fisher
information through the whole model, so it is refused here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from edge_llm._io import atomic_directory, load_json
from edge_llm._memory import limit_allocator_reserve
from edge_llm.luc.calibration import LayerRunner, _LayerCall, iterate
from edge_llm.luc.checks import MARKER, policy_fingerprint
from edge_llm.luc.compress import compress_layer
from edge_llm.luc.config import LUCConfig
from edge_llm.luc.integration import config_tokens, mark_compressed
from edge_llm.luc.policy import LUCPolicy
from edge_llm.luc.profile import METRICS, SensitivityProfile, measure_layer, warn_if_long
from edge_llm.luc.saving import owned_by_model_save
from edge_llm.modeling import DecoderParts, find_decoder_parts

logger = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class Checkpoint:
    """The tensors of a safetensors checkpoint folder (one file or an index of shards), read a few
    at a time: each read opens the files it needs and closes them again."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if (self.folder / _INDEX).is_file():
            index = load_json(self.folder / _INDEX, "safetensors index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{self.folder / _INDEX} has no weight_map of tensor names to file names.")
            for file in set(weight_map.values()):
                # A shard named by a path could make the reader open any file: only names in the folder.
                if Path(file).name != file or not (self.folder / file).is_file():
                    raise ValueError(
                        f"{self.folder / _INDEX} names the shard {file!r}, which is not a file in its folder."
                    )
            self.files = dict(weight_map)
        elif (self.folder / _SINGLE).is_file():
            with safe_open(self.folder / _SINGLE, "pt") as handle:
                self.files = dict.fromkeys(handle.keys(), _SINGLE)
        else:
            raise ValueError(
                f"{self.folder} holds no safetensors weights ({_SINGLE} or {_INDEX}): LUC layer by layer reads "
                "those; save the model with save_pretrained first."
            )

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, copied out of their files."""
        missing = [name for name in names if name not in self.files]
        if missing:
            raise ValueError(f"{self.folder} lacks the tensors {missing[:5]} the model's config needs.")
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(self.folder / file, "pt") as handle:
                for name in file_names:
                    # get_tensor views the mapped file: a copy lets the mapping, and the pages of it
                    # read, go when the file is closed.
                    tensors[name] = handle.get_tensor(name).clone()
        return tensors


def materialize(module: nn.Module, prefix: str, checkpoint: Checkpoint) -> None:
    """Give a meta-device `module` its tensors from `checkpoint` (names under `prefix`), checked
    for shape and cast to the dtype the model was built with, as `from_pretrained` casts them."""
    expected = module.state_dict()
    tensors = checkpoint.read([prefix + name for name in expected])
    loaded = {}
    for name, meta in expected.items():
        tensor = tensors[prefix + name]
        if tensor.shape != meta.shape:
            raise ValueError(
                f"{checkpoint.folder}: tensor {prefix + name} has shape {tuple(tensor.shape)}, the config says "
                f"{tuple(meta.shape)}."
            )
        loaded[name] = tensor.to(meta.dtype)
    module.load_state_dict(loaded, strict=True, assign=True)


class _ReachedLayer(Exception):
    """Raised by the hook that captures the first decoder layer's inputs: nothing above it runs."""


class StreamingRunner(LayerRunner):
    """`LayerRunner` over a model whose decoder layers live on the meta device until they are
    worked on: it captures only the first layer's inputs and carries the hidden states upwards,
    keeping the inputs of the layers being worked on (`advance` adds the next, `forget` drops one)."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, tokens: torch.Tensor, batch_size: int = 4) -> None:
        self.model = model
        self.parts = find_decoder_parts(model)
        self.layers = list(self.parts.layers(model))
        self.batches = list(tokens.split(batch_size))
        self.calls: list[dict[int, _LayerCall]] = []
        below = _below_layers(model, self.parts)
        for module, prefix in below:
            materialize(module, prefix, checkpoint)
        try:
            self._capture()
        finally:  # the embeddings are needed again only to write them
            for module, _ in below:
                module.to("meta")

    @torch.no_grad()
    def _capture(self) -> None:
        for batch in self.batches:

            def record(layer: nn.Module, args: tuple, kwargs: dict) -> None:
                self.calls.append({0: _LayerCall(args, kwargs)})
                raise _ReachedLayer

            handle = self.layers[0].register_forward_pre_hook(record, with_kwargs=True)
            try:
                self.model(input_ids=batch, use_cache=False)
            except _ReachedLayer:
                pass
            finally:
                handle.remove()

    def advance(self, layer: int) -> None:
        if layer + 1 < len(self.layers):
            for calls in self.calls:  # the next layer is called as this one was, on this one's output
                calls[layer + 1] = _LayerCall(calls[layer].args, calls[layer].kwargs)
        super().advance(layer)

    def forget(self, layer: int) -> None:
        for calls in self.calls:
            calls.pop(layer, None)


def _below_layers(model: nn.Module, parts: DecoderParts) -> list[tuple[nn.Module, str]]:
    """The modules with weights that run before the first decoder layer (the embeddings), with their
    state-dict prefixes: what capturing the first layer's inputs needs."""
    above = (parts.layers_path, parts.norm_path, parts.head_path)
    return [
        (module, name + ".")
        for name, module in model.named_modules()
        if name
        and not any(name == path or name.startswith(path + ".") for path in above)
        and any(True for _ in module.parameters(recurse=False))
    ]


def _outside_names(model: nn.Module, parts: DecoderParts) -> list[str]:
    """The names of the tensors outside the decoder layers that a save writes: a tied head shares the
    embedding's tensor and is saved once, under its first name, as `save_pretrained` saves it (read
    on the meta model, before any tensor is materialized apart from another)."""
    names, seen = [], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not name.startswith(parts.layers_path + ".") and id(tensor) not in seen:
            seen.add(id(tensor))
            names.append(name)
    return names


def _empty_model(folder: Path) -> nn.Module:
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # done by from_config, but undone by accelerate's meta-device parameter hook
    return model.eval()


def _fingerprint(folder: Path, tokens: torch.Tensor, settings: dict) -> str:
    """Identifies a profile measured out of core: the checkpoint's files (names, sizes, tensor names),
    the calibration tokens and the settings (the weights are not read for it)."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.name.encode())
        digest.update(str(file.stat().st_size).encode())
        with safe_open(file, "pt") as handle:
            digest.update(json.dumps(sorted(handle.keys())).encode())
    digest.update(tokens.numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def profile_checkpoint(
    model: nn.Module, checkpoint: Checkpoint, tokens: torch.Tensor, config: LUCConfig, progress: bool = True
) -> SensitivityProfile:
    """`profile_sensitivity(metric="output_mse")` of the checkpoint, one decoder layer in memory."""
    method, targets = config.method, config.targets
    candidates = [(int(b), float(s)) for b in config.bits for s in config.sparsities]
    scorer = METRICS["output_mse"]
    runner = StreamingRunner(model, checkpoint, tokens)
    num_layers = len(runner.layers)
    damage, layer_params, layer_bytes = [], [], []
    start = time.perf_counter()
    for layer in iterate(range(num_layers), num_layers, "LUC sensitivity (output_mse, layer by layer)", progress):
        if layer == 1:
            advice = "Fewer candidate bits/sparsities or calibration samples make it faster."
            warn_if_long(time.perf_counter() - start, num_layers, len(candidates), scorer, advice)
        materialize(runner.layers[layer], f"{runner.parts.layers_path}.{layer}.", checkpoint)
        runner.advance(layer)  # the layer's original output: the next layer's input, and the reference
        last = layer + 1 == num_layers
        batches = range(len(runner.batches))
        reference = [scorer.reference(runner, b) if last else runner.layer_input(b, layer + 1) for b in batches]
        row, params, nbytes = measure_layer(runner, layer, candidates, method, targets, scorer, reference)
        damage.append(row)
        layer_params.append(params)
        layer_bytes.append(nbytes)
        runner.forget(layer)
        runner.layers[layer].to("meta")
    settings = {"candidates": candidates, "method": method, "metric": "output_mse", "targets": targets}
    fingerprint = _fingerprint(checkpoint.folder, tokens, settings)
    return SensitivityProfile(candidates, damage, layer_params, layer_bytes, "output_mse", method, targets, fingerprint)


@torch.no_grad()  # the compressed tensors must not keep a graph back to the float weights
def compress_checkpoint(
    model_dir: str | Path, out_dir: str | Path, config: LUCConfig, progress: bool = True
) -> LUCPolicy:
    """LUC-compress the transformers checkpoint in `model_dir` into `out_dir`, one decoder layer in
    memory at a time (see the module docstring); returns the policy.

    `config` is an `LUCConfig` as `from_pretrained` takes it, with `metric="output_mse"` or a
    `policy`. `out_dir` is written as a whole (a killed run leaves it as it was), keeping the files
    there a model save does not own, as `save_pretrained` of a LUC model does. Bounds glibc's
    allocator reserve for the rest of the process (`edge_llm.limit_allocator_reserve`).
    """
    if config.target != "pytorch":
        raise ValueError(
            "LUC layer by layer compresses for LUC's own layers (target='pytorch'); target='gguf' measures "
            "Fisher information through the whole model and needs it in memory."
        )
    given = config.policy
    if given is None and config.metric != "output_mse":
        raise ValueError(
            f"LUCConfig.metric={config.metric!r} runs the model above each layer for every candidate, which out of "
            "core reads every later layer again per layer: use metric='output_mse', or pass a policy."
        )
    folder = Path(model_dir)
    checkpoint = Checkpoint(folder)
    # Each layer frees what the last one allocated; with glibc's defaults its heap keeps that memory
    # (a 12-layer model's profile grew 0.3 GiB above one layer's need). The point here is a bound.
    limit_allocator_reserve()
    model = _empty_model(folder)
    parts = find_decoder_parts(model)
    outside = _outside_names(model, parts)
    num_layers = len(parts.layers(model))
    if given is not None and len(given.layers) != num_layers:
        raise ValueError(f"The LUC policy covers {len(given.layers)} layers but the model has {num_layers}.")
    needs_data = given is None or given.method.needs_calibration_for(s for _, s in given.layers)
    tokens = config_tokens(config) if needs_data else None
    policy = given or profile_checkpoint(model, checkpoint, tokens, config, progress).search(config.budget)
    # As `compress_layers`: calibrated only where the policy's method uses data.
    calibrate = policy.method.needs_calibration_for(s for _, s in policy.layers)
    with atomic_directory(Path(out_dir), carry_over=lambda name: not owned_by_model_save(name)) as staging:
        # One shard per decoder layer and per tensor outside them (an embedding is a layer's size or more).
        shards = _Shards(staging, num_layers + len(outside))
        runner = StreamingRunner(model, checkpoint, tokens) if calibrate else None
        layers = parts.layers(model)
        for index in iterate(range(num_layers), num_layers, "LUC compress (layer by layer)", progress):
            prefix = f"{parts.layers_path}.{index}."
            materialize(layers[index], prefix, checkpoint)
            compress_layer(runner, layers, index, policy.layers[index], policy.method, policy.targets)
            if runner is not None:
                runner.forget(index)
            shards.write({prefix + name: tensor for name, tensor in layers[index].state_dict().items()})
            layers[index].to("meta")
        mark_compressed(model, policy, config)
        dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
        for name in outside:
            tensor = {name: checkpoint.read([name])[name].to(dtypes[name])}
            shards.write(tensor | ({MARKER: policy_fingerprint(policy)} if name == outside[-1] else {}))
        shards.write_index()
        model.config.save_pretrained(staging)
        if (folder / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(folder).save_pretrained(staging)
        elif model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
    return policy


class _Shards:
    """A sharded safetensors checkpoint written one shard at a time, then its index."""

    def __init__(self, folder: Path, count: int) -> None:
        self.folder, self.count = folder, count
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{len(set(self.weight_map.values())) + 1:05d}-of-{self.count:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, self.folder / name, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())

    def write_index(self) -> None:
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        (self.folder / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
