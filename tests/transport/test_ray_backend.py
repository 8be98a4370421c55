"""Devices trained on Ray actors: the same rounds as the local backend for the same seed."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra: pip install 'edge-runtime[ray]'")

from edge_runtime.config import ConfigError, RunConfig  # noqa: E402
from edge_runtime.datasets.build import pull_dataset  # noqa: E402
from edge_runtime.simulation import run_simulation  # noqa: E402

FIX = Path(__file__).parents[1] / "datasets" / "fixtures" / "sentiment"


def _cfg(data: Path, **sim: object) -> RunConfig:
    return RunConfig.from_dict({
        "seed": 2, "strategy": {"name": "hetlora"}, "model": {"name": "tiny"},
        "adapter": {"r_min": 2, "r_max": 8, "depth": 0},
        "train": {"steps": 2, "seq_len": 48, "batch_size": 2, "lr": 1e-3},
        "fleet": {"rounds": 2, "fraction": 0.75}, "data": {"path": str(data), "eval_max": 6},
        "sim": {"clients": 4, "dropout": 0.2,
                "device_classes": "rpi4-2gb,rpi5-4gb,android-flagship-12gb", **sim}})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_backend_gives_the_local_rounds(tmp_path: Path) -> None:
    data = tmp_path / "sent"
    pull_dataset("sentiment", data, n_clients=4, raw=FIX)
    a = run_simulation(_cfg(data))
    b = run_simulation(_cfg(data, backend="ray", ray_workers=2))
    assert b["config"]["sim"]["backend"] == "ray"
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], abs=1e-6)
        for key in ("bytes_up", "bytes_down", "participants", "selected", "time_s"):
            assert ra[key] == rb[key], key
    assert a["rounds"][-1]["eval_loss"] != a["rounds"][0]["eval_loss"]


def test_ray_backend_is_for_the_inproc_transport() -> None:
    with pytest.raises(ConfigError, match="sim.backend"):
        RunConfig.from_dict({"sim": {"backend": "ray", "transport": "mqtt"}})
    with pytest.raises(ConfigError, match="ray_workers"):
        RunConfig.from_dict({"sim": {"backend": "ray", "ray_workers": 0}})
