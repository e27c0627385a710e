"""Reference executor: run an exported bundle in PyTorch exactly as its schedule says.

Each decoder layer runs with the module of the schedule's kernel (the registry in
`edge_llm.scheduling.kernels`: `dequant_int*` dequantizes the packed weights at every call,
`int4_packed` runs PyTorch's fused int4 matmul on the layer's codes, `dense_*` dequantized once at
load into that dtype, `sparse_unstructured` CSR, `sparse_2_4` CUDA semi-structured sparse), and
streamed layers keep no weights in memory: their
packed tensors are read from the bundle's safetensors file when the layer runs and dropped after.
Exits and voting come from the bundle's Edge-LLM adapter. This proves a schedule runnable and
gives the logits an edge runtime should reproduce; it is not a fast runtime.

Loading goes through `from_pretrained` (the LUC checkpoint path), so all weights pass through
memory once while loading; the schedule's memory budget applies from then on.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from edge_llm.export.bundle import check_schedule_matches, verify_bundle
from edge_llm.luc.linear import LUCLinear
from edge_llm.modeling import find_decoder_parts
from edge_llm.scheduling.kernels import kernel_type
from edge_llm.scheduling.scheduler import Schedule

logger = logging.getLogger(__name__)


class BundleModel(nn.Module):
    """A bundle loaded for execution: call it like the transformers/PEFT model it wraps."""

    def __init__(self, model: nn.Module, schedule: Schedule, manifest: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.manifest = manifest

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(*args, **kwargs)


def load_bundle(path: str | Path, dtype: torch.dtype | None = None) -> BundleModel:
    """Verify a bundle and build its model with the schedule's kernels and placements.

    `dtype`: what the model computes in (default: the dtype its weights were stored in).
    """
    root = Path(path)
    manifest = verify_bundle(root)
    schedule = Schedule.load(root / "schedule.json")
    base = AutoModelForCausalLM.from_pretrained(root, dtype=dtype or "auto")
    base.eval()
    check_schedule_matches(
        base, schedule, fix=f"{root / 'schedule.json'} is not this bundle's schedule; export it again"
    )
    layers = list(find_decoder_parts(base).layers(base))
    names = {id(module): name for name, module in base.named_modules()}
    model = _attach_adapter(base, root, manifest)
    for plan, layer in zip(schedule.layers, layers, strict=True):
        compressed = [(module, names[id(module)]) for module in layer.modules() if isinstance(module, LUCLinear)]
        if plan.placement == "streamed":
            for module, _ in compressed:
                module.use_kernel = False  # re-read every pass: dequantized, as the cost model plans
            _stream_from_file(layer, compressed, root / "model.safetensors")
        else:
            for module, _ in compressed:
                _replace_module(model, module, kernel_type(plan.kernel).module(module))
    return BundleModel(model, schedule, manifest).eval()


def _attach_adapter(base: nn.Module, root: Path, manifest: dict[str, Any]) -> nn.Module:
    if manifest.get("adapter") is None:
        return base
    from peft import PeftModel

    adapter_dir = root / "adapter"
    if manifest["adapter"]["merged"]:
        # The LoRA deltas are already in the weights; the adapter holds only the exit heads. Zero-
        # initialised LoRA weights (the missing ones) add nothing.
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        if config.get("init_lora_weights") is not True:
            raise ValueError("A merged bundle's adapter must have init_lora_weights=true; the bundle is inconsistent.")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            return PeftModel.from_pretrained(base, adapter_dir)
    return PeftModel.from_pretrained(base, adapter_dir)


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    if new is old:
        return
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is old:
                setattr(parent, child_name, new)
                return
    raise ValueError("Module to replace not found.")


def _stream_from_file(layer: nn.Module, compressed: list[tuple[LUCLinear, str]], file: Path) -> None:
    """Drop the layer's packed weights and read them from `file` around each of its forward passes."""
    handle = safe_open(str(file), framework="pt")
    buffers = [(module, name, key) for module, name in compressed for key, _ in module.named_buffers(recurse=False)]

    def release() -> None:
        for module, _, key in buffers:
            setattr(module, key, torch.empty(0, dtype=getattr(module, key).dtype))

    def load(_module: nn.Module, _args: tuple) -> None:
        for module, name, key in buffers:
            setattr(module, key, handle.get_tensor(f"{name}.{key}"))

    def drop(_module: nn.Module, _args: tuple, _output: Any) -> None:
        release()

    release()
    layer.register_forward_pre_hook(load)
    layer.register_forward_hook(drop, always_call=True)
    layer._edge_llm_stream_handle = handle  # keeps the memory-mapped file open with the layer
