"""Step time and peak memory of a LoRA plan, composed from fitted per-block costs.

A training step of a plan of depth d on an n-block model is, in time,

    t_step = (n - d) * t_fwd(B, T)                      frozen prefix: forward only, no graph
           + sum_{l in top d} t_train(B, T, r_l)         forward + backward with LoRA
           + t_head(N_lab)                               final norm, LM head, cross-entropy
           + t_opt(P)                                    AdamW over P LoRA parameters

and, in peak resident memory,

    m_peak = m_base + 16 B/param * P                      weights of the frozen base + runtime;
                                                          LoRA param, grad, 2 Adam moments
           + sum_{l in top d} m_act(B, T, r_l)           activations kept for the backward
           + max(m_head(N_lab), m_block(B, T))           the largest transient
           + m_slack                                     allocator slack seen end to end

with N = B*T tokens, N_lab the labelled tokens, m_act the resident memory a trained
block keeps for its backward (see below), P = sum r * (d_in + d_out). Each t_* and
m_* is a `LinearFit` over the features below, fitted on microbenchmarks of the real
block, head and optimizer (`measure.py`); `time_scale` and `m_slack` come from whole
training steps measured end to end. Blocks below the lowest LoRA block build no autograd
graph (`CausalLM.frozen_prefix`), which is where depth saves time and memory.

m_act is fitted on the resident memory a forward through a stack of trained blocks keeps
until the backward, per block (with a fixed per-block part: quantized blocks leave their
dequantization temporaries in the heap), times ACTIVATION_GROWTH. The exact bytes
autograd saves (saved-tensor hooks) are recorded too: resident is 1.6x them for fp32
blocks and about 2x for int8/int4 blocks at batch 4 x 128 here. The growth factor is
empirical: with glibc's default (dynamic) mmap threshold a training process's peak keeps
rising over its first steps as freed activation memory stays in the heap (measured here
with the real trainer on SmolLM2-135M, int4, depth 19: the step's peak above the base
went 860 -> 1049 MB over four steps). With MALLOC_MMAP_THRESHOLD_=65536 that growth
disappears and the step memory drops by about 40%, at about 60% more CPU time per step
(page faults on fresh mappings), so the predictions are conservative there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.config import LoRAPlan, lora_module_name
from edge_runtime.model import ModelConfig
from edge_runtime.profiler.fit import LinearFit

__all__ = [
    "ModelShape",
    "Workload",
    "Prediction",
    "CostModel",
    "block_features",
    "head_features",
    "optimizer_features",
    "lora_params",
    "BYTES_PER_LORA_PARAM",
    "MB",
    "BoundCost",
    "ACTIVATION_GROWTH",
]

MB = float(1 << 20)
# Growth of resident activation memory over a run's first steps (see module docstring).
ACTIVATION_GROWTH = 1.1
# fp32 parameter + gradient + AdamW exp_avg + exp_avg_sq
BYTES_PER_LORA_PARAM = 16



@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of the architecture."""

    n_layers: int
    dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ModelShape:
        return cls(cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hd,
                   cfg.vocab_size)

    def target_dims(self, target: str) -> tuple[int, int]:
        """(d_in, d_out) of a block's linear layer."""
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        dims = {
            "q_proj": (self.dim, q_out), "k_proj": (self.dim, kv_out),
            "v_proj": (self.dim, kv_out), "o_proj": (q_out, self.dim),
            "gate_proj": (self.dim, self.hidden_dim), "up_proj": (self.dim, self.hidden_dim),
            "down_proj": (self.hidden_dim, self.dim),
        }
        return dims[target]

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelShape:
        return cls(**{k: int(d[k]) for k in (
            "n_layers", "dim", "hidden_dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size")})


@dataclass(frozen=True)
class Workload:
    """The shape of a training step: batch, sequence length, share of positions with a label."""

    batch_size: int
    seq_len: int
    label_fraction: float = 1.0
    # The trainer's frozen-prefix cache budget (`TrainConfig.prefix_cache_mb`): memory a
    # plan with a frozen prefix holds once its epochs revisit data.
    prefix_cache_mb: float = 0.0

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def label_tokens(self) -> int:
        return max(1, math.ceil(self.batch_size * (self.seq_len - 1) * self.label_fraction))

    def to_json(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len,
                "label_fraction": self.label_fraction, "prefix_cache_mb": self.prefix_cache_mb}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Workload:
        return cls(int(d["batch_size"]), int(d["seq_len"]), float(d.get("label_fraction", 1.0)),
                   float(d.get("prefix_cache_mb", 0.0)))


def block_features(batch: int, seq_len: int, rank_width: int = 0) -> dict[str, float]:
    """Features of one block at (B, T): rank_width = sum over its LoRA targets of r*(d_in+d_out)."""
    tokens = batch * seq_len
    return {"1": 1.0, "tokens": float(tokens), "attn": float(batch * seq_len * seq_len),
            "rank_tokens": float(tokens * rank_width)}


def head_features(label_tokens: int) -> dict[str, float]:
    return {"1": 1.0, "label_tokens": float(label_tokens)}


def optimizer_features(params: int) -> dict[str, float]:
    return {"1": 1.0, "params": float(params)}


def _layer_rank_widths(shape: ModelShape, plan: LoRAPlan) -> dict[int, int]:
    """{layer: sum over targets of rank * (d_in + d_out)} for the plan's LoRA layers."""
    out: dict[int, int] = {}
    for i in plan.layers(shape.n_layers):
        width = 0
        for t in plan.targets:
            d_in, d_out = shape.target_dims(t)
            width += plan.rank_for(i, lora_module_name(i, t)) * (d_in + d_out)
        out[i] = width
    return out


def lora_params(shape: ModelShape, plan: LoRAPlan) -> int:
    """Trainable LoRA parameters of a plan (its "capacity")."""
    return sum(_layer_rank_widths(shape, plan).values())


@dataclass
class Prediction:
    """Predicted cost of one training step of a plan.

    `peak_rss_mb` is the process's peak while training; loading the model can peak
    higher (`parts["load_peak_mb"]`, measured), which no plan changes.
    """

    step_time_s: float
    peak_rss_mb: float
    trainable_params: int
    parts: dict[str, float] = field(default_factory=dict)

    def round_time_s(self, steps: int) -> float:
        return self.step_time_s * steps

    def to_json(self) -> dict[str, Any]:
        # Six decimals: a tiny model's step is a few ms, where 4 decimals cost 1% precision.
        return {"step_time_s": round(self.step_time_s, 6),
                "peak_rss_mb": round(self.peak_rss_mb, 1),
                "trainable_params": self.trainable_params,
                "parts": {k: round(v, 6) for k, v in self.parts.items()}}


TIME_FITS = ("block_forward_s", "block_train_s", "head_s", "optimizer_s")
MEM_FITS = ("block_act_mb", "block_transient_mb", "head_mb")


@dataclass
class CostModel:
    """Fitted per-block costs of one model, at one quantization, on one device.

    Attributes:
        shape: the model's architecture numbers.
        quant: `none`, `int8` or `int4` (the frozen base's storage).
        fits: the eight `LinearFit`s named in TIME_FITS and MEM_FITS.
        base_rss_mb: resident memory with the model loaded, before any training step.
        load_peak_rss_mb: peak resident memory while loading (and quantizing) the model.
        time_basis: `wall` or `cpu` seconds (see ProfileConfig).
        time_scale: end-to-end calibration of the composed time (measured / composed).
        mem_slack_mb: end-to-end calibration of memory (largest measured - composed, >= 0).
        gemm_gflops: fp32 matrix-multiply speed measured on the device (for scaling to a
            declared device class).
    """

    shape: ModelShape
    quant: str
    fits: dict[str, LinearFit]
    base_rss_mb: float
    load_peak_rss_mb: float = 0.0
    time_scale: float = 1.0
    mem_slack_mb: float = 0.0
    gemm_gflops: float | None = None
    time_basis: str = "wall"

    def __post_init__(self) -> None:
        missing = set(TIME_FITS + MEM_FITS) - set(self.fits)
        if missing:
            raise ValueError(f"cost model lacks fits {sorted(missing)}")

    # --- prediction ----------------------------------------------------------
    def predict(self, plan: LoRAPlan, workload: Workload, *, speed: float = 1.0) -> Prediction:
        """Step time and peak RSS of `plan` at `workload`; `speed` divides every time."""
        n = self.shape.n_layers
        widths = _layer_rank_widths(self.shape, plan)
        depth = len(widths)
        b, t = workload.batch_size, workload.seq_len
        f = self.fits
        t_fwd = f["block_forward_s"].predict(block_features(b, t))
        t_train = sum(f["block_train_s"].predict(block_features(b, t, w)) for w in widths.values())
        params = sum(widths.values())
        t_head = f["head_s"].predict(head_features(workload.label_tokens))
        t_opt = f["optimizer_s"].predict(optimizer_features(params))
        composed = (n - depth) * t_fwd + t_train + t_head + t_opt
        step = composed * self.time_scale / speed
        m_act = sum(f["block_act_mb"].predict(block_features(b, t, w)) for w in widths.values())
        m_states = params * BYTES_PER_LORA_PARAM / MB
        m_transient = max(f["head_mb"].predict(head_features(workload.label_tokens)),
                          f["block_transient_mb"].predict(block_features(b, t)))
        m_cache = workload.prefix_cache_mb if depth < n else 0.0
        peak = self.base_rss_mb + m_states + m_act + m_transient + self.mem_slack_mb + m_cache
        parts = {"frozen_forward_s": (n - depth) * t_fwd / speed, "trained_blocks_s": t_train / speed,
                 "head_s": t_head / speed, "optimizer_s": t_opt / speed,
                 "base_mb": self.base_rss_mb, "lora_states_mb": m_states,
                 "activations_mb": m_act, "transient_mb": m_transient,
                 "slack_mb": self.mem_slack_mb, "prefix_cache_mb": m_cache,
                 "load_peak_mb": self.load_peak_rss_mb}
        return Prediction(step, peak, params, parts)

    def bind(self, workload: Workload, *, speed: float = 1.0) -> BoundCost:
        """A `PlanCost` for the chooser: this model at one workload and device speed."""
        return BoundCost(self, workload, speed)

    def composed_time(self, plan: LoRAPlan, workload: Workload) -> float:
        """Sum of the fitted parts, before the end-to-end `time_scale`."""
        return self.predict(plan, workload).step_time_s / self.time_scale

    def per_block(self, workload: Workload, rank_width: int = 0, *, speed: float = 1.0
                  ) -> dict[str, float]:
        """Per-block costs at a workload (what LEGEND and the simulator consume).

        Returns seconds per step for a frozen block's forward and a trained block's
        forward+backward (at `rank_width` = sum of r*(d_in+d_out) over its targets), the
        fixed head/optimizer time, and MB of activations kept per trained block.
        """
        b, t = workload.batch_size, workload.seq_len
        f = self.fits
        k = self.time_scale / speed
        return {
            "frozen_forward_s": f["block_forward_s"].predict(block_features(b, t)) * k,
            "trained_block_s": f["block_train_s"].predict(block_features(b, t, rank_width)) * k,
            "head_s": f["head_s"].predict(head_features(workload.label_tokens)) * k,
            "activations_mb": f["block_act_mb"].predict(block_features(b, t, rank_width)),
        }

    def legend_cost(self, workload: Workload, targets: tuple[str, ...], budget_mb: float,
                    *, speed: float = 1.0) -> dict[str, float]:
        """The cost numbers `edge_runtime.fl.legend.DeviceCost` takes, for one step.

        LEGEND's linear form is time = n*fwd_s + L*bwd_s + sum_j r_j*rank_s and
        memory = base_mb + L*act_mb + sum_j r_j*rank_mb (r_j the rank of block j, every
        target at that rank). The head and the optimizer's fixed cost are spread over the
        n forward blocks; the largest transient goes into base_mb.
        """
        b, t = workload.batch_size, workload.seq_len
        n = self.shape.n_layers
        f = self.fits
        k = self.time_scale / speed
        width1 = sum(sum(self.shape.target_dims(tg)) for tg in targets)  # rank-1 width
        t_fwd = f["block_forward_s"].predict(block_features(b, t))
        t_tr0 = f["block_train_s"].predict(block_features(b, t, 0))
        t_tr1 = f["block_train_s"].predict(block_features(b, t, width1))
        t_fixed = (f["head_s"].predict(head_features(workload.label_tokens))
                   + f["optimizer_s"].predict(optimizer_features(0)))
        opt_per = f["optimizer_s"].predict(optimizer_features(width1)) - \
            f["optimizer_s"].predict(optimizer_features(0))
        act0 = f["block_act_mb"].predict(block_features(b, t, 0))
        act1 = f["block_act_mb"].predict(block_features(b, t, width1))
        transient = max(f["head_mb"].predict(head_features(workload.label_tokens)),
                        f["block_transient_mb"].predict(block_features(b, t)))
        return {
            "fwd_s": (t_fwd + t_fixed / n) * k,
            "bwd_s": max(t_tr0 - t_fwd, 0.0) * k,
            "rank_s": (t_tr1 - t_tr0 + opt_per) * k,
            "base_mb": self.base_rss_mb + transient + self.mem_slack_mb,
            "act_mb": act0,
            "rank_mb": (act1 - act0) + width1 * BYTES_PER_LORA_PARAM / MB,
            "mem_budget_mb": float(budget_mb),
        }

    # --- serialisation ---------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "form": "composed-per-block-v1",
            "shape": self.shape.to_json(),
            "quant": self.quant,
            "fits": {k: v.to_json() for k, v in sorted(self.fits.items())},
            "base_rss_mb": round(self.base_rss_mb, 1),
            "load_peak_rss_mb": round(self.load_peak_rss_mb, 1),
            "time_scale": round(self.time_scale, 5),
            "mem_slack_mb": round(self.mem_slack_mb, 1),
            "gemm_gflops": None if self.gemm_gflops is None else round(self.gemm_gflops, 2),
            "time_basis": self.time_basis,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CostModel:
        g = d.get("gemm_gflops")
        return cls(
            shape=ModelShape.from_json(d["shape"]),
            quant=str(d.get("quant", "none")),
            fits={str(k): LinearFit.from_json(v) for k, v in d["fits"].items()},
            base_rss_mb=float(d["base_rss_mb"]),
            load_peak_rss_mb=float(d.get("load_peak_rss_mb", 0.0)),
            time_scale=float(d.get("time_scale", 1.0)),
            mem_slack_mb=float(d.get("mem_slack_mb", 0.0)),
            gemm_gflops=None if g is None else float(g),
            time_basis=str(d.get("time_basis", "wall")),
        )


@dataclass(frozen=True)
class BoundCost:
    """A cost model fixed to one workload and speed: `predict(plan) -> Prediction`."""

    model: CostModel
    workload: Workload
    speed: float = 1.0

    def predict(self, plan: LoRAPlan) -> Prediction:
        return self.model.predict(plan, self.workload, speed=self.speed)
