"""Lower an (LUC-compressed, Edge-LLM-adapted) Llama-family model to GGUF for llama.cpp.

A model LUC compressed for llama.cpp (`LUCConfig(target="gguf")`) already holds llama.cpp blocks
(`GGMLLinear`, `GGMLEmbedding`): they are written unchanged, each tensor with its own type, the
token embedding included. What follows is for LUC's own packed layers (`target="pytorch"`).

Each decoder layer's tensors get the GGUF type of its LUC bit-width: 2 to 4 bits -> Q4_1, 5 -> Q5_1,
6-8 -> Q8_0, unquantized -> F16 (GGUF has no 6/7-bit type that gguf-py can write, so those round
up to 8). Q4_1 and Q5_1 compute `d * q + m` per block of 32, which is LUC's `(q - zero) * scale`:
LUC's codes go into them unchanged (`gguf_blocks.luc_blocks`), so llama.cpp computes with the
very weights PyTorch does. Layers that carry a LoRA update, and 8-bit layers, are re-quantized from the float
weights they compute with. `k_quants=True` trades fidelity for size: 2/3-bit layers become Q2_K /
Q3_K, re-quantized by llama.cpp's own quantizer (needs llama-cpp-python), at 2.6 / 3.4 bits per
weight instead of 5.

What llama.cpp cannot use: pruning (GGUF has no sparse tensor types, so pruned weights are stored
as zeros and save no space — N:M patterns would need a runtime with sparse kernels), and exits
and voting (llama.cpp runs one stream to the last layer). The GGUF model is the last exit: with
`window_input="adapted"` every layer carries its adapter; with `"backbone"` only the last exit's
window does (the layers below it are the backbone, as that exit sees them). Exits, voting, the LUC
policy and the schedule are kept in the key-value metadata under `edge_llm.*`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edge_llm._io import atomic_file
from edge_llm.export.gguf_blocks import (
    gguf_type_for_bits,
    luc_blocks,
    pack_q4_1,
    pack_q5_1,
    permute_rotary,
    quantize_tensor,
)
from edge_llm.export.weights import adapted_layers, base_layer, effective_weight, folded_adapters
from edge_llm.luc.facts import layer_setting, policy_of
from edge_llm.luc.ggml import INSTALL_HINT, quantize
from edge_llm.luc.ggml_linear import GGMLEmbedding, GGMLLinear
from edge_llm.luc.linear import LUCLinear
from edge_llm.modeling import find_decoder_parts
from edge_llm.tuner.model import edge_config_of

logger = logging.getLogger(__name__)

LLAMA_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def block_tensor_name(index: int, suffix: str) -> str:
    """llama.cpp's name of a decoder layer's tensor, by the layer's index and the tensor's module
    path inside the layer (a key of `LLAMA_TENSORS`): `blk.3.attn_q.weight`."""
    return f"blk.{index}.{LLAMA_TENSORS[suffix]}.weight"


def gguf_tensor_names(model: nn.Module) -> dict[str, str]:
    """llama.cpp's name of every tensor a GGUF policy covers, by the policy's key
    (`gguf_sensitivity.weight_tensors`: module paths, `EMBEDDING` for the token table): the names
    `write_gguf` writes, for whatever must name those tensors in a file (per-tensor types read back,
    an importance matrix)."""
    from edge_llm.luc.gguf_sensitivity import EMBEDDING, weight_tensors

    layers_path = find_decoder_parts(model).layers_path + "."
    names = {}
    for key in weight_tensors(model):
        if key == EMBEDDING:
            names[key] = "token_embd.weight"
        elif key.startswith(layers_path):
            index, suffix = key.removeprefix(layers_path).split(".", 1)
            names[key] = block_tensor_name(int(index), suffix)
        else:
            names[key] = "output.weight"
    return names


# --------------------------------------------------------------------------- writer


def _tensor_bytes(
    module: nn.Module,
    bits: int,
    with_adapter: bool,
    rotary_heads: int | None,
    k_quants: bool,
    fallbacks: Counter,
    encodings: Counter,
):  # -> (np.ndarray, gguf.GGMLQuantizationType)
    """One decoder Linear as GGUF data: LUC's codes unchanged where the GGUF type can hold them and
    no LoRA update is folded in, else the float weight it computes with, re-quantized."""
    from gguf import GGMLQuantizationType as T

    base = base_layer(module)
    stored = _llama_cpp_blocks(base)
    if stored is not None:
        blocks, qtype = stored
        if folded_adapters(module, with_adapter):  # the update folded in, re-rounded into the layer's type
            encodings["re-quantized"] += 1
            blocks = quantize(effective_weight(module, with_adapter).numpy(), base.kind)
        else:
            encodings["LUC blocks"] += 1
        return (permute_rotary(blocks, rotary_heads) if rotary_heads else blocks), qtype
    columns = base.in_features
    wanted, qtype = gguf_type_for_bits(bits, k_quants=k_quants), gguf_type_for_bits(bits, columns, k_quants)
    if qtype != wanted:
        fallbacks[(wanted.name, qtype.name, columns)] += 1
    if isinstance(base, LUCLinear) and not folded_adapters(module, with_adapter) and qtype in (T.Q4_1, T.Q5_1):
        blocks = luc_blocks(base, 4 if qtype == T.Q4_1 else 5)
        if blocks is not None:
            if rotary_heads:
                blocks = tuple(permute_rotary(part, rotary_heads) for part in blocks)
            encodings["LUC codes"] += 1
            return (pack_q4_1 if qtype == T.Q4_1 else pack_q5_1)(*blocks), qtype
    weight = effective_weight(module, with_adapter).numpy()
    if rotary_heads:
        weight = permute_rotary(weight, rotary_heads)
    encodings["re-quantized"] += 1
    return quantize_tensor(weight, qtype), qtype


def write_gguf(
    model: nn.Module,
    path: str | Path,
    tokenizer: Any = None,
    reference_gguf: str | Path | None = None,
    schedule: Any = None,
    k_quants: bool = False,
    fold_adapters: bool = True,
) -> Path:
    """Write `model` as a GGUF file llama.cpp can load.

    Args:
        model: a Llama/Mistral/Qwen2-style causal LM, LUC-compressed or not, optionally a PeftModel
            with an Edge-LLM (or LoRA) adapter, whose update is folded into the weights unless
            `fold_adapters=False`.
        path: the .gguf file to write.
        tokenizer: used for the vocabulary when no `reference_gguf` is given.
        reference_gguf: a GGUF of the same base model whose tokenizer metadata is copied verbatim
            (the most faithful way to carry a tokenizer over).
        schedule: a `Schedule` to store in the metadata.
        k_quants: store 2/3-bit layers as Q2_K/Q3_K (smaller, but re-quantized by llama.cpp's
            quantizer: error the LUC policy did not budget for) instead of Q4_1 holding LUC's codes
            unchanged. Needs llama-cpp-python.
        fold_adapters: False writes the base alone, its stored codes unchanged, for an adapter
            written beside it by `gguf_lora.write_gguf_lora` (llama.cpp's `--lora`): what ships is
            then exactly what was tuned, and one base serves several adapters.
    """
    import gguf

    if k_quants and importlib.util.find_spec("llama_cpp") is None:
        raise ImportError(f"write_gguf(k_quants=True) quantizes with llama.cpp's own quantizer: {INSTALL_HINT}.")
    edge_config = edge_config_of(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"GGUF export supports Llama-architecture models ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"got {config.model_type!r}."
        )
    path = Path(path)
    writer = gguf.GGUFWriter(None, "llama")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(getattr(config, "_name_or_path", "") or "edge-llm model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    _add_tokenizer(writer, tokenizer, reference_gguf)
    _add_edge_metadata(writer, base, edge_config, schedule)

    parts = find_decoder_parts(base)
    layers = parts.layers(base)
    adapted = adapted_layers(edge_config, len(layers))
    fallbacks: Counter[tuple[str, str, int]] = Counter()  # (wanted type, used type, row length) -> tensors
    encodings: Counter[str] = Counter()  # "LUC codes" / "re-quantized" -> tensors
    embedding = base.get_input_embeddings()
    data, qtype = _llama_cpp_blocks(embedding) or (embedding.weight.detach().float().numpy().astype(np.float16), None)
    writer.add_tensor("token_embd.weight", data, raw_dtype=qtype)
    for index, layer in enumerate(layers):
        bits, _ = layer_setting(layer)
        for suffix, gguf_name in LLAMA_TENSORS.items():
            module = layer.get_submodule(suffix)
            if gguf_name.endswith("norm"):
                writer.add_tensor(block_tensor_name(index, suffix), module.weight.detach().float().numpy())
                continue
            rotary_heads = {"attn_q": heads, "attn_k": kv_heads}.get(gguf_name)
            data = _tensor_bytes(
                module, bits, fold_adapters and index in adapted, rotary_heads, k_quants, fallbacks, encodings
            )
            writer.add_tensor(block_tensor_name(index, suffix), data[0], raw_dtype=data[1])
    writer.add_tensor("output_norm.weight", parts.norm(base).weight.detach().float().numpy())
    if not config.tie_word_embeddings:
        head = parts.head(base)
        data, qtype = _llama_cpp_blocks(head) or (effective_weight(head).numpy().astype(np.float16), None)
        writer.add_tensor("output.weight", data, raw_dtype=qtype)
    logger.info(
        "GGUF: %d tensors hold LUC's llama.cpp blocks unchanged, %d LUC's codes unchanged, %d were re-quantized "
        "from their float weights",
        encodings["LUC blocks"],
        encodings["LUC codes"],
        encodings["re-quantized"],
    )
    for (wanted, used, row_length), count in sorted(fallbacks.items()):
        logger.info(
            "GGUF: %d tensors have rows of %d, not whole %s blocks; stored as %s", count, row_length, wanted, used
        )
    write_file(writer, path)
    return path


def write_file(writer: Any, path: Path) -> None:
    """Write a filled `gguf.GGUFWriter` to `path` whole (a temporary file, then renamed)."""
    with atomic_file(path) as temporary:
        writer.write_header_to_file(temporary)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    logger.info("Wrote %s (%.1f MiB)", path, path.stat().st_size / 2**20)


def gguf_fixed_bytes(model: nn.Module, tokenizer: Any = None, reference_gguf: str | Path | None = None) -> int:
    """The bytes of `write_gguf(model, ..., tokenizer, reference_gguf)`'s file that no weight type
    changes: header, metadata (the vocabulary), tensor index and norms. The file of a model LUC
    compressed for llama.cpp is this plus its policy's bytes (`gguf_policy.policy_bytes`).

    Measured, not estimated: `model` (dense, before compression) is written with every weight in
    F16 to a temporary file, whose size less those weights' bytes is the answer."""
    import tempfile

    from edge_llm.luc.gguf_policy import policy_bytes
    from edge_llm.luc.gguf_sensitivity import weight_tensors

    with tempfile.TemporaryDirectory() as tmp:
        size = write_gguf(model, Path(tmp) / "skeleton.gguf", tokenizer, reference_gguf).stat().st_size
    return size - policy_bytes(model, dict.fromkeys(weight_tensors(model), "F16"))


def _llama_cpp_blocks(module: nn.Module) -> tuple[np.ndarray, Any] | None:
    """The llama.cpp blocks a module LUC compressed for llama.cpp holds, with their GGUF type, to
    be written unchanged; None for any other module."""
    import gguf

    if isinstance(module, (GGMLLinear, GGMLEmbedding)):
        return module.weight.cpu().numpy(), gguf.GGMLQuantizationType[module.weight_type]
    return None


def _add_tokenizer(writer: Any, tokenizer: Any, reference_gguf: str | Path | None) -> None:
    import gguf

    if reference_gguf is not None:
        reader = gguf.GGUFReader(str(reference_gguf))
        for field in reader.fields.values():
            if not field.name.startswith("tokenizer."):
                continue
            value = field.contents()
            kind = field.types[0]
            if kind == gguf.GGUFValueType.ARRAY:
                writer.add_array(field.name, value)
            else:
                writer.add_key_value(field.name, value, kind)
        return
    if tokenizer is None:
        raise ValueError("GGUF export needs the tokenizer (or a reference GGUF to copy it from).")
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_ids)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = backend["model"].get("merges", [])
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    if not merges:
        raise ValueError(
            "The tokenizer has no BPE merges, which llama.cpp needs for a 'gpt2'-style vocabulary; pass "
            "reference_gguf= (a GGUF of the same base model) to copy its tokenizer instead."
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)


def _add_edge_metadata(writer: Any, base: nn.Module, edge_config: Any, schedule: Any) -> None:
    policy = policy_of(base)
    if policy is not None:
        writer.add_string("edge_llm.luc_policy", json.dumps(policy.to_dict()))
    if edge_config is not None:
        writer.add_array("edge_llm.exits", [int(e) for e in edge_config.exit_layers])
        writer.add_string("edge_llm.voting", edge_config.voting)
        if edge_config.exit_weights:
            writer.add_array("edge_llm.exit_weights", [float(w) for w in edge_config.exit_weights])
    if schedule is not None:
        writer.add_string("edge_llm.schedule", json.dumps(schedule.to_dict()))
