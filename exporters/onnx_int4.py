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

__all__ = ["q4_blocks", "q4_split", "q8_blocks", "quantize_matmuls_q4"]

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


def quantize_matmuls_q4(model: Any, block: int = BLOCK, *, head_n: int = 0,
                        accuracy_level: int = 0, head_only: bool = False) -> int:
    """Rewrite every `MatMul(x, W)` of `model` (an onnx.ModelProto, in place) whose W is a
    float 2-D initializer with K divisible by `block` as `com.microsoft.MatMulNBits`;
    returns how many. MatMuls on graph inputs (the LoRA factors) stay float.

    `head_n`: a MatMul with N == head_n (the LM head, the tied embedding) gets 8 bits
    on Q8_0's grid, as GGUF files keep the embedding (a 4-bit head costs the most
    loss). `accuracy_level`: MatMulNBits' compute (0: float activations; 4: int8)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    new_nodes = []
    replaced = 0
    block_sums: dict[str, str] = {}  # input tensor -> its block sums (q, k and v share one)
    for node in g.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        t = inits.get(w_name)
        arr = numpy_helper.to_array(t) if t is not None else None
        if (arr is None or arr.ndim != 2 or arr.dtype != np.float32
                or arr.shape[0] % block or (head_only and arr.shape[1] != head_n)):
            new_nodes.append(node)
            continue
        k, n = arr.shape
        bits = 8 if head_n and n == head_n else 4
        base = f"{w_name}_q4"
        name = node.name or w_name
        out = list(node.output)
        if bits == 8:
            packed, scales, zeros = q8_blocks(arr.T, block)
        else:  # the Q4_1 grid as integer zero points + the exact correction (q4_split)
            packed, scales, zeros, corr = q4_split(arr.T, block)
            e_name = f"q4_block_indicator_{k}"
            if e_name not in inits:
                inits[e_name] = numpy_helper.from_array(block_indicator(k, block), e_name)
                g.initializer.append(inits[e_name])
            g.initializer.append(numpy_helper.from_array(corr, f"{base}_C"))
            xs = block_sums.get(node.input[0])
            if xs is None:
                xs = block_sums[node.input[0]] = f"{base}_xs"
                new_nodes.append(helper.make_node("MatMul", [node.input[0], e_name], [xs],
                                                  name=f"{name}_q4_blocksum"))
            new_nodes += [
                helper.make_node("MatMul", [xs, f"{base}_C"], [f"{base}_corr"],
                                 name=f"{name}_q4_corr"),
                helper.make_node("Add", [f"{base}_main", f"{base}_corr"], out,
                                 name=f"{name}_q4_add")]
            out = [f"{base}_main"]
        g.initializer.extend([numpy_helper.from_array(packed, f"{base}_B"),
                              numpy_helper.from_array(scales, f"{base}_scales"),
                              numpy_helper.from_array(zeros, f"{base}_zp")])
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], f"{base}_B", f"{base}_scales", f"{base}_zp"],
            out, name=f"{name}_q4", domain="com.microsoft",
            K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level))
        uses[w_name] -= 1
        replaced += 1
    del g.node[:]
    g.node.extend(new_nodes)
    keep = [t for t in g.initializer if uses.get(t.name, 1) > 0 or t.name.endswith(
        ("_q4_B", "_q4_scales", "_q4_zp", "_q4_C")) or t.name.startswith("q4_block_indicator")]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replaced
