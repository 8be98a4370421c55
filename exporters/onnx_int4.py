"""int4 weights for ONNX Runtime on the Q4_1 grid, at MatMulNBits' fast speed.

Each block of 32 weights along the input dimension gets scale d = (max - min) / 15 and
zero point z = -min / d, so a weight is q = round((w - min) / d) in 0..15 and
(q - z) d = min + q d. That is GGUF's Q4_1 (a scale and a float minimum per block):
weights dequantized from a Q4_1 GGUF come back exactly. ONNX Runtime's own quantizer
(`MatMulNBitsQuantizer`) rounds z to an integer, which moves the grid by up to half a
step and rounds every weight a second time (+5% held-out loss on SmolLM2-135M).

MatMulNBits accepts a float z, but its CPU kernel is then ~7x slower in decode (13.9
against 101.7 tok/s measured). So z is split (`q4_split`): an integer part for
MatMulNBits' fast path and the rest, constant per (output row, block), as a small exact
correction (x @ E) @ C, E being the (K, K/32) block indicator. The tied LM head (Q8_0 in
GGUF files) gets 8 bits on Q8_0's grid (`q8_blocks`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exporters.config import ExportQuant

__all__ = ["q4_blocks", "q4_split", "q8_blocks", "block_indicator", "emit_linear"]

BLOCK = 32


def q4_blocks(w_nk: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint8 (N, K/block, block/2), scales (N*K/block,), zero points (N*K/block,))
    of a weight stored (N, K) (output rows, input columns)."""
    n, k = w_nk.shape
    if k % block:
        raise ValueError(f"K = {k} is not a multiple of the block {block}")
    w = w_nk.astype(np.float64).reshape(n, k // block, block)
    lo, hi = w.min(axis=2), w.max(axis=2)
    d = (hi - lo) / 15.0
    d = np.where(d > 0, d, 1.0)  # a constant block: q = 0 everywhere, min carried by z
    q = np.clip(np.rint((w - lo[..., None]) / d[..., None]), 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, d.astype(np.float32).reshape(-1), (-lo / d).astype(np.float32).reshape(-1)


def q4_split(w_nk: np.ndarray, block: int = BLOCK
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The Q4_1 grid with an integer zero point plus an exact correction.

    A float zero point z (`q4_blocks`) is split as z = zi + zf with zi = clip(floor(z),
    0, 15), so w = d (q - zi) - d zf: the first term is MatMulNBits' fast path (uint8 zero
    points) and the second is constant per (row, block), so x @ W gains
    (x @ E) @ C with E the (K, K/block) block indicator and C[b, n] = -d zf (K/block, N).
    Returns (packed (N, K/block, block/2), scales, packed uint8 zero points, C)."""
    n, k = w_nk.shape
    packed, scales, zeros = q4_blocks(w_nk, block)
    nb = k // block
    zi = np.clip(np.floor(zeros.astype(np.float64)), 0, 15)
    corr = (-scales.astype(np.float64) * (zeros - zi)).reshape(n, nb).T  # (nb, N)
    z = zi.astype(np.uint8).reshape(n, nb)
    if nb % 2:
        z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
    zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    return packed, scales, zp, corr.astype(np.float32)


def block_indicator(k: int, block: int = BLOCK) -> np.ndarray:
    """E (K, K/block): E[i, b] = 1 where input i is in block b."""
    e = np.zeros((k, k // block), dtype=np.float32)
    e[np.arange(k), np.arange(k) // block] = 1.0
    return e


def q8_blocks(w_nk: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF's Q8_0 as MatMulNBits' 8 bits: per block d = max|w| / 127, q = round(w / d)
    stored as q + 128 with the (uint8) zero point 128. (packed uint8 (N, K/block, block),
    scales, zero points)."""
    n, k = w_nk.shape
    if k % block:
        raise ValueError(f"K = {k} is not a multiple of the block {block}")
    w = w_nk.astype(np.float64).reshape(n, k // block, block)
    d = np.abs(w).max(axis=2) / 127.0
    d = np.where(d > 0, d, 1.0)
    q = np.clip(np.rint(w / d[..., None]), -127, 127).astype(np.int16) + 128
    return (q.astype(np.uint8), d.astype(np.float32).reshape(-1),
            np.full(d.size, 128, dtype=np.uint8))


def emit_linear(g: Any, x: str, w_nk: np.ndarray, name: str, quant: ExportQuant, *,
                head: bool = False, out: str | None = None, block: int = BLOCK,
                accuracy_level: int = 4) -> str:
    """y = x @ W^T into `g` (an `exporters.onnx_graph.GraphBuilder`); returns y's name.

    W is (N, K) (output rows, input columns). `none`: fp32 `MatMul`. `int8`: MatMulNBits
    on Q8_0's grid. `int4`: MatMulNBits on the Q4_1 grid (`q4_split`) plus the exact
    correction (x @ E) @ C, the block sums x @ E computed once per input `x` and shared
    by every linear that reads it; the LM head (`head`) gets Q8_0's grid, as GGUF files
    keep the tied embedding. `accuracy_level` 4: int8 activations in MatMulNBits.
    """
    n, k = w_nk.shape
    outs = [out] if out else 1
    if quant is ExportQuant.NONE:
        w = g.const(f"{name}.weight_t", np.ascontiguousarray(w_nk.T.astype(np.float32)))
        return str(g.op("MatMul", [x, w], outs)[0])
    if k % block:
        raise ValueError(f"{name}: K = {k} is not a multiple of the block {block}")
    bits = 8 if head or quant is ExportQuant.INT8 else 4
    corr = None
    if bits == 8:
        packed, scales, zeros = q8_blocks(w_nk, block)
    else:
        packed, scales, zeros, corr = q4_split(w_nk, block)
    ins = [x, g.const(f"{name}.q_B", packed), g.const(f"{name}.q_scales", scales),
           g.const(f"{name}.q_zp", zeros)]
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block,
             "accuracy_level": accuracy_level}
    if corr is None:
        return str(g.op("MatMulNBits", ins, outs, domain="com.microsoft", **attrs)[0])
    main = g.op("MatMulNBits", ins, domain="com.microsoft", **attrs)[0]
    xs = g.block_sums.get((x, k))
    if xs is None:
        e = g.const(f"q4_block_indicator_{k}", block_indicator(k, block))
        xs = g.block_sums[(x, k)] = g.op("MatMul", [x, e])[0]  # (..., K/block)
    fix = g.op("MatMul", [xs, g.const(f"{name}.q_C", corr)])[0]  # (..., N)
    return str(g.op("Add", [main, fix], outs)[0])
