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
        overrides: list[tuple[str, int]] = [(f"layer {k}", v) for k, v in self.layer_ranks.items()]
        overrides += list(self.module_ranks.items())
        for where, r in overrides:
            if r <= 0:
                raise ConfigError(f"rank for {where} must be positive, got {r}")

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


# --- Federated strategies (edge_runtime/fl) -------------------------------------------------

@dataclass
class HetLoRAConfig:
    """HetLoRA (Cho et al., arXiv 2401.06432) knobs: rank self-pruning and rank range.

    Attributes:
        gamma: pruning ratio; the tail is the components past floor(gamma * r).
        lam: weight of the tail regulariser added to the local loss.
        r_min: no module is pruned below this rank.
        prune: whether clients self-prune at all.
    """

    gamma: float = 0.9
    lam: float = 1e-3
    r_min: int = 4
    prune: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma < 1.0:
            raise ConfigError(f"hetlora gamma must be in (0, 1), got {self.gamma}; try 0.9")
        if self.lam < 0:
            raise ConfigError(f"hetlora lambda must be >= 0, got {self.lam}")
        if self.r_min <= 0:
            raise ConfigError(f"hetlora r_min must be positive, got {self.r_min}")


@dataclass
class FlexLoRAConfig:
    """FlexLoRA (Bai et al., arXiv 2402.11505) aggregation mode and truncated-SVD settings.

    Attributes:
        mode: `auto` (factored while the stacked rank R < min(d_out, d_in), else
            streaming), `factored`, `streaming` (dense sum + running Gram), `randomized`
            (dense sum + randomized subspace iteration) or `full` (dense sum + full SVD,
            the reference).
        oversample: extra columns of the randomized range finder.
        power_tol: stop power iterations when the top singular values move less than this
            (relative).
        max_power_iters: hard cap on power iterations.
        seed: seed of the random test matrix.
    """

    mode: str = "auto"
    oversample: int = 16
    power_tol: float = 1e-6
    max_power_iters: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "factored", "streaming", "randomized", "full"):
            raise ConfigError(f"flexlora mode {self.mode!r} unknown; choose auto, factored, "
                              "streaming, randomized or full")
        if self.oversample < 0 or self.max_power_iters < 0 or self.power_tol <= 0:
            raise ConfigError("flexlora oversample/max_power_iters must be >= 0, power_tol > 0")


@dataclass
class SAFedLoRAConfig:
    """SA-FedLoRA (Yang et al., arXiv 2405.09394) stages and rank-budget schedule.

    Attributes:
        rounds: total rounds T of the schedule.
        init_rounds: rounds of the initiating stage (proximal term on).
        mu: proximal coefficient (mu/2 ||theta - theta_global||^2).
        heat_rounds: rounds the budget is held at its start value ("heating").
        cool_rounds: final rounds held at the end value ("cooling").
        final_fraction: end budget as a fraction of the start budget.
        r_min: each module keeps at least this many components.
    """

    rounds: int = 10
    init_rounds: int = 2
    mu: float = 0.01
    heat_rounds: int = 2
    cool_rounds: int = 2
    final_fraction: float = 0.25
    r_min: int = 1

    def __post_init__(self) -> None:
        if self.rounds <= 0:
            raise ConfigError(f"sa-fedlora rounds must be positive, got {self.rounds}")
        if min(self.init_rounds, self.heat_rounds, self.cool_rounds) < 0:
            raise ConfigError("sa-fedlora init/heat/cool rounds must be >= 0")
        if self.mu < 0:
            raise ConfigError(f"sa-fedlora mu must be >= 0, got {self.mu}")
        if not 0.0 < self.final_fraction <= 1.0:
            raise ConfigError(f"sa-fedlora final_fraction must be in (0, 1], got "
                              f"{self.final_fraction}")
        if self.r_min <= 0:
            raise ConfigError(f"sa-fedlora r_min must be positive, got {self.r_min}")


@dataclass
class LegendConfig:
    """LEGEND (Liu et al., arXiv 2412.20004) planning: deadline and rank range.

    Attributes:
        deadline_s: common round deadline every device's predicted time must fit.
        r_min: rank of the lowest LoRA block.
        r_max: rank of the top block (ranks grow linearly toward the output).
        min_depth: depth below which a device is not selected (it cannot help).
    """

    deadline_s: float = 60.0
    r_min: int = 4
    r_max: int = 16
    min_depth: int = 1

    def __post_init__(self) -> None:
        if self.deadline_s <= 0:
            raise ConfigError(f"legend deadline must be positive, got {self.deadline_s}")
        if not 0 < self.r_min <= self.r_max:
            raise ConfigError(f"legend needs 0 < r_min <= r_max, got {self.r_min}, {self.r_max}")
        if self.min_depth <= 0:
            raise ConfigError(f"legend min_depth must be positive, got {self.min_depth}")


__all__ += ["HetLoRAConfig", "FlexLoRAConfig", "SAFedLoRAConfig", "LegendConfig"]


@dataclass
class MqttConfig:
    """How to reach the MQTT broker (fleet agent and aggregator).

    Attributes:
        url: `mqtt://HOST:PORT` (plain) or `mqtts://HOST:PORT` (TLS).
        username, password: broker credentials (Mosquitto password file), or None.
        tls_ca: CA certificate file for `mqtts://` (system CAs when None).
        keepalive_s: MQTT keep-alive; the broker publishes the Will after 1.5x this.
        session_expiry_s: MQTT 5 session expiry, so subscriptions survive a reconnect.
        reconnect_min_s, reconnect_max_s: exponential reconnect backoff bounds.
        queue_size: bound of the inbound message queue (callbacks only enqueue).
        prefix, fleet: topics live under `{prefix}/{fleet}/`.
    """

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 3600
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    queue_size: int = 20000
    prefix: str = "edge-rt"
    fleet: str = "default"

    def __post_init__(self) -> None:
        self.host_port()  # validates the URL
        if self.keepalive_s < 5:
            raise ConfigError(f"MQTT keepalive must be at least 5 s, got {self.keepalive_s}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError("reconnect backoff needs 0 < min <= max")
        if self.queue_size <= 0:
            raise ConfigError(f"queue size must be positive, got {self.queue_size}")
        for name in ("prefix", "fleet"):
            v = getattr(self, name)
            if not v or any(c in v for c in "/+#"):
                raise ConfigError(f"MQTT {name} {v!r} must be non-empty without / + #")

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://")

    def host_port(self) -> tuple[str, int]:
        """(host, port) from the URL; port defaults to 1883 (8883 for mqtts)."""
        for scheme, default in (("mqtt://", 1883), ("mqtts://", 8883)):
            if self.url.startswith(scheme):
                rest = self.url[len(scheme):].rstrip("/")
                host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
                if not host:
                    break
                if port and not port.isdigit():
                    break
                return host, int(port) if port else default
        raise ConfigError(f"broker URL {self.url!r} must look like mqtt://HOST:PORT "
                          "or mqtts://HOST:PORT")


@dataclass
class FleetConfig:
    """Aggregator settings for federated rounds over MQTT.

    Attributes:
        strategy: fedavg | hetlora | flexlora | sa-fedlora | legend.
        rounds: number of merged rounds to run.
        min_clients: a round closes early once all selected devices reported; at the
            deadline it merges if at least this many updates were accepted, else retries.
        max_clients: at most this many devices are selected per round (0 = all).
        round_timeout_s: seconds from announcement to deadline.
        max_update_bytes: transfers declaring or sending more are rejected (oversize).
        max_update_norm: bound on ||scale * B A||_F of any module of an update.
        chunk_size: bytes per chunk on the wire (<= 64 KiB suits cloud brokers).
        compression: downlink/uplink tensor encoding: fp32 | fp16 | int8.
        wait_for_clients_s: before round 0, wait up to this long for min_clients to register.
    """

    strategy: str = "fedavg"
    rounds: int = 3
    min_clients: int = 1
    max_clients: int = 0
    round_timeout_s: float = 60.0
    max_update_bytes: int = 64 << 20
    max_update_norm: float = 1e4
    chunk_size: int = 64 * 1024
    compression: str = "fp32"
    wait_for_clients_s: float = 120.0

    def __post_init__(self) -> None:
        strategies = ("fedavg", "hetlora", "flexlora", "sa-fedlora", "legend")
        if self.strategy not in strategies:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of "
                              f"{', '.join(strategies)}")
        if self.rounds <= 0:
            raise ConfigError(f"rounds must be positive, got {self.rounds}; pass --rounds 3")
        if self.min_clients <= 0:
            raise ConfigError(f"min-clients must be positive, got {self.min_clients}")
        if self.max_clients < 0:
            raise ConfigError(f"max-clients must be >= 0, got {self.max_clients}")
        if self.round_timeout_s <= 0:
            raise ConfigError(f"round timeout must be positive, got {self.round_timeout_s}")
        if not 1024 <= self.chunk_size <= 256 * 1024:
            raise ConfigError(f"chunk size must be in [1 KiB, 256 KiB], got {self.chunk_size}")
        if self.compression not in ("fp32", "fp16", "int8"):
            raise ConfigError(f"compression must be fp32, fp16 or int8, got {self.compression!r}")
        if self.max_update_bytes <= 0 or self.max_update_norm <= 0:
            raise ConfigError("max update bytes and norm must be positive")


__all__ += ["MqttConfig", "FleetConfig"]


# --- Profiler (edge_runtime/profiler) ------------------------------------------------------

@dataclass
class ProfileConfig:
    """What `edge-rt profile` measures and the budgets its plan must fit.

    Attributes:
        quant: storage of the frozen base (none, int8, int4).
        batch_size, seq_len: the training step's shape.
        label_fraction: share of positions that carry a loss (1.0: every token, the
            worst case for the LM head; prompt/response rows have less).
        memory_budget_mb: peak RSS the training process may reach; None means
            `budget_fraction` of the RAM available when profiling.
        budget_fraction: the safe share of available RAM used when no budget is given.
        round_deadline_s: wall-clock limit for `steps_per_round` steps (None: no limit).
        steps_per_round: local optimizer steps in one federated round.
        targets: LoRA targets inside a block.
        rank_choices: ranks a block may get.
        alpha: LoRA alpha of the plan.
        quick: fewer repeats; one small whole step calibrates memory only (about a minute
            on a laptop-class CPU for SmolLM2-135M).
        time_basis: `wall` (seconds on the clock, what a deadline sees) or `cpu` (process
            CPU seconds: steadier on a machine shared with other jobs).
    """

    quant: QuantMode = QuantMode.NONE
    batch_size: int = 4
    seq_len: int = 128
    label_fraction: float = 1.0
    memory_budget_mb: float | None = None
    budget_fraction: float = 0.6
    round_deadline_s: float | None = None
    steps_per_round: int = 20
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank_choices: tuple[int, ...] = (4, 8, 16, 32)
    alpha: float = 16.0
    quick: bool = False
    time_basis: str = "wall"

    def __post_init__(self) -> None:
        self.quant = QuantMode.parse(self.quant)
        self.targets = parse_targets(self.targets)
        if self.time_basis not in ("wall", "cpu"):
            raise ConfigError(f"time basis must be 'wall' or 'cpu', got {self.time_basis!r}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {self.batch_size}")
        if self.seq_len < 8:
            raise ConfigError(f"seq-len must be at least 8, got {self.seq_len}")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"label fraction must be in (0, 1], got {self.label_fraction}")
        if self.memory_budget_mb is not None and self.memory_budget_mb <= 0:
            raise ConfigError(f"--memory-budget-mb must be positive, got {self.memory_budget_mb}")
        if not 0.0 < self.budget_fraction <= 1.0:
            raise ConfigError(f"budget fraction must be in (0, 1], got {self.budget_fraction}")
        if self.round_deadline_s is not None and self.round_deadline_s <= 0:
            raise ConfigError(f"--round-deadline-s must be positive, got {self.round_deadline_s}")
        if self.steps_per_round <= 0:
            raise ConfigError(f"--steps-per-round must be positive, got {self.steps_per_round}")
        if not self.rank_choices or min(self.rank_choices) <= 0:
            raise ConfigError(f"rank choices must be positive, got {self.rank_choices}; "
                              "pass e.g. --ranks 4,8,16,32")
        self.rank_choices = tuple(sorted({int(r) for r in self.rank_choices}))


__all__ += ["ProfileConfig"]


@dataclass
class SimulateConfig:
    """In-process fleet simulation (`edge-rt simulate`): fleet, rates, local training.

    Attributes:
        strategy: fedavg | hetlora | flexlora | sa-fedlora | legend.
        clients, rounds: fleet size and number of rounds.
        fraction: share of clients selected per round.
        dropout: probability a selected client never reports.
        straggler: probability a selected client computes `straggler_slowdown` x slower.
        device_classes: declared profile names (profiles/*.json); clients cycle through them.
        r_min, r_max: rank range; classes get ranks from r_min (slowest) to r_max (fastest).
        rank: the homogeneous rank of fedavg (default r_max).
        depth: LoRA depth of non-LEGEND clients (0 = every block).
        deadline_s: round deadline in simulated seconds; late updates are dropped. None:
            wait for every client (LEGEND then plans against the slowest client's time
            at depth 1, rank r_min).
        uplink_mbps, downlink_mbps: link rates for the simulated transfer times.
        eval_max: at most this many held-out rows are scored each round.
    """

    strategy: str = "hetlora"
    clients: int = 8
    rounds: int = 5
    fraction: float = 1.0
    dropout: float = 0.0
    straggler: float = 0.0
    straggler_slowdown: float = 4.0
    device_classes: tuple[str, ...] = ("rpi4-2gb", "rpi5-4gb", "android-mid-6gb",
                                       "android-flagship-12gb")
    local_steps: int = 10
    lr: float = 1e-3
    batch_size: int = 4
    seq_len: int = 128
    r_min: int = 4
    r_max: int = 16
    rank: int | None = None
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    alpha: float = 16.0
    depth: int = 0
    deadline_s: float | None = None
    uplink_mbps: float = 10.0
    downlink_mbps: float = 50.0
    eval_max: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clients <= 0 or self.rounds <= 0:
            raise ConfigError("--clients and --rounds must be positive")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        for key in ("dropout", "straggler"):
            v = getattr(self, key)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"--{key} must be in [0, 1), got {v}")
        if not 0 < self.r_min <= self.r_max:
            raise ConfigError(f"need 0 < r_min <= r_max, got {self.r_min}, {self.r_max}")
        if self.rank is not None and self.rank <= 0:
            raise ConfigError(f"--rank must be positive, got {self.rank}")
        if self.depth < 0:
            raise ConfigError(f"--depth must be >= 0, got {self.depth}")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ConfigError(f"--deadline must be positive, got {self.deadline_s}")
        if not self.device_classes:
            raise ConfigError("at least one device class is needed")
        self.targets = parse_targets(self.targets)


__all__ += ["SimulateConfig"]
