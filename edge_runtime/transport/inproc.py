"""In-process transport: the round engine's server and devices exchange bytes by call.

The same `AggregatorService` and the same device function (`rounds.device`) as a fleet;
downloads and updates go through the same codec and manifests, so bytes and results
match the MQTT transport. Devices run one after another on one shared model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from edge_runtime.checkpoints import LoadedModel
from edge_runtime.config import Compression
from edge_runtime.fleet.codec import decode_adapter
from edge_runtime.fleet.protocol import Register
from edge_runtime.fleet.transfer import make_manifest
from edge_runtime.rounds.device import RoundTask, run_local_round
from edge_runtime.rounds.server import AggregatorService, RoundRecord
from edge_runtime.transport.scheduler import SimDevice, SimScheduler

__all__ = ["run_inproc", "local_trainer", "Job", "TrainJobs"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One device's training in one round: its download and its task."""

    device_id: str
    download: bytes
    task: RoundTask


# Trains a round's jobs; yields (device id, update payload, n_samples) in job order.
TrainJobs = Callable[[list[Job]], Iterable[tuple[str, bytes, int]]]


def local_trainer(devices: list[SimDevice], loaded: LoadedModel,
                  compression: Compression) -> TrainJobs:
    """Devices trained one after another on this process's model."""
    by_id = {d.device_id: d for d in devices}

    def train(jobs: list[Job]) -> Iterator[tuple[str, bytes, int]]:
        for j in jobs:
            start, _meta = decode_adapter(j.download)
            res = run_local_round(loaded.model, loaded.tokenizer, by_id[j.device_id].examples,
                                  start, j.task, device_id=j.device_id,
                                  fingerprint=loaded.fingerprint,
                                  compression=compression.value)
            yield j.device_id, res.payload, res.n_samples

    return train


def run_inproc(service: AggregatorService, devices: list[SimDevice], loaded: LoadedModel,
               scheduler: SimScheduler, compression: Compression,
               train: TrainJobs | None = None) -> list[RoundRecord]:
    """Run every remaining round of `service` with `devices`; returns the merged records.

    `train`: where the devices' local training runs (default `local_trainer`; the Ray
    backend passes its actor pool). Everything else, the round engine and the scheduler,
    is the same.
    """
    train = train or local_trainer(devices, loaded, compression)
    for d in devices:
        refusal = service.register(Register(d.device_id, loaded.fingerprint, len(d.examples),
                                            d.profile, d.device_class))
        if refusal:
            raise RuntimeError(f"simulated device {d.device_id} refused: {refusal}")
    records: list[RoundRecord] = []
    while not service.finished:
        opened = service.plan_round()
        ann = opened.announcement
        jobs = []
        for dev in sorted(ann.devices):
            dp = ann.devices[dev]
            _, data = opened.downloads[dp.global_transfer_id]
            task = RoundTask.from_announced(ann.round, dp.plan, ann.strategy, dp.train)
            if scheduler.will_train(dev, ann.round, len(data), task):
                jobs.append(Job(dev, data, task))
        sent: dict[str, tuple[bytes, int]] = {}
        for dev, payload, n in train(jobs):
            if not scheduler.will_send(dev, ann.round, len(payload)):
                continue
            if service.cfg.secagg:  # masked, below; the server never holds the update
                sent[dev] = (payload, n)
                continue
            m = make_manifest(payload, kind="update", round=ann.round, device_id=dev,
                              compression=compression.value, meta={"n_samples": n})
            service.accept_update(dev, m, payload)
        if service.cfg.secagg:
            from edge_runtime.secagg.inproc import secure_round

            secure_round(service, [j.device_id for j in jobs], sent)
        rec = None
        while rec is None:  # below quorum: simulated failures are final, extensions bring none
            rec = service.close_round(duration_s=scheduler.duration(ann.round))
        records.append(rec)
    return records
