"""Robust aggregation: coordinate-wise median or trimmed mean instead of the weighted mean.

Selected per run (`fleet.robust`: `median`, `trimmed-mean:0.2`), for the strategies
whose aggregate is an average:

- factor-wise ones (fedavg, hetlora, legend): over the zero-padded factors `s_k B_k`
  (d_out, r_g) and `A_k` (r_g, d_in) of the devices that sent each module, element by
  element (Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018: coordinate-wise
  median and trimmed mean);
- flexlora: over the devices' dense products `s_k B_k A_k` (d_out, d_in), then the best
  rank-r_g approximation as FlexLoRA redistributes it.

The statistics are unweighted: a device's sample count or sparsity score does not count
(that is what makes them robust to an inflated claim), so on a clean fleet they cost the
weighting's benefit (docs/RESULTS.md measures it). SA-FedLoRA (its budget needs the
aggregate's spectrum per round) and FLoRA (an exact stack has no median) are refused.
Memory: every update of the round is held (one padded adapter per device; FlexLoRA: one
dense matrix per module per device): for studies and small fleets.
"""

from __future__ import annotations

import math

import torch

from edge_runtime.adapter import Adapter
from edge_runtime.config import ROBUST_FACTOR_STRATEGIES, StrategyName, check_robust
from edge_runtime.errors import ConfigError
from edge_runtime.fl.types import (
    ClientUpdate,
    PartialSum,
    check_update,
    from_scaled_b,
    pad_cols,
    pad_rows,
    scaled_b,
)

__all__ = ["robust_stat", "RobustFactorAccumulator",
           "RobustProductAccumulator", "robust_accumulator"]


def robust_stat(x: torch.Tensor, mode: str, beta: float = 0.0) -> torch.Tensor:
    """Coordinate-wise statistic over dim 0 of x (K, ...): the median (mean of the two
    middle values when K is even) or the mean after dropping floor(beta K) values at
    each end."""
    k = x.shape[0]
    xs = torch.sort(x, dim=0).values
    if mode == "median":
        lo, hi = (k - 1) // 2, k // 2
        return 0.5 * (xs[lo] + xs[hi])
    cut = int(math.floor(beta * k))
    return xs[cut: k - cut].mean(dim=0)


class _Stacks:
    def __init__(self, global_adapter: Adapter, allow_subset: bool) -> None:
        self.global_adapter = global_adapter
        self.allow_subset = allow_subset
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def partial(self) -> PartialSum:
        raise ConfigError("a robust statistic (fleet.robust) is not a sum over devices, so "
                          "sites cannot pre-aggregate it; set fleet.robust = 'none' for "
                          "hierarchical aggregation")

    def merge(self, partial: PartialSum) -> None:
        self.partial()

    def _check(self, update: ClientUpdate) -> None:
        check_update(update, self.global_adapter,
                     allow_subset=self.allow_subset and update.plan is None)
        self._count += 1


class RobustFactorAccumulator(_Stacks):
    """Coordinate-wise statistic over the zero-padded factors of the factor-wise strategies."""

    def __init__(self, global_adapter: Adapter, mode: str, beta: float = 0.0,
                 allow_subset: bool = False) -> None:
        super().__init__(global_adapter, allow_subset)
        self.mode, self.beta = mode, beta
        self.b: dict[str, list[torch.Tensor]] = {}
        self.a: dict[str, list[torch.Tensor]] = {}

    def add(self, update: ClientUpdate) -> None:
        self._check(update)
        for name, w in update.adapter.items():
            r_g = self.global_adapter[name].rank
            self.b.setdefault(name, []).append(pad_cols(scaled_b(w), r_g))
            self.a.setdefault(name, []).append(pad_rows(w.lora_a.double(), r_g))

    def result(self) -> Adapter:
        out: Adapter = {}
        for name, g in self.global_adapter.items():
            if name not in self.b:
                out[name] = g.clone()
                continue
            sb = robust_stat(torch.stack(self.b[name]), self.mode, self.beta)
            a = robust_stat(torch.stack(self.a[name]), self.mode, self.beta)
            out[name] = from_scaled_b(sb, a, g.alpha, g.lora_a.dtype)
        return out


class RobustProductAccumulator(_Stacks):
    """Coordinate-wise statistic over dense products, redistributed at the global rank."""

    def __init__(self, global_adapter: Adapter, mode: str, beta: float = 0.0) -> None:
        super().__init__(global_adapter, False)
        self.mode, self.beta = mode, beta
        self.p: dict[str, list[torch.Tensor]] = {}

    def add(self, update: ClientUpdate) -> None:
        self._check(update)
        for name, w in update.adapter.items():
            self.p.setdefault(name, []).append(w.delta())

    def result(self) -> Adapter:
        from edge_runtime.fl.flexlora import svd_to_lora
        from edge_runtime.fl.svd import dense_svd

        out: Adapter = {}
        for name, g in self.global_adapter.items():
            if name not in self.p:
                out[name] = g.clone()
                continue
            d = robust_stat(torch.stack(self.p[name]), self.mode, self.beta)
            out[name] = svd_to_lora(dense_svd(d, g.rank), g.rank, g.alpha,
                                    dtype=g.lora_a.dtype)
        return out


def robust_accumulator(name: StrategyName, global_adapter: Adapter, spec: str
                       ) -> RobustFactorAccumulator | RobustProductAccumulator | None:
    """The robust accumulator `spec` for strategy `name`; None for `none`.

    Raises:
        ConfigError: the strategy has no robust form here.
    """
    mode, beta = check_robust(name, spec)
    if mode == "none":
        return None
    if name in ROBUST_FACTOR_STRATEGIES:
        return RobustFactorAccumulator(global_adapter, mode, beta,
                                       allow_subset=name is StrategyName.LEGEND)
    return RobustProductAccumulator(global_adapter, mode, beta)
