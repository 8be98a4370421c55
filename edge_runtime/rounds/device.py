"""The device side of a round, whatever the transport: start adapter in, update bytes out.

`run_local_round` is what a device does once it holds the round's announcement and its
starting adapter: build the strategy from the announced config (never from its name with
defaults), train with the announced recipe (seeded per device and round, so a simulated
device and a real one given the same inputs compute the same update), let the strategy
finish the local adapter (HetLoRA prunes) and encode the update. The MQTT agent and the
in-process transport both call it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from edge_runtime.adapter import Adapter
from edge_runtime.config import StrategyConfig, TrainConfig, from_dict
from edge_runtime.data import Example, TokenizerLike
from edge_runtime.fl.registry import make_strategy
from edge_runtime.fl.types import ClientPlan
from edge_runtime.fleet.codec import encode_adapter
from edge_runtime.lora import add_frozen_delta, get_adapter, remove_lora, set_adapter
from edge_runtime.model import CausalLM
from edge_runtime.prefix_cache import PrefixCache
from edge_runtime.rounds.seeding import device_seed
from edge_runtime.trainer import train

__all__ = ["RoundTask", "LocalResult", "device_seed", "run_local_round"]

log = logging.getLogger(__name__)


@dataclass
class RoundTask:
    """What a device is told to do in one round (decoded from the announcement)."""

    round_index: int
    plan: ClientPlan
    strategy: StrategyConfig
    recipe: TrainConfig

    @classmethod
    def from_announced(cls, round_index: int, plan: dict[str, Any], strategy: dict[str, Any],
                       recipe: dict[str, Any]) -> RoundTask:
        """Parse the announcement's parts; a malformed config raises ConfigError."""
        return cls(round_index, ClientPlan.from_json(plan),
                   StrategyConfig.from_json(strategy, "announced strategy"),
                   from_dict(TrainConfig, recipe, "announced train"))


@dataclass
class LocalResult:
    adapter: Adapter
    payload: bytes
    n_samples: int
    steps: int
    train_loss: float | None
    elapsed_s: float


def run_local_round(model: CausalLM, tokenizer: TokenizerLike, examples: list[Example],
                    start: Adapter, task: RoundTask, *, device_id: str, fingerprint: str,
                    compression: str = "fp32", deadline: float | None = None,
                    prefix_cache: PrefixCache | None = None) -> LocalResult:
    """Train one round from `start` and return the encoded update (see module docstring).

    Args:
        deadline: `time.monotonic()` value at which training stops early (a fleet's round
            deadline less an upload margin); None trains all the recipe's steps.
        prefix_cache: the device's frozen-prefix cache, kept across rounds by the caller
            (valid while the prefix's depth and frozen deltas stay the same; see
            `PrefixCache.bind`); None caches within this round's training only.
    """
    strategy = make_strategy(task.strategy)
    seed = device_seed(task.recipe.seed, task.round_index, device_id)
    frozen, start = strategy.local_start(start, task.plan, seed)
    remove_lora(model)
    if frozen is not None:
        add_frozen_delta(model, frozen)
    set_adapter(model, start, create=True)
    recipe = replace(task.recipe, seed=seed)
    reg = strategy.regularizer(start, task.plan, task.round_index)
    res = train(model, tokenizer, examples, recipe, regularizer=reg, deadline=deadline,
                prefix_cache=prefix_cache)
    update = strategy.finish_local(start, get_adapter(model), task.plan)
    loss = res.losses[-1] if res.losses else None
    meta = {"fingerprint": fingerprint, "n_samples": len(examples), "round": task.round_index,
            "steps": res.steps, "train_loss": loss}
    payload = encode_adapter(update, meta, compression)
    return LocalResult(update, payload, len(examples), res.steps, loss, res.elapsed_s)
