"""Per-device LoRA plans from device profiles (measured, declared, or a class default).

A device sends its profile at register. The aggregator turns it into a `ClientPlan`
(rank per module over the top `depth` blocks), never above the global adapter's
`r_max`/`depth`:

1. LEGEND with cost numbers in the profile (`legend_cost`): the strategy's own
   `plan_device` (deepest, then widest plan fitting the deadline and memory).
2. A profile naming a plan (`{"plan": {"rank": r, "depth": d}}` or top-level
   `rank`/`depth`, as `edge-rt profile` and the declared class files write).
3. Otherwise the declared profile of the device's class: `profiles/<class>.json` if the
   profiles directory has it, else the built-in `CLASS_DEFAULTS`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.config import LegendConfig
from edge_runtime.fl.legend import DeviceCost, plan_device
from edge_runtime.fl.types import ClientPlan

__all__ = ["GlobalShape", "CLASS_DEFAULTS", "plan_for_device", "module_name"]

log = logging.getLogger(__name__)

# Declared budgets for device classes that have not measured themselves.
CLASS_DEFAULTS: dict[str, dict[str, int]] = {
    "phone": {"rank": 2, "depth": 1},
    "pi-zero2": {"rank": 2, "depth": 1},
    "pi4": {"rank": 4, "depth": 2},
    "pi5": {"rank": 8, "depth": 4},
    "laptop": {"rank": 16, "depth": 8},
}
_FALLBACK = {"rank": 4, "depth": 2}


def module_name(layer: int, target: str) -> str:
    parent = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{parent}.{target}"


@dataclass(frozen=True)
class GlobalShape:
    """The global adapter's extent: top `depth` of `n_layers` blocks, `targets`, `r_max`."""

    n_layers: int
    depth: int
    r_max: int
    targets: tuple[str, ...]
    alpha: float

    def modules(self, depth: int | None = None) -> list[str]:
        d = min(self.depth, depth if depth is not None else self.depth)
        return [module_name(i, t) for i in range(self.n_layers - d, self.n_layers)
                for t in self.targets]


def _class_profile(device_class: str, profiles_dir: Path | None) -> dict[str, Any]:
    if profiles_dir is not None and device_class:
        path = profiles_dir / f"{device_class}.json"
        if path.is_file():
            try:
                return dict(json.loads(path.read_text()))
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable class profile %s: %s", path, e)
    return dict(CLASS_DEFAULTS.get(device_class, _FALLBACK))


def _declared(profile: dict[str, Any]) -> tuple[int, int] | None:
    plan = profile.get("plan")
    src: dict[str, Any] = plan if isinstance(plan, dict) else profile
    r, d = src.get("rank"), src.get("depth")
    if isinstance(r, int) and isinstance(d, int) and r > 0 and d > 0:
        return r, d
    return None


def plan_for_device(device_id: str, profile: dict[str, Any], device_class: str,
                    shape: GlobalShape, *, strategy: str, steps: int,
                    legend: LegendConfig | None = None,
                    profiles_dir: Path | None = None) -> ClientPlan:
    """The device's plan for a round (see module docstring for the order of sources)."""
    cost = profile.get("legend_cost")
    if strategy == "legend" and isinstance(cost, dict):
        try:
            dc = DeviceCost(**{k: float(cost[k]) for k in (
                "fwd_s", "bwd_s", "rank_s", "base_mb", "act_mb", "rank_mb", "mem_budget_mb")})
            cfg = legend or LegendConfig(r_max=shape.r_max, r_min=min(4, shape.r_max))
            plan = plan_device(device_id, dc, shape.n_layers, shape.targets, cfg, steps=steps,
                               alpha=shape.alpha, device_class=device_class)
            if plan is not None:
                allowed = set(shape.modules())
                ranks = {n: min(r, shape.r_max) for n, r in plan.ranks.items() if n in allowed}
                if ranks:
                    return ClientPlan(device_id, ranks, shape.alpha, device_class)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("%s: unusable legend_cost in profile (%s); using declared plan",
                        device_id, e)
    if strategy == "fedavg":  # homogeneous baseline: everyone trains the global plan
        return ClientPlan(device_id, {n: shape.r_max for n in shape.modules()}, shape.alpha,
                          device_class)
    rd = _declared(profile) or _declared(_class_profile(device_class, profiles_dir)) \
        or (_FALLBACK["rank"], _FALLBACK["depth"])
    rank, depth = min(rd[0], shape.r_max), min(rd[1], shape.depth)
    if strategy == "legend":
        # LEGEND without measured costs: a rank ramp that grows toward the output.
        layers = list(range(shape.n_layers - depth, shape.n_layers))
        lo = max(1, rank // 2)
        ramp = [lo + (rank - lo) * j // max(1, depth - 1) for j in range(depth)]
        ranks = {module_name(i, t): r for i, r in zip(layers, ramp, strict=True)
                 for t in shape.targets}
    else:
        ranks = {n: rank for n in shape.modules(depth)}
    return ClientPlan(device_id, ranks, shape.alpha, device_class)
