"""scripts/bench_fleet_load.py: its count check, and the whole load test at N=5 through a
real Mosquitto (the long run, N = 100 ... 1,000, is in docs/SCALING.md)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_fleet_load.py"


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_fleet_load", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_count_check_finds_lost_and_double_updates(tmp_path: Path) -> None:
    bench = _bench()
    args = argparse.Namespace(depth=1, rank=2, rounds=2, compression="fp32")
    devices = {f"d{k:05d}": {"sent": {"0": f"t{k}"}, "sends": {"0": 1},
                             "acks": [[0, f"t{k}", "accepted", ""]], "errors": []}
               for k in range(4)}
    devices["d00003"]["acks"].append([0, "t-other", "accepted", ""])  # a second merge
    rec = {"round": 0, "accepted": ["d00000", "d00000", "d00002", "d00003", "d00009"],
           "time_to_close_s": 1.0, "ingest_span_s": 1.0, "merge_s": 0.1, "selected": 4,
           "stragglers": 0, "rejected": {}, "agg_cpu_s": 1.0, "agg_peak_rss_mb": 1.0,
           "broker_cpu_s": 0.1, "inbox_dropped": 0, "uploads_evicted": 0, "bytes_up": 1,
           "download_bytes": 1,
           "join_s": 0.1}
    res = bench.summarize(4, args, {"rounds": [rec]}, devices, tmp_path, 0.0, 0.0)
    row = res["rounds"][0]
    # d00001 sent and never merged; d00000 twice, d00009 never sent, d00003 acked twice
    assert (row["sent"], row["merged"], row["lost"], row["double"]) == (4, 4, 1, 3)
    assert "time_to_close_s" not in res["rounds"][1]  # round 1 never closed


@pytest.mark.mosquitto
@pytest.mark.timeout(120)
def test_load_bench_end_to_end_at_five_devices(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--devices", "5", "--rounds", "1",
                           "--depth", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())["results"][0]
    assert res["ok"] and res["finished"] and res["reported_devices"] == 5
    (row,) = res["rounds"]
    assert (row["sent"], row["merged"], row["acked"], row["lost"], row["double"]) == (5, 5, 5, 0, 0)
    assert row["merge_max_err"] < 1e-6 and row["rejected"] == {}
    assert "| 5 | 0 |" in proc.stdout  # the table
