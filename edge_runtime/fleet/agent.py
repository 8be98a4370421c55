"""The device agent: join the fleet, train each round within its deadline, upload, apply.

One worker loop over the MQTT link's bounded queue (callbacks only enqueue):
register (with the device's profile) whenever the aggregator is seen online; on a round
announcement that selects this device, subscribe to its own download, reassemble and
verify it, train with the core trainer until the round's deadline (the strategy's
regulariser added to the loss), let the strategy finish the local adapter (HetLoRA
prunes), write the update to the on-disk outbox, upload it in chunks and re-send until
the aggregator acks. After a restart, the outbox is re-sent. When the aggregator
announces `finished`, the agent applies its share of the final global adapter.
"""

from __future__ import annotations

import contextlib
import logging
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from edge_runtime.adapter import Adapter
from edge_runtime.checkpoints import LoadedModel, load_model
from edge_runtime.config import AgentConfig, MqttConfig
from edge_runtime.data import Example, load_jsonl
from edge_runtime.errors import ConfigError
from edge_runtime.fleet.codec import decode_adapter, encode_adapter
from edge_runtime.fleet.mqtt_client import InboundMessage, MqttLink
from edge_runtime.fleet.outbox import Outbox
from edge_runtime.fleet.protocol import (
    Ack,
    AggregatorStatus,
    Manifest,
    Presence,
    ProtocolError,
    Register,
    RoundAnnouncement,
    Topics,
)
from edge_runtime.fleet.transfer import Reassembler, TransferError, iter_chunks, make_manifest
from edge_runtime.lora import remove_lora, set_adapter
from edge_runtime.prefix_cache import PrefixCache
from edge_runtime.rounds.device import LocalResult, RoundTask, run_local_round

__all__ = ["DeviceAgent", "RoundGate", "resend_after"]

log = logging.getLogger(__name__)


def resend_after(ack_timeout_s: float, sends: int) -> float:
    """Seconds to wait for the ack of an update sent `sends` times before sending it again:
    `ack_timeout_s`, doubled with each send, at most 8x. A busy aggregator acks in queue
    order; with a fixed 10 s, 1,000 devices re-sent each update ~3 times a round while
    it waited its turn (docs/SCALING.md)."""
    return ack_timeout_s * min(8, 2 ** max(0, sends - 1))


class RoundGate(Protocol):
    """A simulated device's behaviour (the in-process scheduler's, reused over MQTT):
    whether it trains this round at all, and whether its finished update is sent."""

    def will_train(self, device_id: str, round_index: int, download_bytes: int,
                   task: RoundTask) -> bool: ...

    def will_send(self, device_id: str, round_index: int, upload_bytes: int) -> bool: ...


class DeviceAgent:
    """One device in an MQTT fleet (module docstring).

    Args:
        cfg: the device's settings.
        mqtt: how to reach the broker.
        loaded, examples: a model and rows already in memory (a simulated fleet shares
            one model between its devices); by default loaded from `cfg`.
        gate: a simulated device's dropout/deadline behaviour (None: a real device).
        train_lock: held while training (devices sharing one model take turns).
    """

    def __init__(self, cfg: AgentConfig, mqtt: MqttConfig, *, loaded: LoadedModel | None = None,
                 examples: list[Example] | None = None, gate: RoundGate | None = None,
                 train_lock: AbstractContextManager[Any] | None = None) -> None:
        self.cfg = cfg
        self.topics = Topics(mqtt.prefix, mqtt.fleet)
        dev = cfg.device_id
        self.examples = examples if examples is not None else load_jsonl(cfg.data)
        self.loaded = loaded or load_model(cfg.model, cfg.quant)
        # A device that owns its model keeps the frozen-prefix states of its examples from
        # round to round (budget: the announced recipe's `prefix_cache_mb`); agents
        # sharing one model in a simulation cache within a round only.
        self.prefix_cache = PrefixCache(budget_bytes=0) if loaded is None else None
        self.gate = gate
        self.train_lock = train_lock or contextlib.nullcontext()
        self.last_task: RoundTask | None = None
        self.outbox = Outbox(Path(cfg.state_dir) / "outbox")
        self.link = MqttLink(mqtt, f"edge-rt-dev-{dev}",
                             [self.topics.round(), self.topics.status(), self.topics.ack(dev),
                              f"{self.topics.base}/agg/sa/{dev}/#", self.topics.sa_unmask()],
                             will=(self.topics.presence(dev), Presence(dev, False).to_bytes(), True))
        self.pending: RoundAnnouncement | None = None  # a round we must train for
        self.download: tuple[str, Reassembler] | None = None
        self.inflight: dict[str, tuple[Manifest, bytes, float]] = {}  # tid -> (m, data, sent)
        self.sends: dict[str, int] = {}  # tid -> times sent (the re-send back-off)
        self.done_rounds: set[int] = set()
        self.latest_round = -1
        self.final_applied = False
        self.rounds_trained = 0
        self._seen_connects = 0
        self._stop = False
        # secure aggregation (`edge_runtime.secagg`) of the round in `sa_round`
        self.sa: Any = None  # secagg.protocol.DeviceSession
        self.sa_round = -1
        self.sa_inbox: bytes | None = None
        self.sa_masked = False

    # helpers -------------------------------------------------------------------------
    def _register(self) -> None:
        dev = self.cfg.device_id
        self.link.publish(self.topics.presence(dev), Presence(dev, True).to_bytes(), retain=True)
        reg = Register(dev, self.loaded.fingerprint, len(self.examples), self.cfg.profile,
                       self.cfg.device_class)
        self.link.publish(self.topics.register(dev), reg.to_bytes())

    def _want_download(self, tid: str) -> None:
        if self.download is not None and self.download[0] == tid:
            return
        if self.download is not None:
            self.link.unsubscribe(f"{self.topics.base}/agg/down/{self.download[0]}/#")
        self.download = (tid, Reassembler(max_bytes=1 << 30))
        self.link.subscribe(f"{self.topics.base}/agg/down/{tid}/#")

    def _send(self, m: Manifest, data: bytes) -> None:
        dev = self.cfg.device_id
        self.link.publish(self.topics.up_manifest(dev, m.transfer_id), m.to_bytes(), qos=1)
        rate = self.cfg.uplink_bytes_per_s
        for off, chunk in iter_chunks(data, m.chunk_size):
            self.link.publish(self.topics.up_chunk(dev, m.transfer_id, off), chunk, qos=1)
            if rate > 0:
                time.sleep(len(chunk) / rate)
        self.inflight[m.transfer_id] = (m, data, time.monotonic())
        self.sends[m.transfer_id] = self.sends.get(m.transfer_id, 0) + 1
        log.info("%s: sent update %s for round %d (%d bytes)", dev, m.transfer_id, m.round,
                 len(data))

    # message handling ------------------------------------------------------------------
    def _handle(self, msg: InboundMessage) -> None:
        try:
            pt = self.topics.parse(msg.topic)
        except ProtocolError:
            return
        if not msg.payload:  # a cleared retained message
            return
        try:
            if pt.kind == "status":
                if AggregatorStatus.from_bytes(msg.payload).online:
                    self._register()
            elif pt.kind == "round":
                self._on_round(RoundAnnouncement.from_bytes(msg.payload))
            elif pt.kind == "ack":
                self._on_ack(Ack.from_bytes(msg.payload))
            elif pt.kind in ("sa_down", "sa_unmask"):
                self._on_secagg(pt.transfer_id or "unmask", msg.payload)
            elif pt.kind in ("down_manifest", "down_chunk") and self.download is not None:
                tid, r = self.download
                if pt.transfer_id != tid:
                    return
                if pt.kind == "down_manifest":
                    r.set_manifest(Manifest.from_bytes(msg.payload))
                else:
                    r.add_chunk(int(pt.offset or 0), msg.payload)
        except (ProtocolError, TransferError) as e:
            log.warning("%s: bad message on %s: %s", self.cfg.device_id, msg.topic, e)
            if self.download is not None and pt.transfer_id == self.download[0]:
                self.download = None  # start the download over on the next announcement

    def _on_round(self, ann: RoundAnnouncement) -> None:
        dev = self.cfg.device_id
        if ann.fingerprint != self.loaded.fingerprint:
            log.error("%s: the fleet's base model %s is not ours (%s); not taking part", dev,
                      ann.fingerprint[:12], self.loaded.fingerprint[:12])
            return
        self.latest_round = max(self.latest_round, ann.round)
        for tid, (m, _, _) in list(self.inflight.items()):
            if m.round < ann.round:  # our update's round is over; it can no longer count
                self.inflight.pop(tid)
                self.sends.pop(tid, None)
                self.outbox.remove(tid)
        if dev not in ann.devices:
            return
        if ann.secagg is not None and not ann.finished and self.sa_round != ann.round:
            self._start_secagg(ann)
        if ann.finished or ann.round not in self.done_rounds:
            self.pending = ann
            self._want_download(ann.devices[dev].global_transfer_id)
            for m, data in self.outbox.pending():  # restarted with a finished update
                if m.round == ann.round and m.transfer_id not in self.inflight:
                    self._send(m, data)
                    self.pending = None
                    self.done_rounds.add(ann.round)

    # secure aggregation ----------------------------------------------------------------
    def _start_secagg(self, ann: RoundAnnouncement) -> None:
        """Join the round's SecAgg: advertise this device's keys (`secagg.protocol`)."""
        from edge_runtime.secagg.protocol import DeviceSession, SecAggError, SecAggParams

        self.sa_round, self.sa_inbox, self.sa_masked, self.sa = ann.round, None, False, None
        try:
            params = SecAggParams.from_json(ann.secagg or {})
            self.sa = DeviceSession(params, self.cfg.device_id)
        except SecAggError as e:
            log.error("%s: round %d announces secure aggregation this device cannot join "
                      "(%s)", self.cfg.device_id, ann.round, e)
            return
        self.link.publish(self.topics.sa_up(self.cfg.device_id, "advertise"),
                          self.sa.advertise(), qos=1)

    def _on_secagg(self, stage: str, payload: bytes) -> None:
        from edge_runtime.secagg.protocol import SecAggError

        if self.sa is None:
            return
        dev = self.cfg.device_id
        try:
            if stage == "roster":
                self.link.publish(self.topics.sa_up(dev, "share"), self.sa.share(payload), qos=1)
            elif stage == "inbox":
                self.sa_inbox = payload
            elif stage == "unmask" and self.sa_masked and not self.sa.answered_unmask:
                self.link.publish(self.topics.sa_up(dev, "unmask"), self.sa.unmask(payload),
                                  qos=1)
        except SecAggError as e:
            log.warning("%s: secure aggregation %s refused: %s", dev, stage, e)

    def _masked_payload(self, ann: RoundAnnouncement, task: RoundTask, res: LocalResult,
                        deadline: float) -> bytes | None:
        """This device's masked vector, once the server routed its neighbours' shares."""
        from edge_runtime.config import WeightCap, capped_weight
        from edge_runtime.fl.types import ClientUpdate
        from edge_runtime.secagg.layout import Layout

        sa = ann.secagg or {}
        layout = Layout.from_json(sa.get("layout"))
        n = capped_weight(WeightCap(sa.get("weight_cap", "plan")), res.n_samples,
                          len(self.examples), task.recipe)
        x = layout.device_vector(task.strategy, ann.round,
                                 ClientUpdate(self.cfg.device_id, res.adapter, n, task.plan))
        while self.sa_inbox is None and time.time() < deadline and not self._stop:
            msg = self.link.get(0.2)
            while msg is not None:
                self._handle(msg)
                msg = self.link.get(0)
        if self.sa is None or self.sa_inbox is None:
            log.warning("%s: round %d: the shares never came; no masked vector",
                        self.cfg.device_id, ann.round)
            return None
        payload: bytes = self.sa.mask(self.sa_inbox, x)
        self.sa_masked = True
        return payload

    def _on_ack(self, ack: Ack) -> None:
        if ack.transfer_id == "register" and ack.status == "rejected":
            log.error("%s: the aggregator refused this device: %s (%s)", self.cfg.device_id,
                      ack.reason, ack.detail)
            return
        if ack.transfer_id not in self.inflight:
            return
        self.inflight.pop(ack.transfer_id)
        self.sends.pop(ack.transfer_id, None)
        self.outbox.remove(ack.transfer_id)
        if ack.status == "accepted" or ack.reason == "duplicate":
            log.info("%s: round %d update accepted", self.cfg.device_id, ack.round)
        else:
            log.warning("%s: round %d update rejected: %s %s", self.cfg.device_id, ack.round,
                        ack.reason, ack.detail)

    # the work ----------------------------------------------------------------------------
    def _start_adapter(self) -> tuple[RoundAnnouncement, Adapter, int] | None:
        ann, dl = self.pending, self.download
        if ann is None or dl is None or not dl[1].complete:
            return None
        data = dl[1].result()
        adapter, meta = decode_adapter(data)
        if meta.get("fingerprint") != self.loaded.fingerprint:
            raise TransferError("bad_fingerprint", "global adapter is for another base model")
        return ann, adapter, len(data)

    def _train_round(self, ann: RoundAnnouncement, start: Adapter, download_bytes: int) -> None:
        dev = self.cfg.device_id
        try:
            task = RoundTask.from_announced(ann.round, ann.devices[dev].plan, ann.strategy,
                                            ann.devices[dev].train)
        except ConfigError as e:
            log.error("%s: round %d announces a config this device cannot use (%s); "
                      "skipping the round", dev, ann.round, e)
            self.done_rounds.add(ann.round)
            return
        self.last_task = task
        self.done_rounds.add(ann.round)
        if self.gate is not None and not self.gate.will_train(dev, ann.round, download_bytes,
                                                              task):
            return
        left = ann.deadline_unix - time.time()
        margin = min(10.0, 0.25 * max(left, 0.0))  # leave time to upload
        if left - margin <= 0.5:
            log.warning("%s: round %d deadline already passed; skipping", dev, ann.round)
            return
        with self.train_lock:
            res: LocalResult = run_local_round(
                self.loaded.model, self.loaded.tokenizer, self.examples, start, task,
                device_id=dev, fingerprint=self.loaded.fingerprint,
                compression=self.cfg.compression.value,
                deadline=time.monotonic() + left - margin, prefix_cache=self.prefix_cache)
        if self.gate is not None and not self.gate.will_send(dev, ann.round, len(res.payload)):
            return
        payload, kind = res.payload, "update"
        if ann.secagg is not None:  # the server gets a masked vector, never the update
            masked = self._masked_payload(ann, task, res, ann.deadline_unix)
            if masked is None:
                return
            payload, kind = masked, "masked"
        m = make_manifest(payload, kind=kind, round=ann.round, device_id=dev,
                          chunk_size=self.cfg.chunk_size, compression=self.cfg.compression.value,
                          meta={"n_samples": res.n_samples})
        self.outbox.put(m, payload)  # survives a restart from here on
        self.rounds_trained += 1
        log.info("%s: round %d trained %d steps in %.1fs (loss %s)", dev, ann.round, res.steps,
                 res.elapsed_s, res.train_loss)
        self._send(m, payload)

    def _apply_final(self, adapter: Adapter) -> None:
        with self.train_lock:
            remove_lora(self.loaded.model)
            set_adapter(self.loaded.model, adapter, create=True)
        self.final_applied = True
        if self.cfg.out is not None:
            save_final(Path(self.cfg.out), adapter, self.loaded.fingerprint, self.loaded.name)
        log.info("%s: applied the final global adapter", self.cfg.device_id)

    def stop(self) -> None:
        self._stop = True

    def run(self, timeout_s: float | None = None) -> int:
        """Serve rounds until the aggregator finishes (or `timeout_s`); returns rounds trained."""
        self.link.connect(self.cfg.connect_timeout_s)
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._stop and (end is None or time.monotonic() < end):
            if self.link.connects != self._seen_connects:
                self._seen_connects = self.link.connects
                self._register()
            msg = self.link.get(0.2)
            while msg is not None:
                self._handle(msg)
                msg = self.link.get(0)
            try:
                ready = self._start_adapter()
            except TransferError as e:
                log.warning("%s: download failed (%s); waiting for a re-announcement",
                            self.cfg.device_id, e)
                self.download = None
                ready = None
            if ready is not None:
                ann, start, nbytes = ready
                self.pending = None
                if ann.finished:
                    self._apply_final(start)
                    if self.cfg.exit_when_done:
                        break
                else:
                    self._train_round(ann, start, nbytes)
            now = time.monotonic()
            for m, data, sent in list(self.inflight.values()):
                if now - sent > resend_after(self.cfg.ack_timeout_s,
                                             self.sends.get(m.transfer_id, 1)):
                    log.info("%s: no ack for %s; re-sending", self.cfg.device_id, m.transfer_id)
                    self._send(m, data)
        self.link.close()
        return self.rounds_trained


def save_final(out: Path, adapter: Adapter, fingerprint: str, base_name: str) -> None:
    """Save an adapter as a PEFT folder (the core's adapter_io), or the wire format."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        from edge_runtime.adapter_io import save_adapter
    except ImportError:
        (out / "adapter.safetensors").write_bytes(
            encode_adapter(adapter, {"fingerprint": fingerprint, "base_name": base_name}))
        return
    save_adapter(out, adapter, fingerprint=fingerprint, base_name=base_name)
