"""The server side of a round, whatever the transport: `plan_round`, `accept_update`,
`close_round`, with persisted state.

No network here: the MQTT node (`edge_runtime.fleet.server`) and the in-process
transport (`edge_runtime.transport.inproc`) both drive this class. It holds the round
state, checks every update (`fleet.validation`), folds accepted ones into the strategy's
running accumulator (memory of one adapter, not one per device) and persists itself
atomically so that a `kill -9` at any point resumes with nothing merged twice:

    STATE/state.json                 the typed `ServerState` (round, open round, registry,
                                     counters, metrics, the resolved strategy config);
                                     replaced atomically (tmp + rename)
    STATE/global_r{k}.safetensors    the global adapter after k merged rounds
    STATE/journal/r{k}/{dev}.bin     accepted update bytes of the open round k, written
                                     (atomically) *before* the device is acked

An update is "in" exactly when its journal file exists. On resume the accumulator is
rebuilt by re-folding the journal, a device re-sending gets "duplicate", and the round
commits by writing global_r{k+1} and then state.json (the commit point) before the
journal of round k is deleted.

Metrics (one schema for demo, simulate and aggregator; `metrics_json`): record 0 is the
base model (the round-0 global adapter has B = 0), record k the global after k merges.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edge_runtime.adapter import Adapter, LoRAWeights
from edge_runtime.config import (
    FleetConfig,
    SAFedLoRAConfig,
    StrategyConfig,
    StrategyName,
    TrainConfig,
    capped_weight,
    check_dp,
    to_jsonable,
)
from edge_runtime.errors import ConfigError
from edge_runtime.evaluate import EvalResult
from edge_runtime.files import atomic_write
from edge_runtime.fl.registry import make_strategy
from edge_runtime.fl.types import Accumulator, ClientPlan, ClientUpdate, PartialSum
from edge_runtime.fl.types import UpdateMismatchError as StrategyRefused
from edge_runtime.fleet.codec import (
    decode_adapter,
    decode_partial,
    encode_adapter,
    encode_partial,
)
from edge_runtime.fleet.protocol import (
    PROTOCOL_VERSION,
    DevicePlan,
    Manifest,
    ProtocolError,
    Register,
    RoundAnnouncement,
    check_id,
)
from edge_runtime.fleet.transfer import TransferError, make_manifest
from edge_runtime.fleet.validation import decode_checked
from edge_runtime.lora import seeded_lora_a
from edge_runtime.planning import GlobalShape, Planner
from edge_runtime.rounds.seeding import device_seed

if TYPE_CHECKING:  # secure aggregation needs the `secagg` extra; imported where used
    from edge_runtime.rounds.secure import Outbound, SecureRound

__all__ = ["AggregatorService", "Verdict", "RoundOpen", "RoundRecord", "initial_global",
           "METRICS_SCHEMA", "ROUND_KEYS", "metrics_document"]

log = logging.getLogger(__name__)
STATE_VERSION = 2
MAX_EXTENSIONS = 3
METRICS_SCHEMA = 1
ROUND_KEYS = ("round", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down", "time_s",
              "participants", "selected", "stragglers", "rejected", "diagnostics", "clipped",
              "dp")


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
    """What a transport delivers for the open round."""

    announcement: RoundAnnouncement
    downloads: dict[str, tuple[Manifest, bytes]]  # transfer id -> (manifest, bytes)


@dataclass
class RoundRecord:
    """One metrics record: record 0 is the base model, record k the global after k merges.

    `bytes_up` / `bytes_down` are adapter payload bytes (updates received whole; the
    downloads of the selected devices), the same on every transport; `time_s` is
    cumulative (wall seconds in a fleet, simulated seconds in a simulation).
    """

    round: int
    eval_loss: float | None
    eval_accuracy: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    time_s: float = 0.0
    participants: int = 0
    selected: list[str] = field(default_factory=list)
    stragglers: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    diagnostics: dict[str, float] | None = None
    accepted: list[str] = field(default_factory=list)
    # device -> what the aggregator bounded: {"n_samples": [claimed, used]} (weight cap),
    # {"norm": [change norm, bound, t]} (adaptive clipping, `fl.clipping`)
    clipped: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # client-level DP (`fl.dp`, `fl.privacy`): epsilon so far and this round's; None: off
    dp: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ROUND_KEYS}


@dataclass
class DeviceRecord:
    n_samples: int
    profile: dict[str, Any]
    device_class: str
    rank_caps: dict[str, int] = field(default_factory=dict)  # HetLoRA: ranks it pruned to


@dataclass(frozen=True)
class Rejection:
    """One refused update or message (the status page's recent rejections)."""

    unix: float
    round: int
    device_id: str
    reason: str
    detail: str


@dataclass
class OpenRound:
    started_unix: float
    deadline_unix: float
    plans: dict[str, dict[str, Any]]  # device -> ClientPlan JSON
    extensions: int = 0
    secagg: dict[str, Any] | None = None  # the round's SecAgg params and layout
    pool: int = 0  # eligible devices the selection drew from (DP accounting)


@dataclass
class ServerState:
    """Everything `state.json` holds (typed; written whole at each commit)."""

    version: int
    fingerprint: str
    strategy: dict[str, Any]
    round: int = 0
    open: OpenRound | None = None
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    metrics: list[RoundRecord] = field(default_factory=list)
    round_bytes: list[int] = field(default_factory=lambda: [0, 0])
    round_rejected: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ServerState:
        op = d.get("open")
        return cls(version=int(d["version"]), fingerprint=str(d["fingerprint"]),
                   strategy=dict(d["strategy"]), round=int(d["round"]),
                   open=OpenRound(**op) if op else None,
                   devices={k: DeviceRecord(**v) for k, v in d.get("devices", {}).items()},
                   rejected=dict(d.get("rejected", {})),
                   metrics=[RoundRecord(**m) for m in d.get("metrics", [])],
                   round_bytes=list(d.get("round_bytes", [0, 0])),
                   round_rejected=dict(d.get("round_rejected", {})))


def _scores(ev: EvalResult | None) -> tuple[float | None, float | None]:
    return (None, None) if ev is None else (ev.loss, ev.accuracy)


def resolve_strategy(cfg: StrategyConfig, start: Adapter) -> StrategyConfig:
    """Fix what a strategy needs from the run's start (SA-FedLoRA's b0), once, as config."""
    s = cfg.settings
    if isinstance(s, SAFedLoRAConfig) and s.b0 is None:
        return StrategyConfig(cfg.name, replace(s, b0=sum(w.rank for w in start.values())))
    return cfg


class AggregatorService:
    """Round state machine of the federated server (see module docstring).

    Args:
        fleet: rounds, selection, deadlines and limits.
        strategy: the strategy's typed config; it travels to every device with each round.
        recipe: the local training recipe sent to devices (each device derives its own
            seed from it, the round and its id).
        planner: decides each device's plan (`edge_runtime.planning.Planner`).
        shapes: {module: (d_out, d_in)} of the base model's candidate layers.
        fingerprint: the base model fingerprint devices must have trained on.
        state_dir: where state is persisted (created; resumed if it holds a state).
        seed: seeds lora_a of the round-0 global and the per-round selection.
        evaluator: optional global adapter -> held-out loss and choice accuracy (record 0
            and after each merge).
        clock: wall clock (seconds since the epoch); replaced in tests.
    """

    def __init__(self, fleet: FleetConfig, strategy: StrategyConfig, recipe: TrainConfig,
                 planner: Planner, shapes: dict[str, tuple[int, int]], fingerprint: str,
                 state_dir: Path, *, seed: int = 0,
                 evaluator: Callable[[Adapter], EvalResult] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        check_dp(strategy, fleet)
        self.cfg = fleet
        self.recipe = recipe
        self.planner = planner
        self.shape = planner.shape
        self.shapes = dict(shapes)
        self.fingerprint = fingerprint
        self.state_dir = Path(state_dir)
        self.seed = seed
        self.evaluator = evaluator
        self.clock = clock
        self.online: set[str] = set()
        self._pool = 0  # eligible devices at the last selection
        self.last_seen: dict[str, float] = {}  # device -> unix time it was last heard from
        self.recent_rejections: deque[Rejection] = deque(maxlen=50)
        self._acc: Accumulator | None = None
        self._accepted: dict[str, int] = {}
        self._clips: dict[str, dict[str, list[float]]] = {}  # the open round's
        self._partials = 0  # site partial sums merged into the open round
        self._secure: SecureRound | None = None  # the open round's SecAgg (fleet.secagg)
        self._pending_out: list[Outbound] = []
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if (self.state_dir / "state.json").exists():
            self.st = self._load_state(strategy)
            self.strategy_cfg = StrategyConfig.from_json(self.st.strategy)
            self.global_adapter, _ = decode_adapter(self._global_path(self.st.round).read_bytes())
        else:
            self.global_adapter = initial_global(self.shape, self.shapes, seed)
            self.strategy_cfg = resolve_strategy(strategy, self.global_adapter)
            self.st = ServerState(STATE_VERSION, fingerprint, self.strategy_cfg.to_json())
            base = self.evaluator(self.global_adapter) if self.evaluator else None
            self.st.metrics.append(RoundRecord(0, *_scores(base)))
            atomic_write(self._global_path(0), encode_adapter(self.global_adapter))
            self._save_state()
        self.planner = replace(planner, strategy=self.strategy_cfg)
        self.strategy = make_strategy(self.strategy_cfg)
        if self.st.open is not None:
            self._refold_journal()

    # views ---------------------------------------------------------------------------
    @property
    def round(self) -> int:
        """Merged rounds so far (= the 0-based index of the open or next round)."""
        return self.st.round

    @property
    def open(self) -> OpenRound | None:
        return self.st.open

    @property
    def devices(self) -> dict[str, DeviceRecord]:
        return self.st.devices

    @property
    def rejected(self) -> Counter[str]:
        """Refusals by reason over the whole run."""
        return Counter(self.st.rejected)

    @property
    def metrics(self) -> list[RoundRecord]:
        return self.st.metrics

    @property
    def accepted(self) -> list[str]:
        return list(self._accepted)

    @property
    def finished(self) -> bool:
        return self.st.round >= self.cfg.rounds

    # persistence -----------------------------------------------------------------
    def _global_path(self, k: int) -> Path:
        return self.state_dir / f"global_r{k}.safetensors"

    def _journal_dir(self, k: int) -> Path:
        return self.state_dir / "journal" / f"r{k}"

    def _save_state(self) -> None:
        atomic_write(self.state_dir / "state.json",
                     json.dumps(to_jsonable(asdict(self.st)), indent=1).encode())

    def _load_state(self, strategy: StrategyConfig) -> ServerState:
        path = self.state_dir / "state.json"
        try:
            st = ServerState.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ProtocolError(f"aggregator state {path} is unreadable ({e}); move the --state "
                                "directory away to start afresh") from None
        if (st.version != STATE_VERSION or st.fingerprint != self.fingerprint
                or st.strategy.get("name") != strategy.name.value):
            raise ProtocolError(f"aggregator state in {self.state_dir} is for base "
                                f"{st.fingerprint[:12]} / strategy {st.strategy.get('name')} "
                                f"(state version {st.version}); use another --state directory")
        return st

    def _refold_journal(self) -> None:
        self._acc = self._new_accumulator()
        self._accepted = {}
        self._partials = 0
        jdir = self._journal_dir(self.round)
        for f in sorted(jdir.glob("*.bin")) if jdir.is_dir() else []:
            adapter, meta = decode_adapter(f.read_bytes())
            n, claimed = int(meta["n_samples"]), int(meta.get("claimed", meta["n_samples"]))
            self._fold(f.stem, adapter, n)
            if n < claimed:
                self._clips.setdefault(f.stem, {})["n_samples"] = [float(claimed), float(n)]
        for f in sorted(jdir.glob("*.part")) if jdir.is_dir() else []:
            partial, meta = decode_partial(f.read_bytes())
            self._merge_partial(partial, meta)
        log.info("resumed aggregator state: round %d, %d accepted in the open round",
                 self.round, len(self._accepted))

    # registry ----------------------------------------------------------------------
    def register(self, reg: Register) -> str | None:
        """Record a device; returns a refusal reason if it cannot take part."""
        if reg.version != PROTOCOL_VERSION:
            self._count("register_protocol_version")
            return "protocol_version"
        if reg.fingerprint != self.fingerprint:
            self._count("register_bad_fingerprint")
            return "bad_fingerprint"
        old = self.st.devices.get(reg.device_id)
        self.st.devices[reg.device_id] = DeviceRecord(
            reg.n_samples, reg.profile, reg.device_class,
            old.rank_caps if old is not None and old.profile == reg.profile else {})
        self.online.add(reg.device_id)
        self.seen(reg.device_id)
        return None

    def set_online(self, device_id: str, online: bool) -> None:
        (self.online.add if online else self.online.discard)(device_id)
        if online:
            self.seen(device_id)

    def seen(self, device_id: str) -> None:
        """Note that a device was heard from now (status page; not persisted)."""
        self.last_seen[device_id] = self.clock()

    # round verbs -----------------------------------------------------------------------
    def _plan(self, dev: str) -> ClientPlan | None:
        info = self.st.devices[dev]
        plan = self.planner.plan(dev, info.profile, info.device_class)
        if plan is None:
            return None
        # never above what the global adapter holds now (SA-FedLoRA shrinks it), nor above
        # the ranks a HetLoRA device pruned itself to (its pruned rank sticks, sec. 3.2)
        cap_global = self.strategy.ranks_capped_by_global
        ranks = {n: min(r, self.global_adapter[n].rank if cap_global else r,
                        info.rank_caps.get(n, r))
                 for n, r in plan.ranks.items()}
        return ClientPlan(dev, ranks, plan.alpha, plan.device_class)

    def _plans_for(self, devices: list[str]) -> dict[str, dict[str, Any]]:
        plans = {d: self._plan(d) for d in devices}
        return {d: p.to_json() for d, p in plans.items() if p is not None}

    def _select(self, exclude: set[str]) -> dict[str, dict[str, Any]]:
        """Plans of the selected devices: the online ones the planner gives a plan (each
        planned once), then the fraction / max_clients draw."""
        plans = self._plans_for(sorted(d for d in self.online
                                       if d in self.st.devices and d not in exclude))
        pool = sorted(plans)
        k = max(1, math.ceil(self.cfg.fraction * len(pool))) if pool else 0
        if self.cfg.max_clients:
            k = min(k, self.cfg.max_clients)
        self._pool = len(pool)
        if k < len(pool):
            secret = self.cfg.dp.on and self.cfg.dp.seed is None  # DP: an unpredictable draw
            rng = random.SystemRandom() if secret else random.Random(self.seed * 1000003
                                                                     + self.round)
            pool = sorted(rng.sample(pool, k))
        return {d: plans[d] for d in pool}

    def plan_round(self) -> RoundOpen:
        """Open the next round: select online devices, give each a plan and a download."""
        if self.finished:
            raise RuntimeError("all rounds are done")
        if self.st.open is not None:
            return self.current()
        now = self.clock()
        plans = self._select(set())
        self.st.open = OpenRound(now, now + self.cfg.round_timeout_s, plans, pool=self._pool)
        self._secure = None
        if self.cfg.secagg and len(plans) >= 2:
            from edge_runtime.rounds.secure import SecureRound
            from edge_runtime.secagg.layout import layout_for
            from edge_runtime.secagg.protocol import SecAggParams

            layout = layout_for(self.strategy_cfg.name, self.global_adapter)
            params = SecAggParams.choose(self.round, list(plans), layout.size)
            self.st.open.secagg = {**params.to_json(), "layout": layout.to_json(),
                                   "weight_cap": self.cfg.weight_cap.value}
            self._secure = SecureRound(params, layout, now, self.st.open.deadline_unix,
                                       0.25 * self.cfg.round_timeout_s)
        self._acc = self._new_accumulator()
        self._accepted = {}
        self._partials = 0
        self.st.round_rejected = {}
        opened = self.current()
        self.st.round_bytes = [0, sum(opened.downloads[dp.global_transfer_id][0].size
                                      for dp in opened.announcement.devices.values())]
        self._save_state()
        log.info("round %d open: %d devices, deadline in %.0f s", self.round, len(plans),
                 self.cfg.round_timeout_s)
        return opened

    def current(self) -> RoundOpen:
        """The open round's announcement and downloads (recomputed, deterministic)."""
        assert self.st.open is not None
        return self._round_open(self.st.open.plans, self.st.open.deadline_unix, False)

    def final_round(self) -> RoundOpen:
        """After the last merge: every registered device's share of the final global."""
        return self._round_open(self._plans_for(sorted(self.st.devices)), self.clock(), True)

    def _round_open(self, plans: dict[str, Any], deadline: float, finished: bool) -> RoundOpen:
        downloads: dict[str, tuple[Manifest, bytes]] = {}
        devices: dict[str, DevicePlan] = {}
        by_key: dict[str, str] = {}
        recipe = to_jsonable(self.recipe)
        compression = self.cfg.compression.value
        for dev, pj in sorted(plans.items()):
            plan = ClientPlan.from_json(pj)
            key = json.dumps({"ranks": plan.ranks, "alpha": plan.alpha}, sort_keys=True)
            tid = by_key.get(key)
            if tid is None:  # devices with the same plan share one download
                digest = hashlib.sha256(key.encode()).hexdigest()[:10]
                tid = f"g{self.round}-{digest}"
                data = encode_adapter(self.strategy.distribute(self.global_adapter, plan),
                                      {"round": self.round, "fingerprint": self.fingerprint},
                                      compression)
                downloads[tid] = (make_manifest(data, kind="global", round=self.round,
                                                chunk_size=self.cfg.chunk_size,
                                                compression=compression,
                                                transfer_id=tid), data)
                by_key[key] = tid
            devices[dev] = DevicePlan(plan=pj, global_transfer_id=tid, train=recipe)
        sa = self.st.open.secagg if self.st.open is not None and not finished else None
        ann = RoundAnnouncement(round=self.round, deadline_unix=deadline,
                                fingerprint=self.fingerprint, strategy=self.strategy_cfg.to_json(),
                                devices=devices, finished=finished, secagg=sa)
        return RoundOpen(ann, downloads)

    def _count(self, reason: str, this_round: bool = False) -> None:
        self.st.rejected[reason] = self.st.rejected.get(reason, 0) + 1
        if this_round:
            self.st.round_rejected[reason] = self.st.round_rejected.get(reason, 0) + 1

    def count_rejection(self, device_id: str, reason: str, detail: str = "") -> Verdict:
        self._count(reason, this_round=True)
        self.recent_rejections.append(Rejection(self.clock(), self.round, device_id, reason,
                                                detail[:300]))
        log.warning("rejected update from %s: %s %s", device_id, reason, detail)
        return Verdict(False, reason, detail)

    def accept_update(self, device_id: str, manifest: Manifest, payload: bytes) -> Verdict:
        """Validate one complete update and fold it in; every refusal is counted by reason."""
        try:
            check_id(device_id, "update")
        except ProtocolError as e:
            return self.count_rejection(device_id, "bad_manifest", str(e))
        op = self.st.open
        if manifest.round != self.round or op is None:
            # a straggler is a device picked for the round just closed that never delivered;
            # anything else for a closed round (e.g. a re-sent accepted update) is a replay
            prev = self.st.metrics[-1] if len(self.st.metrics) > 1 else None
            late = (prev is not None and manifest.round == self.round - 1
                    and device_id in prev.selected and device_id not in prev.accepted)
            reason = "late" if late else "stale_round"
            return self.count_rejection(device_id, reason,
                                        f"update for round {manifest.round}, open round is "
                                        f"{self.round if op else 'none'}")
        pj = op.plans.get(device_id)
        if pj is None:
            return self.count_rejection(device_id, "not_selected",
                                        f"{device_id} is not selected for round {self.round}")
        if device_id in self._accepted:
            return self.count_rejection(device_id, "duplicate",
                                        f"{device_id} already has an update in round {self.round}")
        if len(payload) > self.cfg.max_update_bytes:
            return self.count_rejection(device_id, "oversize", f"{len(payload)} bytes")
        self.st.round_bytes[0] += len(payload)
        try:
            adapter, n = decode_checked(payload, manifest, round=self.round,
                                        plan=ClientPlan.from_json(pj),
                                        global_adapter=self.global_adapter,
                                        fingerprint=self.fingerprint,
                                        max_norm=self.cfg.max_update_norm)
        except TransferError as e:
            return self.count_rejection(device_id, e.reason, e.detail)
        claimed, n = n, self._weight_cap(device_id, n)
        if n < claimed:
            self._clips.setdefault(device_id, {})["n_samples"] = [float(claimed), float(n)]
            lied = claimed > self.st.devices[device_id].n_samples  # more than it registered
            log.log(logging.WARNING if lied else logging.DEBUG,
                    "round %d: %s claimed %d samples; weighted as %d (fleet.weight_cap %s)",
                    self.round, device_id, claimed, n, self.cfg.weight_cap.value)
        # journal first (the update is "in" once this file exists), then fold
        jdir = self._journal_dir(self.round)
        jdir.mkdir(parents=True, exist_ok=True)
        atomic_write(jdir / f"{device_id}.bin",
                     encode_adapter(adapter, {"n_samples": n, "claimed": claimed,
                                              "round": self.round}))
        try:
            self._fold(device_id, adapter, n)
        except StrategyRefused as e:  # the strategy's own checks: drop the journal entry
            (jdir / f"{device_id}.bin").unlink(missing_ok=True)
            self._clips.pop(device_id, None)
            return self.count_rejection(device_id, "bad_shape", f"strategy refused it: {e}")
        if self.strategy_cfg.name is StrategyName.HETLORA:
            self.st.devices[device_id].rank_caps = {k: w.rank for k, w in adapter.items()}
        self.seen(device_id)
        log.info("round %d: accepted update from %s (%d samples)", self.round, device_id, n)
        return Verdict(True)

    # hierarchical aggregation --------------------------------------------------------
    def global_download(self) -> tuple[Manifest, bytes]:
        """The whole global adapter of the open round, for site aggregators (they fold
        against it); transfer id `site-g{round}`."""
        data = encode_adapter(self.global_adapter, {"round": self.round,
                                                    "fingerprint": self.fingerprint})
        return make_manifest(data, kind="global", round=self.round,
                             chunk_size=self.cfg.chunk_size,
                             transfer_id=f"site-g{self.round}"), data

    def accept_partial(self, site_id: str, manifest: Manifest, payload: bytes) -> Verdict:
        """Merge a site aggregator's partial sum of the open round (`rounds.site`).

        Its meta names the devices folded in ({device: weight n}); each must be selected
        and not yet in, so a site re-sending after a restart merges nothing twice. The
        partial is journaled (`{site}.{transfer}.part`) before it is merged.
        """
        who = f"site {site_id}"
        try:
            check_id(site_id, "partial")
        except ProtocolError as e:
            return self.count_rejection(site_id, "bad_manifest", str(e))
        op = self.st.open
        if manifest.round != self.round or op is None:
            prev = self.st.metrics[-1] if len(self.st.metrics) > 1 else None
            late = prev is not None and manifest.round == self.round - 1
            return self.count_rejection(who, "late" if late else "stale_round",
                                        f"partial for round {manifest.round}, open round is "
                                        f"{self.round if op else 'none'}")
        limit = self.cfg.max_update_bytes * max(1, len(op.plans))
        if len(payload) > limit:
            return self.count_rejection(who, "oversize", f"{len(payload)} bytes")
        try:
            partial, meta = decode_partial(payload)
        except TransferError as e:
            return self.count_rejection(who, e.reason, e.detail)
        devices = meta.get("devices")
        if (meta.get("round") != self.round or not isinstance(devices, dict) or not devices
                or len(devices) != partial.count
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                           for n in devices.values())):
            return self.count_rejection(who, "bad_manifest", "a partial's meta must name its "
                                        "round and {device: n_samples > 0} of every device in it")
        return self._take_partial(who, site_id, manifest.transfer_id, partial, meta, payload,
                                  len(payload))

    def accept_secure_sum(self, partial: PartialSum, devices: list[str], bytes_up: int,
                          bytes_down: int) -> Verdict:
        """Merge the open round's securely aggregated sum (`secagg`): the survivors' one-
        device partial sums added under masks; the server never saw one of them.
        `bytes_up` / `bytes_down`: the protocol's traffic this round."""
        op = self.st.open
        if op is None:
            return self.count_rejection("secagg", "stale_round", "no open round")
        meta = {"round": self.round, "site": "secagg", "devices": {d: 1 for d in devices}}
        data = encode_partial(partial, meta)
        self.st.round_bytes[1] += bytes_down
        return self._take_partial("secure sum", "secagg", f"r{self.round}", partial, meta, data,
                                  bytes_up)

    # secure aggregation over a transport ---------------------------------------------
    @property
    def secure_active(self) -> bool:
        """The open round runs SecAgg: devices send masked vectors, not updates."""
        return self.st.open is not None and self.st.open.secagg is not None

    def secagg_message(self, dev: str, stage: str, payload: bytes) -> list[Outbound]:
        """A device's SecAgg stage message (`rounds.secure`); returns what to send."""
        from edge_runtime.secagg.protocol import SecAggError

        sec = self._secure
        if sec is None or self.st.open is None or dev not in self.st.open.plans:
            self.count_rejection(dev, "stale_round", f"no secure aggregation open for {dev}")
            return []
        self.st.round_bytes[0] += len(payload)
        try:
            out = sec.on_message(dev, stage, payload, self.clock())
        except SecAggError as e:
            self.count_rejection(dev, "bad_manifest", f"secagg {stage}: {e}")
            return []
        self.seen(dev)
        return self._secure_out(out)

    def accept_masked(self, dev: str, manifest: Manifest, payload: bytes) -> Verdict:
        """A device's masked vector (an upload of manifest kind "masked")."""
        from edge_runtime.secagg.protocol import SecAggError

        sec = self._secure
        if sec is None or manifest.round != self.round:
            return self.count_rejection(dev, "stale_round", f"masked vector for round "
                                        f"{manifest.round}; no secure aggregation open")
        self.st.round_bytes[0] += len(payload)
        try:
            self._pending_out = self._secure_out(sec.on_message(dev, "masked", payload,
                                                                self.clock()))
        except SecAggError as e:
            return self.count_rejection(dev, "bad_manifest", f"secagg masked: {e}")
        self.seen(dev)
        return Verdict(True)

    def secagg_tick(self) -> list[Outbound]:
        """Stage deadlines; also hands out what `accept_masked` produced."""
        out, self._pending_out = self._pending_out, []
        if self._secure is not None:
            out += self._secure_out(self._secure.tick(self.clock()))
        return out

    def _secure_out(self, out: list[Outbound]) -> list[Outbound]:
        sec = self._secure
        n = len(sec.server.masked) if sec is not None else 0
        self.st.round_bytes[1] += sum(len(o.payload) * (n if o.device is None else 1)
                                      for o in out)
        if sec is not None and sec.result is not None and not self._accepted:
            partial, survivors = sec.result
            self.accept_secure_sum(partial, survivors, 0, 0)  # bytes counted as they came
        return out

    def _take_partial(self, who: str, site_id: str, tid: str, partial: PartialSum,
                      meta: dict[str, Any], data: bytes, nbytes: int) -> Verdict:
        """Check a decoded partial's devices against the open round, journal, merge."""
        op = self.st.open
        assert op is not None
        devices = meta["devices"]
        unknown = sorted(set(devices) - set(op.plans))
        if unknown:
            return self.count_rejection(who, "not_selected",
                                        f"{unknown[0]} is not selected for round {self.round}")
        twice = sorted(set(devices) & set(self._accepted))
        if twice:
            return self.count_rejection(who, "duplicate", f"{twice[0]} is already in round "
                                        f"{self.round}; nothing of this partial was merged")
        self.st.round_bytes[0] += nbytes
        jdir = self._journal_dir(self.round)
        jdir.mkdir(parents=True, exist_ok=True)
        path = jdir / f"{site_id}.{tid}.part"
        atomic_write(path, data)
        try:
            self._merge_partial(partial, meta)
        except (StrategyRefused, ConfigError) as e:
            path.unlink(missing_ok=True)
            return self.count_rejection(who, getattr(e, "reason", "bad_shape"),
                                        f"the strategy refused the partial: {e}")
        for dev in devices:
            self.seen(dev)
        log.info("round %d: merged the partial of %s (%d devices)", self.round, who,
                 len(devices))
        return Verdict(True)

    def _merge_partial(self, partial: PartialSum, meta: dict[str, Any]) -> None:
        assert self._acc is not None
        self._acc.merge(partial)
        for dev, n in meta["devices"].items():
            self._accepted[dev] = int(n)
        self._partials += 1

    def _new_accumulator(self) -> Accumulator:
        """The round's accumulator: the strategy's, or a robust statistic (`fleet.robust`)."""
        from edge_runtime.fl.robust import robust_accumulator

        if self.cfg.dp.on:
            return self._dp_accumulator()
        robust = robust_accumulator(self.strategy_cfg.name, self.global_adapter,
                                    self.cfg.robust)
        return robust if robust is not None else self.strategy.accumulator(
            self.global_adapter, self.round)

    def _dp_accumulator(self) -> Accumulator:
        """Client-level DP (`fl.dp`): clipped changes against each device's start, equal
        weights, the round's selected devices as the denominator, Gaussian noise."""
        from edge_runtime.config import DP_FACTOR_STRATEGIES
        from edge_runtime.fl.dp import DPAccumulator, NoiseSource

        dp = self.cfg.dp
        check = self.strategy.accumulator(self.global_adapter, self.round)  # its own checks
        seed = None if dp.seed is None else dp.seed * 1000003 + self.round
        return DPAccumulator(
            self.global_adapter,
            "factor" if self.strategy_cfg.name in DP_FACTOR_STRATEGIES else "product",
            dp.clip, dp.noise_multiplier * dp.clip, NoiseSource(seed), self._start_of,
            lambda: self.st.open.plans if self.st.open is not None else (), check.add)

    def _dp_record(self, participants: int) -> dict[str, Any] | None:
        """The round's `dp` metrics entry (`fl.privacy.dp_round_record`); None when off."""
        from edge_runtime.fl.dp import DPAccumulator
        from edge_runtime.fl.privacy import RoundSampling, dp_round_record

        dp, op = self.cfg.dp, self.st.open
        if not dp.on or op is None:
            return None
        sampling = RoundSampling(max(op.pool, len(op.plans)), len(op.plans),
                                 amplified=op.extensions == 0)
        clipped = self._acc.clipped if isinstance(self._acc, DPAccumulator) else 0
        return dp_round_record(dp.clip, dp.noise_multiplier, dp.delta,
                               [m.dp for m in self.st.metrics[1:]], sampling, clipped,
                               participants)

    def _weight_cap(self, dev: str, n: int) -> int:
        """The sample count `dev` may be weighted by (`FleetConfig.weight_cap`)."""
        return capped_weight(self.cfg.weight_cap, n, self.st.devices[dev].n_samples, self.recipe)

    def _start_of(self, dev: str) -> Adapter:
        """What `dev` started this round from (the strategy's distribution, and a fresh
        adapter seeded as the device seeds it where the strategy draws one)."""
        assert self.st.open is not None
        plan = ClientPlan.from_json(self.st.open.plans[dev])
        received = self.strategy.distribute(self.global_adapter, plan)
        _, start = self.strategy.local_start(received, plan,
                                             device_seed(self.recipe.seed, self.round, dev))
        return start

    def _clip_round(self) -> None:
        """Adaptive clipping at the close: updates whose change of the model is above
        `clip_multiple` x the round's median are pulled back (`fl.clipping`) and the
        round is folded again, in arrival order.

        Streams the journal: one update in memory at a time (a pass for the norms, a
        second only if one is clipped), not every update and its start at once.
        """
        from edge_runtime.fl.clipping import adaptive_bound, change_norm, clip_to

        jdir = self._journal_dir(self.round)

        def journaled(d: str) -> tuple[Adapter, int]:
            adapter, meta = decode_adapter((jdir / f"{d}.bin").read_bytes())
            return adapter, int(meta["n_samples"])

        order = [d for d in self._accepted if (jdir / f"{d}.bin").is_file()]
        if len(order) < self.cfg.clip_min_updates:
            return
        norms = {d: change_norm(journaled(d)[0], self._start_of(d)) for d in order}
        bound = adaptive_bound(list(norms.values()), self.cfg.clip_multiple)
        if max(norms.values()) <= bound:
            return
        self._acc = self._new_accumulator()
        for d in order:
            adapter, n = journaled(d)
            if norms[d] > bound:
                adapter, t, before = clip_to(adapter, self._start_of(d), bound)
                self._clips.setdefault(d, {})["norm"] = [round(before, 6), round(bound, 6),
                                                         round(t, 6)]
                log.warning("round %d: %s changed the model by %.4g, above %.1f x the median "
                            "(%.4g); clipped (t = %.3f)", self.round, d, before,
                            self.cfg.clip_multiple, bound / self.cfg.clip_multiple, t)
            plan = ClientPlan.from_json(self.st.open.plans[d]) if self.st.open else None
            self._acc.add(ClientUpdate(d, adapter, n, plan=plan))

    def _fold(self, dev: str, adapter: Adapter, n: int) -> None:
        assert self._acc is not None and self.st.open is not None
        plan = ClientPlan.from_json(self.st.open.plans[dev])
        self._acc.add(ClientUpdate(dev, adapter, n, plan=plan))
        self._accepted[dev] = n

    def ready_to_close(self) -> bool:
        """All selected devices answered, or the deadline passed (with SecAgg: its last
        stage ended, `rounds.secure`)."""
        op = self.st.open
        if op is None:
            return False
        if self._secure is not None:
            return self._secure.done or self.clock() >= op.deadline_unix + 2 * self._secure.grace
        if op.plans and set(self._accepted) >= set(op.plans):
            return True
        return self.clock() >= op.deadline_unix

    def close_round(self, duration_s: float | None = None) -> RoundRecord | None:
        """Merge and persist; or, below quorum at the deadline, extend it (returns None).

        `duration_s`: how long the round took (a simulation's clock); default: wall time
        since it opened.
        """
        op = self.st.open
        assert op is not None and self._acc is not None
        if (len(self._accepted) < self.cfg.min_clients and op.extensions < MAX_EXTENSIONS
                and op.secagg is None):  # a SecAgg roster is fixed when the round opens
            op.extensions += 1
            op.deadline_unix = self.clock() + self.cfg.round_timeout_s
            op.plans.update(self._select(set(op.plans)))  # late joiners get a plan
            self._save_state()
            log.warning("round %d: %d/%d updates at the deadline; extending (%d/%d)",
                        self.round, len(self._accepted), self.cfg.min_clients, op.extensions,
                        MAX_EXTENSIONS)
            return None
        selected = sorted(op.plans)
        stragglers = [d for d in selected if d not in self._accepted]
        if stragglers:
            for reasons in (self.st.rejected, self.st.round_rejected):
                reasons["straggler_dropped"] = reasons.get("straggler_dropped", 0) + len(stragglers)
        # a site's partial sum hides its devices' updates: no clipping or diagnostics
        # over them (a site's devices are checked and weight-capped at the site)
        whole = self._partials == 0
        if self._accepted and self.cfg.clip_multiple > 0 and whole:
            self._clip_round()
        new_global = self._acc.result() if self._accepted else self.global_adapter
        diag = self._diagnostics(new_global) if self.cfg.diagnostics_rank and whole else None
        ev = self.evaluator(new_global) if self.evaluator is not None else None
        took = duration_s if duration_s is not None else self.clock() - op.started_unix
        loss, acc = _scores(ev)
        rec = RoundRecord(round=self.round + 1, eval_loss=loss, eval_accuracy=acc,
                          bytes_up=self.st.round_bytes[0], bytes_down=self.st.round_bytes[1],
                          time_s=round(self.st.metrics[-1].time_s + took, 6),
                          participants=len(self._accepted), selected=selected,
                          stragglers=len(stragglers), rejected=dict(self.st.round_rejected),
                          diagnostics=diag, accepted=sorted(self._accepted),
                          clipped={d: dict(c) for d, c in sorted(self._clips.items())},
                          dp=self._dp_record(len(self._accepted)))
        atomic_write(self._global_path(self.round + 1), encode_adapter(new_global))
        closed = self.round
        self.st.metrics.append(rec)
        self.st.round += 1
        self.st.open = None
        self._accepted = {}
        self._clips = {}
        self._partials = 0
        self._secure = None
        self._acc = None
        self.global_adapter = new_global
        self.st.round_bytes = [0, 0]
        self.st.round_rejected = {}
        self._save_state()  # commit point
        shutil.rmtree(self._journal_dir(closed), ignore_errors=True)
        old = self._global_path(closed - 1)
        if closed >= 1 and old.exists():
            old.unlink()
        log.info("round %d merged: %d participants, %d stragglers, eval_loss %s", closed + 1,
                 rec.participants, rec.stragglers, rec.eval_loss)
        return rec

    def _diagnostics(self, new_global: Adapter) -> dict[str, float] | None:
        """`fl.diagnostics` over the open round's journaled updates."""
        from edge_runtime.fl.diagnostics import aggregation_diagnostics

        jdir = self._journal_dir(self.round)
        updates = []
        for f in sorted(jdir.glob("*.bin")) if jdir.is_dir() else []:
            adapter, meta = decode_adapter(f.read_bytes())
            updates.append(ClientUpdate(f.stem, adapter, int(meta["n_samples"])))
        if not updates:
            return None
        d = aggregation_diagnostics(new_global, updates, self.cfg.diagnostics_rank,
                                    prior=self.strategy.exact_prior(self.global_adapter))
        return {k: round(v, 6) for k, v in d.items()}

    def plans(self) -> dict[str, dict[str, Any]]:
        """{device: {class, n_samples, modules, depth, rank_sum, max_rank}} of each device's
        plan now."""
        out = {}
        for dev in sorted(self.st.devices):
            p = self._plan(dev)
            info = {"class": self.st.devices[dev].device_class,
                    "n_samples": self.st.devices[dev].n_samples}
            if p is None:
                out[dev] = {**info, "modules": 0, "depth": 0, "rank_sum": 0, "max_rank": 0}
                continue
            out[dev] = {**info, "modules": len(p.ranks),
                        "depth": len({n.split(".")[2] for n in p.ranks}),
                        "rank_sum": sum(p.ranks.values()),
                        "max_rank": max(p.ranks.values(), default=0)}
        return out

    def metrics_json(self, config: dict[str, Any], clock: str = "wall") -> dict[str, Any]:
        return metrics_document(self.strategy_cfg.name.value, config, self.st.metrics,
                                dict(self.st.rejected), self.plans(), clock, self.fingerprint)


def metrics_document(strategy: str, config: dict[str, Any], records: list[RoundRecord],
                     rejected: dict[str, int], plans: dict[str, Any], clock: str,
                     fingerprint: str) -> dict[str, Any]:
    """The one metrics.json schema (README, "Metrics")."""
    return {"schema": METRICS_SCHEMA, "strategy": strategy, "clock": clock,
            "base_fingerprint": fingerprint, "config": config,
            "rounds": [r.to_json() for r in records],
            "fleet": {"rejected": rejected, "plans": plans}}

