"""Reference executor: run an exported bundle in PyTorch exactly as its schedule says.

Each decoder layer runs with the schedule's kernel — `dequant_int*` (packed weights, dequantized on
every call), `int4_packed` (PyTorch's fused int4 matmul on the layer's codes), `dense_*`
(dequantized once at load into that dtype), `sparse_unstructured` (CSR), `sparse_2_4` (CUDA
semi-structured sparse) — and streamed layers keep no weights in memory: their
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

from edge_llm.export.bundle import verify_bundle
from edge_llm.luc.kernels import Int4Weight, int4_matmul, to_int4
from edge_llm.luc.linear import LUCLinear
from edge_llm.modeling import find_decoder_parts
from edge_llm.scheduling.scheduler import Schedule

logger = logging.getLogger(__name__)


class DenseKernel(nn.Module):
    """A Linear whose weight was dequantized once into `dtype` (`dense_fp32/fp16/bf16`)."""

    def __init__(self, layer: LUCLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.dequantize_weight(dtype), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class Int4Kernel(nn.Module):
    """A LUC layer of at most 4 bits in PyTorch's int4 matmul layout (`int4_packed`); it keeps only
    that layout, not the LUC codes it was built from."""

    def __init__(self, layer: LUCLinear) -> None:
        super().__init__()
        weight = to_int4(layer.codes(), layer.weight_scales, layer.weight_zeros, layer.group_size, layer.bits)
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales_and_zeros", weight.scales_and_zeros)
        self.group_size, self.out_features = weight.group_size, weight.out_features
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = Int4Weight(self.packed, self.scales_and_zeros, self.group_size, self.out_features)
        out = int4_matmul(x, weight)
        return out + self.bias.to(out.dtype) if self.bias is not None else out


class SparseKernel(nn.Module):
    """A Linear stored as a CSR sparse matrix of its kept weights (`sparse_unstructured`)."""

    def __init__(self, layer: LUCLinear) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            self.weight = layer.dequantize_weight(torch.float32).to_sparse_csr()
        self.bias = None if layer.bias is None else layer.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        out = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)


class SemiStructuredKernel(nn.Module):
    """A 2:4 sparse float16 Linear on CUDA sparse tensor cores (`sparse_2_4`)."""

    def __init__(self, layer: LUCLinear) -> None:
        super().__init__()
        if not torch.cuda.is_available():
            raise RuntimeError("The schedule uses the sparse_2_4 kernel, which needs a CUDA GPU; none is available.")
        from torch.sparse import to_sparse_semi_structured

        dense = layer.dequantize_weight(torch.float16).cuda()
        self.weight = nn.Parameter(to_sparse_semi_structured(dense), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().half().cuda(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.half(), self.weight, self.bias).to(x.dtype)


_DTYPES = {"dense_fp32": torch.float32, "dense_fp16": torch.float16, "dense_bf16": torch.bfloat16}


def _kernel_module(layer: LUCLinear, kernel: str) -> nn.Module:
    if kernel.startswith("dequant_int"):
        layer.use_kernel = False  # the schedule's kernel, not the fused one LUCLinear would pick
        return layer
    if kernel == "int4_packed":
        return Int4Kernel(layer)
    if kernel in _DTYPES:
        return DenseKernel(layer, _DTYPES[kernel])
    if kernel == "sparse_unstructured":
        return SparseKernel(layer)
    if kernel == "sparse_2_4":
        return SemiStructuredKernel(layer)
    raise ValueError(f"Unknown kernel {kernel!r} in the schedule.")


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
    layers = list(find_decoder_parts(base).layers(base))
    if len(layers) != len(schedule.layers):
        raise ValueError(f"The schedule plans {len(schedule.layers)} layers but the bundle's model has {len(layers)}.")
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
                _replace_module(model, module, _kernel_module(module, plan.kernel))
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
