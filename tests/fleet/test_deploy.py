"""deploy/mosquitto/mosquitto.conf as shipped (paths and ports substituted) starts, and a
device reaches it over TLS with its password while the aggregator uses loopback."""

from __future__ import annotations

import getpass
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from edge_runtime.config import MqttConfig
from edge_runtime.fleet.mqtt_client import BrokerUnavailable, MqttLink

from .conftest import MOSQUITTO, free_port, wait_port
from .helpers import make_certs

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(90)]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"


def test_shipped_config_tls_password_and_acl(tmp_path: Path) -> None:
    # Missing tools are failures, not skips: scripts/setup.sh installs both.
    assert shutil.which("openssl"), "openssl is needed for test certs: apt-get install openssl"
    assert MOSQUITTO is not None, "mosquitto is not installed: apt-get install mosquitto"
    etc = tmp_path / "etc"
    etc.mkdir()
    (tmp_path / "persist").mkdir()
    ca, _, _ = make_certs(etc)
    shutil.copy(DEPLOY / "aclfile", etc / "aclfile")
    for user, pw in (("aggregator", "agg-pw"), ("pi-01", "pw1")):
        subprocess.run(["mosquitto_passwd", "-b", *([] if (etc / "passwd").exists() else ["-c"]),
                        str(etc / "passwd"), user, pw], check=True, capture_output=True,
                       timeout=10)
    plain, tls = free_port(), free_port()
    conf = (DEPLOY / "mosquitto.conf").read_text()
    for old, new in (("/etc/mosquitto/edge-rt/", f"{etc}/"),
                     ("/var/lib/mosquitto/", f"{tmp_path / 'persist'}/"),
                     ("listener 1883 127.0.0.1", f"listener {plain} 127.0.0.1"),
                     ("listener 8883", f"listener {tls} 127.0.0.1")):
        assert old in conf, old
        conf = conf.replace(old, new)
    (tmp_path / "mosquitto.conf").write_text(f"user {getpass.getuser()}\n" + conf)
    log = open(tmp_path / "mosquitto.log", "wb")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(tmp_path / "mosquitto.conf")], stdout=log,
                            stderr=log)
    try:
        wait_port(plain)
        wait_port(tls)
        agg = MqttLink(MqttConfig(url=f"mqtt://127.0.0.1:{plain}", username="aggregator",
                                  password="agg-pw"), "agg", ["edge-rt/+/dev/#"])
        agg.connect(10)
        dev = MqttLink(MqttConfig(url=f"mqtts://127.0.0.1:{tls}", username="pi-01",
                                  password="pw1", tls_ca=str(ca)), "pi-01", [])
        dev.connect(10)
        dev.publish_wait("edge-rt/lab/dev/pi-01/register", b"over tls")
        dev.publish_wait("edge-rt/lab/dev/pi-02/register", b"forged")
        seen = []
        end = time.monotonic() + 3
        while time.monotonic() < end:
            m = agg.get(0.1)
            if m is not None:
                seen.append((m.topic, m.payload))
        assert seen == [("edge-rt/lab/dev/pi-01/register", b"over tls")]
        with pytest.raises(BrokerUnavailable):  # anonymous refused
            MqttLink(MqttConfig(url=f"mqtt://127.0.0.1:{plain}"), "anon", []).connect(5)
        agg.close()
        dev.close()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_round_runs_under_the_shipped_acl(tmp_path: Path) -> None:
    """The protocol needs nothing the ACL forbids: aggregator and devices with passwords."""

    from .conftest import Mosquitto
    from .helpers import Runner, make_agent, make_service, start_aggregator, write_demo_data

    users = {"aggregator": "agg-pw", "pi-01": "pw1", "pi-02": "pw2"}
    m = Mosquitto(tmp_path, users=users, acl=(DEPLOY / "aclfile").read_text())
    m.start()
    try:
        files, _ = write_demo_data(tmp_path / "data", 2)
        svc = make_service(tmp_path / "state", rounds=1, min_clients=2, timeout_s=60)
        _, agg = start_aggregator(svc, MqttConfig(url=m.url, username="aggregator",
                                                  password="agg-pw"))
        agents = [make_agent(MqttConfig(url=m.url, username=d, password=users[d]), d, files[i],
                             tmp_path / d) for i, d in enumerate(("pi-01", "pi-02"))]
        runs = [Runner(lambda a=a: a.run(timeout_s=120), a.cfg.device_id)  # type: ignore[misc]
                for a in agents]
        assert agg.join(130) == 1
        assert [r.join(30) for r in runs] == [1, 1]
        assert sorted(svc.metrics[1].accepted) == ["pi-01", "pi-02"]
        assert all(a.final_applied for a in agents)
    finally:
        m.stop()
