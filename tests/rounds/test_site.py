"""A site aggregator's round state with in-memory updates (no MQTT): what it forwards, a
restart that merges nothing twice, a site that misses the deadline, bad partials."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from edge_runtime.config import FleetConfig
from edge_runtime.fl.types import ClientPlan
from edge_runtime.fleet.codec import decode_partial, encode_adapter, encode_partial
from edge_runtime.fleet.transfer import make_manifest
from edge_runtime.rounds.server import AggregatorService
from edge_runtime.rounds.site import SiteService

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fleet"))
from test_aggregator import FP, Clock, make_service, register, send, trained  # noqa: E402

CFG = FleetConfig(rounds=2, min_clients=1, round_timeout_s=30, weight_cap="none",
                  clip_multiple=0)


def _open(tmp: Path, strategy: str = "hetlora") -> tuple[AggregatorService, Clock, dict]:
    clock = Clock()
    root = make_service(tmp, strategy, clock)
    register(root, {"a": "pi4", "b": "pi5", "c": "phone", "d": "pi5"})
    opened = root.plan_round()
    plans = {d: ClientPlan.from_json(p.plan) for d, p in opened.announcement.devices.items()}
    return root, clock, {"ann": opened.announcement, "plans": plans}


def _site(tmp: Path, name: str, root: AggregatorService, ann) -> SiteService:  # type: ignore[no-untyped-def]
    s = SiteService(name, CFG, FP, tmp / name)
    s.open_round(ann, root.global_adapter)
    return s


def _update(site: SiteService, dev: str, adapter: dict, rnd: int, n: int = 10):  # type: ignore[no-untyped-def]
    data = encode_adapter(adapter, {"fingerprint": FP, "n_samples": n, "round": rnd})
    return site.accept_update(dev, make_manifest(data, kind="update", round=rnd,
                                                 device_id=dev), data)


def _partial(root: AggregatorService, site: str, tid: str, data: bytes,  # type: ignore[no-untyped-def]
             rnd: int | None = None):
    m = make_manifest(data, kind="partial", round=root.round if rnd is None else rnd,
                      device_id=site,
                      transfer_id=tid)
    return root.accept_partial(site, m, data)


def test_site_partials_give_the_flat_round_and_a_restart_merges_nothing_twice(
        tmp_path: Path) -> None:
    root, _, r = _open(tmp_path / "tree")
    flat, _, _ = _open(tmp_path / "flat")
    ups = {d: trained(r["plans"][d], i) for i, d in enumerate("abcd")}
    ns = {"a": 10, "b": 30, "c": 7, "d": 12}
    for d in "abcd":
        assert send(flat, d, ups[d], n=ns[d]).accepted
    s1 = _site(tmp_path, "s1", root, r["ann"])
    for d in "ab":
        assert _update(s1, d, ups[d], 0, ns[d]).accepted
    assert not _update(s1, "a", ups["a"], 0).accepted  # a duplicate at the site
    tid, data = s1.take_partial() or ("", b"")
    assert _partial(root, "s1", tid, data).accepted
    # site 1 restarts (its outbox unanswered): it resumes, sends the same partial again,
    # and the root refuses it; nothing of it is folded twice at the site either
    again = SiteService("s1", CFG, FP, tmp_path / "s1")
    again.open_round(r["ann"], root.global_adapter)
    assert again.take_partial() is None and set(again.unacked()) == {tid}
    v = _partial(root, "s1", tid, again.unacked()[tid])
    assert not v.accepted and v.reason == "duplicate"
    # site 2: c now, d later in a second partial of the same round
    s2 = _site(tmp_path, "s2", root, r["ann"])
    assert _update(s2, "c", ups["c"], 0, ns["c"]).accepted
    t2, d2 = s2.take_partial() or ("", b"")
    assert _update(s2, "d", ups["d"], 0, ns["d"]).accepted
    t3, d3 = s2.take_partial() or ("", b"")
    p3, meta3 = decode_partial(d3)
    assert p3.count == 1 and meta3["devices"] == {"d": 12}
    assert _partial(root, "s2", t2, d2).accepted and _partial(root, "s2", t3, d3).accepted
    assert root.ready_to_close() and flat.ready_to_close()
    got, want = root.close_round(), flat.close_round()
    assert got is not None and want is not None
    assert got.participants == want.participants == 4 and got.accepted == want.accepted
    for name, w in flat.global_adapter.items():
        torch.testing.assert_close(root.global_adapter[name].delta(), w.delta(),
                                   rtol=1e-5, atol=1e-7)


def test_a_site_that_misses_the_deadline_is_a_straggler_group_and_late(tmp_path: Path) -> None:
    root, clock, r = _open(tmp_path)
    s1 = _site(tmp_path, "s1", root, r["ann"])
    for i, d in enumerate("ab"):
        assert _update(s1, d, trained(r["plans"][d], i), 0).accepted
    tid, data = s1.take_partial() or ("", b"")
    assert _partial(root, "s1", tid, data).accepted
    s2 = _site(tmp_path, "s2", root, r["ann"])
    for i, d in enumerate("cd"):
        assert _update(s2, d, trained(r["plans"][d], 5 + i), 0).accepted
    late_tid, late = s2.take_partial() or ("", b"")
    clock.t += 31
    assert root.ready_to_close()
    rec = root.close_round()
    assert rec is not None and rec.participants == 2 and rec.stragglers == 2
    before = {n: w.delta().clone() for n, w in root.global_adapter.items()}
    v = _partial(root, "s2", late_tid, late, rnd=0)
    assert not v.accepted and v.reason == "late"
    for n, w in root.global_adapter.items():
        assert torch.equal(w.delta(), before[n])


def test_bad_partials_are_refused_with_reasons_and_merge_nothing(tmp_path: Path) -> None:
    root, _, r = _open(tmp_path)
    s1 = _site(tmp_path, "s1", root, r["ann"])
    assert _update(s1, "a", trained(r["plans"]["a"], 0), 0).accepted
    _, good = s1.take_partial() or ("", b"")
    p, meta = decode_partial(good)
    cases = {
        "garbage": b"\x00" * 100,
        "not_selected": encode_partial(p, {**meta, "devices": {"zz": 10}}),
        "bad_manifest": encode_partial(p, {**meta, "devices": {"a": 10, "b": 10}}),
        "bad_keys": encode_partial(type(p)("flexlora", p.tensors, p.count), meta),
    }
    for reason, data in cases.items():
        v = _partial(root, "s1", f"t-{reason}", data)
        assert not v.accepted and v.reason == reason, (reason, v)
    nan = {k: t.clone() for k, t in p.tensors.items()}
    next(iter(nan.values()))[0] = float("nan")
    v = _partial(root, "s1", "t-nan", encode_partial(type(p)(p.kind, nan, p.count), meta))
    assert not v.accepted and v.reason == "non_finite"
    assert root.accepted == []
    assert _partial(root, "s1", "t-good", good).accepted and root.accepted == ["a"]


def test_a_site_refuses_what_the_root_would(tmp_path: Path) -> None:
    root, _, r = _open(tmp_path)
    s1 = _site(tmp_path, "s1", root, r["ann"])
    bad = trained(r["plans"]["a"], 0)
    next(iter(bad.values())).lora_b[0, 0] = float("inf")
    assert _update(s1, "a", bad, 0).reason == "non_finite"
    assert _update(s1, "a", trained(r["plans"]["a"], 0), 1).reason == "stale_round"
    assert _update(s1, "zz", trained(r["plans"]["a"], 0), 0).reason == "not_selected"
    assert s1.take_partial() is None
    with pytest.raises(Exception, match="base"):
        SiteService("s9", CFG, "0" * 64, tmp_path / "s9").open_round(r["ann"],
                                                                    root.global_adapter)
