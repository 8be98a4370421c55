"""Base-model fingerprint: which frozen weights an adapter was trained on.

sha256 over the architecture (the `ModelConfig` JSON, minus free-form `extra`) and a
deterministic sample of every frozen base tensor (name, shape, and `SAMPLES` evenly
spaced fp32 values), in name order. Computed on the full-precision weights as they are
loaded, before quantization, so the same weights read from a GGUF file or from a HF
folder give the same fingerprint and `--quant` does not change it. LoRA factors are
ignored, and a wrapped base (`q_proj.base.weight`) counts under its own name.
"""

from __future__ import annotations

import hashlib
import json

import torch

from edge_runtime.model import CausalLM, ModelConfig

__all__ = ["base_fingerprint", "FingerprintBuilder", "SAMPLES", "FINGERPRINT_HEX"]

SAMPLES = 256  # values sampled per tensor
FINGERPRINT_HEX = 16  # hex characters kept
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _sample(name: str, t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    k = min(SAMPLES, n)
    idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)  # exact ints
    return f"{name}:{tuple(t.shape)}".encode() + flat[idx].contiguous().numpy().tobytes()


class FingerprintBuilder:
    """Accumulates tensor samples one at a time (while a checkpoint streams in)."""

    def __init__(self) -> None:
        self._samples: dict[str, bytes] = {}
        self._embed_as_head: bytes | None = None

    def add(self, name: str, t: torch.Tensor) -> None:
        self._samples[name] = _sample(name, t)
        if name == _EMBED:  # a tied head is the embedding under another name
            self._embed_as_head = _sample(_HEAD, t)

    def hexdigest(self, cfg: ModelConfig) -> str:
        samples = dict(self._samples)
        if cfg.tie_embeddings and self._embed_as_head is not None:
            samples[_HEAD] = self._embed_as_head
        h = hashlib.sha256()
        arch = {k: v for k, v in cfg.to_json().items() if k != "extra"}
        h.update(json.dumps(arch, sort_keys=True).encode())
        for name in sorted(samples):
            h.update(samples[name])
        return h.hexdigest()[:FINGERPRINT_HEX]


def base_fingerprint(model: CausalLM) -> str:
    """Short hex digest of the architecture and a sample of the frozen base weights."""
    builder = FingerprintBuilder()
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if parts[-1] in ("lora_a", "lora_b"):
            continue
        if not t.is_floating_point():
            raise ValueError(f"{name} is quantized; take the fingerprint before quantizing")
        builder.add(".".join(p for p in parts if p != "base"), t)
    return builder.hexdigest(model.config)
