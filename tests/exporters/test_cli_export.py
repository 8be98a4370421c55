"""`edge-rt export` then `edge-rt generate --backend onnx` on `tiny`, with PEFT adapter folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.adapter_io import save_adapter
from edge_runtime.checkpoints import load_model
from edge_runtime.cli import main
from edge_runtime.config import GenerateConfig
from exporters.export import read_manifest
from exporters.runners import OnnxRunner, generate_ids, load_adapter_for_export
from tests.exporters.helpers import random_adapter

QV = [f"model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in ("q", "v")]


def _adapter_dir(path: Path, ranks: list[int], seed: int) -> str:
    loaded = load_model("tiny")
    adapter = random_adapter(loaded.model, dict(zip(QV, ranks, strict=True)), seed=seed)
    save_adapter(path, adapter, fingerprint=loaded.fingerprint, base_name=loaded.name)
    return str(path)


def _generate(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["generate", *argv, "--prompt", "hello", "--max-new-tokens", "12"]) == 0
    return capsys.readouterr().out


def test_export_then_generate_with_swapped_adapter(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    first = _adapter_dir(tmp_path / "a1", [4, 4, 4, 4], seed=1)
    second = _adapter_dir(tmp_path / "a2", [2, 8, 1, 6], seed=2)
    out = tmp_path / "onnx"
    assert main(["export", "tiny", "--adapter", first, "--format", "onnx",
                 "--max-seq-len", "48", "--out", str(out)]) == 0
    capsys.readouterr()
    assert _generate(capsys, str(out), "--backend", "onnx") == \
        _generate(capsys, "tiny", "--adapter", first)
    swapped = _generate(capsys, str(out), "--backend", "onnx", "--adapter", second)
    assert swapped == _generate(capsys, "tiny", "--adapter", second)
    # the texts of a random byte-level model can collide ('\ufffd' for any invalid byte):
    # check on token ids that the swapped adapter really changed the generation
    manifest = read_manifest(out)
    cfg = GenerateConfig(max_new_tokens=12)
    ids = load_model("tiny").tokenizer.encode("hello")
    runs = [generate_ids(OnnxRunner(out, load_adapter_for_export(a, manifest)), ids, cfg,
                         set())[0] for a in (first, second)]
    assert runs[0] != runs[1]


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "tiny", "--format", "executorch", "--quant", "int4",
                 "--out", str(tmp_path / "x")]) == 2
    assert "use none|8da4w|8da8w" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--backend", "onnx", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "not an export folder" in err and len(err.strip().splitlines()) == 1
