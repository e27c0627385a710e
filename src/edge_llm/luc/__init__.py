"""LUC, layer-wise unified compression: per-layer bit-width and pruning sparsity from a measured
sensitivity profile, applied for real (packed low-bit weights, compact pruning masks).

Pieces, in the order they run: `method` (`CompressionMethod`), `calibration` (tokens,
layer-by-layer runner), `profile` (sensitivity), `policy` (exact search under a budget), `prune` +
`quantize` + `compress` (applying a policy), `linear` + `kernels` (`LUCLinear`, the stored format,
and how it computes), `checks` (a checkpoint against its policy), and the Hugging Face glue along
transformers' own seams: `config` (`LUCConfig`), `quantizer` (`LUCHfQuantizer`, hooks only),
`integration` (the module surgery: `compress_model`, `apply_luc`, `policy_of`), `optimum`
(`LUCQuantizer`); `lora` (LoRA adapters over `LUCLinear`). For llama.cpp (`target="gguf"`):
`ggml` (its block types), `gguf_policy` (one type per tensor under a byte budget), `gguf_speed`
(llama.cpp's measured speed per type).
"""

from edge_llm.luc.calibration import calibration_tokens
from edge_llm.luc.config import LUCConfig
from edge_llm.luc.facts import policy_of
from edge_llm.luc.gguf_speed import GGUFSpeedProfile, measure_gguf_speed
from edge_llm.luc.integration import apply_luc, compress_model
from edge_llm.luc.linear import LUCLinear
from edge_llm.luc.method import CompressionMethod
from edge_llm.luc.optimum import LUCQuantizer
from edge_llm.luc.policy import Budget, LUCPolicy, search_policy
from edge_llm.luc.profile import SensitivityProfile, profile_sensitivity
from edge_llm.luc.quantizer import LUCHfQuantizer, register

register()

__all__ = [
    "Budget",
    "CompressionMethod",
    "GGUFSpeedProfile",
    "LUCConfig",
    "LUCHfQuantizer",
    "LUCLinear",
    "LUCPolicy",
    "LUCQuantizer",
    "SensitivityProfile",
    "apply_luc",
    "calibration_tokens",
    "compress_model",
    "measure_gguf_speed",
    "policy_of",
    "profile_sensitivity",
    "search_policy",
]
