"""Client-level differential privacy for heterogeneous-rank LoRA (pure maths over adapters).

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018, Algorithm 1): each device's change of the model is clipped
to L2 norm C, the round's sum of changes gets Gaussian noise N(0, (z C)^2 I), and the sum
is divided by a *fixed* denominator, never by a data-dependent weight. Here:

    released_m = ( sum_{k in S_m} X_k,m  +  Z_m ) / D_m,   Z_m ~ N(0, (z C)^2 I)

per module m, where S is the round's selected devices, S_m those whose plan names m,
D_m = |S_m| (public: plans come from device profiles, not data), and
X_k = start_k + clip_C(update_k - start_k) (a selected device that sent nothing, or was
refused, contributes its start: a change of 0). `start_k` is what the device started
the round from (the server recomputes it), so sum_k start_k is public and one device
moves the noised sum by at most 2C when its data is replaced (replace-one adjacency,
what fixed-size sampling without replacement is accounted under: `fl.privacy`).

Where the change lives (docs/PRIVACY.md):
- factor space (fedavg, hetlora, legend; they average zero-padded s B and A): the change
  is the concatenation over modules of (pad(s B) - pad(s_0 B_0), pad(A) - pad(A_0)) at
  the global rank; clipping scales it, and the noise goes on each summed padded factor.
  The new factors are exactly the strategy's zero-padded mean with equal weights when
  nothing was clipped and z = 0.
- product space (flexlora; it averages s B A): the change is
  sum over modules of the dense s B A - s_0 B_0 A_0; the noise goes on the dense sum,
  and the truncated SVD back to the global rank afterwards is post-processing.

The Gaussian draws come from the OS CSPRNG (`os.urandom`, Box-Muller in float64) unless a
seed is given (tests, reproducible studies: a known seed makes the noise known).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from edge_runtime.adapter import Adapter, LoRAWeights
from edge_runtime.errors import ConfigError
from edge_runtime.fl.flexlora import svd_to_lora
from edge_runtime.fl.svd import dense_svd
from edge_runtime.fl.types import (
    ClientUpdate,
    PartialSum,
    UpdateMismatchError,
    from_scaled_b,
    pad_cols,
    pad_rows,
    scaled_b,
)

__all__ = ["NoiseSource", "factor_embed", "product_embed", "factor_change", "product_change",
           "change_l2", "clip_change", "DPAccumulator"]

log = logging.getLogger(__name__)

Change = dict[str, tuple[torch.Tensor, ...]]


class NoiseSource:
    """Standard normal float64 draws: a seeded torch generator, or the OS CSPRNG (seed None)."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        if self._gen is not None:
            return torch.randn(n, generator=self._gen, dtype=torch.float64).reshape(shape)
        m = (n + 1) // 2
        bits = np.frombuffer(os.urandom(16 * m), dtype=np.uint64) >> np.uint64(11)
        u = (bits.astype(np.float64) + 0.5) * 2.0 ** -53  # uniform on (0, 1), 53 bits
        r = np.sqrt(-2.0 * np.log(u[:m]))
        th = 2.0 * np.pi * u[m:]
        z = np.concatenate([r * np.cos(th), r * np.sin(th)])[:n]
        return torch.from_numpy(z).reshape(shape)


def factor_embed(adapter: Adapter, ranks: Mapping[str, int]) -> Change:
    """{module: (pad(s B) (d_out, r_g), pad(A) (r_g, d_in))} in float64, zero-padded to
    the global rank `ranks[module]`."""
    return {n: (pad_cols(scaled_b(w), ranks[n]), pad_rows(w.lora_a.double(), ranks[n]))
            for n, w in adapter.items()}


def product_embed(adapter: Adapter) -> Change:
    """{module: (s B A,)}: each dense product (d_out, d_in) in float64."""
    return {n: (w.delta().double(),) for n, w in adapter.items()}


def factor_change(update: Adapter, start: Adapter, ranks: Mapping[str, int]) -> Change:
    """{module: (pad(s B) - pad(s_0 B_0), pad(A) - pad(A_0))} (see `factor_embed`)."""
    u, s = factor_embed(update, ranks), factor_embed(start, ranks)
    return {n: (u[n][0] - s[n][0], u[n][1] - s[n][1]) for n in u}


def product_change(update: Adapter, start: Adapter) -> Change:
    """{module: (s B A - s_0 B_0 A_0,)}: the dense change of each product (d_out, d_in)."""
    u, s = product_embed(update), product_embed(start)
    return {n: (u[n][0] - s[n][0],) for n in u}


def change_l2(change: Change) -> float:
    """L2 norm of the whole change (every tensor of every module, concatenated)."""
    return math.sqrt(sum(float((t * t).sum()) for ts in change.values() for t in ts))


def clip_change(change: Change, clip: float) -> tuple[Change, float, float]:
    """(change scaled to L2 norm <= clip, its norm before, the factor min(1, clip / norm))."""
    norm = change_l2(change)
    f = 1.0 if norm <= clip else clip / norm
    if f == 1.0:
        return change, norm, f
    return {n: tuple(t * f for t in ts) for n, ts in change.items()}, norm, f


class DPAccumulator:
    """One round's DP aggregate (module docstring): clipped changes summed as they arrive;
    `result()` adds the selected devices' starts, the noise, and divides by D_m.

    Args:
        global_adapter: the round's global (r_g per module).
        space: "factor" (fedavg, hetlora, legend) or "product" (flexlora).
        clip: C, the bound on one device's change.
        noise_std: std of the noise on each summed coordinate (z C; 0 for tests).
        noise: where the noise comes from.
        start_of: device id -> the adapter it started the round from.
        selected: the round's selected devices, asked at `result()` (a round extended at
            its deadline selects more).
        check: the strategy's own checks of an update (raise `UpdateMismatchError`).
        svd_seed: product space: seed of the orthonormal completion of A (`svd_to_lora`).
    """

    def __init__(self, global_adapter: Adapter, space: str, clip: float, noise_std: float,
                 noise: NoiseSource, start_of: Callable[[str], Adapter],
                 selected: Callable[[], Iterable[str]],
                 check: Callable[[ClientUpdate], None], svd_seed: int = 0) -> None:
        if space not in ("factor", "product"):
            raise ValueError(f"space must be factor or product, got {space!r}")
        if clip <= 0 or noise_std < 0:
            raise ValueError(f"need clip > 0 and noise_std >= 0, got {clip}, {noise_std}")
        self.global_adapter = global_adapter
        self.space = space
        self.clip, self.noise_std, self.noise = clip, noise_std, noise
        self.start_of, self.selected, self.check = start_of, selected, check
        self.svd_seed = svd_seed
        self.ranks = {n: w.rank for n, w in global_adapter.items()}
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.norms: dict[str, float] = {}  # device -> its change norm before clipping
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def clipped(self) -> int:
        """How many of the round's updates were scaled down to the clip."""
        return sum(1 for v in self.norms.values() if v > self.clip)

    def _embed(self, adapter: Adapter) -> Change:
        if self.space == "factor":
            return factor_embed(adapter, self.ranks)
        return product_embed(adapter)

    def _change(self, adapter: Adapter, start: Adapter) -> Change:
        u, s = self._embed(adapter), self._embed(start)
        return {n: tuple(a - b for a, b in zip(u[n], s[n], strict=True)) for n in u}

    def _zeros(self, name: str) -> list[torch.Tensor]:
        g = self.global_adapter[name]
        if self.space == "factor":
            return [torch.zeros(g.d_out, g.rank, dtype=torch.float64),
                    torch.zeros(g.rank, g.d_in, dtype=torch.float64)]
        return [torch.zeros(g.d_out, g.d_in, dtype=torch.float64)]

    def add(self, update: ClientUpdate) -> None:
        self.check(update)
        start = self.start_of(update.device_id)
        missing = set(update.adapter) - set(start)
        if missing:
            raise UpdateMismatchError(f"update from {update.device_id} has modules its start "
                                      f"lacks, e.g. {sorted(missing)[0]}", "bad_keys")
        clipped, norm, _ = clip_change(self._change(update.adapter, start), self.clip)
        for name, ts in clipped.items():
            acc = self.sums.setdefault(name, self._zeros(name))
            for a, t in zip(acc, ts, strict=True):
                a += t
        self.norms[update.device_id] = norm
        log.debug("dp: %s changed the model by %.4g (clip %.4g)", update.device_id, norm,
                  self.clip)
        self._count += 1

    def partial(self) -> PartialSum:
        raise ConfigError("DP clips each device's update here and noises the round's sum; "
                          "it has no partial sum to hand on (no sites or SecAgg with DP)")

    def merge(self, partial: PartialSum) -> None:
        self.partial()

    def result(self) -> Adapter:
        """(sum of the selected starts + clipped changes + noise) / D_m per module; a module
        no selected device planned keeps the global."""
        base: dict[str, list[torch.Tensor]] = {}
        denom: dict[str, int] = {}
        for dev in sorted(set(self.selected())):
            for name, ts in self._embed(self.start_of(dev)).items():
                if name in base:
                    base[name] = [a + t for a, t in zip(base[name], ts, strict=True)]
                else:
                    base[name] = list(ts)
                denom[name] = denom.get(name, 0) + 1
        out: Adapter = {}
        for name, g in self.global_adapter.items():
            d = denom.get(name, 0)
            if d == 0:
                out[name] = g.clone()
                continue
            sums = self.sums.get(name) or self._zeros(name)
            tot = [b + s for b, s in zip(base[name], sums, strict=True)]
            if self.noise_std > 0:
                tot = [t + self.noise_std * self.noise.normal(tuple(t.shape)) for t in tot]
            out[name] = self._to_lora(name, [t / d for t in tot])
        return out

    def _to_lora(self, name: str, mean: list[torch.Tensor]) -> LoRAWeights:
        g = self.global_adapter[name]
        if self.space == "factor":
            return from_scaled_b(mean[0], mean[1], g.alpha, g.lora_a.dtype)
        return svd_to_lora(dense_svd(mean[0], g.rank), g.rank, g.alpha, seed=self.svd_seed,
                           dtype=g.lora_a.dtype)
