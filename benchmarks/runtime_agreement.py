"""Does an edge runtime compute what the PyTorch model computes? SmolLM2-135M in llama.cpp (GGUF) or
ExecuTorch (.pte, XNNPACK).

For the original model, uniform RTN compression and a LUC policy, writes the model for the runtime
(`write_gguf`: LUC's codes unchanged by default, `k_quants=True` re-quantizes 2/3-bit layers into
Q2_K/Q3_K; `write_pte`: LUC's codes in int4 blocks where they fit), then compares the runtime with
PyTorch on held-out text (sonnets 131-154, 256-token windows): perplexity of each, the share of
positions where both pick the same next token, and the mean KL divergence between their next-token
distributions. Then the runtime's speed on this machine, all models in interleaved rounds: prefill
(a 256-token window per call) and decode (32 tokens one by one after a 128-token prompt).

    python benchmarks/runtime_agreement.py --runtime gguf --luc-policy benchmarks/results/luc_policy_smollm2_4bit25.json
    python benchmarks/runtime_agreement.py --runtime executorch --luc-policy ...
    python benchmarks/runtime_agreement.py --runtime executorch --bits 4 --attention custom sdpa --with-llama-cpp

ExecuTorch programs attend with ExecuTorch's own ops by default (`write_pte(attention="custom")`);
`--attention custom sdpa` adds the stock-SDPA program of each model and `--with-llama-cpp` its GGUF
in llama.cpp, all timed in the same interleaved rounds. `--with-optimum-executorch` adds the
program optimum-executorch exports from the same checkpoint with its LLM recipe (XNNPACK, custom
SDPA, torchao 8da4w Linears in groups of 32, an 8-bit embedding), compared with the original model;
it needs `pip install --no-deps optimum-executorch` (its pins name an older transformers). Its
custom KV cache is left off: optimum-executorch 1.1.0 builds it on transformers' `HybridCache`,
which transformers 5 no longer has, so the program keeps transformers' static cache.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, spread

SEQ_LEN = 256
PROMPT, DECODE = 128, 32


class LlamaCpp:
    """A GGUF file in llama.cpp (`edge_llm.export.gguf_run`), 2 threads, as the runners here are used."""

    def __init__(self, path: Path, lora_path: Path | None = None) -> None:
        from edge_llm.export.gguf_run import LlamaCppModel

        self.model = LlamaCppModel(path, lora_path, context=SEQ_LEN, threads=2)

    def logits(self, window: torch.Tensor) -> torch.Tensor:
        return self.model.logits(window)

    def decode(self, prompt: torch.Tensor, tokens: torch.Tensor) -> float:
        """Seconds to feed `tokens` one by one after `prompt`."""
        return self.model.time(prompt.tolist(), tokens.tolist())["decode"]

    def close(self) -> None:
        self.model.close()


class ExecuTorch:
    """A .pte program in ExecuTorch's runtime (its Python bindings; XNNPACK's own thread pool)."""

    def __init__(self, path: Path) -> None:
        from edge_llm.export.executorch import load_program

        self.forward = load_program(path).load_method("forward")

    def logits(self, window: torch.Tensor) -> torch.Tensor:
        return self.forward.execute([window[None], torch.arange(len(window))])[0][0].float()

    def decode(self, prompt: torch.Tensor, tokens: torch.Tensor) -> float:
        """Seconds to feed `tokens` one by one after `prompt`."""
        self.forward.execute([prompt[None], torch.arange(len(prompt))])
        start = time.perf_counter()
        for offset, token in enumerate(tokens.tolist(), start=len(prompt)):
            self.forward.execute([torch.tensor([[token]]), torch.tensor([offset])])
        return time.perf_counter() - start

    def close(self) -> None:
        del self.forward


def write_gguf_file(model: torch.nn.Module, out: Path, tokenizer, k_quants: bool) -> Path:
    from edge_llm.assets import smollm2_135m_gguf
    from edge_llm.export import write_gguf

    return write_gguf(model, out / "model.gguf", tokenizer, smollm2_135m_gguf(), k_quants=k_quants)


def write_optimum_executorch(checkpoint: Path, out: Path) -> Path:
    """optimum-executorch's export of `checkpoint`, as its documentation gives it for LLMs on CPU
    (but for the custom KV cache: see the module docstring)."""
    from optimum.exporters.executorch import main_export

    main_export(
        model_name_or_path=str(checkpoint),
        task="text-generation",
        recipe="xnnpack",
        output_dir=out,
        attn_implementation="custom_sdpa",
        use_custom_kv_cache=False,
        qlinear="8da4w",
        qembedding="8w",
        max_seq_len=SEQ_LEN + 1,
    )
    return out / "model.pte"


def write_pte_file(
    model: torch.nn.Module, out: Path, tokenizer, k_quants: bool, embedding_bits: int = 8, attention: str = "custom"
) -> Path:
    from edge_llm.export import write_pte

    return write_pte(
        model, out / "model.pte", max_seq_len=SEQ_LEN + 1, embedding_bits=embedding_bits, attention=attention
    )


# runtime -> (name in tables, writer, runner, whether k_quants settings apply)
RUNTIMES: dict[str, tuple[str, Callable, type, bool]] = {
    "gguf": ("llama.cpp", write_gguf_file, LlamaCpp, True),
    "executorch": ("ExecuTorch", write_pte_file, ExecuTorch, False),
}


def compare(model: torch.nn.Module, runner, windows: torch.Tensor) -> dict:
    nll_ours = nll_theirs = kl = agree = 0.0
    count = 0
    with torch.no_grad():
        for window in windows:
            their = runner.logits(window).log_softmax(-1)
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
        "runtime_perplexity": math.exp(nll_theirs / predicted),
        "top1_agreement": agree / count,
        "mean_kl": kl / count,
    }


def add_row(
    row: str,
    model: torch.nn.Module,
    export: Callable[[], Path],
    runner_type: type,
    windows: torch.Tensor,
    runners: dict,
    rows: dict[str, dict],
) -> None:
    """Write a file (`export`), open it in `runner_type` and record its agreement with `model`
    (`compare`), its size and the export's seconds under `row`."""
    start = time.perf_counter()
    file = export()
    export_s = time.perf_counter() - start
    runners[row] = runner_type(file)
    rows[row] = {**compare(model, runners[row], windows), "bytes": file.stat().st_size, "export_s": export_s}
    print(f"{row}: {rows[row]}", file=sys.stderr)


def time_and_close(runners: dict, windows: torch.Tensor, rounds: int, rows: dict[str, dict]) -> None:
    """Every runner's speed (`speed`) into its row as `prefill_tokens_per_s` / `decode_tokens_per_s`;
    then the runners are closed."""
    times = speed(runners, windows, rounds)
    for runner in runners.values():
        runner.close()
    for name, row in rows.items():
        row.update({f"{kind}_tokens_per_s": values for kind, values in times[name].items()})


def speed(runners: dict, windows: torch.Tensor, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Prefill and decode tokens/s of every runner, in interleaved rounds."""
    times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            for window in windows[:2]:
                runner.logits(window)
            times[name]["prefill"].append(2 * SEQ_LEN / (time.perf_counter() - start))
            decode_s = runner.decode(windows[0, :PROMPT], windows[0, PROMPT : PROMPT + DECODE])
            times[name]["decode"].append(DECODE / decode_s)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", choices=tuple(RUNTIMES), default="gguf")
    parser.add_argument("--luc-policy", type=Path, help="also export a model compressed with this LUC policy")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="uniform RTN settings")
    parser.add_argument("--windows", type=int, default=15, help="held-out windows of 256 tokens")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds")
    parser.add_argument(
        "--embedding-bits", type=int, default=8, choices=(8, 16, 32), help="ExecuTorch: the embedding table's storage"
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["custom"],
        choices=("custom", "sdpa"),
        help="ExecuTorch: the program's attention (write_pte's `attention`); each one listed is a row",
    )
    parser.add_argument(
        "--with-llama-cpp",
        action="store_true",
        help="ExecuTorch: also run each model's GGUF in llama.cpp, in the same interleaved speed rounds",
    )
    parser.add_argument(
        "--with-optimum-executorch",
        action="store_true",
        help="ExecuTorch: also optimum-executorch's own export of the original checkpoint, in the same rounds",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runtime_name, write, runner_type, k_quant_settings = RUNTIMES[args.runtime]
    # (row suffix, writer, runner) per file written for each model
    outputs = [("", write, runner_type)]
    if args.runtime == "executorch":
        outputs = [
            (
                f", {name} attention" if len(args.attention) > 1 else "",
                functools.partial(write, embedding_bits=args.embedding_bits, attention=name),
                runner_type,
            )
            for name in args.attention
        ]
        if args.with_llama_cpp:
            outputs.append((", llama.cpp", write_gguf_file, LlamaCpp))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_llm.assets import smollm2_135m
    from edge_llm.data import sonnets
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
    for bits in args.bits:
        setting = ([(bits, 0.0)] * layers, CompressionMethod(64, "rtn", "wanda"), None)
        settings[f"uniform {bits}-bit RTN"] = (setting, False)
        if bits < 4 and k_quant_settings:
            settings[f"uniform {bits}-bit RTN, k_quants=True"] = (setting, True)
    if args.luc_policy:
        policy = LUCPolicy.load(args.luc_policy)
        setting = (policy.layers, policy.method, policy.targets)
        settings[f"LUC policy {args.luc_policy.stem}"] = (setting, False)
        if k_quant_settings:
            settings[f"LUC policy {args.luc_policy.stem}, k_quants=True"] = (setting, True)

    rows, runners = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, (setting, k_quants)) in enumerate(settings.items()):
            model = copy.deepcopy(original)
            if setting is not None:
                compress_model(model, *setting[:2], calibration, setting[2], progress=False)
            for kind, (suffix, writer, runner) in enumerate(outputs):
                out = Path(tmp) / f"{index}-{kind}"
                out.mkdir()
                export = functools.partial(writer, model, out, tokenizer, k_quants)
                add_row(name + suffix, model, export, runner, windows, runners, rows)
            del model
        if args.with_optimum_executorch:
            row = "original, optimum-executorch's export (8da4w, groups of 32; 8-bit embedding)"
            export = functools.partial(write_optimum_executorch, path, Path(tmp) / "optimum")
            add_row(row, original, export, ExecuTorch, windows, runners, rows)
        time_and_close(runners, windows, args.rounds, rows)

    lines = [
        f"machine: {machine()}",
        f"SmolLM2-135M-Instruct exported with edge_llm.export ({args.runtime}), run in {runtime_name}; held-out: "
        f"sonnets 131-154, {len(windows)} windows of {SEQ_LEN} tokens; speed: {args.rounds} interleaved rounds, "
        f"median [min–max]",
        "",
        f"| model | file MiB | PyTorch perplexity | {'runtime' if len(outputs) > 1 else runtime_name} perplexity | "
        "same next token | mean KL (nats) "
        f"| prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['bytes'] / 2**20:.1f} | {row['pytorch_perplexity']:.2f} | "
            f"{row['runtime_perplexity']:.2f} | {row['top1_agreement']:.1%} | {row['mean_kl']:.4f} | "
            f"{spread(row['prefill_tokens_per_s'], 0)} | {spread(row['decode_tokens_per_s'], 0)} |"
        )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "runtime": args.runtime, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
