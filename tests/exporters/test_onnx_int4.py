"""int4 on the Q4_1 grid: weights built as min + d q come back exactly through ONNX
Runtime's MatMulNBits; arbitrary weights stay within half a step of their block."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto  # noqa: E402

from exporters.config import ExportQuant  # noqa: E402
from exporters.onnx_graph import GraphBuilder  # noqa: E402
from exporters.onnx_int4 import emit_linear, q4_blocks  # noqa: E402


def _linear_model(w_nk: np.ndarray, quant: ExportQuant = ExportQuant.INT4) -> onnx.ModelProto:
    n, k = w_nk.shape
    g = GraphBuilder()
    g.input("A", TensorProto.FLOAT, ["T", k])
    # float activations (accuracy level 0): the weights alone decide the result
    emit_linear(g, "A", w_nk, "w", quant, out="Y", accuracy_level=0)
    g.output("Y", TensorProto.FLOAT, ["T", n])
    return g.model("g")


def _run(model: onnx.ModelProto, a: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"A": a})[0]


def test_q4_1_weights_come_back_exactly() -> None:
    rng = np.random.default_rng(0)
    k, n, nb = 96, 24, 3
    q = rng.integers(0, 16, size=(n, nb, 32))
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 maps each block's min to 0 and max to 15
    d = rng.uniform(0.005, 0.05, size=(n, nb, 1)).astype(np.float16).astype(np.float64)
    m = rng.uniform(-0.4, 0.1, size=(n, nb, 1)).astype(np.float16).astype(np.float64)
    w_nk = (m + d * q).reshape(n, k).astype(np.float32)
    model = _linear_model(w_nk)
    ops = sorted(x.op_type for x in model.graph.node)
    assert ops == ["Add", "MatMul", "MatMul", "MatMulNBits"]  # + the exact correction
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert all(int(np.prod(t.dims)) < n * k for t in floats)  # no float copy of W
    a = rng.normal(size=(5, k)).astype(np.float32)
    want = a.astype(np.float64) @ w_nk.T.astype(np.float64)
    got = _run(model, a)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


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
