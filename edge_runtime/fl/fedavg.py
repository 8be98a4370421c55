"""FedAvg over LoRA factors: the homogeneous-rank baseline.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data" (AISTATS 2017), Algorithm 1: w <- sum_k (n_k / n) w_k. Applied to LoRA as in
FedIT / "homogeneous LoRA" baselines: A and B are averaged *separately*,

    B_g = sum_k p_k B_k,  A_g = sum_k p_k A_k,  p_k = n_k / sum_j n_j,

so the new product is (sum p B)(sum p A), not sum p B A (DESIGN.md section 4). Every
client must have the global ranks and alpha; heterogeneous ranks belong to HetLoRA.
"""

from __future__ import annotations

from edge_runtime.adapter import Adapter
from edge_runtime.fl.common import PaddedAccumulator, truncate_to_plan
from edge_runtime.fl.types import (
    ClientPlan,
    ClientUpdate,
    StrategyBase,
    UpdateMismatchError,
)

__all__ = ["FedAvg", "FedAvgAccumulator"]


class FedAvgAccumulator(PaddedAccumulator):
    """Weights n_k; every update must have the global ranks and alpha (homogeneous)."""

    def __init__(self, global_adapter: Adapter) -> None:
        super().__init__(global_adapter, lambda u: float(u.num_samples))

    def add(self, update: ClientUpdate) -> None:
        for name, w in update.adapter.items():
            g = self.global_adapter.get(name)
            if g is not None and (w.rank != g.rank or w.alpha != g.alpha):
                raise UpdateMismatchError(
                    f"fedavg needs homogeneous LoRA: {update.device_id} sent {name} at rank "
                    f"{w.rank}, alpha {w.alpha}; the global is rank {g.rank}, alpha {g.alpha}. "
                    "Use --strategy hetlora for mixed ranks")
        super().add(update)


class FedAvg(StrategyBase):
    """Homogeneous LoRA baseline: every client trains the global ranks."""

    name = "fedavg"

    def distribute(self, global_adapter: Adapter, plan: ClientPlan) -> Adapter:
        for name, r in plan.ranks.items():
            if name in global_adapter and r != global_adapter[name].rank:
                raise UpdateMismatchError(f"fedavg plan for {plan.device_id}: {name} rank {r} "
                                          f"differs from the global rank "
                                          f"{global_adapter[name].rank}")
        return truncate_to_plan(global_adapter, plan)

    def accumulator(self, global_adapter: Adapter, round_index: int = 0) -> FedAvgAccumulator:
        return FedAvgAccumulator(global_adapter)
