"""Run by test_faults.py: one save, killed with SIGKILL at the n-th call of a chosen function.

python fault_worker.py bundle|luc|policy OUT fsync|replace|switch|exchange|rmtree N [--no-exchange]
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import shutil

import edge_llm._io as io

POINTS = {
    "fsync": (os, "fsync"),
    "replace": (os, "replace"),
    "exchange": (io, "_exchange"),
    "rmtree": (shutil, "rmtree"),
}


def arm(point: str, n: int, out: Path) -> None:
    """Kill at the n-th call of the point's function; "switch": the n-th rename onto `out`."""
    owner, name = POINTS["replace" if point == "switch" else point]
    original = getattr(owner, name)
    calls = 0

    def killed_at_n(*args, **kwargs):
        nonlocal calls
        calls += point != "switch" or Path(args[1]) == out
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, killed_at_n)


def main() -> None:
    kind, out, point, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    if "--no-exchange" in sys.argv:
        io._exchange = lambda first, second: False  # a system without renameat2
    if kind == "bundle":
        from fault_models import new_bundle_parts

        from edge_llm.export import export

        model, plan = new_bundle_parts(seed=1)
        arm(point, n, out)
        export(model, plan, out, overwrite=True)
    elif kind == "luc":
        from fault_models import new_bundle_parts

        model, _ = new_bundle_parts(seed=1)
        arm(point, n, out)
        model.save_pretrained(out)
    else:
        from edge_llm.luc import CompressionMethod, LUCPolicy

        policy = LUCPolicy([(8, 0.0)] * 4, CompressionMethod(16, "rtn", "magnitude"))
        arm(point, n, out)
        policy.save(out)


main()
