"""The simulated fleet on the in-process transport: plans per class, failures, the CLI."""

import json
import math
from pathlib import Path

import pytest

from edge_runtime.cli import main
from edge_runtime.config import RunConfig
from edge_runtime.fl.registry import STRATEGIES
from edge_runtime.rounds.server import ROUND_KEYS
from edge_runtime.simulation import run_simulation

CLASSES = "rpi4-2gb,rpi5-4gb,android-flagship-12gb"


def small(method: str, folder: Path, **sections) -> RunConfig:
    d = {"strategy": {"name": method}, "model": {"name": "tiny"},
         "adapter": {"r_min": 2, "r_max": 8, "depth": 0},
         "train": {"steps": 2, "seq_len": 48, "batch_size": 2, "lr": 1e-3},
         "fleet": {"rounds": 2}, "data": {"path": str(folder), "eval_max": 6},
         "sim": {"clients": 3, "device_classes": CLASSES}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return RunConfig.from_dict(d)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_on_tiny(strategy, data_dir):
    m = run_simulation(small(strategy, data_dir))
    assert m["strategy"] == strategy and m["clock"] == "simulated"
    assert [r["round"] for r in m["rounds"]] == [0, 1, 2]
    for r in m["rounds"]:
        assert set(r) == set(ROUND_KEYS) and math.isfinite(r["eval_loss"])
    for r in m["rounds"][1:]:
        assert r["participants"] == 3 and r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert r["time_s"] > 0
    assert m["rounds"][2]["time_s"] > m["rounds"][1]["time_s"]
    assert m["rounds"][-1]["eval_loss"] != m["rounds"][0]["eval_loss"]  # it trained
    plans = m["fleet"]["plans"]
    if strategy in ("hetlora", "flexlora", "flora"):  # ranks follow the device class
        assert len({p["rank_sum"] for p in plans.values()}) == 3
    if strategy in ("fedavg", "sa-fedlora"):  # homogeneous
        assert len({p["rank_sum"] for p in plans.values()}) == 1
    if strategy == "legend":  # the faster classes get deeper or wider plans
        sums = [plans[f"sim-{i:03d}"]["rank_sum"] for i in range(3)]
        assert sums[0] <= sums[1] <= sums[2] and sums[0] < sums[2]
    assert m["config"]["strategy"]["name"] == strategy
    again = RunConfig.from_dict(m["config"])  # the resolved config reads back as a run file
    assert again.to_json() == m["config"]


def test_all_dropped_round_keeps_the_global(data_dir):
    m = run_simulation(small("hetlora", data_dir, sim={"dropout": 0.999},
                             fleet={"rounds": 1}))
    r1 = m["rounds"][1]
    assert r1["participants"] == 0 and r1["bytes_up"] == 0 and r1["stragglers"] == 3
    assert r1["eval_loss"] == pytest.approx(m["rounds"][0]["eval_loss"], abs=1e-6)


def test_deadline_drops_the_slow_class(data_dir):
    """With a deadline between the classes' predicted times, only the fast devices report."""
    base = run_simulation(small("flexlora", data_dir, fleet={"rounds": 1}))
    t = base["rounds"][1]["time_s"]
    m = run_simulation(small("flexlora", data_dir, fleet={"rounds": 1},
                             sim={"deadline_s": t * 0.9}))
    r1 = m["rounds"][1]
    assert 0 < r1["participants"] < 3 and r1["time_s"] == pytest.approx(t * 0.9, abs=1e-6)


def test_cli_writes_metrics_and_rejects_bad_input(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["simulate", "--strategy", "flexlora", "--model", "tiny", "--clients", "3",
                 "--rounds", "1", "--data", str(data_dir), "--local-steps", "1",
                 "--seq-len", "32", "--eval-max", "4", "--classes", CLASSES, "--out", str(out)])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["strategy"] == "flexlora" and len(m["rounds"]) == 2
    assert m["config"]["train"]["steps"] == 1 and m["config"]["sim"]["clients"] == 3
    code = main(["simulate", "--strategy", "hetlora", "--clients", "5", "--data",
                 str(data_dir), "--out", str(tmp_path / "x")])
    assert code == 2 and "fewer than sim.clients" in capsys.readouterr().err
    assert main(["data", "pull", "imagenet"]) == 2


def test_plot_is_written_when_matplotlib_is_there(tmp_path):
    import importlib.util

    from edge_runtime.cli.simulate import plot_metrics

    rows = [{"round": i, "eval_loss": 3.0 - 0.1 * i, "bytes_up": 10, "bytes_down": 20,
             "time_s": 1.5 * i, "participants": 2} for i in range(3)]
    ok = plot_metrics({"strategy": "hetlora", "clock": "simulated", "rounds": rows},
                      tmp_path / "m.png")
    assert ok == (importlib.util.find_spec("matplotlib") is not None)
    if ok:
        assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fedavg_drop_weak_trains_only_the_devices_that_afford_r_max(data_dir):
    m = run_simulation(small("fedavg", data_dir, strategy={"drop_weak": True},
                             fleet={"rounds": 1}))
    r1 = m["rounds"][1]
    assert r1["participants"] == 1 and r1["selected"] == ["sim-002"]  # the fastest class
    assert m["fleet"]["plans"]["sim-000"]["modules"] == 0


def test_diagnostics_are_logged_each_round(data_dir):
    m = run_simulation(small("flexlora", data_dir, fleet={"diagnostics_rank": 2}))
    assert m["rounds"][0]["diagnostics"] is None
    for r in m["rounds"][1:]:
        d = r["diagnostics"]
        assert 0.0 <= d["agg_error"] and 0.0 < d["top_rmin_energy"] <= 1.0


def test_client_rows_caps_each_devices_training_rows(data_dir):
    full = run_simulation(small("fedavg", data_dir, fleet={"rounds": 1}))
    capped = run_simulation(small("fedavg", data_dir, fleet={"rounds": 1},
                                  data={"client_rows": 3}))
    assert all(p["n_samples"] > 3 for p in full["fleet"]["plans"].values())
    assert all(p["n_samples"] == 3 for p in capped["fleet"]["plans"].values())


def test_flora_stack_is_exact_and_grows(data_dir):
    m = run_simulation(small("flora", data_dir, fleet={"diagnostics_rank": 2, "rounds": 3}))
    for r in m["rounds"][1:]:
        assert r["diagnostics"]["agg_error"] < 1e-5  # stacking is exact (float32 factors)
    downs = [r["bytes_down"] for r in m["rounds"][1:]]
    assert downs[0] < downs[1] < downs[2]  # each round's stack is larger: FLoRA's cost


def test_per_client_metrics_score_the_final_global_on_each_devices_rows(data_dir):
    from edge_runtime.checkpoints import load_model
    from edge_runtime.data import load_jsonl
    from edge_runtime.evaluate import evaluate

    m = run_simulation(small("hetlora", data_dir, fleet={"rounds": 1},
                             data={"per_client": True}))
    pc = m["per_client"]
    assert sorted(pc) == ["sim-000", "sim-001", "sim-002"]
    # with no training the per-client numbers are the base model's on each client's rows
    base = run_simulation(small("hetlora", data_dir, fleet={"rounds": 1},
                                data={"per_client": True}, sim={"dropout": 0.999}))
    lm = load_model("tiny")
    for i, dev in enumerate(sorted(base["per_client"])):
        rows = load_jsonl(data_dir / f"client_{i:03d}" / "test.jsonl")[:6]
        assert base["per_client"][dev]["rows"] == len(rows)
        if len(load_jsonl(data_dir / f"client_{i:03d}" / "test.jsonl")) <= 6:
            want = evaluate(lm.model, lm.tokenizer, rows, seq_len=48)
            assert base["per_client"][dev]["eval_loss"] == pytest.approx(want.loss, abs=1e-5)
    assert any(pc[d]["eval_loss"] != base["per_client"][d]["eval_loss"] for d in pc)
