"""The kernels a schedule can give a layer: one registry that every part of edge-llm reads.

A kernel is one way to run a decoder layer's compressed Linears on a device. Its entry says
which layers it can run, the bytes their weights take in the format it computes from, the share
of a dense matmul's arithmetic it does, whether it expands packed weights on every call, whether
its weights can stay on storage and be read at each pass, and the module the reference executor
(`edge_llm.runtime`) runs. Device profiles name their kernels from here (a profile gives each its
measured rates), the cost model prices them from here, the JSON schemas take their names from
here, and `load_bundle` builds their modules from here. A new kernel is one `register(...)`
call, plus its rates in the device profiles that have it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edge_llm._registry import Registry
from edge_llm.luc.kernels import Int4Weight, int4_fits, int4_matmul, planes_for
from edge_llm.luc.linear import UNQUANTIZED_BITS, LUCLinear
from edge_llm.scheduling.spec import LayerSpec

FP16_BYTES = 2
logger = logging.getLogger(__name__)


def _dequantize_per_call(layer: LUCLinear) -> nn.Module:
    layer.use_kernel = False  # the schedule's kernel, not the fused one LUCLinear would pick
    return layer


class DenseKernel(nn.Module):
    """A Linear whose weight was dequantized once into `dtype` (`dense_fp32/fp16/bf16`)."""

    def __init__(self, layer: LUCLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.dequantize_weight(dtype), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class Int4Kernel(nn.Module):
    """A LUC layer in PyTorch's int4 matmul layout (`int4_packed`); it keeps only that layout, not
    the LUC codes it was built from.

    A pruned layer with a group whose zero-point lies outside the code range (its kept weights
    share one sign and sit far from zero) has no code for its pruned weights: that layer keeps its
    LUC tensors and dequantizes at every call instead, with a warning."""

    def __init__(self, layer: LUCLinear) -> None:
        super().__init__()
        weight = layer.int4_layout()
        self.fallback = None
        if weight is None:
            logger.warning(
                "%s: a pruned group's zero-point lies outside the int4 code range; this layer dequantizes at "
                "every call instead of running the int4_packed kernel.",
                layer,
            )
            self.fallback = _dequantize_per_call(layer)
            return
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales_and_zeros", weight.scales_and_zeros)
        self.group_size, self.out_features, self.planes = weight.group_size, weight.out_features, weight.planes
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback(x)
        weight = Int4Weight(self.packed, self.scales_and_zeros, self.group_size, self.out_features, self.planes)
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


@dataclass(frozen=True)
class KernelType:
    """One kernel (see the module docstring). Functions of a `LayerSpec` describe what it does
    with that layer; `module` builds what runs one of the layer's `LUCLinear`s."""

    name: str
    description: str
    fits: Callable[[LayerSpec], bool]
    storage_bytes: Callable[[LayerSpec], int]
    module: Callable[[LUCLinear], nn.Module]
    work: Callable[[LayerSpec], float] = lambda layer: 1.0
    dequantizes: bool = False
    streamable: Callable[[LayerSpec], bool] = lambda layer: False


KERNELS: Registry[KernelType] = Registry("kernel")
register = KERNELS.register
kernel_type = KERNELS.lookup


def with_kernel_names(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema whose `$defs/kernel` lists the registered kernel names (the schema files
    leave the list to this registry)."""
    schema["$defs"]["kernel"]["enum"] = list(KERNELS)
    return schema


def _dense(name: str, dtype: torch.dtype, element_bytes: int) -> None:
    register(
        KernelType(
            name,
            f"weights dequantized once at load into {dtype}, dense matmul",
            fits=lambda layer: True,
            storage_bytes=lambda layer: layer.params * element_bytes,
            module=lambda linear: DenseKernel(linear, dtype),
            # An unquantized layer is stored as dense float16 values: streaming reads that format.
            streamable=lambda layer: layer.bits == UNQUANTIZED_BITS,
        )
    )


def _dequant(bits: int) -> None:
    register(
        KernelType(
            f"dequant_int{bits}",
            f"{bits}-bit packed LUC weights, dequantized at every call",
            fits=lambda layer: layer.bits == bits,
            storage_bytes=lambda layer: layer.packed_bytes(),
            module=_dequantize_per_call,
            dequantizes=True,
            streamable=lambda layer: True,  # computes from the stored format itself
        )
    )


def _int4_bytes(layer: LayerSpec) -> int:
    """Codes at half a byte per 4-bit plane, a bfloat16 scale and offset per group and plane."""
    planes = planes_for(layer.bits)
    return sum(planes * (o * i // 2 + o * -(-i // layer.group_size) * 2 * FP16_BYTES) for o, i in layer.linears)


_dense("dense_fp32", torch.float32, 4)
_dense("dense_fp16", torch.float16, FP16_BYTES)
_dense("dense_bf16", torch.bfloat16, FP16_BYTES)
for _bits in range(2, 9):
    _dequant(_bits)
register(
    KernelType(
        "int4_packed",
        "LUC codes (2-8 bits, pruned or not) in PyTorch's fused int4 matmul layout; 5-8 bits as two 4-bit planes",
        fits=lambda layer: (
            layer.bits != UNQUANTIZED_BITS
            and layer.stored_bytes is None  # LUC's codes, not llama.cpp's blocks
            and all(int4_fits(layer.bits, layer.group_size, i, o) for o, i in layer.linears)
        ),
        storage_bytes=_int4_bytes,
        module=Int4Kernel,
        work=lambda layer: planes_for(layer.bits),  # two planes: an inner dimension twice as long
    )
)
register(
    KernelType(
        "sparse_2_4",
        "2:4 semi-structured sparse float16 weights on CUDA sparse tensor cores",
        fits=lambda layer: layer.structure == "nm" and abs(layer.sparsity - 0.5) < 1e-9,
        # half the values plus 2-bit indices of the kept half
        storage_bytes=lambda layer: layer.params // 2 * FP16_BYTES + layer.params // 8,
        module=SemiStructuredKernel,
        work=lambda layer: 0.5,
    )
)
register(
    KernelType(
        "sparse_unstructured",
        "kept weights as a float16 CSR sparse matrix",
        fits=lambda layer: layer.sparsity > 0,
        # values, column indices, row pointers
        storage_bytes=lambda layer: (
            round(layer.params * (1 - layer.sparsity)) * (FP16_BYTES + 4) + sum(o for o, _ in layer.linears) * 4
        ),
        module=SparseKernel,
        work=lambda layer: 1 - layer.sparsity,
    )
)
