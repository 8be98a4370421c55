"""What an aggregation lost, measured against the exact average of the clients' products.

For the updates of one round, the exact aggregate of module m is
    dW*_m = sum_k p_k s_k B_k A_k,   p_k = n_k / sum_{j sent m} n_j
(what any aggregator of the products would want; FedAvg's (sum p B)(sum p A) and
zero-padding differ from it, a truncated SVD keeps its best rank-r part). Reported:
- agg_error: ||dW_agg - dW*||_F / ||dW*||_F over all modules, dW_agg being the new global
  adapter's product (each client's product already holds what it started from);
- top_rmin_energy: the share of dW*'s energy (sum of squared singular values) in each
  module's top r_min singular directions, summed over modules: near 1 means the round's
  update lives in a subspace the smallest clients can hold (SVD redistribution collapsing
  onto the smallest shared rank shows as this share rising over rounds, arXiv 2602.13486).
Dense products: for diagnostics, not for the aggregation path.
"""

from __future__ import annotations

import torch

from edge_runtime.adapter import Adapter
from edge_runtime.fl.types import ClientUpdate

__all__ = ["aggregation_diagnostics"]


def aggregation_diagnostics(new_global: Adapter, updates: list[ClientUpdate], r_min: int,
                            prior: Adapter | None = None) -> dict[str, float]:
    """{"agg_error", "top_rmin_energy"} of one round (module docstring).

    `prior`: for a strategy whose clients upload only what they added (FLoRA's fresh
    adapters), the old global the exact aggregate adds their average to; the energy share
    is of the round's average update itself.
    """
    err2 = ref2 = top = total = 0.0
    for name, g_new in new_global.items():
        sent = [u for u in updates if name in u.adapter]
        if not sent:
            continue
        n = float(sum(u.num_samples for u in sent))
        exact = sum((u.num_samples / n) * u.adapter[name].delta() for u in sent)
        assert isinstance(exact, torch.Tensor)
        target = exact + prior[name].delta() if prior is not None else exact
        err2 += float(((g_new.delta() - target) ** 2).sum())
        ref2 += float((target ** 2).sum())
        s2 = torch.linalg.svdvals(exact) ** 2
        top += float(s2[:r_min].sum())
        total += float(s2.sum())
    return {"agg_error": (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0,
            "top_rmin_energy": top / total if total > 0 else 0.0}
