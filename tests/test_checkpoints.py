"""load_model front door: tiny model determinism, fingerprint, quantization, bad specs."""

from __future__ import annotations

import pytest
import torch

from edge_runtime.checkpoints import load_model, tiny_model
from edge_runtime.config import LoRAPlan, QuantMode
from edge_runtime.errors import CheckpointError, ConfigError
from edge_runtime.fingerprint import base_fingerprint
from edge_runtime.lora import apply_lora
from edge_runtime.quant import QuantLinear


def test_tiny_is_deterministic_and_frozen():
    a, b = load_model("tiny"), load_model("tiny")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters(),
                                  strict=True):
        assert na == nb and torch.equal(pa, pb)
        assert not pa.requires_grad
    cfg = a.model.config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
            cfg.hidden_dim, cfg.max_seq_len) == (320, 64, 2, 4, 2, 128, 512)
    assert a.name == "tiny" and a.tokenizer.vocab_size <= cfg.vocab_size
    # Weights are N(0, 0.02) draws, norms at one.
    w = a.model.model.layers[0].self_attn.q_proj.weight
    assert 0.015 < float(w.std()) < 0.025
    assert torch.equal(a.model.model.norm.weight, torch.ones(64))


def test_fingerprint_sees_weights_not_lora_or_quant():
    base = load_model("tiny")
    assert load_model("tiny", QuantMode.INT8).fingerprint == base.fingerprint
    assert load_model("tiny", "int4").fingerprint == base.fingerprint
    m = tiny_model()
    apply_lora(m, LoRAPlan(rank=2, depth=1))
    assert base_fingerprint(m) == base.fingerprint
    other = tiny_model(seed=1)
    assert base_fingerprint(other) != base.fingerprint
    with torch.no_grad():
        m.model.layers[1].self_attn.q_proj.base.weight[0, 0] += 1.0  # sampled index 0
    assert base_fingerprint(m) != base.fingerprint


def test_quant_replaces_linears_but_not_head():
    lm = load_model("tiny", "int4")
    q = [n for n, mod in lm.model.named_modules() if isinstance(mod, QuantLinear)]
    assert len(q) == 2 * 7
    assert isinstance(lm.model.lm_head, torch.nn.Linear)


def test_bad_specs(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="neither a GGUF"):
        load_model(str(junk))
    with pytest.raises(ConfigError, match="int8"):
        load_model("tiny", "int3")


def test_pulled_name_absent_says_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_RT_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="edge-rt pull smollm2-135m"):
        load_model("smollm2-135m")
