"""The reference executor: run an exported bundle in PyTorch exactly as its schedule says
(`executor.py`); the modules of each kernel live in the kernel registry
(`edge_llm.scheduling.kernels`)."""

from edge_llm.runtime.executor import BundleModel, load_bundle
from edge_llm.scheduling.kernels import DenseKernel, Int4Kernel, SemiStructuredKernel, SparseKernel

__all__ = ["BundleModel", "DenseKernel", "Int4Kernel", "SemiStructuredKernel", "SparseKernel", "load_bundle"]
