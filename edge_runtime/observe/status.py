"""The fleet's status as one JSON document (what the status page draws).

Built from the aggregator's live state on request: the open round and its deadline, each
device (class, plan, last heard from, whether its update arrived), rejections by reason
with the latest ones in detail, and one row per closed round (eval metrics, bytes,
duration, and the DP epsilon spent where `fleet.dp` is on). Reading state another thread mutates can meet a dict changing size; the
snapshot is retried.
"""

from __future__ import annotations

from typing import Any

from edge_runtime.rounds.server import AggregatorService

__all__ = ["status_document", "PlanCache"]


def _plan_summary(plan: dict[str, Any]) -> dict[str, Any]:
    ranks = plan.get("ranks", {})
    return {"rank": max(ranks.values(), default=0),
            "depth": len({n.split(".")[2] for n in ranks}), "modules": len(ranks)}


class PlanCache:
    """Every device's plan now (the planner's answer), recomputed once per round."""

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None
        self.plans: dict[str, dict[str, Any]] = {}

    def get(self, svc: AggregatorService) -> dict[str, dict[str, Any]]:
        key = (svc.round, len(svc.devices))
        if key != self.key:
            self.plans, self.key = svc.plans(), key
        return self.plans


def _privacy(svc: AggregatorService) -> dict[str, Any] | None:
    """Client-level DP (`fleet.dp`): its settings and the epsilon spent so far; None: off."""
    dp = svc.cfg.dp
    if not dp.on:
        return None
    spent = [r.dp for r in svc.metrics if r.dp is not None]
    return {"clip": dp.clip, "noise_multiplier": dp.noise_multiplier, "delta": dp.delta,
            "epsilon": spent[-1]["epsilon"] if spent else 0.0, "rounds": len(spent)}


def _snapshot(svc: AggregatorService, cache: PlanCache) -> dict[str, Any]:
    now = svc.clock()
    op = svc.open
    accepted = set(svc.accepted)
    open_doc = None
    if op is not None:
        selected = sorted(op.plans)
        open_doc = {"round": svc.round + 1, "started_unix": op.started_unix,
                    "deadline_unix": op.deadline_unix,
                    "seconds_left": round(op.deadline_unix - now, 1),
                    "selected": selected, "arrived": sorted(accepted & set(selected)),
                    "late": sorted(set(selected) - accepted) if now > op.deadline_unix else [],
                    "extensions": op.extensions}
    plans = cache.get(svc)
    devices = []
    for dev, rec in sorted(svc.devices.items()):
        seen = svc.last_seen.get(dev)
        row: dict[str, Any] = {
            "id": dev, "class": rec.device_class, "n_samples": rec.n_samples,
            "online": dev in svc.online, "last_seen_unix": seen,
            "seconds_since_seen": None if seen is None else round(now - seen, 1)}
        p = plans.get(dev, {})
        row.update({"rank": p.get("max_rank", 0), "depth": p.get("depth", 0),
                    "modules": p.get("modules", 0)})
        if op is not None and dev in op.plans:
            row.update(_plan_summary(op.plans[dev]))
            row["update"] = ("arrived" if dev in accepted
                             else "late" if now > op.deadline_unix else "waiting")
        else:
            row["update"] = "not selected" if op is not None else "-"
        devices.append(row)
    rounds = []
    prev_t = 0.0
    for r in svc.metrics:
        rounds.append({"round": r.round, "eval_loss": r.eval_loss,
                       "eval_accuracy": r.eval_accuracy, "bytes_up": r.bytes_up,
                       "bytes_down": r.bytes_down, "participants": r.participants,
                       "stragglers": r.stragglers, "rejected": dict(r.rejected),
                       "clipped": {d: dict(c) for d, c in r.clipped.items()},
                       "dp": r.dp,
                       "duration_s": round(r.time_s - prev_t, 3) if r.round else 0.0})
        prev_t = r.time_s
    return {
        "time_unix": now, "strategy": svc.strategy_cfg.name.value, "round": svc.round,
        "rounds_total": svc.cfg.rounds, "finished": svc.finished, "open": open_doc,
        "devices": devices, "online": len(svc.online), "registered": len(svc.devices),
        "rejected": dict(svc.rejected),
        "recent_rejections": [{"unix": x.unix, "round": x.round + 1, "device": x.device_id,
                               "reason": x.reason, "detail": x.detail}
                              for x in list(svc.recent_rejections)[::-1]],
        "rounds": rounds, "privacy": _privacy(svc),
    }


def status_document(svc: AggregatorService, cache: PlanCache | None = None,
                    attempts: int = 5) -> dict[str, Any]:
    """The status JSON of `svc` now (see the module docstring); `cache` keeps the plans
    between calls (the HTTP endpoint holds one)."""
    cache = cache or PlanCache()
    for _ in range(attempts - 1):
        try:
            return _snapshot(svc, cache)
        except RuntimeError:  # a dict changed size under us: read again
            continue
    return _snapshot(svc, cache)
