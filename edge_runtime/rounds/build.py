"""Wiring a run's server side from its config: shapes, evaluator, planner, service."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edge_runtime.adapter import Adapter
from edge_runtime.checkpoints import LoadedModel
from edge_runtime.config import RunConfig
from edge_runtime.data import Example
from edge_runtime.evaluate import EvalResult, evaluate
from edge_runtime.lora import remove_lora, set_adapter
from edge_runtime.planning import GlobalShape, Planner
from edge_runtime.profiler.profile_io import DeviceProfile
from edge_runtime.rounds.server import AggregatorService

__all__ = ["global_shape", "model_shapes", "make_evaluator", "build_service"]


def global_shape(loaded: LoadedModel, run: RunConfig) -> GlobalShape:
    n_layers = loaded.model.config.n_layers
    a = run.adapter
    return GlobalShape(n_layers=n_layers, depth=a.depth_for(n_layers), r_max=a.r_max,
                       targets=a.targets, alpha=a.alpha)


def model_shapes(loaded: LoadedModel, shape: GlobalShape) -> dict[str, tuple[int, int]]:
    """{module: (d_out, d_in)} for every module the global adapter may hold."""
    out: dict[str, tuple[int, int]] = {}
    for name in shape.modules():
        mod = loaded.model.get_submodule(name)
        mod = getattr(mod, "base", mod)  # a LoRA wrapper's frozen base
        d_out, d_in = getattr(mod, "out_features"), getattr(mod, "in_features")  # noqa: B009
        out[name] = (int(d_out), int(d_in))
    return out


def make_evaluator(loaded: LoadedModel, examples: list[Example], seq_len: int = 128,
                   lock: object | None = None) -> Callable[[Adapter], EvalResult]:
    """Global adapter -> held-out loss (and choice accuracy) on `examples`, base + adapter."""

    def run(adapter: Adapter) -> EvalResult:
        remove_lora(loaded.model)
        set_adapter(loaded.model, adapter, create=True)
        res = evaluate(loaded.model, loaded.tokenizer, examples, seq_len=seq_len)
        return EvalResult(round(res.loss, 6), None if res.accuracy is None
                          else round(res.accuracy, 6), res.choice_rows)

    if lock is None:
        return run

    def locked(adapter: Adapter) -> EvalResult:
        with lock:  # type: ignore[attr-defined]
            return run(adapter)

    return locked


def build_service(loaded: LoadedModel, run: RunConfig, state_dir: Path, *,
                  evaluator: Callable[[Adapter], EvalResult] | None = None,
                  profiles_dir: Path | None = None, reference: DeviceProfile | None = None,
                  clock: Callable[[], float] | None = None) -> AggregatorService:
    """The server of a run on a loaded base model (declared classes from `profiles_dir`,
    default the profiler's `profiles/`; `reference`: a measured profile of this model)."""
    from edge_runtime.profiler.declared import profiles_dir as default_profiles

    shape = global_shape(loaded, run)
    planner = Planner(shape, run.strategy, steps=run.train.steps,
                      deadline_s=run.fleet.round_timeout_s,
                      profiles_dir=profiles_dir or default_profiles(), reference=reference)
    kw = {"clock": clock} if clock is not None else {}
    return AggregatorService(run.fleet, run.strategy, run.train, planner,
                             model_shapes(loaded, shape), loaded.fingerprint, state_dir,
                             seed=run.seed, evaluator=evaluator, **kw)  # type: ignore[arg-type]
