"""Device profile JSON: what `edge-rt profile` writes and `profiles/*.json` declare.

Schema (documented for users in profiles/README.md), version 1:

    {"schema": "edge-runtime/device-profile", "version": 1,
     "kind": "measured" | "declared", "name": str,
     "device": {...},                    # measured: CPU, cores, RAM; declared: description
     "figures": {key: {"value", "unit", "source"}},   # ram_budget_mb, fp32_gflops, ...
     "model": {...} | null,              # spec, name, fingerprint, quant (measured only)
     "workload": {"batch_size", "seq_len", "label_fraction"} | null,
     "budget": {"memory_budget_mb", "round_deadline_s", "steps_per_round", "source"} | null,
     "measurements": {...},              # raw microbenchmark and whole-step numbers
     "cost_model": {...} | null,         # CostModel.to_json()
     "plan": {...} | null,               # LoRAPlan.to_json()
     "prediction": {...} | null,         # the plan's predicted step time, peak RSS
     "legend_cost": {...} | null}        # edge_runtime.fl.legend.DeviceCost numbers
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.config import LoRAPlan
from edge_runtime.errors import ConfigError, UserError
from edge_runtime.profiler.cost_model import CostModel, Workload

__all__ = ["SCHEMA", "VERSION", "FIGURE_KEYS", "ProfileError", "Figure", "DeviceProfile",
           "load_profile", "save_profile", "profile_from_json"]

SCHEMA = "edge-runtime/device-profile"
VERSION = 1
# Figures every declared profile carries (a measured one carries what it measured).
FIGURE_KEYS = ("ram_budget_mb", "memory_bandwidth_gbs", "fp32_gflops", "relative_compute")


class ProfileError(UserError):
    """A device profile file is missing, malformed, or of another schema version."""


@dataclass
class Figure:
    """A number with its unit and where it comes from."""

    value: float
    unit: str = ""
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "source": self.source}


@dataclass
class DeviceProfile:
    """A measured or declared device profile (see the module docstring for the JSON)."""

    name: str
    kind: str = "measured"
    device: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    workload: Workload | None = None
    budget: dict[str, Any] | None = None
    measurements: dict[str, Any] = field(default_factory=dict)
    cost_model: CostModel | None = None
    plan: LoRAPlan | None = None
    prediction: dict[str, Any] | None = None
    legend_cost: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def figure(self, key: str) -> float:
        if key not in self.figures:
            raise ProfileError(f"profile {self.name!r} has no figure {key!r}; "
                               f"add figures.{key} = {{\"value\": ..., \"source\": ...}}")
        return self.figures[key].value

    @property
    def ram_budget_mb(self) -> float:
        return self.figure("ram_budget_mb")

    @property
    def fp32_gflops(self) -> float:
        return self.figure("fp32_gflops")

    @property
    def relative_compute(self) -> float:
        return self.figure("relative_compute")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": SCHEMA, "version": VERSION, "kind": self.kind, "name": self.name,
            "device": self.device,
            "figures": {k: v.to_json() for k, v in self.figures.items()},
            "model": self.model,
            "workload": None if self.workload is None else self.workload.to_json(),
            "budget": self.budget,
            "measurements": self.measurements,
            "cost_model": None if self.cost_model is None else self.cost_model.to_json(),
            "plan": None if self.plan is None else self.plan.to_json(),
            "prediction": self.prediction,
            "legend_cost": self.legend_cost,
        }
        d.update(self.extra)
        return d


_KNOWN = {"schema", "version", "kind", "name", "device", "figures", "model", "workload",
          "budget", "measurements", "cost_model", "plan", "prediction", "legend_cost"}


def profile_from_json(d: Any, where: str = "profile") -> DeviceProfile:
    """Validate and build a `DeviceProfile` from parsed JSON; errors name `where` and the key."""
    if not isinstance(d, dict):
        raise ProfileError(f"{where}: a device profile must be a JSON object")
    if d.get("schema") != SCHEMA:
        raise ProfileError(f"{where}: key 'schema' must be {SCHEMA!r}, got {d.get('schema')!r}; "
                           "is this a profile written by `edge-rt profile`?")
    if d.get("version") != VERSION:
        raise ProfileError(f"{where}: schema version {d.get('version')!r} is not supported "
                           f"(this edge-runtime reads version {VERSION}); re-run edge-rt profile")
    kind = d.get("kind")
    if kind not in ("measured", "declared"):
        raise ProfileError(f"{where}: key 'kind' must be 'measured' or 'declared', got {kind!r}")
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{where}: key 'name' must be a non-empty string")
    figures: dict[str, Figure] = {}
    raw_figs = d.get("figures") or {}
    if not isinstance(raw_figs, dict):
        raise ProfileError(f"{where}: key 'figures' must be an object")
    for key, fig in raw_figs.items():
        if not isinstance(fig, dict) or not isinstance(fig.get("value"), (int, float)):
            raise ProfileError(f"{where}: figures.{key} must be {{\"value\": number, "
                               "\"unit\": str, \"source\": str}")
        figures[key] = Figure(float(fig["value"]), str(fig.get("unit", "")),
                              str(fig.get("source", "")))
    if kind == "declared":
        for key in FIGURE_KEYS:
            if key not in figures:
                raise ProfileError(f"{where}: declared profile lacks figures.{key}")
            if not figures[key].source:
                raise ProfileError(f"{where}: figures.{key} has no 'source'; every declared "
                                   "figure must say where it comes from")
            if figures[key].value <= 0:
                raise ProfileError(f"{where}: figures.{key} must be positive")
    try:
        workload = Workload.from_json(d["workload"]) if d.get("workload") else None
        cost = CostModel.from_json(d["cost_model"]) if d.get("cost_model") else None
        plan = LoRAPlan.from_json(d["plan"]) if d.get("plan") else None
    except ConfigError as e:
        raise ProfileError(f"{where}: key 'plan': {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ProfileError(f"{where}: malformed workload/cost_model/plan ({e!r}); "
                           "re-run edge-rt profile") from None
    return DeviceProfile(
        name=name, kind=kind, device=dict(d.get("device") or {}), figures=figures,
        model=d.get("model"), workload=workload, budget=d.get("budget"),
        measurements=dict(d.get("measurements") or {}), cost_model=cost, plan=plan,
        prediction=d.get("prediction"), legend_cost=d.get("legend_cost"),
        extra={k: v for k, v in d.items() if k not in _KNOWN},
    )


def load_profile(path: str | Path) -> DeviceProfile:
    """Read a device profile JSON file (measured or declared)."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"profile file {p} does not exist; write one with "
                           "`edge-rt profile MODEL --out FILE`")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProfileError(f"profile file {p} is not valid JSON ({e})") from None
    return profile_from_json(data, str(p))


def save_profile(profile: DeviceProfile, path: str | Path) -> None:
    """Write atomically (temporary file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name, suffix=".tmp", dir=str(p.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(profile.to_json(), f, indent=1)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
