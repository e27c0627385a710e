"""edge-llm: adapt LLMs on devices with little memory and compute (Edge-LLM, Yu et al., DAC 2024).

Importing the package registers its Hugging Face integrations: the `EDGE_LLM` PEFT method and the
`edge_llm_luc` quantization method of transformers.
"""

# `edge_llm.export` is the export package, callable as `edge_llm.export(model, schedule, out_dir)`.
from edge_llm import export
from edge_llm._memory import limit_allocator_reserve
from edge_llm._version import __version__
from edge_llm.luc import LUCConfig, LUCPolicy, LUCQuantizer, policy_of
from edge_llm.modeling import UnsupportedModelError, find_decoder_parts
from edge_llm.trainer import EdgeTrainer
from edge_llm.tuner import EdgeLLMConfig, EdgeLLMModel, edge_config_of
from edge_llm.tuner.loss import enable_chunked_loss
from edge_llm.tuner.voting import vote

__all__ = [
    "EdgeLLMConfig",
    "EdgeLLMModel",
    "EdgeTrainer",
    "LUCConfig",
    "LUCPolicy",
    "LUCQuantizer",
    "UnsupportedModelError",
    "__version__",
    "edge_config_of",
    "enable_chunked_loss",
    "export",
    "find_decoder_parts",
    "limit_allocator_reserve",
    "policy_of",
    "vote",
]
