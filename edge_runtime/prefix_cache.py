"""Frozen-prefix activations kept per example, so a later epoch skips the frozen blocks.

With LoRA in the top `depth` blocks, the embedding and the blocks below them are frozen:
their output for an example is a pure function of its tokens. A device trains on the same
local examples epoch after epoch, so recomputing them is waste; at depth 8 of
SmolLM2-135M's 30 blocks they are about a third of a step's CPU time. (Skip2-LoRA,
Matsutani et al. 2024, caches the frozen part's forward the same way.)

Rows are stored exactly (fp32, the example's own length, no padding) under the example's
token ids and the prefix depth, within a byte budget; past it, new rows are computed and
not kept. Causal attention makes a row's states at positions < its length independent of
the right padding and of the other rows of its batch, so a cached row equals a fresh one
up to float summation order.

A cache is valid for one frozen prefix. `bind(model)` (what `train_tokenized` calls
first) compares the model's prefix signature (its depth and a digest of every frozen
delta inside it: FLoRA's stacked global, new each round) with the one the rows were
computed under and drops them all when it changed. So a device that keeps its cache
across rounds (the MQTT agent does) trains every round after the first on cached states
when its depth and base stay put, and recomputes exactly when they do not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from edge_runtime.lora import FrozenDelta
from edge_runtime.model import CausalLM

__all__ = ["PrefixCache", "prefix_signature"]


@dataclass
class PrefixCache:
    budget_bytes: int
    hits: int = 0
    misses: int = 0
    stored_bytes: int = 0
    signature: str | None = None  # of the prefix the rows were computed under
    _rows: dict[tuple[int, tuple[int, ...]], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of_mb(cls, mb: float) -> PrefixCache:
        return cls(budget_bytes=int(mb * 2**20))

    def bind(self, model: CausalLM, budget_mb: float | None = None) -> bool:
        """Make the cache valid for `model`'s current frozen prefix (and budget).

        Returns whether the stored rows were kept; they are dropped when the prefix's
        signature changed or they no longer fit a new, smaller budget."""
        sig = prefix_signature(model)
        if budget_mb is not None:
            self.budget_bytes = int(budget_mb * 2**20)
        keep = sig == self.signature and self.stored_bytes <= self.budget_bytes
        if not keep:
            self.clear()
        self.signature = sig
        return keep

    def clear(self) -> None:
        self._rows.clear()
        self.stored_bytes = 0

    def states(self, model: CausalLM, rows: list[list[int]], input_ids: torch.Tensor
               ) -> torch.Tensor:
        """The frozen prefix's output (B, T, dim) for `input_ids` (B, T), right-padded
        `rows` (each row's own token ids); cached rows are reused, the others computed
        (one batch of just those rows) and kept while the budget lasts."""
        split = model.frozen_prefix
        if split <= 0:
            raise ValueError("no frozen prefix to cache: apply a LoRA plan with depth below "
                             "the model's block count")
        keys = [(split, tuple(r)) for r in rows]
        missing = [i for i, k in enumerate(keys) if k not in self._rows]
        missing_set = set(missing)
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        b, t = input_ids.shape
        out = torch.zeros(b, t, model.config.dim)
        if missing:
            fresh = model.prefix_states(input_ids[missing])  # (M, T, dim)
            for j, i in enumerate(missing):
                out[i] = fresh[j]
                row = fresh[j, :len(rows[i])].clone()
                size = row.numel() * row.element_size()
                if keys[i] not in self._rows and self.stored_bytes + size <= self.budget_bytes:
                    self._rows[keys[i]] = row
                    self.stored_bytes += size
        for i, k in enumerate(keys):
            if i not in missing_set:
                cached = self._rows[k]
                out[i, :cached.shape[0]] = cached
        return out


def prefix_signature(model: CausalLM) -> str:
    """A digest of what the frozen prefix computes beyond the base weights: its depth and
    the factors of every `FrozenDelta` (FLoRA's stacked global) inside its blocks."""
    split = model.frozen_prefix
    h = hashlib.sha256(f"{split}".encode())
    for i, layer in enumerate(model.blocks()[:split]):
        for name, mod in layer.named_modules():
            if isinstance(mod, FrozenDelta):
                h.update(f"{i}.{name}".encode())
                for t in (mod.delta_a, mod.delta_sb):
                    h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
