"""FlexLoRA: aggregate full-size updates, redistribute by truncated SVD at each client's rank.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", arXiv 2402.11505, sec. 3: the server forms the full-size update
dW = sum_k p_k s_k B_k A_k with p_k = n_k / sum_j n_j (eq. 4), and gives a client of
rank r the truncated SVD B_r = U_r diag(S_r) / s_r, A_r = V_r^T (eq. 5; all singular
values in B as the official code does; a sqrt(S) split has the same product).

Unlike the official code (dense sum + full SVD of every d_out x d_in matrix), the
round's result is computed by one of:
- `factored` (exact): while the stacked rank R = sum r_k < min(d_out, d_in), keep the
  stacked factors and take the SVD from a QR of each stack and an R x R core
  (`edge_runtime.fl.svd.factored_svd`); no d_out x d_in matrix is formed.
- `streaming`: fold every update into a dense running sum *and its Gram matrix* (of the
  smaller side, float64) as it arrives, O(d_out d_in r_k) each; at round close take the
  top r_max eigenpairs of the Gram and one Rayleigh-Ritz step (`fl.svd.gram_svd`): a
  partial eigensolve of a min(d_out, d_in)-square matrix instead of a full SVD. Its
  residual ||dW - dW_r||_F / ||dW||_F is reported (`FlexLoRAAccumulator.report`).
- `randomized`: dense sum, then randomized subspace iteration until the top singular
  values settle (slower than `streaming` on the flat spectra of many random updates).
- `full`: dense sum + full SVD, the reference.
`auto` starts factored and switches a module to streaming when its R reaches
min(d_out, d_in); a module whose smaller side is at most 2 r_max (e.g. 128-row k/v
projections at r_max 64) takes a dense SVD at close instead of keeping a Gram.

The global adapter is kept at rank r_max per module in SVD form (A rows orthonormal,
B = U S / s), so distributing to rank r <= r_max by the factored SVD of the global is
the best rank-r approximation of dW (Eckart-Young) and costs O((d_out + d_in) r_max^2).
Modules with a per-module denominator: a module is averaged over the clients that sent it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edge_runtime.adapter import Adapter, LoRAWeights
from edge_runtime.config import FlexLoRAConfig
from edge_runtime.fl.svd import (
    SVDResult,
    dense_svd,
    factored_svd,
    gram_svd,
    orthonormal_completion,
    randomized_svd,
)
from edge_runtime.fl.types import (
    ClientPlan,
    ClientUpdate,
    PartialSum,
    StrategyBase,
    UpdateMismatchError,
    check_update,
    part_shape,
)

__all__ = ["FlexLoRA", "FlexLoRAAccumulator", "svd_to_lora",
           "best_rank_r", "ModuleReport"]


def svd_to_lora(res: SVDResult, rank: int, alpha: float, *, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> LoRAWeights:
    """LoRA factors of rank `rank` from SVD triplets: B = U S / s, A = Vh, s = alpha / rank.

    Fewer triplets than `rank` are padded with zero B columns and orthonormal A rows.
    """
    k = min(rank, res.s.shape[0])
    s = alpha / rank
    d_out = res.u.shape[0]
    b = torch.zeros(d_out, rank, dtype=torch.float64)
    b[:, :k] = res.u[:, :k].double() * res.s[:k].double() / s  # (d_out, rank)
    a = orthonormal_completion(res.vh[:k].double(), rank, seed=seed)  # (rank, d_in)
    return LoRAWeights(a.to(dtype).contiguous(), b.to(dtype).contiguous(), alpha)


def best_rank_r(w: LoRAWeights, rank: int, alpha: float, *, seed: int = 0) -> LoRAWeights:
    """The best rank-r approximation of s B A (Eckart-Young) as LoRA factors at scale alpha/r.

    An all-zero B (a fresh adapter) is truncated instead, keeping the seeded A rows.
    """
    if rank > w.rank:
        raise UpdateMismatchError(f"requested rank {rank} is above the global rank {w.rank}")
    if not bool(w.lora_b.any()):
        b = torch.zeros(w.d_out, rank, dtype=w.lora_b.dtype)
        return LoRAWeights(w.lora_a[:rank].clone(), b, alpha)
    res = factored_svd(w.lora_b.double() * w.scale, w.lora_a.double(), rank)
    return svd_to_lora(res, rank, alpha, seed=seed, dtype=w.lora_a.dtype)


@dataclass
class ModuleReport:
    """How one module's round was closed."""

    path: str  # factored | randomized | full | unchanged
    stacked_rank: int
    clients: int
    power_iters: int = 0
    residual_rel: float = float("nan")


@dataclass
class _ModuleState:
    weight: float = 0.0
    clients: int = 0
    stacked_rank: int = 0
    b_parts: list[torch.Tensor] = field(default_factory=list)  # n_k s_k B_k (d_out, r_k)
    a_parts: list[torch.Tensor] = field(default_factory=list)  # A_k (r_k, d_in)
    dense: torch.Tensor | None = None  # sum n_k s_k B_k A_k (d_out, d_in)
    gram: torch.Tensor | None = None  # float64 Gram of the smaller side of `dense`


class FlexLoRAAccumulator:
    """Per-module running state: stacked factors while cheap, a dense sum once not.

    Memory: factored modules hold R (d_out + d_in) numbers; dense modules one d_out x d_in
    matrix, whatever the number of clients.
    """

    def __init__(self, global_adapter: Adapter, cfg: FlexLoRAConfig | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.global_adapter = global_adapter
        self.cfg = cfg or FlexLoRAConfig()
        self.dtype = dtype  # of the stacks, the dense sum and the SVDs
        self._state: dict[str, _ModuleState] = {}
        self._count = 0
        self.report: dict[str, ModuleReport] = {}

    @property
    def count(self) -> int:
        return self._count

    def _uses_gram(self, d_out: int, d_in: int, rank: int) -> bool:
        """Streaming keeps a Gram, except in `auto` for modules whose smaller side is at
        most twice the rank kept (e.g. 128-row k/v projections at r_max 64), where a dense
        SVD at close is as cheap and exact."""
        if self.cfg.mode == "streaming":
            return True
        return self.cfg.mode == "auto" and min(d_out, d_in) > 2 * rank

    def _to_dense(self, st: _ModuleState, d_out: int, d_in: int, rank: int) -> None:
        st.dense = torch.zeros(d_out, d_in, dtype=self.dtype)
        for b, a in zip(st.b_parts, st.a_parts, strict=True):
            st.dense.addmm_(b, a)
        st.b_parts, st.a_parts = [], []
        if self._uses_gram(d_out, d_in, rank):
            d64 = st.dense.double()
            st.gram = d64.t() @ d64 if d_in <= d_out else d64 @ d64.t()

    @staticmethod
    def _fold(st: _ModuleState, b: torch.Tensor, a: torch.Tensor) -> None:
        """dense += b a, and its Gram with it, in O(m n r).

        For G = D^T D: (D + BA)^T (D + BA) = G + Z A + (Z A)^T with
        Z = D^T B + A^T (B^T B) / 2 (n, r); for G = D D^T the same with the roles of
        A^T and B swapped. The products run in the sum's dtype, G accumulates in float64.
        """
        assert st.dense is not None
        if st.gram is not None:
            if st.gram.shape[0] == st.dense.shape[1]:  # G = D^T D (d_in, d_in)
                z = st.dense.t() @ b + 0.5 * (a.t() @ (b.t() @ b))  # (d_in, r)
                za = (z @ a).double()  # (d_in, d_in)
            else:  # G = D D^T (d_out, d_out)
                z = st.dense @ a.t() + 0.5 * (b @ (a @ a.t()))  # (d_out, r)
                za = (z @ b.t()).double()  # (d_out, d_out)
            st.gram += za
            st.gram += za.t()
        st.dense.addmm_(b, a)

    def _add_factors(self, name: str, st: _ModuleState, b: torch.Tensor, a: torch.Tensor) -> None:
        """Fold n s B (d_out, k) and A (k, d_in): stacked while cheap, dense once not."""
        g = self.global_adapter[name]
        mode = self.cfg.mode
        st.stacked_rank += int(a.shape[0])
        dense_now = mode in ("streaming", "randomized", "full") or (
            mode == "auto" and st.stacked_rank >= min(g.d_out, g.d_in))
        if dense_now and st.dense is None:
            self._to_dense(st, g.d_out, g.d_in, g.rank)
        if st.dense is not None:
            self._fold(st, b, a)
        else:
            st.b_parts.append(b)
            st.a_parts.append(a)

    def add(self, update: ClientUpdate) -> None:
        check_update(update, self.global_adapter, allow_subset=update.plan is None)
        n = float(update.num_samples)
        for name, w in update.adapter.items():
            st = self._state.setdefault(name, _ModuleState())
            st.weight += n
            st.clients += 1
            self._add_factors(name, st, w.lora_b.to(self.dtype) * (w.scale * n),
                              w.lora_a.to(self.dtype))
        self._count += 1

    def partial(self) -> PartialSum:
        """Per module `n` = [weight, clients, stacked rank] and either the stacked factors
        (`b` = [n_k s_k B_k], `a` = [A_k]) or the dense sum (`dense`)."""
        out: dict[str, torch.Tensor] = {}
        for name, st in self._state.items():
            out[f"{name}/n"] = torch.tensor([st.weight, st.clients, st.stacked_rank],
                                            dtype=torch.float64)
            if st.dense is not None:
                out[f"{name}/dense"] = st.dense
            elif st.b_parts:
                out[f"{name}/b"] = torch.cat(st.b_parts, 1)
                out[f"{name}/a"] = torch.cat(st.a_parts, 0)
        return PartialSum("flexlora", out, self._count)

    def merge(self, partial: PartialSum) -> None:
        """Add a site's state: its stacked factors fold in like one update; a dense sum
        is added to ours (made dense first), and the Gram is recomputed from the sum."""
        mods = partial.expect("flexlora", self.global_adapter)
        for name, parts in mods.items():
            g = self.global_adapter[name]
            counts = part_shape(mods, name, "n", (3,))
            st = self._state.setdefault(name, _ModuleState())
            st.weight += float(counts[0])
            st.clients += int(counts[1])
            if "dense" in parts:
                d = part_shape(mods, name, "dense", (g.d_out, g.d_in)).to(self.dtype)
                if st.dense is None:
                    self._to_dense(st, g.d_out, g.d_in, g.rank)
                assert st.dense is not None
                st.dense += d
                st.stacked_rank += int(counts[2])
                if st.gram is not None:
                    d64 = st.dense.double()
                    st.gram = d64.t() @ d64 if g.d_in <= g.d_out else d64 @ d64.t()
            elif "b" in parts:
                k = int(parts["a"].shape[0]) if "a" in parts else -1
                b = part_shape(mods, name, "b", (g.d_out, k)).to(self.dtype)
                a = part_shape(mods, name, "a", (k, g.d_in)).to(self.dtype)
                self._add_factors(name, st, b, a)
        self._count += partial.count

    def _close(self, name: str, st: _ModuleState, rank: int) -> SVDResult:
        if st.dense is None:
            return factored_svd(torch.cat(st.b_parts, 1) / st.weight,
                                torch.cat(st.a_parts, 0), rank, dtype=self.dtype)
        d = st.dense / st.weight
        if st.gram is not None:
            return gram_svd(d, st.gram / st.weight**2, rank, right=st.gram.shape[0] == d.shape[1])
        if self.cfg.mode in ("full", "auto"):
            return dense_svd(d, rank)
        return randomized_svd(d, rank, oversample=self.cfg.oversample, tol=self.cfg.power_tol,
                              max_iters=self.cfg.max_power_iters, seed=self.cfg.seed)

    def result(self) -> Adapter:
        """The new global adapter at each module's global rank (SVD form); unchanged if empty."""
        out: Adapter = {}
        self.report = {}
        for name, g in self.global_adapter.items():
            st = self._state.get(name)
            if st is None or st.weight <= 0:
                out[name] = g.clone()
                self.report[name] = ModuleReport("unchanged", 0, 0)
                continue
            res = self._close(name, st, g.rank)
            out[name] = svd_to_lora(res, g.rank, g.alpha, seed=self.cfg.seed,
                                    dtype=g.lora_a.dtype)
            self.report[name] = ModuleReport(res.method, st.stacked_rank, st.clients,
                                             res.power_iters, res.residual_rel)
        return out


class FlexLoRA(StrategyBase):
    """FlexLoRA strategy: full-size weighted average, truncated-SVD redistribution."""

    name = "flexlora"

    def __init__(self, cfg: FlexLoRAConfig | None = None) -> None:
        self.cfg = cfg or FlexLoRAConfig()

    def distribute(self, global_adapter: Adapter, plan: ClientPlan) -> Adapter:
        out: Adapter = {}
        for name, r in plan.ranks.items():
            if name not in global_adapter:
                raise UpdateMismatchError(f"plan for {plan.device_id} names {name}, which the "
                                          "global adapter lacks")
            out[name] = best_rank_r(global_adapter[name], r, plan.alpha, seed=self.cfg.seed)
        return out

    def accumulator(self, global_adapter: Adapter, round_index: int = 0) -> FlexLoRAAccumulator:
        return FlexLoRAAccumulator(global_adapter, self.cfg)
