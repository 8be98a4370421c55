"""The composed cost model, checked term by term against a hand computation."""

from __future__ import annotations

import pytest

from edge_runtime.config import LoRAPlan
from edge_runtime.profiler.cost_model import (
    BYTES_PER_LORA_PARAM,
    MB,
    CostModel,
    Workload,
    lora_params,
)
from tests.profiler.helpers import SHAPE, model


def test_lora_params_counts_every_module() -> None:
    plan = LoRAPlan(rank=4, depth=2, targets=("q_proj", "v_proj", "down_proj"),
                    layer_ranks={4: 2})
    # q: 64->64, v: 64->32, down: 128->64
    per_rank = (64 + 64) + (64 + 32) + (128 + 64)
    assert lora_params(SHAPE, plan) == per_rank * (2 + 4)


def test_prediction_composes_the_fitted_parts() -> None:
    plan = LoRAPlan(rank=8, depth=2, layer_ranks={4: 4, 5: 8})
    wl = Workload(batch_size=2, seq_len=16, label_fraction=0.5)
    cm = model()
    p = cm.predict(plan, wl)
    n_tok, attn = 32, 2 * 16 * 16
    n_lab = 15  # ceil(2 * 15 * 0.5)
    assert wl.label_tokens == n_lab
    w = {4: 4 * 224, 5: 8 * 224}  # q (64+64) + v (64+32) = 224 per rank unit
    t_fwd = 0.001 + 1e-5 * n_tok + 1e-8 * attn
    t_tr = sum(0.002 + 3e-5 * n_tok + 3e-8 * attn + 1e-9 * n_tok * w[i] for i in (4, 5))
    params = sum(w.values())
    expect_t = 4 * t_fwd + t_tr + (0.0005 + 2e-5 * n_lab) + (1e-4 + 1e-8 * params)
    assert p.step_time_s == pytest.approx(expect_t, rel=1e-12)
    act = sum(0.01 * n_tok + 1e-5 * attn + 1e-7 * n_tok * w[i] for i in (4, 5))
    transient = max(1.0 + 0.002 * n_lab, 0.5 + 0.001 * n_tok)
    expect_m = 300.0 + params * BYTES_PER_LORA_PARAM / MB + act + transient
    assert p.peak_rss_mb == pytest.approx(expect_m, rel=1e-12)
    assert p.trainable_params == params
    assert p.parts["load_peak_mb"] == 400.0


def test_depth_saves_time_scale_and_speed_apply() -> None:
    wl = Workload(4, 32)
    shallow = model().predict(LoRAPlan(rank=8, depth=1), wl)
    deep = model().predict(LoRAPlan(rank=8, depth=6), wl)
    assert shallow.step_time_s < deep.step_time_s
    assert shallow.peak_rss_mb < deep.peak_rss_mb
    scaled = model(time_scale=1.5, slack=20.0).predict(LoRAPlan(rank=8, depth=6), wl, speed=3.0)
    assert scaled.step_time_s == pytest.approx(deep.step_time_s * 1.5 / 3.0)
    assert scaled.peak_rss_mb == pytest.approx(deep.peak_rss_mb + 20.0)


def test_legend_cost_reproduces_the_composed_prediction_for_uniform_plans() -> None:
    """LEGEND's linear form (fl/legend.py) must give the same numbers as our composition."""
    cm = model()
    wl = Workload(4, 32)
    lc = cm.legend_cost(wl, ("q_proj", "v_proj"), 1000.0)
    for depth, rank in ((1, 4), (3, 8), (6, 16)):
        p = cm.predict(LoRAPlan(rank=rank, depth=depth), wl)
        t = SHAPE.n_layers * lc["fwd_s"] + depth * lc["bwd_s"] + depth * rank * lc["rank_s"]
        m = lc["base_mb"] + depth * lc["act_mb"] + depth * rank * lc["rank_mb"]
        assert t == pytest.approx(p.step_time_s, rel=1e-9)
        assert m == pytest.approx(p.peak_rss_mb, rel=1e-9)


def test_json_round_trip() -> None:
    cm = model(1.2, 5.0)
    again = CostModel.from_json(cm.to_json())
    wl = Workload(2, 64)
    plan = LoRAPlan(rank=4, depth=3)
    assert again.predict(plan, wl).step_time_s == pytest.approx(cm.predict(plan, wl).step_time_s,
                                                                rel=1e-4)
    with pytest.raises(ValueError):
        CostModel(SHAPE, "none", {}, 1.0)


def test_prefix_cache_budget_counts_only_with_a_frozen_prefix() -> None:
    plain, cached = Workload(4, 32), Workload(4, 32, prefix_cache_mb=64.0)
    for depth, extra in ((2, 64.0), (SHAPE.n_layers, 0.0)):
        plan = LoRAPlan(rank=8, depth=depth)
        a, b = model().predict(plan, plain), model().predict(plan, cached)
        assert b.peak_rss_mb - a.peak_rss_mb == pytest.approx(extra)
        assert b.step_time_s == a.step_time_s
    assert Workload.from_json(cached.to_json()) == cached
