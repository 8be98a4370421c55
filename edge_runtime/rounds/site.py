"""A site's share of a round (hierarchical aggregation), whatever the transport.

A site aggregator sits beside a site broker that is bridged to the root's. It follows
the root's rounds (the announcement and the whole global adapter come down the bridge),
checks each of its devices' updates exactly as the root would (`fleet.validation`, the
weight cap), folds them into the round strategy's accumulator and hands the root one
`PartialSum` (`fl.types`) instead of the updates: the root merges partials as it folds
updates, so its global equals flat aggregation over the same updates.

State, so that a restart merges nothing twice (`STATE/r{k}/`):

    {dev}.bin      an accepted update, written before the device is acked
    sent.json      the devices already forwarded in a partial (the root refuses a
                   partial naming a device it already has, so a re-send is harmless)
    out/{tid}.part a partial not yet answered by the root (re-sent until it is)

A partial holds the updates accepted since the last one the site sent; a site sends
when all of its selected devices answered or the root's deadline is near.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from edge_runtime.adapter import Adapter
from edge_runtime.config import FleetConfig, StrategyConfig, TrainConfig, capped_weight, from_dict
from edge_runtime.files import atomic_write
from edge_runtime.fl.registry import make_strategy
from edge_runtime.fl.types import Accumulator, ClientPlan, ClientUpdate
from edge_runtime.fl.types import UpdateMismatchError as StrategyRefused
from edge_runtime.fleet.codec import decode_adapter, encode_adapter, encode_partial
from edge_runtime.fleet.protocol import Manifest, ProtocolError, RoundAnnouncement, check_id
from edge_runtime.fleet.transfer import TransferError
from edge_runtime.fleet.validation import decode_checked
from edge_runtime.rounds.server import Verdict

__all__ = ["SiteService"]

log = logging.getLogger(__name__)


class SiteService:
    """Round state of one site aggregator (see module docstring).

    Args:
        site_id: the site's id (topics and the root's journal name it).
        fleet: the fleet's limits (max_update_bytes, max_update_norm, weight_cap); the
            root's values, so that a site accepts what the root would.
        fingerprint: the base model fingerprint of the fleet; None: the root's (from its
            announcements), so a site aggregator needs no model.
        state_dir: where accepted updates and sent marks are kept (created).
    """

    def __init__(self, site_id: str, fleet: FleetConfig, fingerprint: str | None,
                 state_dir: Path) -> None:
        self.site_id = check_id(site_id, "site id")
        self.cfg = fleet
        self.fingerprint = fingerprint
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.registered: dict[str, int] = {}  # device -> n_samples it registered here
        self.local: set[str] = set()  # devices seen on this site's broker
        self.rejected: Counter[str] = Counter()
        self.ann: RoundAnnouncement | None = None
        self.global_adapter: Adapter | None = None
        self._acc: Accumulator | None = None
        self._pending: dict[str, int] = {}  # accepted, not yet sent: device -> n
        self._sent: set[str] = set()

    @property
    def round(self) -> int | None:
        return None if self.ann is None else self.ann.round

    def _dir(self) -> Path:
        assert self.ann is not None
        return self.state_dir / f"r{self.ann.round}"

    def note_device(self, device_id: str, n_samples: int | None = None) -> None:
        """A device spoke on this site's broker (register: with its sample count)."""
        self.local.add(device_id)
        if n_samples is not None:
            self.registered[device_id] = n_samples

    def open_round(self, ann: RoundAnnouncement, global_adapter: Adapter) -> None:
        """Follow the root's round `ann.round` (its whole global adapter); resumes the
        round's accepted updates from the state directory."""
        if self.fingerprint is None:
            self.fingerprint = ann.fingerprint
        if ann.fingerprint != self.fingerprint:
            raise ProtocolError(f"the root's round is for base {ann.fingerprint[:16]}, this "
                                f"site's is {self.fingerprint[:16]}; start the site with the "
                                "fleet's model")
        same = self.ann is not None and self.ann.round == ann.round
        self.ann = ann
        if same:  # a re-announcement (deadline extension): keep the round's state
            return
        self.global_adapter = global_adapter
        self._acc = make_strategy(StrategyConfig.from_json(ann.strategy)).accumulator(
            global_adapter, ann.round)
        self._pending, self._sent = {}, set()
        d = self._dir()
        if (d / "sent.json").exists():
            self._sent = set(json.loads((d / "sent.json").read_text()))
        for f in sorted(d.glob("*.bin")) if d.is_dir() else []:
            if f.stem in self._sent or f.stem not in ann.devices:
                continue
            adapter, meta = decode_adapter(f.read_bytes())
            self._fold(f.stem, adapter, int(meta["n_samples"]))
        for old in self.state_dir.glob("r*"):
            if old.is_dir() and old.name != d.name:
                shutil.rmtree(old, ignore_errors=True)

    def _reject(self, dev: str, reason: str, detail: str) -> Verdict:
        self.rejected[reason] += 1
        log.warning("site %s rejected the update of %s: %s %s", self.site_id, dev, reason,
                    detail)
        return Verdict(False, reason, detail)

    def _fold(self, dev: str, adapter: Adapter, n: int) -> None:
        assert self._acc is not None and self.ann is not None
        plan = ClientPlan.from_json(self.ann.devices[dev].plan)
        self._acc.add(ClientUpdate(dev, adapter, n, plan=plan))
        self._pending[dev] = n

    def accept_update(self, dev: str, manifest: Manifest, payload: bytes) -> Verdict:
        """Validate one complete update of this site's device and fold it in."""
        try:
            check_id(dev, "update")
        except ProtocolError as e:
            return self._reject(dev, "bad_manifest", str(e))
        ann, g, fp = self.ann, self.global_adapter, self.fingerprint
        if (ann is None or g is None or fp is None or manifest.round != ann.round
                or ann.finished):
            return self._reject(dev, "stale_round", f"update for round {manifest.round}, the "
                                f"site follows round {self.round}")
        dp = ann.devices.get(dev)
        if dp is None:
            return self._reject(dev, "not_selected", f"{dev} is not selected for round "
                                f"{ann.round}")
        if dev in self._pending or dev in self._sent:
            return self._reject(dev, "duplicate", f"{dev} already has an update in round "
                                f"{ann.round}")
        if len(payload) > self.cfg.max_update_bytes:
            return self._reject(dev, "oversize", f"{len(payload)} bytes")
        plan = ClientPlan.from_json(dp.plan)
        try:
            adapter, claimed = decode_checked(payload, manifest, round=ann.round, plan=plan,
                                              global_adapter=g, fingerprint=fp,
                                              max_norm=self.cfg.max_update_norm)
        except TransferError as e:
            return self._reject(dev, e.reason, e.detail)
        recipe = from_dict(TrainConfig, dp.train, "train") if dp.train else TrainConfig()
        n = capped_weight(self.cfg.weight_cap, claimed, self.registered.get(dev), recipe)
        self._dir().mkdir(parents=True, exist_ok=True)
        path = self._dir() / f"{dev}.bin"
        atomic_write(path, encode_adapter(adapter, {"n_samples": n, "claimed": claimed,
                                                    "round": ann.round}))
        try:
            self._fold(dev, adapter, n)
        except StrategyRefused as e:
            path.unlink(missing_ok=True)
            return self._reject(dev, "bad_shape", f"strategy refused it: {e}")
        self.local.add(dev)
        return Verdict(True)

    def waiting_for(self) -> set[str]:
        """This site's selected devices that have not delivered yet."""
        if self.ann is None:
            return set()
        mine = set(self.ann.devices) & self.local
        return mine - set(self._pending) - self._sent

    @property
    def pending(self) -> dict[str, int]:
        return dict(self._pending)

    def take_partial(self) -> tuple[str, bytes] | None:
        """(transfer id, bytes) of the partial sum of the updates accepted since the last
        one (None: nothing new). It is kept in the outbox (`unacked`) and its devices are
        marked sent, both persisted, before it is returned; the accumulator starts afresh."""
        if not self._pending or self._acc is None or self.ann is None:
            return None
        meta: dict[str, Any] = {"round": self.ann.round, "site": self.site_id,
                                "devices": dict(sorted(self._pending.items()))}
        data = encode_partial(self._acc.partial(), meta)
        out = self._dir() / "out"
        out.mkdir(parents=True, exist_ok=True)
        tid = f"r{self.ann.round}-{len(self._sent)}-{hashlib.sha256(data).hexdigest()[:12]}"
        atomic_write(out / f"{tid}.part", data)
        self._sent |= set(self._pending)
        atomic_write(self._dir() / "sent.json", json.dumps(sorted(self._sent)).encode())
        assert self.global_adapter is not None
        self._acc = make_strategy(StrategyConfig.from_json(self.ann.strategy)).accumulator(
            self.global_adapter, self.ann.round)
        self._pending = {}
        return tid, data

    def unacked(self) -> dict[str, bytes]:
        """The open round's partials the root has not answered yet (transfer id -> bytes)."""
        out = self._dir() / "out" if self.ann is not None else None
        if out is None or not out.is_dir():
            return {}
        return {f.stem: f.read_bytes() for f in sorted(out.glob("*.part"))}

    def answered(self, tid: str) -> None:
        """The root answered partial `tid` (merged, or refused: either way it is done)."""
        if self.ann is not None:
            (self._dir() / "out" / f"{tid}.part").unlink(missing_ok=True)
