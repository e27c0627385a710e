"""Tuning over llama.cpp blocks and shipping exactly what was tuned: LoRA over `GGMLLinear` (the
base keeps its blocks, frozen), and the adapter as a llama.cpp LoRA GGUF beside the unchanged base."""

import numpy as np
import pytest
import torch
from export_models import ToyTokenizer, gguf_llama, llama_cpp_and_pytorch_logits
from peft import LoraConfig, get_peft_model
from test_gguf_policy import tied_gguf_llama
from tiny_models import VOCAB

from edge_llm import EdgeLLMConfig
from edge_llm.export import write_gguf
from edge_llm.export.gguf_lora import write_gguf_lora
from edge_llm.luc.ggml_linear import GGMLLinear
from edge_llm.luc.gguf_policy import apply_types
from edge_llm.luc.gguf_sensitivity import weight_tensors
from edge_llm.luc.lora import CUSTOM_MODULES, CompressedLoraLinear

pytest.importorskip("llama_cpp")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ggml_base(model=None):
    """A tied tiny Llama with every tensor in a llama.cpp type: K-quants, 32-blocks and Q8_0 mixed."""
    model = model or tied_gguf_llama()
    types = ("Q4_K", "Q6_K", "Q4_0", "Q8_0", "Q5_K")
    choice = {name: types[i % len(types)] for i, name in enumerate(weight_tensors(model))}
    apply_types(model, choice)
    return model


def lora(model, config=None):
    config = config or LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    config._register_custom_module(CUSTOM_MODULES)
    return get_peft_model(model, config)


def test_a_base_for_llama_cpp_holds_its_blocks_only_and_the_tied_head_reads_the_table_blocks():
    dense = tied_gguf_llama()
    model = ggml_base(tied_gguf_llama())
    # no float copy of any weight: what is left in float are the norms (vectors)
    floats = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    assert floats and all(model.get_parameter(n).dim() == 1 for n in floats if "norm" in n)
    assert all("norm" in n or "rotary" in n for n in floats), floats
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight is embedding.weight  # one blocks tensor, tied
    ids = torch.tensor([[3, 3, 90], [0, 7, VOCAB - 1]])
    table = head.dense_weight()
    assert torch.equal(embedding(ids), table[ids])
    assert ((table - dense.lm_head.weight).norm() / dense.lm_head.weight.norm()).item() < 0.15  # 4-bit


def test_lora_over_llama_cpp_blocks_trains_the_adapter_and_leaves_the_blocks_as_they_were():
    model = lora(ggml_base())
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert isinstance(layer, CompressedLoraLinear) and isinstance(layer.base_layer, GGMLLinear)
    blocks = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.uint8}
    tokens = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(torch.equal(b, blocks[n]) for n, b in model.named_buffers() if n in blocks)


@pytest.mark.parametrize("rows_per_block", [256, 7])
def test_products_decode_the_weight_block_by_block_and_match_a_dense_copy(monkeypatch, rows_per_block):
    from edge_llm.luc import ggml_linear

    monkeypatch.setattr(ggml_linear, "DECODE_BLOCK", 512 * rows_per_block)  # 7: 37 blocks, the last ragged
    base = ggml_base().model.layers[1].mlp.down_proj
    reference = torch.nn.Linear(512, 256, bias=False)
    reference.weight.data = base.dense_weight()
    x = torch.randn(2, 3, 512, requires_grad=True)
    out = base(x)
    out.square().sum().backward()  # the gradient: the weight decoded again in backward
    expected = reference(x)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(x.grad, torch.autograd.grad(expected.square().sum(), x)[0], atol=1e-4)


def test_merge_stores_the_update_in_the_layer_block_type_and_unmerge_restores_it_bit_exact():
    model = lora(ggml_base())
    layer = model.base_model.model.model.layers[2].self_attn.o_proj
    before = layer.base_layer.weight.clone()
    x = torch.randn(2, 256)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    assert layer.base_layer.weight.dtype == torch.uint8 and not torch.equal(layer.base_layer.weight, before)
    # re-rounded into the same type: close to the float update, not equal to it
    assert ((merged - unmerged).norm() / unmerged.norm()).item() < 0.1
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before)


@pytest.mark.parametrize("edge", [False, True])
def test_llama_cpp_runs_the_unchanged_base_with_the_adapter_and_agrees_with_pytorch(tmp_path, edge):
    config = (
        EdgeLLMConfig(exit_layers=[3], backprop_depth=2, r=4, lora_alpha=8, target_modules=TARGETS)
        if edge
        else LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS)
    )
    model = lora(ggml_base(), config).eval()
    with torch.no_grad():  # a trained adapter: B away from its zero start
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    base_path = write_gguf(model, tmp_path / "model.gguf", tokenizer=ToyTokenizer(), fold_adapters=False)
    adapter_path = write_gguf_lora(model, tmp_path / "adapter.gguf")

    import gguf

    stored = {t.name: t for t in gguf.GGUFReader(str(adapter_path)).tensors}
    # With an Edge-LLM adapter only the last exit's window (layers 2 and 3) is adapted.
    assert {n.split(".")[1] for n in stored} == ({"2", "3"} if edge else {"0", "1", "2", "3"})
    assert stored["blk.3.ffn_down.weight.lora_a"].shape.tolist() == [512, 4]  # ggml order: in, rank
    # the base file holds the blocks the model trained over, unchanged
    base_tensors = {t.name: t for t in gguf.GGUFReader(str(base_path)).tensors}
    down = model.base_model.model.model.layers[3].mlp.down_proj.base_layer
    assert np.array_equal(
        np.asarray(base_tensors["blk.3.ffn_down.weight"].data).reshape(down.weight.shape), down.weight.numpy()
    )

    # Compared as log-probabilities: an Edge-LLM model's output is its exits' vote, in log space.
    theirs, ours = (x.log_softmax(-1) for x in llama_cpp_and_pytorch_logits(model, base_path, 5, adapter_path))
    plain, _ = llama_cpp_and_pytorch_logits(model, base_path, seed=5)
    with model.disable_adapter():
        _, ours_without = llama_cpp_and_pytorch_logits(model, base_path, seed=5)
    plain, ours_without = plain.log_softmax(-1), ours_without.log_softmax(-1)
    # as closely as the base alone agrees, and the adapter is what moved the output
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= min(
        (plain.argmax(-1) == ours_without.argmax(-1)).float().mean(), 0.99
    )
    error, base_error = (theirs - ours).abs().max(), (plain - ours_without).abs().max()
    moved = (theirs - plain).abs().max()
    assert error < 2 * base_error + 0.05 and moved > 10 * error, (error, base_error, moved)

    # Merged instead: the update folded in and re-rounded into each layer's own llama.cpp type.
    merged = write_gguf(model, tmp_path / "merged.gguf", tokenizer=ToyTokenizer())
    merged_types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(merged)).tensors}
    assert merged_types == {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(base_path)).tensors}
    folded, _ = llama_cpp_and_pytorch_logits(model, merged, seed=5)
    assert (folded.log_softmax(-1) - ours).abs().max() > error  # re-rounding: further from what was tuned


def test_what_a_llama_cpp_adapter_cannot_hold_is_refused_with_the_way_out(tmp_path):
    model = lora(ggml_base(), LoraConfig(r=2, target_modules=["down_proj"], use_dora=False, lora_bias=True))
    with pytest.raises(ValueError, match=r"LoRA biases.*folded in"):
        write_gguf_lora(model, tmp_path / "a.gguf")
    model = get_peft_model(gguf_llama(), LoraConfig(r=2, target_modules=["down_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"lm_head.*outside the decoder"):
        write_gguf_lora(model, tmp_path / "a.gguf")
    model = get_peft_model(gguf_llama(), LoraConfig(r=2, target_modules=["down_proj"]))
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        write_gguf_lora(model, tmp_path / "a.gguf")
    model.unmerge_adapter()
    model.add_adapter("/tmp/escape", LoraConfig(r=2, target_modules=["down_proj"]))
    with pytest.raises(ValueError, match="cannot name a file"):
        write_gguf_lora(model, tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_a_bundle_ships_the_base_and_every_adapter_apart_and_verifies_them(tmp_path):
    from export_models import cpu_device

    from edge_llm.export import export, verify_bundle
    from edge_llm.scheduling import Workload, schedule

    model = lora(gguf_llama())
    model.add_adapter("poems", LoraConfig(r=2, target_modules=["down_proj"]))
    plan = schedule(model, cpu_device(10**9), Workload(prompt_tokens=8))
    vocabulary = {"reference_gguf": write_gguf(gguf_llama(), tmp_path / "vocabulary.gguf", tokenizer=ToyTokenizer())}
    out = export(model, plan, tmp_path / "bundle", targets=["gguf"], target_options={"gguf": vocabulary})
    manifest = verify_bundle(out)
    assert {"model.gguf", "adapter-default.gguf", "adapter-poems.gguf"} <= manifest["files"].keys()
    import gguf

    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "adapter-poems.gguf")).tensors}
    assert set(kinds) == {f"blk.{i}.ffn_down.weight.lora_{ab}" for i in range(4) for ab in "ab"}
    with pytest.raises(ValueError, match="none is left to write apart"):
        export(
            model,
            plan,
            tmp_path / "merged",
            targets=["gguf"],
            merge_adapters=True,
            target_options={"gguf": {**vocabulary, "adapters": "separate"}},
        )
    assert not (tmp_path / "merged").exists()
