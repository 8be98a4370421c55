"""One device's contribution as a fixed-length vector the whole round agrees on.

What SecAgg sums is the strategy's own accumulator state (`fl.types.PartialSum`) of one
device's update, laid out over every module of the round's global adapter (zeros where
the device trained nothing), so that the sum of the vectors is the round's partial sum:

- fedavg, hetlora, legend (`padded`): per module the weighted zero-padded factors
  `w s B` (d_out, r_g) and `w A` (r_g, d_in), the weight `w` and the per-component
  weights (r_g). The weights are applied on the device: HetLoRA's sparsity weight is the
  device's own norm, and its normaliser (the sum of the weights) is summed securely with
  the rest.
- flexlora, sa-fedlora (`flexlora`): per module [weight, clients, rank] and the dense
  weighted product `n s B A` (d_out, d_in): the sum of products FlexLoRA needs, at
  d_out x d_in numbers per module instead of r (d_out + d_in).
- flora: refused. Its aggregate stacks each device's factors side by side; any sum that
  hides a device's factors changes the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edge_runtime.adapter import Adapter
from edge_runtime.config import SECAGG_STRATEGIES, StrategyName
from edge_runtime.errors import ConfigError
from edge_runtime.fl.types import PartialSum

__all__ = ["Layout", "layout_for", "SECAGG_STRATEGIES"]


@dataclass(frozen=True)
class Layout:
    """The vector's parts in order: (tensor name, shape)."""

    kind: str
    parts: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.parts)

    def to_vector(self, partial: PartialSum) -> np.ndarray:
        """One device's partial (float64) in this layout; parts it lacks are zeros."""
        if partial.kind != self.kind:
            raise ValueError(f"a {partial.kind} partial in a {self.kind} layout")
        mods = partial.modules()
        out = np.zeros(self.size, dtype=np.float64)
        off = 0
        for key, shape in self.parts:
            n = int(np.prod(shape))
            name, _, part = key.rpartition("/")
            got = mods.get(name, {})
            t = got.get(part)
            if part == "dense" and t is None and "b" in got:  # stacked factors: their product
                t = got["b"].double() @ got["a"].double()
            if t is not None:
                if tuple(t.shape) != shape:
                    raise ValueError(f"{key} is {tuple(t.shape)}, the layout says {shape}")
                out[off:off + n] = t.double().reshape(-1).numpy()
            off += n
        return out

    def from_vector(self, v: np.ndarray, count: int) -> PartialSum:
        """The summed vector as a partial sum of `count` devices."""
        if v.shape != (self.size,):
            raise ValueError(f"a vector of {v.shape} for a layout of {self.size}")
        tensors: dict[str, torch.Tensor] = {}
        off = 0
        for key, shape in self.parts:
            n = int(np.prod(shape))
            tensors[key] = torch.from_numpy(v[off:off + n].reshape(shape).copy())
            off += n
        return PartialSum(self.kind, tensors, count)


def layout_for(strategy: StrategyName, global_adapter: Adapter) -> Layout:
    """The round's layout for `strategy` over `global_adapter`'s modules.

    Raises:
        ConfigError: the strategy cannot be securely aggregated (FLoRA).
    """
    if strategy not in SECAGG_STRATEGIES:
        raise ConfigError(f"secure aggregation cannot sum {strategy.value}: its aggregate "
                          "stacks each device's factors, which a masked sum hides; use "
                          f"one of {', '.join(s.value for s in SECAGG_STRATEGIES)}")
    parts: list[tuple[str, tuple[int, ...]]] = []
    dense = strategy in (StrategyName.FLEXLORA, StrategyName.SA_FEDLORA)
    for name in sorted(global_adapter):
        g = global_adapter[name]
        if dense:
            parts += [(f"{name}/n", (3,)), (f"{name}/dense", (g.d_out, g.d_in))]
        else:
            parts += [(f"{name}/sb", (g.d_out, g.rank)), (f"{name}/a", (g.rank, g.d_in)),
                      (f"{name}/w", (1,)), (f"{name}/cw", (g.rank,))]
    return Layout("flexlora" if dense else "padded", tuple(parts))
