import json
import math
from pathlib import Path

import pytest

from edge_runtime.checkpoints import load_model
from edge_runtime.cli import main
from edge_runtime.config import SimulateConfig
from edge_runtime.datasets.build import pull_dataset
from edge_runtime.fl.devices import load_device_classes
from edge_runtime.fl.registry import STRATEGIES
from edge_runtime.fl.simulator import run_simulation

FIX = Path(__file__).parents[1] / "datasets" / "fixtures" / "sentiment"
KEYS = {"round", "eval_loss", "bytes_up", "bytes_down", "sim_time_s", "participants"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sent")
    pull_dataset("sentiment", out, n_clients=3, raw=FIX)
    return out


def _small(strategy, **kw):
    base = dict(strategy=strategy, clients=3, rounds=2, local_steps=2, seq_len=48,
                batch_size=2, eval_max=6, r_min=2, r_max=8,
                device_classes=("rpi4-2gb", "rpi5-4gb", "android-flagship-12gb"))
    base.update(kw)
    return SimulateConfig(**base)


def _data(folder):
    from edge_runtime.cli.simulate import load_client_data

    return load_client_data(str(folder), 3, partition=None, alpha=0.5, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_on_tiny(strategy, data_dir):
    lm = load_model("tiny")
    train, test = _data(data_dir)
    cfg = _small(strategy)
    m = run_simulation(lm.model, lm.tokenizer, train, test, cfg,
                       load_device_classes(cfg.device_classes))
    assert m["strategy"] == strategy
    assert [r["round"] for r in m["rounds"]] == [0, 1, 2]
    for r in m["rounds"]:
        assert set(r) == KEYS and math.isfinite(r["eval_loss"])
    for r in m["rounds"][1:]:
        assert r["participants"] >= 1 and r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert r["sim_time_s"] > 0
    assert m["rounds"][2]["sim_time_s"] > m["rounds"][1]["sim_time_s"]
    assert m["rounds"][-1]["eval_loss"] != m["rounds"][0]["eval_loss"]  # it trained
    plans = m["config"]["plans"]
    if strategy in ("hetlora", "flexlora", "sa-fedlora"):  # ranks follow the device class
        assert len({p["rank_sum"] for p in plans.values()}) == 3
    if strategy == "fedavg":
        assert len({p["rank_sum"] for p in plans.values()}) == 1
    if strategy == "legend":  # the faster classes get deeper plans
        mods = [plans[f"sim-{i:03d}"]["modules"] for i in range(3)]
        assert mods[0] <= mods[1] <= mods[2] and mods[0] < mods[2]


def test_all_dropped_round_keeps_the_global(data_dir):
    lm = load_model("tiny")
    train, test = _data(data_dir)
    cfg = _small("hetlora", dropout=0.999, rounds=1)
    m = run_simulation(lm.model, lm.tokenizer, train, test, cfg,
                       load_device_classes(cfg.device_classes))
    assert m["rounds"][1]["participants"] == 0 and m["rounds"][1]["bytes_up"] == 0
    assert m["rounds"][1]["eval_loss"] == pytest.approx(m["rounds"][0]["eval_loss"], abs=1e-6)


def test_cli_writes_metrics_and_rejects_bad_input(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["simulate", "--strategy", "flexlora", "--model", "tiny", "--clients", "3",
                 "--rounds", "1", "--data", str(data_dir), "--local-steps", "1",
                 "--seq-len", "32", "--eval-max", "4", "--out", str(out)])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["strategy"] == "flexlora" and len(m["rounds"]) == 2
    code = main(["simulate", "--strategy", "hetlora", "--clients", "5", "--data",
                 str(data_dir), "--out", str(tmp_path / "x")])
    assert code == 2 and "fewer than --clients" in capsys.readouterr().err
    assert main(["data", "pull", "imagenet"]) == 2


def test_plot_is_written_when_matplotlib_is_there(tmp_path):
    import importlib.util

    from edge_runtime.cli.simulate import plot_metrics

    rows = [{"round": i, "eval_loss": 3.0 - 0.1 * i, "bytes_up": 10, "bytes_down": 20,
             "sim_time_s": 1.5 * i, "participants": 2} for i in range(3)]
    ok = plot_metrics({"strategy": "hetlora", "rounds": rows}, tmp_path / "m.png")
    assert ok == (importlib.util.find_spec("matplotlib") is not None)
    if ok:
        assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
