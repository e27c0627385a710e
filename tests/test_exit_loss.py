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


def _reference_loss_and_grads(hidden, labels, head_fn):
    states, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(head_fn(states).float(), targets, ignore_index=-100)


@pytest.mark.parametrize(
    "head_kind", ["linear", "softcapped", "bfloat16"], ids=["overwrite-in-place", "output-saved", "half-head"]
)
def test_fused_gradient_matches_autograd_for_every_kind_of_head(head_kind):
    # A head whose autograd node keeps its own output (tanh soft-capping, as Gemma 2) must not be
    # overwritten in place; a half-precision head gets a float32 copy.
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=False)
    if head_kind == "bfloat16":
        head = head.to(torch.bfloat16)

    def head_fn(states):
        logits = head(states.to(head.weight.dtype))
        return torch.tanh(logits / 3) * 3 if head_kind == "softcapped" else logits

    labels = torch.randint(0, 37, (2, 9))
    labels[1, :3] = -100
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    head.weight.requires_grad_(True)
    loss = chunked_causal_lm_loss(hidden, labels, head_fn, [head.weight], chunk_size=4)
    grads = torch.autograd.grad(loss, [hidden, head.weight])
    reference = _reference_loss_and_grads(hidden, labels, head_fn)
    expected = torch.autograd.grad(reference, [hidden, head.weight])
    tolerance = {"rtol": 2e-2, "atol": 2e-3} if head_kind == "bfloat16" else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(loss, reference.float(), **tolerance)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.float(), want.float(), **tolerance)


def test_a_compressed_heads_logits_become_their_gradient_in_place():
    # CompressedMatmul's backward decodes the weight again and never reads its output, so the
    # chunk's logits are overwritten, not copied: one vocabulary-wide buffer per chunk, not two.
    from edge_llm.luc.linear import UNQUANTIZED_BITS, LUCLinear
    from edge_llm.tuner.loss import _float_logits_to_overwrite

    torch.manual_seed(0)
    head = LUCLinear.from_linear(torch.nn.Linear(16, 37, bias=False), UNQUANTIZED_BITS, 0.0, 16)
    states = torch.randn(5, 16, requires_grad=True)
    out = head(states)
    assert _float_logits_to_overwrite(out).data_ptr() == out.data_ptr()
    capped = torch.tanh(head(states) / 3)  # tanh keeps its output for backward: copied
    assert _float_logits_to_overwrite(capped).data_ptr() != capped.data_ptr()

    labels = torch.randint(0, 37, (2, 9))
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    loss = chunked_causal_lm_loss(hidden, labels, head, [], chunk_size=4)
    reference = _reference_loss_and_grads(hidden, labels, head)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(torch.autograd.grad(loss, hidden)[0], torch.autograd.grad(reference, hidden)[0])


def test_auto_chunk_size_sizes_logits_like_the_hidden_states():
    from edge_llm.tuner.loss import MIN_AUTO_CHUNK, auto_chunk_size

    assert auto_chunk_size(8192, 2048, 32000) == 512  # 8192 / ceil(32000 / 2048)
    assert auto_chunk_size(1020, 576, 49152) == MIN_AUTO_CHUNK
    assert auto_chunk_size(1, 8, 8) == MIN_AUTO_CHUNK


def test_enable_chunked_loss_gives_a_stock_lora_model_the_same_loss_and_gradients():
    from peft import LoraConfig

    from edge_llm import enable_chunked_loss

    def run(chunked):
        model = get_peft_model(
            tiny_model("llama", 3), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        handle = enable_chunked_loss(model, chunk_size=7) if chunked else None
        model.train()
        x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
        labels = x.clone()
        labels[0, :5] = -100
        out = model(input_ids=x, labels=labels)
        out.loss.backward()
        with torch.no_grad():
            evaluated = model(input_ids=x, labels=labels)  # evaluation keeps its logits
        return out, evaluated, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, handle, model

    chunked, evaluated, chunked_grads, handle, model = run(True)
    full, _, full_grads, _, _ = run(False)
    assert chunked.get("logits") is None and evaluated.logits.shape == (2, 12, VOCAB)
    torch.testing.assert_close(chunked.loss, full.loss)
    torch.testing.assert_close(evaluated.loss, full.loss)
    assert sorted(chunked_grads) == sorted(full_grads) and chunked_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6)
    handle.remove()
    x = torch.randint(0, VOCAB, (1, 5))
    assert model(input_ids=x, labels=x).logits.shape == (1, 5, VOCAB)  # the model's own loss again
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        enable_chunked_loss(model, chunk_size=0)


def test_the_loss_records_no_vocabulary_wide_tensor_for_backward_under_autocast():
    # Under autocast the head's logits are bfloat16; the float32 copy that becomes the gradient
    # must stay outside autograd, or every chunk's softmax would be recorded (and kept) as a graph.
    head = torch.nn.Linear(16, 53, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 53, (2, 9))
    packed = []

    def pack(tensor):
        packed.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_causal_lm_loss(hidden, labels, head, [], chunk_size=4)
    loss.backward()
    assert packed and (4, 53) not in packed  # a chunk of logits (the bfloat16 head weight is saved, 16 x 53)
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_already_shifted_targets_are_taken_as_the_model_own_loss_takes_them():
    from edge_llm import enable_chunked_loss

    def loss(chunked):
        model = tiny_model("llama", 2)
        handle = enable_chunked_loss(model, chunk_size=5) if chunked else None
        model.train()
        x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
        shifted = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
        shifted[:, -1] = -100
        out = model(input_ids=x, labels=x, shift_labels=shifted)  # shift_labels win, unshifted
        out.loss.backward()
        del handle
        return out.loss.detach(), model.model.layers[0].mlp.down_proj.weight.grad

    (chunked, chunked_grad), (own, own_grad) = loss(True), loss(False)
    torch.testing.assert_close(chunked, own)
    torch.testing.assert_close(chunked_grad, own_grad, rtol=1e-4, atol=1e-6)
