"""Topics and messages round-trip; malformed messages raise ProtocolError."""

from __future__ import annotations

import json

import pytest

from edge_runtime.fleet.protocol import (
    Ack,
    DevicePlan,
    ProtocolError,
    Register,
    RoundAnnouncement,
    Topics,
)


def test_topics_parse_roundtrip() -> None:
    t = Topics("edge-rt", "lab")
    assert t.parse(t.up_chunk("pi-1", "abc", 65536)).offset == 65536
    p = t.parse(t.up_manifest("pi-1", "abc"))
    assert (p.kind, p.device_id, p.transfer_id) == ("up_manifest", "pi-1", "abc")
    assert t.parse(t.down_chunk("g1", 0)).kind == "down_chunk"
    assert t.parse(t.register("x")).kind == "register"
    assert t.parse(t.round()).kind == "round"
    for bad in ("edge-rt/other/agg/round", "edge-rt/lab/dev/a b/register",
                "edge-rt/lab/dev/x/up/t/c/-1", "edge-rt/lab/dev/x/up/t/c/1e3",
                "edge-rt/lab/dev/x/unknown", "edge-rt/lab/agg"):
        with pytest.raises(ProtocolError):
            t.parse(bad)


def test_messages_roundtrip() -> None:
    ann = RoundAnnouncement(round=2, deadline_unix=123.5, fingerprint="fp",
                            strategy={"name": "hetlora", "gamma": 0.8},
                            devices={"a": DevicePlan(plan={"device_id": "a", "rank": 4},
                                                     global_transfer_id="g")})
    assert RoundAnnouncement.from_bytes(ann.to_bytes()) == ann
    # a device of another protocol version is told so, not handed a config it misreads
    old = ann.to_bytes().replace(b'"version":3', b'"version":1')
    with pytest.raises(ProtocolError, match="protocol version 1"):
        RoundAnnouncement.from_bytes(old)
    reg = Register(device_id="a", fingerprint="fp", n_samples=10, profile={"x": 1})
    assert Register.from_bytes(reg.to_bytes()) == reg
    ack = Ack(device_id="a", round=1, transfer_id="t", status="rejected", reason="non_finite")
    assert Ack.from_bytes(ack.to_bytes()) == ack


def test_announcement_sends_each_plan_once() -> None:
    """1,000 devices on two plans: two plan entries on the wire, not 1,000 (one entry per
    device was 2.5 MB at SmolLM2 shapes, above MAX_JSON_BYTES; bench_fleet_load.py)."""
    ranks = {f"model.layers.{i}.self_attn.{t}_proj": 8 for i in range(30) for t in "qv"}
    train = {"steps": 10, "lr": 0.001, "batch_size": 4, "seq_len": 64}
    devices = {f"d{k:04d}": DevicePlan(plan={"device_id": f"d{k:04d}", "ranks": ranks,
                                             "alpha": 16.0, "device_class": ("pi4", "pi5")[k % 2]},
                                       global_transfer_id=f"g0-{k % 2}", train=train)
               for k in range(1000)}
    devices["odd"] = DevicePlan(plan={"device_id": "other", "ranks": {}}, global_transfer_id="g")
    ann = RoundAnnouncement(round=0, deadline_unix=1.0, fingerprint="fp", strategy={},
                            devices=devices)
    wire = ann.to_bytes()
    assert len(wire) < 20_000
    assert len(json.loads(wire)["plans"]) == 3
    assert RoundAnnouncement.from_bytes(wire) == ann  # a plan naming another id keeps it
    for bad in (b'"devices":{"d0000":7', b'"devices":{"d0000":true'):
        broken = wire.replace(b'"devices":{"d0000":0', bad)
        with pytest.raises(ProtocolError, match="names plan"):
            RoundAnnouncement.from_bytes(broken)


def test_messages_reject_wrong_types() -> None:
    with pytest.raises(ProtocolError):
        Register.from_bytes(b'{"device_id":"a","fingerprint":"f","n_samples":true,"version":1}')
    with pytest.raises(ProtocolError):
        RoundAnnouncement.from_bytes(b'{"round":"1"}')
    with pytest.raises(ProtocolError):
        Ack.from_bytes(b'{"device_id":"a","round":1,"transfer_id":"t","status":"maybe"}')
