"""Save/load round trips of Edge-LLM adapters through stock peft APIs."""

import json
import subprocess
import sys

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import VOCAB, lora_targets, tiny_model
from transformers import AutoModelForCausalLM

from edge_llm import EdgeLLMConfig


def trained_adapter(arch, **config):
    model = get_peft_model(
        tiny_model(arch, 6),
        EdgeLLMConfig(r=4, lora_alpha=8, target_modules=lora_targets(arch), exit_layers=[1, 3], **config),
    )
    # Move every adapter weight away from its initial value, as training would.
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize(("arch", "head"), [("llama", "shared"), ("gpt2", "lora"), ("qwen2", "norm")])
def test_save_and_load_give_identical_logits(tmp_path, arch, head):
    model = trained_adapter(arch, exit_head=head, voting="confidence")
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=x, return_exit_logits=True)
    model.save_pretrained(tmp_path)

    stored = json.loads((tmp_path / "adapter_config.json").read_text())
    assert stored["peft_type"] == "EDGE_LLM"
    assert stored["exit_layers"] == [1, 3, 5] and stored["backprop_depth"] == 2
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights)
    assert any("exit_heads" in k for k in weights) == (head != "shared")

    loaded = PeftModel.from_pretrained(tiny_model(arch, 6), tmp_path).eval()
    with torch.no_grad():
        actual = loaded(input_ids=x, return_exit_logits=True)
    assert torch.equal(actual.logits, expected.logits)
    for layer in (1, 3, 5):
        assert torch.equal(actual.exit_logits[layer], expected.exit_logits[layer])


def test_auto_peft_model_loads_base_and_adapter_from_disk(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("llama", 6).save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, EdgeLLMConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, voting="mean"))
    model.eval()
    x = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    model.save_pretrained(adapter_dir)
    loaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    assert loaded.exit_layers == [1, 3, 5]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, expected)


def test_inference_mode_loading_freezes_exit_heads(tmp_path):
    trained_adapter("llama", exit_head="norm").save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama", 6), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(tiny_model("llama", 6), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in trainable.base_model.exit_heads.parameters())


def test_loading_without_importing_edge_llm_fails_loudly(tmp_path):
    trained_adapter("llama").save_pretrained(tmp_path)
    script = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    assert "EDGE_LLM" in result.stderr


@pytest.mark.parametrize("damage", ["drop-a-head-tensor", "edit-exit-layers", "drop-a-lora-b", "nan-in-lora-b"])
def test_an_adapter_whose_weights_do_not_match_its_config_is_refused(tmp_path, damage):
    from safetensors.torch import save_file

    trained_adapter("llama", exit_head="norm").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    lora_b = next(k for k in weights if "lora_B" in k)
    if damage == "drop-a-lora-b":
        save_file({k: v for k, v in weights.items() if k != lora_b}, tmp_path / "adapter_model.safetensors")
        message = "LoRA tensors are missing from its weights file"
    elif damage == "nan-in-lora-b":
        weights[lora_b][0, 0] = float("nan")
        save_file(weights, tmp_path / "adapter_model.safetensors")
        message = "holds NaN or infinity in .*lora_B"
    elif damage == "drop-a-head-tensor":
        weights = load_file(tmp_path / "adapter_model.safetensors")
        dropped = next(k for k in weights if "exit_heads" in k)
        save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "adapter_model.safetensors")
        message = "missing from the weights file"
    else:
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        config["exit_layers"] = [3, 5]  # exit 1's trained head would be dropped without a word
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        message = "in the file but not in adapter_config.json's exits"
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny_model("llama", 6), tmp_path)


def test_an_adapter_records_its_base_compression_and_warns_on_another_base(tmp_path):
    import warnings

    from peft import PeftModel, get_peft_model
    from tiny_models import tiny_model

    from edge_llm import EdgeLLMConfig
    from edge_llm.luc import CompressionMethod, compress_model

    luc_base = tiny_model("llama", 4)
    compress_model(luc_base, [(4, 0.0)] * 4, CompressionMethod(16, "rtn", "magnitude"), progress=False)
    model = get_peft_model(luc_base, EdgeLLMConfig(r=2, target_modules=["q_proj"], exit_layers=[1], voting="last"))
    recorded = model.peft_config["default"].base_compression
    assert recorded.startswith("luc:") and len(recorded) == 4 + 64
    model.save_pretrained(tmp_path / "adapter")
    same_base = tiny_model("llama", 4)
    compress_model(same_base, [(4, 0.0)] * 4, CompressionMethod(16, "rtn", "magnitude"), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # onto a base compressed the same way: silent
        PeftModel.from_pretrained(same_base, tmp_path / "adapter")
    plain = tiny_model("llama", 4)  # the uncompressed original, as AutoPeftModel would load it
    with pytest.warns(UserWarning, match="made on a base compressed as 'luc:"):
        PeftModel.from_pretrained(plain, tmp_path / "adapter")
    assert EdgeLLMConfig(r=2, target_modules=["q_proj"]).base_compression is None  # old adapters: unchecked
    with pytest.raises(ValueError, match="base_compression must be"):
        EdgeLLMConfig(r=2, target_modules=["q_proj"], base_compression="gptq")
