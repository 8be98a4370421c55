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

from edge_runtime.adapter import Adapter, LoRAWeights
from edge_runtime.config import SECAGG_STRATEGIES, StrategyConfig, StrategyName
from edge_runtime.errors import ConfigError
from edge_runtime.fl.registry import make_strategy
from edge_runtime.fl.types import ClientUpdate, PartialSum

__all__ = ["Layout", "layout_for", "SECAGG_STRATEGIES"]


@dataclass(frozen=True)
class Layout:
    """The vector's parts in order, from the kind and the modules (name, d_out, d_in, r_g)."""

    kind: str
    modules: tuple[tuple[str, int, int, int], ...]

    @property
    def parts(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        out: list[tuple[str, tuple[int, ...]]] = []
        for name, d_out, d_in, r in self.modules:
            if self.kind == "flexlora":
                out += [(f"{name}/n", (3,)), (f"{name}/dense", (d_out, d_in))]
            else:
                out += [(f"{name}/sb", (d_out, r)), (f"{name}/a", (r, d_in)),
                        (f"{name}/w", (1,)), (f"{name}/cw", (r,))]
        return tuple(out)

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "modules": [list(m) for m in self.modules]}

    @classmethod
    def from_json(cls, d: object) -> Layout:
        """A layout from the round announcement; raises ValueError when malformed."""
        if not isinstance(d, dict) or d.get("kind") not in ("padded", "flexlora"):
            raise ValueError("a SecAgg layout needs kind padded|flexlora")
        mods = d.get("modules")
        if not isinstance(mods, list) or not all(
                isinstance(m, list) and len(m) == 4 and isinstance(m[0], str)
                and all(isinstance(x, int) and 0 < x < (1 << 20) for x in m[1:]) for m in mods):
            raise ValueError("a SecAgg layout's modules are [name, d_out, d_in, rank] lists")
        return cls(str(d["kind"]), tuple((str(m[0]), m[1], m[2], m[3]) for m in mods))

    def shapes(self, alpha: float) -> Adapter:
        """A zero adapter of the global's shapes and ranks at `alpha` (what a device folds
        its own update against)."""
        return {name: LoRAWeights(torch.zeros(r, d_in), torch.zeros(d_out, r), alpha)
                for name, d_out, d_in, r in self.modules}

    def device_vector(self, strategy: StrategyConfig, round_index: int, update: ClientUpdate
                      ) -> np.ndarray:
        """Device side: its own update as its strategy's one-device partial sum in this
        layout (its weight `update.num_samples` applied here)."""
        alpha = update.plan.alpha if update.plan is not None else 16.0
        acc = make_strategy(strategy).accumulator(self.shapes(alpha), round_index)
        acc.add(update)
        return self.to_vector(acc.partial())

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
    dense = strategy in (StrategyName.FLEXLORA, StrategyName.SA_FEDLORA)
    mods = tuple((name, g.d_out, g.d_in, g.rank) for name, g in sorted(global_adapter.items()))
    return Layout("flexlora" if dense else "padded", mods)
