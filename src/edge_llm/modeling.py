"""Find the parts of a decoder-only transformers model that edge-llm works on.

Every pillar needs the same three things from a causal LM: the list of decoder layers, the final
norm and the LM head. Most Hugging Face decoder-only models keep them at a handful of well-known
attribute paths; a small table covers those and a generic search covers the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# (layers, final norm, LM head) attribute paths, relative to the *ForCausalLM model.
_KNOWN_LAYOUTS: dict[str, tuple[str, str, str]] = {
    "llama": ("model.layers", "model.norm", "lm_head"),
    "mistral": ("model.layers", "model.norm", "lm_head"),
    "qwen2": ("model.layers", "model.norm", "lm_head"),
    "qwen3": ("model.layers", "model.norm", "lm_head"),
    "gemma": ("model.layers", "model.norm", "lm_head"),
    "gemma2": ("model.layers", "model.norm", "lm_head"),
    "phi3": ("model.layers", "model.norm", "lm_head"),
    "olmo2": ("model.layers", "model.norm", "lm_head"),
    "granite": ("model.layers", "model.norm", "lm_head"),
    "smollm3": ("model.layers", "model.norm", "lm_head"),
    "phi": ("model.layers", "model.final_layernorm", "lm_head"),
    "gpt2": ("transformer.h", "transformer.ln_f", "lm_head"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm", "embed_out"),
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm", "lm_head"),
    "falcon": ("transformer.h", "transformer.ln_f", "lm_head"),
    "bloom": ("transformer.h", "transformer.ln_f", "lm_head"),
}

# Names under which models keep their final norm, for models outside the table.
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")


class UnsupportedModelError(ValueError):
    """The model is not a decoder-only LM whose layers, final norm and LM head can be found."""


@dataclass(frozen=True)
class DecoderParts:
    """Where a causal LM keeps its decoder layers, final norm and LM head.

    Paths are dotted attribute paths relative to the model they were found on, so the parts can be
    swapped temporarily (see `swap`) without knowing the architecture.
    """

    layers_path: str
    norm_path: str
    head_path: str

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.norm_path)

    def head(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.head_path)

    def swap(self, model: nn.Module, path: str, module: nn.Module) -> nn.Module:
        """Put `module` at `path` and return what was there before."""
        previous = model.get_submodule(path)
        model.set_submodule(path, module)
        return previous


def _has_path(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _module_path(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def find_decoder_parts(model: nn.Module) -> DecoderParts:
    """Locate the decoder layer list, final norm and LM head of a causal LM.

    Raises:
        UnsupportedModelError: when the model has no LM head or no decoder layer list (an encoder,
            an encoder-decoder or a non-transformers module), naming what was looked for.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"edge-llm supports decoder-only causal LMs; this is an encoder-decoder model ({model_type}). "
            "Use a *ForCausalLM model such as Llama, Qwen2, Mistral, Gemma or GPT-2."
        )
    if _is_masked_lm(model):
        raise UnsupportedModelError(
            f"edge-llm supports decoder-only causal LMs; {type(model).__name__} is a masked-LM encoder ({model_type}). "
            "Use a *ForCausalLM model such as Llama, Qwen2, Mistral, Gemma or GPT-2."
        )
    layout = _KNOWN_LAYOUTS.get(model_type)
    if layout is not None and all(_has_path(model, p) for p in layout):
        return DecoderParts(*layout)
    return _search_decoder_parts(model, model_type)


def _is_masked_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())


def _search_decoder_parts(model: nn.Module, model_type: str | None) -> DecoderParts:
    what = (
        "an LM head (get_output_embeddings()), a ModuleList of decoder layers with "
        "config.num_hidden_layers entries, and a final norm named one of " + ", ".join(_FINAL_NORM_NAMES)
    )
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head_path = _module_path(model, head) if isinstance(head, nn.Module) else None
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    layer_lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (num_layers is None or len(module) == num_layers)
    ]
    if head_path is None or not layer_lists:
        raise UnsupportedModelError(
            f"Cannot use model type {model_type!r} ({type(model).__name__}) with edge-llm: looked for {what}, "
            f"found head={head_path!r}, layer lists={[n for n, _ in layer_lists]}. Is this a decoder-only causal LM?"
        )
    # The decoder stack is the outermost matching list (nested lists, e.g. experts, come later).
    layers_path = min((name for name, _ in layer_lists), key=lambda n: n.count("."))
    owner_path = layers_path.rpartition(".")[0]
    for norm_name in _FINAL_NORM_NAMES:
        norm_path = f"{owner_path}.{norm_name}" if owner_path else norm_name
        if _has_path(model, norm_path):
            return DecoderParts(layers_path, norm_path, head_path)
    raise UnsupportedModelError(
        f"Cannot use model type {model_type!r} with edge-llm: found decoder layers at {layers_path!r} but no "
        f"final norm next to them; looked for {what}."
    )


def postprocess_logits(config: object, logits: torch.Tensor) -> torch.Tensor:
    """Apply what some models do to `lm_head` output before returning logits.

    Exit logits are computed outside the model's own forward, so they must get the same treatment:
    Gemma 2/3 soft-cap the logits, Cohere multiplies them by `logit_scale`, Granite divides by
    `logits_scaling`.
    """
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and getattr(config, "model_type", "").startswith("cohere"):
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        logits = logits / scaling
    return logits


def first_tensor(output: torch.Tensor | tuple) -> torch.Tensor:
    """A decoder layer returns its hidden state either plainly or as the first item of a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output
