"""The aggregator as a service with few verbs: `plan_round`, `accept_update`, `close_round`.

No MQTT here (the network side is `server.py`); this class holds the round state, checks
every update (`validation.py`), folds accepted ones into the strategy's running
accumulator (memory of one adapter, not one per device) and persists itself atomically
so that a `kill -9` at any point resumes with nothing merged twice:

    STATE/state.json                 round index, open round (plans, deadline), registry,
                                     counters, metrics; replaced atomically (tmp + rename)
    STATE/global_r{k}.safetensors    the global adapter after k merged rounds
    STATE/journal/r{k}/{dev}.bin     accepted update bytes of the open round k, written
                                     (atomically) *before* the device is acked

An update is "in" exactly when its journal file exists. On resume the accumulator is
rebuilt by re-folding the journal, a device re-sending gets "duplicate", and the round
commits by writing global_r{k+1} and then state.json (the commit point) before the
journal of round k is deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edge_runtime.adapter import Adapter, LoRAWeights
from edge_runtime.config import FleetConfig
from edge_runtime.fl.types import Accumulator, ClientPlan, ClientUpdate, Strategy
from edge_runtime.fleet.codec import decode_adapter, encode_adapter
from edge_runtime.fleet.planning import GlobalShape, plan_for_device
from edge_runtime.fleet.protocol import (
    DevicePlan,
    Manifest,
    ProtocolError,
    Register,
    RoundAnnouncement,
    check_id,
)
from edge_runtime.fleet.transfer import TransferError, make_manifest
from edge_runtime.fleet.validation import UpdateRejected, validate_update
from edge_runtime.lora import seeded_lora_a
from edge_runtime.profiler.profile_io import DeviceProfile

__all__ = ["AggregatorService", "Verdict", "RoundOpen", "RoundRecord", "atomic_write",
           "initial_global"]

log = logging.getLogger(__name__)
STATE_VERSION = 1
MAX_EXTENSIONS = 3


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a crash leaves either the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def initial_global(shape: GlobalShape, shapes: dict[str, tuple[int, int]], seed: int) -> Adapter:
    """Round-0 global adapter: seeded lora_a (identical on every device), lora_b = 0."""
    out: Adapter = {}
    for name in shape.modules():
        d_out, d_in = shapes[name]
        out[name] = LoRAWeights(seeded_lora_a(seed, name, shape.r_max, d_in),
                                torch.zeros(d_out, shape.r_max), shape.alpha)
    return out


@dataclass
class Verdict:
    accepted: bool
    reason: str = ""
    detail: str = ""


@dataclass
class RoundOpen:
    """What the network side publishes for the open round."""

    announcement: RoundAnnouncement
    downloads: dict[str, tuple[Manifest, bytes]]  # transfer id -> (manifest, bytes)


@dataclass
class RoundRecord:
    """One merged round, in the simulator's metrics schema (plus counters)."""

    round: int
    eval_loss: float | None
    bytes_up: int
    bytes_down: int
    sim_time_s: float
    participants: int
    stragglers: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class AggregatorService:
    """Round state machine of the federated aggregator (see module docstring).

    Args:
        cfg: fleet settings (strategy name, rounds, quorum, deadline, limits).
        strategy: the strategy object (`edge_runtime.fl.make_strategy(cfg.strategy)`).
        shape: extent of the global adapter (layers, targets, r_max, alpha).
        shapes: {module: (d_out, d_in)} of the base model's candidate layers.
        fingerprint: the base model fingerprint devices must have trained on.
        state_dir: where state is persisted (created; resumed if it holds a state).
        train: trainer settings sent to devices with each plan (steps, lr, ...).
        evaluator: optional global adapter -> eval loss, called after each merge.
        profiles_dir: declared device-class profiles (`profiles/`), for devices that have
            not measured themselves.
        reference: a profile measured with `edge-rt profile` for this model, to plan
            declared classes with the profiler's cost model (see planning.py).
        clock: wall clock (seconds since the epoch); replaced in tests.
    """

    def __init__(self, cfg: FleetConfig, strategy: Strategy, shape: GlobalShape,
                 shapes: dict[str, tuple[int, int]], fingerprint: str, state_dir: Path, *,
                 seed: int = 0, train: dict[str, Any] | None = None,
                 evaluator: Callable[[Adapter], float] | None = None,
                 profiles_dir: Path | None = None, reference: DeviceProfile | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.shape = shape
        self.shapes = dict(shapes)
        self.fingerprint = fingerprint
        self.state_dir = Path(state_dir)
        self.seed = seed
        self.train = dict(train or {})
        self.evaluator = evaluator
        self.profiles_dir = profiles_dir
        self.reference = reference
        self.clock = clock
        self.devices: dict[str, dict[str, Any]] = {}
        self.online: set[str] = set()
        self.rejected: Counter[str] = Counter()
        self.round = 0
        self.metrics: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the open round's persisted description
        self.accepted: dict[str, int] = {}  # device -> n_samples, open round
        self.global_adapter: Adapter = {}
        self._acc: Accumulator | None = None
        self._round_rejected: Counter[str] = Counter()
        self._round_bytes = [0, 0]  # up, down
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if (self.state_dir / "state.json").exists():
            self._resume()
        else:
            self.global_adapter = initial_global(shape, self.shapes, seed)
            atomic_write(self._global_path(0), encode_adapter(self.global_adapter))
            self._save_state()

    # persistence -----------------------------------------------------------------
    def _global_path(self, k: int) -> Path:
        return self.state_dir / f"global_r{k}.safetensors"

    def _journal_dir(self, k: int) -> Path:
        return self.state_dir / "journal" / f"r{k}"

    def _strategy_state(self) -> dict[str, Any]:
        b0 = getattr(self.strategy, "b0", None)
        return {"b0": b0} if b0 is not None else {}

    def _save_state(self) -> None:
        state = {
            "version": STATE_VERSION, "fingerprint": self.fingerprint,
            "strategy": self.cfg.strategy, "round": self.round, "open": self.open,
            "devices": self.devices, "rejected": dict(self.rejected), "metrics": self.metrics,
            "strategy_state": self._strategy_state(),
            "round_bytes": self._round_bytes, "round_rejected": dict(self._round_rejected),
        }
        atomic_write(self.state_dir / "state.json", json.dumps(state, indent=1).encode())

    def _resume(self) -> None:
        path = self.state_dir / "state.json"
        try:
            st = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ProtocolError(f"aggregator state {path} is unreadable ({e}); move the --state "
                                "directory away to start afresh") from None
        if st.get("fingerprint") != self.fingerprint or st.get("strategy") != self.cfg.strategy:
            raise ProtocolError(f"aggregator state in {self.state_dir} is for base "
                                f"{str(st.get('fingerprint'))[:12]} / strategy "
                                f"{st.get('strategy')}; use another --state directory")
        self.round = int(st["round"])
        self.open = st.get("open")
        self.devices = dict(st.get("devices", {}))
        self.rejected = Counter(st.get("rejected", {}))
        self.metrics = list(st.get("metrics", []))
        self._round_bytes = list(st.get("round_bytes", [0, 0]))
        self._round_rejected = Counter(st.get("round_rejected", {}))
        b0 = st.get("strategy_state", {}).get("b0")
        if b0 is not None and hasattr(self.strategy, "b0"):
            setattr(self.strategy, "b0", int(b0))  # noqa: B010
        self.global_adapter, _ = decode_adapter(self._global_path(self.round).read_bytes())
        if self.open is not None:
            self._acc = self.strategy.accumulator(self.global_adapter, self.round)
            jdir = self._journal_dir(self.round)
            for f in sorted(jdir.glob("*.bin")) if jdir.is_dir() else []:
                dev = f.stem
                adapter, meta = decode_adapter(f.read_bytes())
                self._fold(dev, adapter, int(meta["n_samples"]))
        log.info("resumed aggregator state: round %d, %d accepted in the open round",
                 self.round, len(self.accepted))

    # registry ----------------------------------------------------------------------
    def register(self, reg: Register) -> str | None:
        """Record a device; returns a refusal reason if it cannot take part."""
        if reg.fingerprint != self.fingerprint:
            self.rejected["register_bad_fingerprint"] += 1
            return "bad_fingerprint"
        self.devices[reg.device_id] = {"n_samples": reg.n_samples, "profile": reg.profile,
                                       "device_class": reg.device_class}
        self.online.add(reg.device_id)
        return None

    def set_online(self, device_id: str, online: bool) -> None:
        (self.online.add if online else self.online.discard)(device_id)

    @property
    def finished(self) -> bool:
        return self.round >= self.cfg.rounds

    # round verbs -----------------------------------------------------------------------
    def _plan(self, dev: str) -> ClientPlan:
        info = self.devices[dev]
        plan = plan_for_device(dev, info.get("profile", {}), info.get("device_class", ""),
                               self.shape, strategy=self.cfg.strategy,
                               steps=int(self.train.get("steps", 20)),
                               profiles_dir=self.profiles_dir, reference=self.reference,
                               deadline_s=self.cfg.round_timeout_s)
        # never above what the global adapter holds now (SA-FedLoRA shrinks it)
        ranks = {n: min(r, self.global_adapter[n].rank) for n, r in plan.ranks.items()}
        return ClientPlan(dev, ranks, plan.alpha, plan.device_class)

    def _select(self, exclude: set[str]) -> list[str]:
        pool = sorted(d for d in self.online if d in self.devices and d not in exclude)
        if self.cfg.max_clients and len(pool) > self.cfg.max_clients:
            pool = sorted(random.Random(self.seed * 1000003 + self.round).sample(
                pool, self.cfg.max_clients))
        return pool

    def plan_round(self) -> RoundOpen:
        """Open the next round: select online devices, give each a plan and a download."""
        if self.finished:
            raise RuntimeError("all rounds are done")
        if self.open is not None:
            return self.current()
        now = self.clock()
        plans = {d: self._plan(d).to_json() for d in self._select(set())}
        self.open = {"started_unix": now, "deadline_unix": now + self.cfg.round_timeout_s,
                     "plans": plans, "extensions": 0}
        self._acc = self.strategy.accumulator(self.global_adapter, self.round)
        self.accepted = {}
        self._round_rejected = Counter()
        self._round_bytes = [0, 0]
        self._save_state()
        opened = self.current()
        for dp in opened.announcement.devices.values():
            self._round_bytes[1] += opened.downloads[dp.global_transfer_id][0].size
        log.info("round %d open: %d devices, deadline in %.0f s", self.round, len(plans),
                 self.cfg.round_timeout_s)
        return opened

    def current(self) -> RoundOpen:
        """The open round's announcement and downloads (recomputed, deterministic)."""
        assert self.open is not None
        return self._round_open(self.open["plans"], float(self.open["deadline_unix"]), False)

    def final_round(self) -> RoundOpen:
        """After the last merge: every registered device's share of the final global."""
        plans = {d: self._plan(d).to_json() for d in sorted(self.devices)}
        return self._round_open(plans, self.clock(), True)

    def _round_open(self, plans: dict[str, Any], deadline: float, finished: bool) -> RoundOpen:
        downloads: dict[str, tuple[Manifest, bytes]] = {}
        devices: dict[str, DevicePlan] = {}
        by_key: dict[str, str] = {}
        for dev, pj in sorted(plans.items()):
            plan = ClientPlan.from_json(pj)
            key = json.dumps({"ranks": plan.ranks, "alpha": plan.alpha}, sort_keys=True)
            tid = by_key.get(key)
            if tid is None:  # devices with the same plan share one download
                digest = hashlib.sha256(key.encode()).hexdigest()[:10]
                tid = f"g{self.round}-{digest}"
                data = encode_adapter(self.strategy.distribute(self.global_adapter, plan),
                                      {"round": self.round, "fingerprint": self.fingerprint},
                                      self.cfg.compression)
                downloads[tid] = (make_manifest(data, kind="global", round=self.round,
                                                chunk_size=self.cfg.chunk_size,
                                                compression=self.cfg.compression,
                                                transfer_id=tid), data)
                by_key[key] = tid
            devices[dev] = DevicePlan(plan=pj, global_transfer_id=tid, train=self.train)
        ann = RoundAnnouncement(round=self.round, deadline_unix=deadline,
                                fingerprint=self.fingerprint, strategy=self.cfg.strategy,
                                devices=devices, finished=finished)
        return RoundOpen(ann, downloads)

    def count_up(self, nbytes: int) -> None:
        self._round_bytes[0] += nbytes

    def count_rejection(self, device_id: str, reason: str, detail: str = "") -> Verdict:
        self.rejected[reason] += 1
        self._round_rejected[reason] += 1
        log.warning("rejected update from %s: %s %s", device_id, reason, detail)
        return Verdict(False, reason, detail)

    def accept_update(self, device_id: str, manifest: Manifest, payload: bytes) -> Verdict:
        """Validate one complete update and fold it in; every refusal is counted by reason."""
        try:
            check_id(device_id, "update")
        except ProtocolError as e:
            return self.count_rejection(device_id, "bad_manifest", str(e))
        if manifest.round != self.round or self.open is None:
            # a straggler is a device picked for the round just closed that never delivered;
            # anything else for a closed round (e.g. a re-sent accepted update) is a replay
            prev = self.metrics[-1] if self.metrics else {}
            late = (prev.get("round") == manifest.round == self.round - 1
                    and device_id in prev.get("selected", [])
                    and device_id not in prev.get("accepted", []))
            reason = "late" if late else "stale_round"
            return self.count_rejection(device_id, reason,
                                        f"update for round {manifest.round}, open round is "
                                        f"{self.round if self.open else 'none'}")
        pj = self.open["plans"].get(device_id)
        if pj is None:
            return self.count_rejection(device_id, "not_selected",
                                        f"{device_id} is not selected for round {self.round}")
        if device_id in self.accepted:
            return self.count_rejection(device_id, "duplicate",
                                        f"{device_id} already has an update in round {self.round}")
        if len(payload) > self.cfg.max_update_bytes:
            return self.count_rejection(device_id, "oversize", f"{len(payload)} bytes")
        try:
            adapter, meta = decode_adapter(payload)
            meta = {**manifest.meta, **meta}
            n = validate_update(adapter, meta, plan=ClientPlan.from_json(pj), shapes=self.shapes,
                                fingerprint=self.fingerprint, max_norm=self.cfg.max_update_norm)
            if meta.get("round") != self.round:
                raise UpdateRejected("stale_round", f"payload says round {meta.get('round')}")
        except TransferError as e:
            return self.count_rejection(device_id, e.reason, e.detail)
        # journal first (the update is "in" once this file exists), then fold
        jdir = self._journal_dir(self.round)
        jdir.mkdir(parents=True, exist_ok=True)
        payload_n = encode_adapter(adapter, {"n_samples": n, "round": self.round})
        atomic_write(jdir / f"{device_id}.bin", payload_n)
        try:
            self._fold(device_id, adapter, n)
        except Exception as e:  # the strategy's own checks: drop the journal entry again
            (jdir / f"{device_id}.bin").unlink(missing_ok=True)
            return self.count_rejection(device_id, "bad_shape", f"strategy refused it: {e}")
        log.info("round %d: accepted update from %s (%d samples)", self.round, device_id, n)
        return Verdict(True)

    def _fold(self, dev: str, adapter: Adapter, n: int) -> None:
        assert self._acc is not None and self.open is not None
        plan = ClientPlan.from_json(self.open["plans"][dev])
        self._acc.add(ClientUpdate(dev, adapter, n, plan=plan))
        self.accepted[dev] = n

    def ready_to_close(self) -> bool:
        """All selected devices answered, or the deadline passed."""
        if self.open is None:
            return False
        if self.open["plans"] and set(self.accepted) >= set(self.open["plans"]):
            return True
        return self.clock() >= float(self.open["deadline_unix"])

    def close_round(self) -> RoundRecord | None:
        """Merge and persist; or, below quorum at the deadline, extend it (returns None)."""
        assert self.open is not None and self._acc is not None
        if (len(self.accepted) < self.cfg.min_clients
                and self.open["extensions"] < MAX_EXTENSIONS):
            self.open["extensions"] += 1
            self.open["deadline_unix"] = self.clock() + self.cfg.round_timeout_s
            for dev in self._select(set(self.open["plans"])):  # late joiners get a plan
                self.open["plans"][dev] = self._plan(dev).to_json()
            self._save_state()
            log.warning("round %d: %d/%d updates at the deadline; extending (%d/%d)",
                        self.round, len(self.accepted), self.cfg.min_clients,
                        self.open["extensions"], MAX_EXTENSIONS)
            return None
        selected = sorted(self.open["plans"])
        stragglers = [d for d in selected if d not in self.accepted]
        if stragglers:
            self.rejected["straggler_dropped"] += len(stragglers)
            self._round_rejected["straggler_dropped"] += len(stragglers)
        new_global = self._acc.result() if self.accepted else self.global_adapter
        eval_loss = self.evaluator(new_global) if self.evaluator is not None else None
        rec = RoundRecord(round=self.round, eval_loss=eval_loss, bytes_up=self._round_bytes[0],
                          bytes_down=self._round_bytes[1],
                          sim_time_s=round(self.clock() - float(self.open["started_unix"]), 3),
                          participants=len(self.accepted), stragglers=len(stragglers),
                          rejected=dict(self._round_rejected))
        entry = rec.to_json()
        entry["selected"] = selected
        entry["accepted"] = sorted(self.accepted)
        atomic_write(self._global_path(self.round + 1), encode_adapter(new_global))
        closed = self.round
        self.metrics.append(entry)
        self.round += 1
        self.open = None
        self.accepted = {}
        self._acc = None
        self.global_adapter = new_global
        self._round_bytes = [0, 0]
        self._round_rejected = Counter()
        self._save_state()  # commit point
        shutil.rmtree(self._journal_dir(closed), ignore_errors=True)
        old = self._global_path(closed - 1)
        if closed >= 1 and old.exists():
            old.unlink()
        log.info("round %d merged: %d participants, %d stragglers, eval_loss %s", closed,
                 rec.participants, rec.stragglers, eval_loss)
        return rec

    def metrics_json(self, config: dict[str, Any]) -> dict[str, Any]:
        """{"strategy", "config", "rounds": [...]} plus fleet counters."""
        keys = ("round", "eval_loss", "bytes_up", "bytes_down", "sim_time_s", "participants")
        return {
            "strategy": self.cfg.strategy, "config": config,
            "rounds": [{k: m[k] for k in keys} for m in self.metrics],
            "fleet": {"rejected": dict(self.rejected),
                      "per_round": [{k: m[k] for k in ("round", "stragglers", "rejected",
                                                        "selected")} for m in self.metrics]},
        }
