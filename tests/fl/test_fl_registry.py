import pytest

from edge_runtime.config import HetLoRAConfig, StrategyConfig, StrategyName
from edge_runtime.errors import ConfigError
from edge_runtime.fl import STRATEGIES, make_strategy


def test_every_name_builds_with_its_own_settings_and_unknown_names_fail():
    for name in STRATEGIES:
        assert make_strategy(StrategyConfig(StrategyName(name))).name == name
    strat = make_strategy(StrategyConfig(StrategyName.HETLORA, HetLoRAConfig(gamma=0.8)))
    assert strat.cfg.gamma == 0.8  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="fedprox"):
        StrategyConfig.from_json({"name": "fedprox"})
