"""The two-level fleet from the command line, every part its own process: a root
Mosquitto and a site Mosquitto bridged over TLS, `edge-rt aggregator --sites` on the
root, `edge-rt site` on the site broker, two `edge-rt agent`s on the site broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.fleet.mosquitto import (
    AGGREGATOR_USER,
    Bridge,
    LocalMosquitto,
    find_mosquitto,
    stop_process,
)

from .helpers import write_demo_data

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto")


def _spawn(args: list[str], password: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "EDGE_RT_MQTT_PASSWORD": password}
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "edge_runtime", *args], stdout=f,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_site_and_root_processes_merge_a_round(tmp_path: Path) -> None:
    files, _ = write_demo_data(tmp_path / "data", 2)
    devs = ["d0", "d1"]
    with LocalMosquitto([], sites=["site-a"], tls=True) as root:
        bridge = Bridge("site-a", f"127.0.0.1:{root.tls_port}", root.passwords["site-a"],
                        str(root.cafile))
        with LocalMosquitto(devs, bridge=bridge) as site:
            procs = [
                _spawn(["aggregator", "--broker", root.url, "--username", AGGREGATOR_USER,
                        "--sites", "--model", "tiny", "--strategy", "hetlora", "--rounds", "1",
                        "--min-clients", "2", "--round-timeout-s", "60",
                        "--state", str(tmp_path / "root"), "--local-steps", "2",
                        "--set", "fleet.clip_multiple=0"],
                       root.passwords[AGGREGATOR_USER], tmp_path / "root.log"),
                _spawn(["site", "--broker", site.url, "--username", AGGREGATOR_USER,
                        "--site-id", "site-a", "--state", str(tmp_path / "site"),
                        "--timeout-s", "200"],
                       site.passwords[AGGREGATOR_USER], tmp_path / "site.log")]
            procs += [_spawn(["agent", "--broker", site.url, "--username", d, "--device-id",
                              d, "--data", str(f), "--model", "tiny", "--state",
                              str(tmp_path / d)], site.passwords[d], tmp_path / f"{d}.log")
                      for d, f in zip(devs, files, strict=True)]
            try:
                assert procs[0].wait(200) == 0, (tmp_path / "root.log").read_text()[-2000:]
                for p in procs[1:]:
                    assert p.wait(60) == 0
            finally:
                for p in procs:
                    stop_process(p)
    m = json.loads((tmp_path / "root" / "metrics.json").read_text())
    last = m["rounds"][-1]
    assert last["participants"] == 2 and last["rejected"] == {}
    assert last["eval_loss"] is None or last["eval_loss"] > 0
    # the site took both updates and forwarded them in its partial sums
    r0 = tmp_path / "site" / "r0"
    assert json.loads((r0 / "sent.json").read_text()) == devs
    assert sorted(f.stem for f in r0.glob("*.bin")) == devs
    assert not list((r0 / "out").glob("*.part"))  # every partial was answered by the root
