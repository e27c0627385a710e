"""Exit passes, gradient windows, voting and generation on tiny random models."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, lora_targets, tiny_model

from edge_llm import EdgeLLMConfig, find_decoder_parts, vote


def make(arch="llama", num_layers=8, **config):
    config.setdefault("target_modules", lora_targets(arch))
    # Non-zero LoRA B, so adapters change the output and mistakes in who-sees-what show up.
    config.setdefault("init_lora_weights", False)
    return get_peft_model(tiny_model(arch, num_layers), EdgeLLMConfig(r=4, lora_alpha=8, **config))


def layers_of(peft_model):
    base = peft_model.get_base_model()
    return find_decoder_parts(base).layers(base)


def batch(seed=0, length=12):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, length), generator=generator)


def count_layer_calls(peft_model):
    calls, grads = {}, {}

    def hook(index):
        def record(module, args, output):
            calls[index] = calls.get(index, 0) + 1
            # Our own hooks restore grad mode after a layer, so look at what the layer produced.
            hidden = output[0] if isinstance(output, tuple) else output
            grads[index] = hidden.requires_grad

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers_of(peft_model))]
    return calls, grads, handles


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_lora_weights_of_the_window_get_gradients(arch):
    model = make(arch, num_layers=8, exit_layers=[3, 5], backprop_depth=2)
    model.train()
    model.set_active_exit(5)
    x = batch()
    model(input_ids=x, labels=x).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    layer_key = "layers" if arch == "llama" else "h"
    expected = {
        n
        for n, p in model.named_parameters()
        if "lora_" in n and int(n.split(f".{layer_key}.")[1].split(".")[0]) in (4, 5)
    }
    assert expected and with_grad == expected
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in expected)
    # The base model stays frozen.
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layers_above_the_exit_never_run_and_layers_below_the_window_run_without_autograd(arch):
    model = make(arch, num_layers=8, exit_layers=[3, 5], backprop_depth=2)
    model.train()
    calls, grads, handles = count_layer_calls(model)
    with model.exit_at(5):
        model(input_ids=batch(), labels=batch())
    for handle in handles:
        handle.remove()
    assert calls == {i: 1 for i in range(6)}
    assert grads == {0: False, 1: False, 2: False, 3: False, 4: True, 5: True}
    assert torch.is_grad_enabled()  # restored after the pass
    assert len(layers_of(model)) == 8  # the full layer list is back


def test_exit_pass_equals_final_norm_and_head_of_the_layer_output():
    model = make("llama", num_layers=6, exit_layers=[2])
    model.eval()
    x = batch()
    captured = {}
    handle = layers_of(model)[2].register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
    with torch.no_grad():
        full = model(input_ids=x)
    handle.remove()
    base = model.get_base_model()
    expected = base.lm_head(base.model.norm(captured["h"]))
    with torch.no_grad(), model.exit_at(2):
        exit_out = model(input_ids=x)
    torch.testing.assert_close(exit_out.logits, expected)
    assert not torch.allclose(exit_out.logits, full.logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "gpt2"])
@pytest.mark.parametrize("rule", ["last", "mean", "confidence"])
def test_voting_pass_combines_the_exit_passes(arch, rule):
    model = make(arch, num_layers=6, exit_layers=[1, 3], voting=rule)
    model.eval()
    x = batch()
    with torch.no_grad():
        voted = model(input_ids=x, labels=x, return_exit_logits=True)
        per_exit = {}
        for layer in model.exit_layers:
            with model.exit_at(layer):
                per_exit[layer] = model(input_ids=x).logits
    assert list(voted.exit_logits) == [1, 3, 5]
    for layer, logits in per_exit.items():
        torch.testing.assert_close(voted.exit_logits[layer], logits)
    expected = vote([per_exit[layer] for layer in (1, 3, 5)], rule)
    torch.testing.assert_close(voted.logits, expected)
    if rule == "last":
        assert voted.logits.dtype == per_exit[5].dtype
    else:
        torch.testing.assert_close(voted.logits.softmax(-1), voted.logits.exp())  # log-probabilities
    # The loss is the causal-LM loss of the voted distribution.
    shifted = torch.nn.functional.cross_entropy(voted.logits[:, :-1].reshape(-1, VOCAB).float(), x[:, 1:].reshape(-1))
    torch.testing.assert_close(voted.loss, shifted)


def test_voting_pass_runs_every_layer_once():
    model = make("llama", num_layers=6, exit_layers=[1, 3], voting="confidence", window_input="adapted")
    calls, _, handles = count_layer_calls(model)
    with torch.no_grad():
        model(input_ids=batch())
    assert calls == {i: 1 for i in range(6)}
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("rule", ["confidence", "last"])
def test_generate_uses_voted_logits_with_the_kv_cache(rule):
    model = make("llama", num_layers=6, exit_layers=[1, 3], voting=rule)
    model.eval()
    prompt = batch(length=5)
    generated = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, use_cache=True
    )
    # Reference: greedy decoding on full-sequence voted logits, no cache.
    tokens = prompt
    with torch.no_grad():
        for _ in range(6):
            next_token = model(input_ids=tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)


def test_generate_with_sampling_and_an_active_exit():
    model = make("gpt2", num_layers=6, exit_layers=[1, 3])
    model.eval()
    prompt = batch(length=4)
    torch.manual_seed(0)
    sampled = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=True, top_k=10
    )
    assert sampled.shape == (2, 9)
    with model.exit_at(3):
        early = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False
        )
    tokens = prompt
    with torch.no_grad(), model.exit_at(3):
        for _ in range(5):
            next_token = model(input_ids=tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(early, tokens)


@pytest.mark.parametrize("head", ["norm", "lora"])
def test_exit_heads_train_only_their_own_exit(head):
    model = make("llama", num_layers=6, exit_layers=[1, 3], backprop_depth=2, exit_head=head)
    model.train()
    heads = model.base_model.exit_heads["default"]
    assert sorted(heads) == ["1", "3"]  # none for the last exit: it is the model's own output
    with model.exit_at(3):
        x = batch()
        model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in heads["3"].parameters())
    assert all(p.grad is None for p in heads["1"].parameters())


def test_exit_head_norm_starts_as_the_shared_head():
    shared = make("llama", num_layers=6, exit_layers=[1, 3])
    with_norm = make("llama", num_layers=6, exit_layers=[1, 3], exit_head="norm")
    x = batch()
    with torch.no_grad():
        a = shared(input_ids=x, return_exit_logits=True).exit_logits
        b = with_norm(input_ids=x, return_exit_logits=True).exit_logits
    for layer in (1, 3, 5):
        torch.testing.assert_close(a[layer], b[layer])


def test_backbone_windows_see_the_layers_below_without_adapters():
    model = make("llama", num_layers=6, exit_layers=[1, 3, 5], backprop_depth=2, window_input="backbone")
    model.eval()
    x = batch()
    with torch.no_grad():
        voted = model(input_ids=x, return_exit_logits=True)
        # Reference: exit 3 = adapters off for layers 0-1, on for 2-3.
        lora = [m for m in model.modules() if hasattr(m, "_disable_adapters")]
        below = [
            m for m in lora if any(f"layers.{i}." in n for i in (0, 1) for n, mm in model.named_modules() if mm is m)
        ]
        for m in below:
            m._disable_adapters = True
        with model.exit_at(3):
            reference = model(input_ids=x).logits
        for m in below:
            m._disable_adapters = False
        with model.exit_at(3):
            exit_pass = model(input_ids=x).logits
    torch.testing.assert_close(voted.exit_logits[3], reference)
    torch.testing.assert_close(exit_pass, reference)
    assert not any(m._disable_adapters for m in lora)


def test_backbone_generation_with_cache_matches_no_cache():
    model = make("llama", num_layers=6, exit_layers=[1, 3], backprop_depth=2, window_input="backbone", voting="mean")
    model.eval()
    prompt = batch(length=5)
    generated = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False
    )
    tokens = prompt
    with torch.no_grad():
        for _ in range(5):
            next_token = model(input_ids=tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)


def test_backbone_adapters_cannot_be_merged():
    model = make("llama", num_layers=4, window_input="backbone")
    with pytest.raises(ValueError, match="Cannot merge an Edge-LLM adapter with window_input='backbone'"):
        model.merge_and_unload()


def test_merge_and_unload_keeps_the_last_exit_and_removes_the_hooks():
    model = make("llama", num_layers=6, exit_layers=[1, 3], voting="last", window_input="adapted")
    model.eval()
    x = batch()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    merged = model.merge_and_unload()
    assert not merged._forward_hooks and not merged._forward_pre_hooks
    assert not any(layer._forward_hooks for layer in merged.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, expected, rtol=1e-4, atol=1e-5)


def test_merging_a_voting_adapter_says_the_vote_is_dropped(caplog):
    model = make("llama", num_layers=6, exit_layers=[1, 3], voting="mean", window_input="adapted")
    with caplog.at_level("WARNING"):
        model.merge_and_unload()
    assert "'mean' vote over exits [1, 3, 5] is not kept" in caplog.text
    last_only = make("llama", num_layers=6, exit_layers=[1, 3], voting="last", window_input="adapted")
    caplog.clear()
    with caplog.at_level("WARNING"):
        last_only.merge_and_unload()
    assert "is not kept" not in caplog.text


def test_two_edge_adapters_are_not_active_at_once():
    model = make("llama", num_layers=6, exit_layers=[1, 3], voting="mean")
    model.add_adapter("other", EdgeLLMConfig(r=2, target_modules=["q_proj"], exit_layers=[2]))
    with pytest.raises(ValueError, match=r"\['default', 'other'\] cannot be active together"):
        model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"]
    model.base_model.set_adapter(["other"])  # one, as a list: fine
    assert model.base_model.active_edge_config.exit_layers == [2, 5]


def test_an_unfitted_weighted_adapter_used_for_inference_says_it_votes_uniformly(caplog, tmp_path):
    from peft import PeftModel

    model = make("llama", num_layers=6, exit_layers=[1, 3], voting="weighted")
    model.save_pretrained(tmp_path / "adapter")
    with caplog.at_level("WARNING"):
        PeftModel.from_pretrained(tiny_model("llama", 6), tmp_path / "adapter")
    assert "exit weights were never fitted: it votes uniformly" in caplog.text


def test_the_only_adapter_is_not_deleted_into_a_model_that_cannot_run():
    model = make("llama", num_layers=4, exit_layers=[1])
    with pytest.raises(ValueError, match=r"'default' is the only adapter; .* unload\(\) gives the base model"):
        model.delete_adapter("default")
    model(input_ids=batch())  # still whole
    model.add_adapter("other", EdgeLLMConfig(r=2, target_modules=["q_proj"], exit_layers=[1]))
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"]


@pytest.mark.parametrize("shape", [(1, 0), (0, 5)])
def test_an_empty_batch_is_refused_by_name(shape):
    model = make("llama", num_layers=4, exit_layers=[1])
    with pytest.raises(ValueError, match=rf"input_ids has shape \({shape[0]}, {shape[1]}\): .* at least one row"):
        model(input_ids=torch.zeros(shape, dtype=torch.long))


def test_disabled_adapters_give_the_base_model_last_exit():
    model = make("llama", num_layers=6, exit_layers=[1, 3], voting="last")
    base_logits = tiny_model("llama", 6)(input_ids=batch()).logits
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=batch()).logits, base_logits)


@pytest.mark.parametrize("window_input", ["adapted", "backbone"])
def test_an_error_inside_a_pass_restores_the_model(window_input):
    model = make("llama", num_layers=6, exit_layers=[1, 3], backprop_depth=2, window_input=window_input, voting="last")
    model.train()
    layer = layers_of(model)[2]

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = layer.register_forward_hook(boom)
    with model.exit_at(3), pytest.raises(RuntimeError, match="boom"):
        model(input_ids=batch(), labels=batch())
    handle.remove()
    assert len(layers_of(model)) == 6
    assert torch.is_grad_enabled()
    assert not any(m._disable_adapters for m in model.modules() if hasattr(m, "_disable_adapters"))
    calls, _, handles = count_layer_calls(model)
    with torch.no_grad():
        model(input_ids=batch())
    # Adapted: one pass. Backbone: the backbone pass plus the last exit's window (layers 4-5).
    assert calls == {i: 1 + (window_input == "backbone" and i >= 4) for i in range(6)}
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_window_gradients(reentrant):
    def window_grads(checkpointing):
        model = make("llama", num_layers=6, exit_layers=[1, 3], backprop_depth=2)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        x = batch()
        with model.exit_at(3):
            model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = window_grads(False), window_grads(True)
    assert sorted(plain) == sorted(checkpointed)
    assert all(".layers.2." in n or ".layers.3." in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad)


def test_exits_without_a_vote_cost_nothing():
    model = make(
        "llama",
        num_layers=6,
        exit_layers=[1, 3, 5],
        backprop_depth=2,
        window_input="backbone",
        voting="weighted",
        exit_weights=[0.0, 0.0, 1.0],
    )
    model.eval()
    x = batch()
    calls, _, handles = count_layer_calls(model)
    with torch.no_grad():
        voted = model(input_ids=x)
    # The backbone pass (6 layers) plus the stream of exit 5's window only (2 layers).
    assert sum(calls.values()) == 8
    with torch.no_grad():
        everything = model(input_ids=x, return_exit_logits=True)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(voted.logits, everything.exit_logits[5].float().log_softmax(-1))
    torch.testing.assert_close(everything.logits, voted.logits)


@pytest.mark.parametrize("window_input", ["backbone", "adapted"])
@pytest.mark.parametrize("head", ["shared", "lora"])
def test_exit_logit_chunks_equal_the_exit_logits_of_a_voting_pass(window_input, head):
    model = make(exit_layers=[1, 4], backprop_depth=3, window_input=window_input, exit_head=head, voting="mean")
    for param in model.base_model.exit_heads.parameters():
        param.data.add_(0.1)
    x = batch(length=10)
    labels = x.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        full = model(input_ids=x, return_exit_logits=True)
        chunks = list(model.base_model.exit_logit_chunks({"input_ids": x}, labels, chunk_size=3))
    keep = labels[:, 1:].reshape(-1) != -100
    assert len(chunks) == 5  # 13 targets in chunks of 3
    torch.testing.assert_close(torch.cat([t for t, _ in chunks]), labels[:, 1:].reshape(-1)[keep])
    for layer, logits in full.exit_logits.items():
        expected = logits[:, :-1].reshape(-1, VOCAB)[keep]
        torch.testing.assert_close(torch.cat([c[layer] for _, c in chunks]), expected, rtol=1e-5, atol=1e-5)
    voted = torch.cat([model.base_model.voted(c) for _, c in chunks])
    torch.testing.assert_close(voted, full.logits[:, :-1].reshape(-1, VOCAB)[keep], rtol=1e-5, atol=1e-5)


def test_delete_adapter_removes_its_weights_and_exit_heads():
    model = make(exit_layers=[3], exit_head="norm")
    model.add_adapter("other", EdgeLLMConfig(r=2, target_modules=["q_proj"], exit_layers=[5], exit_head="norm"))
    assert sorted(model.base_model.exit_heads) == ["default", "other"]
    model.delete_adapter("other")
    assert sorted(model.base_model.exit_heads) == ["default"]
    assert not any("other" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        assert model(input_ids=batch()).logits.shape == (2, 12, VOCAB)


@pytest.mark.parametrize("window_input", ["backbone", "adapted"])
def test_disable_adapter_gives_the_plain_base_model_whatever_the_voting_rule(window_input):
    # A DPO-style reference pass: no adapters, no exits, no vote.
    model = make("llama", num_layers=6, exit_layers=[1, 3], window_input=window_input, voting="weighted")
    x = batch()
    base_logits = tiny_model("llama", 6)(input_ids=x).logits
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=x).logits, base_logits)
        base_loss = tiny_model("llama", 6)(input_ids=x, labels=x).loss
        torch.testing.assert_close(model(input_ids=x, labels=x).loss, base_loss)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=x).logits.float(), base_logits, atol=1e-3)


@pytest.mark.parametrize("window_input", ["backbone", "adapted"])
@pytest.mark.parametrize(
    "options",
    [
        {"num_beams": 2},
        {"num_beams": 3, "num_return_sequences": 2},
        {"prompt_lookup_num_tokens": 2},
        {"do_sample": True, "num_return_sequences": 2},
    ],
    ids=["beam", "beam-several", "prompt-lookup", "sampling-several"],
)
def test_every_decoding_strategy_gives_the_same_sequences_with_and_without_the_cache(window_input, options):
    # The exits' own caches must follow every edit generate() makes to the model's cache.
    model = make("llama", num_layers=6, exit_layers=[1, 3], backprop_depth=2, window_input=window_input, voting="mean")
    model.eval()
    prompt = torch.tensor([[5, 17, 42, 5, 17, 42, 5, 17], [7, 8, 9, 7, 8, 9, 7, 8]])
    if "prompt_lookup_num_tokens" in options:
        prompt = prompt[:1]  # assisted decoding takes one sequence at a time
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        settings = {"do_sample": False, **options}
        if not use_cache and "prompt_lookup_num_tokens" in settings:
            del settings["prompt_lookup_num_tokens"]  # needs a cache; greedy decoding is its reference
        outputs.append(
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=6,
                use_cache=use_cache,
                **settings,
            )
        )
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("window_input", ["backbone", "adapted"])
def test_a_deep_copy_computes_what_the_original_does_and_trains_on_its_own(window_input):
    import copy

    model = make("llama", num_layers=4, exit_layers=[1], backprop_depth=2, window_input=window_input, voting="mean")
    twin = copy.deepcopy(model)
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=x).logits, model(input_ids=x).logits)
        with twin.exit_at(1), model.exit_at(1):
            torch.testing.assert_close(twin(input_ids=x).logits, model(input_ids=x).logits)
    twin.train()
    with twin.exit_at(3):
        twin(input_ids=x, labels=x).loss.backward()
    assert any(p.grad is not None for p in twin.parameters()) and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("window_input", ["backbone", "adapted"])
def test_set_adapter_switches_weights_exits_and_vote_and_unload_gives_the_base_model(window_input):
    model = make("llama", num_layers=6, exit_layers=[1, 3], voting="mean", window_input=window_input)
    other = EdgeLLMConfig(
        r=2,
        target_modules=["q_proj"],
        exit_layers=[2],
        voting="last",
        init_lora_weights=False,
        window_input=window_input,
    )
    model.add_adapter("other", other)
    x = batch()
    with torch.no_grad():
        first = model(input_ids=x).logits
        model.set_adapter("other")
        assert model.base_model.active_edge_config.exit_layers == [2, 5]
        second = model(input_ids=x).logits
        model.set_adapter("default")
        torch.testing.assert_close(model(input_ids=x).logits, first)
    assert not torch.allclose(first, second, atol=1e-3)
    base = model.unload()
    assert not base._forward_hooks and not base._forward_pre_hooks
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in base.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=x).logits, tiny_model("llama", 6)(input_ids=x).logits)
