"""ExecuTorch lowering: LUC codes in XNNPACK int4 blocks, the program in ExecuTorch's runtime."""

import pytest
import torch
from export_models import adapted_gguf_llama, cpu_device, gguf_llama
from peft import get_peft_model
from tiny_models import VOCAB, tiny_model

import edge_llm
from edge_llm.export import export, verify_bundle
from edge_llm.luc import CompressionMethod, compress_model
from edge_llm.luc.linear import LUCLinear
from edge_llm.luc.quantize import quantize_rtn
from edge_llm.scheduling import Workload, schedule


@pytest.mark.parametrize(
    ("bits", "sparsity", "grid"),
    [
        (2, 0.0, "asymmetric"),
        (3, 0.5, "asymmetric"),
        (4, 0.0, "asymmetric"),
        (4, 0.5, "asymmetric"),
        (4, 0.0, "symmetric"),
    ],
)
def test_luc_layers_go_into_executorch_int4_exactly(bits, sparsity, grid):
    pytest.importorskip("torchao")
    from collections import Counter

    from edge_llm.export.executorch import ZeroPointLinear, int4_block, int_linear

    model = gguf_llama()
    method = CompressionMethod(64, "rtn", "magnitude", grid=grid)
    compress_model(model, [(bits, sparsity)] * 4, method, progress=False)
    luc = model.model.layers[0].mlp.down_proj  # 256 rows of 512: 8 groups each
    counts = Counter()
    block = int4_block(luc, 512)
    lowered = int_linear(torch.nn.Linear(512, 256, bias=False), luc, False, 4, block, counts)
    assert block == 64 and counts["int4 blocks holding LUC's codes"] == 256 * 8
    # 2-3-bit codes fit int4 as `code - zero_point`; asymmetric 4-bit codes span 16 levels around
    # the zero-point, so the zero-points ride in per-block offsets; symmetric ones are int4's own.
    offsets = bits == 4 and grid == "asymmetric"
    assert isinstance(lowered, ZeroPointLinear) == offsets
    int4 = (lowered.linear if offsets else lowered).weight
    assert int4.qdata.min() >= -8 and int4.qdata.max() <= 7
    int4.activation_quantization = None  # XNNPACK also quantizes activations: compare weights alone
    x = torch.randn(3, 512)
    reference = luc.dequantize_weight(torch.float32)
    torch.testing.assert_close(lowered(x), x @ reference.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("group", "held"), [(512, True), (64, False)])
def test_8bit_luc_layers_go_into_executorch_int8_exactly_when_one_group_spans_the_row(group, held):
    pytest.importorskip("torchao")
    from edge_llm.export.executorch import quantize_for_xnnpack

    # XNNPACK's int8 kernel has one scale per output channel: a symmetric 8-bit layer with one
    # group per row is that kernel's weight (`code - 128`); groups of 64 are re-quantized per row.
    model = gguf_llama()
    compress_model(model, [(8, 0.0)] * 4, CompressionMethod(group, "rtn", grid="symmetric"), progress=False)
    plain, counts = quantize_for_xnnpack(model)
    rows = sum(m.out_features for m in model.model.layers.modules() if isinstance(m, LUCLinear))
    assert counts["int8 Linears"] == 4 * 7 and counts["int4 Linears"] == 0
    assert counts["int8 blocks holding LUC's codes" if held else "int8 blocks re-quantized"] == rows
    luc, lowered = model.model.layers[1].mlp.down_proj, plain.model.layers[1].mlp.down_proj
    weight = lowered.weight.qdata.float() * lowered.weight.scale
    reference = luc.dequantize_weight(torch.float32)
    assert torch.equal(weight, reference) == held
    if not held:
        torch.testing.assert_close(weight, reference, atol=0.01, rtol=0.0)


def test_each_linear_goes_into_executorch_by_its_own_setting():
    pytest.importorskip("torchao")
    from edge_llm.export.executorch import quantize_for_xnnpack

    # Linears of one decoder layer with different settings (a 4-bit attention, an 8-bit MLP with one
    # group per row) each keep theirs.
    model = gguf_llama()
    compress_model(model, [(4, 0.0)] * 4, CompressionMethod(64, "rtn", grid="symmetric"), progress=False)
    layer = model.model.layers[0]
    for name in ("gate_proj", "up_proj", "down_proj"):
        linear = layer.mlp.get_submodule(name)
        dense = torch.nn.Linear(linear.in_features, linear.out_features, bias=False)
        dense.weight.data = linear.dequantize_weight(torch.float32)
        codes = quantize_rtn(dense.weight.data, 8, linear.in_features, None, True)
        layer.mlp.set_submodule(name, LUCLinear.from_linear(dense, 8, 0.0, linear.in_features, codes))
    plain, counts = quantize_for_xnnpack(model)
    assert counts["int8 Linears"] == 3 and counts["int4 Linears"] == 4 * 7 - 3
    assert counts["int4 blocks re-quantized"] == counts["int8 blocks re-quantized"] == 0
    target = plain.model.layers[0]
    assert target.mlp.up_proj.weight.block_size == (1, target.mlp.up_proj.in_features)
    assert target.self_attn.q_proj.weight.block_size == (1, 64)


@pytest.mark.parametrize("grid", ["asymmetric", "symmetric"])
def test_executorch_runs_the_exported_program_and_agrees_with_pytorch(tmp_path, grid):
    pytest.importorskip("executorch")
    from edge_llm.export.executorch import load_program

    # 2-4-bit layers go to int4 blocks holding LUC's codes, 8-bit to int8 per channel; the last
    # exit's window carries the adapter (folded in: re-quantized); XNNPACK also quantizes
    # activations to int8 per token. The symmetric grid's scales carry signs (XNNPACK takes them).
    model = adapted_gguf_llama([(2, 0.0), (3, 0.5), (4, 0.0), (8, 0.0)], grid)
    plan = schedule(model, cpu_device(10**9), Workload(prompt_tokens=48, decode_tokens=8))
    out = export(model, plan, tmp_path / "bundle", targets=["executorch"])
    assert "model.pte" in verify_bundle(out)["files"]
    program = load_program(out / "model.pte")
    assert program.load_method("get_max_seq_len").execute([])[0] == 56  # the scheduled prompt + decode tokens
    assert program.load_method("use_sdpa_with_kv_cache").execute([])[0]  # ExecuTorch's attention ops
    forward = program.load_method("forward")
    tokens = torch.randint(1, VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    theirs = forward.execute([tokens, torch.arange(48)])[0][0]
    with torch.no_grad():
        ours = model(input_ids=tokens).logits[0]
    agreement = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(
        theirs.log_softmax(-1), ours.log_softmax(-1), log_target=True, reduction="batchmean"
    ).item()
    assert agreement >= 0.8 and kl < 1e-3, (agreement, kl)
    # The same program decodes: a prompt of 40, then token 41 through the KV cache, gives what one
    # pass over 41 tokens gives.
    forward.execute([tokens[:, :40], torch.arange(40)])
    step = forward.execute([tokens[:, 40:41], torch.tensor([40])])[0][0, -1]
    torch.testing.assert_close(step, theirs[40], rtol=1e-4, atol=1e-4)


def test_the_custom_attention_module_computes_what_the_model_does_prefill_then_decode():
    """What the program is exported from, in PyTorch: ExecuTorch's `custom_sdpa` over the filled
    part of a cache that `update_cache` writes in place, grouped-query heads (4 over 2) included,
    gives the model's own logits for a prompt and for tokens fed one by one after it."""
    pytest.importorskip("executorch")
    from edge_llm.export.executorch_attention import CUSTOM_SDPA, CustomSdpaDecoder, register_custom_sdpa

    model = tiny_model("llama", 2)
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens).logits
        register_custom_sdpa()
        model.config._attn_implementation = CUSTOM_SDPA
        decoder = CustomSdpaDecoder(model, max_seq_len=32)
        steps = [decoder(tokens[:, :8], torch.arange(8))]
        steps += [decoder(tokens[:, t : t + 1], torch.tensor([t])) for t in range(8, 12)]
        again = decoder(tokens[:, :5], torch.arange(5))  # a new prompt overwrites the cache from its start
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, expected[:, :5], atol=1e-5, rtol=1e-5)


def test_executorch_embedding_table_settings():
    pytest.importorskip("torchao")
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    from edge_llm.export.executorch import quantize_for_xnnpack

    model = adapted_gguf_llama([(4, 0.0)] * 4)
    table = model.get_base_model().get_input_embeddings().weight.detach()
    plain, counts = quantize_for_xnnpack(model)  # int8 per row by default
    stored = plain.get_input_embeddings().weight
    assert isinstance(stored, IntxUnpackedToInt8Tensor) and counts["int8 embedding tables"] == 1
    assert stored.qdata.dtype == torch.int8 and stored.scale.shape[0] == table.shape[0]
    # within half a step of each row's scale: round to nearest, symmetric
    step = table.abs().amax(1, keepdim=True) / 127
    assert ((stored.dequantize() - table).abs() <= step / 2 + 1e-6).all()
    assert plain.get_output_embeddings().weight is not stored  # the head is not a lookup
    plain, _ = quantize_for_xnnpack(model, embedding_bits=16)
    assert plain.get_input_embeddings().weight.dtype == torch.float16
    plain, _ = quantize_for_xnnpack(model, head_bits=None, embedding_bits=32)
    assert torch.equal(plain.get_input_embeddings().weight, table)
    with pytest.raises(ValueError, match=r"embedding_bits must be 8 .* got 12"):
        quantize_for_xnnpack(model, embedding_bits=12)


def test_executorch_refuses_an_adapter_it_would_lose():
    pytest.importorskip("torchao")
    from edge_llm.export.executorch import quantize_for_xnnpack

    model = tiny_model("gpt2", 2)  # Conv1D layers: LoRA wraps them, the float copy has no Linear there
    model = get_peft_model(model, edge_llm.EdgeLLMConfig(r=4, target_modules=["c_attn"], exit_layers=[1]))
    with pytest.raises(ValueError, match=r"class; transformer\.h\.0\.attn\.c_attn is a Conv1D there"):
        quantize_for_xnnpack(model)
