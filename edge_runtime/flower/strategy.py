"""A Flower server strategy that runs the round engine (see the package docstring).

Round 1 starts with a `query` message to every node: each answers with its registration
(device id, base fingerprint, rows, class, profile), which the service plans from. Each
round then sends every selected node a `train` message with the round announcement and
its starting adapter; replies carry the device's update bytes and are validated and
folded by `AggregatorService.accept_update` (a malformed reply, a node answering for
another device or an error reply is counted as a rejection, never raised). Evaluation is
the service's own (centralised, each merge), so `configure_evaluate` sends nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from edge_runtime.adapter import Adapter
from edge_runtime.fleet.protocol import PROTOCOL_VERSION, ProtocolError, Register
from edge_runtime.fleet.transfer import make_manifest
from edge_runtime.rounds.server import AggregatorService

__all__ = ["LoRARoundStrategy", "adapter_arrays"]

log = logging.getLogger(__name__)


def adapter_arrays(adapter: Adapter) -> ArrayRecord:
    """The adapter as a Flower ArrayRecord: NAME.lora_a, NAME.lora_b, NAME.alpha."""
    import torch

    out: dict[str, Any] = {}
    for name, w in sorted(adapter.items()):
        out[f"{name}.lora_a"] = w.lora_a.detach().cpu().contiguous()
        out[f"{name}.lora_b"] = w.lora_b.detach().cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor([w.alpha])
    return ArrayRecord(out)


class LoRARoundStrategy(Strategy):
    """Flower `Strategy` driving `service` (built with `rounds.build.build_service`)."""

    def __init__(self, service: AggregatorService, timeout_s: float = 600.0,
                 min_nodes: int | None = None) -> None:
        self.svc = service
        self.timeout_s = timeout_s
        # nodes to wait for before round 1 (Flower's nodes come up after the ServerApp)
        self.min_nodes = min_nodes if min_nodes is not None else service.cfg.min_clients
        self.node_of: dict[str, int] = {}  # device id -> Flower node id

    # registration ---------------------------------------------------------------------
    def _register(self, grid: Grid) -> None:
        end = time.monotonic() + self.timeout_s
        nodes = list(grid.get_node_ids())
        while len(nodes) < self.min_nodes and time.monotonic() < end:
            time.sleep(0.2)
            nodes = list(grid.get_node_ids())
        msgs = [Message(content=RecordDict({"config": ConfigRecord({"what": "register"})}),
                        message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        for reply in grid.send_and_receive(msgs, timeout=self.timeout_s):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not register: %s", node, reply.error)
                continue
            try:
                rc = reply.content["register"]
                reg = Register.from_bytes(bytes(rc["register"]))  # type: ignore[arg-type]
            except (KeyError, TypeError, ProtocolError) as e:
                self.svc.count_rejection(str(node), "bad_manifest", f"registration: {e}")
                continue
            refusal = self.svc.register(reg)
            if refusal:
                log.warning("node %s (%s) refused: %s", node, reg.device_id, refusal)
                continue
            self.node_of[reg.device_id] = node
        log.info("flower: %d of %d nodes registered", len(self.node_of), len(nodes))

    # Flower's Strategy ------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if len(self.node_of) < self.min_nodes:
            self._register(grid)
        if self.svc.finished:
            return []
        opened = self.svc.plan_round()
        ann = opened.announcement
        out = []
        for dev, dp in sorted(ann.devices.items()):
            node = self.node_of.get(dev)
            if node is None:
                continue
            _, data = opened.downloads[dp.global_transfer_id]
            task = ConfigRecord({"announcement": ann.to_bytes(), "device_id": dev,
                                 "global": data})
            out.append(Message(content=RecordDict({"task": task}),
                               message_type=MessageType.TRAIN, dst_node_id=node))
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        by_node = {n: d for d, n in self.node_of.items()}
        for reply in replies:
            node = reply.metadata.src_node_id
            dev = by_node.get(node, str(node))
            if reply.has_error():
                self.svc.count_rejection(dev, "bad_manifest", f"error reply: {reply.error}")
                continue
            try:
                rc = reply.content["update"]
                claimed = str(rc["device_id"])
                payload = bytes(rc["payload"])  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError) as e:
                self.svc.count_rejection(dev, "bad_manifest", f"malformed reply: {e}")
                continue
            if claimed != dev:  # a node answers for its own device only
                self.svc.count_rejection(dev, "bad_manifest",
                                         f"node {node} sent an update as {claimed!r}")
                continue
            m = make_manifest(payload, kind="update", round=self.svc.round, device_id=dev)
            self.svc.accept_update(dev, m, payload)
        rec = None
        while rec is None:  # below quorum after the replies: extensions bring nobody new
            rec = self.svc.close_round()
        metrics: dict[str, int | float | list[int] | list[float]] = {"participants": rec.participants,
                                           "bytes_up": rec.bytes_up,
                                           "bytes_down": rec.bytes_down}
        if rec.eval_loss is not None:
            metrics["eval_loss"] = rec.eval_loss
        if rec.eval_accuracy is not None:
            metrics["eval_accuracy"] = rec.eval_accuracy
        return adapter_arrays(self.svc.global_adapter), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the service evaluates each merged global itself

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("edge-rt round engine: strategy %s, protocol v%d, %s",
                 self.svc.strategy_cfg.name.value, PROTOCOL_VERSION,
                 json.dumps(self.svc.strategy_cfg.to_json()))
