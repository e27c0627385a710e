"""Forward-pass control for Edge-LLM: depth-limited passes, gradient windows and exit voting.

The control lives in forward hooks on the base model and its decoder layers, not in a forward
method of our own, because `model.generate()` (and anything else that calls the transformers
model directly) bypasses the PEFT wrappers' `forward`. Hooks see every call.

Two kinds of pass:

* **Exit pass** (an exit is active): the decoder's layer list is swapped for the layers up to the
  exit, so the model's own masks, rotary embeddings, final norm, LM head and loss apply and the
  layers above the exit are not executed at all. When autograd is on, the layers below the exit's
  window run under `no_grad` (no activations are kept for them).
* **Voting pass** (no active exit): all layers run once, the outputs of the exit layers are
  captured, every exit's logits are computed from that one pass, and the exits vote.

With `window_input="backbone"` the layers below a window run without their adapters; in a voting
pass the model's own pass is the adapter-free backbone and each window is re-run with its adapters
from the backbone state at its bottom (what the reference implementation's eval mode does).

Not thread-safe: two threads must not run forward passes of the same model at once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_utils import slice_logits_to_keep

from edge_llm.modeling import DecoderParts, first_tensor, postprocess_logits
from edge_llm.tuner.config import EdgeLLMConfig
from edge_llm.tuner.exits import window
from edge_llm.tuner.loss import LOSS_KWARGS, DeferredHead, replace_output_fields
from edge_llm.tuner.voting import VOTING_RULES, vote


class ExitSource(Protocol):
    """What the controller reads from the tuner it serves (`EdgeLLMModel`), at the start of each
    pass: the model, the active adapter's config, the exit training runs to, each exit's head."""

    model: nn.Module

    @property
    def active_edge_config(self) -> EdgeLLMConfig: ...

    @property
    def active_exit(self) -> int | None: ...

    def exit_head(self, layer: int) -> nn.Module | None: ...


@dataclass
class _Pass:
    """State of one forward pass of the base model, and the adapter config it runs under (read
    once when the pass begins)."""

    config: Any
    exits: list[int]
    exit_layer: int | None  # the active exit, or None for a voting pass
    backbone: bool
    grad_from: int = 0  # layers below this index run without autograd
    swapped: list[tuple[str, nn.Module]] = field(default_factory=list)
    grad_was_enabled: bool = True
    adapters_on: bool = True
    return_tuple: bool = False
    labels: torch.Tensor | None = None  # set when edge-llm, not the model, computes the loss
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    # Training exit pass only: the head that kept the normed hidden states instead of logits.
    deferred_head: DeferredHead | None = None
    # Voting pass only.
    rule: str = "last"
    logits_to_keep: int | torch.Tensor = 0
    return_exit_logits: bool = False
    return_exit_states: bool = False
    voters: list[int] = field(default_factory=list)  # exits whose vote counts (weight > 0)
    computed: list[int] = field(default_factory=list)  # exits whose logits this pass computes
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    streams: dict[int, torch.Tensor] = field(default_factory=dict)


class ExitController:
    """Installs the hooks that implement exits, gradient windows and voting on `tuner.model`."""

    def __init__(self, tuner: ExitSource, parts: DecoderParts) -> None:
        self.tuner = tuner
        self.parts = parts
        self._pass: _Pass | None = None
        self._in_stream = False
        # Per-exit KV caches of the backbone streams, kept as long as the model's own cache lives.
        self._stream_caches: weakref.WeakKeyDictionary[Cache, dict[int, Cache]] = weakref.WeakKeyDictionary()
        model = tuner.model
        self.layers: list[nn.Module] = list(parts.layers(model))
        self.lora_modules = [[m for m in layer.modules() if isinstance(m, LoraLayer)] for layer in self.layers]
        self.handles = [
            model.register_forward_pre_hook(self._begin, with_kwargs=True),
            model.register_forward_hook(self._finish, with_kwargs=True),
            model.register_forward_hook(self._cleanup, with_kwargs=True, always_call=True),
        ]
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(partial(self._layer_pre_hook, index), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(partial(self._layer_post_hook, index), with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # ---------------------------------------------------------------- model-level hooks

    def _begin(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._pass is not None:  # a nested call of the same model: leave it alone
            return args, kwargs
        _check_not_empty(args, kwargs)
        config = self.tuner.active_edge_config
        return_exit_logits = bool(kwargs.pop("return_exit_logits", False))
        return_exit_states = bool(kwargs.pop("return_exit_states", False))
        if self.lora_modules and all(m.disable_adapters for modules in self.lora_modules for m in modules):
            # `disable_adapter()`: the plain base model (e.g. the reference pass of DPO), no exits.
            return args, kwargs
        exit_layer = self.tuner.active_exit
        state = _Pass(
            config=config,
            exits=list(config.exit_layers),
            exit_layer=exit_layer,
            backbone=config.window_input == "backbone",
            grad_was_enabled=torch.is_grad_enabled(),
            adapters_on=self._adapters_enabled(),
            return_tuple=kwargs.get("return_dict") is False,
        )
        # Outputs are edited by field name below; a tuple is rebuilt at the end if one was asked for.
        kwargs["return_dict"] = True
        if exit_layer is not None:
            self._begin_exit_pass(model, state)
            if config.loss_chunk_size and state.grad_was_enabled and kwargs.get("labels") is not None:
                self._take_labels(state, kwargs)
                deferred = DeferredHead(self.parts.head(model))
                state.swapped.append((self.parts.head_path, self.parts.swap(model, self.parts.head_path, deferred)))
                state.deferred_head = deferred
        else:
            self._begin_voting_pass(state, kwargs, return_exit_logits, return_exit_states)
        self._pass = state
        return args, kwargs

    def _begin_exit_pass(self, model: nn.Module, state: _Pass) -> None:
        exit_layer = state.exit_layer
        if exit_layer < len(self.layers) - 1:
            truncated = nn.ModuleList(self.layers[: exit_layer + 1])
            state.swapped.append((self.parts.layers_path, self.parts.swap(model, self.parts.layers_path, truncated)))
        head = self.tuner.exit_head(exit_layer)
        if head is not None:  # the exit's own norm and LM head, where its kind replaces the model's
            norm, lm_head = self.parts.norm(model), self.parts.head(model)
            for path, current, chosen in (
                (self.parts.norm_path, norm, head.normed(norm)),
                (self.parts.head_path, lm_head, head.output(lm_head)),
            ):
                if chosen is not current:
                    state.swapped.append((path, self.parts.swap(model, path, chosen)))
        bottom = window(exit_layer, state.config.backprop_depth).start
        if state.grad_was_enabled:
            state.grad_from = bottom
        if state.backbone and state.adapters_on:
            for index in range(bottom):
                self._set_adapters(index, enabled=False)

    def _begin_voting_pass(
        self, state: _Pass, kwargs: dict, return_exit_logits: bool, return_exit_states: bool
    ) -> None:
        state.rule = rule = state.config.voting
        state.return_exit_logits = return_exit_logits
        state.return_exit_states = return_exit_states
        state.logits_to_keep = kwargs.get("logits_to_keep", 0)
        if not VOTING_RULES[rule].last_only or state.backbone or return_exit_states:
            # The model would compute its loss on the last layer's logits only; the voted loss is
            # computed in `_finish` instead.
            self._take_labels(state, kwargs)
        if return_exit_states:
            # The caller computes what it needs from the exits' hidden states, chunk by chunk: the
            # model's own head runs on the last position only.
            kwargs["logits_to_keep"] = 1
        state.voters = voting_exits(state.exits, rule, state.config.exit_weights)
        # Exits that do not vote cost nothing (no head, no stream) unless their outputs are asked for.
        state.computed = list(state.exits) if return_exit_logits or return_exit_states else state.voters
        if state.backbone and state.adapters_on:
            for index in range(len(self.layers)):
                self._set_adapters(index, enabled=False)

    @staticmethod
    def _take_labels(state: _Pass, kwargs: dict) -> None:
        state.labels = kwargs.pop("labels", None)
        state.loss_kwargs = {k: kwargs[k] for k in LOSS_KWARGS if k in kwargs}

    def _finish(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state = self._pass
        if state is None:
            return output
        if state.deferred_head is not None:
            output = self._exit_loss(model, output, state)
        elif state.exit_layer is None:
            output = self._vote(model, output, state)
        return output.to_tuple() if state.return_tuple else output

    def _exit_loss(self, model: nn.Module, output: Any, state: _Pass) -> Any:
        chunk = state.config.loss_chunk_size
        loss = state.deferred_head.loss(
            model.config, state.labels, None if chunk == "auto" else chunk, state.loss_kwargs
        )
        # No logits: that is the point. Everything else the model returned is kept.
        return replace_output_fields(output, loss=loss, logits=None)

    def _vote(self, model: nn.Module, output: Any, state: _Pass) -> Any:
        if state.return_exit_states:
            output["exit_states"] = {layer: state.captured[layer] for layer in state.exits}
            return output
        needs_vote = not VOTING_RULES[state.rule].last_only or state.backbone
        if not (needs_vote or state.return_exit_logits):
            return output
        logits_by_exit = {
            layer: self.exit_logits(layer, slice_logits_to_keep(hidden, state.logits_to_keep))
            for layer, hidden in state.captured.items()
        }
        if not state.backbone:
            logits_by_exit[state.exits[-1]] = output.logits
        if needs_vote:
            voted = self.voted(logits_by_exit)
            loss = None
            if state.labels is not None:
                loss = model.loss_function(
                    logits=voted, labels=state.labels, vocab_size=model.config.vocab_size, **state.loss_kwargs
                )
            output = replace_output_fields(output, loss=loss, logits=voted)
        if state.return_exit_logits:
            output["exit_logits"] = {layer: logits_by_exit[layer] for layer in state.exits}
        return output

    def voted(self, logits_by_exit: dict[int, torch.Tensor]) -> torch.Tensor:
        """The adapter's vote over `logits_by_exit` (which holds at least every voting exit)."""
        config = self.tuner.active_edge_config
        voters = voting_exits(config.exit_layers, config.voting, config.exit_weights)
        weights = config.exit_weights
        if VOTING_RULES[config.voting].weighted and weights is not None:
            weights = [weights[config.exit_layers.index(layer)] for layer in voters]
        return vote([logits_by_exit[layer] for layer in voters], config.voting, weights)

    def _cleanup(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state = self._pass
        if state is None:
            return
        self._pass = None
        for path, module in reversed(state.swapped):
            self.parts.swap(model, path, module)
        if state.backbone and state.adapters_on:
            for index in range(len(self.layers)):
                self._set_adapters(index, enabled=True)
        torch.set_grad_enabled(state.grad_was_enabled)

    # ---------------------------------------------------------------- layer-level hooks

    # Registered as `partial(method, index)`, not closures: `copy.deepcopy` of the model then gives
    # hooks bound to the copy's controller (a closure would keep calling the original's).

    def _layer_pre_hook(self, index: int, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._pass
        if state is None or self._in_stream or state.exit_layer is None:
            return None
        if index < state.grad_from:
            torch.set_grad_enabled(False)
        elif index == state.grad_from and state.grad_from > 0 and getattr(layer, "gradient_checkpointing", False):
            # Re-entrant checkpointing drops gradients when no input requires grad, and the
            # input of the window comes out of a no_grad region.
            return _replace_hidden(args, kwargs, _hidden_of(args, kwargs).detach().requires_grad_(True))
        return None

    def _layer_post_hook(self, index: int, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state = self._pass
        if state is None or self._in_stream:
            return
        if state.exit_layer is not None:
            if index < state.grad_from:
                torch.set_grad_enabled(state.grad_was_enabled)
            return
        if state.backbone:
            self._run_streams(index, layer, args, kwargs, state)
        elif index in state.computed and (index != state.exits[-1] or state.return_exit_states):
            state.captured[index] = first_tensor(output)

    # ---------------------------------------------------------------- helpers

    def exit_logits(self, exit_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of `exit_layer` from that layer's (raw, un-normed) output `hidden`."""
        model = self.tuner.model
        head = self.tuner.exit_head(exit_layer)
        norm, lm_head = self.parts.norm(model), self.parts.head(model)
        if head is not None:
            norm, lm_head = head.normed(norm), head.output(lm_head)
        return postprocess_logits(model.config, lm_head(norm(hidden)))

    def _run_streams(self, index: int, layer: nn.Module, args: tuple, kwargs: dict, state: _Pass) -> None:
        """Run layer `index` again, with its adapters, for every exit whose window holds it."""
        depth = state.config.backprop_depth
        for exit_layer in state.computed:
            span = window(exit_layer, depth)
            if index not in span:
                continue
            hidden = _hidden_of(args, kwargs) if index == span.start else state.streams[exit_layer]
            stream_args, stream_kwargs = _replace_hidden(args, kwargs, hidden)
            backbone_cache = _find_cache(args, kwargs)
            if backbone_cache is not None:
                # Each stream keeps its own keys/values: they differ from the backbone's.
                caches = self._stream_caches.get(backbone_cache)
                if caches is None:
                    caches = self._stream_caches[backbone_cache] = {}
                    _mirror_cache_edits(backbone_cache, caches)
                if exit_layer not in caches:
                    caches[exit_layer] = DynamicCache(config=self.tuner.model.config)
                stream_args, stream_kwargs = _replace_cache(stream_args, stream_kwargs, caches[exit_layer])
            self._in_stream = True
            self._set_adapters(index, enabled=state.adapters_on)
            try:
                out = first_tensor(layer(*stream_args, **stream_kwargs))
            finally:
                self._set_adapters(index, enabled=False)
                self._in_stream = False
            state.streams[exit_layer] = out
            if index == exit_layer:
                state.captured[exit_layer] = out

    def _set_adapters(self, index: int, enabled: bool) -> None:
        # The private flag, not `enable_adapters()`: that one also toggles requires_grad. Merged
        # adapters are refused for window_input="backbone" (see EdgeLLMModel._check_merge_allowed).
        for module in self.lora_modules[index]:
            module._disable_adapters = not enabled

    def _adapters_enabled(self) -> bool:
        return not any(m.disable_adapters for modules in self.lora_modules for m in modules)


def _check_not_empty(args: tuple, kwargs: dict) -> None:
    """A batch of no rows or no tokens fails deep inside attention with a reshape error; say what it is."""
    for name, value in (
        ("input_ids", args[0] if args else kwargs.get("input_ids")),
        ("inputs_embeds", kwargs.get("inputs_embeds")),
    ):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and 0 in value.shape[:2]:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}: a forward pass needs at least one row of at least one token."
            )


def voting_exits(exits: list[int], rule: str, weights: list[float] | None) -> list[int]:
    """The exits whose logits enter the vote: the last for a last-only rule, those with weight > 0
    for a weighted rule, all otherwise."""
    if VOTING_RULES[rule].last_only:
        return [exits[-1]]
    if VOTING_RULES[rule].weighted and weights is not None:
        return [layer for layer, weight in zip(exits, weights, strict=True) if weight > 0]
    return list(exits)


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


# What `generate()` does to the model's cache between steps (beam search reorders it, assisted and
# prompt-lookup decoding crop it, contrastive search selects rows, ...).
_CACHE_EDITS = ("reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices", "reset")


def _mirror_cache_edits(backbone: Cache, streams: dict[int, Cache]) -> None:
    """Make every edit `generate()` applies to the backbone's cache apply to the exits' stream
    caches too, so their keys and values stay aligned with the backbone's rows and positions."""
    for name in _CACHE_EDITS:
        original = getattr(backbone, name, None)
        if original is None:
            continue

        def edit(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            result = _original(*args, **kwargs)
            for stream in streams.values():
                getattr(stream, _name)(*args, **kwargs)
            return result

        setattr(backbone, name, edit)


def _find_cache(args: tuple, kwargs: dict) -> Cache | None:
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)


def _replace_cache(args: tuple, kwargs: dict, cache: Cache) -> tuple[tuple, dict]:
    args = tuple(cache if isinstance(v, Cache) else v for v in args)
    kwargs = {k: cache if isinstance(v, Cache) else v for k, v in kwargs.items()}
    return args, kwargs
