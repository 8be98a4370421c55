"""Federated LoRA strategies as pure functions over adapters (no MQTT, no nn.Module state).

See docs/STRATEGIES.md for the conventions and the choices made where papers are silent.
"""

from edge_runtime.fl.registry import STRATEGIES, make_strategy
from edge_runtime.fl.types import ClientPlan, ClientUpdate, Strategy, UpdateMismatchError

__all__ = ["STRATEGIES", "make_strategy", "ClientPlan", "ClientUpdate", "Strategy",
           "UpdateMismatchError"]
