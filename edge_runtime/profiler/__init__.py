"""On-device profiler: measure, fit a cost model, choose a LoRA plan; device profiles.

Stable API for other parts (trainer CLI, fleet agent/aggregator, simulator, LEGEND):
- `load_profile(path) -> DeviceProfile`, `save_profile(profile, path)`;
- `declared_profiles() -> {name: DeviceProfile}` (profiles/*.json);
- `choose_plan(cost, budget_mb, deadline_s, steps_per_round, n_layers, targets,
  rank_choices) -> LoRAPlan` (`NoPlanFitsError` says what to relax);
- `profile.cost_model.predict(plan, workload)`, `.per_block(workload)`,
  `.legend_cost(workload, targets, budget_mb)`;
- for a declared device, from a measured reference profile of the same model:
  `predict_on_device`, `plan_for_device`, `legend_cost_for_device`.
"""

from edge_runtime.profiler.chooser import NoPlanFitsError, choose_plan, search_plan
from edge_runtime.profiler.cost_model import CostModel, ModelShape, Prediction, Workload
from edge_runtime.profiler.declared import (
    declared_profiles,
    legend_cost_for_device,
    plan_for_device,
    predict_on_device,
)
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
    "declared_profiles",
    "legend_cost_for_device",
    "load_profile",
    "plan_for_device",
    "predict_on_device",
    "save_profile",
    "search_plan",
]
