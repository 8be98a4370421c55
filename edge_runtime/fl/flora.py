"""FLoRA: exact aggregation of heterogeneous ranks by stacking.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024, arXiv 2409.05976, sec. 3: the server stacks the
clients' factors, B_s = [p_1 s_1 B_1, ..., p_K s_K B_K] and A_s = [A_1; ...; A_K], so
that B_s A_s = sum_k p_k s_k B_k A_k exactly (no cross terms, unlike averaging B and A
separately); every client merges the stack into its model and starts the next round
from a fresh LoRA (A random, B = 0) of its own rank.

Here the global adapter *is* the running stack: each round's weighted client factors
are appended to it, so the global product after round t is the sum of every round's
exact average. A device applies the stack frozen under its fresh LoRA
(`lora.FrozenDelta`); the paper merges it into W, which is the same function and keeps
a quantized base untouched. The stack's rank grows each round (the download grows with
it: FLoRA's known cost); after each merge it is re-factored by an exact SVD of its
factors (`svd.factored_svd`), dropping only components below `rel_tol` of the largest,
so the rank never exceeds min(d_out, d_in) and nothing is lost. `max_rank` caps it at
the price of exactness.

Weights: p_k = n_k / sum_j n_j over the clients that sent the module (as the
diagnostics' exact aggregate, `fl.diagnostics`).
"""

from __future__ import annotations

import torch

from edge_runtime.adapter import Adapter, LoRAWeights
from edge_runtime.config import FLoRAConfig
from edge_runtime.fl.svd import factored_svd
from edge_runtime.fl.types import (
    ClientPlan,
    ClientUpdate,
    PartialSum,
    StrategyBase,
    UpdateMismatchError,
    check_update,
    from_scaled_b,
    part_shape,
    scaled_b,
)

__all__ = ["FLoRA", "FLoRAAccumulator", "refactor"]


def refactor(sb: torch.Tensor, a: torch.Tensor, alpha: float, *, rel_tol: float,
             max_rank: int = 0, dtype: torch.dtype = torch.float32) -> LoRAWeights:
    """The same product sb @ a as LoRA factors of minimal rank (exact SVD of the factors).

    Components with a singular value below rel_tol x the largest are dropped, then at most
    `max_rank` kept (0: all). B carries the singular values, A's rows are orthonormal. A
    zero product keeps one zero component (a LoRA module has rank >= 1).
    """
    res = factored_svd(sb, a)
    s = res.s
    keep = int((s > rel_tol * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    if max_rank:
        keep = min(keep, max_rank)
    k = max(1, keep)
    new_sb = res.u[:, :k] * s[:k]
    if keep == 0:
        new_sb = torch.zeros_like(new_sb)
    return from_scaled_b(new_sb, res.vh[:k], alpha, dtype)


def _trim_zero(w: LoRAWeights) -> LoRAWeights:
    """A module whose product is exactly zero (round 0) travels as one zero component."""
    if w.rank == 1 or bool(w.lora_b.any()):
        return w
    return LoRAWeights(w.lora_a[:1].clone(), torch.zeros(w.d_out, 1), w.alpha)


class FLoRAAccumulator:
    """Collects the round's weighted scaled factors per module (n_k s_k B_k and A_k, and
    the total weight); `result` stacks them, divided by the total, onto the global."""

    def __init__(self, global_adapter: Adapter, cfg: FLoRAConfig) -> None:
        self.global_adapter = global_adapter
        self.cfg = cfg
        self.b_parts: dict[str, list[torch.Tensor]] = {}
        self.a_parts: dict[str, list[torch.Tensor]] = {}
        self.weight: dict[str, float] = {}
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def _stack(self, name: str, nb: torch.Tensor, a: torch.Tensor, n: float) -> None:
        self.b_parts.setdefault(name, []).append(nb)
        self.a_parts.setdefault(name, []).append(a)
        self.weight[name] = self.weight.get(name, 0.0) + n

    def add(self, update: ClientUpdate) -> None:
        check_update(update, self.global_adapter, allow_subset=True)
        n = float(update.num_samples)
        for name, w in update.adapter.items():
            self._stack(name, n * scaled_b(w), w.lora_a.double(), n)
        self._count += 1

    def partial(self) -> PartialSum:
        out: dict[str, torch.Tensor] = {}
        for name in self.b_parts:
            out[f"{name}/b"] = torch.cat(self.b_parts[name], 1)
            out[f"{name}/a"] = torch.cat(self.a_parts[name], 0)
            out[f"{name}/w"] = torch.tensor([self.weight[name]], dtype=torch.float64)
        return PartialSum("flora", out, self._count)

    def merge(self, partial: PartialSum) -> None:
        mods = partial.expect("flora", self.global_adapter)
        for name, parts in mods.items():
            g = self.global_adapter[name]
            k = int(parts["a"].shape[0]) if "a" in parts else -1
            self._stack(name, part_shape(mods, name, "b", (g.d_out, k)).double(),
                        part_shape(mods, name, "a", (k, g.d_in)).double(),
                        float(part_shape(mods, name, "w", (1,))[0]))
        self._count += partial.count

    def result(self) -> Adapter:
        out: Adapter = {}
        for name, g in self.global_adapter.items():
            total = self.weight.get(name, 0.0)
            if total <= 0.0:
                out[name] = g
                continue
            sb = torch.cat([scaled_b(g)] + [b / total for b in self.b_parts[name]], dim=1)
            a = torch.cat([g.lora_a.double()] + self.a_parts[name], dim=0)
            out[name] = refactor(sb, a, g.alpha, rel_tol=self.cfg.rel_tol,
                                 max_rank=self.cfg.max_rank, dtype=g.lora_a.dtype)
        return out


class FLoRA(StrategyBase):
    """Stacking: the global is the exact running sum; devices train fresh adapters on it."""

    name = "flora"
    ranks_capped_by_global = False

    def __init__(self, cfg: FLoRAConfig | None = None) -> None:
        self.cfg = cfg or FLoRAConfig()

    def distribute(self, global_adapter: Adapter, plan: ClientPlan) -> Adapter:
        """The whole stack (every module: the device applies all of it, frozen)."""
        for name in plan.ranks:
            if name not in global_adapter:
                raise UpdateMismatchError(f"plan for {plan.device_id} names {name}, which the "
                                          "global adapter lacks")
        return {n: _trim_zero(w) for n, w in global_adapter.items()}

    def local_start(self, received: Adapter, plan: ClientPlan, seed: int
                    ) -> tuple[Adapter | None, Adapter]:
        """(the received stack, frozen; a fresh LoRA of the plan's ranks: A seeded, B = 0)."""
        from edge_runtime.lora import seeded_lora_a

        fresh: Adapter = {}
        for name, r in plan.ranks.items():
            if name not in received:
                raise UpdateMismatchError(f"the received global lacks {name}, which the plan "
                                          "names; the download is for another plan")
            g = received[name]
            fresh[name] = LoRAWeights(seeded_lora_a(seed, name, r, g.d_in),
                                      torch.zeros(g.d_out, r), plan.alpha)
        return received, fresh

    def exact_prior(self, global_adapter: Adapter) -> Adapter | None:
        return global_adapter

    def accumulator(self, global_adapter: Adapter, round_index: int = 0) -> FLoRAAccumulator:
        return FLoRAAccumulator(global_adapter, self.cfg)
