"""Turn what a user points at — a local JSON/JSONL/CSV/parquet/text file, a `datasets` name, or
`sonnets` (bundled) — into training and calibration data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_llm.data import sonnet_instructions, sonnets

DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
PROMPT_FIELDS = (("instruction", "response"), ("prompt", "completion"), ("question", "answer"))


def load_rows(spec: str, split: str = "train") -> Any:  # -> datasets.Dataset
    """Rows from a file path, a Hub dataset name, `sonnets` or `sonnet-instructions` (bundled)."""
    from datasets import Dataset, load_dataset

    if spec == "sonnets":
        return Dataset.from_dict({"text": sonnets()})
    if spec == "sonnet-instructions":
        return Dataset.from_list(sonnet_instructions())
    path = Path(spec)
    if path.suffix in DATA_FORMATS:
        if not path.exists():
            raise FileNotFoundError(f"Data file {spec} does not exist.")
        return load_dataset(DATA_FORMATS[path.suffix], data_files=str(path), split="train")
    if path.exists():
        raise ValueError(f"Cannot read {spec}: use a .json, .jsonl, .csv, .parquet or .txt file.")
    return load_dataset(spec, split=split)


def _prompt_fields(columns: list[str]) -> tuple[str, str] | None:
    return next(((p, r) for p, r in PROMPT_FIELDS if p in columns and r in columns), None)


def texts_of(rows: Any) -> list[str]:
    """Plain texts of rows: the `text` column, or prompt + response joined."""
    columns = rows.column_names
    if "text" in columns:
        return [t for t in rows["text"] if t]
    fields = _prompt_fields(columns)
    if fields is None:
        raise ValueError(f"Data needs a 'text' column or prompt/response columns {PROMPT_FIELDS}; it has {columns}.")
    return [f"{p}\n{r}" for p, r in zip(rows[fields[0]], rows[fields[1]], strict=True)]


def training_dataset(rows: Any, tokenizer: Any, seq_len: int) -> Any:  # -> datasets.Dataset
    """Token rows for causal-LM training: prompt/response rows keep the loss on the response only;
    text rows are joined and cut into `seq_len` windows."""
    from datasets import Dataset

    fields = _prompt_fields(rows.column_names)
    if fields is not None:
        prompt_field, response_field = fields
        eos = tokenizer.eos_token or ""

        def tokenize(row: dict[str, Any]) -> dict[str, list[int]]:
            prompt = tokenizer(row[prompt_field] + "\n")["input_ids"]
            response = tokenizer(row[response_field] + eos)["input_ids"]
            ids = (prompt + response)[:seq_len]
            return {"input_ids": ids, "labels": ([-100] * len(prompt) + response)[:seq_len]}

        tokenized = rows.map(tokenize, remove_columns=rows.column_names)
        # A prompt as long as seq_len leaves nothing to learn from: drop such rows.
        kept = tokenized.filter(lambda row: any(label != -100 for label in row["labels"]))
        if len(kept) == 0:
            raise ValueError(f"seq_len={seq_len} cuts off every response after its prompt; use a longer --seq-len.")
        return kept
    stream: list[int] = []
    for text in texts_of(rows):
        stream.extend(tokenizer(text)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    windows = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not windows:
        raise ValueError(f"The data has {len(stream)} tokens, fewer than one window of seq_len={seq_len}.")
    return Dataset.from_dict({"input_ids": windows, "labels": windows})
