"""The in-process transport with devices trained on Ray (`edge-rt simulate --backend ray`).

The round engine runs here exactly as in `transport/inproc.py` (registration, plans,
downloads, the scheduler's dropouts and deadlines, validation, folding in device-id
order); only `run_local_round` moves to a pool of Ray actors, each of which loads the
model once and keeps every device's rows. Same seed, same rounds: each device's training
is seeded by (run seed, round, device id), never by where it runs.

On a local Ray instance by default (`ray.init(num_cpus=ray_workers)`), on an existing
cluster with `sim.ray_address`. Each actor uses torch threads = the CPUs it reserves (1).
"""

from __future__ import annotations

import logging
from typing import Any

from edge_runtime.checkpoints import LoadedModel
from edge_runtime.config import RunConfig
from edge_runtime.errors import UserError
from edge_runtime.fleet.codec import decode_adapter
from edge_runtime.fleet.protocol import Register
from edge_runtime.fleet.transfer import make_manifest
from edge_runtime.rounds.device import RoundTask
from edge_runtime.rounds.server import AggregatorService, RoundRecord
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
    """Run every remaining round of `service`, the devices' training on Ray actors."""
    try:
        import ray
    except ImportError:
        raise UserError("sim.backend = ray needs Ray: pip install 'edge-runtime[ray]'") from None
    from edge_runtime.data import example_to_json

    for d in devices:
        refusal = service.register(Register(d.device_id, loaded.fingerprint, len(d.examples),
                                            d.profile, d.device_class))
        if refusal:
            raise RuntimeError(f"simulated device {d.device_id} refused: {refusal}")
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
        workers = [actor.remote(run.model.name, run.model.quant.value, rows_ref, 1)
                   for _ in range(run.sim.ray_workers)]
        compression = run.fleet.compression.value
        records: list[RoundRecord] = []
        while not service.finished:
            opened = service.plan_round()
            ann = opened.announcement
            jobs: dict[str, Any] = {}
            for k, dev in enumerate(sorted(ann.devices)):
                dp = ann.devices[dev]
                _, data = opened.downloads[dp.global_transfer_id]
                task = RoundTask.from_announced(ann.round, dp.plan, ann.strategy, dp.train)
                if not scheduler.will_train(dev, ann.round, len(data), task):
                    continue
                task_json = {"round": ann.round, "plan": dp.plan, "strategy": ann.strategy,
                             "train": dp.train}
                w: Any = workers[k % len(workers)]
                jobs[dev] = w.train.remote(dev, data, task_json, compression)
            for dev in sorted(jobs):  # fold in device order, as the in-process transport
                payload, n = ray.get(jobs[dev])
                if not scheduler.will_send(dev, ann.round, len(payload)):
                    continue
                m = make_manifest(payload, kind="update", round=ann.round, device_id=dev,
                                  compression=compression, meta={"n_samples": n})
                service.accept_update(dev, m, payload)
            rec = None
            while rec is None:
                rec = service.close_round(duration_s=scheduler.duration(ann.round))
            records.append(rec)
        return records
    finally:
        if started:
            ray.shutdown()
