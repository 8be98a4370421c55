"""FLoRA (stacking) against brute-force dense sums, and its device side on a real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fl_helpers import SHAPES, make_update, rand_adapter

from edge_runtime.adapter import LoRAWeights
from edge_runtime.config import ConfigError, FLoRAConfig, StrategyConfig
from edge_runtime.fl.diagnostics import aggregation_diagnostics
from edge_runtime.fl.flora import FLoRA, refactor
from edge_runtime.fl.registry import make_strategy
from edge_runtime.fl.types import ClientPlan, UpdateMismatchError

TOP = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def _brute_next(g, ups):  # type: ignore[no-untyped-def]
    """old product + sum_k p_k s_k B_k A_k, p_k over the senders of each module (numpy)."""
    out = {}
    for name in SHAPES:
        sent = [u for u in ups if name in u.adapter]
        d = g[name].delta().numpy().copy()
        n = sum(u.num_samples for u in sent)
        for u in sent:
            d += u.num_samples / n * u.adapter[name].delta().numpy()
        out[name] = d
    return out


def test_stacking_is_the_exact_sum_over_rounds_with_mixed_ranks_and_depths() -> None:
    gen = torch.Generator().manual_seed(0)
    flora = FLoRA()
    g = rand_adapter(gen, {n: 3 for n in SHAPES})
    for rnd in range(3):
        ups = [make_update(gen, "a", {n: 1 for n in SHAPES}, 3),
               make_update(gen, "b", {n: 4 for n in SHAPES}, 5),
               make_update(gen, "c", {n: 2 for n in TOP}, 7)]  # a shallow device
        want = _brute_next(g, ups)
        new = flora.aggregate(g, ups, rnd)
        for name in SHAPES:
            got = new[name].delta().numpy()
            assert np.linalg.norm(got - want[name]) <= 1e-9 * np.linalg.norm(want[name])
            d_out, d_in = SHAPES[name]
            assert new[name].rank <= min(d_out, d_in)
            assert new[name].alpha == g[name].alpha
        assert aggregation_diagnostics(new, ups, 1, prior=g)["agg_error"] < 1e-9
        g = new
    # after 3 rounds of rank 3 + (1 + 4 + 2) per round, the stack hit the module's full rank
    assert g["model.layers.0.mlp.down_proj"].rank == 10


def test_refactor_drops_zero_components_and_max_rank_is_the_best_approximation() -> None:
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    zeros_b = torch.cat([torch.zeros(12, 4, dtype=torch.float64), b], 1)
    zeros_a = torch.cat([torch.randn(4, 10, generator=gen, dtype=torch.float64), a], 0)
    w = refactor(zeros_b, zeros_a, 16.0, rel_tol=1e-9, dtype=torch.float64)
    assert w.rank == 3
    torch.testing.assert_close(w.delta(), b @ a, rtol=1e-9, atol=1e-9)
    top1 = refactor(b, a, 16.0, rel_tol=0.0, max_rank=1, dtype=torch.float64)
    u, s, vt = np.linalg.svd((b @ a).numpy())
    np.testing.assert_allclose(top1.delta().numpy(), s[0] * np.outer(u[:, 0], vt[0]), atol=1e-9)
    zero = refactor(torch.zeros(12, 2, dtype=torch.float64), a[:2], 16.0, rel_tol=1e-7)
    assert zero.rank == 1 and float(zero.delta().abs().max()) == 0.0


def test_fresh_local_adapter_is_seeded_and_planned_and_plan_is_not_capped_by_global() -> None:
    gen = torch.Generator().manual_seed(2)
    g = rand_adapter(gen, {n: 2 for n in SHAPES})
    plan = ClientPlan("d", {n: 5 for n in TOP})
    flora = make_strategy(StrategyConfig.from_json({"name": "flora", "rel_tol": 1e-6}))
    assert isinstance(flora, FLoRA) and flora.cfg.rel_tol == 1e-6
    assert not flora.ranks_capped_by_global
    frozen, fresh = flora.local_start(flora.distribute(g, plan), plan, seed=7)
    assert frozen is not None and set(frozen) == set(SHAPES)  # the whole stack, all depths
    assert {n: w.rank for n, w in fresh.items()} == plan.ranks  # rank 5 > global rank 2
    assert all(float(w.lora_b.abs().max()) == 0.0 for w in fresh.values())
    _, again = flora.local_start(g, plan, seed=7)
    _, other = flora.local_start(g, plan, seed=8)
    name = TOP[0]
    assert torch.equal(fresh[name].lora_a, again[name].lora_a)
    assert not torch.equal(fresh[name].lora_a, other[name].lora_a)
    with pytest.raises(UpdateMismatchError):
        flora.local_start({TOP[1]: g[TOP[1]]}, plan, seed=7)


def test_round_zero_stack_travels_as_one_zero_component() -> None:
    g = {n: LoRAWeights(torch.randn(4, d_in), torch.zeros(d_out, 4), 16.0)
         for n, (d_out, d_in) in SHAPES.items()}
    sent = FLoRA().distribute(g, ClientPlan("d", {TOP[0]: 2}))
    assert all(w.rank == 1 and not w.lora_b.any() for w in sent.values())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError):
        FLoRAConfig(rel_tol=1.5)
    with pytest.raises(ConfigError):
        FLoRAConfig(max_rank=-1)
