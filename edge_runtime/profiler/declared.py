"""Declared device classes (`profiles/*.json`) and predictions for devices that never measured.

A declared profile carries figures, each with its source: RAM budget, memory bandwidth,
sustained fp32 matmul speed and compute speed relative to a Raspberry Pi 4. It has no
cost model of its own. To predict a plan's step time on such a device we take a
*reference* profile measured with `edge-rt profile` for the same model and quantization,
and divide every time by `device.fp32_gflops / reference.fp32_gflops`. Memory does not
scale: the same software on the same model keeps the same bytes. This is compute-only
scaling; a device whose step is bound by memory bandwidth (int4 dequantization on a
small core) will be slower than predicted, and phones throttle under sustained load, so
treat phone predictions as optimistic.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from edge_runtime.config import LoRAPlan
from edge_runtime.profiler.chooser import Choice, search_plan
from edge_runtime.profiler.cost_model import CostModel, Prediction, Workload
from edge_runtime.profiler.profile_io import SCHEMA, DeviceProfile, ProfileError, load_profile

__all__ = ["profiles_dir", "declared_profiles", "speed_factor", "predict_on_device",
           "plan_for_device", "legend_cost_for_device"]

ENV_DIR = "EDGE_RT_PROFILES"
log = logging.getLogger(__name__)


def profiles_dir() -> Path:
    """`$EDGE_RT_PROFILES` if set, else the repository's `profiles/` folder."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "profiles"


def declared_profiles(directory: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Every declared profile in `directory` (default `profiles_dir()`), by name."""
    d = Path(directory) if directory is not None else profiles_dir()
    if not d.is_dir():
        raise ProfileError(f"profiles folder {d} does not exist; set {ENV_DIR} to the folder "
                           "holding the declared device profiles (profiles/*.json)")
    out: dict[str, DeviceProfile] = {}
    for path in sorted(d.glob("*.json")):
        try:
            schema = json.loads(path.read_text()).get("schema")
        except (OSError, ValueError, AttributeError):
            schema = None
        if schema != SCHEMA:
            log.debug("skipping %s: not a device profile", path)
            continue
        prof = load_profile(path)
        if prof.kind != "declared":
            continue
        if prof.name in out:
            raise ProfileError(f"{path}: declared profile name {prof.name!r} is used twice")
        out[prof.name] = prof
    if not out:
        raise ProfileError(f"no declared profiles (kind 'declared') in {d}")
    return out


def _reference_cost(reference: DeviceProfile) -> CostModel:
    if reference.cost_model is None or reference.cost_model.gemm_gflops is None:
        raise ProfileError(f"reference profile {reference.name!r} has no measured cost model; "
                           "make one with `edge-rt profile MODEL --out FILE`")
    return reference.cost_model


def speed_factor(reference: DeviceProfile, device: DeviceProfile) -> float:
    """How many times faster `device` computes than the machine `reference` was measured on."""
    ref = _reference_cost(reference)
    assert ref.gemm_gflops is not None
    return device.fp32_gflops / ref.gemm_gflops


def _workload(reference: DeviceProfile, workload: Workload | None) -> Workload:
    if workload is not None:
        return workload
    if reference.workload is None:
        raise ProfileError(f"reference profile {reference.name!r} has no workload; pass one")
    return reference.workload


def predict_on_device(reference: DeviceProfile, device: DeviceProfile, plan: LoRAPlan,
                      workload: Workload | None = None) -> Prediction:
    """Step time and peak RSS of `plan` on a declared device, from a measured reference."""
    cost = _reference_cost(reference)
    wl = _workload(reference, workload)
    return cost.predict(plan, wl, speed=speed_factor(reference, device))


def plan_for_device(reference: DeviceProfile, device: DeviceProfile, *,
                    deadline_s: float | None, steps_per_round: int,
                    targets: Sequence[str] | str = ("q_proj", "v_proj"),
                    rank_choices: Sequence[int] = (4, 8, 16, 32),
                    workload: Workload | None = None, alpha: float = 16.0) -> Choice:
    """The chooser's plan for a declared device (its RAM budget, its scaled speed)."""
    cost = _reference_cost(reference)
    wl = _workload(reference, workload)
    bound = cost.bind(wl, speed=speed_factor(reference, device))
    return search_plan(bound, device.ram_budget_mb, deadline_s, steps_per_round,
                       cost.shape.n_layers, targets, rank_choices, alpha=alpha)


def legend_cost_for_device(reference: DeviceProfile, device: DeviceProfile,
                           targets: tuple[str, ...] = ("q_proj", "v_proj"),
                           workload: Workload | None = None) -> dict[str, float]:
    """`edge_runtime.fl.legend.DeviceCost` numbers for a declared device."""
    cost = _reference_cost(reference)
    wl = _workload(reference, workload)
    return cost.legend_cost(wl, targets, device.ram_budget_mb,
                            speed=speed_factor(reference, device))
