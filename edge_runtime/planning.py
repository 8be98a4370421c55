"""The one planner: which LoRA modules, at which rank, a device trains in a round.

Both transports (a simulated fleet and an MQTT fleet) plan through `Planner.plan`; a
simulated device is described exactly as a real one is, by the profile it registers with
(`edge_runtime.simulation` writes the plan or the LEGEND costs its class would measure).

Homogeneous strategies (fedavg, sa-fedlora) give every device the global adapter's
modules and ranks (SA-FedLoRA's clients are homogeneous in rank: its budget is the
fleet's, Yang et al. 2024); the server caps ranks by the global's current ones.

A device sends its profile at register (`edge-rt profile` writes it; see
profiles/README.md for the schema). The aggregator turns it into a `ClientPlan` (rank
per module over the top `depth` blocks), never above the global adapter's
`r_max`/`depth`. Sources, first match wins:

1. LEGEND with cost numbers (`legend_cost` in the profile, or derived for a declared
   class from a measured `reference` profile): the strategy's own `plan_device`
   (deepest, then widest plan fitting the deadline and memory).
2. A measured profile's `plan` (`LoRAPlan` JSON: rank, depth, layer_ranks, ...).
3. The device's declared class (`device_class` names a file in `profiles/`): with a
   measured `reference` profile of the same model, the profiler's chooser on the class's
   RAM budget and scaled speed (`profiler.declared.plan_for_device`); without one, a
   documented heuristic on the class's figures: rank from the RAM budget (<= 2 GB: 2,
   <= 4 GB: 4, else 8), depth = round(2 x compute relative to a Pi 4).
4. Built-in `CLASS_DEFAULTS` (pi4, pi5, phone, ...), else rank 4, depth 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.config import (
    FedAvgConfig,
    LegendConfig,
    LoRAPlan,
    StrategyConfig,
    StrategyName,
    lora_module_name,
)
from edge_runtime.errors import UserError
from edge_runtime.fl.legend import DeviceCost, plan_device, rank_ramp
from edge_runtime.fl.types import ClientPlan
from edge_runtime.profiler.profile_io import DeviceProfile, load_profile

__all__ = ["GlobalShape", "CLASS_DEFAULTS", "Planner", "declared_class", "LEGEND_COST_KEYS"]

LEGEND_COST_KEYS = ("fwd_s", "bwd_s", "rank_s", "base_mb", "act_mb", "rank_mb", "mem_budget_mb")

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
        return [lora_module_name(i, t) for i in range(self.n_layers - d, self.n_layers)
                for t in self.targets]


def declared_class(device_class: str, profiles_dir: Path | None) -> DeviceProfile | None:
    """The declared profile `profiles_dir/<device_class>.json`, if there is a valid one."""
    if profiles_dir is None or not device_class or "/" in device_class:
        return None
    path = profiles_dir / f"{device_class}.json"
    if not path.is_file():
        return None
    try:
        return load_profile(path)
    except (UserError, OSError, ValueError) as e:
        log.warning("ignoring class profile %s: %s", path, e)
        return None


def _heuristic(prof: DeviceProfile) -> tuple[int, int]:
    try:
        budget, rel = prof.ram_budget_mb, prof.figure("relative_compute")
    except UserError:
        return _FALLBACK["rank"], _FALLBACK["depth"]
    rank = 2 if budget <= 2048 else 4 if budget <= 4096 else 8
    return rank, max(1, round(2 * rel))


def _declared(profile: dict[str, Any]) -> tuple[int, int] | None:
    plan = profile.get("plan")
    src: dict[str, Any] = plan if isinstance(plan, dict) else profile
    r, d = src.get("rank"), src.get("depth")
    if isinstance(r, int) and isinstance(d, int) and r > 0 and d > 0:
        return r, d
    return None


def _from_lora_plan(plan: LoRAPlan, shape: GlobalShape) -> dict[str, int]:
    """{module: rank} of a LoRAPlan (its layer/module overrides kept), within the global."""
    depth = min(plan.depth, shape.depth)
    return {lora_module_name(i, t): min(plan.rank_for(i, lora_module_name(i, t)), shape.r_max)
            for i in range(shape.n_layers - depth, shape.n_layers) for t in shape.targets}


def _legend(device_id: str, cost: dict[str, Any], device_class: str, shape: GlobalShape,
            steps: int, legend: LegendConfig, deadline_s: float | None) -> ClientPlan | None:
    try:
        dc = DeviceCost(**{k: float(cost[k]) for k in LEGEND_COST_KEYS})
    except (KeyError, TypeError, ValueError) as e:
        log.warning("%s: unusable legend_cost (%s); using the declared plan", device_id, e)
        return None
    r_max = min(legend.r_max, shape.r_max)
    cfg = LegendConfig(deadline_s=legend.deadline_s, r_min=min(legend.r_min, r_max), r_max=r_max,
                       min_depth=legend.min_depth)
    plan = plan_device(device_id, dc, shape.n_layers, shape.targets, cfg, steps=steps,
                       alpha=shape.alpha, device_class=device_class, deadline_s=deadline_s)
    if plan is None:
        return None
    allowed = set(shape.modules())
    ranks = {n: r for n, r in plan.ranks.items() if n in allowed}
    return ClientPlan(device_id, ranks, shape.alpha, device_class) if ranks else None


@dataclass
class Planner:
    """Plans devices for one run (see the module docstring for the order of sources).

    Args:
        shape: the global adapter's extent; no plan goes beyond it.
        strategy: the run's strategy (homogeneous ones plan the global's ranks; LEGEND
            plans from costs with its own settings).
        steps: local steps per round (LEGEND's time prediction).
        deadline_s: the round deadline LEGEND plans against when its settings give none.
        profiles_dir: declared device-class profiles.
        reference: a measured profile of this model, to plan declared classes with the
            profiler's cost model.
    """

    shape: GlobalShape
    strategy: StrategyConfig
    steps: int
    deadline_s: float | None = None
    profiles_dir: Path | None = None
    reference: DeviceProfile | None = None

    def plan(self, device_id: str, profile: dict[str, Any], device_class: str
             ) -> ClientPlan | None:
        """The device's plan for a round; None: the device takes no part in this run."""
        shape, name = self.shape, self.strategy.name
        if name in (StrategyName.FEDAVG, StrategyName.SA_FEDLORA):
            full = ClientPlan(device_id, {n: shape.r_max for n in shape.modules()}, shape.alpha,
                              device_class)
            s = self.strategy.settings
            if isinstance(s, FedAvgConfig) and s.drop_weak:  # only who can afford it all
                own = self._own_plan(device_id, profile, device_class)
                if own.ranks != full.ranks:
                    return None
            return full
        return self._own_plan(device_id, profile, device_class)

    def _own_plan(self, device_id: str, profile: dict[str, Any], device_class: str
                  ) -> ClientPlan:
        """What the device can afford (heterogeneous strategies plan this)."""
        shape, name = self.shape, self.strategy.name
        measured = (isinstance(profile.get("plan"), dict)
                    or isinstance(profile.get("legend_cost"), dict))
        declared = None if measured else declared_class(device_class, self.profiles_dir)
        if name is StrategyName.LEGEND:
            legend_plan = self._legend_plan(device_id, profile, device_class, declared)
            if legend_plan is not None:
                return legend_plan
        ranks = self._measured_or_chosen(device_id, profile, device_class, declared)
        if ranks:
            return ClientPlan(device_id, ranks, shape.alpha, device_class)
        if declared is not None:
            rd = _heuristic(declared)
        else:
            rd = _declared(profile) or _declared(dict(CLASS_DEFAULTS.get(device_class, {}))) \
                or (_FALLBACK["rank"], _FALLBACK["depth"])
        rank, depth = min(rd[0], shape.r_max), min(rd[1], shape.depth)
        if name is StrategyName.LEGEND:  # without costs: LEGEND's ramp toward the output
            layers = range(shape.n_layers - depth, shape.n_layers)
            ramp = rank_ramp(depth, max(1, rank // 2), rank)
            return ClientPlan(device_id, {lora_module_name(i, t): r
                                          for i, r in zip(layers, ramp, strict=True)
                                          for t in shape.targets}, shape.alpha, device_class)
        return ClientPlan(device_id, {n: rank for n in shape.modules(depth)}, shape.alpha,
                          device_class)

    def _legend_plan(self, device_id: str, profile: dict[str, Any], device_class: str,
                     declared: DeviceProfile | None) -> ClientPlan | None:
        cost = profile.get("legend_cost")
        if not isinstance(cost, dict) and declared is not None and self.reference is not None:
            from edge_runtime.profiler.declared import legend_cost_for_device
            try:
                cost = legend_cost_for_device(self.reference, declared, self.shape.targets)
            except UserError as e:
                log.warning("%s: no LEGEND costs from the reference profile (%s)", device_id, e)
        if not isinstance(cost, dict):
            return None
        settings = self.strategy.settings
        assert isinstance(settings, LegendConfig)
        return _legend(device_id, cost, device_class, self.shape, self.steps, settings,
                       self.deadline_s)

    def _measured_or_chosen(self, device_id: str, profile: dict[str, Any], device_class: str,
                            declared: DeviceProfile | None) -> dict[str, int] | None:
        if isinstance(profile.get("plan"), dict):
            try:
                return _from_lora_plan(LoRAPlan.from_json(profile["plan"]), self.shape)
            except (UserError, TypeError, ValueError) as e:
                log.warning("%s: unusable plan in its profile (%s)", device_id, e)
                return None
        if declared is not None and self.reference is not None:
            from edge_runtime.profiler.declared import plan_for_device as choose_for_class
            try:
                choice = choose_for_class(self.reference, declared, deadline_s=self.deadline_s,
                                          steps_per_round=self.steps,
                                          targets=self.shape.targets, alpha=self.shape.alpha)
                return _from_lora_plan(choice.plan, self.shape)
            except UserError as e:
                log.warning("%s: the chooser found no plan for class %s (%s)", device_id,
                            device_class, e)
        return None
