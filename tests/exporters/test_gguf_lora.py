"""The LoRA GGUF llama.cpp reads: metadata, tensor names and shapes, values, Q/K rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.adapter import LoRAWeights
from edge_runtime.checkpoints.gguf.loader import permute_qk, unpermute_qk
from edge_runtime.cli import main
from edge_runtime.errors import AdapterMismatchError
from edge_runtime.model import ModelConfig
from exporters.gguf_lora import gguf_tensor_name, write_lora_gguf

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48)


def _adapter(seed: int = 0) -> dict[str, LoRAWeights]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.1.self_attn.q_proj": (32, 32), "model.layers.1.self_attn.k_proj": (16, 32),
              "model.layers.0.mlp.down_proj": (32, 48)}
    return {n: LoRAWeights(torch.randn(3, d_in, generator=g), torch.randn(d_out, 3, generator=g),
                           16.0) for n, (d_out, d_in) in shapes.items()}


def test_permute_is_the_inverse_of_the_loaders_unpermute() -> None:
    w = torch.randn(32, 7)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not torch.equal(permute_qk(w, 4), w)


def test_written_file_has_llama_cpps_layout(tmp_path: Path) -> None:
    from gguf import GGUFReader

    ad = _adapter()
    path = write_lora_gguf(ad, CFG, tmp_path / "lora.gguf")
    r = GGUFReader(str(path))

    def field(key: str):  # type: ignore[no-untyped-def]
        f = r.fields[key]
        return f.contents()

    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("general.architecture") == "llama"
    assert field("adapter.lora.alpha") == pytest.approx(16.0)
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == {f"{gguf_tensor_name(n)}.lora_{x}" for n in ad for x in "ab"}
    for name, w in ad.items():
        base = gguf_tensor_name(name)
        a, b = tensors[f"{base}.lora_a"], tensors[f"{base}.lora_b"]
        d_out, d_in = w.d_out, w.d_in
        assert list(a.shape) == [d_in, 3] and list(b.shape) == [3, d_out]  # ggml ne order
        np.testing.assert_array_equal(np.asarray(a.data).reshape(3, d_in), w.lora_a.numpy())
        got_b = torch.from_numpy(np.asarray(b.data).reshape(d_out, 3).copy())
        if "q_proj" in name or "k_proj" in name:  # rows in llama.cpp's RoPE order
            got_b = unpermute_qk(got_b, 4 if "q_proj" in name else 2)
        torch.testing.assert_close(got_b, w.lora_b)


def test_bad_adapters_are_refused(tmp_path: Path) -> None:
    ad = _adapter()
    ad["model.layers.0.mlp.down_proj"] = LoRAWeights(torch.zeros(2, 48), torch.zeros(32, 2), 8.0)
    with pytest.raises(AdapterMismatchError, match="one alpha"):
        write_lora_gguf(ad, CFG, tmp_path / "x.gguf")
    with pytest.raises(AdapterMismatchError):
        gguf_tensor_name("lm_head")
    with pytest.raises(AdapterMismatchError):
        gguf_tensor_name("model.layers.0.self_attn.rotary")
    assert gguf_tensor_name("model.layers.3.mlp.down_proj") == "blk.3.ffn_down.weight"


def test_cli_exports_a_trained_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "hi", "response": "hello there"}\n' * 4)
    assert main(["train", "tiny", "--data", str(rows), "--steps", "1", "--rank", "2", "--depth", "2",
                 "--out", str(tmp_path / "ad")]) == 0
    capsys.readouterr()
    assert main(["export", "tiny", "--adapter", str(tmp_path / "ad"), "--format", "gguf-lora",
                 "--out", str(tmp_path / "ex")]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "ex" / "lora.gguf") and Path(out).stat().st_size > 0
    assert main(["export", "tiny", "--format", "gguf-lora", "--out", str(tmp_path / "e2")]) == 2
