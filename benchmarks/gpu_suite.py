"""Every GPU speed and memory figure edge-llm publishes, from one run on a bare CUDA machine.

    python benchmarks/gpu_suite.py --out results/          # on the GPU: a ~1B Llama-style config, bf16
    python benchmarks/gpu_suite.py --out /tmp/x --smoke    # the same code paths, tiny config, on CPU

Needs torch, transformers, peft, accelerate and edge-llm's own dependencies (no `datasets`). Three
parts, each written to `<out>/<part>.json` as soon as it is done, so a run cut short keeps what it
finished:

1. `tuning`: the methods of `benchmarks/methods.py` (LoRA, + gradient checkpointing, + chunked
   loss, top-K LoRA + chunked loss, edge-llm defaults / one top exit / + checkpointing) on the same
   random-weight model, data, batch, steps, LoRA rank and targets, in one process one after the
   other (each with a fresh model; `torch.cuda.max_memory_allocated` reset per method), over two
   rounds in opposite orders. Peak memory (weights included and above the loaded model), median
   step, step over an exit cycle, tokens/s.
2. `luc_kernels`: one Linear of each projection shape of the model, for decode (1 token), prefill
   (256) and a training micro-batch (2048 tokens): dense bf16, `LUCLinear`'s dequantize path at 4
   and 2 bits, the int4 tinygemm kernel (`aten._weight_int4pack_mm`, fed LUC's 4-bit codes without
   re-rounding) and 2:4 semi-structured sparsity; each kernel's error against the dequantized
   reference.
3. `cost_model`: `benchmarks/cost_model.py` on the device, with `profile_this_machine(device=...)`
   measured there.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import CONFIGS, StepMeter, load_model, machine, measured, training_arguments
from methods import LABELS, METHODS, Setup, default_depth

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _token_rows(vocab: int, rows: int, seq: int, seed: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


def tune_once(method: str, model_name: str, batch: int, seq: int, steps: int, warmup: int, device: str) -> dict:
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    before = torch.cuda.memory_allocated() if cuda else 0
    model, _ = load_model(model_name, dtype, device)
    layers = model.config.num_hidden_layers
    setup = Setup(rank=8, targets=TARGETS, depth=default_depth(layers), exit_sampling="round_robin")
    prepared = METHODS[method](model, setup)
    data = _token_rows(model.config.vocab_size, steps * batch, seq, seed=0)
    args = argparse.Namespace(steps=steps, batch=batch, lr=1e-4, seed=0)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = training_arguments(
            output_dir, args, optim="adamw_torch", bf16=cuda, use_cpu=not cuda, **prepared.training_overrides
        )
        meter = StepMeter(prepared.model)
        trainer = measured(prepared.trainer_cls, meter)(
            model=prepared.model, args=training_args, train_dataset=data, callbacks=[meter]
        )
        trainer.train()
    result = meter.summary(warmup, batch * seq)
    result.update(method=method, memory_left_by_earlier_runs_bytes=before, depth=setup.depth, layers=layers)
    del trainer, prepared, model, meter
    _free()
    return result


def part_tuning(args: argparse.Namespace) -> dict:
    shapes = [(2, 64), (1, 32)] if args.smoke else [(8, 1024), (1, 512)]
    steps, warmup = (6, 4) if args.smoke else (12, 4)
    methods = list(METHODS)
    runs: dict[str, dict[str, list[dict]]] = {}
    for batch, seq in shapes:
        key = f"{batch}x{seq}"
        runs[key] = {m: [] for m in methods}
        for round_index in range(args.rounds):
            order = methods if round_index % 2 == 0 else methods[::-1]
            for method in order:
                log(f"tuning {key} round {round_index + 1}: {method}")
                try:
                    runs[key][method].append(tune_once(method, args.model, batch, seq, steps, warmup, args.device))
                except Exception as error:  # one method failing must not cost the others' figures
                    runs[key][method].append({"error": f"{type(error).__name__}: {error}"})
                    log(traceback.format_exc())
                    _free()
                # What is done so far survives a run cut short.
                (args.out / "tuning.partial.json").write_text(json.dumps(runs, default=str))
    return {"model": args.model, "config": CONFIGS[args.model], "steps": steps, "warmup": warmup, "runs": runs}


def _time(fn, repeats: int, cuda: bool) -> float:
    """Median seconds of `repeats` calls after two warm-ups (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def _int4_tinygemm(layer):
    """LUC's own int4 kernel path (`edge_llm.luc.kernels`): the layer's codes in tinygemm's layout."""
    from edge_llm.luc.kernels import int4_matmul

    packed = layer.int4_weight()
    return lambda x: int4_matmul(x, packed)


def _semi_structured(weight: torch.Tensor):
    from torch.sparse import to_sparse_semi_structured

    keep = weight.abs().view(-1, 4).argsort(dim=1, descending=True)[:, :2]
    mask = torch.zeros_like(weight.view(-1, 4), dtype=torch.bool).scatter_(1, keep, True).view_as(weight)
    pruned = (weight * mask).to(torch.bfloat16)
    sparse = to_sparse_semi_structured(pruned)
    return pruned, lambda x: torch.nn.functional.linear(x, sparse)


def part_luc_kernels(args: argparse.Namespace) -> dict:
    from edge_llm.luc import LUCLinear
    from edge_llm.luc.quantize import quantize_rtn

    cuda = args.device == "cuda"
    config = CONFIGS[args.model]
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"q_proj/o_proj": (hidden, hidden), "k_proj/v_proj": (kv, hidden), "gate/up_proj": (inter, hidden)}
    shapes["down_proj"] = (hidden, inter)
    token_counts = {"decode": 1, "prefill": 256 if not args.smoke else 16, "train": 2048 if not args.smoke else 64}
    rows = []
    generator = torch.Generator().manual_seed(0)
    for shape_name, (out_features, in_features) in shapes.items():
        weight = torch.randn(out_features, in_features, generator=generator) * 0.02
        linear = torch.nn.Linear(in_features, out_features, bias=False)
        linear.weight.data = weight
        luc = {
            bits: LUCLinear.from_linear(linear, bits, 0.0, 64, quantize_rtn(weight, bits, 64)).to(args.device)
            for bits in (4, 2)
        }
        dense_bf16 = weight.to(args.device, torch.bfloat16)
        reference = luc[4].dequantize_weight(torch.float32)
        kernels = {}
        try:
            kernels["int4_tinygemm"] = _int4_tinygemm(luc[4])
        except Exception as error:
            rows.append({"shape": shape_name, "kernel": "int4_tinygemm", "error": f"{type(error).__name__}: {error}"})
        pruned = None
        if cuda:
            try:
                pruned, kernels["sparse_2_4_bf16"] = _semi_structured(dense_bf16)
            except Exception as error:
                rows.append({"shape": shape_name, "kernel": "sparse_2_4", "error": f"{type(error).__name__}: {error}"})
        for phase, tokens in token_counts.items():
            x = torch.randn(tokens, in_features, generator=generator).to(args.device, torch.bfloat16)
            dense_fp32 = dense_bf16.float()
            candidates = {
                "dense_bf16": partial(torch.nn.functional.linear, x, dense_bf16),
                "dense_fp32": partial(torch.nn.functional.linear, x.float(), dense_fp32),
                "luc_dequant_int4": partial(luc[4], x),
                "luc_dequant_int2": partial(luc[2], x),
                **{name: partial(kernel, x) for name, kernel in kernels.items()},
            }
            for name, fn in candidates.items():
                try:
                    with torch.no_grad():
                        seconds = _time(fn, args.repeats, cuda)
                        out = fn().float()
                    if name == "sparse_2_4_bf16":
                        expected = x.float() @ pruned.float().t()
                    elif name.startswith("dense") or name == "luc_dequant_int2":
                        expected = None
                    else:
                        expected = x.float() @ reference.t()
                    error = None
                    if expected is not None:
                        error = ((out - expected).norm() / expected.norm()).item()
                    rows.append(
                        {"shape": shape_name, "phase": phase, "tokens": tokens, "kernel": name, "seconds": seconds}
                        | ({"relative_error": error} if error is not None else {})
                    )
                except Exception as error:
                    rows.append(
                        {
                            "shape": shape_name,
                            "phase": phase,
                            "kernel": name,
                            "error": f"{type(error).__name__}: {error}",
                        }
                    )
        log(f"luc kernels: {shape_name} done")
    return {"model": args.model, "rows": rows}


def part_cost_model(args: argparse.Namespace) -> dict:
    """The calibration at a prompt of 256 tokens, and at 16 (where per-call overheads dominate)."""
    import cost_model

    results = {}
    for tokens in (256, 16) if not args.smoke else (32, 4):
        namespace = argparse.Namespace(tokens=tokens, repeats=5, model=args.model, device=args.device, json=None)
        results[f"tokens_{tokens}"] = cost_model.run(namespace)
    return results


def part_luc_model(args: argparse.Namespace) -> dict:
    """The whole model: dense bf16 against LUC 4-bit through the int4 kernel and through the
    dequantize path: greedy decoding, prefill, and an edge-llm training step over the base."""
    import copy

    from peft import get_peft_model

    from edge_llm import EdgeLLMConfig
    from edge_llm.luc import CompressionMethod, LUCLinear, compress_model

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    dense, _ = load_model(args.model, dtype, args.device)
    dense.eval()
    layers = dense.config.num_hidden_layers
    kernel = copy.deepcopy(dense)
    compress_model(kernel, [(4, 0.0)] * layers, CompressionMethod(64, "rtn", "magnitude"), progress=False)
    dequantize = copy.deepcopy(kernel)
    for module in dequantize.modules():
        if isinstance(module, LUCLinear):
            module.use_kernel = False
    variants = {"dense": dense, "luc4_int4_kernel": kernel, "luc4_dequantize": dequantize}
    vocab = dense.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 16), generator=generator).to(args.device)
    prefill = torch.randint(0, vocab, (1, 256 if not args.smoke else 32), generator=generator).to(args.device)
    batch, seq = (8, 1024) if not args.smoke else (2, 64)
    train = torch.randint(0, vocab, (batch, seq), generator=generator).to(args.device)
    new_tokens = 64 if not args.smoke else 4
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def step(model) -> None:
        with model.exit_at(layers - 1), torch.autocast(args.device, dtype=dtype, enabled=cuda):
            model(input_ids=train, labels=train).loss.backward()
        model.zero_grad(set_to_none=True)

    results: dict[str, dict[str, list[float]]] = {
        n: {"decode_tok_s": [], "prefill_s": [], "step_s": []} for n in variants
    }
    for name, model in variants.items():
        tuned = get_peft_model(
            copy.deepcopy(model),
            EdgeLLMConfig(r=8, target_modules=TARGETS, exit_layers=[layers - 1], backprop_depth=default_depth(layers)),
        )
        with torch.no_grad():
            for round_index in range(4):  # round 0 warms up
                decode = timed(
                    lambda model=model: model.generate(
                        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
                    )
                )
                prefill_s = timed(lambda model=model: model(input_ids=prefill, use_cache=False))
                with torch.enable_grad():
                    step_s = timed(lambda tuned=tuned: step(tuned))
                if round_index:
                    results[name]["decode_tok_s"].append(new_tokens / decode)
                    results[name]["prefill_s"].append(prefill_s)
                    results[name]["step_s"].append(step_s)
        del tuned
        _free()
        log(f"luc model: {name} done")
    return {"model": args.model, "new_tokens": new_tokens, "train_batch": [batch, seq], "results": results}


PARTS = {
    "tuning": part_tuning,
    "luc_kernels": part_luc_kernels,
    "cost_model": part_cost_model,
    "luc_model": part_luc_model,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU: check the code paths")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.device = "cpu" if args.smoke else "cuda"
    args.model = "tiny" if args.smoke else "llama-1b"
    if args.smoke:
        args.repeats = 2
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_suite.py needs a CUDA GPU; use --smoke to check it on a CPU.")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name in args.parts:
        log(f"part {name}")
        try:
            result = PARTS[name](args)
        except Exception as error:
            log(traceback.format_exc())
            result = {"error": f"{type(error).__name__}: {error}"}
        result["machine"] = machine()
        result["seconds"] = time.perf_counter() - started
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
        log(f"part {name} written ({result['seconds']:.0f} s since start)")
    if "tuning" in args.parts:
        print(tuning_table(json.loads((args.out / "tuning.json").read_text())))


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def tuning_table(result: dict) -> str:
    """Markdown: per shape, each method's medians over rounds, and ratios against plain LoRA."""
    if "runs" not in result:
        return f"tuning failed: {result.get('error')}"
    gib = 1024**3
    lines = [
        f"machine: {result['machine']}; model {result['model']}, {result['steps']} steps ({result['warmup']} warm-up)"
    ]
    for shape, by_method in result["runs"].items():
        lora_peak = _median(by_method["lora"], "peak_memory_bytes")
        lora_step = _median(by_method["lora"], "mean_step_s")
        lines += [
            "",
            f"batch x seq = {shape}",
            "",
            "| method | peak memory (GiB) | above the model (GiB) | step (s) | tokens/s | LoRA peak / this "
            "| this speed / LoRA |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, runs in by_method.items():
            peak, above = _median(runs, "peak_memory_bytes"), _median(runs, "training_peak_bytes")
            step, rate = _median(runs, "mean_step_s"), _median(runs, "tokens_per_s")
            if peak is None:
                lines.append(f"| {LABELS[method]} | failed: {runs[0].get('error', '?')[:80]} | | | | | |")
                continue
            lines.append(
                f"| {LABELS[method]} | {peak / gib:.2f} | {above / gib:.2f} | {step:.4f} | {rate:.0f} | "
                f"{lora_peak / peak:.2f}x | {lora_step / step:.2f}x |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
