"""Shared by the factor-wise strategies (FedAvg, HetLoRA, LEGEND): truncation out, one
weighted zero-padded accumulator in (each strategy only chooses the weights)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from edge_runtime.adapter import Adapter, LoRAWeights
from edge_runtime.fl.types import (
    ClientPlan,
    ClientUpdate,
    PartialSum,
    UpdateMismatchError,
    check_update,
    from_scaled_b,
    part_shape,
    scaled_b,
)

__all__ = ["truncate_to_plan", "PaddedSum", "PaddedAccumulator"]


def truncate_to_plan(global_adapter: Adapter, plan: ClientPlan) -> Adapter:
    """The client's starting adapter: the first r_k components of each planned module.

    B_k = (s_g / s_k) B_g[:, :r_k], A_k = A_g[:r_k, :], so s_k B_k A_k equals the
    truncation s_g B_g[:, :r_k] A_g[:r_k, :] (HetLoRA, Cho et al. 2024, sec. 3.2).

    Raises:
        UpdateMismatchError: a planned module is not in the global adapter, or its
            planned rank exceeds the global rank.
    """
    out: Adapter = {}
    for name, r in plan.ranks.items():
        if name not in global_adapter:
            raise UpdateMismatchError(f"plan for {plan.device_id} names {name}, which the global "
                                      "adapter lacks; build the global adapter from the fleet's "
                                      "widest plan")
        g = global_adapter[name]
        if r > g.rank:
            raise UpdateMismatchError(f"plan for {plan.device_id}: {name} rank {r} is above the "
                                      f"global rank {g.rank}; raise the global r_max")
        sb = scaled_b(g)[:, :r]  # (d_out, r)
        out[name] = from_scaled_b(sb, g.lora_a[:r].double(), plan.alpha, g.lora_a.dtype)
    return out


class PaddedSum:
    """Running weighted sums of zero-padded s B (d_out, r_g) and A (r_g, d_in) per module.

    `add(name, w, weight)` folds one client's module in; `result()` divides each module
    by its own total weight (modules nobody sent keep the global factors). With
    `rankwise`, component i of a module is divided by the weight of the clients that
    sent component i (the ones of rank > i); a component nobody sent keeps the global's.
    Memory: one global-sized adapter plus one weight per module component.
    """

    def __init__(self, global_adapter: Adapter, *, rankwise: bool = False) -> None:
        self.global_adapter = global_adapter
        self.rankwise = rankwise
        self.sum_b: dict[str, torch.Tensor] = {}
        self.sum_a: dict[str, torch.Tensor] = {}
        self.weight: dict[str, float] = {}
        self.component_weight: dict[str, torch.Tensor] = {}  # (r_g,) per module

    def add(self, name: str, w: LoRAWeights, weight: float) -> None:
        g = self.global_adapter[name]
        r_g = g.rank
        if w.rank > r_g:
            raise UpdateMismatchError(f"{name}: client rank {w.rank} above global rank {r_g}")
        sb = scaled_b(w)  # (d_out, r_k), float64
        a = w.lora_a.double()  # (r_k, d_in)
        if name not in self.sum_b:
            self._zeros(name)
        self.sum_b[name][:, : w.rank] += weight * sb
        self.sum_a[name][: w.rank] += weight * a
        self.weight[name] += weight
        self.component_weight[name][: w.rank] += weight

    def _zeros(self, name: str) -> None:
        g = self.global_adapter[name]
        self.sum_b[name] = torch.zeros(g.d_out, g.rank, dtype=torch.float64)
        self.sum_a[name] = torch.zeros(g.rank, g.d_in, dtype=torch.float64)
        self.weight[name] = 0.0
        self.component_weight[name] = torch.zeros(g.rank, dtype=torch.float64)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The running sums as `{module}/{sb,a,w,cw}` (float64)."""
        out: dict[str, torch.Tensor] = {}
        for name in self.sum_b:
            out[f"{name}/sb"] = self.sum_b[name]
            out[f"{name}/a"] = self.sum_a[name]
            out[f"{name}/w"] = torch.tensor([self.weight[name]], dtype=torch.float64)
            out[f"{name}/cw"] = self.component_weight[name]
        return out

    def merge(self, mods: dict[str, dict[str, torch.Tensor]]) -> None:
        """Add another PaddedSum's `tensors()` (checked against this global's shapes)."""
        for name in mods:
            g = self.global_adapter[name]
            parts = {p: part_shape(mods, name, p, s).double() for p, s in
                     (("sb", (g.d_out, g.rank)), ("a", (g.rank, g.d_in)), ("w", (1,)),
                      ("cw", (g.rank,)))}
            if name not in self.sum_b:
                self._zeros(name)
            self.sum_b[name] += parts["sb"]
            self.sum_a[name] += parts["a"]
            self.weight[name] += float(parts["w"][0])
            self.component_weight[name] += parts["cw"]

    def result(self) -> Adapter:
        out: Adapter = {}
        for name, g in self.global_adapter.items():
            tot = self.weight.get(name, 0.0)
            if tot <= 0.0:
                out[name] = g.clone()
                continue
            if not self.rankwise:
                out[name] = from_scaled_b(self.sum_b[name] / tot, self.sum_a[name] / tot,
                                          g.alpha, g.lora_a.dtype)
                continue
            cw = self.component_weight[name]  # (r_g,)
            sent = cw > 0
            sb, a = scaled_b(g).clone(), g.lora_a.double().clone()
            sb[:, sent] = self.sum_b[name][:, sent] / cw[sent]
            a[sent] = self.sum_a[name][sent] / cw[sent, None]
            out[name] = from_scaled_b(sb, a, g.alpha, g.lora_a.dtype)
        return out


class PaddedAccumulator:
    """The one weighted zero-padded accumulator: running sums of w_k pad(s_k B_k) and
    w_k pad(A_k) per module, divided at `result()` by the module's total weight.

    Args:
        global_adapter: the round's global (r_max per module).
        weight: w_k of an update (FedAvg and LEGEND: n_k; HetLoRA: its sparsity score).
        allow_subset: an update without a plan may send any subset of the modules (LEGEND:
            each module is averaged over the devices that trained it).
        rankwise: each rank component averaged over the clients that have it
            (`PaddedSum`).
    """

    def __init__(self, global_adapter: Adapter, weight: Callable[[ClientUpdate], float], *,
                 allow_subset: bool = False, rankwise: bool = False) -> None:
        self.global_adapter = global_adapter
        self.weight = weight
        self.allow_subset = allow_subset
        self._sum = PaddedSum(global_adapter, rankwise=rankwise)
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def denominators(self) -> dict[str, float]:
        """{module: total weight of the updates that sent it} so far."""
        return dict(self._sum.weight)

    def add(self, update: ClientUpdate) -> None:
        check_update(update, self.global_adapter,
                     allow_subset=self.allow_subset and update.plan is None)
        w = self.weight(update)
        for name, lw in update.adapter.items():
            self._sum.add(name, lw, w)
        self._count += 1

    def result(self) -> Adapter:
        """The weighted average; modules nobody sent keep the global factors."""
        return self._sum.result()

    def partial(self) -> PartialSum:
        return PartialSum("padded", self._sum.tensors(), self._count)

    def merge(self, partial: PartialSum) -> None:
        self._sum.merge(partial.expect("padded", self.global_adapter))
        self._count += partial.count
