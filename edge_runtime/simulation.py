"""A simulated fleet: devices of declared classes, each with its own data, run by the round
engine over a chosen transport (in-process, or a real MQTT broker).

A simulated device is described to the server exactly as a real one is, by the profile
it registers with, so the one planner (`edge_runtime.planning`) plans both:
- `plan`: rank by device class, geometric from `adapter.r_min` (slowest class, by
  fp32 GFLOP/s) to `adapter.r_max` (fastest), on the global depth;
- `legend_cost`: the class's per-block costs for this model (`fl.devices.analytic_cost`),
  which LEGEND plans from.
The `SimScheduler` adds the simulated clock, dropouts and stragglers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import tempfile
import threading
from pathlib import Path
from typing import Any

from edge_runtime.config import (
    Backend,
    EvalSplit,
    LegendConfig,
    RunConfig,
    StrategyConfig,
    Transport,
)
from edge_runtime.data import Example, load_jsonl
from edge_runtime.errors import ConfigError, DataError
from edge_runtime.fl.devices import DeviceClass, analytic_cost, load_device_classes
from edge_runtime.fl.legend import predict_time
from edge_runtime.model import ModelConfig
from edge_runtime.transport.scheduler import SimDevice

__all__ = ["per_client_metrics", "load_client_tests", "split_validation", "class_ranks", "build_devices", "load_client_data", "run_simulation"]

log = logging.getLogger(__name__)


def class_ranks(classes: list[DeviceClass], r_min: int, r_max: int) -> dict[str, int]:
    """Geometric ranks from r_min (lowest fp32_gflops) to r_max (highest)."""
    speeds = sorted({c.fp32_gflops for c in classes})
    out = {}
    for c in classes:
        i = speeds.index(c.fp32_gflops)
        frac = i / (len(speeds) - 1) if len(speeds) > 1 else 1.0
        out[c.name] = int(round(r_min * (r_max / r_min) ** frac))
    return out


def build_devices(run: RunConfig, model_cfg: ModelConfig, classes: list[DeviceClass],
                  data: list[list[Example]]) -> list[SimDevice]:
    """Devices cycle through the classes; each gets its data split and its profile."""
    n = run.sim.clients
    if len(data) < n:
        raise ConfigError(f"the data has {len(data)} client splits, fewer than sim.clients "
                          f"{n}; pull it again with --clients {n}")
    a = run.adapter
    depth = a.depth_for(model_cfg.n_layers)
    ranks = class_ranks(classes, a.r_min, a.r_max)
    out = []
    for i in range(n):
        dc = classes[i % len(classes)]
        cost = analytic_cost(model_cfg, dc, batch=run.train.batch_size,
                             seq_len=run.train.seq_len, targets=a.targets)
        profile = {"plan": {"rank": ranks[dc.name], "depth": depth, "targets": list(a.targets),
                            "alpha": a.alpha},
                   "legend_cost": dataclasses.asdict(cost)}
        out.append(SimDevice(f"sim-{i:03d}", dc.name, cost, data[i], profile))
    return out


def resolve_legend_deadline(run: RunConfig, devices: list[SimDevice], n_layers: int) -> RunConfig:
    """LEGEND without a deadline plans against the simulated deadline, or else the smallest
    one that keeps every device (the slowest at depth 1 and rank r_min)."""
    s = run.strategy.settings
    if not isinstance(s, LegendConfig) or s.deadline_s is not None:
        return run
    deadline = run.sim.deadline_s or max(
        predict_time(d.cost, n_layers, [s.r_min], run.train.steps) for d in devices)
    new = StrategyConfig(run.strategy.name, dataclasses.replace(s, deadline_s=deadline))
    return dataclasses.replace(run, strategy=new)


def split_validation(train: list[list[Example]], fraction: float
                     ) -> tuple[list[list[Example]], list[Example]]:
    """Hold out the last ceil(fraction * n) rows of each device's split (never trained on).

    The pulled splits are already shuffled, so the last rows are a random sample; the
    split does not depend on the run's seed, so every method and seed sees the same one.
    """
    if fraction <= 0.0:
        return train, []
    kept, held = [], []
    for rows in train:
        k = min(len(rows) - 1, math.ceil(fraction * len(rows)))
        kept.append(rows[: len(rows) - k])
        held.extend(rows[len(rows) - k:])
    return kept, held


def _client_dirs(data: str, n_clients: int, *, partition: str | None, alpha: float,
                 seed: int) -> tuple[Path, list[Path]]:
    """The data folder (pulled into the cache when `data` is a dataset name) and its
    client_* folders."""
    folder = Path(data)
    if not folder.is_dir():
        from edge_runtime.cli.data import default_out
        from edge_runtime.datasets.build import pull_dataset

        folder = default_out(data, partition, n_clients, seed)
        if not (folder / "manifest.json").is_file():
            pull_dataset(data, folder, n_clients=n_clients, partition=partition, alpha=alpha,
                         seed=seed)
    dirs = sorted(d for d in folder.glob("client_*") if d.is_dir())
    if not dirs:
        raise DataError(f"{folder} has no client_*/train.jsonl; make one with "
                        "`edge-rt data pull NAME --clients N --out DIR`")
    return folder, dirs[:n_clients]


def load_client_tests(data: str, n_clients: int, *, partition: str | None, alpha: float,
                      seed: int) -> list[list[Example]]:
    """Each client's own held-out rows (client_*/test.jsonl; empty when absent)."""
    _, dirs = _client_dirs(data, n_clients, partition=partition, alpha=alpha, seed=seed)
    return [load_jsonl(d / "test.jsonl") if (d / "test.jsonl").is_file() else [] for d in dirs]


def load_client_data(data: str, n_clients: int, *, partition: str | None, alpha: float,
                     seed: int) -> tuple[list[list[Example]], list[Example]]:
    """Client train splits and the global held-out rows from a folder or a dataset name."""
    folder, dirs = _client_dirs(data, n_clients, partition=partition, alpha=alpha, seed=seed)
    train = [load_jsonl(d / "train.jsonl") for d in dirs]
    test_path = folder / "test.jsonl"
    test = load_jsonl(test_path) if test_path.is_file() else [
        e for d in dirs for e in load_jsonl(d / "test.jsonl")]
    return train, test


def run_simulation(run: RunConfig, state_dir: Path | None = None) -> dict[str, Any]:
    """Run the simulated fleet of `run`; returns the metrics document (one schema).

    `state_dir`: keep the aggregator's state (and each merged global) there instead of
    in a temporary folder.
    """
    from edge_runtime.checkpoints import load_model
    from edge_runtime.rounds.build import build_service, make_evaluator
    from edge_runtime.transport.inproc import run_inproc
    from edge_runtime.transport.mqtt_sim import run_mqtt
    from edge_runtime.transport.scheduler import SimScheduler

    if run.data.path is None:
        raise ConfigError("a simulation needs data: pass --data DIR|NAME or set data.path")
    classes = load_device_classes(run.sim.device_classes)
    train, test = load_client_data(run.data.path, run.sim.clients,
                                   partition=run.data.partition,
                                   alpha=run.data.dirichlet_alpha, seed=run.seed)
    train, validation = split_validation(train, run.data.validation_fraction)
    if run.data.client_rows:
        train = [rows[: run.data.client_rows] for rows in train]
    if run.data.eval_split is EvalSplit.VALIDATION:
        test = validation
    loaded = load_model(run.model.name, run.model.quant)
    model_cfg = loaded.model.config
    devices = build_devices(run, model_cfg, classes, train)
    run = resolve_legend_deadline(run, devices, model_cfg.n_layers)
    rows = test if len(test) <= run.data.eval_max else random.Random(run.seed).sample(
        test, run.data.eval_max)
    lock = threading.RLock()
    evaluator = make_evaluator(loaded, rows, run.train.seq_len, lock=lock)
    scheduler = SimScheduler(run.sim, run.seed, {d.device_id: d.cost for d in devices},
                             model_cfg.n_layers)
    with tempfile.TemporaryDirectory(prefix="edge-rt-sim-state-") as state:
        svc = build_service(loaded, run, state_dir or Path(state), evaluator=evaluator)
        if run.sim.transport is Transport.MQTT:
            run_mqtt(svc, devices, loaded, scheduler, run, lock)
        elif run.sim.transport is Transport.FLOWER:
            from edge_runtime.flower.simulation import run_flower

            run_flower(svc, devices, run)
        elif run.sim.backend is Backend.RAY:
            from edge_runtime.transport.ray_backend import run_ray

            run_ray(svc, devices, loaded, scheduler, run)
        else:
            run_inproc(svc, devices, loaded, scheduler, run.fleet.compression)
        config = run.to_json()
        config["strategy"] = svc.strategy_cfg.to_json()
        metrics = svc.metrics_json(config, clock="simulated")
        if run.data.per_client:
            metrics["per_client"] = per_client_metrics(run, loaded, svc.global_adapter,
                                                       [d.device_id for d in devices])
        return metrics


def per_client_metrics(run: RunConfig, loaded: Any, adapter: Any, device_ids: list[str]
                       ) -> dict[str, dict[str, Any]]:
    """The final global adapter on each device's own held-out rows (at most eval_max each),
    beside the pooled metrics of the rounds."""
    from edge_runtime.rounds.build import make_evaluator

    tests = load_client_tests(run.data.path or "", run.sim.clients,
                              partition=run.data.partition, alpha=run.data.dirichlet_alpha,
                              seed=run.seed)
    out: dict[str, dict[str, Any]] = {}
    for dev, rows in zip(device_ids, tests, strict=True):
        if not rows:
            continue
        rows = rows if len(rows) <= run.data.eval_max else random.Random(run.seed).sample(
            rows, run.data.eval_max)
        res = make_evaluator(loaded, rows, run.train.seq_len)(adapter)
        out[dev] = {"rows": len(rows), "eval_loss": res.loss, "eval_accuracy": res.accuracy}
    return out
