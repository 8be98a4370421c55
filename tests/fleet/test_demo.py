"""`edge-rt demo` end to end (embedded broker, agent processes) and fleet CLI bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.rounds.server import ROUND_KEYS

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV, cwd=REPO)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_runs_and_writes_metrics_and_adapter(tmp_path: Path) -> None:
    from edge_runtime.datasets.build import pull_dataset

    data = tmp_path / "sent"  # the vendored raw sentiment slices: no download in tests
    pull_dataset("sentiment", data, n_clients=2, partition="domain",
                 raw=REPO / "tests" / "datasets" / "fixtures" / "sentiment")
    out = tmp_path / "demo"
    r = _cli("demo", "--out", str(out), "--clients", "2", "--rounds", "2", "--data",
             str(data), timeout=280)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[demo] round 2/2" in r.stderr
    from edge_runtime.fleet.mosquitto import find_mosquitto

    if find_mosquitto() is not None:  # the broker a real fleet runs, under its ACL
        assert "mosquitto version" in r.stderr and "embedded" not in r.stderr
    assert "base model -> final global model" in r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["strategy"] == "hetlora" and isinstance(m["config"], dict)
    assert [x["round"] for x in m["rounds"]] == [0, 1, 2]
    assert m["clock"] == "wall" and m["config"]["sim"]["clients"] == 2
    for x, wire in zip(m["rounds"][1:], m["fleet"]["wire"], strict=True):
        assert set(x) == set(ROUND_KEYS)
        assert x["participants"] == 2
        # two updates of a few kB each went up, two downloads came down; what the
        # aggregator's client received carries those payloads plus manifests and topics
        assert x["bytes_up"] > 2 * 4000 and x["bytes_down"] > 2 * 4000
        assert wire["up"] > x["bytes_up"] and wire["down"] > 4000
    assert m["rounds"][-1]["eval_loss"] < m["rounds"][0]["eval_loss"]
    # real two-choice rows: accuracy is measured on the held-out rows every round
    assert all(0.0 <= x["eval_accuracy"] <= 1.0 for x in m["rounds"])
    assert m["config"]["data"]["path"] == str(data)
    from edge_runtime.adapter_io import load_adapter
    from edge_runtime.checkpoints import load_model

    adapter, _ = load_adapter(out / "adapter", expect_fingerprint=load_model("tiny").fingerprint)
    assert adapter and all(w.lora_b.abs().sum() > 0 for w in adapter.values())


def test_fleet_cli_bad_input_is_one_line_exit_2(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from edge_runtime.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    cases = [
        ["agent", "--broker", "http://x:1", "--device-id", "a", "--data", str(data)],
        ["agent", "--broker", "mqtt://127.0.0.1:1", "--device-id", "a b", "--data", str(data)],
        ["agent", "--broker", "mqtt://127.0.0.1:1", "--device-id", "a", "--data",
         str(tmp_path / "missing.jsonl")],
        ["aggregator", "--broker", "mqtt://127.0.0.1:1", "--state", str(tmp_path / "s"),
         "--depth", "9"],
        ["demo", "--clients", "0"],
    ]
    for args in cases:
        try:
            code = main(args)
        except SystemExit as e:  # argparse rejects a bad flag value itself
            code = int(e.code or 0)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert len([ln for ln in err.splitlines() if "error" in ln]) == 1, err


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_site_demo_gives_the_flat_demo_global(tmp_path: Path) -> None:
    """`edge-rt demo --sites 2`: two site Mosquittos bridged over TLS to a root Mosquitto,
    two site aggregators, the root, agent processes: the global adapter and the held-out
    loss of every round are the flat demo's (the same seed, so the same updates)."""
    from edge_runtime.adapter_io import load_adapter
    from edge_runtime.datasets.build import pull_dataset
    from edge_runtime.fleet.mosquitto import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("needs mosquitto")
    data = tmp_path / "sent"
    pull_dataset("sentiment", data, n_clients=3, partition="domain",
                 raw=REPO / "tests" / "datasets" / "fixtures" / "sentiment")
    runs = {}
    for name, extra in (("flat", []), ("tree", ["--sites", "2"])):
        out = tmp_path / name
        r = _cli("demo", "--out", str(out), "--clients", "3", "--rounds", "2", "--data",
                 str(data), "--http-port", "-1", *extra, timeout=190)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = (json.loads((out / "metrics.json").read_text()),
                      load_adapter(out / "adapter")[0])
    (mf, af), (mt, at) = runs["flat"], runs["tree"]
    for rf, rt in zip(mf["rounds"], mt["rounds"], strict=True):
        assert rt["participants"] == rf["participants"] and rt["stragglers"] == 0
        assert rt["eval_loss"] == pytest.approx(rf["eval_loss"], abs=1e-4)
    assert set(af) == set(at)
    for name, w in af.items():
        d = w.delta().double()
        assert (at[name].delta().double() - d).norm() <= 1e-5 * max(1.0, float(d.norm()))
    assert any(w.lora_b.abs().sum() > 0 for w in at.values())
