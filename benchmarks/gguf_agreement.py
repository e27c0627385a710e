"""Does the GGUF export compute what the PyTorch model computes? SmolLM2-135M in llama.cpp.

For the original model, uniform 2/3/4-bit RTN compression and a LUC policy, writes the model as
GGUF (by default LUC's codes unchanged; with `k_quants=True` 2/3-bit layers re-quantized into the
smaller Q2_K/Q3_K), then compares llama.cpp (`llama-cpp-python`) with PyTorch on held-out text (sonnets
131-154, 256-token windows): perplexity of each, the share of positions where both pick the same
next token, and the mean KL divergence between their next-token distributions.

    python benchmarks/gguf_agreement.py --luc-policy benchmarks/results/luc_policy_smollm2_4bit25.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine

SEQ_LEN = 256


def llama_cpp_log_probs(path: Path, windows: torch.Tensor) -> list[torch.Tensor]:
    """Next-token log-probabilities llama.cpp computes for every window (each from an empty cache)."""
    import llama_cpp

    runtime = llama_cpp.Llama(model_path=str(path), n_ctx=SEQ_LEN, logits_all=True, verbose=False, n_threads=2)
    try:
        out = []
        for window in windows:
            runtime.reset()
            runtime.eval(window.tolist())
            out.append(torch.from_numpy(np.array(runtime.scores[:SEQ_LEN], dtype=np.float32)).log_softmax(-1))
        return out
    finally:
        runtime.close()


def compare(model: torch.nn.Module, gguf_path: Path, windows: torch.Tensor) -> dict:
    theirs = llama_cpp_log_probs(gguf_path, windows)
    nll_ours = nll_theirs = kl = agree = 0.0
    count = 0
    with torch.no_grad():
        for window, their in zip(windows, theirs, strict=True):
            ours = model(input_ids=window[None]).logits[0].float().log_softmax(-1)
            targets = window[1:, None]
            nll_ours -= ours[:-1].gather(-1, targets).sum().item()
            nll_theirs -= their[:-1].gather(-1, targets).sum().item()
            kl += (ours.exp() * (ours - their)).sum().item()
            agree += (ours.argmax(-1) == their.argmax(-1)).sum().item()
            count += len(window)
    predicted = windows.numel() - len(windows)
    return {
        "pytorch_perplexity": math.exp(nll_ours / predicted),
        "llama_cpp_perplexity": math.exp(nll_theirs / predicted),
        "top1_agreement": agree / count,
        "mean_kl": kl / count,
        "gguf_bytes": gguf_path.stat().st_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--luc-policy", type=Path, help="also export a model compressed with this LUC policy")
    parser.add_argument("--windows", type=int, default=15, help="held-out windows of 256 tokens")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_llm.assets import smollm2_135m, smollm2_135m_gguf
    from edge_llm.data import sonnets
    from edge_llm.export import write_gguf
    from edge_llm.luc import CompressionMethod, LUCPolicy, calibration_tokens, compress_model

    path = smollm2_135m()
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer("\n\n".join(sonnets("test")), return_tensors="pt").input_ids[0]
    windows = ids[: (len(ids) // SEQ_LEN) * SEQ_LEN].view(-1, SEQ_LEN)[: args.windows]
    calibration = calibration_tokens(sonnets("train"), tokenizer, 8, 128)
    layers = original.config.num_hidden_layers
    # name -> (per-layer (bits, sparsity), method, target modules or None for all linears), k_quants
    settings: dict[str, tuple] = {"original (bf16 weights)": (None, False)}
    for bits in (4, 3, 2):
        setting = ([(bits, 0.0)] * layers, CompressionMethod(64, "rtn", "wanda"), None)
        settings[f"uniform {bits}-bit RTN"] = (setting, False)
        if bits < 4:
            settings[f"uniform {bits}-bit RTN, k_quants=True"] = (setting, True)
    if args.luc_policy:
        policy = LUCPolicy.load(args.luc_policy)
        setting = (policy.layers, policy.method, policy.targets)
        settings[f"LUC policy {args.luc_policy.stem}"] = (setting, False)
        settings[f"LUC policy {args.luc_policy.stem}, k_quants=True"] = (setting, True)

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (setting, k_quants) in settings.items():
            model = copy.deepcopy(original)
            if setting is not None:
                compress_model(model, *setting[:2], calibration, setting[2], progress=False)
            gguf_path = write_gguf(model, Path(tmp) / "model.gguf", tokenizer, smollm2_135m_gguf(), k_quants=k_quants)
            rows[name] = compare(model, gguf_path, windows)
            print(f"{name}: {rows[name]}", file=sys.stderr)

    lines = [
        f"machine: {machine()}",
        f"SmolLM2-135M-Instruct exported with edge_llm.export.write_gguf, run in llama.cpp (llama-cpp-python); "
        f"held-out: sonnets 131-154, {len(windows)} windows of {SEQ_LEN} tokens",
        "",
        "| model | GGUF MiB | PyTorch perplexity | llama.cpp perplexity | same next token | mean KL (nats) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['gguf_bytes'] / 2**20:.1f} | {row['pytorch_perplexity']:.2f} | "
            f"{row['llama_cpp_perplexity']:.2f} | {row['top1_agreement']:.1%} | {row['mean_kl']:.4f} |"
        )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
