"""The declared device classes in profiles/ and predictions scaled to them."""

from __future__ import annotations

import pytest

from edge_runtime.config import LoRAPlan
from edge_runtime.profiler.declared import (
    declared_profiles,
    legend_cost_for_device,
    plan_for_device,
    predict_on_device,
    speed_factor,
)
from edge_runtime.profiler.profile_io import DeviceProfile, Figure, ProfileError
from tests.profiler.helpers import model

EXPECTED = {"rpi4-2gb": 2, "rpi4-4gb": 4, "rpi4-8gb": 8, "rpi5-4gb": 4, "rpi5-8gb": 8,
            "android-mid-6gb": 6, "android-flagship-12gb": 12}


def test_every_required_class_is_declared_with_sourced_figures() -> None:
    profs = declared_profiles()
    assert set(EXPECTED) <= set(profs)
    for name, gb in EXPECTED.items():
        p = profs[name]
        assert p.kind == "declared"
        assert p.device["total_ram_mb"] == gb * 1024
        assert 0 < p.ram_budget_mb < gb * 1024
        for key in ("ram_budget_mb", "memory_bandwidth_gbs", "fp32_gflops", "relative_compute"):
            assert len(p.figures[key].source) > 20, f"{name}: {key} needs a real source"
        assert p.fp32_gflops == pytest.approx(16.0 * p.relative_compute, rel=0.01)
    assert profs["rpi4-4gb"].relative_compute == 1.0
    assert profs["rpi5-4gb"].relative_compute > 1.0
    # More RAM, more budget, within one board family.
    assert profs["rpi4-2gb"].ram_budget_mb < profs["rpi4-4gb"].ram_budget_mb \
        < profs["rpi4-8gb"].ram_budget_mb


def reference() -> DeviceProfile:
    from edge_runtime.profiler.cost_model import Workload

    return DeviceProfile(name="ref", cost_model=model(), workload=Workload(4, 32),
                         figures={"fp32_gflops": Figure(20.0, "GFLOP/s", "measured")})


def test_prediction_scales_time_by_compute_and_keeps_memory() -> None:
    profs = declared_profiles()
    ref = reference()
    plan = LoRAPlan(rank=8, depth=4)
    pi4 = predict_on_device(ref, profs["rpi4-4gb"], plan)
    pi5 = predict_on_device(ref, profs["rpi5-4gb"], plan)
    assert ref.cost_model is not None and ref.workload is not None
    here = ref.cost_model.predict(plan, ref.workload)
    assert speed_factor(ref, profs["rpi4-4gb"]) == pytest.approx(16.0 / 20.0)
    assert pi4.step_time_s == pytest.approx(here.step_time_s * 20.0 / 16.0)
    assert pi5.step_time_s == pytest.approx(pi4.step_time_s / 2.3)
    assert pi4.peak_rss_mb == pytest.approx(here.peak_rss_mb)


def test_plan_for_device_uses_its_budget_and_speed() -> None:
    profs = declared_profiles()
    ref = reference()
    slow = plan_for_device(ref, profs["rpi4-2gb"], deadline_s=1.5, steps_per_round=20)
    fast = plan_for_device(ref, profs["android-flagship-12gb"], deadline_s=1.5,
                           steps_per_round=20)
    assert slow.step_time_s * 20 <= 1.5 and fast.step_time_s * 20 <= 1.5
    assert fast.trainable_params >= slow.trainable_params
    assert slow.peak_rss_mb <= profs["rpi4-2gb"].ram_budget_mb
    lc = legend_cost_for_device(ref, profs["rpi4-2gb"])
    assert lc["mem_budget_mb"] == profs["rpi4-2gb"].ram_budget_mb


def test_reference_without_cost_model_is_refused() -> None:
    with pytest.raises(ProfileError, match="no measured cost model"):
        speed_factor(DeviceProfile(name="empty"), declared_profiles()["rpi4-4gb"])


def test_other_json_in_the_folder_is_skipped_but_a_broken_profile_is_not(tmp_path) -> None:
    import json
    import shutil

    from edge_runtime.profiler.declared import profiles_dir

    shutil.copy(profiles_dir() / "rpi4-4gb.json", tmp_path / "rpi4-4gb.json")
    (tmp_path / "pi4.json").write_text(json.dumps({"rank": 4, "depth": 2}))
    assert set(declared_profiles(tmp_path)) == {"rpi4-4gb"}
    bad = json.loads((tmp_path / "rpi4-4gb.json").read_text())
    bad["name"] = "broken"
    del bad["figures"]["fp32_gflops"]
    (tmp_path / "broken.json").write_text(json.dumps(bad))
    with pytest.raises(ProfileError, match="broken.json"):
        declared_profiles(tmp_path)
