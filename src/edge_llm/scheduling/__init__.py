"""Hardware scheduling: device profiles, a roofline cost model, and an exact scheduler that picks
each layer's kernel and placement (resident or streamed) within the device's memory."""

from edge_llm.scheduling.cost import LayerSpec, ModelSpec, Workload, layer_options
from edge_llm.scheduling.devices import BUILTIN_DEVICES, DeviceProfile, Kernel, builtin_device
from edge_llm.scheduling.measure import profile_this_machine
from edge_llm.scheduling.scheduler import InfeasibleScheduleError, LayerPlan, Schedule, schedule

__all__ = [
    "BUILTIN_DEVICES",
    "DeviceProfile",
    "InfeasibleScheduleError",
    "Kernel",
    "LayerPlan",
    "LayerSpec",
    "ModelSpec",
    "Schedule",
    "Workload",
    "builtin_device",
    "layer_options",
    "profile_this_machine",
    "schedule",
]
