"""HetLoRA: heterogeneous-rank LoRA with zero-padding, sparsity weights and self-pruning.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", arXiv 2401.06432:
- distribution by truncation of the rank-r_max global adapter (sec. 3.2):
  B_k = B_g[:, :r_k], A_k = A_g[:r_k, :];
- aggregation by zero-padding every client to r_max and a weighted average of the
  padded factors with *sparsity-weighted* weights (sec. 3.3)
  p_k = S_k / sum_j S_j,  S_k = ||s_k B_k A_k||_F  (over the whole adapter);
- local rank self-pruning (sec. 3.2): a regulariser on the tail components and a
  rule that truncates the rank when the tail shrank.

The paper's pruning equations were not available to us; the forms below follow the
consensus of public reimplementations (DESIGN.md section 4), with one choice of ours:
the tail starts at k = min(floor(gamma r), r - 1), the same index for the penalty and
for the prune, so a rank-4 module with gamma 0.9 has a one-component tail instead of
an empty one (ceil(0.9 * 4) = 4 would leave nothing to penalise).

Scaling convention (`edge_runtime.fl.types`): padded sums are of s_k B_k and A_k, and
B is divided by the receiving scale alpha / r on the way out.

||B A||_F is computed without forming B A (`adapter.frobenius_norm_ba`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from edge_runtime.adapter import Adapter, LoRAWeights
from edge_runtime.config import HetLoRAConfig, Weighting
from edge_runtime.fl.common import PaddedAccumulator, truncate_to_plan
from edge_runtime.fl.types import (
    ClientPlan,
    ClientUpdate,
    Regularizer,
    StrategyBase,
)

__all__ = [
    "HetLoRA",
    "HetLoRAAccumulator",
    "sparsity_score",
    "tail_start",
    "tail_penalty",
    "make_tail_regularizer",
    "tail_norms",
    "prune_ranks",
    "prune_adapter",
]


def sparsity_score(adapter: Adapter) -> float:
    """S_k = ||s_k B_k A_k||_F over the whole adapter (sqrt of the sum over modules)."""
    return math.sqrt(sum(w.delta_norm() ** 2 for w in adapter.values()))


def tail_start(rank: int, gamma: float) -> int:
    """First tail index k = min(floor(gamma r), r - 1), at least 1 (a rank-1 module keeps it)."""
    return max(1, min(int(math.floor(gamma * rank)), rank - 1))


def _lora_of(model_or_modules: nn.Module | Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    from edge_runtime.lora import lora_modules

    if isinstance(model_or_modules, nn.Module):
        return dict(lora_modules(model_or_modules))
    return dict(model_or_modules)


def tail_penalty(model_or_modules: nn.Module | Mapping[str, nn.Module], gamma: float,
                 lam: float) -> torch.Tensor:
    """lam * sum_m ||B_m[:, k:]||_F ||A_m[k:, :]||_F over the LoRA modules (live parameters).

    Computed from `lora_a` / `lora_b` themselves (never `.data`), so it has a gradient.
    Modules of rank 1 have no tail and contribute 0.
    """
    mods = _lora_of(model_or_modules)
    total: torch.Tensor | None = None
    for m in mods.values():
        a: torch.Tensor = m.lora_a  # type: ignore[assignment]  # (r, d_in)
        b: torch.Tensor = m.lora_b  # type: ignore[assignment]  # (d_out, r)
        r = int(a.shape[0])
        if r < 2:
            continue
        k = tail_start(r, gamma)
        term = torch.linalg.vector_norm(b[:, k:]) * torch.linalg.vector_norm(a[k:, :])
        total = term if total is None else total + term
    if total is None:  # nothing to penalise; still a valid target for .backward()
        return torch.zeros((), requires_grad=True)
    return lam * total


def make_tail_regularizer(cfg: HetLoRAConfig) -> Callable[[nn.Module], torch.Tensor]:
    """A `regularizer(model)` for `edge_runtime.trainer.train` adding the HetLoRA tail penalty."""

    def regularizer(model: nn.Module) -> torch.Tensor:
        return tail_penalty(model, cfg.gamma, cfg.lam)

    return regularizer


def tail_norms(adapter: Adapter, gamma: float) -> dict[str, float]:
    """Per module ||B[:, k:]||_F ||A[k:, :]||_F (0 for rank 1): the quantity the prune rule watches."""
    out: dict[str, float] = {}
    for name, w in adapter.items():
        if w.rank < 2:
            out[name] = 0.0
            continue
        k = tail_start(w.rank, gamma)
        out[name] = float(torch.linalg.vector_norm(w.lora_b[:, k:].double())
                          * torch.linalg.vector_norm(w.lora_a[k:, :].double()))
    return out


def prune_ranks(before: Mapping[str, float], after: Mapping[str, float],
                ranks: Mapping[str, int], cfg: HetLoRAConfig) -> dict[str, int]:
    """The rank each module keeps after local training.

    Rule: if the module's tail norm fell during local training (after < before), the
    tail is dropped: r <- max(r_min, k) with k = tail_start(r, gamma); otherwise, and
    when pruning is off, r stays. A module already at or below r_min stays.
    """
    out: dict[str, int] = {}
    for name, r in ranks.items():
        new_r = r
        if cfg.prune and r > cfg.r_min and after[name] < before[name]:
            new_r = max(cfg.r_min, tail_start(r, cfg.gamma))
        out[name] = new_r
    return out


def prune_adapter(adapter: Adapter, ranks: Mapping[str, int]) -> Adapter:
    """Truncate each module to its new rank, keeping the product's scale convention.

    The kept components keep their product s_new B_new A_new = s_old B[:, :k] A[:k],
    i.e. B is rescaled by s_old / s_new = k / r (same alpha).
    """
    out: Adapter = {}
    for name, w in adapter.items():
        k = ranks[name]
        if k == w.rank:
            out[name] = w.clone()
            continue
        sb = w.lora_b[:, :k].double() * w.scale
        out[name] = LoRAWeights(w.lora_a[:k].clone(), (sb * (k / w.alpha)).to(w.lora_b.dtype),
                                w.alpha)
    return out


_WEIGHTS: dict[Weighting, Callable[[ClientUpdate], float]] = {
    Weighting.SPARSITY: lambda u: sparsity_score(u.adapter),
    Weighting.SAMPLES: lambda u: float(u.num_samples),
    Weighting.UNIFORM: lambda u: 1.0,
}


class HetLoRAAccumulator(PaddedAccumulator):
    """Weights S_k = ||s_k B_k A_k||_F (sparsity-weighted aggregation, sec. 3.3), or the
    ablations' weights; zero-padded, or rank-wise (`HetLoRAConfig`)."""

    def __init__(self, global_adapter: Adapter, cfg: HetLoRAConfig | None = None) -> None:
        cfg = cfg or HetLoRAConfig()
        super().__init__(global_adapter, _WEIGHTS[cfg.weighting], rankwise=cfg.rankwise)


class HetLoRA(StrategyBase):
    """HetLoRA strategy: truncation out, sparsity-weighted zero-padded average in."""

    name = "hetlora"

    def __init__(self, cfg: HetLoRAConfig | None = None) -> None:
        self.cfg = cfg or HetLoRAConfig()

    def distribute(self, global_adapter: Adapter, plan: ClientPlan) -> Adapter:
        return truncate_to_plan(global_adapter, plan)

    def regularizer(self, start: Adapter, plan: ClientPlan,
                    round_index: int) -> Regularizer | None:
        if not self.cfg.prune or self.cfg.lam == 0:
            return None
        return make_tail_regularizer(self.cfg)

    def finish_local(self, start: Adapter, trained: Adapter, plan: ClientPlan) -> Adapter:
        """Self-prune: drop each module's tail if its norm fell during local training."""
        if not self.cfg.prune:
            return trained
        new_ranks = prune_ranks(tail_norms(start, self.cfg.gamma),
                                tail_norms(trained, self.cfg.gamma),
                                {n: w.rank for n, w in trained.items()}, self.cfg)
        return prune_adapter(trained, new_ranks)

    def accumulator(self, global_adapter: Adapter, round_index: int = 0) -> HetLoRAAccumulator:
        return HetLoRAAccumulator(global_adapter, self.cfg)
