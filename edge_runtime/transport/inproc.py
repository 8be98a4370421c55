"""In-process transport: the round engine's server and devices exchange bytes by call.

The same `AggregatorService` and the same device function (`rounds.device`) as a fleet;
downloads and updates go through the same codec and manifests, so bytes and results
match the MQTT transport. Devices run one after another on one shared model.
"""

from __future__ import annotations

import logging

from edge_runtime.checkpoints import LoadedModel
from edge_runtime.config import Compression
from edge_runtime.fleet.codec import decode_adapter
from edge_runtime.fleet.protocol import Register
from edge_runtime.fleet.transfer import make_manifest
from edge_runtime.rounds.device import RoundTask, run_local_round
from edge_runtime.rounds.server import AggregatorService, RoundRecord
from edge_runtime.transport.scheduler import SimDevice, SimScheduler

__all__ = ["run_inproc"]

log = logging.getLogger(__name__)


def run_inproc(service: AggregatorService, devices: list[SimDevice], loaded: LoadedModel,
               scheduler: SimScheduler, compression: Compression) -> list[RoundRecord]:
    """Run every remaining round of `service` with `devices`; returns the merged records."""
    by_id = {d.device_id: d for d in devices}
    for d in devices:
        refusal = service.register(Register(d.device_id, loaded.fingerprint, len(d.examples),
                                            d.profile, d.device_class))
        if refusal:
            raise RuntimeError(f"simulated device {d.device_id} refused: {refusal}")
    records: list[RoundRecord] = []
    while not service.finished:
        opened = service.plan_round()
        ann = opened.announcement
        for dev in sorted(ann.devices):
            dp = ann.devices[dev]
            _, data = opened.downloads[dp.global_transfer_id]
            start, _meta = decode_adapter(data)
            task = RoundTask.from_announced(ann.round, dp.plan, ann.strategy, dp.train)
            if not scheduler.will_train(dev, ann.round, len(data), task):
                continue
            res = run_local_round(loaded.model, loaded.tokenizer, by_id[dev].examples, start,
                                  task, device_id=dev, fingerprint=loaded.fingerprint,
                                  compression=compression.value)
            if not scheduler.will_send(dev, ann.round, len(res.payload)):
                continue
            m = make_manifest(res.payload, kind="update", round=ann.round, device_id=dev,
                              compression=compression.value, meta={"n_samples": res.n_samples})
            service.accept_update(dev, m, res.payload)
        rec = None
        while rec is None:  # below quorum: simulated failures are final, extensions bring none
            rec = service.close_round(duration_s=scheduler.duration(ann.round))
        records.append(rec)
    return records
