"""The MQTT transport of the round engine's server side (`rounds.server.AggregatorService`).

One worker loop takes messages from the link's bounded queue, reassembles uploads,
hands complete ones to the service, acks every outcome, and publishes rounds:
downloads first (retained manifest + chunks), then the retained announcement. After a
reconnect (e.g. a broker restart that lost retained messages) it republishes the status
and the open round. Old rounds' retained downloads are cleared (empty retained publish).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from edge_runtime.config import MqttConfig
from edge_runtime.fleet.mqtt_client import InboundMessage, MqttLink
from edge_runtime.fleet.protocol import (
    Ack,
    AggregatorStatus,
    Manifest,
    ParsedTopic,
    Presence,
    ProtocolError,
    Register,
    Topics,
)
from edge_runtime.fleet.transfer import TransferError, TransferTable, iter_chunks
from edge_runtime.rounds.server import AggregatorService, RoundOpen, RoundRecord, Verdict

if TYPE_CHECKING:
    from edge_runtime.rounds.secure import Outbound

__all__ = ["AggregatorNode", "publish_transfer"]

log = logging.getLogger(__name__)


def publish_transfer(link: MqttLink, manifest_topic: str, chunk_topic: Callable[[int], str],
                     manifest: Manifest, data: bytes, *, retain: bool = False) -> int:
    """Publish a manifest then its chunks at QoS 1; returns the bytes put on the wire
    (payloads + topic names)."""
    sent = len(manifest_topic) + len(mb := manifest.to_bytes())
    link.publish(manifest_topic, mb, qos=1, retain=retain)
    for off, chunk in iter_chunks(data, manifest.chunk_size):
        topic = chunk_topic(off)
        link.publish(topic, chunk, qos=1, retain=retain)
        sent += len(topic) + len(chunk)
    return sent


@dataclass
class AggregatorNode:
    """Runs rounds until the service is finished.

    Args:
        service: the round state machine (already resumed if its state dir had state).
        mqtt: broker settings.
        on_round: called with each merged round's record (progress output).
        final_out: called with the final global adapter once all rounds are merged.
    """

    service: AggregatorService
    mqtt: MqttConfig
    on_round: Callable[[RoundRecord], None] | None = None
    wait_for_clients_s: float = 120.0
    start_clients: int = 0  # devices to wait for before round 0 (0: the quorum, min_clients)
    threads: int = 1  # torch threads in the worker (per-update ops are small; see run())
    linger_s: float = 5.0
    # a simulated fleet decides when a round is complete and how long it took
    ready: Callable[[AggregatorService], bool] | None = None
    duration: Callable[[], float] | None = None
    # hierarchical aggregation: also publish the whole global for site aggregators
    sites: bool = False
    topics: Topics = field(init=False)
    link: MqttLink = field(init=False)

    def __post_init__(self) -> None:
        self.topics = Topics(self.mqtt.prefix, self.mqtt.fleet)
        self.link = MqttLink(self.mqtt, f"edge-rt-aggregator-{self.mqtt.fleet}",
                             self.topics.aggregator_subscriptions(),
                             will=(self.topics.status(), AggregatorStatus(False).to_bytes(), True))
        self.transfers = TransferTable(max_bytes=self.service.cfg.max_update_bytes)
        self.site_transfers = TransferTable(max_bytes=64 * self.service.cfg.max_update_bytes,
                                            max_open=64)
        self._site_global: tuple[str, list[int]] | None = None  # retained (tid, offsets)
        self._verdicts: dict[tuple[str, str], Ack] = {}
        self._published: set[str] = set()  # retained download topics of the open round
        self._offsets: dict[str, list[int]] = {}  # chunk offsets of each published download
        self._seen_connects = 0
        self._stop = False

    # publishing -------------------------------------------------------------------
    def _publish_status(self, finished: bool = False) -> None:
        st = AggregatorStatus(True, self.service.round, finished)
        self.link.publish(self.topics.status(), st.to_bytes(), retain=True)

    def _publish_round(self, opened: RoundOpen) -> None:
        for tid, (manifest, data) in opened.downloads.items():
            publish_transfer(self.link, self.topics.down_manifest(tid),
                             lambda off, t=tid: self.topics.down_chunk(t, off),  # type: ignore[misc]
                             manifest, data, retain=True)
            self._published.add(tid)
        if self.sites and not opened.announcement.finished:
            self._publish_site_global()
        self.link.publish(self.topics.round(), opened.announcement.to_bytes(), retain=True)

    def _publish_site_global(self) -> None:
        """The open round's whole global adapter for site aggregators (retained; the
        previous round's is cleared)."""
        m, data = self.service.global_download()
        old = self._site_global
        if old is not None and old[0] != m.transfer_id:
            self.link.publish(self.topics.site_global_manifest(old[0]), b"", retain=True)
            for off in old[1]:
                self.link.publish(self.topics.site_global_chunk(old[0], off), b"", retain=True)
        publish_transfer(self.link, self.topics.site_global_manifest(m.transfer_id),
                         lambda off: self.topics.site_global_chunk(m.transfer_id, off),
                         m, data, retain=True)
        self._site_global = (m.transfer_id, [o for o, _ in iter_chunks(data, m.chunk_size)])

    def _clear_downloads(self, keep: set[str]) -> None:
        for tid in list(self._published - keep):
            self.link.publish(self.topics.down_manifest(tid), b"", retain=True)
            for off in self._offsets.pop(tid, []):
                self.link.publish(self.topics.down_chunk(tid, off), b"", retain=True)
            self._published.discard(tid)

    def _remember_offsets(self, opened: RoundOpen) -> None:
        for tid, (m, data) in opened.downloads.items():
            self._offsets[tid] = [o for o, _ in iter_chunks(data, m.chunk_size)]

    def _ack(self, dev: str, manifest: Manifest, verdict: Verdict,
             topic: Callable[[str], str]) -> None:
        ack = Ack(dev, manifest.round, manifest.transfer_id,
                  "accepted" if verdict.accepted else "rejected", verdict.reason, verdict.detail)
        self._verdicts[(dev, manifest.transfer_id)] = ack
        while len(self._verdicts) > 100_000:  # bounded; oldest answers go first
            del self._verdicts[next(iter(self._verdicts))]
        self.link.publish(topic(dev), ack.to_bytes(), qos=1)

    # inbound ----------------------------------------------------------------------
    def _handle(self, msg: InboundMessage) -> None:
        svc = self.service
        try:
            pt = self.topics.parse(msg.topic)
        except ProtocolError as e:
            log.debug("ignoring message: %s", e)
            return
        dev = pt.device_id or ""
        if pt.kind == "register":
            try:
                reg = Register.from_bytes(msg.payload)
            except ProtocolError as e:
                log.warning("bad register from %s: %s", dev, e)
                return
            if reg.device_id != dev:  # the topic id is the one the broker ACL vouches for
                log.warning("register on %s names %s; ignored", msg.topic, reg.device_id)
                return
            refusal = svc.register(reg)
            log.info("device %s registered (%s)%s", dev, reg.device_class or "no class",
                     f": refused, {refusal}" if refusal else "")
            if refusal:  # tell the device why it will never be selected
                ack = Ack(dev, svc.round, "register", "rejected", refusal,
                          f"device base {reg.fingerprint[:16]}, fleet base {svc.fingerprint[:16]}")
                self.link.publish(self.topics.ack(dev), ack.to_bytes(), qos=1)
            return
        if pt.kind == "presence":
            try:
                svc.set_online(dev, Presence.from_bytes(msg.payload).online)
            except ProtocolError:
                pass
            return
        if pt.kind == "sa_up":
            self._publish_secure(svc.secagg_message(dev, pt.transfer_id or "", msg.payload))
        elif pt.kind in ("up_manifest", "up_chunk") and svc.secure_active:
            self._upload(pt, msg, "masked", self.transfers, svc.accept_masked, self.topics.ack)
        elif pt.kind in ("up_manifest", "up_chunk"):
            self._upload(pt, msg, "update", self.transfers, svc.accept_update, self.topics.ack)
        elif pt.kind in ("partial_manifest", "partial_chunk"):
            self._upload(pt, msg, "partial", self.site_transfers, svc.accept_partial,
                         self.topics.site_ack)

    def _publish_secure(self, out: list[Outbound]) -> None:
        """SecAgg stage messages: a device's roster or inbox, or the unmask request."""
        for o in out:
            topic = (self.topics.sa_unmask() if o.device is None
                     else self.topics.sa_down(o.device, o.stage))
            self.link.publish(topic, o.payload, qos=1)

    def _upload(self, pt: ParsedTopic, msg: InboundMessage, kind: str, table: TransferTable,
                accept: Callable[[str, Manifest, bytes], Verdict],
                ack_topic: Callable[[str], str]) -> None:
        """One message of an upload (a device's update or a site's partial sum):
        reassemble, hand the complete bytes to `accept`, answer on `ack_topic(sender)`."""
        svc = self.service
        dev, tid = pt.device_id or "", pt.transfer_id or ""
        done = self._verdicts.get((dev, tid))
        if done is not None:
            # a re-send of a finished transfer (lost ack, restarted agent): repeat the answer,
            # never process it twice
            if pt.kind.endswith("_manifest"):
                self.link.publish(ack_topic(dev), done.to_bytes(), qos=1)
            return
        r = table.get(dev, tid)
        if r is None:
            return
        try:
            if pt.kind.endswith("_manifest"):
                m = Manifest.from_bytes(msg.payload)
                if m.transfer_id != tid or m.kind != kind:
                    raise TransferError("bad_manifest", "manifest does not match its topic")
                r.set_manifest(m)
                if m.round != svc.round or svc.open is None:  # stale: refuse before the bytes
                    table.finish(dev, tid)
                    self._ack(dev, m, accept(dev, m, b""), ack_topic)
                    return
            else:
                r.add_chunk(int(pt.offset or 0), msg.payload)
                for d, t in table.enforce_budget():
                    log.warning("dropped the open upload %s of %s: memory budget", t, d)
            if r.complete:
                assert r.manifest is not None
                m = r.manifest
                table.finish(dev, tid)
                data = r.result()
                self._ack(dev, m, accept(dev, m, data), ack_topic)
        except (TransferError, ProtocolError) as e:
            reason = e.reason if isinstance(e, TransferError) else "bad_manifest"
            table.finish(dev, tid)
            verdict = svc.count_rejection(dev, reason, str(e))
            m = r.manifest or Manifest(tid, kind, 0, "0" * 64, 1, svc.round, dev)
            self._ack(dev, m, verdict, ack_topic)

    # main loop -------------------------------------------------------------------
    def stop(self) -> None:
        self._stop = True

    def run(self) -> int:
        """Run until all rounds are merged (or stop()); returns the number merged."""
        svc = self.service
        # OpenMP thread counts are per calling thread; set ours here, where the merging runs.
        # Per-update work is tiny matrix products: more threads only spin on a busy CPU.
        torch.set_num_threads(self.threads)
        self.link.connect()
        self._seen_connects = self.link.connects
        self._publish_status()
        merged = 0
        t_wait = time.monotonic() + self.wait_for_clients_s
        while not self._stop and not svc.finished:
            if self.link.connects != self._seen_connects:  # reconnected: retained may be gone
                self._seen_connects = self.link.connects
                self._publish_status()
                if svc.open is not None:
                    self._publish_round(svc.current())
            if svc.open is None:
                n_ready = len([d for d in svc.online if d in svc.devices])
                want = self.start_clients or svc.cfg.min_clients
                if n_ready < want and time.monotonic() < t_wait:
                    self._drain(0.2)
                    continue
                opened = svc.plan_round()
                self._remember_offsets(opened)
                self._clear_downloads(set(opened.downloads))
                self._publish_round(opened)
            elif not self._published:  # resumed with an open round: publish it again
                opened = svc.current()
                self._remember_offsets(opened)
                self._publish_round(opened)
            self._drain(0.2)
            if svc.secure_active:
                self._publish_secure(svc.secagg_tick())
            if (self.ready is not None and self.ready(svc)) or svc.ready_to_close():
                rec = svc.close_round(self.duration() if self.duration is not None else None)
                if rec is None:  # extended below quorum: re-announce with the new deadline
                    opened = svc.current()
                    self._remember_offsets(opened)
                    self._publish_round(opened)
                    continue
                merged += 1
                if self.on_round is not None:
                    self.on_round(rec)
        if svc.finished and not self._stop:
            self._publish_final()
        self.link.close()
        return merged

    def _drain(self, timeout: float) -> None:
        msg = self.link.get(timeout)
        while msg is not None:
            self._handle(msg)
            msg = self.link.get(0)

    def _publish_final(self) -> None:
        """Announce `finished` with each registered device's share of the final global."""
        opened = self.service.final_round()
        self._remember_offsets(opened)
        self._clear_downloads(set(opened.downloads))
        self._publish_round(opened)
        self._publish_status(finished=True)
        # let devices fetch the final adapter before we go
        end = time.monotonic() + self.linger_s
        while time.monotonic() < end:
            self._drain(0.2)
