"""Validation of one device update before it may touch the global adapter.

Checks, in order (each failure has its own reason code, see protocol.REJECT_REASONS):
base fingerprint, sample count, keys equal to the plan, shapes fitting the base
layers, alpha equal to the plan's, rank not above the plan, finite values, and a
norm bound on each module's update ||(alpha/r) B A||_F (`LoRAWeights.delta_norm`).
"""

from __future__ import annotations

from typing import Any

from edge_runtime.adapter import Adapter
from edge_runtime.fl.types import ClientPlan, ClientUpdate, UpdateMismatchError, check_update
from edge_runtime.fleet.protocol import Manifest
from edge_runtime.fleet.transfer import TransferError

__all__ = ["UpdateRejected", "validate_update", "decode_checked"]


class UpdateRejected(TransferError):
    """An update failed validation; `reason` is one of protocol.REJECT_REASONS."""


def validate_update(adapter: Adapter, meta: dict[str, Any], *, plan: ClientPlan,
                    global_adapter: Adapter, fingerprint: str, max_norm: float) -> int:
    """Raise UpdateRejected unless the update is acceptable; return its sample count.

    The wire-side checks (base fingerprint, sample count, the norm bound) around the one
    structural check (`fl.types.check_update`: keys, shapes, alpha, ranks, finite).

    Args:
        adapter: the decoded update.
        meta: the update's metadata (`fingerprint`, `n_samples`).
        plan: the plan the device was given this round.
        global_adapter: the round's global adapter (its modules and shapes).
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
    try:
        check_update(ClientUpdate(plan.device_id, adapter, n, plan), global_adapter)
    except UpdateMismatchError as e:
        raise UpdateRejected(e.reason, str(e)) from None
    for name, w in adapter.items():
        norm = w.delta_norm()
        if not norm <= max_norm:
            raise UpdateRejected("norm_bound", f"{name}: ||scale*B A||_F = {norm:.3g} is above "
                                 f"the bound {max_norm:.3g}")
    return n


def decode_checked(payload: bytes, manifest: Manifest, *, round: int, plan: ClientPlan,
                   global_adapter: Adapter, fingerprint: str, max_norm: float
                   ) -> tuple[Adapter, int]:
    """Decode a complete update's bytes and validate them against the device's plan of
    round `round`: (adapter, its sample count). Raises TransferError (a reject reason)."""
    from edge_runtime.fleet.codec import decode_adapter

    adapter, meta = decode_adapter(payload)
    meta = {**manifest.meta, **meta}
    n = validate_update(adapter, meta, plan=plan, global_adapter=global_adapter,
                        fingerprint=fingerprint, max_norm=max_norm)
    if meta.get("round") != round:
        raise UpdateRejected("stale_round", f"payload says round {meta.get('round')}")
    return adapter, n
