"""The status page of a running demo, loaded in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(url: str, shot: Path) -> str:
    assert CHROMIUM is not None
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--virtual-time-budget=8000", "--window-size=1100,900"]
    subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, timeout=90)
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=90)
    return dom.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_status_page_of_a_running_demo_shows_round_devices_and_a_curve(tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: apt-get install chromium (scripts/setup.sh "
                    "does it as root)")
    from edge_runtime.datasets.build import pull_dataset

    data = tmp_path / "sent"
    pull_dataset("sentiment", data, n_clients=2, partition="domain",
                 raw=REPO / "tests" / "datasets" / "fixtures" / "sentiment")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime", "demo", "--out", str(tmp_path / "demo"),
         "--clients", "2", "--rounds", "2", "--data", str(data), "--http-port", "0",
         "--http-linger-s", "120"], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        url = None
        lines = []
        end = time.monotonic() + 300
        assert proc.stderr is not None
        while time.monotonic() < end:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"status page (http://127\.0\.0\.1:\d+/)", line)
            url = url or (found.group(1) if found else None)
            if "stays up" in line:  # every round closed; the page is still served
                break
        assert url is not None and "stays up" in lines[-1], "".join(lines[-20:])
        shot = tmp_path / "status.png"
        dom = _chromium(url, shot)
        print(f"status page screenshot: {shot}")
        assert 'data-round="2"' in dom and "finished: 2 of 2 rounds" in dom
        for dev in ("dev0", "dev1"):
            assert f'data-device="{dev}"' in dom
        curves = re.findall(r'<polyline points="([^"]*)"[^>]*data-label="accuracy"', dom)
        assert curves and len(curves[0].split()) == 3  # base + 2 rounds, drawn
        assert shot.is_file() and shot.stat().st_size > 10_000
        # and Prometheus sees the same run
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(url + "metrics", timeout=10) as r:
            text = r.read().decode()
        got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert got["edge_rt_rounds_closed_total"] == 2
        assert got["edge_rt_devices_registered"] == 2
        assert got["edge_rt_updates_accepted_total"] == 4
        assert got["edge_rt_bytes_up_total"] > 0
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
