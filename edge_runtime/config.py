"""One config front door: typed dataclasses, validated on construction.

Each component receives only its own sub-config. Later parts (fleet, MQTT, profiler,
export) add their dataclasses here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from edge_runtime.errors import ConfigError

__all__ = [
    "LORA_TARGETS",
    "QuantMode",
    "LoRAPlan",
    "TrainConfig",
    "GenerateConfig",
    "parse_targets",
]

# Short target names (CLI, plans) -> module attribute names in a Llama block (HF/PEFT names).
LORA_TARGETS: dict[str, str] = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


class QuantMode(str, enum.Enum):
    """Weight-only quantization of the frozen base linears."""

    NONE = "none"
    INT8 = "int8"  # per output channel, symmetric
    INT4 = "int4"  # group-wise (32 columns), asymmetric

    @classmethod
    def parse(cls, value: str | QuantMode) -> QuantMode:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ConfigError(f"unknown quantization {value!r}; choose one of: {choices}") from None


def parse_targets(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Parse `q,v` (or a list, short or full names) into full module names (`q_proj`, ...)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    full_names = set(LORA_TARGETS.values())
    out: list[str] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        if name in LORA_TARGETS:
            name = LORA_TARGETS[name]
        if name not in full_names:
            raise ConfigError(
                f"unknown LoRA target {raw!r}; choose from {','.join(LORA_TARGETS)}"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError("no LoRA targets given; pass e.g. --targets q,v")
    return tuple(out)


@dataclass
class LoRAPlan:
    """Where LoRA goes and at which rank.

    Attributes:
        rank: default rank of every LoRA module.
        depth: LoRA only on the top `depth` blocks (counted from the output).
        targets: module names inside a block (`q_proj`, `v_proj`, ...).
        alpha: scaling numerator; a module's scale is `alpha / rank` (its own rank).
        layer_ranks: optional per-layer rank override, {layer_index: rank}.
        module_ranks: optional per-module override, {"model.layers.3.self_attn.q_proj": r}.
        seed: seed for `lora_a` (identical on every device for the same seed).
    """

    rank: int = 8
    depth: int = 4
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    alpha: float = 16.0
    layer_ranks: dict[int, int] = field(default_factory=dict)
    module_ranks: dict[str, int] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        if self.rank <= 0:
            raise ConfigError(f"rank must be a positive integer, got {self.rank}; pass --rank 8")
        if self.depth <= 0:
            raise ConfigError(f"depth must be a positive integer, got {self.depth}; pass --depth 4")
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha}")
        self.layer_ranks = {int(k): int(v) for k, v in self.layer_ranks.items()}
        for layer, r in {**self.layer_ranks, **self.module_ranks}.items():
            if r <= 0:
                raise ConfigError(f"rank for {layer} must be positive, got {r}")

    def layers(self, n_layers: int) -> list[int]:
        """Indices of the blocks that carry LoRA (the top `depth`)."""
        if self.depth > n_layers:
            raise ConfigError(
                f"depth {self.depth} is above the model's {n_layers} blocks; "
                f"pass --depth {n_layers} or less"
            )
        return list(range(n_layers - self.depth, n_layers))

    def rank_for(self, layer: int, module_name: str) -> int:
        """Rank of one module: module override, then layer override, then default."""
        if module_name in self.module_ranks:
            return self.module_ranks[module_name]
        return self.layer_ranks.get(layer, self.rank)

    def to_json(self) -> dict:
        return {
            "rank": self.rank,
            "depth": self.depth,
            "targets": list(self.targets),
            "alpha": self.alpha,
            "layer_ranks": {str(k): v for k, v in self.layer_ranks.items()},
            "module_ranks": dict(self.module_ranks),
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, d: dict) -> LoRAPlan:
        known = {"rank", "depth", "targets", "alpha", "layer_ranks", "module_ranks", "seed"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown LoRA plan fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(
            rank=int(d.get("rank", 8)),
            depth=int(d.get("depth", 4)),
            targets=tuple(d.get("targets", ("q_proj", "v_proj"))),
            alpha=float(d.get("alpha", 16.0)),
            layer_ranks={int(k): int(v) for k, v in d.get("layer_ranks", {}).items()},
            module_ranks={str(k): int(v) for k, v in d.get("module_ranks", {}).items()},
            seed=int(d.get("seed", 0)),
        )


@dataclass
class TrainConfig:
    """Local training hyper-parameters (one device, one round or one run)."""

    steps: int = 20
    lr: float = 2e-4
    batch_size: int = 4
    seq_len: int = 128
    grad_accum: int = 1
    weight_decay: float = 0.0
    time_budget_s: float | None = None
    seed: int = 0
    packing: bool = False
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}; pass --steps 20")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {self.batch_size}")
        if self.seq_len < 8:
            raise ConfigError(f"seq-len must be at least 8, got {self.seq_len}")
        if self.grad_accum <= 0:
            raise ConfigError(f"grad-accum must be positive, got {self.grad_accum}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"time budget must be positive, got {self.time_budget_s}")


@dataclass
class GenerateConfig:
    """Sampling settings. temperature 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    raw: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
