"""One config front door: typed dataclasses, validated on construction.

Each component receives only its own sub-config. Later parts (fleet, MQTT, profiler,
export) add their dataclasses here.
"""

from __future__ import annotations

import enum
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from edge_runtime.errors import ConfigError

E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")

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


def _enum(cls: type[E], value: object, what: str) -> E:
    """`value` as a member of the Enum `cls`, or a ConfigError listing the choices."""
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(str(m.value) for m in cls)  # type: ignore[attr-defined]
        raise ConfigError(f"{what} {value!r} is not one of: {choices}") from None


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
    # Activations of the frozen blocks below the lowest LoRA block, kept per example
    # (fp32, exact) so a later epoch over the same example skips those blocks; 0 = off.
    prefix_cache_mb: float = 64.0

    def __post_init__(self) -> None:
        if self.prefix_cache_mb < 0:
            raise ConfigError(f"prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")
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

class Weighting(str, enum.Enum):
    """How a zero-padded average weighs each client's update."""

    SPARSITY = "sparsity"  # HetLoRA: S_k = ||s_k B_k A_k||_F
    SAMPLES = "samples"  # FedAvg: n_k
    UNIFORM = "uniform"  # 1 each (an ablation)


@dataclass
class HetLoRAConfig:
    """HetLoRA (Cho et al., arXiv 2401.06432) knobs: rank self-pruning, rank range and the
    aggregation's weights (the paper's sparsity weights, or the baselines' ablations).

    Attributes:
        gamma: pruning ratio; the tail is the components past floor(gamma * r).
        lam: weight of the tail regulariser added to the local loss.
        r_min: no module is pruned below this rank.
        prune: whether clients self-prune at all.
        weighting: sparsity (the paper), samples or uniform.
        rankwise: average each rank component only over the clients that have it,
            instead of zero-padding every client to r_max (which dilutes the components
            only high-rank clients train, arXiv 2406.17477).
    """

    gamma: float = 0.9
    lam: float = 1e-3
    r_min: int = 4
    prune: bool = True
    weighting: Weighting = Weighting.SPARSITY
    rankwise: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma < 1.0:
            raise ConfigError(f"hetlora gamma must be in (0, 1), got {self.gamma}; try 0.9")
        self.weighting = _enum(Weighting, self.weighting, "hetlora weighting")
        if self.lam < 0:
            raise ConfigError(f"hetlora lambda must be >= 0, got {self.lam}")
        if self.r_min <= 0:
            raise ConfigError(f"hetlora r_min must be positive, got {self.r_min}")


class FlexMode(str, enum.Enum):
    """How FlexLoRA forms the truncated SVD of the aggregated product."""

    AUTO = "auto"
    FACTORED = "factored"
    STREAMING = "streaming"
    RANDOMIZED = "randomized"
    FULL = "full"


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

    mode: FlexMode = FlexMode.AUTO
    oversample: int = 16
    power_tol: float = 1e-6
    max_power_iters: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        self.mode = _enum(FlexMode, self.mode, "flexlora mode")
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
        b0: the starting total rank budget; None: the sum of the global adapter's ranks at
            round 0 (the server fixes it when a run starts and persists it with the run).
    """

    rounds: int = 10
    init_rounds: int = 2
    mu: float = 0.01
    heat_rounds: int = 2
    cool_rounds: int = 2
    final_fraction: float = 0.25
    r_min: int = 1
    b0: int | None = None

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
        if self.b0 is not None and self.b0 <= 0:
            raise ConfigError(f"sa-fedlora b0 must be positive, got {self.b0}")


@dataclass
class LegendConfig:
    """LEGEND (Liu et al., arXiv 2412.20004) planning: deadline and rank range.

    Attributes:
        deadline_s: common round deadline every device's predicted time must fit; None:
            the fleet's round timeout (in simulation: the smallest deadline that keeps
            every device, the slowest at depth 1 and rank r_min).
        r_min: rank of the lowest LoRA block.
        r_max: rank of the top block (ranks grow linearly toward the output).
        min_depth: depth below which a device is not selected (it cannot help).
    """

    deadline_s: float | None = None
    r_min: int = 4
    r_max: int = 16
    min_depth: int = 1

    def __post_init__(self) -> None:
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ConfigError(f"legend deadline must be positive, got {self.deadline_s}")
        if not 0 < self.r_min <= self.r_max:
            raise ConfigError(f"legend needs 0 < r_min <= r_max, got {self.r_min}, {self.r_max}")
        if self.min_depth <= 0:
            raise ConfigError(f"legend min_depth must be positive, got {self.min_depth}")


@dataclass
class FLoRAConfig:
    """FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976): stacking, exact aggregation.

    The server stacks the round's weighted client factors onto the global adapter (its
    rank grows each round) and every device trains a fresh LoRA of its own rank on top of
    the frozen stack (the paper merges the stack into the base weights; a frozen low-rank
    term is the same function and keeps a quantized base as it is).

    Attributes:
        rel_tol: after each merge the stack is re-factored by an exact SVD of its factors
            and components whose singular value is below rel_tol x the largest are
            dropped (0 keeps all; the rank never exceeds min(d_out, d_in), where a stack
            is full rank and re-factoring it loses nothing).
        max_rank: 0: no cap (exact); > 0: keep only the top max_rank components of each
            module's stack (bounded download, no longer exact).
    """

    rel_tol: float = 1e-7
    max_rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rel_tol < 1:
            raise ConfigError(f"flora rel_tol must be in [0, 1), got {self.rel_tol}")
        if self.max_rank < 0:
            raise ConfigError(f"flora max_rank must be >= 0 (0: no cap), got {self.max_rank}")


__all__ += ["HetLoRAConfig", "Weighting", "FlexLoRAConfig", "FlexMode", "SAFedLoRAConfig",
            "LegendConfig", "FLoRAConfig"]


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


class Compression(str, enum.Enum):
    """Tensor encoding of adapters on the wire."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


def parse_robust(spec: str) -> tuple[str, float]:
    """`none` | `median` | `trimmed-mean:BETA` (0 <= BETA < 0.5) -> (mode, beta)."""
    s = spec.strip().lower()
    if s in ("none", "median"):
        return s, 0.0
    if s.startswith("trimmed-mean"):
        _, _, frac = s.partition(":")
        try:
            beta = float(frac) if frac else 0.2
        except ValueError:
            beta = -1.0
        if not 0.0 <= beta < 0.5:
            raise ConfigError(f"fleet.robust {spec!r}: the trimmed share must be in [0, 0.5), "
                              "e.g. trimmed-mean:0.2")
        return "trimmed-mean", beta
    raise ConfigError(f"fleet.robust {spec!r} is not one of none, median, trimmed-mean:BETA")



@dataclass
class DPConfig:
    """Client-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018): each
    device's change of the model is clipped to L2 norm `clip`, the round's sum gets
    Gaussian noise of std `noise_multiplier` x `clip`, and an accountant reports epsilon
    at `delta` (`fl.dp`, `fl.privacy`, docs/PRIVACY.md).

    Attributes:
        clip: bound C on the L2 norm of one device's change per round; 0 = DP off.
        noise_multiplier: z; the noise on each summed coordinate has std z * C.
        delta: the delta epsilon is reported at (below 1 / number of devices).
        seed: seeds the noise and the device selection (tests and reproducible studies
            only: a known seed makes the noise known and voids the guarantee); None draws
            both from the OS CSPRNG.
    """

    clip: float = 0.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.clip >= 0 and math.isfinite(self.clip)):
            raise ConfigError(f"fleet.dp.clip must be >= 0 (0: DP off), got {self.clip}; "
                              "pass e.g. --dp-clip 0.5")
        if self.clip > 0 and not (self.noise_multiplier > 0
                                  and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"fleet.dp.noise_multiplier must be positive, got "
                              f"{self.noise_multiplier}; pass e.g. --dp-noise-multiplier 1.0")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"fleet.dp.delta must be in (0, 1), got {self.delta}; pass e.g. "
                              "--dp-delta 1e-5")

    @property
    def on(self) -> bool:
        return self.clip > 0


class WeightCap(str, enum.Enum):
    """Bound on the sample count (aggregation weight) a device may claim in a round."""

    PLAN = "plan"  # min(registered rows, local steps x batch x grad_accum)
    REGISTERED = "registered"  # the rows it registered with
    NONE = "none"  # trust the claim (the behaviour before the bound existed)


@dataclass
class FleetConfig:
    """How rounds run: how many, who is selected, deadlines and limits on updates.

    Attributes:
        rounds: number of merged rounds to run.
        min_clients: a round closes early once all selected devices reported; at the
            deadline it merges if at least this many updates were accepted, else retries.
        max_clients: at most this many devices are selected per round (0 = no cap).
        fraction: share of the eligible devices selected per round (then capped by
            max_clients); the draw is seeded by the run's seed and the round.
        round_timeout_s: seconds from announcement to deadline.
        max_update_bytes: transfers declaring or sending more are rejected (oversize).
        max_update_norm: bound on ||scale * B A||_F of any module of an update.
        serve_sites: also publish the whole global adapter each round for site
            aggregators (`edge-rt site`), whose partial sums this aggregator merges
            (hierarchical aggregation, docs/SCALING.md).
        secagg: secure aggregation (SecAgg+, `edge_runtime.secagg`): the server sees
            only masked updates and merges their sum; fedavg, hetlora, legend, flexlora
            and sa-fedlora, in process and over MQTT (docs/PRIVACY.md).
        chunk_size: bytes per chunk on the wire (<= 64 KiB suits cloud brokers).
        compression: downlink/uplink tensor encoding: fp32 | fp16 | int8.
        wait_for_clients_s: before round 0, wait up to this long for min_clients to register.
        diagnostics_rank: when > 0, each round also logs the aggregation error against the
            exact average of the clients' products and the share of its energy in the top
            `diagnostics_rank` singular directions (`fl.diagnostics`; dense products, for
            studies).
        weight_cap: the sample count a device may claim (its aggregation weight): plan =
            at most what the round let it train on (steps x batch x grad_accum) and the rows
            it registered; registered = the rows it registered; none = its claim.
        clip_multiple: adaptive clipping: an update whose change of the model is above
            this multiple of the round's median change is pulled back to it
            (`fl.clipping`; 0 = off). Applied when a round has at least
            `clip_min_updates` updates.
        clip_min_updates: fewer updates than this: no adaptive clipping (a median of one
            or two is the attacker's own).
        robust: none | median | trimmed-mean:BETA: a coordinate-wise statistic instead of
            the strategy's weighted mean (`fl.robust`; fedavg, hetlora, legend, flexlora).
        dp: client-level differential privacy (`DPConfig`; off unless dp.clip > 0).
    """

    rounds: int = 3
    min_clients: int = 1
    max_clients: int = 0
    fraction: float = 1.0
    round_timeout_s: float = 60.0
    max_update_bytes: int = 64 << 20
    max_update_norm: float = 1e4
    serve_sites: bool = False
    secagg: bool = False
    chunk_size: int = 64 * 1024
    compression: Compression = Compression.FP32
    wait_for_clients_s: float = 120.0
    diagnostics_rank: int = 0
    weight_cap: WeightCap = WeightCap.PLAN
    clip_multiple: float = 3.0
    clip_min_updates: int = 3
    robust: str = "none"
    dp: DPConfig = field(default_factory=DPConfig)

    def __post_init__(self) -> None:
        if isinstance(self.dp, dict):
            self.dp = from_dict(DPConfig, self.dp, "fleet.dp")
        self.compression = _enum(Compression, self.compression, "fleet.compression")
        self.weight_cap = _enum(WeightCap, self.weight_cap, "fleet.weight_cap")
        if self.clip_multiple < 0 or (0 < self.clip_multiple < 1):
            raise ConfigError(f"fleet.clip_multiple must be 0 (off) or >= 1, got "
                              f"{self.clip_multiple}")
        parse_robust(self.robust)
        if self.clip_min_updates < 2:
            raise ConfigError(f"fleet.clip_min_updates must be >= 2, got "
                              f"{self.clip_min_updates}")
        if self.diagnostics_rank < 0:
            raise ConfigError(f"fleet.diagnostics_rank must be >= 0, got {self.diagnostics_rank}")
        if self.rounds <= 0:
            raise ConfigError(f"rounds must be positive, got {self.rounds}; pass --rounds 3")
        if self.min_clients <= 0:
            raise ConfigError(f"min-clients must be positive, got {self.min_clients}")
        if self.max_clients < 0:
            raise ConfigError(f"max-clients must be >= 0, got {self.max_clients}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fleet.fraction must be in (0, 1], got {self.fraction}")
        if self.round_timeout_s <= 0:
            raise ConfigError(f"round timeout must be positive, got {self.round_timeout_s}")
        if not 1024 <= self.chunk_size <= 256 * 1024:
            raise ConfigError(f"chunk size must be in [1 KiB, 256 KiB], got {self.chunk_size}")
        if self.max_update_bytes <= 0 or self.max_update_norm <= 0:
            raise ConfigError("max update bytes and norm must be positive")
        if self.wait_for_clients_s <= 0:
            raise ConfigError(f"wait_for_clients_s must be positive, got {self.wait_for_clients_s}")


# Device and transfer ids (MQTT topic levels and file names).
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class AgentConfig:
    """One device's settings.

    Attributes:
        device_id: unique id (also the broker username when the ACL is on).
        data: local JSONL training file (never leaves the device).
        model: model spec for `load_model` (GGUF path, HF folder, `smollm2-135m`, `tiny`).
        state_dir: outbox and last adapter live here.
        profile: the device's profile (measured by `edge-rt profile` or declared).
        device_class: e.g. pi4, pi5, phone (the aggregator's fallback for a plan).
        quant: weight-only quantization of the frozen base.
        compression: upload encoding (fp32, fp16, int8).
        chunk_size: upload chunk size in bytes.
        ack_timeout_s: re-send an update not acked within this many seconds (doubled
            with each re-send, at most 8x: `fleet.agent.resend_after`).
        uplink_bytes_per_s: emulate a slow uplink (0 = unlimited).
        out: where to save the final adapter (optional).
        exit_when_done: stop once the final adapter is applied.
        connect_timeout_s: give up on an unreachable broker after this long (None: never).
    """

    device_id: str
    data: Path
    model: str = "tiny"
    state_dir: Path = Path(".edge-rt-agent")
    profile: dict[str, Any] = field(default_factory=dict)
    device_class: str = ""
    quant: QuantMode = QuantMode.NONE
    compression: Compression = Compression.FP32
    chunk_size: int = 64 * 1024
    ack_timeout_s: float = 10.0
    uplink_bytes_per_s: float = 0.0
    out: Path | None = None
    exit_when_done: bool = True
    connect_timeout_s: float | None = None  # None: wait for the broker forever

    def __post_init__(self) -> None:
        if not isinstance(self.device_id, str) or not DEVICE_ID_RE.match(self.device_id):
            raise ConfigError(f"device id {self.device_id!r} must be 1-64 characters of "
                              "A-Z a-z 0-9 _ . - (it names MQTT topics and files)")
        self.quant = _enum(QuantMode, self.quant, "agent quant")
        self.compression = _enum(Compression, self.compression, "agent compression")
        if self.chunk_size <= 0 or self.ack_timeout_s <= 0 or self.uplink_bytes_per_s < 0:
            raise ConfigError("agent chunk_size and ack_timeout_s must be positive, "
                              "uplink_bytes_per_s >= 0")



__all__ += ["MqttConfig", "FleetConfig", "Compression", "AgentConfig", "DEVICE_ID_RE",
            "WeightCap", "capped_weight", "parse_robust", "check_robust", "ROBUST_FACTOR_STRATEGIES",
            "SECAGG_STRATEGIES", "ROBUST_PRODUCT_STRATEGIES", "DPConfig", "check_dp",
            "DP_FACTOR_STRATEGIES", "DP_PRODUCT_STRATEGIES"]


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


# --- The run: one nested config for `simulate`, `aggregator` and `demo` ---------------------

def lora_module_name(layer: int, target: str) -> str:
    """The one module-name rule: `model.layers.{layer}.{self_attn|mlp}.{target}` (HF/PEFT)."""
    parent = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{parent}.{target}"


class StrategyName(str, enum.Enum):
    FEDAVG = "fedavg"
    HETLORA = "hetlora"
    FLEXLORA = "flexlora"
    SA_FEDLORA = "sa-fedlora"
    LEGEND = "legend"
    FLORA = "flora"


def capped_weight(cap: WeightCap, n: int, registered: int | None, recipe: TrainConfig) -> int:
    """The sample count a device claiming `n` may be weighted by (`FleetConfig.weight_cap`):
    at most what it registered (`registered`; None: unknown, no bound) and, with `plan`,
    what the round's recipe can consume (steps x batch x grad_accum)."""
    if cap is WeightCap.NONE:
        return n
    limit = n if registered is None else registered
    if cap is WeightCap.PLAN:
        limit = min(limit, recipe.steps * recipe.batch_size * recipe.grad_accum)
    return min(n, max(1, limit))


# What secure aggregation can sum (edge_runtime.secagg.layout): not FLoRA's stacks.
SECAGG_STRATEGIES = (StrategyName.FEDAVG, StrategyName.HETLORA, StrategyName.LEGEND,
                     StrategyName.FLEXLORA, StrategyName.SA_FEDLORA)
# Strategies whose aggregate is an average, so a robust statistic can replace it
# (`fl.robust`): over zero-padded factors, or over dense products.
ROBUST_FACTOR_STRATEGIES = (StrategyName.FEDAVG, StrategyName.HETLORA, StrategyName.LEGEND)
ROBUST_PRODUCT_STRATEGIES = (StrategyName.FLEXLORA,)


def check_robust(strategy: StrategyName, spec: str) -> tuple[str, float]:
    """`parse_robust(spec)`, refused for a strategy without a robust form."""
    mode, beta = parse_robust(spec)
    if mode != "none" and strategy not in ROBUST_FACTOR_STRATEGIES + ROBUST_PRODUCT_STRATEGIES:
        raise ConfigError(f"fleet.robust {spec!r} is not available for {strategy.value} (its "
                          "aggregate is not a plain average); use it with fedavg, hetlora, "
                          "legend or flexlora")
    return mode, beta


# Strategies with a DP form (`fl.dp`): their aggregate is a mean over devices, so with equal
# weights and a fixed denominator one device moves it by at most its clipped change.
DP_FACTOR_STRATEGIES = ROBUST_FACTOR_STRATEGIES
DP_PRODUCT_STRATEGIES = ROBUST_PRODUCT_STRATEGIES


def check_dp(strategy: StrategyConfig, fleet: FleetConfig) -> None:
    """Refuse settings under which `fleet.dp` would not give its guarantee (docs/PRIVACY.md).

    Raises:
        ConfigError: naming the setting and what to change.
    """
    if not fleet.dp.on:
        return
    name = strategy.name
    if name not in DP_FACTOR_STRATEGIES + DP_PRODUCT_STRATEGIES:
        why = {StrategyName.SA_FEDLORA: "not implemented: its importance allocation would "
               "be post-processing of a noised dense sum as in flexlora, but that path is not "
               "wired",
               StrategyName.FLORA: "its global stack releases every device's own factors, "
               "not their sum, so noise on a sum cannot hide one device"}.get(name, "")
        raise ConfigError(f"fleet.dp is not available for {name.value} ({why}); use fedavg, "
                          "hetlora, legend or flexlora, or set fleet.dp.clip = 0")
    if fleet.robust.strip().lower() != "none":
        raise ConfigError(f"fleet.dp and fleet.robust = {fleet.robust!r} do not combine (a "
                          "median's sensitivity is not bounded by the clip); set fleet.robust "
                          "= \"none\" or fleet.dp.clip = 0")
    if fleet.clip_multiple > 0:
        raise ConfigError(f"fleet.dp clips every update at fleet.dp.clip; adaptive clipping "
                          f"(fleet.clip_multiple = {fleet.clip_multiple}) bounds them by the "
                          "round's median, which depends on the other devices' data: set "
                          "fleet.clip_multiple = 0")
    s = strategy.settings
    if isinstance(s, HetLoRAConfig):
        if s.prune:
            raise ConfigError("fleet.dp with hetlora needs strategy.prune = false: the rank a "
                              "device prunes to depends on its data and is released through "
                              "its next plan, without noise")
        if s.weighting is not Weighting.UNIFORM or s.rankwise:
            raise ConfigError("fleet.dp with hetlora needs strategy.weighting = \"uniform\" "
                              "and strategy.rankwise = false: sparsity weights and per-rank "
                              "denominators depend on the updates, so one device could move "
                              "the mean by more than its clipped change")


@dataclass
class FedAvgConfig:
    """Homogeneous LoRA / FedAvg (McMahan et al. 2017): every device trains the global
    adapter's ranks (`adapter.r_max`).

    Attributes:
        drop_weak: only devices whose own plan reaches r_max on every module take part
            (what practitioners do today when some devices cannot afford the rank); the
            others are never selected.
    """

    drop_weak: bool = False


StrategySettings = (FedAvgConfig | HetLoRAConfig | FlexLoRAConfig | SAFedLoRAConfig
                    | LegendConfig | FLoRAConfig)

STRATEGY_SETTINGS: dict[StrategyName, type] = {
    StrategyName.FEDAVG: FedAvgConfig,
    StrategyName.HETLORA: HetLoRAConfig,
    StrategyName.FLEXLORA: FlexLoRAConfig,
    StrategyName.SA_FEDLORA: SAFedLoRAConfig,
    StrategyName.LEGEND: LegendConfig,
    StrategyName.FLORA: FLoRAConfig,
}


@dataclass
class StrategyConfig:
    """A strategy's name and its typed settings, server and client part alike.

    This is what the round announcement carries to every device (`to_json`), so a device
    never rebuilds a strategy from its name with default settings.
    """

    name: StrategyName = StrategyName.HETLORA
    settings: StrategySettings | None = None

    def __post_init__(self) -> None:
        self.name = _enum(StrategyName, self.name, "strategy")
        want = STRATEGY_SETTINGS[self.name]
        if self.settings is None:
            self.settings = want()
        elif not isinstance(self.settings, want):
            raise ConfigError(f"strategy {self.name.value} needs {want.__name__} settings, got "
                              f"{type(self.settings).__name__}")

    def to_json(self) -> dict:
        return {"name": self.name.value, **to_jsonable(self.settings)}

    @classmethod
    def from_json(cls, d: dict, section: str = "strategy") -> StrategyConfig:
        """Parse `{"name": ..., setting: value, ...}`; a setting of another strategy is refused."""
        if not isinstance(d, dict):
            raise ConfigError(f"{section} must be a table/object, got {type(d).__name__}")
        rest = dict(d)
        name = _enum(StrategyName, rest.pop("name", cls.name), f"{section}.name")
        want = STRATEGY_SETTINGS[name]
        own = {f.name for f in fields(want)}
        for key in rest:
            if key in own:
                continue
            others = [n.value for n, c in STRATEGY_SETTINGS.items()
                      if key in {f.name for f in fields(c)}]
            if others:
                raise ConfigError(f"{section}.{key} is a setting of {' / '.join(others)}, not of "
                                  f"{name.value}; remove it or set {section}.name = "
                                  f"\"{others[0]}\"")
        return cls(name, from_dict(want, rest, section))


class Backend(str, enum.Enum):
    """Where an in-process simulation runs its devices' local training: one after another in
    this process, or as Ray actors (the `ray` extra), the round engine deciding the rest."""

    LOCAL = "local"
    RAY = "ray"


class Transport(str, enum.Enum):
    """How a simulated fleet's messages move: in this process, through an MQTT broker, or
    through Flower's simulation engine (the `flower` extra)."""

    INPROC = "inproc"
    MQTT = "mqtt"
    FLOWER = "flower"


@dataclass
class ModelSpec:
    """The base model: a GGUF path, an HF folder, a pulled name (smollm2-135m) or `tiny`."""

    name: str = "tiny"
    quant: QuantMode = QuantMode.NONE

    def __post_init__(self) -> None:
        self.quant = _enum(QuantMode, self.quant, "model.quant")
        if not self.name:
            raise ConfigError("model.name is empty; pass --model tiny or a GGUF path")


@dataclass
class AdapterSpec:
    """The global adapter's extent and the fleet's rank range.

    Attributes:
        r_max: rank of the global adapter (the largest any device gets).
        r_min: the smallest rank a device class gets (simulation: classes ramp r_min to
            r_max by speed); also HetLoRA's pruning floor and LEGEND's ramp start unless
            their own settings say otherwise.
        depth: LoRA on the top `depth` blocks of the global adapter; 0 = every block;
            None = the top min(4, blocks).
        targets: module names inside a block.
        alpha: LoRA alpha (a module's scale is alpha / its rank).
    """

    r_max: int = 8
    r_min: int = 2
    depth: int | None = None
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    alpha: float = 16.0

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        if not 0 < self.r_min <= self.r_max:
            raise ConfigError(f"adapter needs 0 < r_min <= r_max, got r_min {self.r_min}, "
                              f"r_max {self.r_max}")
        if self.depth is not None and self.depth < 0:
            raise ConfigError(f"adapter.depth must be >= 0 (0 = every block), got {self.depth}")
        if self.alpha <= 0:
            raise ConfigError(f"adapter.alpha must be positive, got {self.alpha}")

    def depth_for(self, n_layers: int) -> int:
        """The global depth on a model of `n_layers` blocks (0 means all)."""
        if self.depth is None:
            return min(4, n_layers)
        d = self.depth or n_layers
        if d > n_layers:
            raise ConfigError(f"adapter.depth {d} is above the model's {n_layers} blocks; pass "
                              f"--depth {n_layers} or less")
        return d


class EvalSplit(str, enum.Enum):
    TEST = "test"
    VALIDATION = "validation"


@dataclass
class DataSpec:
    """Where a simulated fleet's data comes from and what is held out.

    Attributes:
        path: a folder from `edge-rt data pull` (client_*/train.jsonl, test.jsonl) or a
            dataset name (sentiment, fortunes, chatterbot, bigbench:T1,T2).
        partition: when `path` is a name: domain | task | dirichlet | iid.
        dirichlet_alpha: concentration of the Dirichlet split.
        eval: a held-out JSONL file scored after each merge (aggregator, demo).
        eval_max: at most this many held-out rows are scored each round.
        validation_fraction: share of each device's training rows held out (never
            trained on) as the validation split, for choosing hyper-parameters.
        eval_split: which rows a simulation scores each round: test or validation.
        per_client: after the last round, also score the final global adapter on each
            device's own held-out rows (metrics `per_client`).
        client_rows: each device trains on at most this many of its rows (the first
            ones after the validation hold-out; the pulled splits are shuffled); 0: all.
    """

    path: str | None = None
    partition: str | None = None
    dirichlet_alpha: float = 0.5
    eval: str | None = None
    eval_max: int = 64
    validation_fraction: float = 0.0
    eval_split: EvalSplit = EvalSplit.TEST
    per_client: bool = False
    client_rows: int = 0

    def __post_init__(self) -> None:
        self.eval_split = _enum(EvalSplit, self.eval_split, "data.eval_split")
        if self.client_rows < 0:
            raise ConfigError(f"data.client_rows must be >= 0 (0: all rows), got "
                              f"{self.client_rows}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction must be in [0, 1), got "
                              f"{self.validation_fraction}")
        if self.eval_split is EvalSplit.VALIDATION and self.validation_fraction == 0.0:
            raise ConfigError("data.eval_split = validation needs data.validation_fraction > 0")
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"data.dirichlet_alpha must be positive, got {self.dirichlet_alpha}")
        if self.eval_max <= 0:
            raise ConfigError(f"data.eval_max must be positive, got {self.eval_max}")


@dataclass
class SimConfig:
    """A simulated fleet: its devices, their failures and the simulated clock.

    Attributes:
        clients: number of simulated devices.
        dropout: probability a selected device never reports.
        straggler: probability a selected device computes `straggler_slowdown` x slower.
        device_classes: declared profile names (profiles/*.json); devices cycle through them.
        deadline_s: round deadline in simulated seconds (late updates are not sent);
            None: wait for every device.
        uplink_mbps, downlink_mbps: link rates for the simulated transfer times.
        transport: inproc (this process), mqtt (the same fleet through a real broker) or
            flower (Flower ServerApp/ClientApps in its Ray simulation engine).
        broker: with transport mqtt, a broker URL; None starts one for the run.
        backend: with transport inproc, where devices train: local (this process, one
            after another) or ray (Ray actors, the model loaded once per worker).
        ray_address: with backend ray, an existing Ray cluster's address; None starts a
            local Ray instance.
        sites: with transport mqtt, 0 (flat: one broker, one aggregator) or the number of
            sites: a Mosquitto per site bridged (TLS) to a root Mosquitto, a site aggregator
            per site folding its devices' updates into partial sums, the root merging them
            (docs/SCALING.md); devices are dealt to sites in turn.
        ray_workers: with backend ray, the number of actors (each trains one device at a
            time).
    """

    clients: int = 8
    dropout: float = 0.0
    straggler: float = 0.0
    straggler_slowdown: float = 4.0
    device_classes: tuple[str, ...] = ("rpi4-2gb", "rpi5-4gb", "android-mid-6gb",
                                       "android-flagship-12gb")
    deadline_s: float | None = None
    uplink_mbps: float = 10.0
    downlink_mbps: float = 50.0
    transport: Transport = Transport.INPROC
    broker: str | None = None
    backend: Backend = Backend.LOCAL
    ray_address: str | None = None
    ray_workers: int = 2
    sites: int = 0

    def __post_init__(self) -> None:
        self.transport = _enum(Transport, self.transport, "sim.transport")
        if self.sites < 0 or (self.sites and (self.transport is not Transport.MQTT
                                              or self.broker is not None)):
            raise ConfigError(f"sim.sites = {self.sites}: hierarchical aggregation runs over "
                              "Mosquitto brokers the run starts (a root and one per site); use "
                              "it with sim.transport = mqtt and no sim.broker")
        self.backend = _enum(Backend, self.backend, "sim.backend")
        if self.backend is Backend.RAY and self.transport is not Transport.INPROC:
            raise ConfigError(f"sim.backend = ray runs the in-process transport's devices; "
                              f"it does not combine with sim.transport = {self.transport.value}")
        if self.ray_workers <= 0:
            raise ConfigError(f"sim.ray_workers must be positive, got {self.ray_workers}")
        if isinstance(self.device_classes, str):
            self.device_classes = tuple(c.strip() for c in self.device_classes.split(",")
                                        if c.strip())
        if self.clients <= 0:
            raise ConfigError(f"sim.clients must be positive, got {self.clients}")
        for key in ("dropout", "straggler"):
            v = getattr(self, key)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"sim.{key} must be in [0, 1), got {v}")
        if self.straggler_slowdown < 1.0:
            raise ConfigError(f"sim.straggler_slowdown must be >= 1, got {self.straggler_slowdown}")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ConfigError(f"sim.deadline_s must be positive, got {self.deadline_s}")
        if self.uplink_mbps <= 0 or self.downlink_mbps <= 0:
            raise ConfigError("sim.uplink_mbps and sim.downlink_mbps must be positive")
        if not self.device_classes:
            raise ConfigError("sim.device_classes is empty; name at least one profiles/*.json")


@dataclass
class RunConfig:
    """Everything one federated run needs; each component gets only its own part.

    Build it with `RunConfig.from_dict` (a run file plus flag overrides): settings a user
    did not give that follow from others are derived there, once (see `_derive`).
    """

    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    data: DataSpec = field(default_factory=DataSpec)
    mqtt: MqttConfig = field(default_factory=MqttConfig)

    def __post_init__(self) -> None:
        self.train.seed = self.seed  # the run has one seed
        check_robust(self.strategy.name, self.fleet.robust)
        if self.fleet.secagg:
            if self.strategy.name not in SECAGG_STRATEGIES:
                raise ConfigError(f"fleet.secagg cannot sum {self.strategy.name.value}: its "
                                  "aggregate stacks each device's factors, which a masked sum "
                                  "hides")
            if self.fleet.robust != "none":
                raise ConfigError("fleet.secagg needs fleet.robust = 'none': a robust "
                                  "statistic needs each update, which SecAgg hides")
            if (self.sim.transport is Transport.FLOWER or self.sim.sites
                    or self.fleet.serve_sites):
                raise ConfigError("fleet.secagg runs in process and over MQTT, not through "
                                  "Flower nor with sites")
        if (self.fleet.serve_sites or self.sim.sites) and self.fleet.robust != "none":
            raise ConfigError(f"fleet.robust = {self.fleet.robust} is not a sum over devices, "
                              "so sites cannot pre-aggregate it; hierarchical aggregation "
                              "needs fleet.robust = 'none'")
        check_dp(self.strategy, self.fleet)
        if self.fleet.dp.clip > 0 and (self.fleet.secagg or self.fleet.serve_sites
                                       or self.sim.sites):
            raise ConfigError("fleet.dp clips each device's update at the aggregator, which "
                              "sees only sums under fleet.secagg or with sites; use DP with "
                              "flat, unmasked aggregation (device-side clipping with "
                              "distributed noise is not built)")

    def to_json(self) -> dict:
        """A run file's content (what `from_dict` reads back): train.seed is the run's seed,
        and the MQTT password is never written out."""
        out = to_jsonable(self)
        out["train"].pop("seed", None)
        out["mqtt"].pop("password", None)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """Validate a nested dict (a parsed run file with overrides applied)."""
        if not isinstance(d, dict):
            raise ConfigError("a run config must be a table of sections")
        sections = {f.name for f in fields(cls)}
        for key in d:
            if key not in sections:
                raise ConfigError(f"unknown key {key!r} in the run config; known: "
                                  f"{', '.join(sorted(sections))}")
        d = _derive(d)
        kw: dict = {"seed": _coerce(d.get("seed", 0), int, "seed")}
        if "train" in d and "seed" in d["train"]:
            raise ConfigError("train.seed is not a setting; set the run's top-level seed")
        parts = {"model": ModelSpec, "adapter": AdapterSpec, "train": TrainConfig,
                 "fleet": FleetConfig, "sim": SimConfig, "data": DataSpec, "mqtt": MqttConfig}
        for name, typ in parts.items():
            if name in d:
                kw[name] = from_dict(typ, d[name], name)
        if "strategy" in d:
            kw["strategy"] = StrategyConfig.from_json(d["strategy"])
        return cls(**kw)


def _derive(d: dict) -> dict:
    """Fill the settings that follow from others when the user did not give them.

    - sa-fedlora: the schedule's `rounds` is the run's fleet.rounds, and its
      init/heat/cool rounds are max(1, rounds // 5) each;
    - hetlora `r_min` and legend `r_min`/`r_max` are the adapter's;
    - with DP on (fleet.dp.clip > 0), fleet.clip_multiple is 0 (DP clips every update
      at its own bound) and hetlora's prune is false and weighting uniform.
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    fleet = out.get("fleet")
    dp = fleet.get("dp") if isinstance(fleet, dict) else None
    dp_on = isinstance(dp, dict) and isinstance(dp.get("clip"), (int, float)) and dp["clip"] > 0
    if dp_on and isinstance(fleet, dict):
        fleet.setdefault("clip_multiple", 0.0)
        out.setdefault("strategy", {})
    st = out.get("strategy")
    if not isinstance(st, dict):
        return out
    adapter = out.get("adapter", {}) if isinstance(out.get("adapter"), dict) else {}
    name = str(st.get("name", StrategyConfig.name.value))
    if name == StrategyName.SA_FEDLORA.value:
        fleet = out.get("fleet", {}) if isinstance(out.get("fleet"), dict) else {}
        rounds = st.setdefault("rounds", fleet.get("rounds", FleetConfig.rounds))
        if isinstance(rounds, int) and not isinstance(rounds, bool):
            for key in ("init_rounds", "heat_rounds", "cool_rounds"):
                st.setdefault(key, max(1, rounds // 5))
    if name == StrategyName.HETLORA.value:
        st.setdefault("r_min", adapter.get("r_min", AdapterSpec.r_min))
        if dp_on:
            st.setdefault("prune", False)
            st.setdefault("weighting", Weighting.UNIFORM.value)
    if name == StrategyName.LEGEND.value:
        st.setdefault("r_min", adapter.get("r_min", AdapterSpec.r_min))
        st.setdefault("r_max", adapter.get("r_max", AdapterSpec.r_max))
    return out


# --- dicts in, JSON out ---------------------------------------------------------------------

def to_jsonable(obj: object) -> Any:
    """Dataclasses, Enums, tuples and paths as plain JSON values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        if isinstance(obj, StrategyConfig):
            return obj.to_json()
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (tuple, list)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) one value against a field's type; ConfigError names `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key} must be a path string, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum(tp, value, key)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, args[0], key)
                     for v in items if not (isinstance(v, str) and not v.strip()))
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key} must be a table, got {value!r}")
    return value


def from_dict(cls: type[T], d: Any, section: str) -> T:
    """Build the dataclass `cls` from a dict: unknown keys and wrong types are refused."""
    if not isinstance(d, dict):
        raise ConfigError(f"{section} must be a table/object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]  # type: ignore[arg-type]
    for key in d:
        if key not in names:
            raise ConfigError(f"unknown key {section}.{key}; known keys of [{section}]: "
                              f"{', '.join(names) or 'none'}")
    kw = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in d.items()}
    try:
        return cls(**kw)
    except ConfigError as e:
        raise ConfigError(f"[{section}] {e}") from None


def load_run_file(path: str | Path) -> dict:
    """A TOML run file as a dict (standard library `tomllib`)."""
    import tomllib

    p = Path(path)
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"run file {p} does not exist; pass --config with an existing "
                          "TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"run file {p} is not valid TOML ({e}); fix that line") from None


def set_key(d: dict, dotted: str, value: Any) -> None:
    """Set `section.key`, `section.table.key` (fleet.dp.clip) or a top-level `key` in a
    nested dict, creating the sections."""
    parts = dotted.split(".")
    if len(parts) > 3 or not all(parts):
        raise ConfigError(f"override key {dotted!r} must be KEY, SECTION.KEY or "
                          "SECTION.TABLE.KEY, e.g. strategy.gamma or fleet.dp.clip")
    sec = d
    for i, part in enumerate(parts[:-1]):
        sec = sec.setdefault(part, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])} is a value, not a section")
    sec[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE read as a TOML value (1, 0.5, true, "x", [..]) or else a string."""
    import tomllib

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r} must look like SECTION.KEY=VALUE, e.g. "
                          "--set strategy.gamma=0.95")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


__all__ += ["lora_module_name", "StrategyName", "FedAvgConfig", "StrategyConfig",
            "STRATEGY_SETTINGS", "Transport", "Backend", "ModelSpec", "AdapterSpec", "DataSpec",
            "SimConfig", "RunConfig", "EvalSplit", "to_jsonable", "from_dict", "load_run_file", "set_key",
            "parse_override"]
