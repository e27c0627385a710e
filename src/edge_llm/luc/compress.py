"""Compress one Linear layer with one (bits, sparsity) setting, and whole models with a policy."""

from __future__ import annotations

import logging

import torch
from torch import nn

from edge_llm.luc.calibration import LayerRunner, input_hessians, iterate, target_linears
from edge_llm.luc.linear import UNQUANTIZED_BITS, LUCLinear
from edge_llm.luc.method import CompressionMethod
from edge_llm.luc.policy import LUCPolicy
from edge_llm.luc.prune import prune_mask
from edge_llm.luc.quantize import QUANTIZERS, GroupQuantized, dequantize
from edge_llm.modeling import find_decoder_parts

logger = logging.getLogger(__name__)


def compress_weight(
    weight: torch.Tensor,
    bits: int,
    sparsity: float,
    method: CompressionMethod,
    hessian: torch.Tensor | None = None,
) -> tuple[GroupQuantized | None, torch.Tensor | None]:
    """Codes (None for 16 bits) and kept-weight mask (None without pruning) of one weight matrix."""
    norms = torch.diag(hessian).clamp_min(0).sqrt() if hessian is not None else None
    mask = prune_mask(weight, sparsity, method.prune_method, method.prune_structure, norms)
    if bits == UNQUANTIZED_BITS:
        return None, mask
    quantizer = QUANTIZERS.lookup(method.quant_method)
    if quantizer.needs_hessian and hessian is None:
        raise ValueError(f"{method.quant_method} quantization needs calibration data (the input Hessian).")
    return quantizer.quantize(weight, bits, method.group_size, mask, method.grid == "symmetric", hessian), mask


def compressed_dense_weight(
    weight: torch.Tensor,
    bits: int,
    sparsity: float,
    method: CompressionMethod,
    hessian: torch.Tensor | None = None,
) -> torch.Tensor:
    """What `weight` becomes after compression, as a dense tensor of its dtype (for profiling)."""
    quantized, mask = compress_weight(weight, bits, sparsity, method, hessian)
    if quantized is None:
        dense = weight.half().to(weight.dtype)
        return dense if mask is None else dense * mask
    restored = dequantize(quantized.codes, quantized.scales, quantized.zeros, method.group_size, mask)
    return restored.to(weight.dtype)


@torch.no_grad()
def compress_layers(
    model: nn.Module,
    settings: list[tuple[int, float]],
    method: CompressionMethod,
    calibration: torch.Tensor | None = None,
    targets: list[str] | None = None,
    progress: bool = True,
) -> LUCPolicy:
    """Replace the Linear layers of every decoder layer `l` by `LUCLinear`s with `settings[l]`;
    returns the policy applied.

    With calibration tokens, layers are compressed in order and each is calibrated on the outputs
    of the already-compressed layers below it (as GPTQ does). `edge_llm.luc.compress_model` also
    records the policy in the model's config, so that `save_pretrained` writes a LUC checkpoint.
    """
    runner = None
    if method.needs_calibration_for(sparsity for _, sparsity in settings):
        if calibration is None:
            raise ValueError(
                f"{method.quant_method}/{method.prune_method} compression needs calibration data; "
                "use quant_method='rtn' and prune_method='magnitude' to compress without any."
            )
        runner = LayerRunner(model, calibration)
        layers = runner.layers
    else:
        layers = list(find_decoder_parts(model).layers(model))
    if len(settings) != len(layers):
        raise ValueError(
            f"The policy has {len(settings)} layer settings but the model has {len(layers)} decoder layers."
        )
    for index in iterate(range(len(layers)), len(layers), "LUC compress", progress):
        compress_layer(runner, layers, index, settings[index], method, targets)
    return LUCPolicy(list(settings), method, targets)


@torch.no_grad()
def compress_layer(
    runner: LayerRunner | None,
    layers: nn.ModuleList | list[nn.Module],
    index: int,
    setting: tuple[int, float],
    method: CompressionMethod,
    targets: list[str] | None,
) -> None:
    """Replace the target Linears of decoder layer `index` by `LUCLinear`s with `setting`; with a
    runner, calibrated on what the layer receives now, and its output passed on to the next layer."""
    bits, sparsity = setting
    linears = target_linears(layers[index], targets)
    hessians = input_hessians(runner, index, linears) if runner is not None else {}
    for name, linear in linears.items():
        quantized, mask = compress_weight(linear.weight, bits, sparsity, method, hessians.get(name))
        compressed = LUCLinear.from_linear(linear, bits, sparsity, method.group_size, quantized, mask)
        layers[index].set_submodule(name, compressed)
    if runner is not None:
        runner.advance(index)
