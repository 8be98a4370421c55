"""Per-device plans from profiles: declared plan, class defaults, LEGEND costs, caps."""

from __future__ import annotations

import json
from pathlib import Path

from edge_runtime.fleet.planning import CLASS_DEFAULTS, GlobalShape, module_name, plan_for_device

SHAPE = GlobalShape(n_layers=30, depth=4, r_max=8, targets=("q_proj", "v_proj"), alpha=16.0)


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
    (tmp_path / "phone.json").write_text(json.dumps({"plan": {"rank": 4, "depth": 3}}))
    p2 = plan_for_device("b", {}, "phone", SHAPE, strategy="hetlora", steps=10,
                         profiles_dir=tmp_path)
    assert set(p2.ranks.values()) == {4} and _layers(p2) == {27, 28, 29}


def test_fedavg_gives_everyone_the_global_plan() -> None:
    p = plan_for_device("c", {"rank": 2, "depth": 1}, "phone", SHAPE, strategy="fedavg",
                        steps=10)
    assert set(p.ranks) == set(SHAPE.modules()) and set(p.ranks.values()) == {8}


def test_legend_uses_costs_and_ramps_toward_output() -> None:
    cost = {"fwd_s": 0.001, "bwd_s": 0.002, "rank_s": 0.0001, "base_mb": 300, "act_mb": 50,
            "rank_mb": 1.0, "mem_budget_mb": 520}
    p = plan_for_device("d", {"legend_cost": cost}, "pi4", SHAPE, strategy="legend", steps=10)
    # memory: 300 + L*50 + sum(r) <= 520 bounds the depth; all modules within the global
    assert set(p.ranks) <= set(SHAPE.modules())
    by_layer = {int(n.split(".")[2]): r for n, r in p.ranks.items()}
    layers = sorted(by_layer)
    assert [by_layer[i] for i in layers] == sorted(by_layer[i] for i in layers)  # grows upward
    # without costs: a ramp from the declared class budget
    q = plan_for_device("e", {}, "pi5", SHAPE, strategy="legend", steps=10)
    assert q.ranks[module_name(29, "q_proj")] == 8 and q.ranks[module_name(26, "q_proj")] == 4
