"""NNLS and the relative-error fit, against brute force and exactly generated data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edge_runtime.profiler.fit import LinearFit, fit_linear, nnls


def brute_force_nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The NNLS optimum by enumerating every support set (an independent reference)."""
    n = a.shape[1]
    best, best_r = np.zeros(n), float(np.sum(b ** 2))
    for k in range(1, n + 1):
        for support in itertools.combinations(range(n), k):
            cols = list(support)
            z, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if (z < 0).any():
                continue
            x = np.zeros(n)
            x[cols] = z
            r = float(np.sum((a @ x - b) ** 2))
            if r < best_r - 1e-12:
                best, best_r = x, r
    return best


@pytest.mark.parametrize("seed", range(25))
def test_nnls_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(4, 12)), int(rng.integers(1, 6))
    a = rng.normal(size=(m, n))
    b = rng.normal(size=m)
    x = nnls(a, b)
    ref = brute_force_nnls(a, b)
    assert (x >= 0).all()
    assert np.sum((a @ x - b) ** 2) == pytest.approx(np.sum((a @ ref - b) ** 2), rel=1e-9,
                                                       abs=1e-12)
    np.testing.assert_allclose(x, ref, atol=1e-8)


def test_fit_recovers_exact_coefficients_and_reports_zero_error() -> None:
    true = {"1": 0.002, "tokens": 3e-5, "attn": 4e-8}
    points = [{"1": 1.0, "tokens": float(b * t), "attn": float(b * t * t)}
              for b, t in [(1, 32), (2, 64), (4, 128), (8, 64), (4, 16)]]
    y = [sum(true[k] * p[k] for k in true) for p in points]
    fit = fit_linear(("1", "tokens", "attn"), points, y, "s")
    np.testing.assert_allclose(fit.coef, [true["1"], true["tokens"], true["attn"]], rtol=1e-6)
    assert fit.rel_max < 1e-9
    assert fit.loo_rel_max is not None and fit.loo_rel_max < 1e-6
    assert fit.predict({"1": 1, "tokens": 1000, "attn": 1e5}) == pytest.approx(
        0.002 + 0.03 + 0.004)


def test_fit_never_goes_negative_and_reports_its_error() -> None:
    # y falls with x: the unconstrained slope is negative; costs may not be.
    points = [{"1": 1.0, "x": float(x)} for x in (1, 2, 3, 4)]
    y = [4.0, 3.0, 2.5, 2.0]
    fit = fit_linear(("1", "x"), points, y)
    assert min(fit.coef) >= 0.0
    assert fit.coef[1] == 0.0
    assert fit.rel_max > 0.2  # a constant cannot follow it, and the fit says so


def test_fit_json_round_trip_and_validation() -> None:
    fit = LinearFit(("1", "x"), (1.0, 2.0), 3, 0.1, 0.2, 0.3, "s")
    again = LinearFit.from_json(fit.to_json())
    assert again.coef == fit.coef and again.features == fit.features
    with pytest.raises(ValueError):
        fit_linear(("1",), [{"1": 1.0}], [0.0])
    with pytest.raises(ValueError):
        LinearFit.from_json({"features": ["a", "b"], "coef": [1.0]})
