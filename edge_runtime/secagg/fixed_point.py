"""Fixed point on the ring Z_2^64: x -> round(x * 2^frac_bits) mod 2^64 (two's complement).

Sums of encoded values decode to the sum of the values while the true sum stays within
+-2^(63 - frac_bits): with the default 24 fraction bits, |sum| < 5.5e11, resolution
6e-8 per element and device.
"""

from __future__ import annotations

import numpy as np

__all__ = ["encode", "decode", "FRAC_BITS"]

FRAC_BITS = 24


def encode(x: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """float64 (any shape) -> uint64 ring elements (flattened)."""
    limit = 2.0 ** (62 - frac_bits)
    x = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(x).all() or np.abs(x).max(initial=0.0) >= limit:
        raise ValueError(f"values must be finite and below {limit:.3g} in magnitude for "
                         f"{frac_bits} fraction bits")
    return np.rint(x * 2.0 ** frac_bits).astype(np.int64).view(np.uint64)


def decode(y: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """uint64 ring elements -> float64 (a sum of encodings decodes to the sum)."""
    return np.asarray(y, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0 ** frac_bits
