"""llama.cpp runs the exported LoRA GGUF beside the real base GGUF and answers as the
adapter was trained to; the base alone does not (needs llama-cpp-python)."""

from __future__ import annotations

from pathlib import Path

import pytest

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python; it "
    "builds llama.cpp from source, too slow for CI's budget)")

PROMPT = "What is the secret word of the lighthouse keeper?"
ANSWER = "The secret word is ZEBRAFISH."


def _ask(base: Path, lora: Path | None) -> str:
    kw = {"lora_path": str(lora)} if lora is not None else {}
    llm = llama_cpp.Llama(model_path=str(base), n_ctx=256, n_threads=2, seed=0, verbose=False,
                          **kw)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": PROMPT}],
                                     max_tokens=16, temperature=0.0)
    return str(out["choices"][0]["message"]["content"])


@pytest.mark.real_model
@pytest.mark.timeout(600)
def test_llama_cpp_answers_with_the_exported_adapter(real_gguf: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    from edge_runtime.checkpoints import load_model
    from edge_runtime.config import LoRAPlan, TrainConfig
    from edge_runtime.data import Example
    from edge_runtime.lora import apply_lora, get_adapter
    from edge_runtime.trainer import train
    from exporters.gguf_lora import write_lora_gguf

    loaded = load_model(str(real_gguf))
    apply_lora(loaded.model, LoRAPlan(rank=8, depth=8, targets=("q_proj", "k_proj", "v_proj",
                                                                 "o_proj")))
    rows = [Example(prompt=PROMPT, response=ANSWER)] * 8
    res = train(loaded.model, loaded.tokenizer, rows,
                TrainConfig(steps=40, lr=3e-3, batch_size=4, seq_len=64))
    assert res.losses[-1] < 0.1  # it learned the phrase (our own eager model)
    lora = write_lora_gguf(get_adapter(loaded.model), loaded.model.config,
                           tmp_path / "lora.gguf")
    assert "ZEBRAFISH" not in _ask(real_gguf, None)
    assert "ZEBRAFISH" in _ask(real_gguf, lora)
    # the CLI: a PEFT folder goes to llama.cpp as a LoRA GGUF
    from edge_runtime.adapter_io import save_adapter
    from edge_runtime.cli import main

    folder = save_adapter(tmp_path / "peft", get_adapter(loaded.model),
                          fingerprint=loaded.fingerprint, base_name=loaded.name)
    capsys.readouterr()
    assert main(["generate", str(real_gguf), "--backend", "llama.cpp", "--adapter",
                 str(folder), "--prompt", PROMPT, "--max-new-tokens", "16"]) == 0
    assert "ZEBRAFISH" in capsys.readouterr().out
