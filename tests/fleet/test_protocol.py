"""Topics and messages round-trip; malformed messages raise ProtocolError."""

from __future__ import annotations

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
                            devices={"a": DevicePlan(plan={"rank": 4}, global_transfer_id="g")})
    assert RoundAnnouncement.from_bytes(ann.to_bytes()) == ann
    # a device of another protocol version is told so, not handed a config it misreads
    old = ann.to_bytes().replace(b'"version":2', b'"version":1')
    with pytest.raises(ProtocolError, match="protocol version 1"):
        RoundAnnouncement.from_bytes(old)
    reg = Register(device_id="a", fingerprint="fp", n_samples=10, profile={"x": 1})
    assert Register.from_bytes(reg.to_bytes()) == reg
    ack = Ack(device_id="a", round=1, transfer_id="t", status="rejected", reason="non_finite")
    assert Ack.from_bytes(ack.to_bytes()) == ack


def test_messages_reject_wrong_types() -> None:
    with pytest.raises(ProtocolError):
        Register.from_bytes(b'{"device_id":"a","fingerprint":"f","n_samples":true,"version":1}')
    with pytest.raises(ProtocolError):
        RoundAnnouncement.from_bytes(b'{"round":"1"}')
    with pytest.raises(ProtocolError):
        Ack.from_bytes(b'{"device_id":"a","round":1,"transfer_id":"t","status":"maybe"}')
