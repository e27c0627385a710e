"""`CompressionMethod`: how LUC compresses weights, whatever each layer's bits and sparsity."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edge_llm.luc.prune import PRUNE_STRUCTURES, PRUNERS
from edge_llm.luc.quantize import QUANTIZERS

# "asymmetric": a zero-point fitted per group; "symmetric": the zero-point is the middle code, the
# grid of runtimes whose kernels take symmetric codes only (ExecuTorch's XNNPACK int4 blocks,
# llama.cpp's Q4_0/Q8_0), which then hold a layer's codes unchanged.
GRIDS = ("asymmetric", "symmetric")


# Longer than any Linear row of a model this runs on (a group spans at most one row).
MAX_GROUP_SIZE = 2**20


@dataclass(frozen=True)
class CompressionMethod:
    """How weights are compressed, whatever the per-layer bits and sparsity.

    - `group_size`: input columns that share a quantization scale and zero-point.
    - `quant_method`: a name in `QUANTIZERS`: `"rtn"` (round to nearest) or `"gptq"` (error
      compensation with the calibration Hessian; slower, better at 2-3 bits), or one registered.
    - `prune_method`: a name in `PRUNERS`: `"wanda"` (|W| x input-channel norm) or `"magnitude"`.
    - `prune_structure`: a name in `PRUNE_STRUCTURES`: `"unstructured"` or `"nm"` (N of every 4,
      e.g. 2:4 at sparsity 0.5).
    - `grid`: `"asymmetric"` (a zero-point per group) or `"symmetric"` (codes centred on the middle
      code, `(q - 2**(bits-1)) * scale`: what symmetric kernels run unchanged, e.g. ExecuTorch's).
    """

    group_size: int = 128
    quant_method: str = "rtn"
    prune_method: str = "wanda"
    prune_structure: str = "unstructured"
    grid: str = "asymmetric"

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}.")
        if self.group_size > MAX_GROUP_SIZE:
            raise ValueError(
                f"group_size {self.group_size} is above {MAX_GROUP_SIZE}: a group longer than any weight row is one "
                "group per row; use at most the row length."
            )
        for name, value, choices in (
            ("quant_method", self.quant_method, tuple(QUANTIZERS)),
            ("prune_method", self.prune_method, tuple(PRUNERS)),
            ("prune_structure", self.prune_structure, tuple(PRUNE_STRUCTURES)),
            ("grid", self.grid, GRIDS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}.")

    @property
    def needs_calibration(self) -> bool:
        """Whether compressing with this method can need calibration data (at some sparsity)."""
        return QUANTIZERS[self.quant_method].needs_hessian or PRUNERS[self.prune_method].needs_calibration

    def needs_calibration_for(self, sparsities: Iterable[float]) -> bool:
        """Whether compressing layers at these sparsities does: Wanda only scores weights it prunes,
        so round-to-nearest without pruning needs no data whatever the prune method."""
        return QUANTIZERS[self.quant_method].needs_hessian or (
            PRUNERS[self.prune_method].needs_calibration and any(s > 0 for s in sparsities)
        )
