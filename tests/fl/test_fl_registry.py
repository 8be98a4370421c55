import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.fl import STRATEGIES, make_strategy


def test_every_name_builds_and_unknown_names_fail():
    for name in STRATEGIES:
        assert make_strategy(name).name == name
    with pytest.raises(ConfigError, match="choose one of"):
        make_strategy("fedprox")
