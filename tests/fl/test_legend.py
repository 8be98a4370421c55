import pytest
import torch
from fl_helpers import make_update, rand_adapter

from edge_runtime.config import LegendConfig
from edge_runtime.fl.legend import (
    DeviceCost,
    Legend,
    LegendAccumulator,
    plan_device,
    predict_memory,
    predict_time,
    rank_ramp,
)
from edge_runtime.fl.types import ClientPlan

N_LAYERS = 4
SH = {f"model.layers.{i}.self_attn.q_proj": (12, 10) for i in range(N_LAYERS)}


def _names(depth):
    return [f"model.layers.{i}.self_attn.q_proj" for i in range(N_LAYERS - depth, N_LAYERS)]


def test_per_layer_denominators_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    g = rand_adapter(gen, {n: 8 for n in SH}, shapes=SH)
    # device 0 trains the top 1 block, device 1 the top 2, device 2 the top 3
    ups = [make_update(gen, f"d{k}", {n: 2 + 2 * k for n in _names(k + 1)}, 10 * (k + 1),
                       shapes=SH) for k in range(3)]
    acc = LegendAccumulator(g)
    for u in ups:
        acc.add(u)
    out = acc.result()
    assert acc.denominators == {_names(1)[0]: 60.0, _names(2)[0]: 50.0, _names(3)[0]: 30.0}
    for name in SH:
        trained = [u for u in ups if name in u.adapter]
        if not trained:  # layer 0: nobody trained it, global unchanged
            torch.testing.assert_close(out[name].delta(), g[name].delta())
            continue
        den = sum(u.num_samples for u in trained)
        ref_sb = torch.zeros(12, 8, dtype=torch.float64)
        ref_a = torch.zeros(8, 10, dtype=torch.float64)
        for u in trained:
            w = u.adapter[name]
            ref_sb[:, : w.rank] += (u.num_samples / den) * w.lora_b * w.scale
            ref_a[: w.rank] += (u.num_samples / den) * w.lora_a
        torch.testing.assert_close(out[name].lora_b.double() * out[name].scale, ref_sb)
        torch.testing.assert_close(out[name].lora_a.double(), ref_a)


def test_plan_fits_deadline_and_memory_and_grows_toward_output():
    cfg = LegendConfig(deadline_s=10.0, r_min=2, r_max=8)
    fast = DeviceCost(0.01, 0.02, 0.001, 100, 10, 1, mem_budget_mb=1000)
    slow = DeviceCost(0.05, 0.1, 0.004, 100, 10, 1, mem_budget_mb=1000)
    tight = DeviceCost(0.01, 0.02, 0.001, 100, 10, 1, mem_budget_mb=125)
    plans = {}
    for name, cost in [("fast", fast), ("slow", slow), ("tight", tight)]:
        p = plan_device(name, cost, N_LAYERS, ("q_proj",), cfg, steps=20)
        assert p is not None
        ranks = [p.ranks[n] for n in sorted(p.ranks, key=lambda s: int(s.split(".")[2]))]
        assert ranks == sorted(ranks)  # grows toward the output
        assert predict_time(cost, N_LAYERS, ranks, 20) <= 10.0
        assert predict_memory(cost, ranks) <= cost.mem_budget_mb
        plans[name] = p
    assert len(plans["fast"].ranks) == N_LAYERS
    assert len(plans["slow"].ranks) < len(plans["fast"].ranks)
    assert len(plans["tight"].ranks) < len(plans["fast"].ranks)
    hopeless = DeviceCost(1.0, 1.0, 1.0, 100, 10, 1, mem_budget_mb=1000)
    assert plan_device("x", hopeless, N_LAYERS, ("q_proj",), cfg, steps=20) is None
    assert rank_ramp(3, 2, 8) == [2, 5, 8] and rank_ramp(1, 2, 8) == [8]


def test_distribute_is_truncation_and_unplanned_module_raises():
    gen = torch.Generator().manual_seed(1)
    g = rand_adapter(gen, {n: 8 for n in SH}, shapes=SH)
    plan = ClientPlan("d", {n: r for n, r in zip(_names(2), [3, 6], strict=False)})
    local = Legend().distribute(g, plan)
    assert set(local) == set(_names(2))
    for n, w in local.items():
        ref = g[n].scale * g[n].lora_b[:, : w.rank] @ g[n].lora_a[: w.rank]
        torch.testing.assert_close(w.delta(), ref)
    bad = make_update(gen, "d", {_names(1)[0]: 3}, 1, shapes=SH)
    bad.plan = plan  # planned two layers, sent one
    with pytest.raises(ValueError, match="lacks"):
        Legend().aggregate(g, [bad])
