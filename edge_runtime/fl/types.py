"""Round vocabulary shared by every strategy: client plans, client updates, accumulators.

A *plan* says which LoRA modules a client trains this round and at which rank (its
depth is implied by the modules it names). An *update* is the adapter a client sends
back plus its sample count. Strategies are pure functions over these: no MQTT, no
`nn.Module` (Flower's `aggregate.py` + `Strategy` split).

Scaling convention (one, everywhere): what is aggregated and distributed is the
*scaled product* `s_k B_k A_k` with `s_k = alpha_k / r_k` (DESIGN.md section 4).
Factor-wise strategies (FedAvg, HetLoRA, LEGEND) carry `s_k B_k` (the scaled B) and
`A_k`; when an adapter is handed to a client of rank r, B is divided by that
client's scale `alpha / r`, so the client's product equals the global one.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from edge_runtime.adapter import Adapter, LoRAWeights
from edge_runtime.errors import AdapterMismatchError

__all__ = [
    "ClientPlan",
    "ClientUpdate",
    "PartialSum",
    "part_shape",
    "Accumulator",
    "Strategy",
    "StrategyBase",
    "Regularizer",
    "UpdateMismatchError",
    "check_update",
    "scaled_b",
    "from_scaled_b",
    "pad_rows",
    "pad_cols",
    "module_shapes",
]


class UpdateMismatchError(AdapterMismatchError, ValueError):
    """A client update does not match the plan it was given (keys, shapes, ranks, values).

    `reason` is the fleet's reject reason (`fleet.protocol.REJECT_REASONS`).
    """

    def __init__(self, message: str, reason: str = "bad_shape") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class ClientPlan:
    """What one client trains in one round.

    Attributes:
        device_id: the client's id (also the MQTT topic id).
        ranks: {module name: rank} of every LoRA module the client trains; the set of
            names is the client's depth and targets.
        alpha: LoRA alpha (a module's scale is alpha / rank).
        device_class: optional name of the client's device class (for logs/metrics).
    """

    device_id: str
    ranks: dict[str, int]
    alpha: float = 16.0
    device_class: str = ""

    def __post_init__(self) -> None:
        for name, r in self.ranks.items():
            if int(r) <= 0:
                raise UpdateMismatchError(f"plan for {self.device_id}: rank of {name} is {r}, "
                                          "must be positive")

    def to_json(self) -> dict:
        return {"device_id": self.device_id, "ranks": dict(self.ranks), "alpha": self.alpha,
                "device_class": self.device_class}

    @classmethod
    def from_json(cls, d: Mapping) -> ClientPlan:
        return cls(str(d["device_id"]), {str(k): int(v) for k, v in d["ranks"].items()},
                   float(d.get("alpha", 16.0)), str(d.get("device_class", "")))


@dataclass
class ClientUpdate:
    """One client's contribution to a round.

    Attributes:
        device_id: who sent it.
        adapter: the trained adapter, {module name: LoRAWeights}.
        num_samples: number of local training examples (FedAvg weight n_k).
        plan: the plan the client was given; when set, the adapter's keys must equal
            the plan's and each rank must be <= the planned rank (HetLoRA may prune).
        info: free-form numbers a strategy may use (e.g. HetLoRA tail norms).
    """

    device_id: str
    adapter: Adapter
    num_samples: int
    plan: ClientPlan | None = None
    info: dict[str, float] = field(default_factory=dict)


@dataclass
class PartialSum:
    """An accumulator's running state as named tensors that add across accumulators.

    Hierarchical aggregation: a site folds its devices' updates, sends `partial()`, and the
    root `merge`s the sites' partials into a fresh accumulator of the same round; its
    `result()` then equals folding every update into one accumulator (every strategy's
    state is a sum over devices). `kind` names the accumulator that made it; tensor names
    are `{module}/{part}`; `count` is the number of updates folded in.
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    count: int

    def modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """{module: {part: tensor}}."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self.tensors.items():
            name, _, part = key.rpartition("/")
            if not name or not part:
                raise UpdateMismatchError(f"partial sum tensor {key!r} is not module/part",
                                          "garbage")
            out.setdefault(name, {})[part] = t
        return out

    def expect(self, kind: str, global_adapter: Adapter) -> dict[str, dict[str, torch.Tensor]]:
        """The partial's modules, checked to be of `kind` and of the global's modules."""
        if self.kind != kind:
            raise UpdateMismatchError(f"a {self.kind!r} partial sum cannot merge into a {kind!r} "
                                      "accumulator; sites and root must run one strategy",
                                      "bad_keys")
        mods = self.modules()
        unknown = set(mods) - set(global_adapter)
        if unknown:
            raise UpdateMismatchError(f"partial sum has modules the global lacks, e.g. "
                                      f"{sorted(unknown)[0]}", "bad_keys")
        for name, parts in mods.items():
            for part, t in parts.items():
                if not torch.isfinite(t).all():
                    raise UpdateMismatchError(f"partial sum {name}/{part} has non-finite values",
                                              "non_finite")
        return mods


def part_shape(mods: dict[str, dict[str, torch.Tensor]], name: str, part: str,
               shape: tuple[int, ...]) -> torch.Tensor:
    """`mods[name][part]`, which must exist with `shape`."""
    t = mods[name].get(part)
    if t is None or tuple(t.shape) != shape:
        got = None if t is None else tuple(t.shape)
        raise UpdateMismatchError(f"partial sum {name}/{part} is {got}, expected {shape}; it "
                                  "was folded against another global adapter", "bad_shape")
    return t


class Accumulator(Protocol):
    """Incremental aggregation: fold updates in as they arrive, one running sum per module.

    `partial()` / `merge()` carry the state between accumulators of one round (a site's
    to the root's, `PartialSum`).
    """

    def add(self, update: ClientUpdate) -> None: ...

    def result(self) -> Adapter: ...

    def partial(self) -> PartialSum: ...

    def merge(self, partial: PartialSum) -> None: ...

    @property
    def count(self) -> int: ...


Regularizer = Callable[[nn.Module], torch.Tensor]


class Strategy(Protocol):
    """A federated LoRA strategy: how a round's adapters go out and come back.

    Server side: `distribute` (the adapter a client starts the round from),
    `accumulator` / `aggregate` (fold the round's updates into the next global).
    Client side: `regularizer` (added to the local loss, or None) and `finish_local`
    (what the client uploads, e.g. HetLoRA's pruned adapter).
    """

    name: str

    def distribute(self, global_adapter: Adapter, plan: ClientPlan) -> Adapter: ...

    def regularizer(self, start: Adapter, plan: ClientPlan,
                    round_index: int) -> Regularizer | None: ...

    def finish_local(self, start: Adapter, trained: Adapter, plan: ClientPlan) -> Adapter: ...

    def accumulator(self, global_adapter: Adapter, round_index: int = 0) -> Accumulator: ...

    def aggregate(self, global_adapter: Adapter, updates: Iterable[ClientUpdate],
                  round_index: int = 0) -> Adapter: ...


class StrategyBase(abc.ABC):
    """Defaults: no local regulariser, upload what was trained, batch = fold the accumulator."""

    name = "base"

    @abc.abstractmethod
    def distribute(self, global_adapter: Adapter, plan: ClientPlan) -> Adapter:
        """The adapter a client of this plan starts the round from."""

    def regularizer(self, start: Adapter, plan: ClientPlan,
                    round_index: int) -> Regularizer | None:
        return None

    def finish_local(self, start: Adapter, trained: Adapter, plan: ClientPlan) -> Adapter:
        return trained

    #: planned ranks never exceed the global adapter's (False: FLoRA, whose global is a
    #: stack and whose devices train fresh adapters of their own rank)
    ranks_capped_by_global: bool = True

    def local_start(self, received: Adapter, plan: ClientPlan, seed: int
                    ) -> tuple[Adapter | None, Adapter]:
        """Client side: (frozen part applied under LoRA or None, the adapter to train).

        Default: nothing frozen, train what was distributed. `seed` is the device's seed
        for this round (for a strategy that draws a fresh adapter).
        """
        return None, received

    def exact_prior(self, global_adapter: Adapter) -> Adapter | None:
        """What the exact aggregate adds the clients' average to (diagnostics): None when
        each client's product already holds its start; FLoRA's is the old stack."""
        return None

    @abc.abstractmethod
    def accumulator(self, global_adapter: Adapter, round_index: int = 0) -> Accumulator:
        """A running aggregate for one round, fed update by update."""

    def aggregate(self, global_adapter: Adapter, updates: Iterable[ClientUpdate],
                  round_index: int = 0) -> Adapter:
        """Batch aggregation: exactly the accumulator fed the updates in order."""
        acc = self.accumulator(global_adapter, round_index)
        for u in updates:
            acc.add(u)
        return acc.result()


def module_shapes(adapter: Adapter) -> dict[str, tuple[int, int]]:
    """{module name: (d_out, d_in)}."""
    return {n: (w.d_out, w.d_in) for n, w in adapter.items()}


def check_update(update: ClientUpdate, global_adapter: Adapter, *,
                 allow_subset: bool = False) -> None:
    """Validate an update against the global adapter and the client's plan.

    Every module the client was told to train must be present (no silent drops), no
    module may be unknown, shapes must fit the base layers, alpha must be the plan's,
    ranks must not exceed the plan, values must be finite and num_samples positive. The
    one structural check of an update: strategies and the server's validation call it.

    Raises:
        UpdateMismatchError: naming the device, the module and what is wrong, with the
            fleet's reject reason.
    """
    dev = update.device_id
    if isinstance(update.num_samples, bool) or update.num_samples <= 0:
        raise UpdateMismatchError(f"update from {dev}: num_samples is {update.num_samples}, "
                                  "must be positive", "bad_manifest")
    keys = set(update.adapter)
    unknown = keys - set(global_adapter)
    if unknown:
        raise UpdateMismatchError(f"update from {dev} has modules the global adapter lacks, e.g. "
                                  f"{sorted(unknown)[0]}; it was trained on another plan/base",
                                  "bad_keys")
    if update.plan is not None:
        expected = set(update.plan.ranks)
    elif allow_subset:
        expected = keys
    else:
        expected = set(global_adapter)
    missing = expected - keys
    extra = keys - expected
    if missing:
        raise UpdateMismatchError(f"update from {dev} lacks {len(missing)} planned modules, e.g. "
                                  f"{sorted(missing)[0]}; every planned module must be sent",
                                  "bad_keys")
    if extra:
        raise UpdateMismatchError(f"update from {dev} has unplanned modules, e.g. "
                                  f"{sorted(extra)[0]}", "bad_keys")
    if not keys and not allow_subset:
        raise UpdateMismatchError(f"update from {dev} is empty", "bad_keys")
    for name, w in update.adapter.items():
        g = global_adapter[name]
        if (w.d_out, w.d_in) != (g.d_out, g.d_in):
            raise UpdateMismatchError(
                f"update from {dev}: {name} has B{tuple(w.lora_b.shape)} A{tuple(w.lora_a.shape)}"
                f", the global module is {g.d_out}x{g.d_in}; wrong base model")
        if update.plan is not None and not math.isclose(w.alpha, update.plan.alpha,
                                                        rel_tol=1e-6):
            raise UpdateMismatchError(f"update from {dev}: {name} has alpha {w.alpha}, the "
                                      f"plan's is {update.plan.alpha}")
        if update.plan is not None and w.rank > update.plan.ranks[name]:
            raise UpdateMismatchError(f"update from {dev}: {name} has rank {w.rank} above its "
                                      f"planned rank {update.plan.ranks[name]}",
                                      "rank_above_plan")
        if not (torch.isfinite(w.lora_a).all() and torch.isfinite(w.lora_b).all()):
            raise UpdateMismatchError(f"update from {dev}: {name} has non-finite values",
                                      "non_finite")


def scaled_b(w: LoRAWeights, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """s B with s = alpha / rank: (d_out, r). The factor that carries the scale."""
    return w.lora_b.to(dtype) * w.scale


def from_scaled_b(sb: torch.Tensor, a: torch.Tensor, alpha: float,
                  dtype: torch.dtype = torch.float32) -> LoRAWeights:
    """Inverse of `scaled_b`: factors whose product (alpha/r) B A equals sB A."""
    r = int(a.shape[0])
    return LoRAWeights(a.to(dtype).contiguous(), (sb * (r / alpha)).to(dtype).contiguous(), alpha)


def pad_cols(t: torch.Tensor, r: int) -> torch.Tensor:
    """Zero-pad (d, r_k) to (d, r) on the right."""
    if t.shape[1] > r:
        raise UpdateMismatchError(f"rank {t.shape[1]} is above the global rank {r}")
    return torch.nn.functional.pad(t, (0, r - t.shape[1]))


def pad_rows(t: torch.Tensor, r: int) -> torch.Tensor:
    """Zero-pad (r_k, d) to (r, d) at the bottom."""
    if t.shape[0] > r:
        raise UpdateMismatchError(f"rank {t.shape[0]} is above the global rank {r}")
    return torch.nn.functional.pad(t, (0, 0, 0, r - t.shape[0]))
