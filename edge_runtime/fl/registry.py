"""Strategy names (`fedavg|hetlora|flexlora|sa-fedlora|legend`) to implementations."""

from __future__ import annotations

from edge_runtime.config import (
    FlexLoRAConfig,
    HetLoRAConfig,
    LegendConfig,
    SAFedLoRAConfig,
)
from edge_runtime.errors import ConfigError
from edge_runtime.fl.fedavg import FedAvg
from edge_runtime.fl.flexlora import FlexLoRA
from edge_runtime.fl.hetlora import HetLoRA
from edge_runtime.fl.legend import Legend
from edge_runtime.fl.sa_fedlora import SAFedLoRA
from edge_runtime.fl.types import StrategyBase

__all__ = ["STRATEGIES", "make_strategy"]

STRATEGIES: tuple[str, ...] = ("fedavg", "hetlora", "flexlora", "sa-fedlora", "legend")


def make_strategy(name: str, *, hetlora: HetLoRAConfig | None = None,
                  flexlora: FlexLoRAConfig | None = None,
                  sa_fedlora: SAFedLoRAConfig | None = None,
                  legend: LegendConfig | None = None) -> StrategyBase:
    """Build a strategy by name, each receiving only its own config.

    Raises:
        ConfigError: unknown name (lists the choices).
    """
    key = name.strip().lower().replace("_", "-")
    if key == "fedavg":
        return FedAvg()
    if key == "hetlora":
        return HetLoRA(hetlora)
    if key == "flexlora":
        return FlexLoRA(flexlora)
    if key == "sa-fedlora":
        return SAFedLoRA(sa_fedlora)
    if key == "legend":
        return Legend(legend)
    raise ConfigError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
