"""The Mosquitto the demo starts: the production ACL and passwords, enforced by Mosquitto."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_runtime.fleet.mosquitto import (
    AGGREGATOR_USER,
    LocalMosquitto,
    bridge_block,
    fleet_acl,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"


def _rules(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_generated_acl_is_the_shipped_one() -> None:
    assert _rules(fleet_acl()) == _rules((DEPLOY / "aclfile").read_text())
    assert _rules(fleet_acl(sites=["site-a", "site-b"])) == _rules(
        (DEPLOY / "root-aclfile").read_text())


def test_shipped_site_conf_bridges_as_the_generated_block() -> None:
    """deploy/mosquitto/site.conf's bridge routes the topics `bridge_block` does (the
    address, password and CA file are the deployment's)."""
    def routes(text: str) -> list[str]:
        return [ln for ln in _rules(text) if ln.split()[0] in ("topic", "connection",
                                                             "remote_username",
                                                             "bridge_tls_version")]
    block = bridge_block("site-a", "root:8883", "pw", "/ca.crt")
    assert sorted(routes(block)) == sorted(routes((DEPLOY / "site.conf").read_text()))


def _client(port: int, user: str, password: str, inbox: queue.Queue | None = None
            ) -> tuple[mqtt.Client, int]:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user}-{time.time_ns()}",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    codes: queue.Queue = queue.Queue()
    c.on_connect = lambda cl, ud, fl, rc, pr=None: codes.put(rc)
    if inbox is not None:
        c.on_message = lambda cl, ud, msg: inbox.put((msg.topic, bytes(msg.payload)))
    c.connect("127.0.0.1", port)
    c.loop_start()
    rc = codes.get(timeout=10)
    return c, int(rc.value if hasattr(rc, "value") else rc)


def _listen(m: LocalMosquitto) -> tuple[mqtt.Client, queue.Queue]:
    """The aggregator user subscribed to everything of the prefix, and its inbox."""
    inbox: queue.Queue = queue.Queue()
    agg, rc = _client(m.port, AGGREGATOR_USER, m.passwords[AGGREGATOR_USER], inbox)
    assert rc == 0
    agg.subscribe("edge-rt/#", qos=1)
    time.sleep(0.3)
    return agg, inbox


def _received(inbox: queue.Queue) -> list[tuple[str, bytes]]:
    """What arrives: the first message within 5 s, then all within 0.5 s more."""
    got = [inbox.get(timeout=5)]
    time.sleep(0.5)
    while not inbox.empty():
        got.append(inbox.get())
    return got


@pytest.mark.timeout(60)
def test_devices_write_only_their_own_topics_and_need_their_password() -> None:
    with LocalMosquitto(["dev0", "dev1"]) as m:
        agg, inbox = _listen(m)
        dev0, rc = _client(m.port, "dev0", m.passwords["dev0"])
        assert rc == 0
        dev0.publish("edge-rt/default/dev/dev1/update", b"forged", qos=1).wait_for_publish(5)
        dev0.publish("edge-rt/default/dev/dev0/update", b"own", qos=1).wait_for_publish(5)
        got = _received(inbox)
        assert got == [("edge-rt/default/dev/dev0/update", b"own")]  # the forgery never arrived
        bad, rc = _client(m.port, "dev1", m.passwords["dev0"])  # another device's password
        bad.loop_stop()
        assert rc != 0
        for c in (agg, dev0):
            c.loop_stop()
            c.disconnect()
        workdir = m.workdir
    assert not workdir.exists() and m.proc is None  # stopped and cleaned up


@pytest.mark.timeout(60)
def test_a_site_bridge_writes_only_its_own_partials() -> None:
    """On a root broker, site-a's user may forward registrations and send site-a's
    partials, not site-b's nor a device's update; a wrong password is refused."""
    with LocalMosquitto([], sites=["site-a", "site-b"]) as m:
        agg, inbox = _listen(m)
        site, rc = _client(m.port, "site-a", m.passwords["site-a"])
        assert rc == 0
        for topic in ("edge-rt/f/site/site-b/up/t/m", "edge-rt/f/dev/d1/up/t/m",
                      "edge-rt/f/agg/round", "edge-rt/f/dev/d1/register",
                      "edge-rt/f/site/site-a/up/t/m"):
            site.publish(topic, b"x", qos=1).wait_for_publish(5)
        got = {topic for topic, _ in _received(inbox)}
        assert got == {"edge-rt/f/dev/d1/register", "edge-rt/f/site/site-a/up/t/m"}
        bad, rc = _client(m.port, "site-b", m.passwords["site-a"])
        bad.loop_stop()
        assert rc != 0
        for c in (agg, site):
            c.loop_stop()
            c.disconnect()


@pytest.mark.timeout(60)
def test_password_file_is_hashed_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 devices: one mosquitto_passwd run, not one per user (bench_fleet_load.py)."""
    import subprocess

    calls: list[list[str]] = []
    run = subprocess.run

    def counting_run(cmd, *a, **kw):  # type: ignore[no-untyped-def]
        calls.append(list(cmd))
        return run(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "run", counting_run)
    users = [f"d{k:04d}" for k in range(1000)]
    with LocalMosquitto(users) as m:
        lines = (m.workdir / "passwd").read_text().splitlines()
        assert len(lines) == 1001 and all(ln.split(":", 1)[1].startswith("$7$") for ln in lines)
        assert not any(m.passwords[u] in "".join(lines) for u in users[:10])  # hashed
        ok, rc = _client(m.port, users[-1], m.passwords[users[-1]])
        assert rc == 0
        ok.loop_stop()
        ok.disconnect()
    assert sum("mosquitto_passwd" in c[0] for c in calls) == 1
