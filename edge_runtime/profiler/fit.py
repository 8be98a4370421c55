"""Non-negative, relative-error least squares for cost tables.

Costs (seconds, bytes) are sums of non-negative parts, so every coefficient is constrained
to be >= 0: a negative per-token time fitted from noisy points would make a larger plan
look cheaper. Rows are weighted by 1/y so the fit minimises relative error, which is what
a "within 20%" promise is about. The solver is Lawson and Hanson's active-set NNLS
(Solving Least Squares Problems, 1974, ch. 23, algorithm NNLS).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["nnls", "LinearFit", "fit_linear"]


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin_x ||a x - b||_2 subject to x >= 0 (Lawson-Hanson active set).

    Args:
        a: (m, n) design matrix.
        b: (m,) targets.
    Returns:
        x: (n,) non-negative solution.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(np.float64).eps * max(1.0, float(np.abs(a).max(initial=0.0))) * max(m, n)
    max_iter = max_iter or 3 * n + 10
    for _ in range(max_iter):
        w = a.T @ (b - a @ x)  # (n,) negative gradient
        if passive.all() or not (w[~passive] > tol).any():
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


@dataclass
class LinearFit:
    """y ~ sum_k coef[k] * feature[k], coefficients >= 0, with its in-sample error.

    Attributes:
        features: feature names, in order.
        coef: fitted coefficients (units of y per unit of feature).
        n_points: number of measured points.
        rel_rms: root-mean-square relative error on the measured points.
        rel_max: largest relative error on the measured points.
        loo_rel_max: largest leave-one-out relative error (None with too few points): how
            far off a prediction for a point the fit did not see can be.
    """

    features: tuple[str, ...]
    coef: tuple[float, ...]
    n_points: int = 0
    rel_rms: float = 0.0
    rel_max: float = 0.0
    loo_rel_max: float | None = None
    unit: str = ""
    notes: list[str] = field(default_factory=list)

    def predict(self, x: dict[str, float]) -> float:
        return float(sum(c * float(x[f]) for f, c in zip(self.features, self.coef, strict=True)))

    def to_json(self) -> dict:
        return {
            "features": list(self.features),
            "coef": [float(c) for c in self.coef],
            "unit": self.unit,
            "n_points": self.n_points,
            "rel_rms": round(self.rel_rms, 5),
            "rel_max": round(self.rel_max, 5),
            "loo_rel_max": None if self.loo_rel_max is None else round(self.loo_rel_max, 5),
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, d: dict) -> LinearFit:
        feats = tuple(str(f) for f in d["features"])
        coef = tuple(float(c) for c in d["coef"])
        if len(feats) != len(coef):
            raise ValueError(f"fit has {len(feats)} features but {len(coef)} coefficients")
        loo = d.get("loo_rel_max")
        return cls(feats, coef, int(d.get("n_points", 0)), float(d.get("rel_rms", 0.0)),
                   float(d.get("rel_max", 0.0)), None if loo is None else float(loo),
                   str(d.get("unit", "")), [str(n) for n in d.get("notes", [])])


def _solve(rows: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Relative weighting (divide each row by its y) and column scaling for conditioning.
    w = rows / y[:, None]
    scale = np.abs(w).max(axis=0)
    scale[scale == 0] = 1.0
    c = nnls(w / scale, np.ones_like(y))
    return c / scale


def fit_linear(features: Sequence[str], points: Sequence[dict[str, float]],
               targets: Sequence[float], unit: str = "") -> LinearFit:
    """Fit non-negative coefficients minimising the relative squared error.

    Args:
        features: names of the columns, looked up in every point.
        points: one dict of feature values per measurement.
        targets: measured values (> 0), one per point.
    """
    if len(points) != len(targets):
        raise ValueError("points and targets differ in length")
    if not points:
        raise ValueError("no points to fit")
    y = np.asarray(targets, dtype=np.float64)
    if (y <= 0).any() or not np.isfinite(y).all():
        raise ValueError(f"targets must be positive and finite, got {y.tolist()}")
    rows = np.asarray([[float(p[f]) for f in features] for p in points], dtype=np.float64)
    coef = _solve(rows, y)
    rel = rows @ coef / y - 1.0
    loo: float | None = None
    if len(y) > len(features):
        errs = []
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            ci = _solve(rows[keep], y[keep])
            errs.append(abs(float(rows[i] @ ci) / y[i] - 1.0))
        loo = max(errs)
    return LinearFit(tuple(features), tuple(float(c) for c in coef), len(y),
                     math.sqrt(float(np.mean(rel ** 2))), float(np.abs(rel).max()), loo, unit)
