"""`edge-llm demo`: Edge-LLM adaptive layer tuning end to end on a small model and bundled data.

Builds a small Llama-style byte-level model, adds an Edge-LLM adapter, trains it for a few hundred
steps on Shakespeare's sonnets with one exit per step, and reports held-out loss per exit and
voted, and what each exit's step costs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from edge_llm.data import byte_tokens, random_windows, sequential_windows, sonnets
from edge_llm.tuner import EdgeLLMConfig

logger = logging.getLogger(__name__)


@dataclass
class DemoReport:
    model: str
    adapter: str
    trainable_params: int
    total_params: int
    steps: int
    seconds: float
    loss_before: dict[str, float] = field(default_factory=dict)
    loss_after: dict[str, float] = field(default_factory=dict)
    step_ms_by_exit: dict[int, float] = field(default_factory=dict)

    def format(self) -> str:
        lines = [
            f"model:   {self.model}",
            f"adapter: {self.adapter}",
            f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} "
            f"({100 * self.trainable_params / self.total_params:.2f}%)",
            f"trained {self.steps} steps in {self.seconds:.1f} s",
            "",
            f"{'held-out loss (nats/byte)':<28}{'before':>10}{'after':>10}{'step ms':>10}",
        ]
        for name, before in self.loss_before.items():
            layer = int(name.split()[-1]) if name.startswith("exit") else None
            step_ms = f"{self.step_ms_by_exit[layer]:.1f}" if layer in self.step_ms_by_exit else ""
            lines.append(f"{name:<28}{before:>10.3f}{self.loss_after[name]:>10.3f}{step_ms:>10}")
        return "\n".join(lines)


def _held_out_losses(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, float]:
    """Mean next-byte loss of every exit and of the voted prediction on held-out windows."""
    model.eval()
    totals: dict[str, float] = {}
    with torch.no_grad():
        for chunk in windows.split(16):
            out = model(input_ids=chunk, labels=chunk, return_exit_logits=True)
            for layer, logits in out.exit_logits.items():
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), chunk[:, 1:].flatten())
                totals[f"exit {layer}"] = totals.get(f"exit {layer}", 0.0) + loss.item() * len(chunk)
            totals["voted"] = totals.get("voted", 0.0) + out.loss.item() * len(chunk)
    return {name: total / len(windows) for name, total in totals.items()}


def run_demo(steps: int = 240, batch_size: int = 16, seq_len: int = 128, seed: int = 0) -> DemoReport:
    """Run the demo and return its report (the CLI prints it)."""
    torch.manual_seed(seed)
    texts = sonnets()
    train_stream, held_out = byte_tokens(texts[:130]), sequential_windows(byte_tokens(texts[130:]), seq_len)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
    )
    base = LlamaForCausalLM(config)
    base_params = sum(p.numel() for p in base.parameters())
    adapter_config = EdgeLLMConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        backprop_depth=2,
        exit_sampling="round_robin",
        voting="confidence",
    )
    model = get_peft_model(base, adapter_config)
    trainable, total = model.get_nb_trainable_parameters()
    report = DemoReport(
        model=f"Llama-style, {config.num_hidden_layers} layers, hidden {config.hidden_size}, byte vocabulary, "
        f"{base_params:,} params (random init)",
        adapter=f"LoRA r={adapter_config.r} on attention+MLP, exits {model.exit_layers}, "
        f"backprop depth {model.backprop_depth}, voting {adapter_config.voting!r}",
        trainable_params=trainable,
        total_params=total,
        steps=steps,
        seconds=0.0,
    )
    report.loss_before = _held_out_losses(model, held_out)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    step_times: dict[int, list[float]] = {}
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="edge-llm tuning", unit="step"):
        exit_layer = model.exit_for_step(step, steps, seed)
        batch = random_windows(train_stream, batch_size, seq_len, generator)
        tick = time.perf_counter()
        with model.exit_at(exit_layer):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.setdefault(exit_layer, []).append(time.perf_counter() - tick)
        logger.debug("step %d exit %d loss %.3f", step, exit_layer, loss.item())
    report.seconds = time.perf_counter() - start
    report.step_ms_by_exit = {layer: 1000 * sorted(t)[len(t) // 2] for layer, t in sorted(step_times.items())}
    report.loss_after = _held_out_losses(model, held_out)
    return report
