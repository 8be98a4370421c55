"""Random-factor fixtures for the strategy tests (float64 where tolerances need it)."""

from __future__ import annotations

import torch

from edge_runtime.adapter import Adapter, LoRAWeights
from edge_runtime.fl.types import ClientPlan, ClientUpdate

SHAPES = {  # module -> (d_out, d_in)
    "model.layers.0.self_attn.q_proj": (12, 10),
    "model.layers.0.mlp.down_proj": (10, 20),
    "model.layers.1.self_attn.q_proj": (12, 10),
    "model.layers.1.mlp.down_proj": (10, 20),
}


def rand_adapter(gen: torch.Generator, ranks: dict[str, int], alpha: float = 16.0,
                 dtype: torch.dtype = torch.float64, shapes: dict | None = None) -> Adapter:
    shapes = shapes or SHAPES
    out: Adapter = {}
    for name, r in ranks.items():
        d_out, d_in = shapes[name]
        out[name] = LoRAWeights(torch.randn(r, d_in, generator=gen, dtype=dtype),
                                torch.randn(d_out, r, generator=gen, dtype=dtype), alpha)
    return out


def make_update(gen: torch.Generator, dev: str, ranks: dict[str, int], n: int,
                alpha: float = 16.0, with_plan: bool = True,
                shapes: dict | None = None) -> ClientUpdate:
    plan = ClientPlan(dev, dict(ranks), alpha) if with_plan else None
    return ClientUpdate(dev, rand_adapter(gen, ranks, alpha, shapes=shapes), n, plan)


def dense(w: LoRAWeights) -> torch.Tensor:
    return w.delta()
