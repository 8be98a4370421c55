"""`edge-rt compare`: validation-picked learning rates, cached runs, report, refusals."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from edge_runtime.cli import main
from edge_runtime.compare import load_compare, run_compare
from edge_runtime.errors import ConfigError
from edge_runtime.simulation import run_simulation

SPEC = """
[base]
model = {{name = "tiny"}}
adapter = {{r_min = 2, r_max = 8, depth = 0}}
train = {{steps = 2, seq_len = 48, batch_size = 2}}
fleet = {{rounds = 2}}
data = {{path = "{data}", eval_max = 6}}
sim = {{clients = 3, device_classes = ["rpi4-2gb", "rpi5-4gb", "android-flagship-12gb"]}}

[compare]
seeds = [0, 1]
lrs = [1e-3, 1e-2]
validation_fraction = 0.25

[methods.hetlora]
strategy = {{name = "hetlora"}}

[methods.homogeneous-rmin]
strategy = {{name = "fedavg"}}
adapter = {{r_max = 2}}
"""


@pytest.mark.slow
def test_compare_picks_lr_on_validation_caches_and_reports(data_dir: Path,
                                                           tmp_path: Path) -> None:
    cfg = tmp_path / "cmp.toml"
    cfg.write_text(SPEC.format(data=data_dir))
    calls: list[dict] = []

    def counting(run):  # type: ignore[no-untyped-def]
        calls.append(run.to_json())
        return run_simulation(run)

    spec = load_compare(cfg)
    report = run_compare(spec, tmp_path / "out", counting)
    assert len(calls) == 2 * (2 + 2)  # per method: 2 learning rates + 2 seeds
    for run in calls:  # picking happened on validation rows, final runs on test rows
        assert run["data"]["validation_fraction"] == 0.25
    picks = [r for r in calls if r["data"]["eval_split"] == "validation"]
    assert {r["seed"] for r in picks} == {0} and len(picks) == 4
    for name, m in report["methods"].items():
        by_lr = {float(k): v for k, v in m["validation_loss_by_lr"].items()}
        assert m["lr"] == min(by_lr, key=lambda x: by_lr[x]), name
        vals = m["eval_loss"]["values"]
        assert len(vals) == 2 and m["eval_loss"]["mean"] == pytest.approx(statistics.fmean(vals))
        assert m["eval_loss"]["std"] == pytest.approx(statistics.stdev(vals))
        assert m["final_round"] == 2  # the final round, not the best
    md = (tmp_path / "out" / "report.md").read_text()
    assert "hetlora" in md and "±" in md and "To target" in md
    best = max(m["eval_accuracy"]["mean"] for m in report["methods"].values())
    assert report["target"]["value"] == pytest.approx(0.95 * best)
    winner = max(report["methods"].values(), key=lambda m: m["eval_accuracy"]["mean"])
    assert winner["reached_target"] >= 1
    # a second run re-renders from the cache without training
    calls.clear()
    again = run_compare(load_compare(cfg), tmp_path / "out", counting)
    assert calls == [] and again["methods"] == report["methods"]
    # a cached run of other code is recomputed
    one = next((tmp_path / "out" / "runs").glob("*.json"))
    doc = json.loads(one.read_text())
    one.write_text(json.dumps({**doc, "code": "older"}))
    run_compare(load_compare(cfg), tmp_path / "out", counting)
    assert len(calls) == 1


def test_bad_comparisons_are_refused_before_training(data_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    good = SPEC.format(data=data_dir)
    cases = {
        "methods.hetlora": good.replace('strategy = {name = "hetlora"}',
                                        'strategy = {name = "hetlora", mu = 0.1}'),
        "methods.homogeneous-rmin": good.replace("adapter = {r_max = 2}",
                                                 "adapter = {r_maks = 2}"),
        "unknown dataset": good.replace(str(data_dir), "imagenet"),
        "compare.seeds": good.replace("seeds = [0, 1]", "seeds = []"),
        "compare.epochs": good.replace("seeds = [0, 1]", "seeds = [0]\nepochs = 3"),
    }
    for key, text in cases.items():
        f = tmp_path / "bad.toml"
        f.write_text(text)
        with pytest.raises(ConfigError, match=key):
            load_compare(f)
        assert main(["compare", str(f), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0]
    assert not (tmp_path / "o" / "runs").exists()


def test_one_learning_rate_is_fixed_without_validation_runs(data_dir: Path,
                                                            tmp_path: Path) -> None:
    cfg = tmp_path / "cmp.toml"
    cfg.write_text(SPEC.format(data=data_dir).replace("lrs = [1e-3, 1e-2]", "lrs = [2e-3]"))
    calls: list[dict] = []

    def counting(run):  # type: ignore[no-untyped-def]
        calls.append(run.to_json())
        return run_simulation(run)

    report = run_compare(load_compare(cfg), tmp_path / "out", counting)
    assert len(calls) == 2 * 2  # per method: the 2 seeds only
    assert all(r["data"]["eval_split"] == "test" and r["train"]["lr"] == 2e-3 for r in calls)
    assert all(m["lr"] == 2e-3 and m["validation_loss_by_lr"] == {}
               for m in report["methods"].values())


def test_methods_flag_runs_a_subset_and_refuses_unknown_ones(data_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    cfg = tmp_path / "cmp.toml"
    cfg.write_text(SPEC.format(data=data_dir).replace("lrs = [1e-3, 1e-2]", "lrs = [1e-3]")
                   .replace("seeds = [0, 1]", "seeds = [0]"))
    assert main(["compare", str(cfg), "--out", str(tmp_path / "o"), "--methods",
                 "homogeneous-rmin"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert list(report["methods"]) == ["homogeneous-rmin"]
    assert len(list((tmp_path / "o" / "runs").glob("*.json"))) == 1
    capsys.readouterr()
    assert main(["compare", str(cfg), "--out", str(tmp_path / "o"), "--methods", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
