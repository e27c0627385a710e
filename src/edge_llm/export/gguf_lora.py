"""A LoRA adapter as a GGUF file for llama.cpp (`llama-cli -m model.gguf --lora adapter.gguf`;
llama-cpp-python `Llama(model_path, lora_path=...)`), beside a base written with
`write_gguf(..., fold_adapters=False)`.

Why not merge: folding an update into a quantized base re-rounds every adapted weight, so the file
would hold weights nobody trained or measured; kept apart, llama.cpp computes `W x + s B (A x)` with
the base's stored blocks and the adapter's float32 factors, exactly what PyTorch tuned, and one
base serves several adapters. The layout is llama.cpp's (`convert_lora_to_gguf.py`): per adapted
tensor `<name>.lora_a` (rank x in) and `<name>.lora_b` (out x rank), `general.type = "adapter"`.

peft's scaling (alpha / r, or alpha / sqrt(r) for rsLoRA, per layer with rank or alpha patterns) is
folded into `lora_b`, and `adapter.lora.alpha` is 0, which llama.cpp reads as "scale 1": every
layer then carries its own scale exactly. The query and key rows are permuted as the base's are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_llm.export.gguf import LLAMA_TENSORS, SUPPORTED_MODEL_TYPES, block_tensor_name, write_file
from edge_llm.export.gguf_blocks import permute_rotary
from edge_llm.export.weights import adapted_layers, adapter_names
from edge_llm.modeling import find_decoder_parts
from edge_llm.tuner.config import EdgeLLMConfig


def write_gguf_lora(model: nn.Module, path: str | Path, adapter_name: str | None = None) -> Path:
    """Write one LoRA adapter of `model` (a PeftModel over a Llama-family model) as a llama.cpp
    adapter GGUF at `path`; `adapter_name` defaults to the active adapter.

    Only what llama.cpp applies is accepted: LoRA on the decoder's Linear layers, unmerged, without
    DoRA, LoRA biases or fully trained modules (`modules_to_save`). With an Edge-LLM adapter the
    file holds the layers the last exit computes with (`adapted_layers`), as `write_gguf` folds them.
    """
    import gguf
    from peft.tuners.lora import LoraLayer

    name = adapter_name or model.active_adapter
    if name not in adapter_names(model):
        raise ValueError(f"The model has no adapter {name!r}; it has {list(model.peft_config)}.")
    config = model.peft_config[name]
    _check_exportable(config, name)
    base = model.get_base_model()
    if base.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"GGUF adapters are written for {', '.join(SUPPORTED_MODEL_TYPES)} models, not {base.config.model_type!r}."
        )
    heads, kv_heads = base.config.num_attention_heads, base.config.num_key_value_heads
    layers = find_decoder_parts(base).layers(base)
    adapted = adapted_layers(config if isinstance(config, EdgeLLMConfig) else None, len(layers))

    writer = gguf.GGUFWriter(None, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # scale 1: the scaling is in lora_b
    covered: set[int] = set()
    written = 0
    for index, layer in enumerate(layers):
        for suffix, gguf_name in LLAMA_TENSORS.items():
            module = layer.get_submodule(suffix)
            if not isinstance(module, LoraLayer) or name not in module.lora_A:
                continue
            covered.add(id(module))
            if index not in adapted:
                continue
            if module.merged:
                raise ValueError(
                    f"Adapter {name!r} is merged into the base; call model.unmerge_adapter() before writing it apart."
                )
            lora_a, lora_b = _factors(module, name)
            rotary_heads = {"attn_q": heads, "attn_k": kv_heads}.get(gguf_name)
            if rotary_heads:
                lora_b = permute_rotary(lora_b, rotary_heads)
            tensor = block_tensor_name(index, suffix)
            writer.add_tensor(f"{tensor}.lora_a", lora_a)
            writer.add_tensor(f"{tensor}.lora_b", lora_b)
            written += 1
    elsewhere = [
        module_name
        for module_name, module in base.named_modules()
        if isinstance(module, LoraLayer) and name in module.lora_A and id(module) not in covered
    ]
    if elsewhere:
        raise ValueError(
            f"Adapter {name!r} adapts {elsewhere[:3]}, outside the decoder's Linear layers, which a llama.cpp adapter "
            "cannot hold: write the model with the adapter folded in (write_gguf) instead."
        )
    if written == 0:
        raise ValueError(f"Adapter {name!r} adapts none of the layers the model's last exit computes with.")
    write_file(writer, Path(path))
    return Path(path)


def _check_exportable(config: Any, name: str) -> None:
    unsupported = {
        "use_dora": "DoRA",
        "lora_bias": "LoRA biases",
        "modules_to_save": "fully trained modules (modules_to_save)",
    }
    for field, what in unsupported.items():
        if getattr(config, field, None):
            raise ValueError(
                f"Adapter {name!r} uses {what}, which a llama.cpp LoRA adapter cannot hold: write the model with the "
                "adapter folded in (write_gguf) instead."
            )


@torch.no_grad()
def _factors(module: nn.Module, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(A, scaling * B) of one LoRA layer as float32 arrays: (rank x in), (out x rank)."""
    lora_a = module.lora_A[name].weight.float()
    lora_b = module.lora_B[name].weight.float() * float(module.scaling[name])
    return lora_a.cpu().numpy(), lora_b.cpu().numpy()
