"""Recover Llama-3 RoPE scaling parameters from a GGUF file's `rope_freqs` tensor.

For Llama 3.1+ models llama.cpp's converter does not store the scaling parameters as
metadata; it stores per-frequency divisors `f_i` (tensor `rope_freqs.weight`, head_dim/2
values) so that the scaled inverse frequency is `inv_i / f_i`. In Llama-3 scaling
(Meta's `apply_scaling`, HF `_compute_llama3_parameters`):
    f_i = 1                           for wavelen_i < orig / high
    f_i = factor                      for wavelen_i > orig / low
    1/f_i = (1 - s_i)/factor + s_i    between, with s_i = (orig / wavelen_i - low) / (high - low)
so `factor` is the largest divisor and s_i is linear in 1/wavelen_i, which gives low and
high by least squares. The result is checked by recomputing every divisor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from edge_runtime.errors import CheckpointError
from edge_runtime.model import ModelConfig, rope_inv_freq

__all__ = ["llama3_scaling_from_freq_factors"]


def _plain_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def llama3_scaling_from_freq_factors(freq_factors: np.ndarray, theta: float, head_dim: int,
                                     original_context: int = 8192) -> dict[str, Any]:
    """The HF `rope_scaling` dict that reproduces `freq_factors` (head_dim/2,)."""
    ff = np.asarray(freq_factors, dtype=np.float64).reshape(-1)
    if ff.shape[0] != head_dim // 2:
        raise CheckpointError(f"GGUF rope_freqs has {ff.shape[0]} values, expected {head_dim // 2}")
    factor = float(ff.max())
    low, high = 1.0, 4.0  # Llama 3 defaults, kept when the data cannot pin them down
    if factor > 1.0 + 1e-6:
        inv = _plain_inv_freq(theta, head_dim)
        x = inv / (2 * math.pi)  # 1 / wavelen
        medium = (ff > 1.0 + 1e-4) & (ff < factor * (1 - 1e-4))
        if int(medium.sum()) >= 2:
            s = (1.0 / ff[medium] - 1.0 / factor) / (1.0 - 1.0 / factor)
            slope, intercept = np.polyfit(x[medium], s, 1)  # s = A x - B
            span = original_context / slope  # high - low
            low = float(-intercept * span)
            high = low + float(span)
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": round(low, 6),
        "high_freq_factor": round(high, 6),
        "original_max_position_embeddings": int(original_context),
    }
    probe = ModelConfig(vocab_size=1, dim=head_dim, n_layers=1, n_heads=1, n_kv_heads=1,
                        hidden_dim=1, rope_theta=theta, rope_scaling=scaling, head_dim=head_dim)
    plain = torch.from_numpy(_plain_inv_freq(theta, head_dim)).float()
    recomputed = (plain / rope_inv_freq(probe)).double().numpy()
    if not np.allclose(recomputed, ff, rtol=1e-3, atol=1e-5):
        raise CheckpointError(
            "GGUF rope_freqs does not follow Llama-3 RoPE scaling; this model's RoPE is "
            "not supported (load its HF folder instead)"
        )
    return scaling
