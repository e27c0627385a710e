"""Export: a self-describing bundle (schedule, packed weights, adapters, manifest) and its
lowering to GGUF for llama.cpp."""

from edge_llm.export.bundle import export, verify_bundle
from edge_llm.export.gguf import write_gguf

__all__ = ["export", "verify_bundle", "write_gguf"]
