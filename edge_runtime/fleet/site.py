"""The MQTT transport of a site aggregator (`rounds.site.SiteService`).

It connects to its site's broker, which a Mosquitto bridge joins to the root broker
(deploy/mosquitto/site.conf): the root's round announcement and whole global adapter
come down the bridge, the site's devices' registrations and presence go up it, their
updates stay on the site broker and end here. Each partial sum goes up as a transfer on
`site/{site}/up/...` and is re-sent (same bytes, same transfer id) until the root acks
it; the root refuses any partial naming a device it already has, so nothing is merged
twice, whatever is re-sent.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.config import FleetConfig, MqttConfig
from edge_runtime.fleet.codec import decode_adapter
from edge_runtime.fleet.mqtt_client import InboundMessage, MqttLink
from edge_runtime.fleet.protocol import (
    Ack,
    Manifest,
    Presence,
    ProtocolError,
    Register,
    RoundAnnouncement,
    Topics,
)
from edge_runtime.fleet.server import publish_transfer
from edge_runtime.fleet.transfer import TransferError, TransferTable, make_manifest
from edge_runtime.rounds.server import Verdict
from edge_runtime.rounds.site import SiteService

__all__ = ["SiteNode"]

log = logging.getLogger(__name__)


@dataclass
class SiteNode:
    """Follows the root's rounds until it announces `finished` (or `stop()`).

    Args:
        service: the site's round state.
        mqtt: the site broker.
        margin_s: a partial goes up this long before the root's deadline at the latest.
        resend_s: an unacked partial is published again after this long.
        flush_s: what the site holds goes up after this long without a new update (a
            device that will not deliver does not hold its site's others until the
            deadline; the root merges any number of partials per site and round).
    """

    service: SiteService
    mqtt: MqttConfig
    margin_s: float = 5.0
    resend_s: float = 10.0
    flush_s: float = 2.0
    topics: Topics = field(init=False)
    link: MqttLink = field(init=False)

    def __post_init__(self) -> None:
        self.topics = Topics(self.mqtt.prefix, self.mqtt.fleet)
        site = self.service.site_id
        self.link = MqttLink(self.mqtt, f"edge-rt-site-{site}",
                             self.topics.site_subscriptions(site))
        self.transfers = TransferTable(max_bytes=self.service.cfg.max_update_bytes)
        self.globals: dict[int, bytes] = {}  # round -> whole global bytes (complete)
        self._global_parts = TransferTable(max_bytes=self.service.cfg.max_update_bytes,
                                           max_open=8)
        self.ann: RoundAnnouncement | None = None
        self.outbox: dict[str, tuple[Manifest, bytes, float]] = {}  # tid -> (m, data, sent at)
        self.partials_sent = 0
        self._last_accept = 0.0
        self.finished = False
        self._stop = False

    @property
    def fleet(self) -> FleetConfig:
        return self.service.cfg

    def stop(self) -> None:
        self._stop = True

    # inbound -----------------------------------------------------------------------
    def _handle(self, msg: InboundMessage) -> None:
        try:
            pt = self.topics.parse(msg.topic)
        except ProtocolError as e:
            log.debug("ignoring message: %s", e)
            return
        svc = self.service
        dev = pt.device_id or ""
        try:
            if pt.kind == "round" and msg.payload:
                self.ann = RoundAnnouncement.from_bytes(msg.payload)
                self.finished = self.ann.finished
                self._follow()
            elif pt.kind in ("site_global_manifest", "site_global_chunk") and msg.payload:
                self._global_message(pt.kind, pt.transfer_id or "", pt.offset, msg.payload)
            elif pt.kind == "register":
                reg = Register.from_bytes(msg.payload)
                if reg.device_id == dev:
                    svc.note_device(dev, reg.n_samples)
            elif pt.kind == "presence" and msg.payload:
                if Presence.from_bytes(msg.payload).online:
                    svc.note_device(dev)
            elif pt.kind == "site_ack" and dev == svc.site_id:
                ack = Ack.from_bytes(msg.payload)
                svc.answered(ack.transfer_id)
                if self.outbox.pop(ack.transfer_id, None) is not None:
                    log.info("root %s the partial %s of round %d%s", ack.status,
                             ack.transfer_id, ack.round,
                             f" ({ack.reason}: {ack.detail})" if ack.reason else "")
            elif pt.kind in ("up_manifest", "up_chunk"):
                self._update_message(pt.kind, dev, pt.transfer_id or "", pt.offset, msg.payload)
        except ProtocolError as e:
            log.warning("bad message on %s: %s", msg.topic, e)

    def _global_message(self, kind: str, tid: str, offset: int | None, payload: bytes) -> None:
        r = self._global_parts.get("root", tid)
        if r is None:
            return
        try:
            if kind == "site_global_manifest":
                r.set_manifest(Manifest.from_bytes(payload))
            else:
                r.add_chunk(int(offset or 0), payload)
            if r.complete and r.manifest is not None:
                self._global_parts.finish("root", tid)
                self.globals = {r.manifest.round: r.result()}
                self._follow()
        except TransferError as e:
            self._global_parts.finish("root", tid)
            log.warning("the root's global %s did not reassemble: %s", tid, e)

    def _follow(self) -> None:
        """Open the announced round once its whole global is here."""
        ann = self.ann
        if ann is None or ann.finished or ann.round not in self.globals:
            return
        if self.service.round == ann.round and self.service.ann is not None \
                and self.service.ann.deadline_unix == ann.deadline_unix:
            return
        adapter, _ = decode_adapter(self.globals[ann.round])
        self.service.open_round(ann, adapter)
        for tid, data in self.service.unacked().items():  # after a restart: send again
            if tid not in self.outbox:
                self.outbox[tid] = (self._manifest(tid, data), data, 0.0)
        log.info("site %s follows round %d (%d devices selected fleet-wide)",
                 self.service.site_id, ann.round, len(ann.devices))

    def _update_message(self, kind: str, dev: str, tid: str, offset: int | None,
                        payload: bytes) -> None:
        r = self.transfers.get(dev, tid)
        if r is None:
            return
        try:
            if kind == "up_manifest":
                m = Manifest.from_bytes(payload)
                if m.transfer_id != tid or m.kind != "update":
                    raise TransferError("bad_manifest", "manifest does not match its topic")
                r.set_manifest(m)
            else:
                r.add_chunk(int(offset or 0), payload)
            if r.complete and r.manifest is not None:
                self.transfers.finish(dev, tid)
                verdict = self.service.accept_update(dev, r.manifest, r.result())
                if verdict.accepted:
                    self._last_accept = time.monotonic()
                self._ack(dev, r.manifest, verdict)
        except (TransferError, ProtocolError) as e:
            self.transfers.finish(dev, tid)
            reason = e.reason if isinstance(e, TransferError) else "bad_manifest"
            m = r.manifest or Manifest(tid, "update", 0, "0" * 64, 1, 0, dev)
            self._ack(dev, m, Verdict(False, reason, str(e)))

    def _ack(self, dev: str, m: Manifest, v: Verdict) -> None:
        ack = Ack(dev, m.round, m.transfer_id, "accepted" if v.accepted else "rejected",
                  v.reason, v.detail)
        self.link.publish(self.topics.ack(dev), ack.to_bytes(), qos=1)

    # outbound ----------------------------------------------------------------------
    def _maybe_send(self) -> None:
        svc = self.service
        if svc.ann is None or not svc.pending:
            return
        due = (time.time() >= svc.ann.deadline_unix - self.margin_s
               or time.monotonic() - self._last_accept >= self.flush_s)
        if svc.waiting_for() and not due:
            return
        taken = svc.take_partial()
        if taken is None:
            return
        tid, data = taken
        self.outbox[tid] = (self._manifest(tid, data), data, 0.0)
        self.partials_sent += 1

    def _manifest(self, tid: str, data: bytes) -> Manifest:
        assert self.service.ann is not None
        return make_manifest(data, kind="partial", round=self.service.ann.round,
                             device_id=self.service.site_id, chunk_size=self.fleet.chunk_size,
                             transfer_id=tid)

    def _flush(self) -> None:
        now = time.monotonic()
        site = self.service.site_id
        for tid, (m, data, at) in list(self.outbox.items()):
            if at and now - at < self.resend_s:
                continue
            publish_transfer(self.link, self.topics.partial_manifest(site, tid),
                             lambda off, t=tid: self.topics.partial_chunk(site, t, off),  # type: ignore[misc]
                             m, data)
            self.outbox[tid] = (m, data, now)

    def run(self, timeout_s: float = 3600.0) -> int:
        """Serve until the root announces `finished` and every partial is acked; returns
        the number of partials sent."""
        self.link.connect()
        end = time.monotonic() + timeout_s
        try:
            while not self._stop and time.monotonic() < end:
                msg = self.link.get(0.2)
                while msg is not None:
                    self._handle(msg)
                    msg = self.link.get(0)
                self._maybe_send()
                self._flush()
                if self.finished and not self.outbox:
                    break
        finally:
            self.link.close()
        return self.partials_sent


def site_state_dir(base: Path, site_id: str) -> Path:
    """Default state folder of a site aggregator."""
    return base / f"site-{site_id}"
