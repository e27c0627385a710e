import math

import pytest
import torch

from edge_llm import vote
from edge_llm.tuner.voting import fit_exit_weights


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


def test_weighted_vote_is_a_mixture():
    logits = _hand_logits()
    voted = vote(logits, "weighted", [0.25, 0.75])
    expected = 0.25 * torch.tensor([0.7, 0.2, 0.1]) + 0.75 * torch.tensor([0.1, 0.3, 0.6])
    torch.testing.assert_close(voted.exp(), expected)
    torch.testing.assert_close(vote(logits, "weighted", None), vote(logits, "mean"))
    torch.testing.assert_close(vote(logits, "weighted", [0.0, 1.0]), logits[1].log_softmax(-1))


def test_fit_exit_weights_recovers_the_mixture_and_ignores_useless_exits():
    generator = torch.Generator().manual_seed(0)
    # Token probabilities of two exits; tokens drawn from the mixture 0.3 * exit0 + 0.7 * exit1.
    p0 = torch.softmax(torch.randn(50, generator=generator) * 2, -1)
    p1 = torch.softmax(torch.randn(50, generator=generator) * 2, -1)
    tokens = torch.multinomial(0.3 * p0 + 0.7 * p1, 20000, replacement=True, generator=generator)
    weights = fit_exit_weights(torch.stack([p0[tokens].log(), p1[tokens].log()]))
    assert weights == pytest.approx([0.3, 0.7], abs=0.03)
    # A third exit that spreads its mass uniformly over 1000 words is worth (almost) nothing.
    useless = torch.full_like(tokens, -math.log(1000), dtype=torch.float32)
    weights = fit_exit_weights(torch.stack([p0[tokens].log(), p1[tokens].log(), useless]))
    assert weights[2] < 0.01 and sum(weights) == pytest.approx(1.0)
