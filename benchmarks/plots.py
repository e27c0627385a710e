"""Figures for docs/results.md from the JSON the benchmark scripts write (benchmarks/results/).

    python benchmarks/plots.py          # writes docs/images/*.png

Each figure names the machine its numbers came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "images"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def luc_tradeoff(data: dict) -> None:
    """Held-out perplexity against decoder weight size: uniform settings vs LUC at equal bytes."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, marker in (("uniform", "o"), ("LUC", "s")):
        points = [
            (row["bytes"] / 2**20, row["perplexity"], name)
            for name, row in data["rows"].items()
            if name.startswith(kind)
        ]
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=kind, s=40)
    original = data["rows"].get("original (16-bit)")
    if original:
        ax.axhline(original["perplexity"], color="gray", linestyle="--", label="original (16-bit)")
    ax.set_xlabel("decoder weights (MiB)")
    ax.set_ylabel("held-out perplexity (sonnets 131-154, log scale)")
    ax.set_yscale("log")  # one uniform setting collapses by orders of magnitude
    ax.set_title("SmolLM2-135M: LUC vs one uniform setting", fontsize=10)
    ax.legend()
    fig.text(0.01, 0.01, f"machine: {data['machine']}", fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(IMAGES / "luc_tradeoff.png", dpi=120)
    plt.close(fig)


def luc_policy(data: dict) -> None:
    """Bits and sparsity LUC chose per layer at one budget."""
    name = next((n for n in data["rows"] if n.startswith("LUC") and "3-bit/25%" in n), None)
    if name is None:
        return
    policy = data["rows"][name]["policy"]
    layers = range(len(policy))
    fig, ax = plt.subplots(figsize=(7.2, 3.4))
    ax.bar(layers, [b for b, _ in policy], color="tab:blue", label="bits")
    ax2 = ax.twinx()
    ax2.plot(layers, [s for _, s in policy], color="tab:red", marker=".", label="sparsity")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("bits")
    ax2.set_ylabel("sparsity")
    ax2.set_ylim(0, 1)
    ax.set_title(f"SmolLM2-135M, {name}", fontsize=9)
    fig.text(0.01, 0.01, f"machine: {data['machine']}", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(IMAGES / "luc_policy.png", dpi=120)
    plt.close(fig)


def tuning_memory(runs: dict[str, dict]) -> None:
    """Training memory and step time, full-depth LoRA vs edge-llm, per setting."""
    labels, lora_mem, edge_mem, lora_time, edge_time = [], [], [], [], []
    for label, data in runs.items():
        labels.append(label)
        lora_mem.append(data["lora"]["training_peak_bytes"] / 2**30)
        edge_mem.append(data["edge"]["training_peak_bytes"] / 2**30)
        lora_time.append(data["lora"]["mean_step_s"])
        edge_time.append(data["edge"]["mean_step_s"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.6))
    x = range(len(labels))
    for axis, lora, edge, unit in (
        (left, lora_mem, edge_mem, "training memory above the model (GiB)"),
        (right, lora_time, edge_time, "mean step over an exit cycle (s)"),
    ):
        axis.bar([i - 0.2 for i in x], lora, 0.4, label="LoRA (full depth)")
        axis.bar([i + 0.2 for i in x], edge, 0.4, label="edge-llm")
        axis.set_xticks(list(x), labels, fontsize=7)
        axis.set_ylabel(unit, fontsize=8)
    left.legend(fontsize=7)
    machine = next(iter(runs.values()))["machine"]
    fig.text(0.01, 0.01, f"machine: {machine}", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(IMAGES / "tuning_cost.png", dpi=120)
    plt.close(fig)


def exit_losses(data: dict) -> None:
    """Held-out loss of every exit and of the vote (SmolLM2 quality run)."""
    edge = data["edge"]
    items = sorted(((int(k.split("_")[2]), v) for k, v in edge["exit_losses"].items()))
    names = [f"exit {layer}" for layer, _ in items] + ["voted", "LoRA"]
    values = [v for _, v in items] + [edge["held_out_loss"], data["lora"]["held_out_loss"]]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar(names, values, color=["tab:gray"] * len(items) + ["tab:green", "tab:blue"])
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("SmolLM2-135M on the sonnets: exits, vote and full-depth LoRA", fontsize=9)
    fig.text(0.01, 0.01, f"machine: {data['machine']}", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(IMAGES / "exit_losses.png", dpi=120)
    plt.close(fig)


TASK_LABELS = {
    "original": "original",
    "lora": "LoRA (full depth)",
    "edge": "edge-llm tuning",
    "edge+luc": "LUC + edge-llm",
}


def _voted(result: dict) -> float:
    accuracy = result["accuracy"]
    return accuracy.get("voted_weighted", accuracy.get("model"))


def task_accuracy(data: dict) -> None:
    """SciQ: accuracy against peak training memory per method, and per-exit / per-rule accuracy."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in TASK_LABELS.items():
        result = data.get(key)
        if not result:
            continue
        memory = result.get("peak_memory_bytes")
        if memory is None:  # the untuned model does not train: draw it as a reference line
            left.axhline(_voted(result), color="gray", linestyle="--", label=f"{label} (no training)")
            continue
        left.scatter(memory / 2**30, _voted(result), s=50, label=label)
    left.set_xlabel("peak memory while training (GiB, RSS)")
    left.set_ylabel("SciQ accuracy (voted)")
    left.legend(fontsize=8)
    names = [k for k in data["edge"]["accuracy"] if k.startswith("exit_")]
    names = sorted(names, key=lambda n: int(n.split("_")[1])) + sorted(
        k for k in data["edge"]["accuracy"] if k.startswith("voted_")
    )
    width = 0.4
    for offset, key in ((-width / 2, "edge"), (width / 2, "edge+luc")):
        if key in data:
            values = [data[key]["accuracy"][n] for n in names]
            right.bar([i + offset for i in range(len(names))], values, width, label=TASK_LABELS[key])
    right.axhline(_voted(data["lora"]), color="tab:blue", linestyle=":", label="LoRA (full depth)")
    right.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=30, fontsize=8)
    right.set_ylabel("SciQ accuracy")
    right.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M adapted to SciQ", fontsize=10)
    fig.text(0.01, 0.01, f"machine: {data['machine']}", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(IMAGES / "task_accuracy.png", dpi=120)
    plt.close(fig)


def vs_llamacpp(data: dict) -> None:
    """Perplexity in llama.cpp against GGUF size: llama.cpp's mixes (plain, with an importance
    matrix) and LUC for llama.cpp (measured, structural) at the same file sizes."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {
        "llama.cpp": ("o", "llama-quantize"),
        "llama.cpp + imatrix": ("^", "llama-quantize + imatrix"),
        "LUC fisher": ("s", "LUC (measured)"),
        "LUC fisher, no Q4_1": ("P", "LUC (measured, without Q4_1)"),
        "LUC structural": ("D", "LUC (structural rule)"),
    }
    dense = next((row for row in data["rows"].values() if row["kind"] == "dense"), None)
    for ax, text in zip(axes, ("sonnets", "lambada"), strict=True):
        for kind, (marker, label) in styles.items():
            points = sorted(
                (row["bytes"] / 2**20, row[f"ppl_{text}"]) for row in data["rows"].values() if row["kind"] == kind
            )
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
        if dense:
            ax.axhline(dense[f"ppl_{text}"], color="gray", linestyle="--", label="F16")
        ax.set_xlabel("GGUF file (MiB)")
        ax.set_ylabel(f"perplexity in llama.cpp, {text}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M in llama.cpp; {data['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(IMAGES / "vs_llamacpp.png", dpi=120)
    plt.close(fig)


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    luc = _load("luc_smollm2.json")
    if luc:
        luc_tradeoff(luc)
        luc_policy(luc)
    runs = {
        name: _load(f"tuning_{key}.json")
        for name, key in (
            ("tiny, B=16, T=512", "tiny_b16_s512"),
            ("tiny, B=1, T=128", "tiny_b1_s128"),
            ("SmolLM2, B=4, T=256", "smollm2_b4_s256"),
        )
    }
    runs = {k: v for k, v in runs.items() if v}
    if runs:
        tuning_memory(runs)
    quality = _load("tuning_smollm2_b4_s256.json")
    if quality:
        exit_losses(quality)
    task = _load("task_sciq.json")
    if task:
        task_accuracy(task)
    gguf = _load("vs_llamacpp_smollm2.json")
    if gguf:
        vs_llamacpp(gguf)
    print(f"figures in {IMAGES}")


if __name__ == "__main__":
    main()
