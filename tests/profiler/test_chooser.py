"""The plan chooser on synthetic cost tables: budgets, monotonicity, determinism, errors."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from edge_runtime.config import LoRAPlan
from edge_runtime.errors import UserError
from edge_runtime.profiler.chooser import NoPlanFitsError, choose_plan, rank_path, search_plan

N_LAYERS = 8
WIDTH = 100  # LoRA parameters per rank unit per block


@dataclass
class Est:
    step_time_s: float
    peak_rss_mb: float
    trainable_params: int


@dataclass
class TableCost:
    """A synthetic device: time and memory linear in depth and in each block's rank, with
    a per-block weight so that the blocks near the output cost a little more."""

    t0: float = 1.0
    t_block: float = 0.5
    t_rank: float = 0.01
    m0: float = 500.0
    m_block: float = 40.0
    m_rank: float = 1.5
    calls: int = 0

    def predict(self, plan: LoRAPlan) -> Est:
        self.calls += 1
        layers = plan.layers(N_LAYERS)
        ranks = [plan.rank_for(i, "x") for i in layers]
        skew = [1.0 + 0.01 * i for i in layers]
        t = self.t0 + self.t_block * len(layers) + self.t_rank * sum(
            r * s for r, s in zip(ranks, skew, strict=True))
        m = self.m0 + self.m_block * len(layers) + self.m_rank * sum(
            r * s for r, s in zip(ranks, skew, strict=True))
        return Est(t, m, WIDTH * sum(ranks))


CHOICES = (2, 4, 8, 16)


def ranks_of(plan: LoRAPlan) -> list[int]:
    return [plan.rank_for(i, "x") for i in plan.layers(N_LAYERS)]


def test_rank_path_is_smooth_nondecreasing_and_complete() -> None:
    for depth in (1, 3, 5):
        path = rank_path(depth, 4)
        assert path[0] == [0] * depth and path[-1] == [3] * depth
        assert len(path) == depth * 3 + 1  # one rank step at a time
        for prof in path:
            assert all(a <= b for a, b in itertools.pairwise(prof))
            assert all(b - a <= 1 for a, b in itertools.pairwise(prof))
        for a, b in itertools.pairwise(path):
            assert sum(b) == sum(a) + 1


@pytest.mark.parametrize("budget", [800.0, 1000.0, 1300.0, 2000.0])
@pytest.mark.parametrize("deadline", [None, 60.0, 90.0])
def test_choice_respects_budgets_and_beats_every_fitting_uniform_plan(
        budget: float, deadline: float | None) -> None:
    cost = TableCost()
    steps = 20
    choice = search_plan(cost, budget, deadline, steps, N_LAYERS, "q,v", CHOICES)
    est = cost.predict(choice.plan)
    assert est.peak_rss_mb <= budget
    if deadline is not None:
        assert est.step_time_s * steps <= deadline
    ranks = ranks_of(choice.plan)
    assert all(a <= b for a, b in itertools.pairwise(ranks)), "ranks must grow toward the output"
    # Brute force over every uniform plan: none that fits has more capacity.
    for depth in range(1, N_LAYERS + 1):
        for r in CHOICES:
            e = cost.predict(LoRAPlan(rank=r, depth=depth))
            if e.peak_rss_mb <= budget and (deadline is None or e.step_time_s * steps <= deadline):
                assert e.trainable_params <= est.trainable_params


def test_choice_is_near_the_brute_force_optimum_over_all_nondecreasing_profiles() -> None:
    cost = TableCost()
    budget, steps, deadline = 1100.0, 10, 40.0
    choice = search_plan(cost, budget, deadline, steps, N_LAYERS, "q,v", CHOICES)
    best = 0
    for depth in range(1, N_LAYERS + 1):
        for prof in itertools.combinations_with_replacement(CHOICES, depth):
            layers = range(N_LAYERS - depth, N_LAYERS)
            e = cost.predict(LoRAPlan(rank=prof[-1], depth=depth,
                                      layer_ranks=dict(zip(layers, prof, strict=True))))
            if e.peak_rss_mb <= budget and e.step_time_s * steps <= deadline:
                best = max(best, e.trainable_params)
    assert best > 0
    assert choice.trainable_params <= best
    assert choice.trainable_params >= 0.9 * best


def test_capacity_is_monotone_in_the_memory_budget_and_the_deadline() -> None:
    cost = TableCost()
    caps = [search_plan(cost, b, None, 20, N_LAYERS, "q,v", CHOICES).trainable_params
            for b in range(560, 2400, 37)]
    assert all(a <= b for a, b in itertools.pairwise(caps))
    assert caps[-1] > caps[0]
    caps_t = [search_plan(cost, 5000.0, d, 20, N_LAYERS, "q,v", CHOICES).trainable_params
              for d in range(31, 200, 7)]
    assert all(a <= b for a, b in itertools.pairwise(caps_t))
    assert caps_t[-1] > caps_t[0]


def test_choice_is_deterministic() -> None:
    a = choose_plan(TableCost(), 1000.0, 70.0, 20, N_LAYERS, "q,v", CHOICES)
    b = choose_plan(TableCost(), 1000.0, 70.0, 20, N_LAYERS, ["v_proj", "q_proj"][::-1],
                    list(reversed(CHOICES)))
    assert a.to_json() == b.to_json()
    assert LoRAPlan.from_json(a.to_json()).to_json() == a.to_json()


def test_generous_budget_takes_everything() -> None:
    plan = choose_plan(TableCost(), 1e9, None, 20, N_LAYERS, "q,v", CHOICES)
    assert plan.depth == N_LAYERS and ranks_of(plan) == [16] * N_LAYERS


def test_nothing_fits_memory_says_what_to_relax() -> None:
    with pytest.raises(NoPlanFitsError) as e:
        choose_plan(TableCost(), 520.0, None, 20, N_LAYERS, "q,v", CHOICES)
    msg = str(e.value)
    assert isinstance(e.value, UserError)
    assert "--memory-budget-mb" in msg and "544" in msg and "520" in msg
    assert "deadline" not in msg


def test_nothing_fits_deadline_says_what_to_relax() -> None:
    # smallest plan: 1 + 0.5 + 0.01*2*1.07 = 1.5214 s/step; 20 steps = 30.4 s
    with pytest.raises(NoPlanFitsError) as e:
        choose_plan(TableCost(), 5000.0, 10.0, 20, N_LAYERS, "q,v", CHOICES)
    msg = str(e.value)
    assert "--round-deadline-s" in msg and "at least 31" in msg
    assert "--steps-per-round to 6" in msg
    assert "memory" not in msg.split("deadline")[0].split("needs")[1]


def test_bad_arguments_are_user_errors() -> None:
    with pytest.raises(UserError):
        choose_plan(TableCost(), 0.0, None, 20, N_LAYERS, "q,v", CHOICES)
    with pytest.raises(UserError):
        choose_plan(TableCost(), 100.0, None, 20, N_LAYERS, "q,v", (0, 4))
    with pytest.raises(UserError):
        choose_plan(TableCost(), 100.0, None, 20, N_LAYERS, "q,zz", CHOICES)
