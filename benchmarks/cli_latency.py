"""How long the `edge-llm` command takes to answer `--help` and argument mistakes.

Runs each command line in a fresh interpreter, for every variant in interleaved rounds, and prints
the median [min-max] wall-clock seconds. A variant is LABEL=SRC:MODULE:FUNCTION: the `src` folder to
import edge-llm from and the console entry point, so an older checkout can be compared with this one:

    git worktree add /tmp/before <commit>
    python benchmarks/cli_latency.py --variant before=/tmp/before/src:edge_llm.cli:main \\
        --variant after=src:edge_llm_cli:main
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, spread

COMMANDS = {
    "edge-llm --help": ["--help"],
    "missing model folder": ["compress", "./missing-model", "--out", "out"],
    "missing data file": ["tune", "smollm2", "--data", "./none.jsonl", "--out", "out"],
    "unknown task": ["evaluate", "smollm2", "--task", "arc_hard"],
    "nothing to evaluate": ["evaluate", "smollm2"],
}


def seconds(src: str, entry: str, argv: list[str], cwd: str) -> float:
    module, function = entry.split(":")
    code = f"import sys; from {module} import {function} as main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, help="LABEL=SRC:MODULE:FUNCTION")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    variants = {label: spec.split(":", 1) for label, spec in (v.split("=", 1) for v in args.variant)}
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(args.rounds):
            for name, argv in COMMANDS.items():
                for label, (src, entry) in variants.items():
                    times.setdefault((name, label), []).append(seconds(src, entry, argv, cwd))
    print(f"machine: {machine()}; {args.rounds} interleaved rounds, seconds, median [min-max]\n")
    print("| command | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for name in COMMANDS:
        cells = []
        for label in variants:
            values = times[(name, label)]
            cells.append(spread(values))
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
