"""Small real datasets that ship with edge-llm, so demos and tests need no download."""

from __future__ import annotations

import re
from importlib.resources import files

# The splits every demo, benchmark and example uses: sonnets 1-120, 121-130 and 131-154.
SONNET_SPLITS = {"train": slice(0, 120), "validation": slice(120, 130), "test": slice(130, None)}


def sonnets(split: str | None = None) -> list[str]:
    """Shakespeare's 154 sonnets (public domain), one string each, in order; `split`: only the
    sonnets of "train", "validation" or "test" (`SONNET_SPLITS`)."""
    chosen = _split(split)
    text = files(__package__).joinpath("sonnets.txt").read_text(encoding="utf-8")
    # Each sonnet is headed by its Roman numeral on a line of its own.
    parts = re.split(r"\n\s*[IVXLC]+\s*\n", text)
    return [part.strip() for part in parts[1:] if part.strip()][chosen]


def _split(split: str | None) -> slice:
    """The sonnets of `split` (all for None), the name checked."""
    if split is not None and split not in SONNET_SPLITS:
        raise ValueError(f"split must be one of {', '.join(SONNET_SPLITS)} or None, got {split!r}.")
    return slice(None) if split is None else SONNET_SPLITS[split]


def sonnet_instructions(split: str | None = None) -> list[dict[str, str]]:
    """Instruction/response pairs from the sonnets: given a quatrain, continue with the next one
    (the third quatrain is answered with the closing couplet). Three pairs per sonnet; `split`:
    only those of the sonnets of that split (`SONNET_SPLITS`)."""
    numbered = list(enumerate(sonnets(), start=1))[_split(split)]
    pairs = []
    for number, sonnet in numbered:
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
