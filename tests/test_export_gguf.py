"""GGUF lowering: block encoders, LUC codes in llama.cpp blocks, the file, and llama.cpp itself."""

import json

import numpy as np
import pytest
import torch
from export_models import (
    ToyTokenizer,
    adapted_gguf_llama,
    gguf_llama,
    llama_cpp_and_pytorch_logits,
)
from peft import get_peft_model
from tiny_models import VOCAB, tiny_model

import edge_llm
from edge_llm.export import write_gguf
from edge_llm.export.gguf_blocks import quantize_tensor
from edge_llm.luc import CompressionMethod, compress_model


@pytest.mark.parametrize("qtype_name", ["Q2_K", "Q3_K", "Q4_1", "Q5_1", "Q8_0"])
def test_gguf_encoders_produce_blocks_gguf_decodes(qtype_name):
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    values = (np.random.default_rng(0).standard_normal((4, 512)) * 0.05).astype(np.float32)
    encoded = quantize_tensor(values, qtype)
    decoded = gguf.quants.dequantize(encoded, qtype)
    assert decoded.shape == values.shape
    relative = np.sqrt(((decoded - values) ** 2).mean()) / np.sqrt((values**2).mean())
    # Expected RMS error of a good 2/3/4/5/8-bit block quantizer on Gaussian data.
    assert relative < {"Q2_K": 0.4, "Q3_K": 0.2, "Q4_1": 0.1, "Q5_1": 0.05, "Q8_0": 0.01}[qtype_name]


@pytest.mark.parametrize(
    ("bits", "sparsity", "type_name"), [(4, 0.0, "Q4_1"), (3, 0.5, "Q4_1"), (2, 0.25, "Q4_1"), (5, 0.5, "Q5_1")]
)
def test_luc_codes_go_into_gguf_blocks_unchanged(bits, sparsity, type_name):
    import gguf

    from edge_llm.export.gguf_blocks import luc_blocks, pack_q4_1, pack_q5_1

    model = tiny_model("llama", 1)
    compress_model(model, [(bits, sparsity)], CompressionMethod(64, "rtn", "magnitude"), progress=False)
    layer = model.model.layers[0].mlp.down_proj
    blocks = luc_blocks(layer, 4 if type_name == "Q4_1" else 5)
    assert blocks is not None
    packed = (pack_q4_1 if type_name == "Q4_1" else pack_q5_1)(*blocks)
    decoded = gguf.quants.dequantize(packed, getattr(gguf.GGMLQuantizationType, type_name))
    expected = layer.dequantize_weight(torch.float32).numpy()
    assert decoded.shape == expected.shape
    # The same codes and scales: only m = -zero * scale is rounded to float16 (half an ulp of m).
    tolerance = np.abs(blocks[1].astype(np.float32)).max() * 2.0**-11
    assert np.abs(decoded - expected).max() <= tolerance
    if sparsity:  # pruned weights decode to zero
        assert np.abs(decoded[~layer.mask().numpy()]).max() <= tolerance


def test_luc_codes_that_do_not_fit_a_gguf_type_are_refused():
    from edge_llm.export.gguf_blocks import luc_blocks

    model = tiny_model("llama", 1)
    compress_model(model, [(8, 0.0)], CompressionMethod(64, "rtn", "magnitude"), progress=False)
    assert luc_blocks(model.model.layers[0].mlp.down_proj, 4) is None  # 8-bit codes, 4-bit type
    model = tiny_model("llama", 1)
    compress_model(model, [(4, 0.0)], CompressionMethod(16, "rtn", "magnitude"), progress=False)
    assert luc_blocks(model.model.layers[0].mlp.down_proj, 4) is None  # groups of 16 < blocks of 32


def test_gguf_file_has_per_layer_types_and_edge_metadata(tmp_path):
    import gguf

    model = gguf_llama()
    compress_model(
        model,
        [(2, 0.0), (3, 0.0), (4, 0.5), (8, 0.0)],
        CompressionMethod(group_size=32, prune_method="magnitude"),
        progress=False,
    )
    model = get_peft_model(model, edge_llm.EdgeLLMConfig(r=4, target_modules=["q_proj"], exit_layers=[1]))

    small = write_gguf(model, tmp_path / "small.gguf", tokenizer=ToyTokenizer(), k_quants=True)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(small)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q2_K" and types["blk.1.ffn_down.weight"] == "Q3_K"
    path = write_gguf(model, tmp_path / "model.gguf", tokenizer=ToyTokenizer())
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    # By default 2/3-bit codes go into Q4_1 blocks unchanged.
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.1.ffn_down.weight"] == "Q4_1"
    assert types["blk.2.attn_v.weight"] == "Q4_1" and types["blk.3.ffn_up.weight"] == "Q8_0"
    assert small.stat().st_size < path.stat().st_size
    assert reader.fields["edge_llm.voting"].contents() == "weighted"
    assert reader.fields["edge_llm.exits"].contents() == [1, 3]
    policy = json.loads(reader.fields["edge_llm.luc_policy"].contents())
    assert [(layer["bits"], layer["sparsity"]) for layer in policy["layers"]] == [
        (2, 0.0),
        (3, 0.0),
        (4, 0.5),
        (8, 0.0),
    ]


def test_llama_cpp_loads_the_gguf_and_agrees_with_pytorch(tmp_path):
    pytest.importorskip("llama_cpp")
    # 2- to 5-bit codes go into Q4_1/Q5_1 blocks unchanged, 8-bit into Q8_0.
    # The last exit's window carries the adapter (folded in: re-quantized); llama.cpp also quantizes
    # activations to 8 bits.
    model = adapted_gguf_llama([(2, 0.0), (3, 0.5), (5, 0.0), (8, 0.0)])
    path = write_gguf(model, tmp_path / "model.gguf", tokenizer=ToyTokenizer())
    theirs, ours = llama_cpp_and_pytorch_logits(model, path, seed=1)
    # llama.cpp re-encodes weights in GGUF blocks and computes in its own precision: the
    # distributions agree closely, not bit for bit.
    agreement = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(
        theirs.log_softmax(-1), ours.log_softmax(-1), log_target=True, reduction="batchmean"
    ).item()
    assert agreement >= 0.9 and kl < 1e-3, (agreement, kl)


def test_perplexity_in_llama_cpp_is_the_perplexity_of_the_files_logits(tmp_path):
    pytest.importorskip("llama_cpp")
    import math

    from edge_llm.export.gguf_run import LlamaCppModel, perplexity_in_llama_cpp, score_windows

    # The one function the demo and the benchmarks score a GGUF with: its perplexity and next-token
    # choices are those of the logits llama.cpp gives for each window from an empty context, and
    # close to PyTorch's on the model written (F16 weights).
    model = gguf_llama()
    path = write_gguf(model, tmp_path / "model.gguf", tokenizer=ToyTokenizer())
    windows = torch.randint(1, VOCAB, (3, 24), generator=torch.Generator().manual_seed(3))
    perplexity, argmax, speed = perplexity_in_llama_cpp(path, windows, threads=2)
    with LlamaCppModel(path, context=24, threads=2) as runner:
        rows = [runner.logits(window).log_softmax(-1) for window in windows]
    nll = -sum(r[:-1].gather(-1, w[1:, None]).sum().item() for r, w in zip(rows, windows, strict=True))
    assert perplexity == pytest.approx(math.exp(nll / (3 * 23)), rel=1e-6)
    assert torch.equal(argmax, torch.stack([r.argmax(-1) for r in rows])) and speed > 0
    with torch.no_grad():
        reference, ours = score_windows(lambda w: model(input_ids=w[None]).logits[0], windows)
    assert perplexity == pytest.approx(reference, rel=0.01)
    assert (ours == argmax).float().mean() >= 0.95
    with LlamaCppModel.for_requests(path, 8, 4, threads=2) as runner:
        seconds = runner.time(windows[0, :8].tolist(), windows[0, 8:12].tolist())
    assert set(seconds) == {"prefill", "decode"} and min(seconds.values()) > 0


def test_greedy_generation_in_llama_cpp_is_the_files_argmax_chain_and_pytorchs(tmp_path):
    pytest.importorskip("llama_cpp")
    from edge_llm.export.gguf_run import LlamaCppModel

    # Token by token through llama.cpp's cache, each token is the argmax of the file's logits over
    # the whole sequence so far; and the model written (F16 weights) generates the same in PyTorch.
    model = gguf_llama()
    path = write_gguf(model, tmp_path / "model.gguf", tokenizer=ToyTokenizer())
    prompt = torch.randint(1, VOCAB, (10,), generator=torch.Generator().manual_seed(4)).tolist()
    with LlamaCppModel(path, context=24, threads=2) as runner:
        generated = runner.greedy(prompt, 12)
        sequence = torch.tensor(prompt + generated)
        chain = runner.logits(sequence).argmax(-1)[len(prompt) - 1 : -1].tolist()
        first = generated[0]
        stopped = runner.greedy(prompt, 12, stop=generated[1])
    assert len(generated) == 12 and chain == generated
    assert stopped == generated[: generated.index(generated[1])]  # ends before the stop token
    with torch.no_grad():
        ours = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, 10:]
    assert ours[0].item() == first and (ours == torch.tensor(generated)).float().mean() >= 0.8
