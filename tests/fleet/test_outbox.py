"""The on-disk outbox: complete entries survive a restart, partial ones are dropped."""

from __future__ import annotations

from pathlib import Path

from edge_runtime.fleet.outbox import Outbox
from edge_runtime.fleet.transfer import make_manifest


def test_outbox_survives_restart_and_ignores_partial_entries(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "out")
    m1 = make_manifest(b"update-1", kind="update", round=2, device_id="d")
    m0 = make_manifest(b"update-0", kind="update", round=1, device_id="d")
    box.put(m1, b"update-1")
    box.put(m0, b"update-0")
    (tmp_path / "out" / "half.bin").write_bytes(b"no manifest yet")  # crash between writes
    (tmp_path / "out" / "bad.json").write_text("{not json")
    again = Outbox(tmp_path / "out")  # a restarted agent
    pending = again.pending()
    assert [(m.transfer_id, d) for m, d in pending] == [(m0.transfer_id, b"update-0"),
                                                        (m1.transfer_id, b"update-1")]
    assert not (tmp_path / "out" / "bad.json").exists()
    again.remove(m0.transfer_id)
    assert [m.transfer_id for m, _ in Outbox(tmp_path / "out").pending()] == [m1.transfer_id]
