"""int4 weights for ONNX Runtime on the Q4_1 grid: `MatMulNBits` with float zero points.

Each block of 32 weights along the input dimension gets scale d = (max - min) / 15 and a
float zero point z = -min / d, so a weight is stored as q = round((w - min) / d) in
0..15 and ONNX Runtime computes (q - z) d = min + q d. That is GGUF's Q4_1 exactly
(a scale and a float minimum per block of 32): weights dequantized from a Q4_1 GGUF come
back bit for bit up to float32 rounding, where ONNX Runtime's own quantizer
(`MatMulNBitsQuantizer`, an integer zero point) moves the grid by up to half a step and
rounds every weight a second time. For weights from anywhere else it is round-to-nearest
on a grid spanning each block's range: at most half a step off, where an integer zero
point can miss a block's extreme by more (on average the two are alike).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["q4_blocks", "q8_blocks", "quantize_matmuls_q4"]

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
                        accuracy_level: int = 0) -> int:
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
    for node in g.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        t = inits.get(w_name)
        arr = numpy_helper.to_array(t) if t is not None else None
        if (arr is None or arr.ndim != 2 or arr.dtype != np.float32
                or arr.shape[0] % block):
            new_nodes.append(node)
            continue
        k, n = arr.shape
        bits = 8 if head_n and n == head_n else 4
        packed, scales, zeros = (q8_blocks if bits == 8 else q4_blocks)(arr.T, block)
        base = f"{w_name}_q4"
        g.initializer.extend([numpy_helper.from_array(packed, f"{base}_B"),
                              numpy_helper.from_array(scales, f"{base}_scales"),
                              numpy_helper.from_array(zeros, f"{base}_zp")])
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], f"{base}_B", f"{base}_scales", f"{base}_zp"],
            list(node.output), name=f"{node.name or w_name}_q4", domain="com.microsoft",
            K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level))
        uses[w_name] -= 1
        replaced += 1
    del g.node[:]
    g.node.extend(new_nodes)
    keep = [t for t in g.initializer if uses.get(t.name, 1) > 0 or t.name.endswith(
        ("_q4_B", "_q4_scales", "_q4_zp"))]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replaced
