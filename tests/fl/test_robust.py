"""Robust aggregation against numpy's median and a brute-force trimmed mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fl_helpers import SHAPES, make_update, rand_adapter

from edge_runtime.config import ConfigError, RunConfig, StrategyName, parse_robust
from edge_runtime.fl.robust import robust_accumulator, robust_stat


def test_stat_is_numpys_median_and_a_brute_force_trimmed_mean() -> None:
    x = torch.randn(7, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(robust_stat(x, "median").numpy(), np.median(x.numpy(), axis=0))
    x6 = x[:6]
    np.testing.assert_allclose(robust_stat(x6, "median").numpy(), np.median(x6.numpy(), axis=0))
    srt = np.sort(x.numpy(), axis=0)
    np.testing.assert_allclose(robust_stat(x, "trimmed-mean", 0.3).numpy(),
                               srt[2:5].mean(axis=0))  # floor(0.3 * 7) = 2 cut at each end


def test_factor_median_ignores_one_wild_device() -> None:
    gen = torch.Generator().manual_seed(1)
    g = rand_adapter(gen, {n: 4 for n in SHAPES})
    ups = [make_update(gen, f"d{i}", {n: 4 for n in SHAPES}, 5) for i in range(4)]
    wild = make_update(gen, "evil", {n: 4 for n in SHAPES}, 5)
    for w in wild.adapter.values():
        w.lora_b.mul_(1e6)
    acc = robust_accumulator(StrategyName.HETLORA, g, "median")
    assert acc is not None
    for u in [*ups, wild]:
        acc.add(u)
    out = acc.result()
    for name in SHAPES:
        sb = np.stack([(u.adapter[name].lora_b * u.adapter[name].scale).numpy()
                       for u in [*ups, wild]])
        want = np.median(sb, axis=0)
        got = (out[name].lora_b * out[name].scale).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
        assert np.abs(got).max() < 1e3  # the 1e6-scaled device did not carry the result


def test_flexlora_median_of_products_then_best_rank() -> None:
    gen = torch.Generator().manual_seed(2)
    g = rand_adapter(gen, {n: 6 for n in SHAPES})
    ups = [make_update(gen, f"d{i}", {n: 2 for n in SHAPES}, 3) for i in range(5)]
    acc = robust_accumulator(StrategyName.FLEXLORA, g, "trimmed-mean:0.2")
    assert acc is not None
    for u in ups:
        acc.add(u)
    out = acc.result()
    for name in SHAPES:
        p = np.sort(np.stack([u.adapter[name].delta().numpy() for u in ups]), axis=0)
        d = p[1:4].mean(axis=0)
        u_, s_, vt = np.linalg.svd(d)
        best = (u_[:, :6] * s_[:6]) @ vt[:6]
        np.testing.assert_allclose(out[name].delta().numpy(), best, atol=1e-5)


def test_bad_and_unavailable_robust_settings_are_refused() -> None:
    assert parse_robust("trimmed-mean:0.1") == ("trimmed-mean", 0.1)
    for bad in ("mean", "trimmed-mean:0.6", "trimmed-mean:x"):
        with pytest.raises(ConfigError):
            parse_robust(bad)
    with pytest.raises(ConfigError, match="flora"):
        RunConfig.from_dict({"strategy": {"name": "flora"}, "fleet": {"robust": "median"}})
    with pytest.raises(ConfigError, match="sa-fedlora"):
        RunConfig.from_dict({"strategy": {"name": "sa-fedlora"}, "fleet": {"robust": "median"}})
