"""Ship exactly what was tuned: an adapter tuned over a LUC base for llama.cpp, run in llama.cpp as
base GGUF + adapter GGUF (`--lora`), against the tuned PyTorch model and against the adapter
merged into the base (re-rounded into its types, what folding does).

SmolLM2-135M-Instruct is compressed for llama.cpp (`target="gguf"`, measured policy, `--bits`
bits per weight; calibration: sonnets 1-120), tuned with edge-llm (one exit at the top, a
20-layer window, gradient checkpointing) on sonnets 1-120, and measured on sonnets 131-154
(128-token windows): perplexity in PyTorch and in llama.cpp, the next token llama.cpp and PyTorch
agree on, with and without the adapter, and the files' sizes.

With `--base-mix Q4_K_M` (or another `llama-quantize` mix) the base is instead the file a llama.cpp
user already has: the dense model written as F16 GGUF and quantized by `llama_model_quantize`, loaded
with `edge_llm.export.load_gguf` (its blocks unchanged) and tuned over; the base shipped is then
checked to be that very file's tensors, byte for byte.

    python benchmarks/gguf_adapter.py --json benchmarks/results/gguf_adapter_smollm2.json
    python benchmarks/gguf_adapter.py --base-mix Q4_K_M --json benchmarks/results/gguf_adapter_smollm2_q4_k_m.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load_model, machine, training_arguments
from methods import GC
from tuning import token_data

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def same_tensors(first: Path, second: Path) -> bool:
    import gguf
    import numpy as np

    a, b = (gguf.GGUFReader(str(p)).tensors for p in (first, second))
    return len(a) == len(b) and all(
        x.name == y.name and x.tensor_type == y.tensor_type and np.array_equal(x.data, y.data)
        for x, y in zip(sorted(a, key=lambda t: t.name), sorted(b, key=lambda t: t.name), strict=True)
    )


def in_llama_cpp(path: Path, windows: torch.Tensor, lora: Path | None = None) -> tuple[float, torch.Tensor]:
    from edge_llm.export.gguf_run import perplexity_in_llama_cpp

    return perplexity_in_llama_cpp(path, windows, lora, threads=2)[:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=float, default=4.5, help="bits per weight of the llama.cpp base")
    parser.add_argument("--base-mix", help="tune over llama-quantize's file of this mix (e.g. Q4_K_M) instead of LUC's")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from peft import get_peft_model
    from transformers import default_data_collator

    from edge_llm import EdgeLLMConfig, EdgeTrainer
    from edge_llm.data import sonnets
    from edge_llm.export import load_gguf, write_gguf
    from edge_llm.export.gguf_lora import write_gguf_lora
    from edge_llm.export.gguf_run import score_windows
    from edge_llm.luc import calibration_tokens
    from edge_llm.luc.facts import gguf_policy_of
    from edge_llm.luc.ggml import llama_quantize
    from edge_llm.luc.gguf_policy import budget_bytes, compress_for_gguf

    torch.manual_seed(args.seed)
    model, tokenizer = load_model("smollm2", torch.float32, "cpu")
    sources = tempfile.TemporaryDirectory()
    if args.base_mix:  # the file llama-quantize makes, loaded as it is
        dense = write_gguf(model, Path(sources.name) / "f16.gguf", tokenizer)
        given = llama_quantize(dense, Path(sources.name) / f"{args.base_mix}.gguf", args.base_mix, None)
        model = load_gguf(given)
        policy = gguf_policy_of(model)
    else:
        calibration = calibration_tokens(sonnets("train"), tokenizer, num_samples=8, seq_len=128)
        policy = compress_for_gguf(model, calibration, budget_bytes(model, args.bits, None), progress=False)
    train, validation, test = token_data(tokenizer, model.config.vocab_size, args.seq, args.steps * args.batch, 16, 0)
    windows = torch.tensor(test["input_ids"])
    config = EdgeLLMConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, exit_layers=[29], backprop_depth=20
    )
    model = get_peft_model(model, config)
    with tempfile.TemporaryDirectory() as scratch:
        training = training_arguments(scratch, args, use_cpu=True, **GC)
        data = {"train_dataset": train, "eval_dataset": validation, "data_collator": default_data_collator}
        EdgeTrainer(model=model, args=training, **data).train()
    model.eval()

    def pytorch(window: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=window[None]).logits[0]

    result: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    result["policy"] = policy.summary()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        base = write_gguf(model, folder / "model.gguf", tokenizer, fold_adapters=False)
        if args.base_mix:  # what ships is the file tuned over
            result["base_is_the_given_file"] = same_tensors(base, given)
            print(f"base written = the {args.base_mix} file, tensor for tensor: {result['base_is_the_given_file']}")
        adapter = write_gguf_lora(model, folder / "adapter.gguf")
        merged = write_gguf(model, folder / "merged.gguf", tokenizer)
        ours_ppl, ours = score_windows(pytorch, windows)
        with model.disable_adapter():
            base_ppl, ours_base = score_windows(pytorch, windows)
        runs = {
            "llama.cpp base + adapter GGUF": in_llama_cpp(base, windows, adapter),
            "llama.cpp merged (re-rounded)": in_llama_cpp(merged, windows),
            "llama.cpp base alone": in_llama_cpp(base, windows),
        }
        files = {"base": base, "adapter": adapter, "merged": merged}
        result["mib"] = {name: path.stat().st_size / 2**20 for name, path in files.items()}
    result["pytorch"] = {"tuned": ours_ppl, "base": base_ppl}
    result["llama.cpp"] = {}
    for name, (ppl, argmax) in runs.items():
        reference = ours_base if name.endswith("alone") else ours
        agreement = (argmax == reference).float().mean().item()
        result["llama.cpp"][name] = {"perplexity": ppl, "same_next_token_as_pytorch": agreement}
        print(f"{name}: perplexity {ppl:.2f}, same next token as PyTorch {100 * agreement:.1f}%")
    print(f"PyTorch: tuned {ours_ppl:.2f}, base {base_ppl:.2f}; files (MiB): {result['mib']}")
    sources.cleanup()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
