"""The CLI contract, end to end on `tiny`, and bad input: one line, exit 2, no traceback."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

FIX = Path(__file__).parent / "fixtures"


def edge_rt(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if "error" in ln]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter")
    res = edge_rt("train", "tiny", "--data", str(FIX / "qa.jsonl"), "--rank", "4", "--depth", "2",
                  "--targets", "q,v,down", "--steps", "12", "--lr", "5e-3", "--batch-size", "4",
                  "--seq-len", "64", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out)
    return out


def test_train_writes_a_peft_folder(trained):
    cfg = json.loads((trained / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert (trained / "adapter_model.safetensors").is_file()
    log = json.loads((trained / "train_log.json").read_text())
    assert log["result"]["steps"] == 12


def test_generate_prints_only_the_completion_and_adapter_changes_it(trained):
    base = edge_rt("generate", "tiny", "--prompt", "What color is item 3?", "--max-new-tokens", "12")
    tuned = edge_rt("generate", "tiny", "--prompt", "What color is item 3?", "--max-new-tokens",
                    "12", "--adapter", str(trained))
    again = edge_rt("generate", "tiny", "--prompt", "What color is item 3?", "--max-new-tokens",
                    "12", "--adapter", str(trained))
    assert base.returncode == tuned.returncode == 0, base.stderr + tuned.stderr
    assert tuned.stdout == again.stdout  # greedy is deterministic
    assert tuned.stdout != base.stdout
    assert "tok/s" in tuned.stderr and "tok/s" not in tuned.stdout


def test_eval_prints_json_and_the_adapter_lowers_loss(trained):
    base = edge_rt("eval", "tiny", "--data", str(FIX / "qa.jsonl"))
    tuned = edge_rt("eval", "tiny", "--data", str(FIX / "qa.jsonl"), "--adapter", str(trained))
    b, t = json.loads(base.stdout), json.loads(tuned.stdout)
    assert t["loss"] < b["loss"]
    choice = json.loads(edge_rt("eval", "tiny", "--data", str(FIX / "choice.jsonl")).stdout)
    assert 0 <= choice["accuracy"] <= 1 and choice["choice_examples"] == 6


def test_bad_flags_and_files(tmp_path):
    assert_user_error(edge_rt("train", "tiny", "--data", str(tmp_path / "none.jsonl"),
                              "--out", str(tmp_path / "o")), "does not exist")
    assert_user_error(edge_rt("train", "tiny", "--data", str(FIX / "qa.jsonl"), "--rank", "0",
                              "--out", str(tmp_path / "o")), "--rank")
    assert_user_error(edge_rt("train", "tiny", "--data", str(FIX / "qa.jsonl"), "--depth", "5",
                              "--out", str(tmp_path / "o")), "depth 5", "2 blocks")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    assert_user_error(edge_rt("eval", "tiny", "--data", str(bad)), "bad.jsonl:2")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_user_error(edge_rt("eval", "tiny", "--data", str(empty)), "no rows")
    corrupt = tmp_path / "model.gguf"
    corrupt.write_bytes(b"GGUF not really")
    assert_user_error(edge_rt("generate", str(corrupt), "--prompt", "hi"), "model.gguf")
    assert_user_error(edge_rt("generate", str(tmp_path / "missing.gguf"), "--prompt", "hi"),
                      "missing.gguf")
    assert_user_error(edge_rt("generate", "tiny", "--prompt", "hi", "--quant", "int3"), "int3")
    assert_user_error(edge_rt("generate", "tiny", "--prompt", "hi", "--adapter",
                              str(tmp_path / "nope")), "nope")


def test_adapter_for_another_base_is_refused(trained, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    other = tmp_path / "other"
    shutil.copytree(trained, other)
    path = other / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fp_keys = [k for k, v in meta.items() if "fingerprint" in k]
    assert fp_keys, meta
    for k in fp_keys:
        meta[k] = "0123456789abcdef"
    save_file(tensors, str(path), metadata=meta)
    assert_user_error(edge_rt("generate", "tiny", "--prompt", "hi", "--adapter", str(other)),
                      "0123456789abcdef")


def test_help_is_for_users_and_every_example_parses():
    import shlex

    from edge_runtime.cli import COMMANDS, EXAMPLES, build_parser

    parser = build_parser()
    top = parser.format_help()
    assert "register(subparsers)" not in top and "edge-rt demo" in top
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(EXAMPLES) == set(COMMANDS)
    for name in COMMANDS:
        text = sub.choices[name].format_help()
        assert "example:" in text and f"edge-rt {name}" in text.split("example:")[1]
        args = parser.parse_args(shlex.split(EXAMPLES[name])[1:])  # a bad example exits
        assert args.command == name


def test_offline_flag_keeps_a_missing_model_an_error(tmp_path, monkeypatch, capsys):
    from edge_runtime.cli import main
    monkeypatch.setenv("EDGE_RT_CACHE", str(tmp_path))
    monkeypatch.delenv("EDGE_RT_OFFLINE", raising=False)
    code = main(["--offline", "generate", "smollm2-135m", "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "edge-rt pull smollm2-135m" in err[0]


def test_models_lists_known_models_and_their_cache_state(tmp_path, monkeypatch, capsys):
    from edge_runtime.cli import main

    monkeypatch.setenv("EDGE_RT_CACHE", str(tmp_path))
    assert main(["models", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in doc["models"]}
    assert doc["cache"] == str(tmp_path)
    assert rows["smollm2-135m"]["cached"] is False and rows["smollm2-135m"]["size_mb"] > 50
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"x" * 1000)
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["smollm2-135m"]["cached"] is True and rows["smollm2-135m"]["size_mb"] == 0.0


def test_generate_auto_backend_picks_the_runtime_the_model_has(tmp_path: Path) -> None:
    """`edge-rt generate --backend auto` (the default): an export folder runs on its own
    runtime, a GGUF on llama.cpp when llama-cpp-python is installed, else torch."""
    import importlib.util
    import json

    from edge_runtime.cli.generate import pick_backend

    assert pick_backend("tiny")[0] == "torch"
    for fmt in ("onnx", "executorch"):
        d = tmp_path / fmt
        d.mkdir()
        (d / "export.json").write_text(json.dumps({"version": 1, "format": fmt}))
        assert pick_backend(str(d))[0] == fmt
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    has_llama = importlib.util.find_spec("llama_cpp") is not None
    backend, why = pick_backend(str(gguf))
    assert backend == ("llama.cpp" if has_llama else "torch")
    if not has_llama:
        assert "--format onnx" in why  # the one command that makes it faster
