"""How far an update moves the model, and clipping it (pure maths over adapters).

A device's *change* is the product it sends minus the product it started from, summed
over its modules: ||dP|| = sqrt(sum_m ||s B_m A_m - s_0 B0_m A0_m||_F^2), computed from
the factors ([s B, -s_0 B0] stacked against [A; A0]: r x r products, no d_out x d_in
matrix). The start is what the strategy handed the device (truncated to the sent rank,
so a HetLoRA device that pruned its tail is compared on the components it kept).

Clipping interpolates the factors toward the start, B' = B0 + t (B - B0) and
A' = A0 + t (A - A0), with the largest t in [0, 1] whose change norm is within the bound
(bisection: the change is a quadratic in t that is 0 at t = 0). Interpolating factors
keeps the rank and shape the strategies expect; for the factor-averaging strategies it
scales the device's pull on each averaged factor by t, and for the product-space ones it
bounds the change of the product it contributes.
"""

from __future__ import annotations

import math
import statistics

import torch

from edge_runtime.adapter import Adapter, LoRAWeights, frobenius_norm_ba

__all__ = ["aligned_start", "change_norm", "interpolate", "clip_to", "adaptive_bound"]


def aligned_start(update: Adapter, start: Adapter) -> Adapter:
    """The start truncated to each module's sent rank (its first components)."""
    out: Adapter = {}
    for name, w in update.items():
        s = start.get(name)
        if s is None:
            out[name] = LoRAWeights(torch.zeros_like(w.lora_a), torch.zeros_like(w.lora_b),
                                    w.alpha)
            continue
        r = min(w.rank, s.rank)
        a = torch.zeros_like(w.lora_a)
        b = torch.zeros_like(w.lora_b)
        a[:r] = s.lora_a[:r].to(a.dtype)
        # same product for the kept components: s_0 B0[:, :r] == (alpha / r_w) B'[:, :r]
        b[:, :r] = (s.lora_b[:, :r].double() * (s.scale / w.scale)).to(b.dtype)
        out[name] = LoRAWeights(a, b, w.alpha)
    return out


def _module_change(w: LoRAWeights, s: LoRAWeights) -> float:
    b = torch.cat([w.lora_b.double() * w.scale, -s.lora_b.double() * s.scale], dim=1)
    a = torch.cat([w.lora_a.double(), s.lora_a.double()], dim=0)
    return float(frobenius_norm_ba(b, a))


def change_norm(update: Adapter, start: Adapter) -> float:
    """||dP|| of `update` against `start` (module docstring); start aligned first."""
    aligned = aligned_start(update, start)
    return math.sqrt(sum(_module_change(w, aligned[n]) ** 2 for n, w in update.items()))


def interpolate(update: Adapter, start: Adapter, t: float) -> Adapter:
    """Factors t of the way from the (aligned) start to the update."""
    aligned = aligned_start(update, start)
    out: Adapter = {}
    for name, w in update.items():
        s = aligned[name]
        out[name] = LoRAWeights(s.lora_a + t * (w.lora_a - s.lora_a),
                                s.lora_b + t * (w.lora_b - s.lora_b), w.alpha)
    return out


def clip_to(update: Adapter, start: Adapter, bound: float, iters: int = 40
            ) -> tuple[Adapter, float, float]:
    """(the update clipped so its change norm is <= bound, t, its change norm before)."""
    norm = change_norm(update, start)
    if norm <= bound:
        return update, 1.0, norm
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if change_norm(interpolate(update, start, mid), start) <= bound:
            lo = mid
        else:
            hi = mid
    return interpolate(update, start, lo), lo, norm


def adaptive_bound(norms: list[float], multiple: float) -> float:
    """multiple x the median change norm of the round's updates."""
    return multiple * statistics.median(norms)
