"""Client-level DP through the round engine: a tiny simulated fleet with `fleet.dp` on
reports epsilon in every metrics record, equal to dp-accounting called directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from edge_runtime.cli import main
from edge_runtime.config import RunConfig
from edge_runtime.errors import ConfigError
from edge_runtime.simulation import run_simulation

dpa = pytest.importorskip("dp_accounting")
from dp_accounting.rdp import RdpAccountant  # noqa: E402

CLASSES = "rpi4-2gb,rpi5-4gb,android-flagship-12gb"


def _reference_epsilon(n: int, k: int, z: float, rounds: int, delta: float) -> float:
    """dp-accounting, directly: k of n without replacement, Gaussian of multiplier z / 2
    (replace-one sensitivity 2C, docs/PRIVACY.md), `rounds` times."""
    gauss = dpa.GaussianDpEvent(z / 2)
    event = gauss if k == n else dpa.SampledWithoutReplacementDpEvent(n, k, gauss)
    acc = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SelfComposedDpEvent(event, rounds))
    return acc.get_epsilon(delta)


def _config(folder: Path, strategy: str, dp: dict[str, Any], **fleet: Any) -> RunConfig:
    return RunConfig.from_dict({
        "strategy": {"name": strategy}, "model": {"name": "tiny"},
        "adapter": {"r_min": 2, "r_max": 8, "depth": 0},
        "train": {"steps": 2, "seq_len": 48, "batch_size": 2, "lr": 1e-3},
        "fleet": {"rounds": 3, "dp": dp, **fleet}, "data": {"path": str(folder), "eval_max": 6},
        "sim": {"clients": 6, "device_classes": CLASSES}})


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_runtime.datasets.build import pull_dataset

    out = tmp_path_factory.mktemp("sent6")
    pull_dataset("sentiment", out, n_clients=6,
                 raw=Path(__file__).parents[1] / "datasets" / "fixtures" / "sentiment")
    return out


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_dp_run_reports_the_accountants_epsilon(six: Path, strategy: str) -> None:
    dp = {"clip": 0.05, "noise_multiplier": 1.5, "delta": 1e-4, "seed": 7}
    m = run_simulation(_config(six, strategy, dp, fraction=0.5))
    assert m["rounds"][0]["dp"] is None  # record 0 is the base model: nothing released
    for t, rec in enumerate(m["rounds"][1:], start=1):
        d = rec["dp"]
        assert (d["pool"], d["selected"]) == (6, 3) and len(rec["selected"]) == 3
        assert d["epsilon"] == pytest.approx(_reference_epsilon(6, 3, 1.5, t, 1e-4), rel=1e-9)
        assert d["epsilon_round"] == pytest.approx(_reference_epsilon(6, 3, 1.5, 1, 1e-4),
                                                   rel=1e-9)
        assert d["delta"] == 1e-4 and 0 <= d["clipped"] <= d["participants"] == 3
    eps = [r["dp"]["epsilon"] for r in m["rounds"][1:]]
    assert eps[0] < eps[1] < eps[2]  # it composes
    assert m["config"]["fleet"]["dp"]["clip"] == 0.05
    assert m["config"]["fleet"]["clip_multiple"] == 0.0  # derived: DP clips instead


def test_dp_noise_is_seeded_for_studies_and_changes_the_model(six: Path) -> None:
    dp = {"clip": 0.05, "noise_multiplier": 2.0, "seed": 1}
    a = run_simulation(_config(six, "fedavg", dp))
    b = run_simulation(_config(six, "fedavg", dp))
    c = run_simulation(_config(six, "fedavg", {**dp, "seed": 2}))
    off = run_simulation(_config(six, "fedavg", {"clip": 0.0}))
    last = [x["rounds"][-1]["eval_loss"] for x in (a, b, c, off)]
    assert last[0] == last[1] and last[0] != last[2] and last[0] != last[3]
    assert all(r["dp"] is None for r in off["rounds"])  # metrics stay readable when off


@pytest.mark.parametrize("strategy,fleet,needle", [
    ("flora", {}, "flora"),
    ("sa-fedlora", {}, "sa-fedlora"),
    ("fedavg", {"robust": "median"}, "fleet.robust"),
    ("fedavg", {"clip_multiple": 3.0}, "fleet.clip_multiple"),
])
def test_dp_refuses_what_would_void_the_guarantee(six: Path, strategy: str,
                                                  fleet: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        _config(six, strategy, {"clip": 0.1}, **fleet)


def test_hetlora_sparsity_weights_are_refused_under_dp(six: Path) -> None:
    with pytest.raises(ConfigError, match="weighting"):
        RunConfig.from_dict({"strategy": {"name": "hetlora", "weighting": "sparsity"},
                             "fleet": {"dp": {"clip": 0.1}}})
    with pytest.raises(ConfigError, match="prune"):
        RunConfig.from_dict({"strategy": {"name": "hetlora", "prune": True},
                             "fleet": {"dp": {"clip": 0.1}}})


def test_cli_flags_reach_the_run(six: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["simulate", "--strategy", "legend", "--model", "tiny", "--clients", "6",
                 "--rounds", "1", "--data", str(six), "--local-steps", "1", "--seq-len", "32",
                 "--batch-size", "2", "--dp-clip", "0.1", "--dp-noise-multiplier", "0.8",
                 "--dp-delta", "1e-3", "--set", "fleet.dp.seed=0", "--out", str(out)]) == 0
    d = json.loads((out / "metrics.json").read_text())["rounds"][1]["dp"]
    assert (d["clip"], d["noise_multiplier"], d["delta"]) == (0.1, 0.8, 1e-3)
    assert d["epsilon"] == pytest.approx(_reference_epsilon(6, 6, 0.8, 1, 1e-3), rel=1e-9)


def _dp_service(tmp: Path, name: str, dp: dict[str, Any]) -> Any:
    from edge_runtime.config import DPConfig, FleetConfig, StrategyConfig, StrategyName, TrainConfig
    from edge_runtime.planning import Planner
    from edge_runtime.rounds.server import AggregatorService
    from tests.fleet.test_aggregator import FP, SHAPE, SHAPES, Clock

    cfg = FleetConfig(rounds=2, min_clients=1, round_timeout_s=30, clip_multiple=0,
                      dp=DPConfig(**dp))
    st = StrategyConfig(StrategyName.FEDAVG)
    return AggregatorService(cfg, st, TrainConfig(steps=2),
                             Planner(SHAPE, st, steps=2, deadline_s=30.0), SHAPES, FP,
                             tmp / name, clock=Clock())


def _one_round(tmp: Path, name: str, dp: dict[str, Any], restart: bool = False) -> Any:
    from edge_runtime.fl.types import ClientPlan
    from tests.fleet.test_aggregator import register, send, trained

    svc = _dp_service(tmp, name, dp)
    register(svc, {"a": "pi4", "b": "phone", "c": "pi5"})
    opened = svc.plan_round()
    plans = {d: ClientPlan.from_json(p.plan) for d, p in opened.announcement.devices.items()}
    assert send(svc, "a", trained(plans["a"], 1)).accepted
    if restart:  # a kill between two updates: the journal is re-folded on start
        svc = _dp_service(tmp, name, dp)
        register(svc, {"a": "pi4", "b": "phone", "c": "pi5"})
    assert send(svc, "b", trained(plans["b"], 2)).accepted
    rec = svc.close_round(duration_s=1.0)
    return svc, rec


def test_aggregator_dp_status_prometheus_and_resume(tmp_path: Path) -> None:
    from edge_runtime.observe.status import status_document

    dp = {"clip": 0.01, "noise_multiplier": 1.0, "seed": 5}
    svc, rec = _one_round(tmp_path, "a", dp)
    assert rec.dp["clipped"] == 2 and rec.dp["participants"] == 2  # 0.01 clips both
    assert rec.dp["epsilon"] == pytest.approx(_reference_epsilon(3, 3, 1.0, 1, 1e-5), rel=1e-9)
    doc = status_document(svc)
    assert doc["privacy"]["epsilon"] == rec.dp["epsilon"] and doc["rounds"][1]["dp"] == rec.dp
    from edge_runtime.observe.prometheus import make_registry, metrics_text

    text = metrics_text(make_registry(svc)).decode()
    assert f"edge_rt_dp_epsilon {rec.dp['epsilon']!r}" in text
    resumed, rec2 = _one_round(tmp_path, "b", dp, restart=True)
    assert rec2.dp == rec.dp
    for n, w in svc.global_adapter.items():  # the same seeded noise on the same sums
        assert torch.equal(w.lora_b, resumed.global_adapter[n].lora_b)
    fresh, _ = _one_round(tmp_path, "c", {**dp, "seed": None})  # the OS CSPRNG
    assert any(not torch.equal(w.lora_b, fresh.global_adapter[n].lora_b)
               for n, w in svc.global_adapter.items())
    off, rec_off = _one_round(tmp_path, "d", {"clip": 0.0})
    assert rec_off.dp is None and status_document(off)["privacy"] is None
