"""Strategy configs (`edge_runtime.config.StrategyConfig`) to implementations."""

from __future__ import annotations

from edge_runtime.config import (
    FlexLoRAConfig,
    FLoRAConfig,
    HetLoRAConfig,
    LegendConfig,
    SAFedLoRAConfig,
    StrategyConfig,
    StrategyName,
)
from edge_runtime.fl.fedavg import FedAvg
from edge_runtime.fl.flexlora import FlexLoRA
from edge_runtime.fl.flora import FLoRA
from edge_runtime.fl.hetlora import HetLoRA
from edge_runtime.fl.legend import Legend
from edge_runtime.fl.sa_fedlora import SAFedLoRA
from edge_runtime.fl.types import StrategyBase

__all__ = ["STRATEGIES", "make_strategy"]

STRATEGIES: tuple[str, ...] = tuple(m.value for m in StrategyName)


def make_strategy(cfg: StrategyConfig) -> StrategyBase:
    """The strategy of `cfg`, built with its own typed settings (never defaults by name)."""
    s = cfg.settings
    if cfg.name is StrategyName.FEDAVG:
        return FedAvg()
    if cfg.name is StrategyName.HETLORA:
        assert isinstance(s, HetLoRAConfig)
        return HetLoRA(s)
    if cfg.name is StrategyName.FLEXLORA:
        assert isinstance(s, FlexLoRAConfig)
        return FlexLoRA(s)
    if cfg.name is StrategyName.SA_FEDLORA:
        assert isinstance(s, SAFedLoRAConfig)
        return SAFedLoRA(s)
    if cfg.name is StrategyName.FLORA:
        assert isinstance(s, FLoRAConfig)
        return FLoRA(s)
    assert isinstance(s, LegendConfig)
    return Legend(s)
