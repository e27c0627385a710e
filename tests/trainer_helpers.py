"""Shared by the trainer tests and the DDP worker script they launch."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import get_peft_model
from tiny_models import tiny_model
from transformers import TrainingArguments

from edge_llm import EdgeLLMConfig

CYCLE = torch.tensor([5, 17, 42, 77, 23, 64])


def counting_dataset(rows: int = 64, length: int = 16, seed: int = 0) -> Dataset:
    """Sequences that walk a fixed cycle of 6 tokens from a random phase: easy to learn."""
    phases = torch.randint(0, len(CYCLE), (rows, 1), generator=torch.Generator().manual_seed(seed))
    ids = CYCLE[(phases + torch.arange(length)) % len(CYCLE)].tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def edge_model(**config):
    config.setdefault("exit_layers", [3, 7])
    config.setdefault("backprop_depth", 2)
    return get_peft_model(tiny_model("llama", 8), EdgeLLMConfig(r=4, target_modules=["q_proj", "v_proj"], **config))


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=7,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
