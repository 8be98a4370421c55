"""Bad updates over a real Mosquitto: each refused with its reason, good ones still merged."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from edge_runtime.adapter import LoRAWeights
from edge_runtime.config import MqttConfig
from edge_runtime.fl.types import ClientPlan
from edge_runtime.fleet.codec import encode_adapter
from edge_runtime.fleet.mqtt_client import MqttLink
from edge_runtime.fleet.protocol import (
    Ack,
    AggregatorStatus,
    Manifest,
    Presence,
    Register,
    RoundAnnouncement,
    Topics,
)
from edge_runtime.fleet.transfer import iter_chunks, make_manifest

from .helpers import Runner, make_agent, make_service, start_aggregator, wait_for, write_demo_data

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

BAD = ("nan", "shape", "rank", "fp", "checksum", "oversize", "garbage")
EXPECTED = {"nan": "non_finite", "shape": "bad_shape", "rank": "rank_above_plan",
            "fp": "bad_fingerprint", "checksum": "bad_checksum", "oversize": "oversize",
            "garbage": "garbage"}
MAX_BYTES = 200_000


def _factors(plan: ClientPlan, seed: int, extra_rank: int = 0) -> dict[str, LoRAWeights]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, r in plan.ranks.items():
        d_out, d_in = (64, 64)  # tiny model: q_proj 64x64, v_proj 32x64
        if "v_proj" in name:
            d_out = 32
        rr = r + extra_rank
        out[name] = LoRAWeights(torch.randn(rr, d_in, generator=g) * 0.05,
                                torch.randn(d_out, rr, generator=g) * 0.05, plan.alpha)
    return out


class Attacker:
    """Several fake devices on one connection, each misbehaving in its own way."""

    def __init__(self, mq: MqttConfig, devices: list[str], fingerprint: str) -> None:
        self.t = Topics(mq.prefix, mq.fleet)
        self.devices = devices
        self.fp = fingerprint
        self.link = MqttLink(mq, "attacker", [self.t.round(), self.t.status()]
                             + [self.t.ack(d) for d in devices])
        self.acks: dict[str, list[Ack]] = {d: [] for d in devices}
        self.rounds: dict[int, RoundAnnouncement] = {}
        self.sent: dict[str, tuple[Manifest, bytes]] = {}

    def pump(self, seconds: float) -> bool:
        """Handle incoming messages for `seconds`; returns False (so `pump() or cond` reads)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            m = self.link.get(0.05)
            if m is None or not m.payload:
                continue
            kind = self.t.parse(m.topic).kind
            if kind == "status" and AggregatorStatus.from_bytes(m.payload).online:
                for d in self.devices:
                    self.link.publish(self.t.presence(d), Presence(d, True).to_bytes(),
                                      retain=True)
                    self.link.publish(self.t.register(d), Register(d, self.fp, 10, {}, "pi4")
                                      .to_bytes())
            elif kind == "round":
                a = RoundAnnouncement.from_bytes(m.payload)
                self.rounds[a.round] = a
            elif kind == "ack":
                ack = Ack.from_bytes(m.payload)
                self.acks[ack.device_id].append(ack)
        return False

    def upload(self, dev: str, m: Manifest, data: bytes, *, shuffle: bool = False) -> None:
        msgs = [(self.t.up_chunk(dev, m.transfer_id, o), c) for o, c in iter_chunks(data, m.chunk_size)]
        if shuffle:  # reordered, with duplicates, manifest in the middle
            msgs = msgs + msgs[::2]
            random.Random(0).shuffle(msgs)
            msgs.insert(len(msgs) // 2, (self.t.up_manifest(dev, m.transfer_id), m.to_bytes()))
        else:
            msgs.insert(0, (self.t.up_manifest(dev, m.transfer_id), m.to_bytes()))
        for topic, payload in msgs:
            self.link.publish(topic, payload, qos=1)
        self.sent[dev] = (m, data)


def _payload(a: Attacker, dev: str, ann: RoundAnnouncement, seed: int) -> tuple[Manifest, bytes]:
    plan = ClientPlan.from_json(ann.devices[dev].plan)
    fp = a.fp
    f = _factors(plan, seed)
    if dev == "nan":
        next(iter(f.values())).lora_a[0, 0] = float("nan")
    elif dev == "shape":
        k = next(iter(f))
        f[k] = LoRAWeights(torch.zeros(f[k].rank, 40), f[k].lora_b, f[k].alpha)
    elif dev == "rank":
        f = _factors(plan, seed, extra_rank=1)
    elif dev == "fp":
        fp = "0" * 64
    data = encode_adapter(f, {"fingerprint": fp, "n_samples": 10, "round": ann.round})
    if dev == "garbage":
        data = random.Random(1).randbytes(5000)
    m = make_manifest(data, kind="update", round=ann.round, device_id=dev, chunk_size=1024)
    if dev == "checksum":
        m.sha256 = make_manifest(data + b"x", kind="update", round=0).sha256
    if dev == "oversize":
        m.size = MAX_BYTES + 1
    return m, data


@pytest.mark.timeout(240)
def test_bad_updates_each_refused_with_reason(mosquitto, tmp_path: Path) -> None:
    files, _ = write_demo_data(tmp_path / "data", 1)
    mq = MqttConfig(url=mosquitto.url)
    svc = make_service(tmp_path / "state", rounds=2, min_clients=1, timeout_s=12,
                       max_update_bytes=MAX_BYTES)
    devices = [*BAD, "shuffled", "replay", "sleepy"]
    attacker = Attacker(mq, devices, svc.fingerprint)
    attacker.link.connect(10)
    good = make_agent(mq, "good", files[0], tmp_path / "good")
    good_run = Runner(lambda: good.run(timeout_s=200), "good")
    _, agg = start_aggregator(svc, mq, start_clients=len(devices) + 1)

    wait_for(lambda: attacker.pump(0.2) or 0 in attacker.rounds, 120, "round 0")
    ann0 = attacker.rounds[0]
    assert set(ann0.devices) == {*devices, "good"}
    for i, dev in enumerate([*BAD, "shuffled", "replay"]):
        m, data = _payload(attacker, dev, ann0, i)
        attacker.upload(dev, m, data, shuffle=dev == "shuffled")
    wait_for(lambda: attacker.pump(0.2) or all(attacker.acks[d] for d in [*BAD, "shuffled",
                                                                          "replay"]),
             60, "acks for every upload of round 0")
    got = {d: attacker.acks[d][0].reason for d in BAD}
    assert got == EXPECTED
    assert attacker.acks["shuffled"][0].status == "accepted"
    assert attacker.acks["replay"][0].status == "accepted"

    # round 1: replay round 0's accepted update; the straggler sends its round-0 update late
    wait_for(lambda: attacker.pump(0.2) or 1 in attacker.rounds, 60, "round 1")
    m_old, data_old = attacker.sent["replay"]
    # the same bytes under a new transfer id: a replay of round 0
    attacker.upload("replay", make_manifest(data_old, kind="update", round=0,
                                            device_id="replay", chunk_size=1024), data_old)
    m_late, data_late = _payload(attacker, "sleepy", ann0, 99)
    attacker.upload("sleepy", m_late, data_late)
    wait_for(lambda: attacker.pump(0.2) or (len(attacker.acks["replay"]) >= 2
                                             and attacker.acks["sleepy"]), 60, "replay acks")
    assert attacker.acks["replay"][1].reason == "stale_round"
    assert attacker.acks["sleepy"][0].reason == "late"
    # re-sending the very transfer that was accepted gets the same answer again (a lost ack
    # is harmless) and is not processed a second time
    attacker.upload("replay", m_old, data_old)
    wait_for(lambda: attacker.pump(0.2) or len(attacker.acks["replay"]) >= 3, 30, "re-ack")
    again = attacker.acks["replay"][2]
    assert (again.status, again.round, again.transfer_id) == ("accepted", 0, m_old.transfer_id)

    assert agg.join(120) == 2
    assert good_run.join(60) == 2
    r1 = svc.metrics[1]
    assert sorted(r1.accepted) == ["good", "replay", "shuffled"]  # the round completed
    for reason in EXPECTED.values():
        assert r1.rejected[reason] == 1, reason
    # every device that delivered nothing valid by the deadline is a dropped straggler
    assert r1.rejected["straggler_dropped"] == len(BAD) + 1
    assert svc.rejected["stale_round"] == 1 and svc.rejected["late"] == 1
    assert "replay" not in svc.metrics[2].accepted
    attacker.link.close()


@pytest.mark.timeout(60)
def test_acl_refuses_writing_another_devices_topics(tmp_path: Path) -> None:
    """deploy/mosquitto/aclfile: a device writes only below its own dev/<id>/."""
    import paho.mqtt.client as mqtt

    from .conftest import Mosquitto

    acl = (Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "aclfile").read_text()
    m = Mosquitto(tmp_path, users={"aggregator": "agg-pw", "pi-01": "pw1", "pi-02": "pw2"},
                  acl=acl)
    m.start()
    try:
        t = Topics("edge-rt", "lab")
        watcher = MqttLink(MqttConfig(url=m.url, username="aggregator", password="agg-pw"),
                           "watch", ["edge-rt/lab/dev/#"])
        watcher.connect(10)
        dev1 = MqttLink(MqttConfig(url=m.url, username="pi-01", password="pw1"), "pi-01", [])
        dev1.connect(10)
        assert dev1.protocol == mqtt.MQTTv5
        ok = dev1.publish(t.register("pi-01"), b"mine")
        forged = dev1.publish(t.up_manifest("pi-02", "t1"), b"forged")
        forged_ack = dev1.publish(t.ack("pi-02"), b"forged")
        ok.wait_for_publish(5)
        forged.wait_for_publish(5)
        forged_ack.wait_for_publish(5)
        seen = []
        end = time.monotonic() + 3
        while time.monotonic() < end:
            msg = watcher.get(0.1)
            if msg is not None:
                seen.append(msg.topic)
        assert seen == [t.register("pi-01")]
        # wrong password: refused at connect
        from edge_runtime.fleet.mqtt_client import BrokerUnavailable
        with pytest.raises(BrokerUnavailable):
            MqttLink(MqttConfig(url=m.url, username="pi-02", password="nope"), "x", []).connect(5)
        watcher.close()
        dev1.close()
    finally:
        m.stop()
