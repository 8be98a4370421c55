"""LoRA by composition: `LoRALinear` wraps a frozen base linear (fp32 or quantized).

y = base(x) + (alpha / rank) * lora_b(lora_a(x))       (Hu et al., LoRA, eq. 3)

`lora_a` is drawn from a generator seeded by (seed, module name), so every device
draws the same matrix for the same module, and the first r rows of a rank-R draw are
the rank-r draw (HetLoRA truncation is consistent at round 0). `lora_b` starts at 0.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from edge_runtime.adapter import Adapter, LoRAWeights, layer_index
from edge_runtime.config import LoRAPlan, lora_module_name
from edge_runtime.errors import AdapterMismatchError
from edge_runtime.model import CausalLM

__all__ = [
    "LoRALinear",
    "seeded_lora_a",
    "apply_lora",
    "lora_modules",
    "get_adapter",
    "set_adapter",
    "remove_lora",
    "lora_scale",
    "FrozenDelta",
    "add_frozen_delta",
]


def lora_scale(alpha: float, rank: int) -> float:
    """The one scaling rule used in training, aggregation, the wire and export."""
    return alpha / rank


def _module_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_lora_a(seed: int, name: str, rank: int, d_in: int) -> torch.Tensor:
    """Kaiming-uniform(a=sqrt(5)) init as nn.Linear/PEFT, bound 1/sqrt(d_in); (rank, d_in)."""
    gen = torch.Generator().manual_seed(_module_seed(seed, name))
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=gen) * 2 - 1) * bound


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update. Never subclasses the base."""

    def __init__(self, base: nn.Module, d_in: int, d_out: int, rank: int, alpha: float,
                 lora_a: torch.Tensor | None = None) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.d_in = d_in
        self.d_out = d_out
        self.alpha = float(alpha)
        self.lora_a = nn.Parameter(torch.zeros(rank, d_in))  # (r, d_in)
        self.lora_b = nn.Parameter(torch.zeros(d_out, rank))  # (d_out, r)
        if lora_a is not None:
            with torch.no_grad():
                self.lora_a.copy_(lora_a)

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_a.t()) @ self.lora_b.t())

    def set_weights(self, w: LoRAWeights) -> None:
        """Load factors, resizing the rank if needed (the base stays as is)."""
        if w.d_in != self.d_in or w.d_out != self.d_out:
            raise AdapterMismatchError(
                f"LoRA factors of shape B{tuple(w.lora_b.shape)} A{tuple(w.lora_a.shape)} do "
                f"not fit a {self.d_out}x{self.d_in} layer; the adapter is for another base model"
            )
        dev = self.lora_a.device
        self.lora_a = nn.Parameter(w.lora_a.detach().to(dev, torch.float32).clone())
        self.lora_b = nn.Parameter(w.lora_b.detach().to(dev, torch.float32).clone())
        self.alpha = float(w.alpha)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, alpha={self.alpha}"


class FrozenDelta(nn.Module):
    """A base linear plus a fixed low-rank term: y = base(x) + (x A^T) (s B)^T.

    What a merged adapter is to a frozen (possibly quantized) base without touching its
    weights: FLoRA's stacked global, which the paper merges into W, is applied this way
    under the device's fresh trainable LoRA (`LoRALinear` wraps a `FrozenDelta`).
    """

    delta_a: torch.Tensor  # (R, d_in)
    delta_sb: torch.Tensor  # (d_out, R): s B

    def __init__(self, base: nn.Module, w: LoRAWeights) -> None:
        super().__init__()
        d_in, d_out = _in_out(base)
        if (w.d_in, w.d_out) != (d_in, d_out):
            raise AdapterMismatchError(f"frozen factors B{tuple(w.lora_b.shape)} "
                                       f"A{tuple(w.lora_a.shape)} do not fit a {d_out}x{d_in} "
                                       "layer; the adapter is for another base model")
        self.base = base
        self.in_features = d_in
        self.out_features = d_out
        dev = next((t.device for t in [*base.parameters(), *base.buffers()]),
                   torch.device("cpu"))
        self.register_buffer("delta_a", w.lora_a.detach().to(dev, torch.float32).clone())
        self.register_buffer("delta_sb", (w.lora_b.detach().double() * w.scale)
                             .to(dev, torch.float32).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.delta_a.t()) @ self.delta_sb.t()

    def extra_repr(self) -> str:
        return f"d_in={self.in_features}, d_out={self.out_features}, rank={self.delta_a.shape[0]}"


def add_frozen_delta(model: CausalLM, adapter: Adapter) -> None:
    """Wrap each named linear in a `FrozenDelta` of its factors (call before LoRA is set;
    `remove_lora` unwraps them)."""
    if lora_modules(model):
        raise ValueError("add_frozen_delta goes under LoRA: call remove_lora first")
    for name, w in adapter.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise AdapterMismatchError(f"adapter names module {name!r}, which this base model "
                                       "does not have; the adapter is for another base model"
                                       ) from None
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, FrozenDelta(base, w))
    for p in model.parameters():
        p.requires_grad_(False)


def _in_out(base: nn.Module) -> tuple[int, int]:
    d_in = base.in_features
    d_out = base.out_features
    assert isinstance(d_in, int) and isinstance(d_out, int), "LoRA wraps linear layers only"
    return d_in, d_out


def apply_lora(model: CausalLM, plan: LoRAPlan) -> dict[str, LoRALinear]:
    """Freeze the model and wrap the plan's target modules in the top `depth` blocks.

    Sets `model.frozen_prefix` so the blocks below the lowest LoRA block build no
    autograd graph. Returns {module name: LoRALinear}.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    n_layers = model.config.n_layers
    layers = plan.layers(n_layers)
    wrapped: dict[str, LoRALinear] = {}
    for i in layers:
        block = model.model.layers[i]
        for target in plan.targets:
            name = lora_module_name(i, target)
            parent = block.self_attn if ".self_attn." in name else block.mlp
            base = getattr(parent, target)
            if isinstance(base, LoRALinear):
                raise ValueError(f"{name} already has LoRA; call remove_lora first")
            d_in, d_out = _in_out(base)
            rank = plan.rank_for(i, name)
            lora = LoRALinear(base, d_in, d_out, rank, plan.alpha,
                              seeded_lora_a(plan.seed, name, rank, d_in))
            setattr(parent, target, lora)
            wrapped[name] = lora
    model.frozen_prefix = min(layers)
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def remove_lora(model: CausalLM) -> None:
    """Unwrap every LoRALinear (and any `FrozenDelta` under it) back to the base module."""
    for kind in (LoRALinear, FrozenDelta):
        for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, mod.base)
    model.frozen_prefix = 0


def get_adapter(model: nn.Module) -> Adapter:
    """Detached copies of every LoRA module's factors."""
    return {
        name: LoRAWeights(m.lora_a.detach().clone(), m.lora_b.detach().clone(), m.alpha)
        for name, m in lora_modules(model).items()
    }


def set_adapter(model: CausalLM, adapter: Adapter, *, create: bool = True) -> None:
    """Load an adapter into the model, every key consumed and every LoRA module covered.

    With `create`, modules named in the adapter that carry no LoRA yet are wrapped (so a
    global adapter of another depth or rank loads). Modules with LoRA that the adapter
    does not name are an error: silently keeping stale weights is how federated code
    "never actually federated".
    """
    existing = lora_modules(model)
    for name, w in adapter.items():
        if name in existing:
            existing[name].set_weights(w)
            continue
        if not create:
            raise AdapterMismatchError(f"adapter module {name} has no LoRA in this model")
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise AdapterMismatchError(
                f"adapter names module {name!r}, which this base model does not have; "
                "the adapter is for another base model"
            ) from None
        if not hasattr(base, "in_features"):
            raise AdapterMismatchError(f"adapter module {name!r} is not a linear layer")
        d_in, d_out = _in_out(base)
        lora = LoRALinear(base, d_in, d_out, w.rank, w.alpha)
        lora.set_weights(w)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, lora)
    missing = set(lora_modules(model)) - set(adapter)
    if missing:
        raise AdapterMismatchError(
            f"adapter lacks {len(missing)} LoRA modules the model has, e.g. {sorted(missing)[0]}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_a.requires_grad_(True)
        m.lora_b.requires_grad_(True)
    if adapter:
        model.frozen_prefix = min(layer_index(n) for n in adapter)
