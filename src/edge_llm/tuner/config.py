"""`EdgeLLMConfig`: LoRA plus Edge-LLM's early exits, depth-limited backprop and exit voting."""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peft import LoraConfig

from edge_llm.luc.lora import CUSTOM_MODULES
from edge_llm.tuner.exits import EXIT_SAMPLERS
from edge_llm.tuner.heads import EXIT_HEADS
from edge_llm.tuner.peft_type import EDGE_LLM_PEFT_TYPE
from edge_llm.tuner.voting import VOTING_RULES

WINDOW_INPUTS = ("adapted", "backbone")
# An exit whose weight in a vote fitted before training is below this gets no steps (select_exits).
MIN_EXIT_WEIGHT = 0.05


@dataclass
class EdgeLLMConfig(LoraConfig):
    """Configuration of an Edge-LLM adapter (Yu et al., DAC 2024, arXiv 2406.15758).

    The adapter is LoRA on `target_modules` (every `peft.LoraConfig` field works as in LoRA) plus
    early exits. Training runs one exit per step: the model is executed only up to that exit,
    gradients flow through the `backprop_depth` decoder layers that end at it (its *window*), and
    the layers below the window run without autograd. At inference every exit reads its layer's
    output through the final norm and LM head, and the exits vote.

    Args:
        exit_layers (`list[int]`, `"auto"` or `None`):
            0-based decoder-layer indices with an exit. The exit at layer `i` reads the hidden state
            that layer `i` outputs. The last layer is always an exit (added when missing). `None`
            (the paper's layout) spaces exits `backprop_depth` layers apart from the top, so the
            windows tile the model. `"auto"` (default): those same exits are candidates, and
            `EdgeTrainer` keeps only the ones that predict (see `select_exits`): on a 135M model
            only the last one, so every step trains the layers that make the prediction.
        select_exits (`bool`):
            Before the first training step, `EdgeTrainer` scores every exit on a few training
            batches and keeps only those whose weight in a vote fitted to those batches is at least
            `MIN_EXIT_WEIGHT` (the last exit always stays), so no steps go to exits that cannot
            predict (the intermediate exits of small models). Set by `exit_layers="auto"`; the
            saved adapter holds the exits that were kept.
        backprop_depth (`int`, *optional*):
            How many decoder layers, ending at the active exit, receive gradients. `None` picks the
            largest gap between consecutive exits (so the windows cover every layer), or a quarter of
            the layers (rounded up) when `exit_layers` is also `None`.
        exit_sampling (`str`):
            How training picks the active exit each optimizer step: `"curriculum"` (the reference
            code: training is split into consecutive equal phases, one per exit, lowest exit first),
            `"round_robin"` (exits in turn, lowest first) or `"uniform"` (uniformly at random, seeded
            by the step and the training seed, so it is reproducible and resumable).
        window_input (`str`):
            What a window sees from the layers below it. `"backbone"` (default, as the reference
            code): each window is fed by the frozen backbone *without* lower adapters; inference
            runs the backbone once plus, again with adapters, the window of every exit that votes
            (up to 2x one pass when all four windows vote; 1.27x when only the last one does).
            `"adapted"`: one stream through the model in which lower windows keep their (frozen)
            adapters; one pass at inference, but lower windows trained for their own early exits
            change what the layers above them see (see docs/tuning.md for measurements).
        voting (`str`):
            How exits combine at inference (no active exit). Default `"weighted"`: exits that do
            not help get no weight once `EdgeTrainer` has fitted the weights, so weak early exits
            cannot drag the prediction down (they can under the paper's `"confidence"` rule).
            With `p_i = softmax(logits_i)`:
            `"last"` returns the last layer's logits unchanged; `"mean"` returns `log(mean_i p_i)`;
            `"weighted"` returns `log(sum_i w_i p_i)` with `exit_weights` (fitted on held-out data by
            `calibrate_exit_weights`; uniform until then); `"confidence"` (the paper's rule) returns
            `log(q / sum(q))` with `q = max_i p_i` element-wise; `"geometric"` returns
            `prod_i p_i^w_i`, renormalised. The rules are the registry `tuner.voting.VOTING_RULES`.
            The returned logits are log-probabilities, so `softmax(logits)` gives the voted
            distribution back.
        exit_weights (`list[float]`, *optional*):
            One non-negative weight per exit (lowest first) for `voting="weighted"`; normalised to
            sum to 1.
        exit_head (`str`):
            `"shared"` (default): every exit uses the model's own final norm and LM head, no new
            weights. `"norm"`: each exit below the last gets a trainable copy of the final norm.
            `"lora"`: each exit below the last gets a rank-`exit_head_rank` LoRA on the LM head.
        exit_head_rank (`int`):
            Rank of the per-exit head LoRA when `exit_head="lora"`.
        loss_chunk_size (`int` or `"auto"`, *optional*):
            In a training exit pass given `labels`, the loss is computed over chunks of this many
            tokens and the full-vocabulary logits of the batch are never materialised (the output
            then has no `logits`). `"auto"` (default) sizes a chunk's logits like the batch's hidden
            states (at least 128 tokens; see `edge_llm.tuner.loss.auto_chunk_size`). `None` lets
            the model compute its loss from full logits.
    """

    exit_layers: list[int] | Literal["auto"] | None = field(
        default="auto",
        metadata={"help": "0-based decoder layers with an exit (the last layer is always one), or 'auto'."},
    )
    select_exits: bool = field(
        default=False, metadata={"help": "Keep only the exits that predict, scored before training."}
    )
    backprop_depth: int | None = field(
        default=None, metadata={"help": "Decoder layers, ending at the active exit, that receive gradients."}
    )
    exit_sampling: str = field(
        default="curriculum", metadata={"help": "How training picks the active exit: " + ", ".join(EXIT_SAMPLERS)}
    )
    window_input: Literal["adapted", "backbone"] = field(
        default="backbone", metadata={"help": "What a window sees below it: " + ", ".join(WINDOW_INPUTS)}
    )
    voting: str = field(
        default="weighted", metadata={"help": "How exits combine at inference: " + ", ".join(VOTING_RULES)}
    )
    exit_weights: list[float] | None = field(
        default=None, metadata={"help": "Per-exit weights for voting='weighted' (lowest exit first)."}
    )
    exit_head: str = field(default="shared", metadata={"help": "Per-exit trainable part: " + ", ".join(EXIT_HEADS)})
    exit_head_rank: int = field(default=8, metadata={"help": "Rank of the per-exit head LoRA (exit_head='lora')."})
    base_compression: str | None = field(
        default=None,
        metadata={
            "help": "What the base model was compressed with when the adapter was made: 'none' or 'luc:' and "
            "its LUC policy's SHA-256. Recorded by edge-llm, checked when the adapter is loaded."
        },
    )
    loss_chunk_size: int | Literal["auto"] | None = field(
        default="auto",
        metadata={
            "help": "Tokens per chunk of the training exit loss; 'auto': sized from the batch; None: full logits."
        },
    )

    def __post_init__(self) -> None:
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        super().__post_init__()
        self.peft_type = EDGE_LLM_PEFT_TYPE
        # LoRA over LUC-compressed layers (QLoRA-style); plain Linear layers are unaffected.
        self._register_custom_module(CUSTOM_MODULES)
        self._validate()

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """peft's config writer, made crash-safe: `adapter_config.json` is written beside and
        renamed into place, so a save killed midway never leaves a half-written config."""
        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".adapter-config-", dir=save_directory) as staging:
            super().save_pretrained(staging, **kwargs)
            for written in Path(staging).iterdir():
                with open(written, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(written, Path(save_directory) / written.name)

    def _validate(self) -> None:
        _check_positive_int("r", self.r)
        modules = self.target_modules
        if modules is not None and not (
            isinstance(modules, str)
            or (isinstance(modules, (list, tuple, set)) and all(isinstance(m, str) for m in modules))
        ):
            raise ValueError(
                "EdgeLLMConfig.target_modules must be a module name, a list of module names (e.g. ['q_proj', "
                f"'v_proj']) or a regular expression; got {modules!r}."
            )
        if (
            not isinstance(self.lora_alpha, (int, float))
            or isinstance(self.lora_alpha, bool)
            or not math.isfinite(self.lora_alpha)
            or self.lora_alpha <= 0
        ):
            raise ValueError(f"EdgeLLMConfig.lora_alpha must be a positive, finite number, got {self.lora_alpha!r}.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"EdgeLLMConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        _check_choice("bias", self.bias, ("none", "all", "lora_only"))
        if str(self.task_type) != "CAUSAL_LM":
            raise ValueError(
                f"EdgeLLMConfig.task_type must be 'CAUSAL_LM' (exits read through the LM head), got {self.task_type!r}."
            )
        if not isinstance(self.select_exits, bool):
            raise ValueError(f"EdgeLLMConfig.select_exits must be True or False, got {self.select_exits!r}.")
        if self.exit_layers == "auto":
            self.exit_layers, self.select_exits = None, True
        if self.exit_layers is not None:
            self.exit_layers = _check_exit_layers(self.exit_layers)
        if self.backprop_depth is not None:
            _check_positive_int("backprop_depth", self.backprop_depth)
        # The registries are read now, not copied at import: a rule registered later is accepted.
        _check_choice("exit_sampling", self.exit_sampling, tuple(EXIT_SAMPLERS))
        _check_choice("window_input", self.window_input, WINDOW_INPUTS)
        _check_choice("voting", self.voting, tuple(VOTING_RULES))
        if self.exit_weights is not None:
            self.exit_weights = _check_exit_weights(self.exit_weights)
        _check_choice("exit_head", self.exit_head, tuple(EXIT_HEADS))
        _check_positive_int("exit_head_rank", self.exit_head_rank)
        if self.base_compression is not None and not (
            self.base_compression == "none" or re.fullmatch(r"luc:[0-9a-f]{64}", str(self.base_compression))
        ):
            raise ValueError(
                f"EdgeLLMConfig.base_compression must be None, 'none' or 'luc:<sha256>', got {self.base_compression!r}."
            )
        if self.loss_chunk_size not in (None, "auto"):
            _check_positive_int("loss_chunk_size", self.loss_chunk_size, "'auto', None or ")
        if self.layer_replication:
            raise ValueError(
                "EdgeLLMConfig.layer_replication is not supported: exits and windows index the model's own "
                "decoder layers. Leave layer_replication unset."
            )


def _check_positive_int(name: str, value: object, alternatives: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"EdgeLLMConfig.{name} must be {alternatives}a positive integer, got {value!r}.")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"EdgeLLMConfig.{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def _check_exit_layers(exit_layers: object) -> list[int]:
    if isinstance(exit_layers, (str, bytes)) or not hasattr(exit_layers, "__iter__"):
        raise ValueError(f"EdgeLLMConfig.exit_layers must be a list of layer indices, got {exit_layers!r}.")
    layers = list(exit_layers)
    if not layers:
        raise ValueError("EdgeLLMConfig.exit_layers is empty; pass None for the default exits or at least one layer.")
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise ValueError(
                f"EdgeLLMConfig.exit_layers must hold 0-based, non-negative layer indices; got {layer!r} in {layers}."
            )
    duplicates = sorted({layer for layer in layers if layers.count(layer) > 1})
    if duplicates:
        raise ValueError(f"EdgeLLMConfig.exit_layers has duplicate layers {duplicates}: {layers}.")
    return sorted(layers)


def _check_exit_weights(weights: object) -> list[float]:
    values = list(weights) if hasattr(weights, "__iter__") and not isinstance(weights, str) else None
    if (
        not values
        or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf for w in values)
        or not 0 < sum(values) < math.inf  # 1e308 twice overflows: every weight would become 0
    ):
        raise ValueError(
            "EdgeLLMConfig.exit_weights must be finite, non-negative numbers, one per exit, not all zero; "
            f"got {weights!r}."
        )
    total = float(sum(values))
    return [float(w) / total for w in values]
