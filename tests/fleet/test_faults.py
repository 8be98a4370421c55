"""Fault tests against a real Mosquitto: broker restart, agent and aggregator kill -9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_runtime.config import MqttConfig

from .helpers import Runner, make_agent, make_service, start_aggregator, wait_for, write_demo_data

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _mq(url: str) -> MqttConfig:
    return MqttConfig(url=url, reconnect_min_s=0.5, reconnect_max_s=1.0)


def _outbox_has(state: Path) -> bool:
    return any((state / "outbox").glob("*.json"))


def _agent_cmd(url: str, dev: str, data: Path, state: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edge_runtime", "agent", "--broker", url, "--device-id", dev,
            "--data", str(data), "--model", "tiny", "--state", str(state), "--device-class",
            "pi5", "--ack-timeout-s", "3", *extra]


@pytest.mark.timeout(180)
def test_broker_restarted_mid_round(mosquitto, tmp_path: Path) -> None:
    files, _ = write_demo_data(tmp_path / "data", 2)
    mq = _mq(mosquitto.url)
    svc = make_service(tmp_path / "state", rounds=2, min_clients=2, timeout_s=60)
    node, agg = start_aggregator(svc, mq)
    # a slow uplink (1 KiB chunks at 4 kB/s) keeps the upload going while the broker is down
    agents = [make_agent(mq, f"d{i}", files[i], tmp_path / f"a{i}", chunk_size=1024,
                         uplink_bytes_per_s=4000) for i in range(2)]
    runs = [Runner(lambda a=a: a.run(timeout_s=150), f"agent{i}")  # type: ignore[misc]
            for i, a in enumerate(agents)]
    wait_for(lambda: _outbox_has(tmp_path / "a0") or _outbox_has(tmp_path / "a1"), 90,
             "an upload to start")
    assert svc.round == 0 and svc.open is not None
    mosquitto.restart()  # persistence off: retained round, downloads and sessions are gone
    assert agg.join(150) == 2
    assert [r.join(30) for r in runs] == [2, 2]
    assert [m.participants for m in svc.metrics] == [0, 2, 2]
    assert svc.rejected.get("straggler_dropped", 0) == 0
    assert node.link.connects >= 2 and all(a.link.connects >= 2 for a in agents)


@pytest.mark.timeout(240)
def test_agent_killed_mid_upload_then_rejoins(mosquitto, tmp_path: Path) -> None:
    files, _ = write_demo_data(tmp_path / "data", 2)
    mq = _mq(mosquitto.url)
    svc = make_service(tmp_path / "state", rounds=1, min_clients=2, timeout_s=120)
    _, agg = start_aggregator(svc, mq)
    fast = make_agent(mq, "fast", files[0], tmp_path / "fast")
    fast_run = Runner(lambda: fast.run(timeout_s=200), "fast")
    state = tmp_path / "slow"
    log1 = open(tmp_path / "slow1.log", "wb")
    # 1 KiB chunks at 2 kB/s: a ~15 kB update takes ~8 s to upload
    p1 = subprocess.Popen(_agent_cmd(mosquitto.url, "slow", files[1], state, "--chunk-size",
                                     "1024", "--uplink-kbps", "2"), stdout=log1,
                          stderr=subprocess.STDOUT, env=ENV)
    try:
        wait_for(lambda: _outbox_has(state), 150, "the slow agent to start its upload")
        time.sleep(1.5)  # some chunks are out, most are not
        p1.kill()
        p1.wait(10)
        assert svc.open is not None and "slow" not in svc.accepted  # the round waits
        first_tid = next((state / "outbox").glob("*.json")).stem
        log2 = open(tmp_path / "slow2.log", "wb")
        p2 = subprocess.Popen(_agent_cmd(mosquitto.url, "slow", files[1], state), stdout=log2,
                              stderr=subprocess.STDOUT, env=ENV)
        assert agg.join(150) == 1
        assert p2.wait(60) == 0
    finally:
        for p in (p1, locals().get("p2")):
            if p is not None and p.poll() is None:
                p.kill()
    assert fast_run.join(30) == 1
    assert svc.metrics[1].participants == 2
    assert sorted(svc.metrics[1].accepted) == ["fast", "slow"]
    text = (tmp_path / "slow2.log").read_text()
    assert first_tid in text  # the restarted agent re-sent the update from its outbox ...
    assert "round 0 trained" not in text  # ... instead of training again
    assert not _outbox_has(state)


@pytest.mark.timeout(300)
def test_aggregator_killed_and_resumed(mosquitto, tmp_path: Path) -> None:
    files, _ = write_demo_data(tmp_path / "data", 2)
    mq = _mq(mosquitto.url)
    state = tmp_path / "agg-state"
    cmd = [sys.executable, "-m", "edge_runtime", "aggregator", "--broker", mosquitto.url,
           "--strategy", "hetlora", "--rounds", "2", "--min-clients", "2",
           "--round-timeout-s", "120", "--state", str(state), "--local-steps", "3",
           "--seq-len", "48", "--depth", "2", "--model", "tiny"]
    log1 = open(tmp_path / "agg1.log", "wb")
    a1 = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=ENV)
    agents = [make_agent(mq, "fast", files[0], tmp_path / "fast"),
              make_agent(mq, "slow", files[1], tmp_path / "slow", chunk_size=1024,
                         uplink_bytes_per_s=2000)]
    runs = [Runner(lambda a=a: a.run(timeout_s=280), a.cfg.device_id)  # type: ignore[misc]
            for a in agents]
    journal = state / "journal" / "r0"
    a2 = None
    try:
        wait_for(lambda: journal.is_dir() and len(list(journal.glob("*.bin"))) == 1, 180,
                 "the first update of round 0 to be journaled")
        a1.kill()  # kill -9 with one update in and one on the way
        a1.wait(10)
        st = json.loads((state / "state.json").read_text())
        assert st["round"] == 0 and st["open"] is not None
        log2 = open(tmp_path / "agg2.log", "wb")
        a2 = subprocess.Popen(cmd, stdout=log2, stderr=subprocess.STDOUT, env=ENV)
        assert a2.wait(240) == 0
    finally:
        for p in (a1, a2):
            if p is not None and p.poll() is None:
                p.kill()
    assert [r.join(60) for r in runs] == [2, 2]
    st = json.loads((state / "state.json").read_text())
    assert [m["participants"] for m in st["metrics"]] == [0, 2, 2]
    assert [sorted(m["accepted"]) for m in st["metrics"][1:]] == [["fast", "slow"]] * 2
    # whatever was re-sent after the restart was refused as a duplicate, never merged again
    assert st["rejected"].get("duplicate", 0) <= 2
    assert "resumed aggregator state: round 0, 1 accepted" in (tmp_path / "agg2.log").read_text()
    metrics = json.loads((state / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
