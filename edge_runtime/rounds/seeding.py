"""Seeds both sides of a round agree on (the server recomputes a device's fresh start)."""

from __future__ import annotations

import hashlib

__all__ = ["device_seed"]


def device_seed(seed: int, round_index: int, device_id: str) -> int:
    """The training seed of one device in one round (independent of arrival order)."""
    digest = hashlib.sha256(f"{seed}:{round_index}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
