import logging

import pytest
from tiny_models import save_llama_with_smollm2_tokenizer


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 4-layer Llama with SmolLM2's tokenizer, saved like any transformers model."""
    return save_llama_with_smollm2_tokenizer(tmp_path_factory.mktemp("tiny"), num_layers=4)


@pytest.fixture(scope="session")
def small_instructions(tmp_path_factory):
    """30 instruction/response rows (the first sonnets) as a JSONL file: quick to train on."""
    import json

    from edge_llm.data import sonnet_instructions

    path = tmp_path_factory.mktemp("data") / "instructions.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in sonnet_instructions()[:30]) + "\n")
    return path
