"""On-device profiler: measure, fit a cost model, choose a LoRA plan; device profiles.

Stable API for other parts (trainer CLI, fleet agent/aggregator, simulator, LEGEND):
`load_profile`, `save_profile`, `declared_profiles`, `choose_plan`, `CostModel.predict`,
`CostModel.per_block`, `predict_on_device`.
"""

from edge_runtime.profiler.chooser import NoPlanFitsError, choose_plan, search_plan
from edge_runtime.profiler.cost_model import CostModel, ModelShape, Prediction, Workload
from edge_runtime.profiler.profile_io import (
    DeviceProfile,
    ProfileError,
    load_profile,
    save_profile,
)

__all__ = [
    "CostModel",
    "DeviceProfile",
    "ModelShape",
    "NoPlanFitsError",
    "Prediction",
    "ProfileError",
    "Workload",
    "choose_plan",
    "load_profile",
    "save_profile",
    "search_plan",
]
