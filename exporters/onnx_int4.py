"""int4 weights for ONNX Runtime on the Q4_1 grid, at MatMulNBits' fast speed.

Each block of 32 weights along the input dimension gets scale d = (max - min) / 15 and
zero point z = -min / d, so a weight is q = round((w - min) / d) in 0..15 and
(q - z) d = min + q d. That is GGUF's Q4_1 (a scale and a float minimum per block):
weights dequantized from a Q4_1 GGUF come back exactly. ONNX Runtime's own quantizer
(`MatMulNBitsQuantizer`) rounds z to an integer, which moves the grid by up to half a
step and rounds every weight a second time (+5% held-out loss on SmolLM2-135M).

MatMulNBits accepts a float z, but its CPU kernel is then ~30x slower (1.9 ms against
62 us for a 576 x 1536 product, measured). So the grid is split (`q4_offsets`): the
weights keep their q and d on MatMulNBits' symmetric grid, d (q - 8), with no zero_points
input at all (its int8-activation kernel is ~20% faster at M = 1 without one: 131 against
161 us for 640 x 3072, CPU time, one thread), and the rest, c = d (8 - z) = min + 8 d, is
constant per (output row n, block b): x @ W gains sum_b xs_b c[n, b], xs_b being the sum
of x over block b. The block means m_b = xs_b / 32 ride along as extra inputs of the same
MatMulNBits: A = [x | m | m | ... | m] (`offset_copies` copies, 3 for K = 576 and 1536);
W's columns on the first copy hold hi and those on the last copy lo,
c = s (hi - 8) + (s/16) (lo - 8), two 4-bit parts on one scale s per row (the block scales
32 s and 2 s, the copies in between weighted 0), so c is within s/16 of exact. The Q4_1
weights themselves stay exact. The copies put hi and lo in different blocks, so each part
gets its own scale and the graph needs only AveragePool + Concat per input (it was
Reshape, ReduceSum, Mul by 1/16 and Concat over [x | xs | xs/16]: 240 more nodes per
step on SmolLM2-135M, ~9% of decode CPU time at one thread, node dispatch rather than
arithmetic).

Accuracy on SmolLM2-135M (loss over the first 500 tokens of exporters/README.md; eager
fp32 4.1946): integer zero points zi = floor(z) with c = -d (z - zi) in [-d, 0] gave
4.1979, this symmetric grid 4.2002 (c spans up to ~8 d, so the int8 quantization of the
means in A costs a little more), for ~15% less decode CPU time; bench_runtime's held-out
loss 3.824 (fp32 3.839), greedy tokens those of eager.
Against the offsets exact in fp32 as (x @ E) @ C + Add (two more ops and 13 MB more per
token): decode +15% (one thread, CPU time, median of 6); one 4-bit part alone (within 1/30
of the range): +19% but one greedy token in 32 flipped.
The tied LM head (Q8_0 in GGUF files) gets 8 bits on
Q8_0's grid (`q8_blocks`), and the embedding reads the same bytes through
GatherBlockQuantized (`emit_tied_embedding`) instead of an fp32 copy of the table
(113 MB of the 221 MB file on SmolLM2-135M).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exporters.config import ExportQuant

__all__ = ["q4_blocks", "q4_offsets", "offset_copies", "q8_blocks", "emit_linear",
           "emit_tied_embedding", "pack_nibbles"]

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


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 (..., 2m) -> bytes (..., m), the even index in the low nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def offset_copies(nb: int, block: int = BLOCK) -> int:
    """How many copies of the block means follow x in A so that the first copy (the hi
    parts) and the last (the lo parts) share no block of MatMulNBits: the lo parts then
    get their own per-block scale, s / 16, and no Mul by 1/16 is needed in the graph."""
    j = 1
    while (j * nb) // block <= (nb - 1) // block:
        j += 1
    return j + 1


def q4_offsets(w_nk: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, int]:
    """The Q4_1 grid of W (N, K) as one symmetric MatMulNBits (zero point 8, no
    zero_points input) over A = [x | m | m ... | m] (`offset_copies` copies of m, the
    block means of x, xs / block): the weights' own q and d, plus their offsets
    c = d (8 - z) = min + 8 d in two 4-bit parts, hi on the first copy and lo on the last,
    the other copies weighted 0 (see the module docstring). A constant block gets q = 8
    and c = its value.

    Returns (packed uint8 (N, n_blocks, block/2), scales (N * n_blocks,),
    K_in = K + copies K/block); n_blocks = ceil(K_in / block).
    """
    n, k = w_nk.shape
    packed, scales, _ = q4_blocks(w_nk, block)
    nb = k // block
    blocks = w_nk.reshape(n, nb, block)
    flat = (blocks.max(axis=2) == blocks.min(axis=2)).reshape(-1)  # constant blocks
    packed = packed.reshape(n * nb, block // 2)
    packed[flat] = 0x88  # q = 8: weight 0 on the grid, the value goes to c
    lo_w = blocks.min(axis=2).astype(np.float64).reshape(-1)  # the block minima
    c = np.where(flat, lo_w, lo_w + 8 * scales.astype(np.float64)).reshape(n, nb)  # (N, nb)
    # one offset scale per row, zero point 8: hi in [-8 s, 7 s], its remainder r (|r| <= s/2)
    # as lo on scale s / 16, so c = s (hi - 8) + (s / 16) (lo - 8) to within s / 16
    s_row = np.maximum(np.maximum(-c.min(axis=1) / 8, c.max(axis=1) / 7),
                       np.finfo(np.float32).tiny).astype(np.float32).astype(np.float64)
    hi = np.clip(np.rint(c / s_row[:, None]), -8, 7)
    lo = np.clip(np.rint(16 * (c - s_row[:, None] * hi) / s_row[:, None]), -8, 7)
    copies = offset_copies(nb, block)
    lo_at = (copies - 1) * nb  # the last copy's first column (its block holds no hi part)
    na = -(-copies * nb // block)  # blocks after x
    q_off = np.full((n, na * block), 8, np.uint8)  # 8 = weight 0 (other copies, padding)
    q_off[:, :nb], q_off[:, lo_at:lo_at + nb] = hi + 8, lo + 8
    # A holds m = xs / block: scale s block for hi, s block / 16 for lo (powers of two: exact)
    s_off = np.repeat(s_row[:, None] * block, na, axis=1)
    s_off[:, lo_at // block:] /= 16
    packed = np.concatenate([packed.reshape(n, nb, block // 2),
                             pack_nibbles(q_off.reshape(n, na, block))], axis=1)
    scales = np.concatenate([scales.reshape(n, nb), s_off], axis=1).astype(np.float32)
    return packed, scales.reshape(-1), k + copies * nb


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


def _with_block_means(g: Any, x: str, k: int, block: int) -> str:
    """[x | m | ... | m] (..., K + copies K/block), m = AveragePool(x) the means of x over
    its blocks (x: (B, T, K), pooled along K as a 1-D signal of T channels); once per
    input. Two nodes: node dispatch, not arithmetic, is what these cost at decode."""
    xa = g.block_means.get((x, k))
    if xa is None:
        m = g.op("AveragePool", [x], kernel_shape=[block], strides=[block])[0]  # (B, T, K/b)
        copies = offset_copies(k // block, block)
        xa = g.block_means[(x, k)] = g.op("Concat", [x] + [m] * copies, axis=-1)[0]
    return str(xa)


def emit_linear(g: Any, x: str, w_nk: np.ndarray, name: str, quant: ExportQuant, *,
                head: bool = False, out: str | None = None, block: int = BLOCK,
                accuracy_level: int = 4) -> str:
    """y = x @ W^T into `g` (an `exporters.onnx_graph.GraphBuilder`); returns y's name.

    W is (N, K) (output rows, input columns); x is (B, T, K). `none`: fp32 `MatMul`.
    `int8`: MatMulNBits on Q8_0's grid. `int4`: symmetric MatMulNBits on the Q4_1 grid over
    [x | block means of x ...] (`q4_offsets`), the means made once per input `x` and
    shared by every linear that reads it; the LM head (`head`) gets Q8_0's grid, as GGUF
    files keep the tied embedding. `accuracy_level` 4: int8 activations in MatMulNBits.
    """
    n, k = w_nk.shape
    outs = [out] if out else 1
    if quant is ExportQuant.NONE:
        w = g.const(f"{name}.weight_t", np.ascontiguousarray(w_nk.T.astype(np.float32)))
        return str(g.op("MatMul", [x, w], outs)[0])
    if k % block:
        raise ValueError(f"{name}: K = {k} is not a multiple of the block {block}")
    if head or quant is ExportQuant.INT8:
        bits, k_in, a = 8, k, x
        packed, scales, zeros = q8_blocks(w_nk, block)
        zp = [g.const(f"{name}.q_zp", zeros)]
    else:  # symmetric: no zero points (MatMulNBits' default 8)
        bits, a, zp = 4, _with_block_means(g, x, k, block), []
        packed, scales, k_in = q4_offsets(w_nk, block)
    ins = [a, g.const(f"{name}.q_B", packed), g.const(f"{name}.q_scales", scales), *zp]
    return str(g.op("MatMulNBits", ins, outs, domain="com.microsoft", K=k_in, N=n, bits=bits,
                    block_size=block, accuracy_level=accuracy_level)[0])


def emit_tied_embedding(g: Any, ids: str, w_vd: np.ndarray, name: str,
                        block: int = BLOCK) -> str:
    """Rows of a tied table W (V, D) at `ids` (B, T) -> (B, T, D), dequantized from the 8-bit
    blocks the LM head `name` multiplies by (`q8_blocks`): one initializer serves both
    the head's MatMulNBits and this GatherBlockQuantized (zero point 128, its default)."""
    v, d = w_vd.shape
    if d % block:
        raise ValueError(f"{name}: D = {d} is not a multiple of the block {block}")
    packed, scales, _ = q8_blocks(w_vd, block)  # (V, D/block, block), (V * D/block,)
    b = g.const(f"{name}.q_B", packed)
    s = g.const(f"{name}.q_scales_rows", scales.reshape(v, d // block, 1))
    rows = g.op("GatherBlockQuantized", [b, ids, s], domain="com.microsoft", bits=8,
                block_size=block, gather_axis=0, quantize_axis=2)[0]  # (B, T, D/block, block)
    shape = g.const(f"{name}.row_shape", np.array([0, 0, d], np.int64))
    return str(g.op("Reshape", [rows, shape])[0])
