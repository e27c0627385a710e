"""The chunked exit loss equals the model's own loss, with the same gradients."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, lora_targets, tiny_model

from edge_llm import EdgeLLMConfig
from edge_llm.tuner.loss import chunked_causal_lm_loss


def loss_and_grads(arch, chunk, labels, head="shared", **forward_kwargs):
    model = get_peft_model(
        tiny_model(arch, 6),
        EdgeLLMConfig(
            r=4,
            target_modules=lora_targets(arch),
            exit_layers=[1, 3],
            backprop_depth=2,
            init_lora_weights=False,
            exit_head=head,
            loss_chunk_size=chunk,
        ),
    )
    torch.manual_seed(1)
    for param in model.base_model.exit_heads.parameters():  # make per-exit heads non-trivial
        param.data.add_(0.1 * torch.randn_like(param))
    model.train()
    x = torch.randint(0, VOCAB, labels.shape, generator=torch.Generator().manual_seed(0))
    with model.exit_at(3):
        out = model(input_ids=x, labels=labels, **forward_kwargs)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("arch", "head"), [("llama", "shared"), ("gpt2", "lora"), ("gemma", "norm")])
def test_chunked_loss_matches_full_logits_loss(arch, head):
    labels = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(2))
    labels[0, :4] = -100  # a masked prompt
    chunked, chunked_grads = loss_and_grads(arch, 5, labels, head)
    full, full_grads = loss_and_grads(arch, None, labels, head)
    assert chunked.get("logits") is None and full.logits.shape == (3, 11, VOCAB)
    torch.testing.assert_close(chunked.loss, full.loss)
    assert sorted(chunked_grads) == sorted(full_grads)
    assert any("exit_heads" in n for n in full_grads) == (head != "shared")
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_num_items_in_batch_divides_the_summed_loss():
    labels = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mean, _ = loss_and_grads("llama", 4, labels)
    summed_over_40, _ = loss_and_grads("llama", 4, labels, num_items_in_batch=40)
    torch.testing.assert_close(summed_over_40.loss, mean.loss * 16 / 40)


def test_all_targets_masked_gives_zero_loss_with_a_graph():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 13)
    loss = chunked_causal_lm_loss(hidden, torch.full((2, 5), -100), head, [])
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None and not hidden.grad.any()


def test_peak_memory_of_chunks_is_bounded():
    # 4096 targets x 50k vocabulary would be 800 MB of float32 logits; chunks of 128 need 25 MB.
    hidden = torch.randn(1, 4097, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50_000, bias=False)
    head.requires_grad_(False)
    peak = {"bytes": 0}

    def track(tensor):
        peak["bytes"] = max(peak["bytes"], tensor.numel() * tensor.element_size())
        return tensor

    def head_fn(states):
        return track(head(states))

    labels = torch.randint(0, 50_000, (1, 4097))
    chunked_causal_lm_loss(hidden, labels, head_fn, [], chunk_size=128).backward()
    assert peak["bytes"] == 128 * 50_000 * 4
    assert hidden.grad.shape == hidden.shape
