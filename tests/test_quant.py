"""Quantized frozen linears: error bounds against numpy references and the input gradient."""

import numpy as np
import pytest
import torch

from edge_runtime.config import LoRAPlan, QuantMode
from edge_runtime.lora import apply_lora, lora_modules
from edge_runtime.model import CausalLM, ModelConfig
from edge_runtime.quant import QuantLinear, quantize_linears, resident_bytes


def numpy_int8(w: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.abs(w).max(axis=1), 1e-8) / 127.0
    return np.clip(np.round(w / scale[:, None]), -127, 127) * scale[:, None]


def numpy_int4(w: np.ndarray, g: int = 32) -> np.ndarray:
    out = np.empty_like(w)
    for r in range(w.shape[0]):
        for s in range(0, w.shape[1], g):
            blk = w[r, s: s + g]
            lo, hi = blk.min(), blk.max()
            sc = max((hi - lo) / 15.0, 1e-8)
            out[r, s: s + g] = np.clip(np.round((blk - lo) / sc), 0, 15) * sc + lo
    return out


@pytest.mark.parametrize("mode,ref", [(QuantMode.INT8, numpy_int8), (QuantMode.INT4, numpy_int4)])
def test_dequantized_weight_matches_numpy_reference(mode, ref):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    q = QuantLinear(lin, mode)
    expect = ref(lin.weight.detach().double().numpy())
    assert np.allclose(q.dequantize().double().numpy(), expect, atol=1e-6)
    x = torch.randn(3, 64)
    assert torch.allclose(q(x), x @ torch.from_numpy(expect).float().T + lin.bias, atol=1e-4)


@pytest.mark.parametrize("mode", [QuantMode.INT8, QuantMode.INT4])
def test_input_gradient_matches_fp32_of_dequantized_weight(mode):
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 40)
    q = QuantLinear(lin, mode)
    w = q.dequantize().clone().requires_grad_(False)
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, 40)
    (q(x) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ((x2 @ w.T + lin.bias) * g).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())


def test_quantized_base_trains_lora_and_never_the_base():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=96)
    m = CausalLM(cfg)
    fp32_bytes = resident_bytes(m)
    quantize_linears(m, QuantMode.INT8)
    int8_bytes = resident_bytes(m)
    assert int8_bytes < fp32_bytes
    apply_lora(m, LoRAPlan(rank=4, depth=3, targets=("q", "v", "up")))
    before = {n: b.clone() for n, b in m.named_buffers() if n.endswith("qweight")}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    tokens = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        m(tokens).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.count_nonzero(mod.lora_b) > 0 for mod in lora_modules(m).values())
    after = dict(m.named_buffers())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_int4_needs_divisible_columns():
    with pytest.raises(ValueError, match="divisible"):
        QuantLinear(torch.nn.Linear(33, 8), QuantMode.INT4)
