"""The adapter as data: LoRA factors per module, independent of any nn.Module.

One vocabulary everywhere (training, aggregation, wire, export): `lora_a` (rank x d_in),
`lora_b` (d_out x rank), `alpha`, `rank`; a module's scale is `alpha / rank`.
Module names are the model's own (`model.layers.3.self_attn.q_proj`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = ["LoRAWeights", "Adapter", "layer_index", "adapter_num_params", "adapter_ranks",
           "frobenius_norm_ba"]

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def frobenius_norm_ba(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """||B A||_F without forming B A: sqrt(tr((B^T B)(A A^T))), an r x r product,
    O(r^2 (d_out + d_in)) instead of O(d_out d_in r). b (d_out, r), a (r, d_in)."""
    btb = b.t() @ b  # (r, r)
    aat = a @ a.t()  # (r, r)
    return torch.sqrt(torch.clamp((btb * aat).sum(), min=0.0))  # tr(X Y) = sum(X * Y^T), Y sym.


@dataclass
class LoRAWeights:
    """The two factors of one LoRA module. delta W = (alpha / rank) * lora_b @ lora_a."""

    lora_a: torch.Tensor  # (rank, d_in)
    lora_b: torch.Tensor  # (d_out, rank)
    alpha: float

    def __post_init__(self) -> None:
        if self.lora_a.dim() != 2 or self.lora_b.dim() != 2:
            raise ValueError("lora_a and lora_b must be 2-D")
        if self.lora_a.shape[0] != self.lora_b.shape[1]:
            raise ValueError(
                f"rank mismatch: lora_a {tuple(self.lora_a.shape)} vs lora_b {tuple(self.lora_b.shape)}"
            )

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def d_in(self) -> int:
        return int(self.lora_a.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.lora_b.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense update (d_out, d_in) = scale * B A. For tests and references only."""
        return self.scale * (self.lora_b.double() @ self.lora_a.double())

    def delta_norm(self) -> float:
        """||scale * B A||_F in float64 (HetLoRA's sparsity score, the server's norm bound)."""
        return abs(self.scale) * float(frobenius_norm_ba(self.lora_b.double(),
                                                         self.lora_a.double()))

    def clone(self) -> LoRAWeights:
        return LoRAWeights(self.lora_a.detach().clone(), self.lora_b.detach().clone(), self.alpha)


Adapter = dict[str, LoRAWeights]


def layer_index(module_name: str) -> int:
    """Block index in a module name such as `model.layers.12.mlp.up_proj`."""
    m = _LAYER_RE.search(module_name)
    if m is None:
        raise ValueError(f"no layer index in module name {module_name!r}")
    return int(m.group(1))


def adapter_num_params(adapter: Adapter) -> int:
    return sum(w.lora_a.numel() + w.lora_b.numel() for w in adapter.values())


def adapter_ranks(adapter: Adapter) -> dict[str, int]:
    return {name: w.rank for name, w in adapter.items()}
