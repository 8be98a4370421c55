"""Shared helpers for the exporter tests: random adapters and eager references."""

from __future__ import annotations

import copy

import torch

from edge_runtime.adapter import Adapter, LoRAWeights
from edge_runtime.checkpoints import LoadedModel
from edge_runtime.lora import set_adapter
from edge_runtime.model import CausalLM
from exporters.runners import Runner

__all__ = ["random_adapter", "eager_with", "eager_logits", "runner_rows", "TOKENS"]

TOKENS = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]


def random_adapter(model: CausalLM, ranks: dict[str, int], alpha: float = 16.0,
                   seed: int = 0, scale_b: float = 0.3) -> Adapter:
    """Factors drawn from a seeded generator; B non-zero so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    out: Adapter = {}
    for name, r in ranks.items():
        lin = model.get_submodule(name)
        d_in, d_out = lin.in_features, lin.out_features
        assert isinstance(d_in, int) and isinstance(d_out, int)
        a = torch.randn(r, d_in, generator=gen) / d_in**0.5
        b = torch.randn(d_out, r, generator=gen) * scale_b
        out[name] = LoRAWeights(a, b, alpha)
    return out


def eager_with(loaded: LoadedModel, adapter: Adapter | None) -> CausalLM:
    """A deep copy of the base with `adapter` applied (the eager reference)."""
    model = copy.deepcopy(loaded.model)
    if adapter:
        set_adapter(model, adapter)
    model.eval()
    return model


@torch.no_grad()
def eager_logits(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) of the eager model over `ids` with its static KV cache, one call."""
    model.setup_cache(1, len(ids))
    try:
        return model(torch.tensor([ids]), torch.arange(len(ids)))[0]
    finally:
        model.clear_cache()


def runner_rows(runner: Runner, ids: list[int], prefill: int) -> tuple[torch.Tensor, list[int]]:
    """Logits from a runner: one prefill of `ids[:prefill]`, then one decode step per token.

    Returns (rows (n, V), the positions they belong to).
    """
    step = runner.step
    runner.reset()
    rows = [step(ids[:prefill], 0)]
    for i in range(prefill, len(ids)):
        rows.append(step([ids[i]], i))
    return torch.stack(rows), list(range(prefill - 1, len(ids)))
