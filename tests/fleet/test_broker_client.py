"""The embedded broker and the paho wrapper over loopback (and the wrapper on Mosquitto)."""

from __future__ import annotations

import socket
import time

import paho.mqtt.client as mqtt
import pytest

from edge_runtime.config import MqttConfig
from edge_runtime.fleet.broker import EmbeddedBroker, topic_matches
from edge_runtime.fleet.mqtt_client import BrokerUnavailable, MqttLink

pytestmark = pytest.mark.timeout(60)


def _collect(link: MqttLink, n: int, timeout: float = 10.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        m = link.get(0.1)
        if m is not None:
            out.append(m)
    return out


def test_topic_matching() -> None:
    assert topic_matches("a/+/c", "a/b/c")
    assert topic_matches("a/#", "a/b/c")
    assert topic_matches("a/#", "a")
    assert not topic_matches("a/+", "a/b/c")
    assert not topic_matches("a/b", "a/b/c")
    assert not topic_matches("#", "$SYS/x")


def test_pubsub_retained_fallback_and_will() -> None:
    with EmbeddedBroker(classify=lambda t: t.split("/")[0]) as broker:
        cfg = MqttConfig(url=f"mqtt://127.0.0.1:{broker.port}", keepalive_s=5)
        sub = MqttLink(cfg, "sub", ["x/#", "w/presence"])
        pub = MqttLink(cfg, "pub", [], will=("w/presence", b"offline", True))
        pub.connect(10)
        sub.connect(10)
        assert pub.protocol == mqtt.MQTTv311  # embedded broker refused v5: fell back
        pub.publish_wait("x/retained", b"R", retain=True)
        payloads = [bytes([i % 256]) * (1000 + i) for i in range(50)]
        for i, p in enumerate(payloads):
            pub.publish(f"x/{i}", p, qos=1)
        got = _collect(sub, 51)
        assert {m.topic: m.payload for m in got if m.topic != "x/retained"} == {
            f"x/{i}": p for i, p in enumerate(payloads)}
        # a late subscriber gets the retained message
        late = MqttLink(cfg, "late", ["x/retained"])
        late.connect(10)
        m = _collect(late, 1)
        assert m and m[0].payload == b"R" and m[0].retain
        # killing the publisher's TCP connection fires its Will
        pub.kill()
        will = _collect(sub, 1)
        assert will and will[0].topic == "w/presence" and will[0].payload == b"offline"
        up = broker.traffic_snapshot()["x"]
        assert up[0] >= sum(len(p) for p in payloads)
        for link in (sub, late):
            link.close()


def test_persistent_session_queues_while_away() -> None:
    with EmbeddedBroker() as broker:
        cfg = MqttConfig(url=f"mqtt://127.0.0.1:{broker.port}")
        sub = MqttLink(cfg, "persist", ["q/#"])
        sub.connect(10)
        time.sleep(0.2)
        sub.close()
        pub = MqttLink(cfg, "pub2", [])
        pub.connect(10)
        pub.publish_wait("q/1", b"while-away")
        sub2 = MqttLink(cfg, "persist", ["q/#"])
        sub2.connect(10)
        got = _collect(sub2, 1)
        assert got and got[0].payload == b"while-away"
        pub.close()
        sub2.close()


def test_auth_refused() -> None:
    with EmbeddedBroker(users={"dev1": "pw"}) as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        with pytest.raises(BrokerUnavailable):
            MqttLink(MqttConfig(url=url, username="dev1", password="wrong"), "c", []).connect(5)
        ok = MqttLink(MqttConfig(url=url, username="dev1", password="pw"), "c2", [])
        ok.connect(5)
        ok.close()


def test_unreachable_broker_times_out() -> None:
    from fleet.conftest import free_port
    cfg = MqttConfig(url=f"mqtt://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        MqttLink(cfg, "nobody", []).connect(1.5)
    assert time.monotonic() - t0 < 5


@pytest.mark.mosquitto
def test_link_speaks_v5_to_mosquitto_and_resubscribes_after_restart(mosquitto) -> None:
    cfg = MqttConfig(url=mosquitto.url, reconnect_min_s=0.5, reconnect_max_s=1)
    sub = MqttLink(cfg, "s5", ["t/#"])
    sub.connect(10)
    assert sub.protocol == mqtt.MQTTv5
    mosquitto.restart()  # persistence off: the session is gone, on_connect resubscribes
    deadline = time.monotonic() + 15
    while sub.connects < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sub.connects >= 2
    time.sleep(0.3)
    pub = MqttLink(cfg, "p5", [])
    pub.connect(10)
    pub.publish_wait("t/after", b"ok")
    got = _collect(sub, 1)
    assert got and got[0].payload == b"ok"
    pub.close()
    sub.close()


def _raw_connect(port: int, client_id: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x00\x00\x3c"  # level 4, flags: clean session 0, keepalive 60
    body = var + len(cid).to_bytes(2, "big") + cid
    s.sendall(bytes([0x10, len(body)]) + body)
    assert s.recv(4)[:2] == b"\x20\x02"  # CONNACK
    return s


def _read_packet(s: socket.socket) -> tuple[int, bytes]:
    first = s.recv(1)[0]
    n, mult = 0, 1
    while True:
        b = s.recv(1)[0]
        n += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    return first, body


def test_unacked_qos1_is_resent_with_dup_when_the_session_resumes() -> None:
    with EmbeddedBroker() as broker:
        s = _raw_connect(broker.port, "raw")
        topic = b"r/t"
        sub = b"\x00\x01" + len(topic).to_bytes(2, "big") + topic + b"\x01"
        s.sendall(bytes([0x82, len(sub)]) + sub)
        assert _read_packet(s)[0] == 0x90  # SUBACK
        pub = MqttLink(MqttConfig(url=f"mqtt://127.0.0.1:{broker.port}"), "p", [])
        pub.connect(10)
        pub.publish_wait("r/t", b"payload")
        first, body = _read_packet(s)
        assert first & 0xF0 == 0x30 and (first >> 1) & 3 == 1 and not first & 0x08
        assert body.endswith(b"payload")
        s.close()  # gone without a PUBACK
        s2 = _raw_connect(broker.port, "raw")
        first2, body2 = _read_packet(s2)
        assert first2 & 0x08 and body2 == body  # same packet id and payload, DUP set
        pid = body2[2 + len(topic):4 + len(topic)]
        s2.sendall(b"\x40\x02" + pid)  # PUBACK: now it is delivered
        s2.close()
        s3 = _raw_connect(broker.port, "raw")
        s3.settimeout(0.5)
        with pytest.raises(socket.timeout):
            _read_packet(s3)
        s3.close()
        pub.close()
