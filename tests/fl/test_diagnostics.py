"""Aggregation error and top-r energy against brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fl_helpers import SHAPES, make_update, rand_adapter

from edge_runtime.config import FlexLoRAConfig
from edge_runtime.fl.diagnostics import aggregation_diagnostics
from edge_runtime.fl.fedavg import FedAvg
from edge_runtime.fl.flexlora import FlexLoRA


def _brute(new, ups, r):  # type: ignore[no-untyped-def]
    err2 = ref2 = top = tot = 0.0
    for name in SHAPES:
        n = sum(u.num_samples for u in ups)
        exact = sum(u.num_samples / n * u.adapter[name].delta().numpy() for u in ups)
        err2 += np.linalg.norm(new[name].delta().numpy() - exact) ** 2
        ref2 += np.linalg.norm(exact) ** 2
        s = np.linalg.svd(exact, compute_uv=False) ** 2
        top, tot = top + s[:r].sum(), tot + s.sum()
    return np.sqrt(err2 / ref2), top / tot


def test_exact_aggregation_has_no_error_and_fedavg_has_some() -> None:
    gen = torch.Generator().manual_seed(4)
    g = rand_adapter(gen, {n: 8 for n in SHAPES})
    ups = [make_update(gen, f"d{i}", {n: 2 for n in SHAPES}, 2 + i) for i in range(3)]
    flex = FlexLoRA(FlexLoRAConfig(mode="full")).aggregate(g, ups)  # R = 6 <= 8: exact
    d = aggregation_diagnostics(flex, ups, r_min=2)
    assert d["agg_error"] < 1e-6
    want_err, want_top = _brute(flex, ups, 2)
    assert d["top_rmin_energy"] == pytest.approx(want_top, rel=1e-9)
    homo = [make_update(gen, f"d{i}", {n: 8 for n in SHAPES}, 2 + i) for i in range(3)]
    avg = FedAvg().aggregate(g, homo)  # (sum p B)(sum p A) != sum p B A
    d2 = aggregation_diagnostics(avg, homo, r_min=2)
    e, t = _brute(avg, homo, 2)
    assert d2["agg_error"] == pytest.approx(e, rel=1e-9) and d2["agg_error"] > 0.05
    assert d2["top_rmin_energy"] == pytest.approx(t, rel=1e-9) and 0 < t < 1
