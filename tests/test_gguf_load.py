"""Loading a llama.cpp GGUF file as the base to tune: the file's blocks kept unchanged (LUC's files
and `llama-quantize`'s), computing as the model written and as llama.cpp, and what cannot load
refused by name."""

import logging

import gguf
import numpy as np
import pytest
import torch
from export_models import ToyTokenizer, gguf_llama, llama_cpp_and_pytorch_logits
from peft import PeftModel, get_peft_model
from test_gguf_policy import tied_gguf_llama
from tiny_models import VOCAB

from edge_llm import EdgeLLMConfig
from edge_llm.export import write_gguf
from edge_llm.export.gguf_load import gguf_model_file, load_gguf
from edge_llm.luc import LUCConfig
from edge_llm.luc.facts import compression_of, gguf_policy_of
from edge_llm.luc.ggml import llama_quantize
from edge_llm.luc.ggml_linear import GGMLEmbedding, GGMLLinear
from edge_llm.luc.gguf_sensitivity import weight_tensors
from edge_llm.luc.integration import apply_luc

TYPES = ("Q4_K", "Q6_K", "Q4_0", "Q8_0", "Q5_K", "IQ4_NL", "Q5_1", "F16")


def luc_base(tied: bool):
    """A tiny Llama LUC compressed for llama.cpp with a given mixed policy (every type it can hold)."""
    model = tied_gguf_llama() if tied else gguf_llama().eval()
    choice = {name: TYPES[i % len(TYPES)] for i, name in enumerate(weight_tensors(model))}
    apply_luc(
        model,
        LUCConfig(
            target="gguf",
            sensitivity="structural",
            policy={"format": "edge-llm/gguf-policy", "version": 1, "sensitivity": "structural", "tensors": choice},
        ),
    )
    return model


def blocks(model):
    return {n: b for n, b in model.named_buffers() if b.dtype == torch.uint8}


@pytest.mark.parametrize("tied", [True, False])
def test_a_written_base_loads_back_with_its_blocks_and_computes_exactly_as_written(tmp_path, tied):
    model = luc_base(tied)
    path = write_gguf(model, tmp_path / "model.gguf", tokenizer=ToyTokenizer(), fold_adapters=False)
    loaded = load_gguf(tmp_path)  # the folder's model.gguf
    written, read = blocks(model), blocks(loaded)
    assert written.keys() == read.keys() and all(torch.equal(written[n], read[n]) for n in written)
    # nothing held in float but the norms: no dequantized copy of any weight
    floats = [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_floating_point()]
    assert all("norm" in n or "rotary" in n for n in floats), floats
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    # the same compression as the model written: an adapter tuned on one is at home on the other
    assert gguf_policy_of(loaded).tensors == gguf_policy_of(model).tensors
    assert compression_of(loaded) == compression_of(model) != "none"
    # and written again, the same tensors byte for byte
    again = write_gguf(loaded, tmp_path / "again.gguf", tokenizer=ToyTokenizer())
    first, second = gguf.GGUFReader(str(path)).tensors, gguf.GGUFReader(str(again)).tensors
    assert [t.name for t in first] == [t.name for t in second]
    assert all(
        np.array_equal(a.data, b.data) and a.tensor_type == b.tensor_type for a, b in zip(first, second, strict=True)
    )


def test_an_adapter_tuned_over_the_compressed_model_loads_over_its_file_without_a_warning(tmp_path, caplog):
    model = luc_base(tied=True)
    write_gguf(model, tmp_path / "model.gguf", tokenizer=ToyTokenizer())
    config = EdgeLLMConfig(exit_layers=[3], backprop_depth=4, r=4, target_modules=["q_proj", "down_proj"])
    tuned = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    tuned.save_pretrained(tmp_path / "adapter")
    with caplog.at_level(logging.WARNING):
        reloaded = PeftModel.from_pretrained(load_gguf(tmp_path / "model.gguf"), tmp_path / "adapter").eval()
    assert "compressed as" not in caplog.text
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(tuned.eval()(input_ids=x).logits, reloaded(input_ids=x).logits)


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_S"])
def test_a_llama_quantize_file_loads_as_llama_cpp_runs_it_and_trains_an_adapter(tmp_path, mix):
    pytest.importorskip("llama_cpp")
    dense = write_gguf(tied_gguf_llama(), tmp_path / "f16.gguf", tokenizer=ToyTokenizer())
    path = llama_quantize(dense, tmp_path / f"{mix}.gguf", mix)
    model = load_gguf(path)
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if "norm" not in t.name}
    types = {m.weight_type for m in model.modules() if isinstance(m, (GGMLLinear, GGMLEmbedding))}
    assert types == set(stored.values()) and "F16" not in types  # the mix's own types, held as they are
    theirs, ours = (x.log_softmax(-1) for x in llama_cpp_and_pytorch_logits(model, path, seed=5))
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.99
    # a base to tune: the adapter learns, the file's blocks stay as they were
    tuned = get_peft_model(model, EdgeLLMConfig(exit_layers=[3], backprop_depth=4, r=4, target_modules=["v_proj"]))
    before = {n: b.clone() for n, b in blocks(tuned).items()}
    tokens = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    tuned.train()
    tuned(input_ids=tokens, labels=tokens).loss.backward()
    assert all(p.grad is not None for p in tuned.parameters() if p.requires_grad)
    assert all(torch.equal(b, before[n]) for n, b in blocks(tuned).items())


def test_float_tensors_of_a_dense_file_load_as_float_layers(tmp_path):
    dense = tied_gguf_llama()
    path = write_gguf(dense, tmp_path / "f16.gguf", tokenizer=ToyTokenizer())  # every weight F16
    loaded = load_gguf(path)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, GGMLLinear)  # F16 is a llama.cpp type too
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = dense.to(torch.float16).float()(input_ids=x).logits  # the weights F16-rounded
        assert torch.allclose(loaded(input_ids=x).logits, reference, atol=1e-4)


def _with_nan(data):
    """An F16 tensor with one value NaN."""
    data = data.copy()
    data.view(np.uint16).reshape(-1)[5] = 0x7E00
    return data


def _rewrite(source, target, edit):
    """A copy of the GGUF `source` with its tensors passed through `edit(name, data, type) -> list`."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, field.contents())
        else:
            writer.add_key_value(field.name, field.contents(), kind)
    for tensor in reader.tensors:
        for name, data, qtype in edit(tensor.name, np.array(tensor.data), tensor.tensor_type):
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda n, d, t: [] if n == "blk.2.ffn_up.weight" else [(n, d, t)], r"missing: \['blk.2.ffn_up.weight'\]"),
        (
            lambda n, d, t: [(n, d, t), ("blk.9.attn_q.weight", d, t)] if n == "blk.0.attn_q.weight" else [(n, d, t)],
            r"not part of it: \['blk.9.attn_q.weight'\]",
        ),
        (
            lambda n, d, t: [(n, d[:-1], t)] if n == "blk.1.attn_v.weight" else [(n, d, t)],
            r"blk.1.attn_v.weight is \[127, 256\], the model needs \[128, 256\]",
        ),
        (
            lambda n, d, t: (
                [(n, d.view(np.uint8)[:, :132], gguf.GGMLQuantizationType.IQ2_XXS)]
                if n == "blk.0.ffn_down.weight"
                else [(n, d, t)]
            ),
            r"blk.0.ffn_down.weight is IQ2_XXS, a type edge-llm cannot compute with",
        ),
        (
            lambda n, d, t: [(n, _with_nan(d), t)] if n == "blk.1.attn_v.weight" else [(n, d, t)],
            r"blk.1.attn_v.weight holds NaN or infinite weights",
        ),
    ],
    ids=["missing", "unknown", "shape", "type", "nan"],
)
def test_a_file_that_does_not_hold_the_model_is_refused_naming_the_tensor(tmp_path, edit, message):
    source = write_gguf(tied_gguf_llama(), tmp_path / "f16.gguf", tokenizer=ToyTokenizer())
    broken = _rewrite(source, tmp_path / "broken.gguf", edit)
    with pytest.raises(ValueError, match=message):
        load_gguf(broken)


def test_what_is_not_a_llama_gguf_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(ValueError, match=r"junk\.gguf is not a readable GGUF file"):
        load_gguf(tmp_path / "junk.gguf")
    with pytest.raises(FileNotFoundError, match="no GGUF file there"):
        load_gguf(tmp_path / "nothing")
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        load_gguf(tmp_path / "gpt2.gguf")


def test_a_model_argument_names_a_gguf_file_or_a_folder_holding_only_model_gguf(tmp_path):
    write_gguf(tied_gguf_llama(), tmp_path / "model.gguf", tokenizer=ToyTokenizer())
    assert gguf_model_file(tmp_path) == tmp_path / "model.gguf"
    assert gguf_model_file(tmp_path / "model.gguf") == tmp_path / "model.gguf"
    (tmp_path / "config.json").write_text("{}")  # a transformers checkpoint (with a GGUF beside it)
    assert gguf_model_file(tmp_path) is None
    assert gguf_model_file(tmp_path / "none.gguf") is None


def test_luc_refuses_to_compress_a_model_already_in_llama_cpp_blocks(tmp_path):
    write_gguf(tied_gguf_llama(), tmp_path / "model.gguf", tokenizer=ToyTokenizer())
    with pytest.raises(ValueError, match=r"already holds llama\.cpp blocks"):
        apply_luc(load_gguf(tmp_path), LUCConfig(target="gguf", avg_bits=4.0))


@pytest.mark.parametrize("loaded", [False, True], ids=["compressed here", "loaded from its file"])
def test_a_base_for_llama_cpp_trains_under_edge_trainer(tmp_path, loaded):
    """Trainer asks a quantized model's quantizer whether it can be trained: a model compressed
    for llama.cpp in this process, or loaded from its file, has one that says yes."""
    from trainer_helpers import counting_dataset, training_args

    from edge_llm import EdgeTrainer

    model = luc_base(tied=True)
    if loaded:
        write_gguf(model, tmp_path / "model.gguf", tokenizer=ToyTokenizer())
        model = load_gguf(tmp_path / "model.gguf")
    assert model.hf_quantizer.is_trainable
    tuned = get_peft_model(model, EdgeLLMConfig(exit_layers=[3], backprop_depth=4, r=4, target_modules=["v_proj"]))
    before = {n: b.clone() for n, b in blocks(tuned).items()}
    args = training_args(tmp_path / "run", max_steps=2)
    EdgeTrainer(model=tuned, args=args, train_dataset=counting_dataset()).train()
    assert all(torch.equal(b, before[n]) for n, b in blocks(tuned).items())


@pytest.mark.parametrize("tied", [True, False])
def test_the_cost_model_counts_a_llama_cpp_base_as_its_blocks(tied):
    from edge_llm.scheduling import Workload, builtin_device, schedule
    from edge_llm.scheduling.cost import ModelSpec

    model = luc_base(tied)
    spec = ModelSpec.from_model(model)
    stored = sum(b.numel() for b in blocks(model).values())  # named_buffers: a tied table once
    final_norm = model.model.norm.weight.numel() * 2  # counted as 16-bit (the layers' norms are not counted)
    assert sum(layer.packed_bytes() for layer in spec.layers) + spec.other_bytes == stored + final_norm
    plan = schedule(model, builtin_device("raspberry-pi-5-8gb"), Workload(prompt_tokens=32, decode_tokens=8))
    assert plan.memory_bytes >= stored and all(p.kernel.startswith("dequant_int") for p in plan.layers)


def test_a_llama_cpp_base_lowers_for_executorch_from_the_weights_it_computes_with():
    """ExecuTorch's lowering starts from a float copy of the model: for a llama.cpp base, the
    blocks decoded (the token table too), computing exactly as the model."""
    from edge_llm.export.executorch import _float_copy

    model = luc_base(tied=True)
    plain = _float_copy(model, adapted=set())
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_a_file_loads_dequantized_to_the_weights_transformers_gguf_loading_gives(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    write_gguf(luc_base(tied), tmp_path / "model.gguf", tokenizer=ToyTokenizer(), fold_adapters=False)
    ours = load_gguf(tmp_path, dtype=torch.bfloat16, dequantize=True)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.bfloat16)
    assert not any(isinstance(m, (GGMLLinear, GGMLEmbedding)) for m in ours.modules())
    assert not getattr(ours, "is_quantized", False)  # a plain model: it saves as one
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == reference.keys()
    assert all(mine[n].dtype == torch.bfloat16 and torch.equal(mine[n], reference[n]) for n in reference)
    assert (ours.get_output_embeddings().weight is ours.get_input_embeddings().weight) == tied
    assert not any(p.requires_grad for p in ours.parameters())  # frozen, as the blocks it replaces
