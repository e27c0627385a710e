"""Calibration data for LUC, and running a model's decoder layer by layer on it.

Profiling and GPTQ/Wanda compression look at one decoder layer at a time: they need the inputs
each layer receives on calibration data (and the extra arguments the model passes to its layers:
masks, rotary embeddings, positions). One forward pass with pre-hooks on every layer captures
both; afterwards any stretch of layers can be re-run from any layer's input.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edge_llm.modeling import DecoderParts, find_decoder_parts, first_tensor, postprocess_logits

logger = logging.getLogger(__name__)


def calibration_tokens(
    dataset: Any,
    tokenizer: Any = None,
    num_samples: int = 16,
    seq_len: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """`(num_samples, seq_len)` token ids drawn from `dataset`.

    `dataset` is a list of strings (then `tokenizer` is needed), a list of token-id lists (or a
    2-D tensor), or a `datasets.Dataset` with a `text` or `input_ids` column. Texts are joined into
    one stream and `num_samples` windows of `seq_len` tokens are drawn at random positions (seeded),
    as GPTQ does. Token-id lists are samples already (as GPTQ configs take them): the first
    `num_samples` are used as they are, cut to `seq_len`, or all to the shortest one's length when
    they are shorter (logged).
    """
    if hasattr(dataset, "column_names"):
        if "input_ids" in dataset.column_names:
            dataset = list(dataset["input_ids"])
        elif "text" in dataset.column_names:
            dataset = list(dataset["text"])
        else:
            raise ValueError(
                f"A calibration Dataset needs a 'text' or 'input_ids' column, it has {dataset.column_names}."
            )
    items = list(dataset) if dataset is not None else []
    if not items:
        raise ValueError("LUC needs calibration data: pass dataset=[...texts...] (with a tokenizer) or token-id lists.")
    if not isinstance(items[0], str):
        return _given_samples(items, num_samples, seq_len)
    if tokenizer is None:
        raise ValueError("The calibration dataset holds text: also pass the tokenizer (LUCConfig(tokenizer=...)).")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [t for text in items for t in [*tokenizer(text, add_special_tokens=False)["input_ids"], *separator]]
    if len(stream) < seq_len + 1:
        raise ValueError(f"The calibration data has {len(stream)} tokens; need more than seq_len={seq_len}.")
    tokens = torch.tensor(stream, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (num_samples,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def _given_samples(items: list[Any], num_samples: int, seq_len: int) -> torch.Tensor:
    rows = [[int(t) for t in ids] for ids in items[:num_samples]]
    length = min(seq_len, *(len(r) for r in rows))
    if length < 2:
        raise ValueError("Calibration token samples need at least 2 tokens each; one of them is shorter.")
    if length < seq_len or len(rows) < num_samples:
        logger.info(
            "Calibrating on the %d given token samples, %d tokens each (asked: %d samples of %d tokens).",
            len(rows),
            length,
            num_samples,
            seq_len,
        )
    return torch.tensor([r[:length] for r in rows], dtype=torch.long)


@dataclass
class _LayerCall:
    args: tuple
    kwargs: dict[str, Any]


class LayerRunner:
    """Runs a causal LM's decoder layers one at a time on captured calibration inputs."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int = 4) -> None:
        self.model = model
        self.parts: DecoderParts = find_decoder_parts(model)
        self.layers = list(self.parts.layers(model))
        device = next(model.parameters()).device
        self.batches = [chunk.to(device) for chunk in tokens.split(batch_size)]
        # calls[b][l]: what layer l received for batch b; hidden states are kept per batch only for
        # layer 0 and refreshed as layers are run.
        self.calls: list[list[_LayerCall]] = []
        self._capture()

    @torch.no_grad()
    def _capture(self) -> None:
        for batch in self.batches:
            calls: list[_LayerCall] = []

            def record(layer: nn.Module, args: tuple, kwargs: dict, calls: list[_LayerCall] = calls) -> None:
                calls.append(_LayerCall(args, kwargs))

            handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.layers]
            try:
                self.model(input_ids=batch, use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
            self.calls.append(calls)

    def layer_input(self, batch: int, layer: int) -> torch.Tensor:
        """The hidden state layer `layer` received in the captured (uncompressed) pass."""
        call = self.calls[batch][layer]
        return call.args[0] if call.args else call.kwargs["hidden_states"]

    def run_layer(self, layer: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        call = self.calls[batch][layer]
        args, kwargs = call.args, call.kwargs
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": hidden}
        return first_tensor(self.layers[layer](*args, **kwargs))

    def run_from(self, layer: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run layers `layer`.. to the top from `hidden`; returns the final log-probabilities."""
        for index in range(layer, len(self.layers)):
            hidden = self.run_layer(index, batch, hidden)
        logits = self.parts.head(self.model)(self.parts.norm(self.model)(hidden))
        return torch.log_softmax(postprocess_logits(self.model.config, logits).float(), dim=-1)

    def advance(self, layer: int) -> None:
        """Replace the captured inputs of layer `layer + 1` by layer `layer`'s current outputs.

        Used after compressing layer `layer`, so the next layer is calibrated on what it will
        really receive (sequential calibration, as in GPTQ).
        """
        if layer + 1 >= len(self.layers):
            return
        for batch in range(len(self.batches)):
            out = self.run_layer(layer, batch, self.layer_input(batch, layer))
            call = self.calls[batch][layer + 1]
            if call.args:
                call.args = (out, *call.args[1:])
            else:
                call.kwargs = {**call.kwargs, "hidden_states": out}


def target_linears(layer: nn.Module, targets: Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """The Linear modules of a decoder layer that LUC compresses (all, or those named in `targets`)."""
    found = {
        name: module
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and (targets is None or name.rsplit(".", 1)[-1] in targets)
    }
    if not found:
        named = f" named {list(targets)}" if targets else ""
        raise ValueError(f"No Linear modules{named} in {type(layer).__name__}.")
    return found


@torch.no_grad()
def input_hessians(runner: LayerRunner, layer: int, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Sum of x x^T over the calibration tokens entering each Linear of `layer` (float32, in x in).

    GPTQ uses it as the Hessian of the layer's output error; its diagonal's square root is each
    input channel's norm, which Wanda scores weights with.
    """
    hessians = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for name, m in linears.items()}

    def accumulate(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hessians[name].addmm_(x.t(), x)

        return hook

    handles = [m.register_forward_hook(accumulate(name)) for name, m in linears.items()]
    try:
        for batch in range(len(runner.batches)):
            runner.run_layer(layer, batch, runner.layer_input(batch, layer))
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def iterate(items: Iterable, total: int, desc: str, progress: bool):
    """`items`, with a tqdm bar when `progress` is set."""
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc)
