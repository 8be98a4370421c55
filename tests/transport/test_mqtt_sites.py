"""Hierarchical aggregation through real Mosquitto processes: two site brokers bridged over
TLS to a root broker, a site aggregator per site and the root give the global adapter of
the flat, in-process run of the same fleet (same seed, so the same updates)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.config import RunConfig
from edge_runtime.fl.registry import STRATEGIES
from edge_runtime.fleet.codec import decode_adapter
from edge_runtime.fleet.mosquitto import find_mosquitto
from edge_runtime.simulation import run_simulation

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto")

ROUNDS = 2


def _run(strategy: str, data: Path, state: Path, sites: int) -> dict:
    return run_simulation(RunConfig.from_dict({
        "seed": 5, "strategy": {"name": strategy}, "model": {"name": "tiny"},
        "adapter": {"r_min": 2, "r_max": 8, "depth": 0},
        "train": {"steps": 2, "seq_len": 48, "batch_size": 2, "lr": 1e-3},
        "fleet": {"rounds": ROUNDS, "round_timeout_s": 60}, "data": {"path": str(data),
                                                                    "eval_max": 6},
        "sim": {"clients": 3, "device_classes": "rpi4-2gb,rpi5-4gb,android-flagship-12gb",
                "transport": "mqtt" if sites else "inproc", "sites": sites}}), state_dir=state)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_sites_give_the_flat_global(strategy: str, data_dir: Path, tmp_path: Path) -> None:
    flat = _run(strategy, data_dir, tmp_path / "flat", 0)
    tree = _run(strategy, data_dir, tmp_path / "tree", 2)
    assert len(flat["rounds"]) == len(tree["rounds"]) == ROUNDS + 1
    for rf, rt in zip(flat["rounds"], tree["rounds"], strict=True):
        assert rt["participants"] == rf["participants"]
        assert rt["stragglers"] == 0 and rt["rejected"] == {}
        assert rt["eval_loss"] == pytest.approx(rf["eval_loss"], abs=1e-4)
    a, _ = decode_adapter((tmp_path / "flat" / f"global_r{ROUNDS}.safetensors").read_bytes())
    b, _ = decode_adapter((tmp_path / "tree" / f"global_r{ROUNDS}.safetensors").read_bytes())
    assert set(a) == set(b)
    moved = 0.0
    for name in a:
        da, db = a[name].delta().double(), b[name].delta().double()
        assert (da - db).norm() <= 1e-5 * max(1.0, float(da.norm())), name
        moved += float(da.norm())
    assert moved > 0  # the runs trained something


def test_sites_need_the_mqtt_transport() -> None:
    from edge_runtime.errors import ConfigError

    with pytest.raises(ConfigError):
        RunConfig.from_dict({"sim": {"transport": "inproc", "sites": 2}})
    with pytest.raises(ConfigError):
        RunConfig.from_dict({"sim": {"transport": "mqtt", "sites": 2,
                                     "broker": "mqtt://127.0.0.1:1883"}})
