"""`edge-rt profile tiny --quick` end to end, and `edge-rt train --profile` using its plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime.cli import main
from edge_runtime.config import LoRAPlan
from edge_runtime.fl.legend import DeviceCost
from edge_runtime.profiler import load_profile

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.slow
def test_profile_then_train_with_its_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    out = tmp_path / "profile.json"
    rc = main(["profile", "tiny", "--quick", "--seq-len", "32", "--batch-size", "2",
               "--memory-budget-mb", "4000", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "plan       depth" in printed and "block_train_s" in printed
    raw = json.loads(out.read_text())
    plan = LoRAPlan.from_json(raw["plan"])
    assert 1 <= plan.depth <= 2
    prof = load_profile(out)
    assert prof.cost_model is not None and prof.workload is not None
    assert prof.cost_model.fits["block_act_mb"].n_points == 6
    assert "growth" in prof.cost_model.fits["block_act_mb"].notes[0]
    pred = prof.cost_model.predict(plan, prof.workload)
    assert pred.step_time_s == pytest.approx(raw["prediction"]["step_time_s"], rel=1e-3)
    assert pred.peak_rss_mb <= 4000
    assert raw["measurements"]["rss_method"] in ("vmhwm", "psutil-sampler")
    assert len(raw["measurements"]["end_to_end"]) == 1
    DeviceCost(**raw["legend_cost"])  # what the fleet's LEGEND planning reads
    rc = main(["train", "tiny", "--profile", str(out), "--data", str(FIXTURES / "qa.jsonl"),
               "--steps", "2", "--batch-size", "2", "--seq-len", "32",
               "--out", str(tmp_path / "adapter")])
    assert rc == 0
    log = json.loads((tmp_path / "adapter" / "train_log.json").read_text())
    assert log["plan"]["depth"] == plan.depth and log["plan"]["rank"] == plan.rank


@pytest.mark.slow
def test_nothing_fits_is_a_one_line_error_and_keeps_the_measurements(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.json"
    rc = main(["profile", "tiny", "--quick", "--seq-len", "16", "--batch-size", "1",
               "--memory-budget-mb", "10", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no LoRA plan fits" in err and "--memory-budget-mb" in err
    raw = json.loads(out.read_text())
    assert raw["plan"] is None and raw["measurements"]["block_forward"]
