"""The Flower `ClientApp` of a device: registration and one round of local training.

`make_client_app(setup)`: `setup(context)` returns the node's `DeviceSetup` (its model,
rows, id, class and profile), built once per process. A `query` message is answered with
the device's registration; a `train` message carries the round announcement and the
starting adapter, and is answered with the update bytes of `rounds.device.run_local_round`
(the same device code as the MQTT agent and the in-process transport).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edge_runtime.checkpoints import LoadedModel
from edge_runtime.data import Example
from edge_runtime.errors import UserError
from edge_runtime.fleet.codec import decode_adapter
from edge_runtime.fleet.protocol import Register, RoundAnnouncement
from edge_runtime.rounds.device import RoundTask, run_local_round

__all__ = ["DeviceSetup", "make_client_app"]


@dataclass
class DeviceSetup:
    loaded: LoadedModel
    examples: list[Example]
    device_id: str
    device_class: str = ""
    profile: dict[str, Any] = field(default_factory=dict)
    compression: str = "fp32"


def make_client_app(setup: Callable[[Context], DeviceSetup]) -> ClientApp:
    app = ClientApp()
    cache: dict[Any, DeviceSetup] = {}

    def device(context: Context) -> DeviceSetup:
        key = context.node_config.get("partition-id", context.node_id)
        if key not in cache:
            cache[key] = setup(context)
        return cache[key]

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        d = device(context)
        reg = Register(d.device_id, d.loaded.fingerprint, len(d.examples), d.profile,
                       d.device_class)
        return Message(RecordDict({"register": ConfigRecord({"register": reg.to_bytes()})}),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        d = device(context)
        task_rc = msg.content["task"]
        ann = RoundAnnouncement.from_bytes(bytes(task_rc["announcement"]))  # type: ignore[arg-type]
        if ann.fingerprint != d.loaded.fingerprint:
            raise UserError(f"the server's base model {ann.fingerprint[:16]} is not this "
                            f"device's {d.loaded.fingerprint[:16]}")
        dp = ann.devices[d.device_id]
        start, _ = decode_adapter(bytes(task_rc["global"]))  # type: ignore[arg-type]
        task = RoundTask.from_announced(ann.round, dp.plan, ann.strategy, dp.train)
        res = run_local_round(d.loaded.model, d.loaded.tokenizer, d.examples, start, task,
                              device_id=d.device_id, fingerprint=d.loaded.fingerprint,
                              compression=d.compression)
        metrics: dict[str, int | float | list[int] | list[float]] = {"num-examples": res.n_samples, "steps": res.steps}
        if res.train_loss is not None:
            metrics["train_loss"] = float(res.train_loss)
        return Message(RecordDict({"update": ConfigRecord({"device_id": d.device_id,
                                                           "payload": res.payload}),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app
