"""Generation with llama.cpp (llama-cpp-python) on the base GGUF, with an adapter as a
LoRA GGUF (`gguf_lora.write_lora_gguf`): `edge-rt generate MODEL --backend llama.cpp`.

MODEL is a GGUF file or a pulled name; a PEFT adapter folder is checked against the base
(fingerprint) and converted to a temporary LoRA GGUF that llama.cpp applies at load.
Greedy unless a temperature is given; the chat template is the GGUF's own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edge_runtime.config import GenerateConfig
from edge_runtime.errors import CheckpointError, UserError

__all__ = ["generate_llama_cpp"]


def _gguf_path(spec: str) -> Path:
    from edge_runtime.checkpoints import pull

    if spec in pull.KNOWN_MODELS:
        return pull.ensure(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CheckpointError(f"--backend llama.cpp needs a GGUF file or a pulled name, not "
                              f"{spec!r}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file; llama.cpp reads GGUF only")
    return path


def generate_llama_cpp(model: str, prompt: str, cfg: GenerateConfig,
                       adapter: str | None = None, threads: int | None = None) -> str:
    """The completion of `prompt` by llama.cpp (see the module docstring)."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("--backend llama.cpp needs llama-cpp-python: pip install "
                        "llama-cpp-python (it builds llama.cpp from source)") from None
    base = _gguf_path(model)
    with tempfile.TemporaryDirectory(prefix="edge-rt-lora-") as tmp:
        lora_path: str | None = None
        if adapter:
            from edge_runtime.adapter_io import load_adapter
            from edge_runtime.checkpoints import load_model
            from exporters.gguf_lora import write_lora_gguf

            loaded = load_model(str(base))
            ad, _meta = load_adapter(adapter, expect_fingerprint=loaded.fingerprint)
            lora_path = str(write_lora_gguf(ad, loaded.model.config, Path(tmp) / "lora.gguf"))
            del loaded
        try:
            llm = llama_cpp.Llama(model_path=str(base), n_ctx=2048, seed=cfg.seed,
                                  verbose=False, n_threads=threads, lora_path=lora_path)
        except ValueError as e:  # llama.cpp could not load the file(s)
            raise CheckpointError(f"llama.cpp could not load {base}"
                                  f"{' with ' + str(adapter) if adapter else ''} ({e}); is it "
                                  "a complete GGUF? `edge-rt pull` fetches a known model "
                                  "again") from None
        top_k = (cfg.top_k or 0) if cfg.temperature > 0 else 1
        if cfg.raw:
            out: Any = llm.create_completion(prompt, max_tokens=cfg.max_new_tokens,
                                             temperature=cfg.temperature, top_k=top_k)
            return str(out["choices"][0]["text"])
        chat: Any = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_k=top_k)
        return str(chat["choices"][0]["message"]["content"])
