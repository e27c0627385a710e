"""The tuning methods the benchmarks compare, each a small builder chosen by name.

Every method gets the same model, LoRA rank/alpha/targets and the same depth `K` (edge-llm's
window, the top-K layers of top-K LoRA). A builder returns the model to train, the Trainer class
and the `TrainingArguments` settings it needs. These are what a practitioner short of memory
would pick instead of edge-llm:

- `lora`: peft LoRA on every layer, stock `Trainer`, the model's own loss (full logits);
- `lora_gc`: the same with gradient checkpointing (non-reentrant), the one-flag memory fix;
- `lora_chunked` / `lora_gc_chunked`: with a chunked loss (`edge_llm.enable_chunked_loss`, the
  algorithm of Liger's / Cut Cross-Entropy's fused linear cross-entropy), so the loss head does
  not decide the comparison;
- `topk_chunked`: LoRA on the top K layers only (`layers_to_transform`, MLX-LM's default recipe)
  plus the chunked loss: autograd records nothing below the first trainable layer;
- `edge`: edge-llm with the paper's layout (four exits tiling the model, `exit_layers=None`);
  `edge_auto`: edge-llm's defaults (`exit_layers="auto"`: only the exits that predict);
  `edge_top`: one exit at the top with a K-layer window;
  `edge_gc`: edge-llm's defaults plus gradient checkpointing inside the window;
  `edge_deep` / `edge_deep_gc`: one exit at the top with a deeper window (`Setup.deep_depth`
  layers), without and with gradient checkpointing inside it;
  `luc4_edge`: edge-llm with the paper's layout over a base compressed by LUC to 4 bits (RTN, groups of 64),
  the QLoRA-style pipeline; `luc_edge_deep`: `edge_deep` over a base compressed with
  `Setup.luc_policy` (a LUC policy file; 4-bit RTN when none is given);
  `luc_gguf_edge_deep_gc`: `edge_deep_gc` over a base LUC compressed for llama.cpp
  (`target="gguf"`, measured policy at `Setup.gguf_bits` bits per weight): the base keeps its
  llama.cpp blocks, as QLoRA keeps its 4-bit base, and ships unchanged with the adapter beside it;
  `luc_gguf6_edge_deep_gc`: the same at 6 bits per weight;
- `qlora_gc_chunked`: the 4-bit-base recipe (QLoRA: bitsandbytes NF4 with double quantization,
  float32 compute, `prepare_model_for_kbit_training`), LoRA on every layer, gradient checkpointing
  and the chunked loss. Its base is quantized while loading (`LOAD_OPTIONS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

GC = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}


@dataclass(frozen=True)
class Setup:
    """What every method shares."""

    rank: int
    targets: list[str]
    depth: int  # K
    exit_sampling: str = "curriculum"
    deep_depth: int | None = None  # edge_deep's window; None: two thirds of the layers
    luc_policy: str | None = None
    gguf_bits: float = 4.5  # luc_gguf methods: bits per weight of the llama.cpp base
    gguf_sensitivity: str = "fisher"  # luc_gguf methods: measured policy, or "structural" (no data)
    calibration: Any = None  # token ids (batch x seq) for LUC methods that calibrate
    edge_options: dict[str, Any] = field(default_factory=dict)  # extra EdgeLLMConfig fields for edge methods


@dataclass
class Prepared:
    model: nn.Module
    trainer_cls: type
    training_overrides: dict[str, Any]


def _lora(model: nn.Module, setup: Setup, top_k: bool = False, chunked: bool = False, gc: bool = False) -> Prepared:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    from edge_llm import enable_chunked_loss

    layers = model.config.num_hidden_layers
    extra = {"layers_to_transform": list(range(layers - setup.depth, layers))} if top_k else {}
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=setup.rank,
        lora_alpha=2 * setup.rank,
        lora_dropout=0.0,
        target_modules=setup.targets,
        **extra,
    )
    peft_model = get_peft_model(model, config)
    if chunked:
        enable_chunked_loss(peft_model)
    return Prepared(peft_model, Trainer, dict(GC) if gc else {})


def _qlora(model: nn.Module, setup: Setup) -> Prepared:
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, True, {"use_reentrant": False})
    return replace(_lora(model, setup, chunked=True), training_overrides=dict(GC))


def _qlora_loading() -> dict[str, Any]:
    """`from_pretrained` options of the 4-bit base (QLoRA's NF4, double quantization)."""
    import torch
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return {"quantization_config": config, "device_map": "cpu"}


# Methods whose base is quantized while `from_pretrained` loads it: their loading options.
LOAD_OPTIONS: dict[str, Callable[[], dict[str, Any]]] = {"qlora_gc_chunked": _qlora_loading}


def _edge(
    model: nn.Module, setup: Setup, top: bool = False, gc: bool = False, deep: bool = False, paper: bool = False
) -> Prepared:
    from peft import get_peft_model

    from edge_llm import EdgeLLMConfig, EdgeTrainer

    options: dict[str, Any] = {"exit_sampling": setup.exit_sampling, **setup.edge_options}
    if paper:
        options["exit_layers"] = None
    layers = model.config.num_hidden_layers
    if top or deep:
        depth = (setup.deep_depth or -(-2 * layers // 3)) if deep else setup.depth
        options.update(exit_layers=[layers - 1], backprop_depth=depth)
    config = EdgeLLMConfig(
        r=setup.rank, lora_alpha=2 * setup.rank, lora_dropout=0.0, target_modules=setup.targets, **options
    )
    return Prepared(get_peft_model(model, config), EdgeTrainer, dict(GC) if gc else {})


def _luc_edge(model: nn.Module, setup: Setup, deep: bool = False, gc: bool = False) -> Prepared:
    from edge_llm.luc import CompressionMethod, LUCPolicy, compress_model

    if setup.luc_policy is not None:
        policy = LUCPolicy.load(setup.luc_policy)
        settings, method, targets = policy.layers, policy.method, policy.targets
    else:
        settings, targets = [(4, 0.0)] * model.config.num_hidden_layers, None
        method = CompressionMethod(64, "rtn", "magnitude")
    compress_model(model, settings, method, setup.calibration, targets, progress=False)
    return _edge(model, setup, deep=deep, paper=not deep, gc=gc)


def _luc_gguf_edge(model: nn.Module, setup: Setup) -> Prepared:
    from edge_llm.luc.facts import gguf_policy_of
    from edge_llm.luc.gguf_policy import budget_bytes, compress_for_gguf

    if gguf_policy_of(model) is None:  # not loaded from a LUC llama.cpp file already
        budget = budget_bytes(model, setup.gguf_bits, None)
        compress_for_gguf(model, setup.calibration, budget, setup.gguf_sensitivity, progress=False)
    return _edge(model, setup, deep=True, gc=True)


METHODS: dict[str, Callable[[nn.Module, Setup], Prepared]] = {
    "lora": _lora,
    "lora_gc": lambda m, s: _lora(m, s, gc=True),
    "lora_chunked": lambda m, s: _lora(m, s, chunked=True),
    "lora_gc_chunked": lambda m, s: _lora(m, s, chunked=True, gc=True),
    "topk_chunked": lambda m, s: _lora(m, s, top_k=True, chunked=True),
    "edge": lambda m, s: _edge(m, s, paper=True),
    "edge_auto": _edge,
    "edge_top": lambda m, s: _edge(m, s, top=True),
    "edge_gc": lambda m, s: _edge(m, s, gc=True, paper=True),
    "edge_deep": lambda m, s: _edge(m, s, deep=True),
    "edge_deep_gc": lambda m, s: _edge(m, s, deep=True, gc=True),
    "luc4_edge": lambda m, s: _luc_edge(m, Setup(**{**vars(s), "luc_policy": None})),
    "luc_edge_deep": lambda m, s: _luc_edge(m, s, deep=True),
    "luc_edge_deep_gc": lambda m, s: _luc_edge(m, s, deep=True, gc=True),
    "luc_gguf_edge_deep_gc": _luc_gguf_edge,
    "luc_gguf6_edge_deep_gc": lambda m, s: _luc_gguf_edge(m, replace(s, gguf_bits=6.0)),
    "qlora_gc_chunked": _qlora,
}

LABELS = {
    "lora": "LoRA, full depth",
    "lora_gc": "LoRA + grad. checkpointing",
    "lora_chunked": "LoRA + chunked loss",
    "lora_gc_chunked": "LoRA + grad. checkpointing + chunked loss",
    "topk_chunked": "LoRA on the top K layers + chunked loss",
    "edge": "edge-llm, the paper's four exits",
    "edge_auto": "edge-llm defaults (exits that predict)",
    "edge_top": "edge-llm, one exit at the top, K-layer window",
    "edge_gc": "edge-llm, the paper's four exits + grad. checkpointing",
    "edge_deep": "edge-llm, one exit at the top, deep window",
    "edge_deep_gc": "edge-llm, one exit at the top, deep window + grad. checkpointing",
    "luc4_edge": "LUC 4-bit base + edge-llm, the paper's four exits",
    "luc_edge_deep": "LUC base + edge-llm, one exit at the top, deep window",
    "luc_edge_deep_gc": "LUC base + edge-llm, one exit at the top, deep window + grad. checkpointing",
    "luc_gguf_edge_deep_gc": "LUC llama.cpp base + edge-llm, one exit at the top, deep window + grad. checkpointing",
    "luc_gguf6_edge_deep_gc": "the same over a 6-bit llama.cpp base",
    "qlora_gc_chunked": "QLoRA (NF4 base) + grad. checkpointing + chunked loss",
}


def default_depth(num_layers: int) -> int:
    """K: edge-llm's default window (a quarter of the layers, rounded up)."""
    return -(-num_layers // 4)
