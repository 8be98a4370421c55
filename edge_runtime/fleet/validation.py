"""Validation of one device update before it may touch the global adapter.

Checks, in order (each failure has its own reason code, see protocol.REJECT_REASONS):
base fingerprint, sample count, keys equal to the plan, shapes fitting the base
layers, alpha equal to the plan's, rank not above the plan, finite values, and a
norm bound on each module's update ||(alpha/r) B A||_F, computed without the dense
product as sqrt(tr((B^T B)(A A^T))) (DESIGN.md section 4).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from edge_runtime.adapter import Adapter
from edge_runtime.fl.types import ClientPlan
from edge_runtime.fleet.transfer import TransferError

__all__ = ["UpdateRejected", "validate_update", "update_norm"]


class UpdateRejected(TransferError):
    """An update failed validation; `reason` is one of protocol.REJECT_REASONS."""


def update_norm(b: torch.Tensor, a: torch.Tensor, scale: float) -> float:
    """||scale * B A||_F for B (d_out, r), A (r, d_in), via the r x r Gram matrices."""
    b64, a64 = b.double(), a.double()
    gram = (b64.t() @ b64) * (a64 @ a64.t())  # elementwise: tr(XY) = sum(X * Y^T), both sym.
    return abs(scale) * math.sqrt(max(float(gram.sum()), 0.0))


def validate_update(adapter: Adapter, meta: dict[str, Any], *, plan: ClientPlan,
                    shapes: dict[str, tuple[int, int]], fingerprint: str,
                    max_norm: float) -> int:
    """Raise UpdateRejected unless the update is acceptable; return its sample count.

    Args:
        adapter: the decoded update.
        meta: the update's metadata (`fingerprint`, `n_samples`).
        plan: the plan the device was given this round.
        shapes: {module: (d_out, d_in)} of the base model's layers.
        fingerprint: the base model fingerprint every device must have trained on.
        max_norm: bound on ||(alpha/r) B A||_F of any one module.
    """
    got_fp = meta.get("fingerprint")
    if got_fp != fingerprint:
        raise UpdateRejected("bad_fingerprint", f"trained on base {str(got_fp)[:16]!r}, the "
                             f"fleet's base is {fingerprint[:16]!r}")
    n = meta.get("n_samples")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise UpdateRejected("bad_manifest", f"n_samples {n!r} must be a positive integer")
    keys, planned = set(adapter), set(plan.ranks)
    if keys != planned:
        extra, missing = sorted(keys - planned), sorted(planned - keys)
        raise UpdateRejected("bad_keys", f"modules differ from the plan: {len(extra)} extra "
                             f"(e.g. {extra[:1]}), {len(missing)} missing (e.g. {missing[:1]})")
    for name, w in adapter.items():
        if name not in shapes:
            raise UpdateRejected("bad_keys", f"{name} is not a layer of the base model")
        d_out, d_in = shapes[name]
        if (w.d_out, w.d_in) != (d_out, d_in):
            raise UpdateRejected("bad_shape", f"{name}: B{tuple(w.lora_b.shape)} "
                                 f"A{tuple(w.lora_a.shape)} does not fit a {d_out}x{d_in} layer")
        if not math.isclose(w.alpha, plan.alpha, rel_tol=1e-6):
            raise UpdateRejected("bad_shape", f"{name}: alpha {w.alpha} differs from the plan's "
                                 f"{plan.alpha}")
        if w.rank > plan.ranks[name]:
            raise UpdateRejected("rank_above_plan", f"{name}: rank {w.rank} is above the "
                                 f"planned {plan.ranks[name]}")
        if not (torch.isfinite(w.lora_a).all() and torch.isfinite(w.lora_b).all()):
            raise UpdateRejected("non_finite", f"{name} has NaN or Inf values")
        norm = update_norm(w.lora_b, w.lora_a, w.scale)
        if not norm <= max_norm:
            raise UpdateRejected("norm_bound", f"{name}: ||scale*B A||_F = {norm:.3g} is above "
                                 f"the bound {max_norm:.3g}")
    return n
