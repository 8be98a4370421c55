"""The run config front door: TOML in, flags over it, one-line refusals, JSON out."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.cli import main
from edge_runtime.config import (
    HetLoRAConfig,
    RunConfig,
    SAFedLoRAConfig,
    StrategyName,
    Transport,
)
from edge_runtime.errors import ConfigError

GOOD = """
seed = 4
[model]
name = "tiny"
[strategy]
name = "sa-fedlora"
mu = 0.05
[fleet]
rounds = 3
[sim]
transport = "mqtt"
device_classes = ["rpi4-2gb", "rpi5-4gb"]
"""


def test_run_file_parses_and_derives_once() -> None:
    import tomllib

    run = RunConfig.from_dict(tomllib.loads(GOOD))
    s = run.strategy.settings
    assert run.strategy.name is StrategyName.SA_FEDLORA and isinstance(s, SAFedLoRAConfig)
    assert (s.mu, s.rounds, s.heat_rounds, s.cool_rounds) == (0.05, 3, 1, 1)  # from fleet
    assert run.sim.transport is Transport.MQTT and run.train.seed == 4
    back = RunConfig.from_dict(run.to_json())
    assert back.to_json() == run.to_json()


def test_hetlora_r_min_follows_the_adapter_unless_given() -> None:
    run = RunConfig.from_dict({"strategy": {"name": "hetlora"}, "adapter": {"r_min": 3,
                                                                             "r_max": 8}})
    assert isinstance(run.strategy.settings, HetLoRAConfig) and run.strategy.settings.r_min == 3
    run2 = RunConfig.from_dict({"strategy": {"name": "hetlora", "r_min": 5}})
    assert run2.strategy.settings.r_min == 5  # type: ignore[union-attr]


@pytest.mark.parametrize("bad, key", [
    ({"fleet": {"roundz": 3}}, "fleet.roundz"),
    ({"fleet": {"rounds": "3"}}, "fleet.rounds"),
    ({"fleet": {"rounds": 0}}, "rounds"),
    ({"train": {"lr": True}}, "train.lr"),
    ({"strategy": {"name": "hetlora", "mu": 0.1}}, "strategy.mu"),
    ({"strategy": {"name": "fedprox"}}, "strategy.name"),
    ({"sim": {"transport": "udp"}}, "sim.transport"),
    ({"sim": {"dropout": 1.5}}, "sim.dropout"),
    ({"adapter": {"r_min": 9, "r_max": 8}}, "r_min"),
    ({"train": {"seed": 1}}, "train.seed"),
    ({"simulation": {}}, "simulation"),
])
def test_bad_values_name_their_key(bad: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RunConfig.from_dict(bad)


def test_cli_refuses_a_bad_run_file_with_one_line_exit_2(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    for text, key in (('[strategy]\nname = "hetlora"\nmu = 0.1\n', "strategy.mu"),
                      ("[fleet]\nrounds = -2\n", "rounds"),
                      ("[fleet\n", "not valid TOML"),
                      ('[train]\nsteps = "ten"\n', "train.steps")):
        f = tmp_path / "run.toml"
        f.write_text(text)
        for cmd in (["simulate", "--out", str(tmp_path / "o")],
                    ["aggregator", "--state", str(tmp_path / "s")], ["demo"]):
            code = main([*cmd, "--config", str(f)])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and key in err[0], (cmd, err)
    code = main(["simulate", "--out", str(tmp_path / "o"), "--set", "strategy.gamma"])
    assert code == 2 and "--set" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path / "o"), "--config",
                 str(tmp_path / "missing.toml")]) == 2


def test_flags_override_the_file_and_set_overrides_flags(tmp_path: Path) -> None:
    import argparse

    from edge_runtime.cli.run_args import resolve_run
    from edge_runtime.cli.simulate import FLAGS

    f = tmp_path / "run.toml"
    f.write_text('[fleet]\nrounds = 7\n[train]\nlr = 0.01\n[strategy]\nname = "hetlora"\n')
    args = argparse.Namespace(config=str(f), rounds=2, lr=None, set=["train.lr=0.5",
                                                                    "strategy.gamma=0.8"])
    run = resolve_run(args, FLAGS)
    assert run.fleet.rounds == 2 and run.train.lr == 0.5
    assert run.strategy.settings.gamma == 0.8  # type: ignore[union-attr]
