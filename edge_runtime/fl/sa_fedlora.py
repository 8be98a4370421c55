"""SA-FedLoRA: an initiating stage against drift, then an annealed rank budget.

Yang et al., "SA-FedLoRA: Adaptive Parameter Allocation for Efficient Federated
Learning with LoRA Tuning", arXiv 2405.09394 (v1). Two stages:
- *initiating*: for the first rounds, clients add a proximal term
  mu/2 ||theta - theta_g||^2 to the loss (the FedProx form, Li et al., MLSys 2020,
  eq. 2), theta the client's LoRA factors and theta_g the ones it received;
- *annealing*: a total rank budget held at b_0 ("heating"), shrunk on a schedule,
  then held at b_T ("cooling"); the components kept are the most important ones.

The paper's code is unpublished and its equations were not available to us, so these
are our choices, each a standard form (documented in docs/STRATEGIES.md):
1. Budget schedule (the cubic decay of AdaLoRA, Zhang et al., ICLR 2023, eq. 11):
   b(t) = b_0 for t < t_h; b_T for t >= T - t_c; otherwise
   b(t) = b_T + (b_0 - b_T) (1 - (t - t_h) / (T - t_h - t_c))^3, rounded up.
   b_0 = sum of the global ranks at round 0; b_T = ceil(final_fraction * b_0).
2. Aggregation in product space, like FlexLoRA: dW_m = sum_k p_k s_k B_k A_k per module
   (p_k = n_k / sum n over the clients that sent module m), computed exactly from the
   factors (`edge_runtime.fl.svd.factored_svd`).
3. Importance of component i of module m = its singular value sigma_{m,i} of dW_m. Keeping
   the b(t) components of largest sigma over all modules (each module keeps >= r_min)
   maximises the retained energy sum sigma^2 for the budget (Eckart-Young per module,
   greedy across modules since energies add), and needs no gradient statistics from
   clients (AdaLoRA's sensitivity scores would need them on the wire).
The global adapter after round t holds b(t + 1) components: the budget of the next round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from edge_runtime.adapter import Adapter
from edge_runtime.config import FlexLoRAConfig, FlexMode, SAFedLoRAConfig
from edge_runtime.errors import ConfigError
from edge_runtime.fl.flexlora import FlexLoRAAccumulator, best_rank_r, svd_to_lora
from edge_runtime.fl.svd import SVDResult, factored_svd
from edge_runtime.fl.types import (
    ClientPlan,
    ClientUpdate,
    PartialSum,
    Regularizer,
    StrategyBase,
)

__all__ = [
    "SAFedLoRA",
    "SAFedLoRAAccumulator",
    "rank_budget",
    "in_initiating_stage",
    "proximal_term",
    "make_proximal_regularizer",
    "allocate_by_importance",
    "starting_budget",
]


def rank_budget(t: int, b0: int, cfg: SAFedLoRAConfig) -> int:
    """Total rank budget of round t (0-based) of cfg.rounds: heating, cubic decay, cooling."""
    b_end = max(1, math.ceil(cfg.final_fraction * b0))
    t_h, t_c, big_t = cfg.heat_rounds, cfg.cool_rounds, cfg.rounds
    if t < t_h:
        return b0
    if t >= big_t - t_c:
        return b_end
    span = big_t - t_h - t_c
    frac = 1.0 - (t - t_h) / span
    return min(b0, math.ceil(b_end + (b0 - b_end) * frac**3 - 1e-9))


def in_initiating_stage(t: int, cfg: SAFedLoRAConfig) -> bool:
    """True while the proximal term is on (the first `init_rounds` rounds)."""
    return t < cfg.init_rounds


def proximal_term(model_or_modules: nn.Module | Mapping[str, nn.Module], start: Adapter,
                  mu: float) -> torch.Tensor:
    """mu/2 sum_m (||A_m - A_m^g||_F^2 + ||B_m - B_m^g||_F^2) from the live LoRA parameters.

    Raises:
        KeyError: a LoRA module of the model is not in `start` (every module is checked).
    """
    from edge_runtime.lora import lora_modules

    mods = (dict(lora_modules(model_or_modules)) if isinstance(model_or_modules, nn.Module)
            else dict(model_or_modules))
    missing = set(mods) ^ set(start)
    if missing:
        raise KeyError(f"proximal term: module sets differ, e.g. {sorted(missing)[0]}")
    total: torch.Tensor = torch.zeros(())
    for name, m in mods.items():
        a: torch.Tensor = m.lora_a  # type: ignore[assignment]  # (r, d_in)
        b: torch.Tensor = m.lora_b  # type: ignore[assignment]  # (d_out, r)
        g = start[name]
        total = total + ((a - g.lora_a.to(a)) ** 2).sum() + ((b - g.lora_b.to(b)) ** 2).sum()
    return 0.5 * mu * total


def make_proximal_regularizer(start: Adapter, mu: float) -> Regularizer:
    """A `regularizer(model)` for the trainer: the initiating stage's proximal term."""
    frozen = {n: w.clone() for n, w in start.items()}

    def regularizer(model: nn.Module) -> torch.Tensor:
        return proximal_term(model, frozen, mu)

    return regularizer


def allocate_by_importance(spectra: Mapping[str, torch.Tensor], budget: int,
                           caps: Mapping[str, int], r_min: int) -> dict[str, int]:
    """Ranks per module keeping the `budget` largest singular values overall.

    Each module keeps at least min(r_min, cap) and at most its cap (its global rank).
    Ties break by module name then index, so the result is deterministic.
    """
    ranks = {n: min(r_min, caps[n]) for n in spectra}
    left = budget - sum(ranks.values())
    cands: list[tuple[float, str, int]] = []
    for n, s in spectra.items():
        for i in range(ranks[n], caps[n]):
            val = float(s[i]) if i < s.shape[0] else 0.0
            cands.append((-val, n, i))
    cands.sort()
    for _, n, _i in cands[: max(left, 0)]:
        ranks[n] += 1
    return ranks


class SAFedLoRAAccumulator:
    """Product-space running sums (FlexLoRA's factored/streaming state), closed by importance."""

    def __init__(self, global_adapter: Adapter, cfg: SAFedLoRAConfig, b0: int,
                 round_index: int, flex: FlexLoRAConfig | None = None) -> None:
        self.global_adapter = global_adapter
        self.cfg = cfg
        self.b0 = b0
        self.round_index = round_index
        self._inner = FlexLoRAAccumulator(global_adapter, flex or FlexLoRAConfig(mode=FlexMode.FACTORED))

    @property
    def count(self) -> int:
        return self._inner.count

    def add(self, update: ClientUpdate) -> None:
        self._inner.add(update)

    def partial(self) -> PartialSum:
        return self._inner.partial()

    def merge(self, partial: PartialSum) -> None:
        self._inner.merge(partial)

    def result(self) -> Adapter:
        """Next global adapter: b(t + 1) components by importance; unchanged if empty."""
        if self._inner.count == 0:
            return {n: w.clone() for n, w in self.global_adapter.items()}
        agg = self._inner.result()  # SVD form at each module's current global rank
        spectra: dict[str, torch.Tensor] = {}
        svds: dict[str, SVDResult] = {}
        for name, w in agg.items():
            res = factored_svd(w.lora_b.double() * w.scale, w.lora_a.double())
            svds[name] = res
            spectra[name] = res.s
        budget = rank_budget(self.round_index + 1, self.b0, self.cfg)
        caps = {n: w.rank for n, w in self.global_adapter.items()}
        ranks = allocate_by_importance(spectra, budget, caps, self.cfg.r_min)
        return {n: svd_to_lora(svds[n], ranks[n], w.alpha, dtype=w.lora_a.dtype)
                for n, w in agg.items()}


def starting_budget(cfg: SAFedLoRAConfig, global_adapter: Adapter, round_index: int) -> int:
    """b_0: `cfg.b0`, or at round 0 the sum of the global adapter's ranks.

    Raises:
        ConfigError: after round 0 with `cfg.b0` unset (the global has shrunk since; the
            server fixes b0 when a run starts, `resolve_b0`).
    """
    if cfg.b0 is not None:
        return cfg.b0
    if round_index == 0:
        return sum(w.rank for w in global_adapter.values())
    raise ConfigError("SA-FedLoRA's starting budget b0 is unset after round 0; fix it when "
                      "the run starts (SAFedLoRAConfig.b0 = sum of the round-0 global ranks)")


class SAFedLoRA(StrategyBase):
    """SA-FedLoRA strategy: stateless; its starting budget is `cfg.b0` (see `starting_budget`)."""

    name = "sa-fedlora"

    def __init__(self, cfg: SAFedLoRAConfig | None = None) -> None:
        self.cfg = cfg or SAFedLoRAConfig()

    def distribute(self, global_adapter: Adapter, plan: ClientPlan) -> Adapter:
        """Best rank-min(r_plan, r_global) approximation of each planned module."""
        out: Adapter = {}
        for name, r in plan.ranks.items():
            g = global_adapter[name]
            out[name] = best_rank_r(g, min(r, g.rank), plan.alpha)
        return out

    def regularizer(self, start: Adapter, plan: ClientPlan,
                    round_index: int) -> Regularizer | None:
        if not in_initiating_stage(round_index, self.cfg) or self.cfg.mu == 0:
            return None
        return make_proximal_regularizer(start, self.cfg.mu)

    def accumulator(self, global_adapter: Adapter, round_index: int = 0) -> SAFedLoRAAccumulator:
        return SAFedLoRAAccumulator(global_adapter, self.cfg,
                                    starting_budget(self.cfg, global_adapter, round_index),
                                    round_index)
