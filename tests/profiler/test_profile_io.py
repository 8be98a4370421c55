"""Profile JSON: round trip, and bad files rejected with the file and key named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime.config import LoRAPlan
from edge_runtime.errors import UserError
from edge_runtime.profiler.profile_io import (
    DeviceProfile,
    Figure,
    ProfileError,
    load_profile,
    save_profile,
)


def test_round_trip_keeps_plan_figures_and_extra(tmp_path: Path) -> None:
    plan = LoRAPlan(rank=16, depth=3, layer_ranks={5: 4, 6: 8, 7: 16})
    prof = DeviceProfile(name="x", figures={"fp32_gflops": Figure(12.5, "GFLOP/s", "measured")},
                         plan=plan, legend_cost={"fwd_s": 1.0}, extra={"created": "now"})
    path = tmp_path / "p.json"
    save_profile(prof, path)
    again = load_profile(path)
    assert again.plan is not None and again.plan.to_json() == plan.to_json()
    assert again.fp32_gflops == 12.5
    assert again.extra["created"] == "now"
    # What `edge-rt train --profile` and the aggregator read: the plain plan dict.
    raw = json.loads(path.read_text())
    assert LoRAPlan.from_json(raw["plan"]).layer_ranks == {5: 4, 6: 8, 7: 16}


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(schema="other"), ["schema"]),
    (lambda d: d.update(version=99), ["version 99"]),
    (lambda d: d.update(kind="guessed"), ["kind"]),
    (lambda d: d["plan"].update(rank=0), ["plan", "rank"]),
    (lambda d: d["plan"].update(colour="red"), ["plan", "colour"]),
    (lambda d: d.update(figures={"ram_budget_mb": 5}), ["figures.ram_budget_mb"]),
])
def test_bad_profiles_name_the_file_and_key(tmp_path: Path, mutate, words) -> None:
    d = DeviceProfile(name="x", plan=LoRAPlan()).to_json()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)
    assert isinstance(e.value, UserError)


def test_declared_profile_needs_every_figure_with_a_source(tmp_path: Path) -> None:
    figs = {k: Figure(1.0, "", "a source") for k in
            ("ram_budget_mb", "memory_bandwidth_gbs", "fp32_gflops", "relative_compute")}
    d = DeviceProfile(name="dev", kind="declared", figures=figs).to_json()
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(d))
    assert load_profile(path).ram_budget_mb == 1.0
    d["figures"]["fp32_gflops"]["source"] = ""
    path.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="fp32_gflops.*source"):
        load_profile(path)
    del d["figures"]["fp32_gflops"]
    path.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="lacks figures.fp32_gflops"):
        load_profile(path)


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "nope.json")
    (tmp_path / "g.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(tmp_path / "g.json")
