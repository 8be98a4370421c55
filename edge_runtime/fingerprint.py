"""Base-model fingerprint: which frozen weights an adapter was trained on.

sha256 over the architecture (the `ModelConfig` JSON, minus free-form `extra`) and a
deterministic sample of every frozen base tensor (name, shape, and `SAMPLES` evenly
spaced fp32 values). Computed on the full-precision weights right after loading and
before quantization, so the same weights read from a GGUF file or from a HF folder give
the same fingerprint and `--quant` does not change it. LoRA factors are ignored, and a
wrapped base (`q_proj.base.weight`) counts under its own name (`q_proj.weight`).
"""

from __future__ import annotations

import hashlib
import json

import torch

from edge_runtime.model import CausalLM

__all__ = ["base_fingerprint", "SAMPLES", "FINGERPRINT_HEX"]

SAMPLES = 256  # values sampled per tensor
FINGERPRINT_HEX = 16  # hex characters kept


def _base_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        parts = name.split(".")
        if parts[-1] in ("lora_a", "lora_b"):
            continue
        if not t.is_floating_point():
            raise ValueError(
                f"{name} is quantized; compute the fingerprint before quantize_linears"
            )
        out[".".join(p for p in parts if p != "base")] = t
    return out


def base_fingerprint(model: CausalLM) -> str:
    """Short hex digest of the architecture and a sample of the frozen base weights."""
    h = hashlib.sha256()
    arch = {k: v for k, v in model.config.to_json().items() if k != "extra"}
    h.update(json.dumps(arch, sort_keys=True).encode())
    for name, t in sorted(_base_tensors(model).items()):
        flat = t.detach().reshape(-1).to(torch.float32)
        n = flat.numel()
        k = min(SAMPLES, n)
        idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)  # exact ints
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(flat[idx].contiguous().numpy().tobytes())
    return h.hexdigest()[:FINGERPRINT_HEX]
