"""The status JSON and Prometheus metrics of a live aggregator, scraped over HTTP."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.fl.types import ClientPlan
from edge_runtime.observe.http import ObserveServer
from tests.fleet.test_aggregator import Clock, make_service, register, send, trained


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_and_status_follow_the_rounds(tmp_path: Path) -> None:
    clock = Clock()
    svc = make_service(tmp_path, "fedavg", clock, rounds=2, min_clients=2)
    register(svc, {"a": "pi4", "b": "phone", "c": "pi5"})
    svc.set_online("c", False)
    opened = svc.plan_round()
    plans = {d: ClientPlan.from_json(p.plan) for d, p in opened.announcement.devices.items()}
    web = ObserveServer(svc, "127.0.0.1", 0)
    try:
        assert send(svc, "a", trained(plans["a"], 1)).accepted
        assert not send(svc, "b", {}, raw=b"garbage").accepted  # one bad update
        assert not send(svc, "a", trained(plans["a"], 2)).accepted  # a duplicate
        clock.t += 5.0
        code, text = _get(web.url + "metrics")
        m = _samples(text)
        assert code == 200
        assert m[("edge_rt_devices_registered", ())] == 3
        assert m[("edge_rt_devices_online", ())] == 2
        assert m[("edge_rt_round_open", ())] == 1
        assert m[("edge_rt_updates_accepted_total", ())] == 1
        rejected = {dict(k[1])["reason"]: v for k, v in m.items()
                    if k[0] == "edge_rt_updates_rejected_total"}
        assert rejected == {reason: 1.0 for reason in svc.rejected}
        assert "duplicate" in rejected and len(rejected) == 2
        assert m[("edge_rt_round_deadline_seconds", ())] == pytest.approx(25.0)
        assert m[("edge_rt_bytes_up_total", ())] == svc.st.round_bytes[0] > 0
        assert m[("edge_rt_rounds_closed_total", ())] == 0
        st = json.loads(_get(web.url + "status.json")[1])
        assert st["open"]["round"] == 1 and st["open"]["arrived"] == ["a"]
        rows = {d["id"]: d for d in st["devices"]}
        assert (rows["a"]["update"], rows["b"]["update"]) == ("arrived", "waiting")
        assert rows["a"]["rank"] == 8 and rows["a"]["class"] == "pi4"
        assert rows["c"]["online"] is False and rows["a"]["seconds_since_seen"] == 5.0
        assert {r["reason"] for r in st["recent_rejections"]} == set(rejected)
        clock.t += 30.0  # past the deadline: b is late
        st = json.loads(_get(web.url + "status.json")[1])
        assert {d["id"]: d["update"] for d in st["devices"]}["b"] == "late"
        assert send(svc, "b", trained(plans["b"], 3)).accepted
        rec = svc.close_round(duration_s=12.5)
        assert rec is not None
        m = _samples(_get(web.url + "metrics")[1])
        assert m[("edge_rt_rounds_closed_total", ())] == 1
        assert m[("edge_rt_round_open", ())] == 0
        assert m[("edge_rt_updates_accepted_total", ())] == 2
        assert m[("edge_rt_round_duration_seconds_count", ())] == 1
        assert m[("edge_rt_round_duration_seconds_sum", ())] == pytest.approx(12.5)
        assert m[("edge_rt_bytes_up_total", ())] == rec.bytes_up
        assert m[("edge_rt_updates_clipped_total", (("what", "norm"),))] == 0
        st = json.loads(_get(web.url + "status.json")[1])
        assert [r["round"] for r in st["rounds"]] == [0, 1] and st["open"] is None
        code, page = _get(web.url)
        assert code == 200 and "status.json" in page and "<svg" in page
    finally:
        web.stop()
