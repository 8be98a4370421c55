"""Per-device plans from profiles: declared plan, class defaults, LEGEND costs, caps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge_runtime.config import StrategyConfig, StrategyName
from edge_runtime.config import lora_module_name as module_name
from edge_runtime.fl.types import ClientPlan
from edge_runtime.planning import CLASS_DEFAULTS, GlobalShape, Planner

REPO = Path(__file__).resolve().parents[2]
SHAPE = GlobalShape(n_layers=30, depth=4, r_max=8, targets=("q_proj", "v_proj"), alpha=16.0)


def plan_for_device(dev: str, profile: dict[str, Any], cls: str, shape: GlobalShape, *,
                    strategy: str, steps: int, **kw: Any) -> ClientPlan:
    planner = Planner(shape, StrategyConfig(StrategyName(strategy)), steps=steps, **kw)
    return planner.plan(dev, profile, cls)


def _layers(plan) -> set[int]:  # type: ignore[no-untyped-def]
    return {int(n.split(".")[2]) for n in plan.ranks}


def test_declared_profile_plan_capped_by_global() -> None:
    p = plan_for_device("a", {"plan": {"rank": 32, "depth": 2}}, "", SHAPE, strategy="hetlora",
                        steps=10)
    assert set(p.ranks.values()) == {8}  # capped at r_max
    assert _layers(p) == {28, 29}  # the top 2 blocks
    assert len(p.ranks) == 4 and p.alpha == 16.0


def test_class_defaults_and_profiles_dir(tmp_path: Path) -> None:
    p = plan_for_device("b", {}, "phone", SHAPE, strategy="hetlora", steps=10)
    assert set(p.ranks.values()) == {CLASS_DEFAULTS["phone"]["rank"]}
    assert _layers(p) == {29}
    # a declared class profile (schema of profiles/README.md) without a reference
    # profile: rank from the RAM budget, depth from the compute relative to a Pi 4
    prof = json.loads((REPO / "profiles" / "rpi4-4gb.json").read_text())
    prof["name"] = "phone"
    prof["figures"]["relative_compute"]["value"] = 1.6
    (tmp_path / "phone.json").write_text(json.dumps(prof))
    p2 = plan_for_device("b", {}, "phone", SHAPE, strategy="hetlora", steps=10,
                         profiles_dir=tmp_path)
    assert set(p2.ranks.values()) == {4} and _layers(p2) == {27, 28, 29}  # 3072 MB; 2x1.6 -> 3


def test_shipped_declared_classes_get_distinct_plans() -> None:
    plans = {c: plan_for_device(c, {}, c, SHAPE, strategy="hetlora", steps=10,
                                profiles_dir=REPO / "profiles")
             for c in ("rpi4-2gb", "rpi5-8gb", "android-mid-6gb")}
    assert {c: (max(p.ranks.values()), len(_layers(p))) for c, p in plans.items()} == {
        "rpi4-2gb": (2, 2), "rpi5-8gb": (8, 4), "android-mid-6gb": (4, 4)}


def test_measured_plan_keeps_layer_ranks() -> None:
    prof = {"plan": {"rank": 4, "depth": 3, "layer_ranks": {"29": 8}, "targets": ["q_proj"]}}
    p = plan_for_device("m", prof, "", SHAPE, strategy="flexlora", steps=10)
    assert p.ranks[module_name(29, "q_proj")] == 8 and p.ranks[module_name(27, "v_proj")] == 4


def test_fedavg_gives_everyone_the_global_plan() -> None:
    p = plan_for_device("c", {"rank": 2, "depth": 1}, "phone", SHAPE, strategy="fedavg",
                        steps=10)
    assert set(p.ranks) == set(SHAPE.modules()) and set(p.ranks.values()) == {8}


def test_legend_uses_costs_and_ramps_toward_output() -> None:
    cost = {"fwd_s": 0.001, "bwd_s": 0.002, "rank_s": 0.0001, "base_mb": 300, "act_mb": 50,
            "rank_mb": 1.0, "mem_budget_mb": 520}
    p = plan_for_device("d", {"legend_cost": cost}, "pi4", SHAPE, strategy="legend", steps=10,
                        deadline_s=60.0)
    # memory: 300 + L*50 + sum(r) <= 520 bounds the depth; all modules within the global
    assert set(p.ranks) <= set(SHAPE.modules())
    by_layer = {int(n.split(".")[2]): r for n, r in p.ranks.items()}
    layers = sorted(by_layer)
    assert [by_layer[i] for i in layers] == sorted(by_layer[i] for i in layers)  # grows upward
    # without costs: a ramp from the declared class budget
    q = plan_for_device("e", {}, "pi5", SHAPE, strategy="legend", steps=10)
    assert q.ranks[module_name(29, "q_proj")] == 8 and q.ranks[module_name(26, "q_proj")] == 4


def test_declared_class_with_measured_reference_uses_the_profilers_chooser() -> None:
    """A reference profile (edge-rt profile tiny --quick, measured here) plans declared
    classes with the profiler's cost model; LEGEND gets its cost numbers from it."""
    from edge_runtime.profiler.profile_io import load_profile

    ref = load_profile(Path(__file__).parent / "fixtures" / "measured-tiny.json")
    tiny = GlobalShape(n_layers=2, depth=2, r_max=8, targets=("q_proj", "v_proj"), alpha=16.0)
    work = {}
    for c in ("rpi4-2gb", "rpi5-8gb"):
        p = plan_for_device(c, {}, c, tiny, strategy="hetlora", steps=5,
                            profiles_dir=REPO / "profiles", reference=ref, deadline_s=30.0)
        assert set(p.ranks) <= set(tiny.modules()) and max(p.ranks.values()) <= 8
        work[c] = sum(p.ranks.values())
    assert work["rpi5-8gb"] >= work["rpi4-2gb"]  # faster and bigger: never a smaller plan
    # a deadline no device can meet: the chooser fails, the figures heuristic takes over
    p = plan_for_device("x", {}, "rpi4-2gb", tiny, strategy="hetlora", steps=5,
                        profiles_dir=REPO / "profiles", reference=ref, deadline_s=1e-6)
    assert set(p.ranks.values()) == {2}
    lg = plan_for_device("y", {}, "rpi5-8gb", tiny, strategy="legend", steps=5,
                         profiles_dir=REPO / "profiles", reference=ref, deadline_s=30.0)
    assert lg.ranks and set(lg.ranks) <= set(tiny.modules())


def test_fedavg_drop_weak_keeps_only_devices_that_afford_the_global_plan() -> None:
    from edge_runtime.config import FedAvgConfig

    st = StrategyConfig(StrategyName.FEDAVG, FedAvgConfig(drop_weak=True))
    planner = Planner(SHAPE, st, steps=10)
    strong = planner.plan("s", {"plan": {"rank": 8, "depth": 4}}, "")
    weak_rank = planner.plan("w", {"plan": {"rank": 4, "depth": 4}}, "")
    shallow = planner.plan("d", {"plan": {"rank": 8, "depth": 2}}, "")
    assert strong is not None and set(strong.ranks.values()) == {8}
    assert weak_rank is None and shallow is None
    # without drop_weak the weak device trains the global ranks (the infeasible oracle)
    oracle = Planner(SHAPE, StrategyConfig(StrategyName.FEDAVG), steps=10)
    assert oracle.plan("w", {"plan": {"rank": 4, "depth": 4}}, "") is not None
