"""The fleet wire protocol: topic names and the JSON messages exchanged over MQTT.

Everything that crosses the wire is either a JSON object (UTF-8, one message per MQTT
publish) or raw chunk bytes of a transfer (see `transfer.py`). Nothing is pickled.
docs/PROTOCOL.md is the prose version of this file; keep the two in step.

Topics live under `{prefix}/{fleet}` (`Topics.base`):

    agg/round                        retained  RoundAnnouncement            aggregator -> all
    agg/status                       retained  AggregatorStatus (+ Will)    aggregator -> all
    agg/down/{tid}/m                 retained  Manifest of a global adapter aggregator -> all
    agg/down/{tid}/c/{offset}        retained  chunk bytes                  aggregator -> all
    dev/{id}/register                          Register                     device -> aggregator
    dev/{id}/presence                retained  Presence (+ Will "offline")  device -> all
    dev/{id}/up/{tid}/m                        Manifest of an update        device -> aggregator
    dev/{id}/up/{tid}/c/{offset}               chunk bytes                  device -> aggregator
    dev/{id}/ack                               Ack (accepted / rejected)    aggregator -> device

Hierarchical aggregation (a site broker bridged to the root's, `rounds/site.py`):

    agg/site/{tid}/m, .../c/{offset} retained  the whole global adapter     root -> sites
    site/{site}/up/{tid}/m, .../c/{off}        a site's partial sum         site -> root
    site/{site}/ack                            Ack of a partial             root -> site

A device writes only below `dev/{its id}/`, which a broker ACL can enforce
(`pattern write edge-rt/+/dev/%u/#` in Mosquitto).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_runtime.config import DEVICE_ID_RE
from edge_runtime.errors import UserError

__all__ = [
    "PROTOCOL_VERSION",
    "DEFAULT_CHUNK_SIZE",
    "ProtocolError",
    "Topics",
    "ParsedTopic",
    "Manifest",
    "Register",
    "Presence",
    "RoundAnnouncement",
    "DevicePlan",
    "Ack",
    "AggregatorStatus",
    "REJECT_REASONS",
    "decode_json",
    "encode_json",
]

PROTOCOL_VERSION = 3  # 2: the announcement carries the strategy's typed config; 3: its
# plans are sent once each (`plans` + a device -> index map), not once per device
DEFAULT_CHUNK_SIZE = 64 * 1024  # cloud brokers cap a message at 128-256 KB
MAX_JSON_BYTES = 1 << 20
# update: device -> aggregator; global: aggregator -> devices (and the whole global to
# site aggregators); partial: a site aggregator's partial sum -> the root; masked: a
# device's masked vector under secure aggregation
MANIFEST_KINDS = ("update", "global", "partial", "masked")
# secure aggregation's stage messages (dev/{id}/sa/{stage} up, agg/sa/{id}/{stage} down)
SA_STAGES = ("advertise", "share", "unmask", "roster", "inbox")  # a JSON control message larger than this is garbage


# Every reason an update can be refused with; counters are keyed by these.
REJECT_REASONS: tuple[str, ...] = (
    "bad_manifest",  # manifest JSON missing fields / wrong types
    "garbage",  # payload is not a valid adapter encoding
    "bad_checksum",  # reassembled bytes do not match the manifest's sha256
    "oversize",  # declared or actual size above the limit
    "bad_fingerprint",  # trained on another base model
    "bad_keys",  # module names differ from the plan
    "bad_shape",  # factor shapes do not fit the base model's layers
    "rank_above_plan",  # a module's rank is above what the plan allows
    "non_finite",  # NaN or Inf in a factor
    "norm_bound",  # ||scale * B A||_F above the bound
    "not_selected",  # device was not selected for this round
    "stale_round",  # update for a round that is not the current one (replay)
    "late",  # straggler: arrived after its round closed
    "duplicate",  # this device already has an accepted update in the round
    "incomplete",  # transfer did not complete before the round closed
)


class ProtocolError(UserError):
    """A message on the wire is malformed (bad JSON, missing field, wrong type or range)."""


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def decode_json(payload: bytes, what: str) -> dict[str, Any]:
    """Parse one JSON object from a payload, or raise ProtocolError naming `what`."""
    if len(payload) > MAX_JSON_BYTES:
        raise ProtocolError(f"{what}: JSON message of {len(payload)} bytes is above {MAX_JSON_BYTES}")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{what}: not a UTF-8 JSON object ({e})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    if key not in d:
        raise ProtocolError(f"{what}: missing field {key!r}")
    v = d[key]
    # bool is an int subclass; never accept it where a number is meant
    if isinstance(v, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise ProtocolError(f"{what}: field {key!r} must be {typ}, got bool")
    if not isinstance(v, typ):
        raise ProtocolError(f"{what}: field {key!r} must be {typ}, got {type(v).__name__}")
    return v


def _check_version(d: dict[str, Any], what: str) -> None:
    v = _get(d, "version", int, what)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"{what}: protocol version {v}, this side speaks {PROTOCOL_VERSION}; "
                            "run the same edge-runtime version on the aggregator and devices")


def check_id(value: str, what: str) -> str:
    """Device and transfer ids: 1-64 of [A-Za-z0-9_.-] (safe in topics and file names)."""
    if not isinstance(value, str) or not DEVICE_ID_RE.match(value):
        raise ProtocolError(f"{what}: id {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


@dataclass(frozen=True)
class ParsedTopic:
    """A topic split into its parts; `kind` is one of the names in `Topics.parse`."""

    kind: str
    device_id: str | None = None
    transfer_id: str | None = None
    offset: int | None = None


@dataclass(frozen=True)
class Topics:
    """Topic names for one fleet."""

    prefix: str = "edge-rt"
    fleet: str = "default"

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.fleet}"

    # aggregator -> all
    def round(self) -> str:
        return f"{self.base}/agg/round"

    def status(self) -> str:
        return f"{self.base}/agg/status"

    def down_manifest(self, tid: str) -> str:
        return f"{self.base}/agg/down/{tid}/m"

    def down_chunk(self, tid: str, offset: int) -> str:
        return f"{self.base}/agg/down/{tid}/c/{offset}"

    def down_all(self) -> str:
        return f"{self.base}/agg/down/#"

    # secure aggregation (edge_runtime.secagg): small stage messages; masked vectors go as
    # uploads with manifest kind "masked"
    def sa_up(self, dev: str, stage: str) -> str:
        return f"{self.base}/dev/{dev}/sa/{stage}"

    def sa_down(self, dev: str, stage: str) -> str:
        return f"{self.base}/agg/sa/{dev}/{stage}"

    def sa_unmask(self) -> str:
        return f"{self.base}/agg/sa/unmask"

    # hierarchical aggregation
    def site_global_manifest(self, tid: str) -> str:
        return f"{self.base}/agg/site/{tid}/m"

    def site_global_chunk(self, tid: str, offset: int) -> str:
        return f"{self.base}/agg/site/{tid}/c/{offset}"

    def partial_manifest(self, site: str, tid: str) -> str:
        return f"{self.base}/site/{site}/up/{tid}/m"

    def partial_chunk(self, site: str, tid: str, offset: int) -> str:
        return f"{self.base}/site/{site}/up/{tid}/c/{offset}"

    def site_ack(self, site: str) -> str:
        return f"{self.base}/site/{site}/ack"

    def site_subscriptions(self, site: str) -> list[str]:
        """A site aggregator's, on its own broker: the root's rounds and whole global
        (bridged down), its devices' messages, and its own acks (bridged down)."""
        b = self.base
        return [self.round(), f"{b}/agg/site/#", f"{b}/dev/+/register", f"{b}/dev/+/presence",
                f"{b}/dev/+/up/#", self.site_ack(site)]

    # device -> aggregator
    def register(self, dev: str) -> str:
        return f"{self.base}/dev/{dev}/register"

    def presence(self, dev: str) -> str:
        return f"{self.base}/dev/{dev}/presence"

    def up_manifest(self, dev: str, tid: str) -> str:
        return f"{self.base}/dev/{dev}/up/{tid}/m"

    def up_chunk(self, dev: str, tid: str, offset: int) -> str:
        return f"{self.base}/dev/{dev}/up/{tid}/c/{offset}"

    def ack(self, dev: str) -> str:
        return f"{self.base}/dev/{dev}/ack"

    # subscriptions
    def aggregator_subscriptions(self) -> list[str]:
        b = self.base
        return [f"{b}/dev/+/register", f"{b}/dev/+/presence", f"{b}/dev/+/up/#",
                f"{b}/site/+/up/#", f"{b}/dev/+/sa/+"]

    def device_subscriptions(self, dev: str) -> list[str]:
        return [self.round(), self.status(), self.down_all(), self.ack(dev),
                f"{self.base}/agg/sa/{dev}/#", self.sa_unmask()]

    def parse(self, topic: str) -> ParsedTopic:
        """Classify a topic of this fleet; raises ProtocolError for anything else.

        kinds: round, status, down_manifest, down_chunk, register, presence,
        up_manifest, up_chunk, ack; site_global_manifest, site_global_chunk,
        partial_manifest, partial_chunk, site_ack (`device_id` holds the site id).
        """
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            raise ProtocolError(f"topic {topic!r} is not under {self.base}")
        parts = topic[len(prefix):].split("/")
        try:
            if parts == ["agg", "round"]:
                return ParsedTopic("round")
            if parts == ["agg", "status"]:
                return ParsedTopic("status")
            if parts[:2] == ["agg", "down"] and len(parts) == 4 and parts[3] == "m":
                return ParsedTopic("down_manifest", transfer_id=check_id(parts[2], topic))
            if parts[:2] == ["agg", "down"] and len(parts) == 5 and parts[3] == "c":
                return ParsedTopic("down_chunk", transfer_id=check_id(parts[2], topic),
                                   offset=_parse_offset(parts[4], topic))
            if parts == ["agg", "sa", "unmask"]:
                return ParsedTopic("sa_unmask")
            if parts[:2] == ["agg", "sa"] and len(parts) == 4 and parts[3] in SA_STAGES:
                return ParsedTopic("sa_down", device_id=check_id(parts[2], topic),
                                   transfer_id=parts[3])
            if parts[:2] == ["agg", "site"] and len(parts) == 4 and parts[3] == "m":
                return ParsedTopic("site_global_manifest", transfer_id=check_id(parts[2], topic))
            if parts[:2] == ["agg", "site"] and len(parts) == 5 and parts[3] == "c":
                return ParsedTopic("site_global_chunk", transfer_id=check_id(parts[2], topic),
                                   offset=_parse_offset(parts[4], topic))
            if parts[0] == "site" and len(parts) >= 3:
                site = check_id(parts[1], topic)
                rest = parts[2:]
                if rest == ["ack"]:
                    return ParsedTopic("site_ack", device_id=site)
                if rest[0] == "up" and len(rest) == 3 and rest[2] == "m":
                    return ParsedTopic("partial_manifest", device_id=site,
                                       transfer_id=check_id(rest[1], topic))
                if rest[0] == "up" and len(rest) == 4 and rest[2] == "c":
                    return ParsedTopic("partial_chunk", device_id=site,
                                       transfer_id=check_id(rest[1], topic),
                                       offset=_parse_offset(rest[3], topic))
            if parts[0] == "dev" and len(parts) >= 3:
                dev = check_id(parts[1], topic)
                rest = parts[2:]
                if rest in (["register"], ["presence"], ["ack"]):
                    return ParsedTopic(rest[0], device_id=dev)
                if rest[0] == "sa" and len(rest) == 2 and rest[1] in SA_STAGES:
                    return ParsedTopic("sa_up", device_id=dev, transfer_id=rest[1])
                if rest[0] == "up" and len(rest) == 3 and rest[2] == "m":
                    return ParsedTopic("up_manifest", device_id=dev,
                                       transfer_id=check_id(rest[1], topic))
                if rest[0] == "up" and len(rest) == 4 and rest[2] == "c":
                    return ParsedTopic("up_chunk", device_id=dev,
                                       transfer_id=check_id(rest[1], topic),
                                       offset=_parse_offset(rest[3], topic))
        except IndexError:
            pass
        raise ProtocolError(f"topic {topic!r} is not part of the protocol")


def _parse_offset(s: str, topic: str) -> int:
    if not s.isdigit() or len(s) > 15:
        raise ProtocolError(f"topic {topic!r}: chunk offset {s!r} is not a non-negative integer")
    return int(s)


@dataclass
class Manifest:
    """Describes one transfer: its bytes are sent as chunks at offsets 0, chunk_size, ...

    `kind` is "update" (device -> aggregator), "global" (aggregator -> devices and
    sites) or "partial" (a site aggregator's partial sum -> the root).
    `meta` carries the adapter's context (round, n_samples, train loss, ...).
    """

    transfer_id: str
    kind: str
    size: int
    sha256: str
    chunk_size: int
    round: int
    device_id: str = ""
    encoding: str = "safetensors"
    compression: str = "fp32"
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def to_bytes(self) -> bytes:
        return encode_json(asdict(self))

    @classmethod
    def from_bytes(cls, payload: bytes) -> Manifest:
        what = "manifest"
        d = decode_json(payload, what)
        _check_version(d, what)
        m = cls(
            transfer_id=check_id(_get(d, "transfer_id", str, what), what),
            kind=_get(d, "kind", str, what),
            size=_get(d, "size", int, what),
            sha256=_get(d, "sha256", str, what),
            chunk_size=_get(d, "chunk_size", int, what),
            round=_get(d, "round", int, what),
            device_id=d.get("device_id", ""),
            encoding=d.get("encoding", "safetensors"),
            compression=d.get("compression", "fp32"),
            meta=d.get("meta", {}),
            version=_get(d, "version", int, what),
        )
        if m.kind not in MANIFEST_KINDS:
            raise ProtocolError(f"{what}: kind {m.kind!r} must be one of {MANIFEST_KINDS}")
        if m.size < 0 or m.chunk_size <= 0 or m.round < 0:
            raise ProtocolError(f"{what}: size, chunk_size and round must be non-negative")
        if not re.fullmatch(r"[0-9a-f]{64}", m.sha256):
            raise ProtocolError(f"{what}: sha256 must be 64 lowercase hex digits")
        if not isinstance(m.meta, dict) or not isinstance(m.device_id, str):
            raise ProtocolError(f"{what}: meta must be an object and device_id a string")
        if m.encoding != "safetensors" or m.compression not in ("fp32", "fp16", "int8"):
            raise ProtocolError(f"{what}: encoding {m.encoding!r}/{m.compression!r} unsupported; "
                                "use safetensors with fp32, fp16 or int8")
        return m


@dataclass
class Register:
    """A device introduces itself: its profile (measured or declared) and data size."""

    device_id: str
    fingerprint: str
    n_samples: int
    profile: dict[str, Any] = field(default_factory=dict)
    device_class: str = ""
    version: int = PROTOCOL_VERSION

    def to_bytes(self) -> bytes:
        return encode_json(asdict(self))

    @classmethod
    def from_bytes(cls, payload: bytes) -> Register:
        what = "register"
        d = decode_json(payload, what)
        r = cls(
            device_id=check_id(_get(d, "device_id", str, what), what),
            fingerprint=_get(d, "fingerprint", str, what),
            n_samples=_get(d, "n_samples", int, what),
            profile=d.get("profile", {}),
            device_class=d.get("device_class", ""),
            version=_get(d, "version", int, what),
        )
        if not isinstance(r.profile, dict) or not isinstance(r.device_class, str):
            raise ProtocolError(f"{what}: profile must be an object, device_class a string")
        if r.n_samples < 0:
            raise ProtocolError(f"{what}: n_samples must be >= 0")
        return r


@dataclass
class Presence:
    device_id: str
    online: bool

    def to_bytes(self) -> bytes:
        return encode_json(asdict(self))

    @classmethod
    def from_bytes(cls, payload: bytes) -> Presence:
        d = decode_json(payload, "presence")
        return cls(device_id=check_id(_get(d, "device_id", str, "presence"), "presence"),
                   online=_get(d, "online", bool, "presence"))


@dataclass
class DevicePlan:
    """What one selected device does this round: its LoRA plan and which download is its own."""

    plan: dict[str, Any]  # ClientPlan.to_json()
    global_transfer_id: str
    train: dict[str, Any] = field(default_factory=dict)  # the training recipe (TrainConfig)


@dataclass
class RoundAnnouncement:
    """The aggregator opens round `round`; selected devices train until `deadline_unix`."""

    round: int
    deadline_unix: float
    fingerprint: str
    strategy: dict[str, Any]  # StrategyConfig.to_json(): name and every setting
    devices: dict[str, DevicePlan]
    finished: bool = False  # no more rounds; apply the global adapter and stop
    # secure aggregation this round: SecAggParams JSON plus "layout" (`secagg.layout`)
    secagg: dict[str, Any] | None = None
    version: int = PROTOCOL_VERSION

    def to_bytes(self) -> bytes:
        """The wire form: each distinct (plan, download, recipe) once in `plans`, and
        `devices` maps a device id to its index there; a plan's `device_id`, when it is
        the device's own, is not repeated. 1,000 devices of one plan: ~15 kB, where one
        entry per device was 2.5 MB (above MAX_JSON_BYTES from ~420 devices, and sent to
        every device: quadratic traffic)."""
        plans: list[dict[str, Any]] = []
        index: dict[bytes, int] = {}
        devices: dict[str, int] = {}
        for dev, dp in sorted(self.devices.items()):
            plan = {k: v for k, v in dp.plan.items() if not (k == "device_id" and v == dev)}
            entry = {"plan": plan, "global_transfer_id": dp.global_transfer_id,
                     "train": dp.train}
            key = encode_json(entry)
            if key not in index:
                index[key] = len(plans)
                plans.append(entry)
            devices[dev] = index[key]
        return encode_json({"round": self.round, "deadline_unix": self.deadline_unix,
                            "fingerprint": self.fingerprint, "strategy": self.strategy,
                            "plans": plans, "devices": devices, "finished": self.finished,
                            "secagg": self.secagg, "version": self.version})

    @classmethod
    def from_bytes(cls, payload: bytes) -> RoundAnnouncement:
        """Parse the wire form (`to_bytes`); each device's plan names the device
        (`device_id`) unless it names another."""
        what = "round announcement"
        d = decode_json(payload, what)
        _check_version(d, what)
        entries: list[tuple[dict[str, Any], str, dict[str, Any]]] = []
        for p in _get(d, "plans", list, what):
            if not isinstance(p, dict) or not isinstance(p.get("train", {}), dict):
                raise ProtocolError(f"{what}: each of plans must be an object with an "
                                    "object 'train'")
            entries.append((_get(p, "plan", dict, what),
                            check_id(_get(p, "global_transfer_id", str, what), what),
                            p.get("train", {})))
        devices: dict[str, DevicePlan] = {}
        for dev, i in _get(d, "devices", dict, what).items():
            check_id(dev, what)
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(entries):
                raise ProtocolError(f"{what}: device {dev} names plan {i!r}; there are "
                                    f"{len(entries)}")
            plan, tid, train = entries[i]
            devices[dev] = DevicePlan(plan={"device_id": dev, **plan}, global_transfer_id=tid,
                                      train=dict(train))
        return cls(
            round=_get(d, "round", int, what),
            deadline_unix=float(_get(d, "deadline_unix", (int, float), what)),
            fingerprint=_get(d, "fingerprint", str, what),
            strategy=_get(d, "strategy", dict, what),
            devices=devices,
            finished=bool(d.get("finished", False)),
            secagg=d.get("secagg") if isinstance(d.get("secagg"), dict) else None,
            version=_get(d, "version", int, what),
        )


@dataclass
class Ack:
    """Application-level answer to an update (MQTT 3.1.1 brokers drop oversize publishes
    silently, so the sender learns the outcome only from this)."""

    device_id: str
    round: int
    transfer_id: str
    status: str  # "accepted" | "rejected"
    reason: str = ""
    detail: str = ""

    def to_bytes(self) -> bytes:
        return encode_json(asdict(self))

    @classmethod
    def from_bytes(cls, payload: bytes) -> Ack:
        what = "ack"
        d = decode_json(payload, what)
        a = cls(device_id=_get(d, "device_id", str, what), round=_get(d, "round", int, what),
                transfer_id=_get(d, "transfer_id", str, what), status=_get(d, "status", str, what),
                reason=d.get("reason", ""), detail=d.get("detail", ""))
        if a.status not in ("accepted", "rejected"):
            raise ProtocolError(f"{what}: status {a.status!r} must be accepted or rejected")
        return a


@dataclass
class AggregatorStatus:
    online: bool
    round: int = -1
    finished: bool = False

    def to_bytes(self) -> bytes:
        return encode_json(asdict(self))

    @classmethod
    def from_bytes(cls, payload: bytes) -> AggregatorStatus:
        d = decode_json(payload, "status")
        return cls(online=_get(d, "online", bool, "status"), round=int(d.get("round", -1)),
                   finished=bool(d.get("finished", False)))
