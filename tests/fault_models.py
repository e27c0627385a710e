"""A small compressed model and its schedule, for the fault tests and their worker process."""

from tiny_models import tiny_model

from edge_llm.luc import CompressionMethod, compress_model
from edge_llm.scheduling import DeviceProfile, Kernel, Workload, schedule


def new_bundle_parts(seed: int):
    model = tiny_model("llama", 4, seed=seed)
    compress_model(model, [(4, 0.0)] * 4, CompressionMethod(16, "rtn", "magnitude"), progress=False)
    kernels = {"dense_fp32": Kernel(5e10), "dequant_int4": Kernel(5e10, dequant_per_s=1e9)}
    device = DeviceProfile("test cpu", 10**9, 2e10, 1e9, 1e10, kernels, "synthetic")
    return model, schedule(model, device, Workload(prompt_tokens=8, decode_tokens=4))
