"""Small real datasets that ship with edge-llm, so demos and tests need no download."""

from __future__ import annotations

import re
from importlib.resources import files

import torch


def sonnets() -> list[str]:
    """Shakespeare's 154 sonnets (public domain), one string each, in order."""
    text = files(__package__).joinpath("sonnets.txt").read_text(encoding="utf-8")
    # Each sonnet is headed by its Roman numeral on a line of its own.
    parts = re.split(r"\n\s*[IVXLC]+\s*\n", text)
    return [part.strip() for part in parts[1:] if part.strip()]


def byte_tokens(texts: list[str], separator: int = 10) -> torch.Tensor:
    """Encode texts as one stream of UTF-8 byte ids (vocabulary 256), joined by `separator`."""
    stream: list[int] = []
    for text in texts:
        stream.extend(text.encode("utf-8"))
        stream.append(separator)
    return torch.tensor(stream, dtype=torch.long)


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` random windows of `seq_len` tokens from a token stream."""
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def sequential_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows covering the stream (the tail that does not fill one is dropped)."""
    usable = (len(stream) // seq_len) * seq_len
    return stream[:usable].view(-1, seq_len)


def sonnet_instructions() -> list[dict[str, str]]:
    """Instruction/response pairs from the sonnets: given a quatrain, continue with the next one
    (the third quatrain is answered with the closing couplet). Three pairs per sonnet."""
    pairs = []
    for number, sonnet in enumerate(sonnets(), start=1):
        lines = [line.strip() for line in sonnet.splitlines() if line.strip()]
        if len(lines) != 14:  # sonnets 99 (15 lines) and 126 (12 lines) do not fit the pattern
            continue
        for part in range(3):
            given = "\n".join(lines[4 * part : 4 * part + 4])
            follows = "\n".join(lines[4 * part + 4 : 4 * part + 8 if part < 2 else 14])
            pairs.append(
                {
                    "instruction": f"Continue Shakespeare's sonnet {number} after these lines:\n{given}",
                    "response": follows,
                }
            )
    return pairs
