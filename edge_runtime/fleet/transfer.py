"""Chunked transfers: split bytes into offset-addressed chunks, reassemble them safely.

A transfer is a `Manifest` (transfer id, total size, sha256, chunk size) plus chunks at
offsets 0, chunk_size, 2*chunk_size, ... Because each chunk names its own offset,
duplicates (QoS 1 is at-least-once) and reordering are harmless: a chunk already held
is ignored, and the bytes are checked against the sha256 once all are present.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from edge_runtime.errors import UserError
from edge_runtime.fleet.protocol import DEFAULT_CHUNK_SIZE, Manifest

log = logging.getLogger(__name__)

__all__ = [
    "TransferError",
    "new_transfer_id",
    "make_manifest",
    "iter_chunks",
    "Reassembler",
    "TransferTable",
]


class TransferError(UserError):
    """A transfer cannot complete; `reason` is one of protocol.REJECT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def new_transfer_id() -> str:
    return uuid.uuid4().hex[:20]


def make_manifest(data: bytes, *, kind: str, round: int, device_id: str = "",
                  chunk_size: int = DEFAULT_CHUNK_SIZE, compression: str = "fp32",
                  meta: dict | None = None, transfer_id: str | None = None) -> Manifest:
    """The manifest that describes `data` (sha256 over all of it)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return Manifest(
        transfer_id=transfer_id or new_transfer_id(), kind=kind, size=len(data),
        sha256=hashlib.sha256(data).hexdigest(), chunk_size=chunk_size, round=round,
        device_id=device_id, compression=compression, meta=dict(meta or {}),
    )


def iter_chunks(data: bytes, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) for every chunk; an empty payload is one empty chunk at 0."""
    if not data:
        yield 0, b""
        return
    view = memoryview(data)
    for off in range(0, len(data), chunk_size):
        yield off, bytes(view[off:off + chunk_size])


@dataclass
class Reassembler:
    """Collects the chunks of one transfer. Idempotent under duplicates and reordering.

    Chunks may arrive before the manifest; they are held (bounded by `max_bytes`) and
    checked once it arrives.
    """

    max_bytes: int
    manifest: Manifest | None = None
    created: float = field(default_factory=time.monotonic)
    _chunks: dict[int, bytes] = field(default_factory=dict)
    _held: int = 0
    duplicates: int = 0

    def set_manifest(self, m: Manifest) -> None:
        if self.manifest is not None:
            if self.manifest != m:
                raise TransferError("bad_manifest",
                                    f"transfer {m.transfer_id} got two different manifests")
            return
        if m.size > self.max_bytes:
            raise TransferError("oversize", f"transfer {m.transfer_id} declares {m.size} bytes, "
                                f"the limit is {self.max_bytes}")
        self.manifest = m
        for off, data in list(self._chunks.items()):
            self._check_chunk(off, data)

    def _check_chunk(self, offset: int, data: bytes) -> None:
        m = self.manifest
        assert m is not None
        if offset % m.chunk_size != 0 or (offset >= m.size and not (offset == 0 and m.size == 0)):
            raise TransferError("bad_manifest", f"chunk offset {offset} is not a chunk boundary "
                                f"below size {m.size} (chunk size {m.chunk_size})")
        expect = min(m.chunk_size, m.size - offset)
        if len(data) != expect:
            raise TransferError("bad_manifest", f"chunk at {offset} has {len(data)} bytes, "
                                f"expected {expect}")

    def add_chunk(self, offset: int, data: bytes) -> None:
        if offset in self._chunks:
            self.duplicates += 1
            return
        if self._held + len(data) > self.max_bytes:
            raise TransferError("oversize", f"chunks exceed the limit of {self.max_bytes} bytes")
        if self.manifest is not None:
            self._check_chunk(offset, data)
        self._chunks[offset] = data
        self._held += len(data)

    @property
    def received_bytes(self) -> int:
        return self._held

    def missing(self) -> list[int]:
        """Offsets not yet received (empty once complete); all unknown before the manifest."""
        if self.manifest is None:
            return []
        m = self.manifest
        return [o for o in range(0, max(m.size, 1), m.chunk_size) if o not in self._chunks]

    @property
    def complete(self) -> bool:
        return self.manifest is not None and not self.missing()

    def result(self) -> bytes:
        """The reassembled bytes, verified against the manifest's sha256."""
        m = self.manifest
        if m is None or self.missing():
            raise TransferError("incomplete", "transfer is not complete")
        data = b"".join(self._chunks[o] for o in sorted(self._chunks))
        if len(data) != m.size:
            raise TransferError("bad_manifest", f"got {len(data)} bytes, manifest says {m.size}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != m.sha256:
            raise TransferError("bad_checksum", f"sha256 {digest[:12]}... does not match the "
                                f"manifest's {m.sha256[:12]}...")
        return data


class TransferTable:
    """Open transfers keyed by (sender, transfer id), with a bound on count and age.

    A finished transfer id is remembered so a late duplicate chunk does not reopen it.
    """

    def __init__(self, max_bytes: int, max_open: int = 1024, ttl_s: float = 600.0,
                 max_total_bytes: int | None = None, max_per_sender: int = 2) -> None:
        self.max_bytes = max_bytes
        self.max_open = max_open
        self.ttl_s = ttl_s
        self.max_total_bytes = max_total_bytes or 8 * max_bytes
        self.max_per_sender = max_per_sender
        self._open: dict[tuple[str, str], Reassembler] = {}
        self._done: dict[tuple[str, str], float] = {}
        self.evicted = 0  # open transfers dropped because `max_open` were open at once

    def get(self, sender: str, tid: str) -> Reassembler | None:
        """The reassembler for a transfer (created on first sight), or None if it finished."""
        key = (sender, tid)
        if key in self._done:
            return None
        r = self._open.get(key)
        if r is None:
            self.expire()
            mine = sorted((k for k in self._open if k[0] == sender),
                          key=lambda k: self._open[k].created)
            for k in mine[: max(0, len(mine) - self.max_per_sender + 1)]:
                del self._open[k]  # a device has at most a couple of uploads in flight
            if len(self._open) >= self.max_open:
                oldest = min(self._open, key=lambda k: self._open[k].created)
                del self._open[oldest]
                self.evicted += 1
                log.warning("dropped the open upload %s of %s: %d uploads open at once "
                            "(max_open); its sender re-sends it", oldest[1], oldest[0],
                            self.max_open)
            r = self._open[key] = Reassembler(self.max_bytes)
        return r

    def enforce_budget(self) -> list[tuple[str, str]]:
        """Drop the oldest transfers holding bytes while all hold more than the budget."""
        dropped: list[tuple[str, str]] = []
        total = sum(r.received_bytes for r in self._open.values())
        while total > self.max_total_bytes:
            holding = [k for k, r in self._open.items() if r.received_bytes]
            oldest = min(holding, key=lambda k: self._open[k].created)
            total -= self._open.pop(oldest).received_bytes
            dropped.append(oldest)
        return dropped

    def finish(self, sender: str, tid: str) -> None:
        key = (sender, tid)
        self._open.pop(key, None)
        self._done[key] = time.monotonic()

    def drop_sender(self, sender: str) -> None:
        for key in [k for k in self._open if k[0] == sender]:
            del self._open[key]

    def expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, r in self._open.items() if now - r.created > self.ttl_s]:
            del self._open[key]
        for key in [k for k, t in self._done.items() if now - t > 4 * self.ttl_s]:
            del self._done[key]

    def open_transfers(self) -> list[tuple[str, str]]:
        return list(self._open)
