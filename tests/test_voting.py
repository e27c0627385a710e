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


def test_geometric_vote_is_the_renormalised_weighted_product():
    from edge_llm import vote

    torch.manual_seed(0)
    logits = [torch.randn(3, 11) for _ in range(3)]
    weights = [0.2, 0.0, 0.8]
    probs = [torch.softmax(z, dim=-1) for z in logits]
    product = probs[0] ** 0.2 * probs[2] ** 0.8
    expected = product / product.sum(-1, keepdim=True)
    torch.testing.assert_close(torch.softmax(vote(logits, "geometric", weights), -1), expected)


def test_a_registered_voting_rule_is_known_everywhere(monkeypatch):
    """Adding a rule is one registry entry: config, adapter, evaluation and schedule files take it."""
    from peft import get_peft_model
    from tiny_models import VOCAB, tiny_model

    from edge_llm import EdgeLLMConfig
    from edge_llm.evaluation import perplexity
    from edge_llm.tuner import voting

    rule = voting.VotingRule("first", "the lowest exit's logits", lambda logits, weights: logits[0])
    monkeypatch.setitem(voting.VOTING_RULES, "first", rule)
    with pytest.raises(ValueError, match="already registered"):
        voting.register_voting_rule(rule)
    config = EdgeLLMConfig(r=2, target_modules=["q_proj"], exit_layers=[1, 3], voting="first")
    model = get_peft_model(tiny_model("llama", 4), config).eval()
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=x, return_exit_logits=True)
    torch.testing.assert_close(out.logits, out.exit_logits[1])
    assert "voted_first" in perplexity(model, x)


def test_vote_takes_the_exit_logits_dict_a_voting_pass_returns():
    logits = {3: torch.randn(2, 5), 1: torch.randn(2, 5)}
    torch.testing.assert_close(vote(logits, "mean"), vote([logits[1], logits[3]], "mean"))
    assert vote(logits, "last") is logits[3]
