"""An on-disk outbox: a finished update survives an agent restart until it is acked.

Each entry is `{transfer_id}.bin` (the update bytes) plus `{transfer_id}.json` (its
manifest), both written atomically; the manifest is written last, so an entry is
complete exactly when its .json exists.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_runtime.files import atomic_write
from edge_runtime.fleet.protocol import Manifest, ProtocolError

__all__ = ["Outbox"]

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def put(self, manifest: Manifest, data: bytes) -> None:
        atomic_write(self.dir / f"{manifest.transfer_id}.bin", data)
        atomic_write(self.dir / f"{manifest.transfer_id}.json", manifest.to_bytes())

    def pending(self) -> list[tuple[Manifest, bytes]]:
        """Complete entries, oldest round first; unreadable ones are removed."""
        out: list[tuple[Manifest, bytes]] = []
        for mpath in sorted(self.dir.glob("*.json")):
            try:
                m = Manifest.from_bytes(mpath.read_bytes())
                data = (self.dir / f"{m.transfer_id}.bin").read_bytes()
            except (OSError, ProtocolError) as e:
                log.warning("outbox: dropping unreadable entry %s (%s)", mpath.name, e)
                self.remove(mpath.stem)
                continue
            out.append((m, data))
        return sorted(out, key=lambda e: e[0].round)

    def remove(self, transfer_id: str) -> None:
        (self.dir / f"{transfer_id}.json").unlink(missing_ok=True)
        (self.dir / f"{transfer_id}.bin").unlink(missing_ok=True)
