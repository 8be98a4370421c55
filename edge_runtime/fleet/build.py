"""Wiring shared by `edge-rt aggregator` and `edge-rt demo`: shapes, evaluator, service."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from edge_runtime.adapter import Adapter
from edge_runtime.checkpoints import LoadedModel
from edge_runtime.config import FleetConfig
from edge_runtime.data import Example
from edge_runtime.errors import ConfigError
from edge_runtime.evaluate import eval_loss
from edge_runtime.fl import Strategy, make_strategy
from edge_runtime.fleet.aggregator import AggregatorService
from edge_runtime.fleet.planning import GlobalShape, module_name
from edge_runtime.lora import remove_lora, set_adapter

__all__ = ["model_shapes", "make_evaluator", "build_service"]


def model_shapes(loaded: LoadedModel, shape: GlobalShape) -> dict[str, tuple[int, int]]:
    """{module: (d_out, d_in)} for every module the global adapter may hold."""
    out: dict[str, tuple[int, int]] = {}
    for i in range(shape.n_layers - shape.depth, shape.n_layers):
        for t in shape.targets:
            name = module_name(i, t)
            mod = loaded.model.get_submodule(name)
            d_out, d_in = getattr(mod, "out_features"), getattr(mod, "in_features")  # noqa: B009
            out[name] = (int(d_out), int(d_in))
    return out


def make_evaluator(loaded: LoadedModel, examples: list[Example], seq_len: int = 128
                   ) -> Callable[[Adapter], float]:
    """Global adapter -> mean held-out token loss on `examples` with the base model."""

    def evaluate(adapter: Adapter) -> float:
        remove_lora(loaded.model)
        set_adapter(loaded.model, adapter, create=True)
        return round(eval_loss(loaded.model, loaded.tokenizer, examples,
                               seq_len=seq_len), 6)

    return evaluate


def build_service(loaded: LoadedModel, cfg: FleetConfig, state_dir: Path, *, r_max: int,
                  depth: int, targets: tuple[str, ...], alpha: float, train: dict[str, Any],
                  eval_examples: list[Example] | None = None, seq_len: int = 128,
                  profiles_dir: Path | None = None, reference: Path | None = None,
                  seed: int = 0) -> AggregatorService:
    """The aggregator service for a loaded base model (declared classes from `profiles_dir`,
    default the profiler's `profiles/`; `reference`: a measured profile for this model)."""
    from edge_runtime.profiler.declared import profiles_dir as default_profiles
    from edge_runtime.profiler.profile_io import load_profile

    n_layers = loaded.model.config.n_layers
    if depth > n_layers:
        raise ConfigError(f"--depth {depth} is above the model's {n_layers} blocks; pass "
                          f"--depth {n_layers} or less")
    shape = GlobalShape(n_layers=n_layers, depth=depth, r_max=r_max, targets=targets, alpha=alpha)
    evaluator = make_evaluator(loaded, eval_examples, seq_len) if eval_examples else None
    return AggregatorService(cfg, cast(Strategy, make_strategy(cfg.strategy)), shape, model_shapes(loaded, shape),
                             loaded.fingerprint, state_dir, seed=seed, train=train,
                             evaluator=evaluator,
                             profiles_dir=profiles_dir or default_profiles(),
                             reference=load_profile(reference) if reference else None)
