"""Does choosing ExecuTorch's weight format per tensor beat one format everywhere, at equal `.pte` bytes?

The llama.cpp target chooses one llama.cpp type per tensor from measured sensitivity and beats
`llama-quantize`'s mixes (`vs_llamacpp.py`). This asks the same of ExecuTorch's formats: XNNPACK
runs int4 weights per block of a multiple of 32 columns (one bfloat16 scale per block) and int8
weights per output channel (one float32 scale per row), both with int8 activations per token. At
the bytes of torchao's 8da4w layout (int4 per 32 columns everywhere) and of int4 per 64, the
multiple-choice knapsack (`gguf_policy.search_types`, exact) picks one format per decoder Linear to
minimise an estimated damage, with three estimates from the same calibration pass
(`gguf_sensitivity.calibrate`): the Fisher-weighted squared error (the llama.cpp target's), the error
weighted by the input's mean square per column (llama.cpp's importance matrix, scaled to the
tensor's Fisher total), and the Fisher diagonal smoothed to its row x column marginals.

Every model is LUC's symmetric round-to-nearest codes in `LUCLinear`s, mapped by
`edge_llm.export.executorch.quantize_for_xnnpack` to the torchao weights the program holds
unchanged (int8 layers with one group per row, `code - 128`); perplexity is that model's, which
computes what the program computes (int8 activations per token, the same weights), on held-out
sonnets (131-154) and LAMBADA passages. The embedding table (int8 per row) and the head (int8 per
channel) are the same in every program and outside the choice. Before measuring, the script lowers
one Linear per format and checks that each format's bytes in the `.pte` are what the budget counts
(to the byte, against int4 per 32). `--lower` also lowers the uniform layout and each allocation
at torchao's size to `.pte` and measures them in ExecuTorch (about 15 minutes per program on 2 cores).

SmolLM2-135M-Instruct's released weights are dequantized Q4_1 blocks of 32, which flatters every
grid of 32 columns (the blocks' ranges are the original's) on this model: coarser blocks lose
that, so the uniform int4-per-32 layout has an advantage here that another model would not give it.

    python benchmarks/executorch_formats.py --json benchmarks/results/executorch_formats_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import load_model, machine
from vs_llamacpp import held_out_windows

BLOCKS = (32, 64, 96, 128, 192, 256)  # int4 blocks XNNPACK takes (multiples of 32), where they divide the row
ESTIMATES = ("fisher", "importance", "fisher marginals")


@dataclass(frozen=True)
class Format:
    """An XNNPACK weight format: `bits` (4 or 8) per block of `block` columns (the row for int8)."""

    bits: int
    block: int

    @property
    def name(self) -> str:
        return f"int4/{self.block}" if self.bits == 4 else "int8/row"

    def tensor_bytes(self, rows: int, columns: int) -> int:
        """Bytes in the `.pte`: packed codes and a bfloat16 scale per block (int4) or a float32
        scale per row (int8); checked by `check_bytes`."""
        if self.bits == 4:
            return rows * columns // 2 + rows * (columns // self.block) * 2
        return rows * columns + rows * 4


def formats_for(columns: int) -> list[Format]:
    return [Format(4, block) for block in BLOCKS if columns % block == 0] + [Format(8, columns)]


def compressed_linear(linear: nn.Linear, form: Format) -> nn.Module:
    """`linear` as LUC's symmetric round-to-nearest codes in `form`'s layout."""
    from edge_llm.luc.linear import LUCLinear
    from edge_llm.luc.quantize import quantize_rtn

    codes = quantize_rtn(linear.weight.detach(), form.bits, form.block, None, symmetric=True)
    return LUCLinear.from_linear(linear, form.bits, 0.0, form.block, codes)


def check_bytes(shapes: set[tuple[int, int]]) -> None:
    """Lower a one-Linear program per (shape, format) and check each format's bytes against int4/32's."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edge_llm.export.executorch import int_linear

    def program_bytes(rows: int, columns: int, form: Format) -> int:
        linear = nn.Linear(columns, rows, bias=False)
        lowered = int_linear(
            copy.deepcopy(linear), compressed_linear(linear, form), False, form.bits, form.block, Counter()
        )
        exported = torch.export.export(nn.Sequential(lowered), (torch.randn(2, columns),))
        return len(to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)

    for rows, columns in sorted(shapes):
        reference = Format(4, 32)
        base = program_bytes(rows, columns, reference)
        for form in formats_for(columns)[1:]:
            measured = program_bytes(rows, columns, form) - base
            counted = form.tensor_bytes(rows, columns) - reference.tensor_bytes(rows, columns)
            if measured != counted:
                raise SystemExit(
                    f"{rows}x{columns} {form.name}: {measured} bytes over int4/32 in the .pte, {counted} counted"
                )
    print(f"bytes per format checked against lowered programs for shapes {sorted(shapes)}", file=sys.stderr)


def damage_tables(model, statistics) -> dict[str, dict]:
    """Per estimate, every decoder Linear's candidates: (format, bytes, estimated damage)."""
    from edge_llm.luc.gguf_sensitivity import EMBEDDING, Candidate, weight_tensors
    from edge_llm.luc.quantize import dequantize, quantize_rtn

    tables: dict[str, dict] = {estimate: {} for estimate in ESTIMATES}
    for name, module in weight_tensors(model).items():
        if name == EMBEDDING:
            continue
        weight = module.weight.detach().float()
        rows, columns = weight.shape
        fisher = statistics.fisher[name]
        importance = torch.from_numpy(statistics.importance[name]).float()
        weights = {
            "fisher": fisher,
            "importance": importance.expand_as(weight) * (fisher.sum() / (importance.sum() * rows)),
            "fisher marginals": fisher.sum(1, keepdim=True) * fisher.sum(0, keepdim=True) / fisher.sum(),
        }
        for form in formats_for(columns):
            q = quantize_rtn(weight, form.bits, form.block, None, symmetric=True)
            error = (weight - dequantize(q.codes, q.scales, q.zeros, form.block, None)).square()
            for estimate, weighting in weights.items():
                damage = float((weighting * error).sum())
                tables[estimate].setdefault(name, []).append(Candidate(form, form.tensor_bytes(rows, columns), damage))
    return tables


def build(original, table: dict, choice: dict[str, str]) -> nn.Module:
    from edge_llm.export.executorch import quantize_for_xnnpack

    model = copy.deepcopy(original)
    for name, kind in choice.items():
        form = next(c.kind for c in table[name] if c.kind.name == kind)
        model.set_submodule(name, compressed_linear(model.get_submodule(name), form))
    plain, counts = quantize_for_xnnpack(model)
    if any("re-quantized" in what for what in counts):
        raise SystemExit(f"a layer was re-quantized on the way to XNNPACK: {counts}")
    return plain


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    nll = 0.0
    for window in windows:
        logp = model(input_ids=window[None]).logits[0].float().log_softmax(-1)
        nll -= logp[:-1].gather(-1, window[1:, None]).sum().item()
    return math.exp(nll / (windows.numel() - len(windows)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=15, help="held-out windows of 256 tokens per text")
    parser.add_argument(
        "--lower", action="store_true", help="also measure the programs at torchao's size in ExecuTorch"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from edge_llm.data import sonnets
    from edge_llm.luc import calibration_tokens
    from edge_llm.luc.gguf_policy import search_types
    from edge_llm.luc.gguf_sensitivity import calibrate

    torch.manual_seed(0)
    original, tokenizer = load_model("smollm2", torch.float32, "cpu")
    original.eval()
    windows = held_out_windows(tokenizer, args.windows)
    start = time.perf_counter()
    statistics = calibrate(original, calibration_tokens(sonnets("train"), tokenizer, 16, 256), progress=False)
    tables = damage_tables(original, statistics)
    profile_s = time.perf_counter() - start
    reference = tables["fisher"]
    check_bytes({tuple(original.get_submodule(name).weight.shape) for name in reference})

    def uniform(block: int) -> dict[str, str]:
        return {name: Format(4, block).name for name in reference}

    def cost(choice: dict[str, str]) -> int:
        return sum(next(c.nbytes for c in reference[name] if c.kind.name == kind) for name, kind in choice.items())

    programs: dict[str, dict] = {}
    for block in (32, 64):
        layout = uniform(block)
        programs[f"int4/{block} everywhere"] = {"choice": layout, "size": f"int4/{block}"}
        for estimate, table in tables.items():
            programs[f"chosen per tensor ({estimate}), at int4/{block}'s bytes"] = {
                "choice": search_types(table, cost(layout)),
                "size": f"int4/{block}",
            }
    rows = {"float32": {f"{text}_perplexity": perplexity(original, w) for text, w in windows.items()}}
    for label, program in programs.items():
        plain = build(original, reference, program["choice"])
        row = {
            "weight_bytes": cost(program["choice"]),
            "formats": dict(Counter(program["choice"].values())),
            "size": program["size"],
            **{f"{text}_perplexity": perplexity(plain, w) for text, w in windows.items()},
        }
        if args.lower and program["size"] == "int4/32":
            row.update(runtime_perplexities(plain, windows))
        rows[label] = row
        print(f"{label}: {row}", file=sys.stderr)

    lines = [
        f"machine: {machine()}",
        f"SmolLM2-135M-Instruct, decoder Linears in XNNPACK's formats (embedding int8 per row and head int8 per "
        f"channel in every program, outside the choice); perplexity of the model the program computes (int8 "
        f"activations per token) on {args.windows} windows of 256 tokens per text; profile (calibration and the "
        f"three tables): {profile_s:.0f} s",
        "",
        "| layout | decoder weights MiB | formats | ppl sonnets | ppl LAMBADA |",
        "|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        size = f"{row['weight_bytes'] / 2**20:.2f}" if "weight_bytes" in row else "—"
        formats = ", ".join(f"{n} {k}" for k, n in sorted(row.get("formats", {}).items())) or "float32"
        quality = f"{row['sonnets_perplexity']:.2f} | {row['LAMBADA_perplexity']:.2f}"
        lines.append(f"| {label} | {size} | {formats} | {quality} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "profile_s": profile_s, "rows": rows}, indent=2))
        args.json.with_suffix(".md").write_text("\n".join(lines) + "\n")


def runtime_perplexities(plain: nn.Module, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    """`plain` lowered to a `.pte` and measured in ExecuTorch (`runtime_agreement.compare`)."""
    from runtime_agreement import SEQ_LEN, ExecuTorch, compare

    from edge_llm.export.executorch import write_program

    with tempfile.TemporaryDirectory() as tmp:
        file = write_program(plain, Path(tmp) / "program.pte", max_seq_len=SEQ_LEN + 1)
        runner = ExecuTorch(file)
        row = {"pte_bytes": file.stat().st_size}
        for text, text_windows in windows.items():
            row[f"{text}_runtime_perplexity"] = compare(plain, runner, text_windows)["runtime_perplexity"]
        runner.close()
    return row


if __name__ == "__main__":
    main()
