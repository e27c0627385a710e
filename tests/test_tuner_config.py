import importlib
import json

import pytest
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType
from tiny_models import tiny_model

import edge_llm
import edge_llm.tuner
from edge_llm import EdgeLLMConfig, EdgeLLMModel, UnsupportedModelError
from edge_llm.tuner.exits import exit_for_step, resolve_exits


def test_peft_type_is_a_real_enum_member():
    member = PeftType("EDGE_LLM")
    assert member is PeftType.EDGE_LLM
    assert member in list(PeftType)
    assert EdgeLLMConfig(target_modules=["q_proj"]).peft_type is member


def test_registration_is_idempotent():
    importlib.reload(edge_llm.tuner)
    importlib.reload(edge_llm.tuner)
    assert [m for m in PeftType if m.value == "EDGE_LLM"] == [PeftType.EDGE_LLM]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.EDGE_LLM].__name__ == "EdgeLLMConfig"
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.EDGE_LLM].__name__ == "EdgeLLMModel"


def test_config_json_round_trip(tmp_path):
    config = EdgeLLMConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        exit_layers=[5, 3],
        backprop_depth=2,
        voting="mean",
        exit_head="norm",
        window_input="backbone",
    )
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "adapter_config.json").read_text())
    assert stored["peft_type"] == "EDGE_LLM"
    assert stored["exit_layers"] == [3, 5]
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, EdgeLLMConfig)
    for name in ("r", "lora_alpha", "exit_layers", "backprop_depth", "voting", "exit_head", "window_input"):
        assert getattr(loaded, name) == getattr(config, name)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("r", 0, "r must be a positive integer"),
        ("r", 2.5, "r must be a positive integer"),
        ("lora_alpha", -1, "lora_alpha must be a positive, finite number"),
        ("lora_alpha", float("nan"), "lora_alpha must be a positive, finite number"),
        ("lora_alpha", float("inf"), "lora_alpha must be a positive, finite number"),
        ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\)"),
        ("bias", "some", "bias must be one of"),
        ("task_type", "SEQ_CLS", "task_type must be 'CAUSAL_LM'"),
        ("exit_layers", [], "exit_layers is empty"),
        ("exit_layers", [3, -1], "non-negative layer indices"),
        ("exit_layers", [3, 3, 5], r"duplicate layers \[3\]"),
        ("exit_layers", "3,5", "must be a list of layer indices"),
        ("exit_layers", [1.5], "non-negative layer indices"),
        ("backprop_depth", 0, "backprop_depth must be a positive integer"),
        ("exit_sampling", "random", "exit_sampling must be one of"),
        ("window_input", "frozen", "window_input must be one of"),
        ("voting", "max", "voting must be one of"),
        ("exit_weights", [0.5, -0.1], "exit_weights must be finite, non-negative numbers"),
        ("exit_weights", [0, 0], "exit_weights must be finite, non-negative numbers"),
        ("exit_weights", [0.5, float("inf")], "exit_weights must be finite, non-negative numbers"),
        ("exit_weights", [float("nan"), 1.0], "exit_weights must be finite, non-negative numbers"),
        ("exit_weights", [1e308, 1e308], "exit_weights must be finite, non-negative numbers"),
        ("target_modules", 5, "target_modules must be a module name, a list of module names"),
        ("target_modules", ["q_proj", 3], "target_modules must be a module name, a list of module names"),
        ("select_exits", "yes", "select_exits must be True or False"),
        ("exit_head", "mlp", "exit_head must be one of"),
        ("exit_head_rank", 0, "exit_head_rank must be a positive integer"),
        ("loss_chunk_size", 0, "loss_chunk_size must be .auto., None or a positive integer"),
        ("layer_replication", [[0, 2]], "layer_replication is not supported"),
    ],
)
def test_bad_config_values_raise_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=f"EdgeLLMConfig.{field}|{message}") as info:
        EdgeLLMConfig(**{"target_modules": ["q_proj"], field: value})
    assert field in str(info.value)
    assert info.match(message)


def test_default_exits_tile_the_model_from_the_top():
    assert resolve_exits(32, None, None) == ([7, 15, 23, 31], 8)
    assert resolve_exits(30, None, 8) == ([5, 13, 21, 29], 8)
    assert resolve_exits(1, None, None) == ([0], 1)


def test_given_exits_get_the_last_layer_and_a_covering_depth():
    assert resolve_exits(24, [11, 17], None) == ([11, 17, 23], 12)
    assert resolve_exits(24, [11, 17, 23], 4) == ([11, 17, 23], 4)


def test_exits_out_of_range_and_too_deep_windows_are_rejected():
    with pytest.raises(ValueError, match=r"exit_layers \[8\] out of range.*8 decoder layers.*0\.\.7"):
        resolve_exits(8, [3, 8], None)
    with pytest.raises(ValueError, match="backprop_depth=9 exceeds the model's 8 decoder layers"):
        resolve_exits(8, None, 9)


def test_exit_weights_are_normalised_and_must_match_the_exits():
    assert EdgeLLMConfig(target_modules=["q_proj"], exit_weights=[1, 3]).exit_weights == [0.25, 0.75]
    config = EdgeLLMConfig(target_modules=["q_proj"], exit_layers=[1], voting="weighted", exit_weights=[1, 1, 1])
    with pytest.raises(ValueError, match=r"exit_weights has 3 weights but the adapter has 2 exits \[1, 3\]"):
        get_peft_model(tiny_model(num_layers=4), config)


def test_out_of_range_exit_is_reported_when_the_adapter_is_built():
    with pytest.raises(ValueError, match="out of range"):
        get_peft_model(tiny_model(num_layers=4), EdgeLLMConfig(target_modules=["q_proj"], exit_layers=[1, 6]))


def test_exit_sampling_rules():
    exits = [1, 3, 5, 7]
    curriculum = [exit_for_step(exits, "curriculum", s, 10, 0) for s in range(10)]
    assert curriculum == [1, 1, 3, 3, 5, 5, 7, 7, 7, 7]  # lowest first, remainder to the last phase
    assert [exit_for_step(exits, "round_robin", s, 10, 0) for s in range(6)] == [1, 3, 5, 7, 1, 3]
    uniform = [exit_for_step(exits, "uniform", s, 100, 42) for s in range(100)]
    assert uniform == [exit_for_step(exits, "uniform", s, 100, 42) for s in range(100)]  # reproducible
    assert uniform != [exit_for_step(exits, "uniform", s, 100, 43) for s in range(100)]  # seed matters
    assert set(uniform) == set(exits)


def test_encoder_models_are_rejected_with_what_was_looked_for():
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(UnsupportedModelError, match="looked for an LM head"):
        get_peft_model(bert, EdgeLLMConfig(target_modules=["query"]))


def test_a_masked_lm_is_named_as_one_not_as_a_decoder_missing_its_norm():
    from transformers import BertConfig, BertForMaskedLM

    from edge_llm import enable_chunked_loss

    bert = BertForMaskedLM(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM is a masked-LM encoder"):
        enable_chunked_loss(bert)


def test_set_active_exit_rejects_non_exits():
    model = get_peft_model(tiny_model(num_layers=8), EdgeLLMConfig(target_modules=["q_proj"], exit_layers=[3]))
    assert model.exit_layers == [3, 7]
    with pytest.raises(ValueError, match=r"Layer 4 is not an exit of this adapter; its exits are \[3, 7\]"):
        model.set_active_exit(4)
    assert isinstance(model.base_model, EdgeLLMModel)


def test_a_lora_rank_above_the_hidden_size_is_refused_before_allocating():
    config = EdgeLLMConfig(target_modules=["q_proj"], r=20000)
    with pytest.raises(ValueError, match=r"EdgeLLMConfig\.r=20000 exceeds the model's hidden size 32; use at most 32"):
        get_peft_model(tiny_model("llama", 4), config)


def test_an_exit_head_rank_above_the_hidden_size_is_refused_before_allocating():
    config = EdgeLLMConfig(target_modules=["q_proj"], exit_head="lora", exit_head_rank=10**9)
    with pytest.raises(ValueError, match="exit_head_rank=1000000000 exceeds the model's hidden size 32"):
        get_peft_model(tiny_model("llama", 4), config)


def test_layers_no_window_covers_are_announced_loudly():
    from peft import get_peft_model
    from tiny_models import tiny_model

    with pytest.warns(UserWarning, match=r"layers \[0, 1, 2, 3\] \(4 of 8\) are in no exit's window"):
        get_peft_model(
            tiny_model("llama", 8), EdgeLLMConfig(target_modules=["q_proj"], exit_layers=[5], backprop_depth=2)
        )


def test_layers_without_the_adapter_are_not_announced_as_untrained(recwarn):
    from peft import get_peft_model
    from tiny_models import tiny_model

    window = [4, 5]  # exit 5's window of 2
    config = EdgeLLMConfig(target_modules=["q_proj"], exit_layers=[5], backprop_depth=2, layers_to_transform=window)
    model = get_peft_model(tiny_model("llama", 8), config)
    assert not [w for w in recwarn if "no exit's window" in str(w.message)]
    adapted = {int(n.split("layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == set(window)
    with pytest.warns(UserWarning, match=r"layers \[3\] \(1 of 8\) are in no exit's window"):
        config = EdgeLLMConfig(target_modules=["q_proj"], exit_layers=[5], backprop_depth=2, layers_to_transform=[3, 4])
        get_peft_model(tiny_model("llama", 8), config)
