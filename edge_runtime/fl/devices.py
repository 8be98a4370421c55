"""Device classes for the simulator: declared profiles -> per-step costs of one model.

Figures (RAM budget, fp32 GFLOP/s, memory bandwidth) come from the declared profiles in
`profiles/*.json`, read through `edge_runtime.profiler.declared`. When no measured
reference profile is at hand, per-block costs are derived analytically from the model
shape (a FLOP count, the usual 2 FLOPs per multiply-add):
- forward of one block: 2 * P_block * T + 4 * T * t * d_attn (QK^T and AV), T = b * t
  tokens a step; the LM head's 2 * d * V * T is spread over the blocks;
- backward of a trained block with a frozen base: gradients for the activations only,
  about one more forward (no weight gradients);
- one rank unit over a block's targets: forward + both gradients of r (d_in + d_out)
  parameters, 6 T (d_in + d_out) FLOPs, and 4 fp32 copies (weight, grad, 2 Adam moments);
- memory: fp32 base weights + 300 MB runtime, activations kept per trained block.
Time = FLOPs / (fp32_gflops * 1e9). This is compute-only and optimistic for
bandwidth-bound devices; pass a measured reference to the profiler's
`legend_cost_for_device` for figures fitted on real hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.fl.legend import DeviceCost
from edge_runtime.model import ModelConfig

__all__ = ["DeviceClass", "load_device_classes", "analytic_cost"]

RUNTIME_MB = 300.0
MB = float(1 << 20)


@dataclass(frozen=True)
class DeviceClass:
    name: str
    ram_budget_mb: float
    fp32_gflops: float
    memory_bandwidth_gbs: float


def load_device_classes(names: tuple[str, ...]) -> list[DeviceClass]:
    """Declared profiles by name, in the given order (raises ProfileError naming the fix)."""
    from edge_runtime.profiler.declared import declared_profiles
    from edge_runtime.profiler.profile_io import ProfileError

    profs = declared_profiles()
    out = []
    for n in names:
        if n not in profs:
            raise ProfileError(f"no declared device profile {n!r}; known: {', '.join(profs)}")
        p = profs[n]
        out.append(DeviceClass(n, p.ram_budget_mb, p.fp32_gflops, p.figure("memory_bandwidth_gbs")))
    return out


def _target_dims(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(d_in, d_out) of one target linear."""
    q_out = cfg.n_heads * cfg.hd
    kv_out = cfg.n_kv_heads * cfg.hd
    return {
        "q_proj": (cfg.dim, q_out), "k_proj": (cfg.dim, kv_out), "v_proj": (cfg.dim, kv_out),
        "o_proj": (q_out, cfg.dim), "gate_proj": (cfg.dim, cfg.hidden_dim),
        "up_proj": (cfg.dim, cfg.hidden_dim), "down_proj": (cfg.hidden_dim, cfg.dim),
    }[target]


def analytic_cost(cfg: ModelConfig, dev: DeviceClass, *, batch: int, seq_len: int,
                  targets: tuple[str, ...]) -> DeviceCost:
    """Per-step DeviceCost of `cfg` on `dev` from FLOP and byte counts (module docstring)."""
    tokens = batch * seq_len
    all_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    p_block = sum(a * b for a, b in (_target_dims(cfg, t) for t in all_targets))
    attn = 4.0 * tokens * seq_len * cfg.n_heads * cfg.hd
    head = 2.0 * cfg.dim * cfg.vocab_size * tokens
    flops_fwd = 2.0 * p_block * tokens + attn + head / cfg.n_layers
    rate = dev.fp32_gflops * 1e9
    width1 = sum(sum(_target_dims(cfg, t)) for t in targets)  # params of one rank unit
    n_params = cfg.n_layers * p_block + cfg.vocab_size * cfg.dim
    # kept activations of a trained block: ~ 16 d + 3 hidden floats per token + attention probs
    act_bytes = 4.0 * tokens * (16 * cfg.dim + 3 * cfg.hidden_dim) \
        + 4.0 * batch * cfg.n_heads * seq_len * seq_len
    return DeviceCost(
        fwd_s=flops_fwd / rate,
        bwd_s=(2.0 * p_block * tokens + attn) / rate,
        rank_s=6.0 * tokens * width1 / rate,
        base_mb=4.0 * n_params / MB + RUNTIME_MB,
        act_mb=act_bytes / MB,
        rank_mb=(16.0 * width1 + 4.0 * tokens * len(targets)) / MB,
        mem_budget_mb=dev.ram_budget_mb,
    )
