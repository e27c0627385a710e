import logging

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 4-layer Llama with SmolLM2's tokenizer, saved like any transformers model."""
    from edge_llm.assets import smollm2_135m

    path = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_135m())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_instructions(tmp_path_factory):
    """30 instruction/response rows (the first sonnets) as a JSONL file: quick to train on."""
    import json

    from edge_llm.data import sonnet_instructions

    path = tmp_path_factory.mktemp("data") / "instructions.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in sonnet_instructions()[:30]) + "\n")
    return path
