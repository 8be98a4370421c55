"""int4 on the Q4_1 grid: weights built as min + d q come back through ONNX Runtime's
symmetric MatMulNBits (no zero points) exactly up to their block offsets, which ride along
on the block means as two 4-bit parts within 1/16 of the row's offset step; arbitrary
weights stay within half a step of their block. A tied embedding reads the head's bytes."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto  # noqa: E402

from exporters.config import ExportQuant  # noqa: E402
from exporters.onnx_graph import GraphBuilder  # noqa: E402
from exporters.onnx_int4 import (  # noqa: E402
    emit_linear,
    emit_tied_embedding,
    offset_copies,
    q4_blocks,
    q4_offsets,
)


def _linear_model(w_nk: np.ndarray, quant: ExportQuant = ExportQuant.INT4) -> onnx.ModelProto:
    n, k = w_nk.shape
    g = GraphBuilder()
    g.input("A", TensorProto.FLOAT, [1, "T", k])
    # float activations (accuracy level 0): the weights alone decide the result
    emit_linear(g, "A", w_nk, "w", quant, out="Y", accuracy_level=0)
    g.output("Y", TensorProto.FLOAT, [1, "T", n])
    return g.model("g")


def _run(model: onnx.ModelProto, a: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"A": a[None]})[0][0]


def _q4_1_weights(rng: np.random.Generator, n: int, nb: int) -> np.ndarray:
    q = rng.integers(0, 16, size=(n, nb, 32))
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 maps each block's min to 0 and max to 15
    d = rng.uniform(0.005, 0.05, size=(n, nb, 1)).astype(np.float16).astype(np.float64)
    m = rng.uniform(-0.4, 0.1, size=(n, nb, 1)).astype(np.float16).astype(np.float64)
    return (m + d * q).reshape(n, nb * 32).astype(np.float32)


def _dequant(packed: np.ndarray, scales: np.ndarray, k_in: int) -> np.ndarray:
    """The (N, K_in) matrix a symmetric MatMulNBits (zero point 8) multiplies by."""
    n, n_blocks, _ = packed.shape
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, n_blocks, 32)
    w = (q - 8.0) * scales.reshape(n, n_blocks, 1)
    return w.reshape(n, -1)[:, :k_in]


@pytest.mark.parametrize("nb", [3, 18, 48])  # the offsets end mid-block or not
def test_q4_1_weights_exact_and_offsets_within_a_sixteenth_of_a_step(nb: int) -> None:
    rng = np.random.default_rng(nb)
    n, k = 24, nb * 32
    w_nk = _q4_1_weights(rng, n, nb)
    w_nk[3, 32:64] = -0.02  # a constant block: q = 8, its value carried by the offset
    model = _linear_model(w_nk)
    ops = sorted(x.op_type for x in model.graph.node)
    assert ops == ["AveragePool", "Concat", "MatMulNBits"]  # [x | m | ... | m]
    mnb = next(x for x in model.graph.node if x.op_type == "MatMulNBits")
    assert len(mnb.input) == 3  # symmetric: no zero_points input (the faster kernel)
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert all(int(np.prod(t.dims)) < n * k for t in floats)  # no float copy of W
    packed, scales, k_in = q4_offsets(w_nk)
    copies = offset_copies(nb)
    assert k_in == k + copies * nb
    lo_at = k + (copies - 1) * nb
    assert (k + nb - 1) // 32 < lo_at // 32  # hi and lo parts in different blocks
    w_aug = _dequant(packed, scales, k_in)
    a = rng.normal(size=(5, k)).astype(np.float32)
    means = a.reshape(5, nb, 32).astype(np.float64).mean(axis=2)  # (5, nb)
    got = _run(model, a)
    # the kernel computes [x | m ... m] @ W_aug^T with our layout (partial last block included)
    want_aug = np.concatenate([a] + [means] * copies, axis=1) @ w_aug.T
    assert np.abs(got - want_aug).max() <= 1e-5 * np.abs(want_aug).max()
    # the Q4_1 weights are those of w up to the offsets c, each carried as hi + lo / 16
    # within s / 16, s = the row's offset scale (max(-min c / 8, max c / 7)), on block
    # means (xs / 32); the copies in between are weighted 0
    blocks = w_nk.reshape(n, nb, 32).astype(np.float64)
    offsets = (blocks - w_aug[:, :k].reshape(n, nb, 32))  # constant per block: min + 8 d
    assert np.abs(offsets - offsets[..., :1]).max() < 1e-6
    c = offsets[..., 0]
    hi, lo = w_aug[:, k:k + nb], w_aug[:, lo_at:lo_at + nb]
    assert not np.any(w_aug[:, k + nb:lo_at]) and not np.any(w_aug[:, lo_at + nb:])
    err = np.abs((hi + lo) / 32 - c)
    s = np.maximum(-c.min(axis=1) / 8, c.max(axis=1) / 7)  # (N,)
    assert (err <= s[:, None] / 16 + 1e-7).all()
    want = a.astype(np.float64) @ w_nk.T.astype(np.float64)
    no_offsets = a.astype(np.float64) @ w_aug[:, :k].T
    assert np.abs(got - want).max() < 0.1 * np.abs(no_offsets - want).max()


def _int_zero_point_dequant(w_nk: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The same grid with an integer zero point (ONNX Runtime's asymmetric quantizer)."""
    n, k = w_nk.shape
    blocks = w_nk.reshape(n, k // 32, 32).astype(np.float64)
    s = scales.reshape(n, k // 32, 1).astype(np.float64)
    zi = np.clip(np.rint(-blocks.min(axis=2, keepdims=True) / s), 0, 15)
    return ((np.clip(np.rint(blocks / s + zi), 0, 15) - zi) * s).reshape(n, k)


def test_any_weights_within_half_a_step_and_q4_1_weights_not_rounded_twice() -> None:
    rng = np.random.default_rng(1)
    w_nk = rng.normal(0, 0.05, size=(16, 64)).astype(np.float32)
    packed, scales, zeros = q4_blocks(w_nk)
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(16, 2, 32).astype(np.float64)
    deq = ((q - zeros.reshape(16, 2, 1)) * scales.reshape(16, 2, 1)).reshape(16, 64)
    step = scales.reshape(16, 2, 1).repeat(32, axis=2).reshape(16, 64)
    assert (np.abs(deq - w_nk) <= 0.5 * step + 1e-7).all()
    # weights already on a Q4_1 grid: ours returns them, an integer zero point (its grid
    # shifted by the rounded zero point) rounds them again
    w_q41 = deq.astype(np.float32)
    p2, s2, z2 = q4_blocks(w_q41)
    q2 = np.stack([p2 & 15, p2 >> 4], axis=-1).reshape(16, 2, 32).astype(np.float64)
    again = ((q2 - z2.reshape(16, 2, 1)) * s2.reshape(16, 2, 1)).reshape(16, 64)
    ours = np.abs(again - w_q41).max()
    theirs = np.abs(_int_zero_point_dequant(w_q41, s2) - w_q41).max()
    assert ours < 1e-6 and theirs > 100 * ours


def test_tied_embedding_reads_the_heads_8_bit_bytes() -> None:
    rng = np.random.default_rng(2)
    v, d = 40, 64
    w = rng.normal(0, 0.05, size=(v, d)).astype(np.float32)
    g = GraphBuilder()
    g.input("ids", TensorProto.INT64, [1, "T"])
    g.input("A", TensorProto.FLOAT, [1, d])
    rows = emit_tied_embedding(g, "ids", w, "head")
    g.op("Identity", [rows], ["E"])
    emit_linear(g, "A", w, "head", ExportQuant.INT4, head=True, out="Y", accuracy_level=0)
    g.output("E", TensorProto.FLOAT, [1, "T", d])
    g.output("Y", TensorProto.FLOAT, [1, v])
    model = g.model("g")
    big = [t for t in model.graph.initializer if int(np.prod(t.dims)) >= v * d]
    assert [t.data_type for t in big] == [TensorProto.UINT8]  # one table, 8-bit, shared
    # reference: Q8_0 by hand, d = max|w| / 127 per block of 32, q = round(w / d)
    blocks = w.reshape(v, d // 32, 32).astype(np.float64)
    step = np.abs(blocks).max(axis=2, keepdims=True) / 127
    deq = (np.rint(blocks / step) * step).reshape(v, d)
    ids = np.array([[3, 0, 39, 3]], np.int64)
    a = rng.normal(size=(1, d)).astype(np.float32)
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    e, y = s.run(None, {"ids": ids, "A": a})
    assert np.abs(e[0] - deq[ids[0]]).max() < 1e-6
    want = a[0].astype(np.float64) @ deq.T
    assert np.abs(y[0] - want).max() < 1e-5 * np.abs(want).max()
