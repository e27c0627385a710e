"""Models, devices and tokenizers the export and runtime tests share."""

import json

import torch
from peft import get_peft_model
from tiny_models import VOCAB, tiny_model

import edge_llm
from edge_llm.luc import CompressionMethod, LUCLinear, compress_model
from edge_llm.scheduling import DeviceProfile, Kernel

POLICY = [(4, 0.5), (3, 0.25), (8, 0.0), (2, 0.5)]


METHOD = CompressionMethod(group_size=16, prune_method="magnitude")


class ToyTokenizer:
    """The vocabulary a llama.cpp file needs, for models of the toy vocabulary."""

    all_special_ids = (0,)
    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 0, 0, None, None

    def get_vocab(self):
        return {f"t{i}": i for i in range(VOCAB)}

    class backend_tokenizer:
        @staticmethod
        def to_str():
            return json.dumps({"model": {"merges": ["t 1"]}})


def cpu_device(memory_bytes):
    rate = 5e10
    kernels = {"dense_fp32": Kernel(rate), "sparse_unstructured": Kernel(rate / 2)}
    kernels.update({f"dequant_int{b}": Kernel(rate, dequant_per_s=1e9) for b in (2, 3, 4, 8)})
    return DeviceProfile("test cpu", memory_bytes, 2e10, 1e9, 1e10, kernels, "synthetic")


def adapted_model(window_input="backbone"):
    model = tiny_model("llama", 4)
    compress_model(model, POLICY, METHOD, progress=False)
    model = get_peft_model(
        model,
        edge_llm.EdgeLLMConfig(
            r=4,
            target_modules=["q_proj", "v_proj"],
            exit_layers=[1],
            backprop_depth=2,
            voting="mean",
            window_input=window_input,
            init_lora_weights=False,
        ),
    )
    return model.eval()


def expected_logits(model, x):
    """The compressed model's logits on LUC's reference path (dequantize into float32 every call),
    which the dequant_int* and dense_fp32 kernels reproduce."""

    default, LUCLinear.use_kernel = LUCLinear.use_kernel, False
    try:
        with torch.no_grad():
            return model(input_ids=x).logits
    finally:
        LUCLinear.use_kernel = default


def gguf_llama():
    """A 4-layer Llama whose rows (256 and 512) fill K-quant blocks, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def adapted_gguf_llama(policy, grid="asymmetric"):
    """`gguf_llama` LUC-compressed with `policy` (RTN, magnitude, groups of 32, on `grid`) and an
    Edge-LLM adapter on q_proj at exit 1 (voting "last"), LoRA initialised non-zero."""
    model = gguf_llama()
    compress_model(model, policy, CompressionMethod(32, "rtn", "magnitude", grid=grid), progress=False)
    return get_peft_model(
        model,
        edge_llm.EdgeLLMConfig(r=4, target_modules=["q_proj"], exit_layers=[1], voting="last", init_lora_weights=False),
    ).eval()


def llama_cpp_and_pytorch_logits(model, path, seed: int, lora_path=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of llama.cpp running the GGUF at `path` (with the adapter GGUF at `lora_path`) and
    of `model`, on 48 seeded tokens."""
    from edge_llm.export.gguf_run import LlamaCppModel

    tokens = torch.randint(1, VOCAB, (48,), generator=torch.Generator().manual_seed(seed))
    with LlamaCppModel(path, lora_path, context=64, threads=2) as runtime:
        theirs = runtime.logits(tokens)
    with torch.no_grad():
        ours = model(input_ids=tokens[None]).logits[0]
    return theirs, ours
