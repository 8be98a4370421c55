"""Prometheus metrics of a running aggregator, read from its state at each scrape.

A custom collector (`prometheus_client` registry) turns the aggregator's counters into
metric families when scraped, so nothing has to be incremented in the round code and a
resumed aggregator reports its totals from the persisted state. Names:

    edge_rt_rounds_closed_total               rounds merged
    edge_rt_round                             rounds closed so far (the open one is +1)
    edge_rt_round_open                        1 while a round is open
    edge_rt_round_deadline_seconds            seconds left in the open round
    edge_rt_updates_accepted_total            updates folded in
    edge_rt_updates_rejected_total{reason}    refusals by reason (fleet.protocol)
    edge_rt_updates_clipped_total{what}       claims capped (n_samples), updates clipped (norm)
    edge_rt_bytes_up_total / _down_total      update / download payload bytes
    edge_rt_devices_registered / _online      devices known / connected now
    edge_rt_round_duration_seconds            summary over closed rounds (count, sum)
    edge_rt_last_round_duration_seconds       the latest round's duration
    edge_rt_eval_loss / edge_rt_eval_accuracy the latest global model's held-out scores
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edge_runtime.errors import UserError
from edge_runtime.rounds.server import AggregatorService

__all__ = ["make_registry", "metrics_text"]


def _families(svc: AggregatorService) -> Iterator[Any]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        SummaryMetricFamily,
    )

    recs = list(svc.metrics)
    closed = recs[1:]
    yield CounterMetricFamily("edge_rt_rounds_closed", "Rounds merged", value=len(closed))
    yield GaugeMetricFamily("edge_rt_round", "Rounds closed so far", value=svc.round)
    op = svc.open
    yield GaugeMetricFamily("edge_rt_round_open", "1 while a round is open",
                            value=1 if op is not None else 0)
    if op is not None:
        yield GaugeMetricFamily("edge_rt_round_deadline_seconds",
                                "Seconds left before the open round's deadline",
                                value=op.deadline_unix - svc.clock())
    accepted = sum(r.participants for r in closed) + len(svc.accepted)
    yield CounterMetricFamily("edge_rt_updates_accepted", "Updates folded into a round",
                              value=accepted)
    rej = CounterMetricFamily("edge_rt_updates_rejected", "Refused updates and messages",
                              labels=["reason"])
    for reason, n in sorted(svc.rejected.items()):
        rej.add_metric([reason], n)
    yield rej
    clip = CounterMetricFamily("edge_rt_updates_clipped", "Sample claims capped (n_samples) "
                               "and updates clipped (norm)", labels=["what"])
    for what in ("n_samples", "norm"):
        clip.add_metric([what], sum(1 for r in closed for c in r.clipped.values() if what in c))
    yield clip
    up_open, down_open = svc.st.round_bytes
    yield CounterMetricFamily("edge_rt_bytes_up", "Update payload bytes received",
                              value=sum(r.bytes_up for r in closed) + up_open)
    yield CounterMetricFamily("edge_rt_bytes_down", "Download payload bytes sent",
                              value=sum(r.bytes_down for r in closed) + down_open)
    yield GaugeMetricFamily("edge_rt_devices_registered", "Devices known",
                            value=len(svc.devices))
    yield GaugeMetricFamily("edge_rt_devices_online", "Devices connected now",
                            value=len(svc.online))
    durations = [b.time_s - a.time_s for a, b in zip(recs, recs[1:], strict=False)]
    yield SummaryMetricFamily("edge_rt_round_duration_seconds", "Round durations",
                              count_value=len(durations), sum_value=sum(durations))
    if durations:
        yield GaugeMetricFamily("edge_rt_last_round_duration_seconds",
                                "The latest round's duration", value=durations[-1])
    last = recs[-1] if recs else None
    if last is not None and last.eval_loss is not None:
        yield GaugeMetricFamily("edge_rt_eval_loss", "Held-out loss of the latest global model",
                                value=last.eval_loss)
    if last is not None and last.dp is not None:
        yield GaugeMetricFamily("edge_rt_dp_epsilon",
                                "Client-level DP: epsilon spent so far (at edge_rt_dp_delta)",
                                value=last.dp["epsilon"])
        yield GaugeMetricFamily("edge_rt_dp_delta", "Client-level DP: the delta of epsilon",
                                value=last.dp["delta"])
    if last is not None and last.eval_accuracy is not None:
        yield GaugeMetricFamily("edge_rt_eval_accuracy",
                                "Held-out choice accuracy of the latest global model",
                                value=last.eval_accuracy)


def make_registry(svc: AggregatorService) -> Any:
    """A `prometheus_client` registry holding the aggregator's collector.

    Raises:
        UserError: prometheus-client is not installed (it is the `observe` extra).
    """
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise UserError("Prometheus metrics need prometheus-client: pip install "
                        "'edge-runtime[observe]'") from None

    class _Collector:
        def collect(self) -> Iterator[Any]:
            for _ in range(4):
                try:
                    return iter(list(_families(svc)))
                except RuntimeError:  # state changed size while read: again
                    continue
            return iter(list(_families(svc)))

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector())  # type: ignore[arg-type]
    return reg


def metrics_text(registry: Any) -> bytes:
    from prometheus_client import generate_latest

    return bytes(generate_latest(registry))
