import math

import numpy as np
import pytest
import torch
from fl_helpers import SHAPES, make_update, rand_adapter

from edge_runtime.config import SAFedLoRAConfig
from edge_runtime.errors import ConfigError
from edge_runtime.fl.sa_fedlora import (
    SAFedLoRA,
    allocate_by_importance,
    in_initiating_stage,
    proximal_term,
    rank_budget,
)
from edge_runtime.fl.types import ClientPlan


@pytest.mark.parametrize("rounds,heat,cool", [(10, 2, 2), (20, 0, 5), (6, 3, 3), (5, 0, 0)])
def test_schedule_endpoints_and_monotonicity(rounds, heat, cool):
    cfg = SAFedLoRAConfig(rounds=rounds, heat_rounds=heat, cool_rounds=cool,
                          final_fraction=0.25)
    b0 = 64
    b = [rank_budget(t, b0, cfg) for t in range(rounds)]
    assert b[0] == b0
    assert all(x >= y for x, y in zip(b, b[1:], strict=False))  # never grows
    assert all(b[t] == b0 for t in range(heat))  # heating
    if cool:
        assert all(b[t] == 16 for t in range(rounds - cool, rounds))  # cooling
    # cubic decay against the formula directly
    span = rounds - heat - cool
    for t in range(heat, rounds - cool):
        ref = 16 + 48 * (1 - (t - heat) / span) ** 3
        assert b[t] == math.ceil(ref - 1e-9)


def test_initiating_stage_and_config_errors():
    cfg = SAFedLoRAConfig(init_rounds=2)
    assert in_initiating_stage(0, cfg) and in_initiating_stage(1, cfg)
    assert not in_initiating_stage(2, cfg)
    with pytest.raises(ConfigError):
        SAFedLoRAConfig(final_fraction=0.0)


def test_allocation_matches_brute_force_sort():
    gen = torch.Generator().manual_seed(0)
    spectra = {f"m{i}": torch.sort(torch.rand(6, generator=gen), descending=True).values
               for i in range(4)}
    caps = {n: 6 for n in spectra}
    ranks = allocate_by_importance(spectra, 10, caps, r_min=1)
    assert sum(ranks.values()) == 10
    # brute force: every module keeps 1, then the 6 largest of the rest
    rest = sorted(((float(s[i]), n) for n, s in spectra.items() for i in range(1, 6)),
                  reverse=True)[:6]
    ref = {n: 1 for n in spectra}
    for _, n in rest:
        ref[n] += 1
    assert ranks == ref


def test_proximal_term_value_and_gradient():
    from edge_runtime.lora import LoRALinear

    gen = torch.Generator().manual_seed(1)
    start = rand_adapter(gen, {"model.layers.0.self_attn.q_proj": 3}, dtype=torch.float32)
    m = LoRALinear(torch.nn.Linear(10, 12), 10, 12, 3, 16.0)
    m.set_weights(start["model.layers.0.self_attn.q_proj"])
    mods = {"model.layers.0.self_attn.q_proj": m}
    assert float(proximal_term(mods, start, 0.5).detach()) == 0.0
    with torch.no_grad():
        m.lora_a.add_(1.0)  # 3 x 10 entries moved by 1
    val = proximal_term(mods, start, 0.5)
    assert float(val.detach()) == pytest.approx(0.25 * 30, rel=1e-6)
    val.backward()
    torch.testing.assert_close(m.lora_a.grad, torch.full((3, 10), 0.5))


def test_aggregate_holds_the_next_budget_and_is_best_per_module():
    gen = torch.Generator().manual_seed(2)
    cfg = SAFedLoRAConfig(rounds=4, heat_rounds=0, cool_rounds=1, final_fraction=0.5, r_min=1)
    g = rand_adapter(gen, {n: 4 for n in SHAPES})
    strat = SAFedLoRA(cfg)
    ups = [make_update(gen, f"d{i}", {n: 4 for n in SHAPES}, i + 1) for i in range(3)]
    out = strat.aggregate(g, ups, round_index=0)
    b1 = rank_budget(1, 16, cfg)
    assert b1 < 16
    assert sum(w.rank for w in out.values()) == b1
    ntot = 6
    for name, w in out.items():
        d = sum((u.num_samples / ntot) * u.adapter[name].delta() for u in ups).numpy()
        s = np.linalg.svd(d, compute_uv=False)
        err = np.linalg.norm(d - w.delta().numpy())
        assert err == pytest.approx(np.sqrt((s[w.rank:] ** 2).sum()), rel=1e-6)
    # a client planned at 4 gets at most the module's kept rank
    local = strat.distribute(out, ClientPlan("c", {n: 4 for n in SHAPES}))
    assert all(local[n].rank == out[n].rank for n in SHAPES)
    same = strat.aggregate(g, [], round_index=0)
    for n in SHAPES:
        torch.testing.assert_close(same[n].delta(), g[n].delta())
