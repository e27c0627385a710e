"""`EdgeLLMModel`: peft's LoRA tuner plus Edge-LLM's exits, gradient windows and voting.

Everything LoRA does (which layers get adapters, Conv1D/Embedding/quantized bases, merging,
saving) is inherited from `peft.LoraModel`; this class only adds the exits. The forward-pass
control itself is in `control.py`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from peft import LoraModel
from torch import nn

from edge_llm._warnings import warn_loudly
from edge_llm.luc.facts import compression_of
from edge_llm.modeling import find_decoder_parts
from edge_llm.tuner.config import MIN_EXIT_WEIGHT, EdgeLLMConfig
from edge_llm.tuner.control import ExitController, voting_exits
from edge_llm.tuner.exits import exit_for_step, resolve_exits, window
from edge_llm.tuner.heads import EXIT_HEADS, build_exit_heads
from edge_llm.tuner.loss import auto_chunk_size, shift_for_causal_lm
from edge_llm.tuner.voting import fit_exit_weights

logger = logging.getLogger(__name__)


class EdgeLLMModel(LoraModel):
    """The tuner behind `get_peft_model(model, EdgeLLMConfig(...))`.

    Public controls (reachable through the `PeftModel` too, e.g. `peft_model.set_active_exit(11)`):

    - `exit_layers`, `backprop_depth`: the resolved layout of the active adapter.
    - `set_active_exit(layer)` / `exit_at(layer)`: run depth-limited passes that end at `layer`
      (training uses this); `None` goes back to full passes with exit voting.
    - `window(layer)`: the layers that receive gradients when `layer` is the active exit.
    - `exit_for_step(step, total_steps, seed)`: the exit `exit_sampling` picks for a step.
    - `forward(..., return_exit_logits=True)` in a voting pass adds `exit_logits`
      (`{layer: logits}`) to the output.
    """

    # Exit heads live on the tuner, not inside the wrapped model, so `inject_adapter_in_model`
    # (which returns only the model) would lose them.
    uses_shared_state = True

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        self._active_exit: int | None = None
        self._controller: ExitController | None = None
        self._last_injected: str | None = None
        super().__init__(model, config, adapter_name, **kwargs)
        self.register_load_state_dict_post_hook(_check_adapter_loaded)

    # ------------------------------------------------------------------ injection

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # Adding an adapter later (PeftModel.add_adapter) calls this too, so exits are set up here
        # rather than in `_post_injection_hook`, which only runs once.
        parts = find_decoder_parts(model)
        if "exit_heads" not in self._modules:
            # Per-adapter exit heads: {adapter: {layer: head}}. As children of the tuner they are
            # saved with the adapter weights by peft (see `_get_tuner_state_dict_key_prefixes`).
            self.exit_heads = nn.ModuleDict()
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._setup_exits(model, adapter_name, parts)
        self._last_injected = adapter_name
        if self._controller is not None:
            self._controller.remove()
        # LoRA may have wrapped new modules; the controller indexes them per layer.
        self._controller = ExitController(self, parts)

    def _setup_exits(self, model: nn.Module, adapter_name: str, parts: Any) -> None:
        config: EdgeLLMConfig = self.peft_config[adapter_name]
        _record_or_check_base(config, model)
        num_layers = len(parts.layers(model))
        config.exit_layers, config.backprop_depth = resolve_exits(num_layers, config.exit_layers, config.backprop_depth)
        if config.exit_weights is not None and len(config.exit_weights) != len(config.exit_layers):
            raise ValueError(
                f"EdgeLLMConfig.exit_weights has {len(config.exit_weights)} weights but the adapter has "
                f"{len(config.exit_layers)} exits {config.exit_layers}; give one weight per exit, lowest first."
            )
        final_norm, lm_head = parts.norm(model), parts.head(model)
        hidden_size = getattr(lm_head, "in_features", None) or lm_head.weight.shape[1]
        if config.r > hidden_size:
            # A LoRA rank above the hidden size adds parameters but no expressiveness (the update's
            # rank is bounded by it), and a tampered file could allocate any amount of memory.
            raise ValueError(
                f"EdgeLLMConfig.r={config.r} exceeds the model's hidden size {hidden_size}; use at most {hidden_size}."
            )
        if EXIT_HEADS[config.exit_head].uses_rank and config.exit_head_rank > hidden_size:
            # A rank above the hidden size adds nothing and, read from a tampered file, could
            # allocate any amount of memory.
            raise ValueError(
                f"EdgeLLMConfig.exit_head_rank={config.exit_head_rank} exceeds the model's hidden size "
                f"{hidden_size}; use at most {hidden_size}."
            )
        dtype = next(final_norm.parameters(), lm_head.weight).dtype
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # as peft keeps LoRA weights of half-precision models in float32
        heads = build_exit_heads(
            config.exit_head, config.exit_layers, final_norm, lm_head, config.exit_head_rank, dtype
        )
        heads.requires_grad_(not config.inference_mode)
        self.exit_heads[adapter_name] = heads
        # Layers that carry this adapter (LoRA's `layers_to_transform`, else all) but no window trains.
        chosen = config.layers_to_transform
        adapted = set(range(num_layers)) if chosen is None else {chosen} if isinstance(chosen, int) else set(chosen)
        uncovered = sorted(adapted - {i for e in config.exit_layers for i in window(e, config.backprop_depth)})
        logger.info(
            "Edge-LLM adapter %r: exits %s, backprop depth %d, voting %r",
            adapter_name,
            config.exit_layers,
            config.backprop_depth,
            config.voting,
        )
        if (
            config.inference_mode
            and config.voting == "weighted"
            and config.exit_weights is None
            and len(config.exit_layers) > 1
        ):
            warn_loudly(
                logger,
                f"Edge-LLM adapter {adapter_name!r} votes with voting='weighted' but its exit weights were never "
                "fitted: it votes uniformly until they are (EdgeTrainer.train() fits them; or call "
                "calibrate_exit_weights on held-out batches).",
            )
        if uncovered and not config.inference_mode:
            # Said loudly: a plain script never shows the info log, and these layers' adapters
            # stay at their initial values for the whole run.
            message = (
                f"Edge-LLM adapter {adapter_name!r}: layers {uncovered} ({len(uncovered)} of {num_layers}) are in no "
                f"exit's window (exits {config.exit_layers}, backprop_depth {config.backprop_depth}) and will never be "
                "trained. A deeper backprop_depth or lower exits cover them."
            )
            warn_loudly(logger, message)

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        if self.active_edge_config.window_input == "backbone":
            raise ValueError(
                "Cannot merge an Edge-LLM adapter with window_input='backbone': every window must see the layers "
                "below it without their adapters, which merged weights cannot provide. Keep the adapters separate, "
                "or train with window_input='adapted'."
            )

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
        config = self.active_edge_config
        voters = voting_exits(config.exit_layers, config.voting, config.exit_weights)
        if merge and voters != [config.exit_layers[-1]]:
            warn_loudly(
                logger,
                f"merge_and_unload(): the merged model is a plain transformers model that answers from its last "
                f"layer (exit {config.exit_layers[-1]}) only; this adapter's {config.voting!r} vote over exits "
                f"{voters} is not kept, so its outputs differ from the adapter's. Keep the adapter unmerged to keep "
                "them (edge_llm.export's bundle keeps the vote too).",
            )
        model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        # The returned model is a plain transformers model: its last layer is its only exit.
        if self._controller is not None:
            self._controller.remove()
            self._controller = None
        return model

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            # peft would apply every adapter's LoRA update while the exits and vote of the first
            # alone steer the pass: a model no adapter was trained as.
            raise ValueError(
                f"Edge-LLM adapters {names} cannot be active together: each has its own exits and vote, and a "
                "forward pass follows one of them. Activate one: set_adapter(name)."
            )
        super().set_adapter(adapter_name, inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        if list(self.peft_config) == [adapter_name]:
            # peft would leave a model with no adapter whose next forward fails on a bare KeyError.
            raise ValueError(
                f"{adapter_name!r} is the only adapter; deleting it would leave a model that cannot run. unload() "
                "gives the base model back; or add another adapter first."
            )
        super().delete_adapter(adapter_name)
        if adapter_name in self.exit_heads:  # ModuleDict.pop takes no default
            del self.exit_heads[adapter_name]

    # ------------------------------------------------------------------ exits

    @property
    def active_edge_config(self) -> EdgeLLMConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def exit_layers(self) -> list[int]:
        return list(self.active_edge_config.exit_layers)

    @property
    def backprop_depth(self) -> int:
        return self.active_edge_config.backprop_depth

    @property
    def active_exit(self) -> int | None:
        return self._active_exit

    def set_active_exit(self, layer: int | None) -> None:
        """Make `layer` the exit of the following forward passes, or `None` for exit voting.

        With an active exit, a forward pass runs the decoder layers up to `layer` only and returns
        that exit's logits (and loss, given labels); with autograd on, only the `backprop_depth`
        layers ending at `layer` build a graph.
        """
        if layer is not None and layer not in self.exit_layers:
            raise ValueError(f"Layer {layer!r} is not an exit of this adapter; its exits are {self.exit_layers}.")
        self._active_exit = layer

    @contextlib.contextmanager
    def exit_at(self, layer: int | None) -> Iterator[None]:
        """Context manager form of `set_active_exit`; restores the previous exit on leaving."""
        previous = self._active_exit
        self.set_active_exit(layer)
        try:
            yield
        finally:
            self._active_exit = previous

    def window(self, layer: int) -> range:
        """The decoder layers that receive gradients when exit `layer` is active."""
        if layer not in self.exit_layers:
            raise ValueError(f"Layer {layer!r} is not an exit of this adapter; its exits are {self.exit_layers}.")
        return window(layer, self.backprop_depth)

    def exit_for_step(self, step: int, total_steps: int, seed: int = 0) -> int:
        """The exit that the adapter's `exit_sampling` rule assigns to optimizer step `step`."""
        return exit_for_step(self.exit_layers, self.active_edge_config.exit_sampling, step, total_steps, seed)

    def exit_head(self, layer: int) -> nn.Module | None:
        """The trainable per-exit head of `layer` (`exit_head="norm"` or `"lora"`), else None."""
        adapter, key = self.active_adapters[0], str(layer)
        if adapter not in self.exit_heads or key not in self.exit_heads[adapter]:
            return None
        return self.exit_heads[adapter][key]

    def exit_logits(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits of exit `layer` given the raw output of decoder layer `layer`."""
        return self._controller.exit_logits(layer, hidden_states)

    def voted(self, logits_by_exit: dict[int, torch.Tensor]) -> torch.Tensor:
        """The adapter's vote (its `voting` rule and `exit_weights`) over per-exit logits."""
        return self._controller.voted(logits_by_exit)

    def exit_logit_chunks(
        self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, chunk_size: int | None = None
    ) -> Iterator[tuple[torch.Tensor, dict[int, torch.Tensor]]]:
        """One voting pass over `inputs`, then every exit's next-token logits, a chunk of target
        positions at a time: yields `(targets, {layer: logits})` with `targets` the chunk's true next
        tokens (positions whose label is `IGNORE_INDEX` left out).

        Evaluation and exit-weight fitting need every exit's full-vocabulary logits; holding them
        for a whole batch at once ([exits x batch x seq x vocab]) would peak far above training.
        """
        with self.exit_at(None):
            states = self.model(**inputs, return_exit_states=True).exit_states
        flat = {layer: shift_for_causal_lm(hidden, labels) for layer, hidden in states.items()}
        targets = next(iter(flat.values()))[1]
        if chunk_size is None:
            hidden = next(iter(states.values()))
            vocab = self.model.config.vocab_size * len(states)
            chunk_size = auto_chunk_size(targets.numel(), hidden.shape[-1], vocab)
        for start in range(0, targets.numel(), chunk_size):
            span = slice(start, start + chunk_size)
            yield targets[span], {layer: self.exit_logits(layer, h[span]) for layer, (h, _) in flat.items()}

    def select_exits(
        self,
        batches: Iterable[dict[str, torch.Tensor]],
        all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[int]:
        """Keep only the exits that predict: fit vote weights on `batches` (with `labels`) and drop
        every exit below the last whose weight is under `MIN_EXIT_WEIGHT`, with its exit head.

        Call before training (the optimizer must not hold the dropped heads). Returns the kept exits.
        """
        config = self.active_edge_config
        candidates = list(config.exit_layers)
        weights = self.calibrate_exit_weights(batches, all_reduce_sum)
        kept = [e for e, w in zip(candidates, weights, strict=True) if w >= MIN_EXIT_WEIGHT or e == candidates[-1]]
        heads = self.exit_heads[self.active_adapters[0]]
        for layer in set(candidates) - set(kept):
            if str(layer) in heads:  # ModuleDict.pop takes no default
                del heads[str(layer)]
        config.exit_layers, config.exit_weights, config.select_exits = kept, None, False
        logger.info(
            "Exit selection: kept exits %s of %s (fitted weights %s; an exit needs %.2f)",
            kept,
            candidates,
            [round(w, 4) for w in weights],
            MIN_EXIT_WEIGHT,
        )
        return kept

    @torch.no_grad()
    def calibrate_exit_weights(
        self,
        batches: Iterable[dict[str, torch.Tensor]],
        all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[float]:
        """Fit `exit_weights` for `voting="weighted"` on held-out batches (with `labels`).

        Each exit's probability of the true next token is collected from voting passes, and the
        mixture weights that maximise the held-out likelihood are fitted (see `fit_exit_weights`);
        exits whose weight is below `MIN_EXIT_WEIGHT` are then left out of the vote (weight 0, so
        they cost nothing at inference) and the rest renormalised. The weights are stored in the
        adapter config (saved with the adapter) and returned.
        """
        rows = []
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            for targets, logits_by_exit in self.exit_logit_chunks(inputs, batch["labels"]):
                index = targets.unsqueeze(-1)
                rows.append(
                    torch.stack(
                        [
                            torch.log_softmax(logits.float(), dim=-1).gather(-1, index).squeeze(-1)
                            for logits in logits_by_exit.values()
                        ]
                    )
                )
        log_probs = torch.cat(rows, dim=1) if rows else torch.zeros(len(self.exit_layers), 0)
        weights = fit_exit_weights(log_probs, all_reduce_sum=all_reduce_sum)
        # A negligible weight still costs its exit's head (and window) at every inference, and lets a
        # confident but wrong exit tip near-ties: such exits leave the vote.
        kept = [w if w >= MIN_EXIT_WEIGHT else 0.0 for w in weights]
        if sum(kept) > 0:
            weights = [w / sum(kept) for w in kept]
        self.active_edge_config.exit_weights = weights
        logger.info("Exit weights for weighted voting (exits %s): %s", self.exit_layers, [round(w, 4) for w in weights])
        return weights


def _check_adapter_loaded(tuner: EdgeLLMModel, incompatible: Any) -> None:
    """After peft loads an adapter: every LoRA tensor in the file and finite (peft only warns of
    missing ones and computes with fresh ones); its trained exit heads all in the file, and no heads
    for exits its config lacks (an edited `exit_layers`), or trained heads would be silently
    replaced by fresh ones or dropped."""
    adapter = tuner._last_injected
    if adapter is None:
        return

    def is_lora(key: str) -> bool:
        return f".lora_A.{adapter}." in key or f".lora_B.{adapter}." in key

    lora_missing = sorted(filter(is_lora, incompatible.missing_keys))
    ours = {n: p for n, p in tuner.named_parameters() if f".{adapter}." in n and ("lora_" in n or "exit_heads" in n)}
    # A merged bundle's adapter holds its exit heads only (its LoRA updates are in the base weights)
    # and says so with init_lora_weights=True: zero updates. Anything less than all is damage.
    heads_only = len(lora_missing) == sum(map(is_lora, ours)) and tuner.peft_config[adapter].init_lora_weights is True
    if lora_missing and not heads_only:
        raise ValueError(
            f"The Edge-LLM adapter {adapter!r} is incomplete: {len(lora_missing)} LoRA tensors are missing from its "
            f"weights file, e.g. {lora_missing[0]}. Save the adapter again."
        )
    for name, parameter in ours.items():
        if not torch.isfinite(parameter).all():
            raise ValueError(
                f"The Edge-LLM adapter {adapter!r} holds NaN or infinity in {name}; its weights file is damaged "
                "(or training diverged). Save a healthy adapter again."
            )
    if adapter not in tuner.exit_heads or not len(tuner.exit_heads[adapter]):
        return
    marker = f"exit_heads.{adapter}."
    missing = sorted(k for k in incompatible.missing_keys if marker in k)
    unexpected = sorted(k for k in incompatible.unexpected_keys if "exit_heads." in k)
    if missing or unexpected:
        raise ValueError(
            f"The Edge-LLM adapter {adapter!r} does not match its exit heads: "
            + (f"missing from the weights file: {missing[:4]}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"in the file but not in adapter_config.json's exits: {unexpected[:4]}" if unexpected else "")
            + ". Was adapter_config.json's exit_layers edited, or the weights file cut? Save the adapter again."
        )


def _record_or_check_base(config: EdgeLLMConfig, model: nn.Module) -> None:
    """A new adapter records what its base was compressed with; a loaded one is checked against
    the base it is put on, since LoRA weights and fitted exit weights learned over one
    compression silently mean something else over another (e.g. `AutoPeftModelForCausalLM`
    loading the uncompressed base named in the adapter's config)."""
    found = compression_of(model)
    if config.base_compression is None:
        config.base_compression = found
    elif config.base_compression != found:
        message = (
            f"This Edge-LLM adapter was made on a base compressed as {config.base_compression!r}, but it is being "
            f"put on a base compressed as {found!r}: its outputs will differ from the ones it was tuned for. Load "
            "the base it was made on (the LUC checkpoint, not the original model) before the adapter."
        )
        warn_loudly(logger, message, stacklevel=3)


def edge_config_of(model: nn.Module) -> EdgeLLMConfig | None:
    """The active Edge-LLM adapter's config of `model` (a `PeftModel` or the `EdgeLLMModel` tuner
    inside it); None for a model without an Edge-LLM adapter."""
    tuner = model if isinstance(model, EdgeLLMModel) else getattr(model, "base_model", None)
    return tuner.active_edge_config if isinstance(tuner, EdgeLLMModel) else None
