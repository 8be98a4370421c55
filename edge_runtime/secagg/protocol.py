"""SecAgg+ (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning"; Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Log
Overhead"): the server learns the sum of the surviving devices' vectors, not any one.

Four stages, each a message per device and an answer from the server:

1. `advertise`: a device sends two X25519 public keys (c: to seal shares, s: masks).
2. `share`: it draws a self-mask seed b, Shamir-shares b and its s secret key t-of-k
   among its k neighbours (a circulant graph on a seeded permutation of the selected
   devices; k >= n - 1 is the complete graph of SecAgg), and seals each neighbour's
   shares under the key agreed from the c keys. The server routes the sealed shares.
3. `mask`: y = x + PRG(b) + sum over neighbours v that shared: +-PRG(s_uv) on Z_2^64
   (+ when u < v), with s_uv agreed from the s keys (the same at both ends): the pair
   masks cancel in the sum, the self masks do not.
4. `unmask`: the server names the survivors (sent y) and the dropped (shared, sent no
   y). Each survivor opens its neighbours' shares: b shares of survivors, s-key shares
   of the dropped; never both for one device, and only if at least t survive. The
   server rebuilds each survivor's b and removes PRG(b), rebuilds each dropped device's
   s key and removes the pair masks its surviving neighbours added, and decodes.

A device that drops after sending y still counts: its b is rebuilt from its neighbours'
shares. Messages are JSON (bytes base64) and every refusal is a `SecAggError`, so one
device's garbage drops that device, never the round.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.secagg import fixed_point
from edge_runtime.secagg.primitives import (
    KeyPair,
    SecAggCryptoError,
    combine_shares,
    new_seed,
    prg_words,
    seal,
    share_secret,
    unseal,
)

__all__ = ["SecAggParams", "SecAggError", "DeviceSession", "ServerSession", "neighbours",
           "run_in_process"]


class SecAggError(ValueError):
    """A SecAgg message is malformed or breaks the protocol (the sender is dropped)."""


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any, what: str) -> bytes:
    if not isinstance(s, str):
        raise SecAggError(f"{what} must be base64 text")
    try:
        return base64.b64decode(s, validate=True)
    except ValueError:
        raise SecAggError(f"{what} is not base64") from None


def _msg(data: bytes, what: str) -> dict[str, Any]:
    try:
        d = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SecAggError(f"{what} is not JSON") from None
    if not isinstance(d, dict):
        raise SecAggError(f"{what} is not an object")
    return d


@dataclass(frozen=True)
class SecAggParams:
    """What every party of one round's SecAgg agrees on (the server announces it).

    Attributes:
        round: the round (bound into every derived key).
        devices: the selected devices.
        vector_size: length of each device's vector.
        degree: neighbours per device (>= len(devices) - 1: all of them).
        threshold: shares needed to rebuild a secret (<= degree).
        frac_bits: fixed-point fraction bits (`fixed_point`).
    """

    round: int
    devices: tuple[str, ...]
    vector_size: int
    degree: int
    threshold: int
    frac_bits: int = fixed_point.FRAC_BITS

    def __post_init__(self) -> None:
        n = len(self.devices)
        if n < 2 or len(set(self.devices)) != n:
            raise SecAggError("secure aggregation needs at least 2 distinct devices")
        if not 1 <= self.threshold <= min(self.degree, n - 1):
            raise SecAggError(f"threshold {self.threshold} must be in 1..min(degree, n - 1)")
        if self.threshold < 2 and n > 2:
            raise SecAggError("a threshold of 1 lets one neighbour open a device's secrets")

    @classmethod
    def choose(cls, round: int, devices: list[str], vector_size: int, *,
               degree: int = 0, threshold_fraction: float = 0.5,
               frac_bits: int = fixed_point.FRAC_BITS) -> SecAggParams:
        """Defaults: degree ~ 2 ceil(3 log2 n) (SecAgg+'s O(log n), all devices when
        fewer), threshold = floor(fraction x degree) + 1."""
        n = len(devices)
        k = degree or max(4, 2 * math.ceil(3 * math.log2(max(n, 2))))
        k = min(k, n - 1)
        t = min(k, max(2 if n > 2 else 1, int(threshold_fraction * k) + 1))
        return cls(round, tuple(sorted(devices)), vector_size, k, t, frac_bits)

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "devices": list(self.devices),
                "vector_size": self.vector_size, "degree": self.degree,
                "threshold": self.threshold, "frac_bits": self.frac_bits}

    @classmethod
    def from_json(cls, d: Any) -> SecAggParams:
        """`to_json`'s form (extra keys ignored); raises SecAggError when malformed."""
        try:
            return cls(round=int(d["round"]), devices=tuple(str(x) for x in d["devices"]),
                       vector_size=int(d["vector_size"]), degree=int(d["degree"]),
                       threshold=int(d["threshold"]),
                       frac_bits=int(d.get("frac_bits", fixed_point.FRAC_BITS)))
        except (KeyError, TypeError, ValueError) as e:
            raise SecAggError(f"malformed SecAgg parameters ({e})") from None


def neighbours(p: SecAggParams, dev: str) -> list[str]:
    """dev's neighbours: a circulant graph (k/2 each side) on a permutation seeded by the
    round and the roster, so every party computes the same graph."""
    devs = sorted(p.devices)
    n = len(devs)
    if p.degree >= n - 1:
        return [d for d in devs if d != dev]
    seed = hashlib.sha256(json.dumps([p.round, devs]).encode()).digest()
    order = devs[:]
    random.Random(seed).shuffle(order)
    i = order.index(dev)
    half = p.degree // 2
    out = {order[(i + j) % n] for j in range(1, half + 1)}
    out |= {order[(i - j) % n] for j in range(1, p.degree - half + 1)}
    return sorted(out - {dev})


def _mask_info(p: SecAggParams, u: str, v: str) -> bytes:
    a, b = sorted((u, v))
    return f"edge-rt secagg mask r{p.round} {a} {b}".encode()


def _share_info(p: SecAggParams) -> bytes:
    return f"edge-rt secagg shares r{p.round}".encode()


@dataclass
class DeviceSession:
    """One device's side of one round (keeps its secrets; answers each stage once)."""

    params: SecAggParams
    device_id: str
    c: KeyPair = field(default_factory=KeyPair)
    s: KeyPair = field(default_factory=KeyPair)
    b: bytes = field(default_factory=new_seed)
    roster: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # v -> (pk_c, pk_s)
    inbox: dict[str, bytes] = field(default_factory=dict)  # v -> sealed shares from v
    shared: set[str] = field(default_factory=set)  # U2: devices whose shares went out
    answered_unmask: bool = False

    def __post_init__(self) -> None:
        if self.device_id not in self.params.devices:
            raise SecAggError(f"{self.device_id} is not in the round's roster")
        self.nbrs = neighbours(self.params, self.device_id)

    def advertise(self) -> bytes:
        return json.dumps({"device": self.device_id, "c": _b64(self.c.public),
                           "s": _b64(self.s.public)}).encode()

    def share(self, roster: bytes) -> bytes:
        """Stage 2, given the neighbours' advertised keys: sealed shares per neighbour."""
        d = _msg(roster, "roster")
        keys = d.get("keys")
        if not isinstance(keys, dict):
            raise SecAggError("roster lacks keys")
        for v, pair in keys.items():
            if v in self.nbrs and isinstance(pair, list) and len(pair) == 2:
                self.roster[v] = (_unb64(pair[0], "c key"), _unb64(pair[1], "s key"))
        live = sorted(self.roster)
        if len(live) < self.params.threshold:
            raise SecAggError(f"{len(live)} neighbours advertised keys, fewer than the "
                              f"threshold {self.params.threshold}")
        b_shares = share_secret(self.b, self.params.threshold, len(live))
        s_shares = share_secret(self.s.secret, self.params.threshold, len(live))
        sealed = {}
        for v, bs, ss in zip(live, b_shares, s_shares, strict=True):
            key = self.c.agree(self.roster[v][0], _share_info(self.params))
            body = json.dumps({"src": self.device_id, "dst": v, "b": _b64(bs),
                               "s": _b64(ss)}).encode()
            sealed[v] = _b64(seal(key, body))
        return json.dumps({"device": self.device_id, "sealed": sealed}).encode()

    def mask(self, inbox: bytes, x: np.ndarray) -> bytes:
        """Stage 3, given the sealed shares addressed to this device and the set U2 of
        devices that shared: the masked vector of x (float64)."""
        d = _msg(inbox, "inbox")
        sealed, shared = d.get("sealed"), d.get("shared")
        if not isinstance(sealed, dict) or not isinstance(shared, list):
            raise SecAggError("inbox lacks sealed shares or the list of devices that shared")
        self.inbox = {v: _unb64(t, "sealed share") for v, t in sealed.items()
                      if v in self.roster}
        self.shared = {v for v in shared if isinstance(v, str)}
        if x.shape != (self.params.vector_size,):
            raise SecAggError(f"the vector has {x.shape}, the round's size is "
                              f"{self.params.vector_size}")
        y = fixed_point.encode(x, self.params.frac_bits)
        y = y + prg_words(self.b, y.size)
        for v in sorted(self.shared & set(self.roster)):
            seed = self.s.agree(self.roster[v][1], _mask_info(self.params, self.device_id, v))
            m = prg_words(seed, y.size)
            y = y + m if self.device_id < v else y - m
        return json.dumps({"device": self.device_id,
                           "y": _b64(y.astype("<u8").tobytes())}).encode()

    def unmask(self, request: bytes) -> bytes:
        """Stage 4: b shares of surviving neighbours, s-key shares of dropped ones."""
        if self.answered_unmask:
            raise SecAggError("unmasking is answered once per round")
        d = _msg(request, "unmask request")
        survivors, dropped = d.get("survivors"), d.get("dropped")
        if not isinstance(survivors, list) or not isinstance(dropped, list):
            raise SecAggError("unmask request lacks survivors or dropped")
        surv, drop = set(survivors), set(dropped)
        if surv & drop:
            raise SecAggError("a device is both a survivor and dropped: refusing to open "
                              "both of its secrets")
        if self.device_id not in surv or not drop <= self.shared:
            raise SecAggError("the survivors must include this device and the dropped "
                              "must have shared")
        if len(surv) < self.params.threshold:
            raise SecAggError(f"{len(surv)} survivors, fewer than the threshold")
        self.answered_unmask = True
        b_out, s_out = {}, {}
        for v, token in self.inbox.items():
            if v not in surv and v not in drop:
                continue
            key = self.c.agree(self.roster[v][0], _share_info(self.params))
            body = _msg(unseal(key, token), "share")
            if body.get("src") != v or body.get("dst") != self.device_id:
                raise SecAggError(f"a share from {v} names another sender or receiver")
            if v in surv:
                b_out[v] = body["b"]
            else:
                s_out[v] = body["s"]
        return json.dumps({"device": self.device_id, "b": b_out, "s": s_out}).encode()


@dataclass
class ServerSession:
    """The server's side of one round: routes, then removes the masks of the sum."""

    params: SecAggParams
    keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # U1
    sealed: dict[str, dict[str, str]] = field(default_factory=dict)  # U2: src -> dst -> token
    masked: dict[str, np.ndarray] = field(default_factory=dict)  # U3
    b_shares: dict[str, list[bytes]] = field(default_factory=dict)
    s_shares: dict[str, list[bytes]] = field(default_factory=dict)
    unmaskers: set[str] = field(default_factory=set)

    def _sender(self, d: dict[str, Any], dev: str) -> None:
        if d.get("device") != dev or dev not in self.params.devices:
            raise SecAggError(f"a message on behalf of {d.get('device')!r} from {dev!r}")

    def on_advertise(self, dev: str, data: bytes) -> None:
        d = _msg(data, "advertise")
        self._sender(d, dev)
        c, s = _unb64(d.get("c"), "c key"), _unb64(d.get("s"), "s key")
        if len(c) != 32 or len(s) != 32:
            raise SecAggError("public keys are 32 bytes (X25519)")
        self.keys[dev] = (c, s)

    def roster_for(self, dev: str) -> bytes:
        nb = set(neighbours(self.params, dev))
        return json.dumps({"keys": {v: [_b64(c), _b64(s)] for v, (c, s) in
                                    sorted(self.keys.items()) if v in nb}}).encode()

    def on_share(self, dev: str, data: bytes) -> None:
        d = _msg(data, "shares")
        self._sender(d, dev)
        sealed = d.get("sealed")
        nb = set(neighbours(self.params, dev))
        if (dev not in self.keys or not isinstance(sealed, dict)
                or not set(sealed) <= nb & set(self.keys)
                or not all(isinstance(t, str) for t in sealed.values())):
            raise SecAggError(f"{dev}'s shares must go to neighbours that advertised")
        if len(sealed) < self.params.threshold:
            raise SecAggError(f"{dev} shared with {len(sealed)} neighbours, fewer than the "
                              "threshold")
        self.sealed[dev] = dict(sealed)

    def inbox_for(self, dev: str) -> bytes:
        return json.dumps({"sealed": {src: m[dev] for src, m in sorted(self.sealed.items())
                                      if dev in m},
                           "shared": sorted(self.sealed)}).encode()

    def on_masked(self, dev: str, data: bytes) -> None:
        d = _msg(data, "masked input")
        self._sender(d, dev)
        if dev not in self.sealed:
            raise SecAggError(f"{dev} sent a masked input without sharing its keys")
        raw = _unb64(d.get("y"), "masked vector")
        if len(raw) != 8 * self.params.vector_size:
            raise SecAggError(f"{dev}'s masked vector has {len(raw)} bytes, expected "
                              f"{8 * self.params.vector_size}")
        self.masked[dev] = np.frombuffer(raw, dtype="<u8").astype(np.uint64)

    def unmask_request(self) -> bytes:
        survivors = sorted(self.masked)
        dropped = sorted(set(self.sealed) - set(self.masked))
        return json.dumps({"survivors": survivors, "dropped": dropped}).encode()

    def on_unmask(self, dev: str, data: bytes) -> None:
        d = _msg(data, "unmask shares")
        self._sender(d, dev)
        if dev not in self.masked or dev in self.unmaskers:
            raise SecAggError(f"{dev} may answer unmasking once, as a survivor")
        b, s = d.get("b"), d.get("s")
        if not isinstance(b, dict) or not isinstance(s, dict):
            raise SecAggError("unmask shares lack b or s")
        if set(b) - set(self.masked) or set(s) & set(self.masked):
            raise SecAggError(f"{dev} opened secrets the request did not ask for")
        self.unmaskers.add(dev)
        for v, sh in b.items():
            self.b_shares.setdefault(v, []).append(_unb64(sh, "b share"))
        for v, sh in s.items():
            self.s_shares.setdefault(v, []).append(_unb64(sh, "s share"))

    def result(self) -> tuple[np.ndarray, list[str]]:
        """(the float64 sum of the survivors' vectors, the survivors).

        Raises:
            SecAggError: fewer than `threshold` shares for some secret (too many
                dropped during unmasking); nothing can be decoded this round.
        """
        p = self.params
        survivors = sorted(self.masked)
        total = np.zeros(p.vector_size, dtype=np.uint64)
        for y in self.masked.values():
            total = total + y
        for v in survivors:
            shares = self.b_shares.get(v, [])
            if len(shares) < p.threshold:
                raise SecAggError(f"{len(shares)} shares of {v}'s self mask, fewer than the "
                                  f"threshold {p.threshold}")
            try:
                total = total - prg_words(combine_shares(shares[: p.threshold]), p.vector_size)
            except SecAggCryptoError as e:
                raise SecAggError(f"{v}'s self mask: {e}") from None
        for v in sorted(set(self.sealed) - set(self.masked)):
            shares = self.s_shares.get(v, [])
            if len(shares) < p.threshold:
                raise SecAggError(f"{len(shares)} shares of dropped {v}'s key, fewer than the "
                                  f"threshold {p.threshold}")
            sk = KeyPair(combine_shares(shares[: p.threshold]))
            if sk.public != self.keys[v][1]:
                raise SecAggError(f"dropped {v}'s rebuilt key does not match its advertised "
                                  "key (a bad share)")
            for w in neighbours(p, v):
                if w not in self.masked or v not in self.sealed.get(w, {}):
                    continue  # w masked with v only if v was in U2 and w's neighbour
                m = prg_words(sk.agree(self.keys[w][1], _mask_info(p, v, w)), p.vector_size)
                total = total - m if w < v else total + m
        return fixed_point.decode(total, p.frac_bits), survivors


def run_in_process(params: SecAggParams, vectors: dict[str, np.ndarray], *,
                   drop_before_mask: frozenset[str] = frozenset(),
                   drop_after_mask: frozenset[str] = frozenset()
                   ) -> tuple[np.ndarray, list[str], dict[str, int], ServerSession]:
    """One round of the protocol between in-process parties, every message as bytes.

    `drop_before_mask`: devices that share keys, then vanish (their pair masks are
    removed through their rebuilt keys); `drop_after_mask`: devices that send their
    masked vector, then vanish (counted; their self masks are rebuilt). Returns (sum,
    survivors, bytes by direction {"up", "down"}, the server's session).
    """
    server = ServerSession(params)
    devs = {d: DeviceSession(params, d) for d in params.devices}
    wire = {"up": 0, "down": 0}

    def up(b: bytes) -> bytes:
        wire["up"] += len(b)
        return b

    def down(b: bytes) -> bytes:
        wire["down"] += len(b)
        return b

    for d, s in devs.items():
        server.on_advertise(d, up(s.advertise()))
    for d, s in devs.items():
        server.on_share(d, up(s.share(down(server.roster_for(d)))))
    for d, s in devs.items():
        inbox = down(server.inbox_for(d))
        if d in drop_before_mask:
            continue
        server.on_masked(d, up(s.mask(inbox, vectors[d])))
    req = server.unmask_request()
    for d, s in devs.items():
        if d in server.masked and d not in drop_after_mask:
            server.on_unmask(d, up(s.unmask(down(req))))
    total, survivors = server.result()
    return total, survivors, wire, server
