"""Export: a self-describing bundle (schedule, packed weights, adapters, manifest) and its
lowering for edge runtimes: GGUF for llama.cpp, a `.pte` program for ExecuTorch (`EXPORT_TARGETS`);
and `load_gguf`, a GGUF file back as a model holding its blocks (the base to tune an adapter on).

`edge_llm.export` is this package and is also callable: `edge_llm.export(model, schedule, out)`
is `edge_llm.export.bundle.export(...)`, while `edge_llm.export.gguf` and the other submodules
stay reachable as attributes (a plain function bound to that name would hide them).
"""

import sys
import types
from typing import Any

from edge_llm.export.bundle import export, verify_bundle
from edge_llm.export.executorch import write_pte
from edge_llm.export.gguf import write_gguf
from edge_llm.export.gguf_load import load_gguf
from edge_llm.export.targets import EXPORT_TARGETS

__all__ = ["EXPORT_TARGETS", "export", "load_gguf", "verify_bundle", "write_gguf", "write_pte"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
