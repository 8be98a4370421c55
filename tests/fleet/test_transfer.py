"""Chunking and reassembly: duplicates, reordering, bad sha, oversize, garbage."""

from __future__ import annotations

import hashlib
import random

import pytest

from edge_runtime.fleet.protocol import Manifest, ProtocolError
from edge_runtime.fleet.transfer import (
    Reassembler,
    TransferError,
    TransferTable,
    iter_chunks,
    make_manifest,
)


def _payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("size,chunk", [(0, 16), (1, 16), (16, 16), (17, 16), (1000, 64)])
def test_chunks_cover_payload_exactly(size: int, chunk: int) -> None:
    data = _payload(size)
    chunks = list(iter_chunks(data, chunk))
    assert b"".join(c for _, c in chunks) == data
    assert [o for o, _ in chunks] == list(range(0, max(size, 1), chunk))
    assert all(len(c) <= chunk for _, c in chunks)


def test_reorder_and_duplicates_are_harmless() -> None:
    data = _payload(10_000, 1)
    m = make_manifest(data, kind="update", round=3, device_id="d1", chunk_size=512)
    chunks = list(iter_chunks(data, 512))
    stream = chunks + chunks[::3] + chunks[5:9]  # duplicates
    random.Random(7).shuffle(stream)  # reordered
    r = Reassembler(max_bytes=1 << 20)
    # half the chunks arrive before the manifest
    for off, c in stream[: len(stream) // 2]:
        r.add_chunk(off, c)
    r.set_manifest(Manifest.from_bytes(m.to_bytes()))
    for off, c in stream[len(stream) // 2:]:
        r.add_chunk(off, c)
    assert r.complete
    assert r.result() == data
    assert r.duplicates == len(stream) - len(chunks)
    assert hashlib.sha256(r.result()).hexdigest() == m.sha256


def test_missing_chunk_is_incomplete() -> None:
    data = _payload(2000)
    m = make_manifest(data, kind="update", round=0, chunk_size=256)
    r = Reassembler(max_bytes=1 << 20)
    r.set_manifest(m)
    for off, c in iter_chunks(data, 256):
        if off != 512:
            r.add_chunk(off, c)
    assert not r.complete
    assert r.missing() == [512]
    with pytest.raises(TransferError) as e:
        r.result()
    assert e.value.reason == "incomplete"


def test_bad_checksum() -> None:
    data = _payload(3000)
    m = make_manifest(data, kind="update", round=0, chunk_size=1024)
    r = Reassembler(max_bytes=1 << 20)
    r.set_manifest(m)
    for off, c in iter_chunks(data, 1024):
        if off == 1024:
            c = bytes([c[0] ^ 0xFF]) + c[1:]
        r.add_chunk(off, c)
    with pytest.raises(TransferError) as e:
        r.result()
    assert e.value.reason == "bad_checksum"


def test_oversize_declared_and_actual() -> None:
    data = _payload(5000)
    m = make_manifest(data, kind="update", round=0, chunk_size=1024)
    r = Reassembler(max_bytes=4096)
    with pytest.raises(TransferError) as e:
        r.set_manifest(m)
    assert e.value.reason == "oversize"
    # chunks without a manifest cannot exceed the bound either
    r2 = Reassembler(max_bytes=4096)
    with pytest.raises(TransferError) as e2:
        for off, c in iter_chunks(data, 1024):
            r2.add_chunk(off, c)
    assert e2.value.reason == "oversize"


def test_misaligned_and_wrong_length_chunks_rejected() -> None:
    data = _payload(3000)
    m = make_manifest(data, kind="update", round=0, chunk_size=1024)
    r = Reassembler(max_bytes=1 << 20)
    r.set_manifest(m)
    with pytest.raises(TransferError):
        r.add_chunk(100, data[100:1124])
    with pytest.raises(TransferError):
        r.add_chunk(1024, data[1024:1500])
    with pytest.raises(TransferError):
        r.add_chunk(4096, b"x")


def test_manifest_garbage_rejected() -> None:
    for bad in (b"\xff\xfe", b"[1,2]", b"{}", b'{"transfer_id": "../x"}', b"not json"):
        with pytest.raises(ProtocolError):
            Manifest.from_bytes(bad)
    good = make_manifest(b"abc", kind="update", round=1)
    d = good.to_bytes().replace(b'"size":3', b'"size":-3')
    with pytest.raises(ProtocolError):
        Manifest.from_bytes(d)
    assert Manifest.from_bytes(good.to_bytes()) == good


def test_conflicting_manifest_rejected() -> None:
    r = Reassembler(max_bytes=1 << 20)
    r.set_manifest(make_manifest(b"abc", kind="update", round=1, transfer_id="t1"))
    with pytest.raises(TransferError):
        r.set_manifest(make_manifest(b"abd", kind="update", round=1, transfer_id="t1"))


def test_table_forgets_finished_transfers() -> None:
    t = TransferTable(max_bytes=1 << 20, max_open=2)
    r = t.get("d1", "t1")
    assert r is not None
    t.finish("d1", "t1")
    assert t.get("d1", "t1") is None  # a late duplicate does not reopen it
    t.get("d1", "a")
    t.get("d1", "b")
    t.get("d1", "c")  # evicts the oldest open
    assert len(t.open_transfers()) == 2
    assert t.evicted == 0  # d1's own older upload made room (max_per_sender)


def test_table_counts_uploads_evicted_by_max_open() -> None:
    # more devices uploading at once than max_open: the oldest open upload is dropped
    # (its sender re-sends it), counted and logged, never silently
    t = TransferTable(max_bytes=1 << 20, max_open=2)
    t.get("d1", "a")
    t.get("d2", "b")
    assert t.evicted == 0
    t.get("d3", "c")
    assert t.open_transfers() == [("d2", "b"), ("d3", "c")] and t.evicted == 1


def test_table_bounds_uploads_per_sender_and_total_bytes() -> None:
    t = TransferTable(max_bytes=1000, max_total_bytes=2500, max_per_sender=2)
    for tid in ("a", "b", "c"):
        t.get("d1", tid)
    assert sorted(k[1] for k in t.open_transfers()) == ["b", "c"]  # oldest of d1 dropped
    for i, dev in enumerate(("x", "y", "z")):
        r = t.get(dev, "t")
        assert r is not None
        r.add_chunk(0, bytes(900 + i))
    dropped = t.enforce_budget()
    assert dropped == [("x", "t")]  # 2703 held > 2500: the oldest holder goes
    assert sum(r.received_bytes for k, r in t._open.items()) <= 2500
