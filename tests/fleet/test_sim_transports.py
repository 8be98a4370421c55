"""One round engine, two transports: the simulated fleet in-process and through a real
Mosquitto gives the same rounds; the strategy's settings reach the devices."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.config import MqttConfig, RunConfig
from edge_runtime.fl.registry import STRATEGIES
from edge_runtime.simulation import run_simulation

from .helpers import Runner, make_agent, make_run, make_service, start_aggregator, write_demo_data


def _run(strategy: str, data: Path, transport: str, broker: str | None = None,
         **settings: object) -> dict:
    return run_simulation(RunConfig.from_dict({
        "seed": 3, "strategy": {"name": strategy, **settings}, "model": {"name": "tiny"},
        "adapter": {"r_min": 2, "r_max": 8, "depth": 0},
        "train": {"steps": 2, "seq_len": 48, "batch_size": 2, "lr": 1e-3},
        "fleet": {"rounds": 3}, "data": {"path": str(data), "eval_max": 6},
        "sim": {"clients": 3, "device_classes": "rpi4-2gb,rpi5-4gb,android-flagship-12gb",
                "transport": transport, "broker": broker}}))


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inproc_and_mqtt_give_the_same_rounds(strategy: str, data_dir: Path, mosquitto) -> None:
    a = _run(strategy, data_dir, "inproc")
    b = _run(strategy, data_dir, "mqtt", mosquitto.url)
    assert len(a["rounds"]) == len(b["rounds"]) == 4
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert ra["eval_loss"] == pytest.approx(rb["eval_loss"], abs=1e-4)
        assert (ra["bytes_up"], ra["bytes_down"]) == (rb["bytes_up"], rb["bytes_down"])
        assert ra["participants"] == rb["participants"]
    assert a["rounds"][-1]["eval_loss"] != a["rounds"][0]["eval_loss"]
    if strategy == "sa-fedlora":
        # the schedule is the run's 3 rounds: the last round trains the final budget, so its
        # uploads are final_fraction of the first round's, within one module's share
        frac = a["config"]["strategy"]["final_fraction"]
        n_modules = a["fleet"]["plans"]["sim-000"]["modules"]
        for m in (a, b):
            ratio = m["rounds"][3]["bytes_up"] / m["rounds"][1]["bytes_up"]
            assert abs(ratio - frac) <= 1.0 / n_modules, ratio


@pytest.mark.timeout(120)
def test_strategy_settings_reach_the_device(tmp_path: Path, mosquitto) -> None:
    """A non-default setting given once on the server side is what the device trains with."""
    files, _ = write_demo_data(tmp_path / "data", 1)
    mq = MqttConfig(url=mosquitto.url)
    run = make_run(strategy="hetlora", rounds=1, gamma=0.75, lam=0.02)
    assert run.strategy.settings.gamma == 0.75  # type: ignore[union-attr]
    svc = make_service(tmp_path / "state", strategy="hetlora", rounds=1, gamma=0.75, lam=0.02)
    agent = make_agent(mq, "d0", files[0], tmp_path / "d0")
    dev = Runner(lambda: agent.run(timeout_s=100), "d0")
    _, agg = start_aggregator(svc, mq, start_clients=1)
    assert agg.join(100) == 1
    dev.join(30)
    task = agent.last_task
    assert task is not None
    assert task.strategy.to_json() == svc.strategy_cfg.to_json()
    assert (task.strategy.settings.gamma, task.strategy.settings.lam) == (0.75, 0.02)  # type: ignore[union-attr]
    assert task.recipe.steps == run.train.steps and task.recipe.lr == run.train.lr


@pytest.mark.timeout(180)
@pytest.mark.parametrize("broker", ["own-mosquitto", "embedded"])
def test_mqtt_without_a_broker_url_starts_its_own(broker: str, data_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No --broker: a Mosquitto of our own (passwords, per-device ACL) when installed, the
    embedded broker when not; the rounds are the in-process ones either way."""
    if broker == "embedded":
        monkeypatch.setenv("EDGE_RT_MOSQUITTO", "none")
    else:
        monkeypatch.delenv("EDGE_RT_MOSQUITTO", raising=False)
    a = _run("flora", data_dir, "inproc")
    b = _run("flora", data_dir, "mqtt")
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert ra["eval_loss"] == pytest.approx(rb["eval_loss"], abs=1e-4)
        assert (ra["bytes_up"], ra["bytes_down"]) == (rb["bytes_up"], rb["bytes_down"])
