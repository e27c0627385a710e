import math

import pytest
import torch

from edge_llm import vote


def _hand_logits():
    # Two exits over a 3-word vocabulary; logits are log-probabilities, so the softmaxes are
    # [0.7, 0.2, 0.1] and [0.1, 0.3, 0.6].
    return [torch.tensor([0.7, 0.2, 0.1]).log(), torch.tensor([0.1, 0.3, 0.6]).log()]


def test_last_returns_last_logits_unchanged():
    logits = [torch.randn(2, 3, 5), torch.randn(2, 3, 5)]
    assert vote(logits, "last") is logits[-1]


def test_mean_is_average_of_probabilities():
    logits = _hand_logits()
    voted = vote(logits, "mean")
    torch.testing.assert_close(voted.exp(), torch.tensor([0.4, 0.25, 0.35]))
    torch.testing.assert_close(voted.softmax(-1), torch.tensor([0.4, 0.25, 0.35]))


def test_confidence_is_renormalised_elementwise_max():
    logits = _hand_logits()
    voted = vote(logits, "confidence")
    # max -> [0.7, 0.3, 0.6], sum 1.6
    torch.testing.assert_close(voted.exp(), torch.tensor([0.7 / 1.6, 0.3 / 1.6, 0.6 / 1.6]))


def test_confidence_matches_reference_formula_on_random_logits():
    torch.manual_seed(0)
    logits = [torch.randn(2, 4, 11) * 3 for _ in range(4)]
    probs = torch.stack([z.softmax(-1) for z in logits])
    top = probs.max(0).values
    expected = top / top.sum(-1, keepdim=True)
    torch.testing.assert_close(vote(logits, "confidence").softmax(-1), expected)


def test_voting_in_log_space_keeps_tiny_probabilities_finite():
    # A token the exits give probability ~e^-200: probability space underflows to 0 in float32.
    logits = [torch.tensor([0.0, -200.0]), torch.tensor([0.0, -210.0])]
    expected = {"mean": -200.0 - math.log(2.0), "confidence": -200.0}
    for rule, value in expected.items():
        voted = vote(logits, rule)
        assert torch.isfinite(voted).all()
        assert voted[1].item() == pytest.approx(value, abs=1e-3)


def test_unknown_rule_and_empty_input_are_rejected():
    with pytest.raises(ValueError, match="Unknown voting rule 'median'"):
        vote([torch.zeros(3)], "median")
    with pytest.raises(ValueError, match="at least one exit"):
        vote([], "mean")
