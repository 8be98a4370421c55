"""The in-process transport with devices trained on Ray (`edge-rt simulate --backend ray`).

The round loop is `transport/inproc.run_inproc` itself (registration, plans, downloads,
the scheduler's dropouts and deadlines, validation, folding in device-id order); only
its `train` step moves to a pool of Ray actors, each of which loads the
model once and keeps every device's rows. Same seed, same rounds: each device's training
is seeded by (run seed, round, device id), never by where it runs.

On a local Ray instance by default (`ray.init(num_cpus=ray_workers)`), on an existing
cluster with `sim.ray_address`. Each actor uses torch threads = the CPUs it reserves (1).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from edge_runtime.checkpoints import LoadedModel
from edge_runtime.config import RunConfig, to_jsonable
from edge_runtime.errors import UserError
from edge_runtime.fleet.codec import decode_adapter
from edge_runtime.rounds.device import RoundTask
from edge_runtime.rounds.server import AggregatorService, RoundRecord
from edge_runtime.transport.inproc import Job, run_inproc
from edge_runtime.transport.scheduler import SimDevice, SimScheduler

__all__ = ["run_ray"]

log = logging.getLogger(__name__)


class _Worker:
    """A Ray actor: one model, every device's rows; trains one device round per call."""

    def __init__(self, model: str, quant: str, rows: dict[str, list[dict[str, Any]]],
                 threads: int) -> None:
        import torch

        from edge_runtime.checkpoints import load_model
        from edge_runtime.data import Example

        torch.set_num_threads(threads)
        self.loaded = load_model(model, quant)
        self.rows = {d: [Example(**e) for e in r] for d, r in rows.items()}

    def train(self, device_id: str, start_bytes: bytes, task_json: dict[str, Any],
              compression: str) -> tuple[bytes, int]:
        from edge_runtime.rounds.device import run_local_round

        start, _ = decode_adapter(start_bytes)
        task = RoundTask.from_announced(task_json["round"], task_json["plan"],
                                        task_json["strategy"], task_json["train"])
        res = run_local_round(self.loaded.model, self.loaded.tokenizer, self.rows[device_id],
                              start, task, device_id=device_id,
                              fingerprint=self.loaded.fingerprint, compression=compression)
        return res.payload, res.n_samples


def run_ray(service: AggregatorService, devices: list[SimDevice], loaded: LoadedModel,
            scheduler: SimScheduler, run: RunConfig) -> list[RoundRecord]:
    """Run every remaining round of `service` (`run_inproc`), the devices' training on a
    pool of Ray actors."""
    try:
        import ray
    except ImportError:
        raise UserError("sim.backend = ray needs Ray: pip install 'edge-runtime[ray]'") from None
    from edge_runtime.data import example_to_json

    started = not ray.is_initialized()
    if started:
        if run.sim.ray_address:
            ray.init(address=run.sim.ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=run.sim.ray_workers, include_dashboard=False,
                     log_to_driver=False)
    try:
        rows = {d.device_id: [example_to_json(e) for e in d.examples] for d in devices}
        rows_ref = ray.put(rows)
        actor = ray.remote(num_cpus=1)(_Worker)
        workers: list[Any] = [actor.remote(run.model.name, run.model.quant.value, rows_ref, 1)
                              for _ in range(run.sim.ray_workers)]
        compression = run.fleet.compression.value

        def train(jobs: list[Job]) -> Iterator[tuple[str, bytes, int]]:
            futures = [workers[k % len(workers)].train.remote(
                j.device_id, j.download,
                {"round": j.task.round_index, "plan": j.task.plan.to_json(),
                 "strategy": j.task.strategy.to_json(), "train": to_jsonable(j.task.recipe)},
                compression) for k, j in enumerate(jobs)]
            for j, f in zip(jobs, futures, strict=True):  # in job (device) order
                payload, n = ray.get(f)
                yield j.device_id, payload, n

        return run_inproc(service, devices, loaded, scheduler, run.fleet.compression, train)
    finally:
        if started:
            ray.shutdown()
