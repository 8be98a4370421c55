"""Choose a LoRA plan (depth + per-layer ranks growing toward the output) under budgets.

Objective: the most trainable LoRA parameters ("capacity") such that the predicted peak
resident memory stays under `budget_mb` and `steps_per_round` steps fit in `deadline_s`.
The depth/rank-distribution shape is LEGEND's (Liu et al., arXiv 2412.20004, sec. 4: LoRA
on the top L blocks, ranks non-decreasing toward the output); the search is ours.

Candidates, for every depth d: the uniform profiles (every block at one rank choice) and
the profiles on one fixed path from all-minimum to all-maximum. A step of the path
raises the highest block that can be raised while (a) ranks stay non-decreasing toward
the output and (b) no block sits more than one rank choice above the block below it, so
profiles ramp smoothly, e.g. with choices 4, 8, 16, 32 at d=3: [4,4,4] -> [4,4,8] ->
[4,8,8] -> [4,8,16] -> [8,8,16] -> ... -> [32,32,32]. Every candidate is priced and the
best one that fits wins. Because the candidate set does not depend on the budgets, a
larger budget can only add feasible candidates: the chosen capacity is monotone in the
memory budget and in the deadline. Ties in capacity go to the faster plan, then the
shallower one, then the lower profile, so the choice is deterministic. The candidate set
is a heuristic family (about d * n_choices plans per depth), not every non-decreasing
profile, so the optimum over all profiles can be slightly higher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from edge_runtime.config import LoRAPlan, parse_targets
from edge_runtime.errors import ConfigError, UserError

__all__ = ["PlanCost", "CostEstimate", "Choice", "NoPlanFitsError", "choose_plan", "search_plan",
           "rank_path"]


class NoPlanFitsError(UserError):
    """Not even the smallest LoRA plan fits the memory budget and the round deadline."""


class CostEstimate(Protocol):
    step_time_s: float
    peak_rss_mb: float
    trainable_params: int


class PlanCost(Protocol):
    """Anything that predicts the cost of one training step of a plan."""

    def predict(self, plan: LoRAPlan) -> CostEstimate: ...


@dataclass
class Choice:
    plan: LoRAPlan
    step_time_s: float
    peak_rss_mb: float
    trainable_params: int
    candidates: int


def rank_path(depth: int, n_choices: int) -> list[list[int]]:
    """The sequence of rank-choice index profiles (bottom block first) walked at one depth."""
    idx = [0] * depth
    path = [list(idx)]
    while True:
        for i in range(depth - 1, -1, -1):
            up = idx[i] + 1
            if up >= n_choices:
                continue
            if i < depth - 1 and up > idx[i + 1]:
                continue
            if i > 0 and up > idx[i - 1] + 1:
                continue
            idx[i] = up
            path.append(list(idx))
            break
        else:
            return path


def _plan(n_layers: int, ranks: Sequence[int], targets: tuple[str, ...], alpha: float,
          seed: int) -> LoRAPlan:
    depth = len(ranks)
    layers = range(n_layers - depth, n_layers)
    top = ranks[-1]
    layer_ranks = {} if len(set(ranks)) == 1 else dict(zip(layers, ranks, strict=True))
    return LoRAPlan(rank=top, depth=depth, targets=targets, alpha=alpha,
                    layer_ranks=layer_ranks, seed=seed)


def search_plan(cost: PlanCost, budget_mb: float, deadline_s: float | None,
                steps_per_round: int, n_layers: int, targets: Sequence[str] | str,
                rank_choices: Sequence[int], *, alpha: float = 16.0, seed: int = 0,
                max_depth: int | None = None) -> Choice:
    """`choose_plan` with the predicted cost of the choice. See the module docstring."""
    tg = parse_targets(targets if isinstance(targets, str) else tuple(targets))
    choices = sorted({int(r) for r in rank_choices})
    if not choices or choices[0] <= 0:
        raise ConfigError(f"rank choices must be positive integers, got {list(rank_choices)}")
    if budget_mb <= 0:
        raise ConfigError(f"memory budget must be positive, got {budget_mb} MB")
    if deadline_s is not None and deadline_s <= 0:
        raise ConfigError(f"round deadline must be positive, got {deadline_s} s")
    if steps_per_round <= 0:
        raise ConfigError(f"steps per round must be positive, got {steps_per_round}")
    top_depth = n_layers if max_depth is None else min(max_depth, n_layers)
    limit = math.inf if deadline_s is None else deadline_s

    def fits(est: CostEstimate) -> bool:
        return est.peak_rss_mb <= budget_mb and est.step_time_s * steps_per_round <= limit

    best: Choice | None = None
    best_key: tuple = ()
    smallest: CostEstimate | None = None
    candidates = 0
    for depth in range(1, top_depth + 1):
        profiles = rank_path(depth, len(choices))
        profiles += [[i] * depth for i in range(len(choices)) if [i] * depth not in profiles]
        for idx in profiles:
            plan = _plan(n_layers, [choices[i] for i in idx], tg, alpha, seed)
            est = cost.predict(plan)
            candidates += 1
            if depth == 1 and idx == [0]:
                smallest = est
            if not fits(est):
                continue
            key = (est.trainable_params, -est.step_time_s, -depth, [-i for i in idx])
            if best is None or key > best_key:
                best = Choice(plan, est.step_time_s, est.peak_rss_mb, est.trainable_params, 0)
                best_key = key
    if best is None:
        assert smallest is not None
        need_t = smallest.step_time_s * steps_per_round
        problems = []
        if smallest.peak_rss_mb > budget_mb:
            problems.append(f"needs {smallest.peak_rss_mb:.0f} MB peak memory but the budget is "
                            f"{budget_mb:.0f} MB (raise --memory-budget-mb to at least "
                            f"{math.ceil(smallest.peak_rss_mb)}, or use a smaller --batch-size/"
                            f"--seq-len or a quantized base, --quant int8/int4)")
        if need_t > limit:
            problems.append(f"needs {need_t:.1f} s for {steps_per_round} steps but the round "
                            f"deadline is {limit:.1f} s (raise --round-deadline-s to at least "
                            f"{math.ceil(need_t)}, or lower --steps-per-round to "
                            f"{max(0, int(limit // max(smallest.step_time_s, 1e-9)))}, or use a "
                            f"smaller --batch-size/--seq-len)")
        raise NoPlanFitsError(
            f"no LoRA plan fits: the smallest one (depth 1, rank {choices[0]} on "
            f"{','.join(tg)}) " + "; and ".join(problems or ["does not fit"]))
    best.candidates = candidates
    return best


def choose_plan(cost_model: PlanCost, budget_mb: float, deadline_s: float | None,
                steps_per_round: int, n_layers: int, targets: Sequence[str] | str,
                rank_choices: Sequence[int], *, alpha: float = 16.0, seed: int = 0
                ) -> LoRAPlan:
    """The plan with the most LoRA parameters whose predicted cost fits both budgets.

    Args:
        cost_model: predicts a plan's step time and peak RSS (e.g. `CostModel.bind(...)`).
        budget_mb: peak resident memory allowed for the training process.
        deadline_s: wall-clock time allowed for `steps_per_round` steps (None: no limit).
        n_layers: blocks in the model.
        targets: LoRA targets inside a block (`q,v` or full names).
        rank_choices: ranks a block may get.
    Raises:
        NoPlanFitsError: not even depth 1 at the smallest rank fits; the message says
            what it needs and which flag to relax.
    """
    return search_plan(cost_model, budget_mb, deadline_s, steps_per_round, n_layers, targets,
                       rank_choices, alpha=alpha, seed=seed).plan
