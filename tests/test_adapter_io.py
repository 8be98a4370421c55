"""Adapter files: PEFT folder round trips, patterns, fingerprints, wire bytes, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from edge_runtime.adapter_io import (
    AdapterFormatError,
    load_adapter,
    save_adapter,
)
from edge_runtime.checkpoints import tiny_model
from edge_runtime.config import LoRAPlan
from edge_runtime.errors import AdapterMismatchError, UserError
from edge_runtime.lora import apply_lora, get_adapter

FP = "0123456789abcdef"


def _adapter(plan: LoRAPlan, seed: int = 0):
    model = tiny_model()
    apply_lora(model, plan)
    gen = torch.Generator().manual_seed(seed)
    ad = get_adapter(model)
    for w in ad.values():
        w.lora_b = torch.randn(w.lora_b.shape, generator=gen)
    return ad


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for n in a:
        assert torch.equal(a[n].lora_a, b[n].lora_a) and torch.equal(a[n].lora_b, b[n].lora_b)
        assert a[n].alpha == b[n].alpha and a[n].scale == b[n].scale


def test_round_trip_with_per_layer_ranks(tmp_path):
    ad = _adapter(LoRAPlan(rank=4, depth=2, targets=("q", "v", "down"), alpha=8.0,
                           layer_ranks={0: 2}))
    ad["model.layers.1.self_attn.v_proj"].alpha = 3.0
    save_adapter(tmp_path / "a", ad, fingerprint=FP, base_name="tiny")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert cfg["layers_to_transform"] == [0, 1]
    assert cfg["rank_pattern"] == {f"model.layers.0.{m}": 2 for m in
                                   ("mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj")}
    assert cfg["alpha_pattern"] == {"model.layers.1.self_attn.v_proj": 3.0}
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (2, 128)
    assert keys["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 2)
    back, meta = load_adapter(tmp_path / "a", expect_fingerprint=FP)
    _assert_same(ad, back)
    assert meta.fingerprint == FP and meta.base_name == "tiny"


def test_other_base_is_refused_with_both_fingerprints(tmp_path):
    ad = _adapter(LoRAPlan(rank=2, depth=1))
    save_adapter(tmp_path / "a", ad, fingerprint=FP, base_name="tiny")
    with pytest.raises(AdapterMismatchError, match=f"{FP}.*ffffffffffffffff.*train a new"):
        load_adapter(tmp_path / "a", expect_fingerprint="ffffffffffffffff")


def _peft_folder(tmp_path, cfg, tensors):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_foreign_peft_folder_with_regex_patterns_and_rslora(tmp_path):
    a0, b0 = torch.randn(4, 64), torch.randn(64, 4)
    a1, b1 = torch.randn(2, 64), torch.randn(32, 2)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": True,
           "rank_pattern": {r"layers\.1\..*v_proj": 2}, "alpha_pattern": {"v_proj": 5},
           "target_modules": ["q_proj", "v_proj"]}
    folder = _peft_folder(tmp_path, cfg, {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a0,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b0,
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": a1,
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight": b1,
    })
    ad, meta = load_adapter(folder, expect_fingerprint=FP)  # no fingerprint: accepted
    assert meta.fingerprint is None
    q, v = ad["model.layers.0.self_attn.q_proj"], ad["model.layers.1.self_attn.v_proj"]
    assert q.scale == pytest.approx(16 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    assert v.rank == 2 and v.scale == pytest.approx(5 / math.sqrt(2))
    assert torch.equal(q.lora_a, a0) and torch.equal(v.lora_b, b1)


def test_rank_that_contradicts_config_is_refused(tmp_path):
    folder = _peft_folder(tmp_path, {"peft_type": "LORA", "r": 8, "lora_alpha": 16}, {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)})
    with pytest.raises(AdapterFormatError, match="rank 4 but the config says 8"):
        load_adapter(folder)


@pytest.mark.parametrize("cfg,match", [
    ({"peft_type": "LORA", "use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "not LORA"),
    ({"peft_type": "LORA", "bias": "all"}, "biases"),
    ({"peft_type": "LORA", "modules_to_save": ["lm_head"]}, "extra trained modules"),
])
def test_unsupported_peft_features(tmp_path, cfg, match):
    folder = _peft_folder(tmp_path, cfg, {"x": torch.zeros(1)})
    with pytest.raises(AdapterFormatError, match=match):
        load_adapter(folder)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(AdapterFormatError, match="does not exist"):
        load_adapter(tmp_path / "nope")
    folder = tmp_path / "a"
    save_adapter(folder, _adapter(LoRAPlan(rank=2, depth=1)), fingerprint=FP, base_name="t")
    (folder / "adapter_config.json").write_text("{oops")
    with pytest.raises(AdapterFormatError, match="adapter_config.json is not valid JSON"):
        load_adapter(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterFormatError, match="adapter_config.json is missing"):
        load_adapter(folder)
    save_adapter(folder, _adapter(LoRAPlan(rank=2, depth=1)), fingerprint=FP, base_name="t")
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[:-10])
    with pytest.raises(UserError, match="adapter_model.safetensors"):
        load_adapter(folder)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterFormatError, match="never loaded"):
        load_adapter(folder)
    extra = _peft_folder(tmp_path, {"peft_type": "LORA"}, {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(3)})
    with pytest.raises(AdapterFormatError, match="lora_magnitude_vector"):
        load_adapter(extra)


def test_non_product_module_set_uses_exact_names(tmp_path):
    ad = _adapter(LoRAPlan(rank=2, depth=2, targets=("q", "v")))
    del ad["model.layers.0.self_attn.q_proj"]
    save_adapter(tmp_path / "a", ad, fingerprint=FP, base_name="t")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] is None
    import re
    wanted = {n for n in ad}
    candidates = {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert {n for n in candidates if re.fullmatch(cfg["target_modules"], n)} == wanted
    _assert_same(ad, load_adapter(tmp_path / "a")[0])


