"""Lower an (LUC-compressed, Edge-LLM-adapted) causal LM to an ExecuTorch program (`.pte`), the
format PyTorch's on-device runtime runs on phones, with its linear layers delegated to XNNPACK.

The program is a static-cache decoder: inputs `input_ids` (1 x n, 1 <= n < max_seq_len) and
`cache_position` (n), output the logits of every position, so one program prefills a prompt and
decodes token by token, and ExecuTorch's LLM runner can drive it (the `get_max_seq_len`-style
constant methods it reads are written too). How it attends (ExecuTorch's own attention ops by
default) is `executorch_attention.py`'s.

How LUC's per-layer bits map. XNNPACK's quantized linear kernels take symmetric weights only, 4-bit
per group or 8-bit per output channel, and quantize activations to int8 per token at run time:
- 2-4-bit layers -> int4 per group ("8da4w"), blocks of LUC's group size (or the largest divisor
  of it that also divides the row, as long as it is a multiple of 32), holding LUC's codes and
  scales: exactly LUC's weights. A layer whose every `code - zero_point` fits int4's [-8, 7] (2-
  and 3-bit layers whose zero-points lie among their codes) holds those; otherwise (every 4-bit
  layer: 16 levels around a zero-point do not fit symmetric int4) its codes go in as `code - 8` and
  the zero-points as a small float matrix of per-block offsets (`ZeroPointLinear`:
  `y = x @ W.T + blocksum(x) @ offsets.T`, a block-th of the work). Pruned
  weights sit at the zero-point and stay exact zeros (blocks whose zero-point lies outside the
  codes are re-quantized, as are layers with a LoRA update folded in). XNNPACK stores the scales in
  bfloat16 (LUC's are float16), which rounds them by up to 2^-9.
- 5-8-bit layers -> int8 per output channel ("8da8w"): XNNPACK has no grouped 8-bit kernel, so a
  layer holds LUC's codes only where one group spans each row (`group_size` >= the row, symmetric
  8-bit: `code - 128`); others are re-quantized.
Each Linear is mapped by its own setting, so a model whose Linears differ within a decoder layer
goes in as it is.
- Layers LUC left in float, and norms -> float32; the LM head -> int8 per output channel and the
  embedding table -> int8 per row by default (`head_bits=None`: float32; `embedding_bits=16` or
  32: float16 or float32), since a program stores a tied table twice. The int8 table is torchao's
  weight-only recipe (what optimum-executorch's `--qembedding 8w` writes), which ExecuTorch runs
  with its quantized embedding kernel: a runtime built with the quantized kernels (ExecuTorch's
  LLM runner links them; in Python, `load_program` loads them).
What ExecuTorch cannot use: sparsity (pruned weights are stored as zeros; XNNPACK has no sparse
kernel for these layers), exits and voting (the program is the last exit: with
`window_input="adapted"` every layer carries its adapter, with `"backbone"` only the last exit's
window does, as for GGUF).

Needs `executorch` (which brings `torchao`); `pip install executorch`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_llm._io import atomic_write_bytes
from edge_llm._warnings import EXECUTORCH_LOWERING, quiet_upstream_warnings
from edge_llm.export.executorch_attention import (
    ATTENTIONS,
    CUSTOM_SDPA,
    CustomSdpaDecoder,
    full_attention_only,
    register_custom_sdpa,
    stock_sdpa_decoder,
)
from edge_llm.export.weights import adapted_layers, base_layer, effective_weight, folded_adapters
from edge_llm.luc.facts import layer_setting
from edge_llm.luc.ggml_linear import GGMLEmbedding
from edge_llm.luc.linear import UNQUANTIZED_BITS, LUCLinear
from edge_llm.modeling import find_decoder_parts
from edge_llm.tuner.model import edge_config_of

logger = logging.getLogger(__name__)

XNNPACK_BLOCK = 32  # XNNPACK's 4-bit blockwise kernel takes blocks that are multiples of 32


def require_executorch() -> None:
    try:
        import executorch  # noqa: F401
        import torchao  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "The ExecuTorch export needs the `executorch` package (it brings `torchao`): pip install executorch"
        ) from error


def int4_block(layer: nn.Module, columns: int) -> int | None:
    """The block length of the int4 weight: LUC's group size, or the largest divisor of it that
    divides the row and is a multiple of 32 (blocks inside one LUC group share its scale, so they
    hold its codes exactly); 32 for a float layer; None if no such length exists."""
    group = layer.group_size if isinstance(layer, LUCLinear) else XNNPACK_BLOCK
    block = math.gcd(group, columns)
    return block if block % XNNPACK_BLOCK == 0 else None


def xnnpack_layout(layer: nn.Module, columns: int) -> tuple[int, int] | None:
    """(bits of the kernel, block length) a Linear goes to: int4 per block (`int4_block`) for
    2-4-bit LUC layers whose groups allow one, else int8 per output channel (the whole row); None
    for a layer left in float (it stays float32)."""
    bits, _ = layer_setting(layer)
    if bits == UNQUANTIZED_BITS:
        return None
    block = int4_block(layer, columns) if bits <= 4 else None
    return (4, block) if block is not None else (8, columns)


def _activation_quantization():
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    return IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN


class ZeroPointLinear(nn.Module):
    """A Linear whose symmetric int4 weight holds LUC's codes and whose zero-points ride in a small
    float matrix: LUC computes `(q - z) * s` per group, which is `(q - 8) * s`, exactly an int4 code
    with LUC's scale, plus `(8 - z) * s`, one constant per (row, block). So
    `y = x @ W_int4.T + blocksum(x) @ offsets.T`: the second product has one column per block, a
    block-th of the first's work, and the layer computes LUC's weight exactly."""

    def __init__(self, linear: nn.Linear, offsets: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.block = linear.in_features // offsets.shape[1]
        self.register_buffer("offsets", offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums = x.unflatten(-1, (self.offsets.shape[1], self.block)).sum(-1)
        return self.linear(x) + sums @ self.offsets.T


def _int_weight(qdata: torch.Tensor, scale: torch.Tensor, bits: int) -> Any:
    """A torchao weight XNNPACK runs: symmetric `bits`-bit codes (int8 storage, rows x columns) with
    one float32 scale per (row, block), int8 activations per token."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    block = qdata.shape[1] // scale.shape[1]
    zero_point = torch.zeros_like(scale, dtype=torch.int8)
    target = getattr(torch, f"int{bits}")
    return IntxUnpackedToInt8Tensor(
        qdata, scale, zero_point, target, (1, block), torch.float32, _activation_quantization()
    )


@torch.no_grad()
def requantized(module: nn.Module, with_adapter: bool, block: int, bits: int) -> Any:
    """`module`'s float weight re-quantized by torchao: symmetric `bits`-bit codes per block of
    `block` columns (the whole row: per output channel), int8 activations."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    weight = effective_weight(module, with_adapter)
    return IntxUnpackedToInt8Tensor.from_hp(
        weight, (1, block), getattr(torch, f"int{bits}"), activation_quantization=_activation_quantization()
    )


@torch.no_grad()
def int_linear(
    linear: nn.Linear, module: nn.Module, with_adapter: bool, bits: int, block: int, counts: Counter
) -> nn.Module:
    """`linear` (holding `module`'s float weight) with a torchao `bits`-bit weight (4: int4 per
    block of `block` columns; 8: int8 per output channel; symmetric, int8 activations). A LUC layer
    keeps its codes: unchanged where `code - zero_point` fits the kernel's signed range (every 2-
    and 3-bit layer in int4, symmetric grids), else (int4 only) as a `ZeroPointLinear`. Blocks whose
    pruned weights sit on a zero-point outside the codes, layers with a LoRA update folded in, and
    layers whose groups the kernel's blocks cannot hold are re-quantized from the float weight.
    Counts blocks in `counts`."""
    layer = base_layer(module)
    kind = f"int{bits} blocks"
    held = (
        isinstance(layer, LUCLinear)
        and not folded_adapters(module, with_adapter)
        and layer.bits <= bits
        and layer.group_size % block == 0
    )
    if not held:
        return _requantized_linear(linear, module, with_adapter, bits, block, counts)
    rows, blocks = layer.out_features, layer.in_features // block
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    # Pruned weights are 0: their code is the zero-point, which a group may put outside the codes.
    luc = layer.code_blocks(block)
    zero, scale = luc.zeros, luc.scales
    codes = luc.codes.float().view(rows, blocks, block)
    centered = codes - zero[..., None]
    if ((centered >= low) & (centered <= high)).all():
        # The kernel's codes hold `code - zero_point` itself: LUC's weight with no offsets.
        weight = _int_weight(centered.view(rows, -1).to(torch.int8), scale, bits)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        counts[f"{kind} holding LUC's codes"] += rows * blocks
        return linear
    if bits != 4:  # 16 levels around a zero-point fit int4 as `code - 8`; wider codes are re-quantized
        return _requantized_linear(linear, module, with_adapter, bits, block, counts)
    on_grid = luc.pruned_on_grid(16)
    codes = codes - 8
    if not on_grid.all():  # re-quantize only the blocks LUC's codes cannot hold
        fallback = requantized(module, False, block, 4)
        codes[~on_grid] = fallback.qdata.view(rows, blocks, block)[~on_grid].float()
        scale = torch.where(on_grid, scale, fallback.scale)
    linear.weight = nn.Parameter(_int_weight(codes.view(rows, -1).to(torch.int8), scale, 4), requires_grad=False)
    offsets = torch.where(on_grid, (8 - zero) * scale, torch.zeros_like(scale))
    counts[f"{kind} holding LUC's codes"] += int(on_grid.sum())
    counts[f"{kind} re-quantized"] += int((~on_grid).sum())
    return ZeroPointLinear(linear, offsets)


def _requantized_linear(
    linear: nn.Linear, module: nn.Module, with_adapter: bool, bits: int, block: int, counts: Counter
) -> nn.Linear:
    """`linear` with `module`'s float weight re-quantized by torchao (`requantized`), its blocks counted."""
    linear.weight = nn.Parameter(requantized(module, with_adapter, block, bits), requires_grad=False)
    counts[f"int{bits} blocks re-quantized"] += linear.weight.scale.numel()
    return linear


def _float_copy(base: nn.Module, adapted: set[int]) -> nn.Module:
    """A float32 model of `base`'s architecture with plain Linears holding the weights `base`
    computes with (LUC dequantized, LoRA updates folded in where `adapted`)."""
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(base)._from_config(config, dtype=torch.float32).eval()
    parts = find_decoder_parts(plain)
    decoder = parts.layers_path + "."
    state = {}
    for name, _ in plain.named_parameters(remove_duplicate=False):  # tied weights under each name
        owner, _, attribute = name.rpartition(".")
        original = base.get_submodule(owner)
        if isinstance(plain.get_submodule(owner), nn.Linear) and attribute == "weight":
            index = int(owner[len(decoder) :].split(".", 1)[0]) if owner.startswith(decoder) else None
            state[name] = effective_weight(original, index is None or index in adapted)
        elif base_layer(original) is not original:
            # A LoRA-wrapped layer that the model's class does not make a Linear (GPT-2's Conv1D;
            # LUC compresses Linears only): its update would be lost.
            raise ValueError(
                f"ExecuTorch export folds LoRA updates into layers that are nn.Linear in the model's class; "
                f"{owner} is a {type(plain.get_submodule(owner)).__name__} there. Merge the adapter first "
                "(merge_and_unload()), or export to GGUF."
            )
        elif isinstance(original, GGMLEmbedding):  # a token table in llama.cpp blocks
            state[name] = original.dense_weight()
        else:
            state[name] = getattr(original, attribute).detach().float()
    plain.load_state_dict(state, strict=True)
    return plain


class HalfEmbedding(nn.Module):
    """An embedding table stored in float16 whose rows are used in float32: half the bytes of the
    float32 table, and exact for weights trained in bfloat16/float16 whose values fit float16."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        # A buffer, not a parameter: transformers takes a model's dtype (and so its KV cache's)
        # from its first floating parameter, and the model computes in float32.
        self.register_buffer("weight", weight.detach().to(torch.float16))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight).float()


def int8_embedding(model: nn.Module) -> None:
    """`model`'s embedding table in int8 per row (torchao's weight-only int8, symmetric), which
    ExecuTorch's quant fusion turns into its quantized embedding kernel. A head tied to the table
    gets a float copy of its own first: the head is not a lookup."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is table.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    # Only gradients read padding_idx; the fused pattern is `embedding(table, ids)` without it.
    table.padding_idx = None
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)), lambda m, _: m is table)


EMBEDDING_BITS = (8, 16, 32)


def quantize_for_xnnpack(
    model: nn.Module, head_bits: int | None = 8, embedding_bits: int = 8
) -> tuple[nn.Module, Counter]:
    """A float32 copy of `model` whose decoder Linears hold the torchao weights XNNPACK runs, per
    each layer's LUC bits (see the module docstring); and counts of what was mapped how.

    LUC leaves the embeddings and the LM head in float, and in a program they are stored twice even
    when tied (the table for the lookup, the head packed inside XNNPACK's blob): a quarter of a
    135M-parameter model each in float32. `head_bits=8` stores the head in int8 per output channel
    (int8 activations; None: float32), `embedding_bits` the table in int8 per row (8), float16 (16)
    or float32 (32)."""
    require_executorch()
    if head_bits not in (None, 8):
        raise ValueError(f"head_bits must be 8 (int8 per output channel) or None (float32), got {head_bits!r}.")
    if embedding_bits not in EMBEDDING_BITS or isinstance(embedding_bits, bool):
        raise ValueError(
            f"embedding_bits must be 8 (int8 per row), 16 (float16) or 32 (float32), got {embedding_bits!r}."
        )
    edge_config = edge_config_of(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = find_decoder_parts(base).layers(base)
    adapted = adapted_layers(edge_config, len(layers))
    plain = _float_copy(base, adapted)
    counts: Counter[str] = Counter()
    for index, (layer, target) in enumerate(zip(layers, find_decoder_parts(plain).layers(plain), strict=True)):
        for name, linear in list(target.named_modules()):
            if not isinstance(linear, nn.Linear):
                continue
            module = layer.get_submodule(name)
            layout = xnnpack_layout(base_layer(module), linear.in_features)
            if layout is None:
                counts["float32 Linears"] += 1
                continue
            bits, block = layout
            target.set_submodule(name, int_linear(linear, module, index in adapted, bits, block, counts))
            counts[f"int{bits} Linears"] += 1
    head = plain.get_output_embeddings()
    if head_bits == 8 and isinstance(head, nn.Linear):
        # A new parameter: unties the head from the embedding table.
        head.weight = nn.Parameter(requantized(head, False, head.in_features, 8), requires_grad=False)
        counts["int8 LM head"] += 1
    if embedding_bits == 8:
        int8_embedding(plain)
        counts["int8 embedding tables"] += 1
    elif embedding_bits == 16:
        plain.set_input_embeddings(HalfEmbedding(plain.get_input_embeddings().weight))
        counts["float16 embedding tables"] += 1
    return plain, counts


def _constant_methods(config: Any, max_seq_len: int, attention: str) -> dict[str, Any]:
    """The metadata ExecuTorch's LLM runner reads from a program."""
    eos = config.eos_token_id
    methods = {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "get_vocab_size": config.vocab_size,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": attention == "custom",
        "enable_dynamic_shape": True,
    }
    if config.bos_token_id is not None:
        methods["get_bos_id"] = config.bos_token_id
    if eos is not None:
        methods["get_eos_ids"] = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return methods


def load_program(path: str | Path) -> Any:
    """`path`'s program in ExecuTorch's Python runtime, with the kernels edge-llm's programs call
    beyond the portable ones: the int8 embedding table's and the custom attention ops'."""
    require_executorch()
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(path))


def write_pte(
    model: nn.Module,
    path: str | Path,
    max_seq_len: int = 512,
    head_bits: int | None = 8,
    embedding_bits: int = 8,
    attention: str = "custom",
) -> Path:
    """Write `model` as an ExecuTorch program that XNNPACK runs; returns `path`.

    Args:
        model: a decoder-only causal LM, LUC-compressed or not, optionally a PeftModel with an
            Edge-LLM (or LoRA) adapter, whose update is folded into the weights (the last exit).
        path: the .pte file to write (through a temporary file: an interrupted export leaves an
            older file there as it was).
        max_seq_len: the static KV cache's length: prompt plus generated tokens.
        head_bits: 8 stores the LM head in int8 per output channel, None in float32.
        embedding_bits: the embedding table in int8 per row (8; run by ExecuTorch's quantized
            embedding kernel), float16 (16) or float32 (32).
        attention: "custom" (ExecuTorch's `custom_sdpa` and `update_cache` ops: attention over the
            filled part of the KV cache, updated in place; what ExecuTorch's LLM runner runs) or
            "sdpa" (PyTorch's SDPA over the whole static cache; portable kernels only). Models with
            sliding-window attention always get "sdpa".
    """
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or not 2 <= max_seq_len <= 2**20:
        raise ValueError(f"max_seq_len must be an integer from 2 to 2**20, got {max_seq_len!r}.")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}.")
    plain, counts = quantize_for_xnnpack(model, head_bits, embedding_bits)
    for what, count in sorted(counts.items()):
        logger.info("ExecuTorch: %d %s", count, what)
    return write_program(plain, path, max_seq_len, attention)


def write_program(model: nn.Module, path: str | Path, max_seq_len: int, attention: str = "custom") -> Path:
    """Lower a float32 causal LM whose layers hold torchao weights (`quantize_for_xnnpack`'s, or
    torchao's own `quantize_`) to an ExecuTorch program, XNNPACK delegating what it runs; the
    program is described in the module docstring, `attention` in `write_pte`'s."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    if attention == "custom" and not full_attention_only(model.config):
        logger.info("ExecuTorch: sliding-window attention, so PyTorch's SDPA (custom_sdpa attends to every position)")
        attention = "sdpa"
    previous = model.config._attn_implementation
    if attention == "custom":
        register_custom_sdpa()
        model.config._attn_implementation = CUSTOM_SDPA
        wrapper = CustomSdpaDecoder(model, max_seq_len)
    else:
        wrapper = stock_sdpa_decoder(model, max_seq_len)
    tokens = torch.export.Dim("tokens", min=1, max=max_seq_len - 1)
    example = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "cache_position": torch.arange(2)}
    try:
        with torch.no_grad(), quiet_upstream_warnings(EXECUTORCH_LOWERING):
            program = torch.export.export(
                wrapper,
                (),
                example,
                dynamic_shapes={"input_ids": {1: tokens}, "cache_position": {0: tokens}},
                strict=True,
            )
    finally:
        model.config._attn_implementation = previous
    with torch.no_grad(), quiet_upstream_warnings(EXECUTORCH_LOWERING):
        lowered = to_edge_transform_and_lower(
            program,
            partitioner=[XnnpackPartitioner()],
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
            constant_methods=_constant_methods(model.config, max_seq_len, attention),
        ).to_executorch(  # quant fusion turns torchao's int8 table into ExecuTorch's quantized embedding kernel
            ExecutorchBackendConfig(extract_delegate_segments=True, do_quant_fusion_and_const_prop=True)
        )
    path = Path(path)
    atomic_write_bytes(path, lowered.buffer)
    logger.info("Wrote %s (%.1f MiB)", path, path.stat().st_size / 2**20)
    return path
