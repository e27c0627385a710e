"""edge-llm's ExecuTorch programs against torchao's, at equal `.pte` size, measured in ExecuTorch.

An ExecuTorch user already has a compressor: torchao's `quantize_` with
`Int8DynamicActivationIntxWeightConfig` (int4 weights per group of 32, int8 activations: "8da4w",
what optimum-executorch's `--qlinear 8da4w --qembedding 8w` writes), lowered to XNNPACK. Every
program here is the same static-cache decoder (`edge_llm.export.executorch.write_program`) with
its embedding table in int8 per row, so what differs is how the weights were rounded:

- torchao 8da4w, head 8da4w: optimum-executorch's recipe (the head in int4 too);
- torchao 8da4w, head int8: the same, with the head as edge-llm's export stores it (int8 per
  channel), the size every row below shares;
- torchao 8da4w with its other choices of scale: `SYMMETRIC_NO_CLIPPING_ERR` (the rule LUC's
  symmetric grid uses) and `HQQ_SCALE_ONLY` (a data-free search of each group's scale);
- LUC 4-bit symmetric RTN / GPTQ, groups of 32: LUC's codes on XNNPACK's symmetric int4 grid, so
  the program holds them unchanged at exactly the bytes of the torchao head-int8 rows.

SmolLM2-135M-Instruct (its released weights are dequantized Q4_1, which flatters 4-bit grids of
32), perplexity in ExecuTorch on held-out sonnets (131-154) and LAMBADA's first passages; GPTQ
calibrates on 64 x 256 tokens of the training sonnets (the sonnets are its calibration domain,
LAMBADA is not); speed as in `runtime_agreement.py`.

    python benchmarks/vs_torchao.py --json benchmarks/results/vs_torchao_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load_model, machine, spread
from runtime_agreement import SEQ_LEN, ExecuTorch, compare, time_and_close
from vs_llamacpp import held_out_windows


def torchao_program(original, head: str, choice: str = "default") -> torch.nn.Module:
    """`original` quantized by torchao: 8da4w (int4 per 32, int8 activations) everywhere, the head
    8da4w too (`head="int4"`) or int8 per output channel (`head="int8"`); the table int8 per row.
    `choice` of int4 scales: torchao's default symmetric mapping, "no_clipping"
    (`SYMMETRIC_NO_CLIPPING_ERR`) or "hqq" (`HQQ_SCALE_ONLY`)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    from edge_llm.export.executorch import int8_embedding

    options = {
        "default": {},
        "no_clipping": {"weight_mapping_type": MappingType.SYMMETRIC_NO_CLIPPING_ERR},
        "hqq": {"intx_choose_qparams_algorithm": IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY},
    }[choice]
    model = copy.deepcopy(original)
    int8_embedding(model)  # unties the head first
    lm_head = model.get_output_embeddings()
    if head == "int8":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
        quantize_(model, config, lambda module, _: module is lm_head)
    int4 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32), **options)
    quantize_(
        model, int4, lambda module, _: isinstance(module, torch.nn.Linear) and (head == "int4" or module is not lm_head)
    )
    return model


def luc_model(original, method, calibration) -> torch.nn.Module:
    from edge_llm.luc import compress_model

    model = copy.deepcopy(original)
    layers = model.config.num_hidden_layers
    compress_model(model, [(4, 0.0)] * layers, method, calibration, progress=False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=15, help="held-out windows of 256 tokens per text")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="+", help="measure only the programs whose names hold one of these words")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from edge_llm.data import sonnets
    from edge_llm.export.executorch import quantize_for_xnnpack, write_program
    from edge_llm.luc import CompressionMethod, calibration_tokens

    original, tokenizer = load_model("smollm2", torch.float32, "cpu")
    original.eval()
    windows = held_out_windows(tokenizer, args.windows)
    calibration = calibration_tokens(sonnets("train"), tokenizer, 64, 256)

    # name -> the float model whose torchao weights the program holds, and the PyTorch model it computes
    builders = {
        "torchao 8da4w, head 8da4w (optimum-executorch's recipe)": lambda: torchao_program(original, "int4"),
        "torchao 8da4w, head int8": lambda: torchao_program(original, "int8"),
        "torchao 8da4w SYMMETRIC_NO_CLIPPING_ERR, head int8": lambda: torchao_program(original, "int8", "no_clipping"),
        "torchao 8da4w HQQ_SCALE_ONLY, head int8": lambda: torchao_program(original, "int8", "hqq"),
    }
    for label, method in {
        "LUC 4-bit symmetric RTN g32": CompressionMethod(32, "rtn", grid="symmetric"),
        "LUC 4-bit symmetric GPTQ g32": CompressionMethod(32, "gptq", grid="symmetric"),
    }.items():
        builders[label] = lambda method=method: quantize_for_xnnpack(luc_model(original, method, calibration))[0]
    if args.only:
        builders = {name: build for name, build in builders.items() if any(word in name for word in args.only)}

    rows, runners = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, build) in enumerate(builders.items()):
            start = time.perf_counter()
            plain = build()
            file = write_program(plain, Path(tmp) / f"{index}.pte", max_seq_len=SEQ_LEN + 1)
            export_s = time.perf_counter() - start
            runners[name] = ExecuTorch(file)
            rows[name] = {"bytes": file.stat().st_size, "export_s": export_s}
            for text, text_windows in windows.items():
                result = compare(plain, runners[name], text_windows)
                rows[name][f"{text}_runtime_perplexity"] = result["runtime_perplexity"]
                rows[name][f"{text}_pytorch_perplexity"] = result["pytorch_perplexity"]
            print(f"{name}: {rows[name]}", file=sys.stderr)
            del plain
        time_and_close(runners, windows["sonnets"], args.rounds, rows)

    lines = [
        f"machine: {machine()}",
        f"SmolLM2-135M-Instruct in ExecuTorch (XNNPACK), every program with an int8 embedding table; held-out: "
        f"{args.windows} windows of {SEQ_LEN} tokens per text; speed: {args.rounds} interleaved rounds, "
        "median [min–max]",
        "",
        "| program | .pte MiB | ppl sonnets | ppl LAMBADA | prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['bytes'] / 2**20:.1f} | {row['sonnets_runtime_perplexity']:.2f} | "
            f"{row['LAMBADA_runtime_perplexity']:.2f} | {spread(row['prefill_tokens_per_s'], 0)} | "
            f"{spread(row['decode_tokens_per_s'], 0)} |"
        )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "windows": args.windows, "rows": rows}, indent=2))
        args.json.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
