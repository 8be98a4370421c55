"""Run the profile: microbenchmarks -> fitted cost model -> end-to-end check -> plan.

Short and linear on purpose. The grid is small and bounded: every benchmark is a fixed
number of warm-up and timed calls of one block, the head, the optimizer, or (outside
`--quick`) a handful of whole training steps.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from edge_runtime.config import LoRAPlan, ProfileConfig, TrainConfig
from edge_runtime.model import CausalLM
from edge_runtime.profiler.chooser import NoPlanFitsError, search_plan
from edge_runtime.profiler.cost_model import (
    ACTIVATION_GROWTH,
    CostModel,
    ModelShape,
    Workload,
    block_features,
    head_features,
    optimizer_features,
)
from edge_runtime.profiler.fit import LinearFit, fit_linear
from edge_runtime.profiler.measure import (
    device_info,
    gemm_gflops,
    measure_block_forward,
    measure_block_train,
    measure_head,
    measure_optimizer,
    measure_step,
)
from edge_runtime.profiler.profile_io import DeviceProfile, Figure

__all__ = ["run_profile", "default_budget_mb", "PI4_GEMM_GFLOPS"]

log = logging.getLogger(__name__)

# Smallest memory value a fit sees: a few pages (measured deltas can be 0 on tiny models).
_MEM_FLOOR_MB = 0.05
# Raspberry Pi 4 sustained fp32 matmul, the unit of `relative_compute` (profiles/README.md).
PI4_GEMM_GFLOPS = 16.0


def default_budget_mb(cfg: ProfileConfig, available_mb: float) -> tuple[float, str]:
    if cfg.memory_budget_mb is not None:
        return float(cfg.memory_budget_mb), "--memory-budget-mb"
    return (round(available_mb * cfg.budget_fraction),
            f"{cfg.budget_fraction:g} x available RAM ({available_mb:.0f} MB) at profile time")


def _shapes(b: int, t: int) -> list[tuple[int, int]]:
    """Four (batch, seq_len) points around the target that separate tokens from B*T^2."""
    half, quarter = max(8, t // 2), max(8, t // 4)
    out: list[tuple[int, int]] = []
    for s in [(b, t), (b, half), (2 * b, half), (b, quarter)]:
        if s not in out:
            out.append(s)
    return out


def _fit(features: tuple[str, ...], points: list[dict[str, float]], ys: list[float], unit: str,
         floor: float = 0.0) -> LinearFit:
    return fit_linear(features, points, [max(y, floor) for y in ys], unit)


def _lora_shapes(shape: ModelShape, targets: tuple[str, ...], depth: int, rank: int
                 ) -> list[tuple[int, int]]:
    out = []
    for _ in range(depth):
        for tg in targets:
            d_in, d_out = shape.target_dims(tg)
            out += [(rank, d_in), (d_out, rank)]
    return out


def run_profile(model: CausalLM, cfg: ProfileConfig, *, base_rss_mb: float,
                load_peak_rss_mb: float, model_info: dict[str, Any],
                progress: Callable[[str], None] = lambda s: None) -> DeviceProfile:
    """Measure this device for `model` and choose a plan; returns the profile.

    Raises NoPlanFitsError after the measurements if nothing fits; the profile with its
    measurements (and no plan) is attached to the exception as `.profile`.
    """
    t_start = time.perf_counter()
    warmup, repeats = (1, 2) if cfg.quick else (1, 4)
    tk = "cpu_s" if cfg.time_basis == "cpu" else "time_s"
    shape = ModelShape.from_config(model.config)
    # Plans are chosen for the trainer as it runs, frozen-prefix cache included.
    wl = Workload(cfg.batch_size, cfg.seq_len, cfg.label_fraction,
                  prefix_cache_mb=TrainConfig().prefix_cache_mb)
    info = device_info()
    progress(f"device: {info['cpu_model']}, {info['cores_logical']} cores, "
             f"{info['available_ram_mb']} of {info['total_ram_mb']} MB available")
    g_wall, g_cpu = gemm_gflops(min_time_s=0.2 if cfg.quick else 0.5)
    gflops = g_cpu if cfg.time_basis == "cpu" else g_wall
    progress(f"fp32 matmul: {g_wall:.1f} GFLOP per wall second, {g_cpu:.1f} per CPU second")
    r_lo, r_hi = cfg.rank_choices[0], cfg.rank_choices[-1]
    shapes = _shapes(wl.batch_size, wl.seq_len)

    fwd = []
    for b, t in shapes:
        fwd.append(measure_block_forward(model, b, t, warmup, repeats))
        progress(f"block forward   B={b:<3} T={t:<5} {fwd[-1][tk] * 1e3:9.2f} ms")
    train = []
    train_grid = [(b, t, r_lo) for b, t in shapes] + [(shapes[0][0], shapes[0][1], r_hi)]
    if len(shapes) > 1:
        train_grid.append((shapes[1][0], shapes[1][1], r_hi))
    for b, t, r in train_grid:
        train.append(measure_block_train(model, cfg.targets, r, b, t, warmup, repeats))
        progress(f"block fwd+bwd   B={b:<3} T={t:<5} r={r:<3} {train[-1][tk] * 1e3:9.2f} ms"
                 f"  kept {train[-1]['retained_mb']:.2f} MB/block "
                 f"(exact saved tensors {train[-1]['saved_mb']:.2f} MB)")
    head = []
    # The head is linear in labelled tokens (fits to ~1%); quick mode measures smaller sizes.
    for frac in ((0.5, 0.25, 0.125) if cfg.quick else (1.0, 0.5, 0.25)):
        n_lab = max(1, int(wl.label_tokens * frac))
        head.append(measure_head(model, n_lab, warmup, repeats))
        progress(f"head fwd+bwd    labels={n_lab:<6} {head[-1][tk] * 1e3:9.2f} ms")
    opt = []
    n = shape.n_layers
    for depth, r in ((1, r_lo), (max(1, n // 2), r_hi), (n, r_hi)):
        opt.append(measure_optimizer(_lora_shapes(shape, cfg.targets, depth, r), warmup, repeats))
        progress(f"AdamW step      params={opt[-1]['params']:<8} "
                 f"{opt[-1][tk] * 1e3:9.2f} ms")

    bf = ("1", "tokens", "attn")
    fits = {
        "block_forward_s": _fit(bf, [block_features(m["batch"], m["seq_len"]) for m in fwd],
                                [m[tk] for m in fwd], "s"),
        "block_train_s": _fit(bf + ("rank_tokens",),
                              [block_features(m["batch"], m["seq_len"], m["rank_width"])
                               for m in train], [m[tk] for m in train], "s"),
        "head_s": _fit(("1", "label_tokens"), [head_features(m["label_tokens"]) for m in head],
                       [m[tk] for m in head], "s"),
        "optimizer_s": _fit(("1", "params"), [optimizer_features(m["params"]) for m in opt],
                            [m[tk] for m in opt], "s"),
        "block_act_mb": _fit(bf + ("rank_tokens",),
                             [block_features(m["batch"], m["seq_len"], m["rank_width"])
                              for m in train],
                             [m["retained_mb"] * ACTIVATION_GROWTH for m in train], "MB",
                             _MEM_FLOOR_MB),
        "block_transient_mb": _fit(bf, [block_features(m["batch"], m["seq_len"]) for m in fwd],
                                   [m["transient_mb"] for m in fwd], "MB", _MEM_FLOOR_MB),
        "head_mb": _fit(("1", "label_tokens"), [head_features(m["label_tokens"]) for m in head],
                        [m["peak_delta_mb"] for m in head], "MB", _MEM_FLOOR_MB),
    }
    fits["block_act_mb"].notes.append(
        f"resident memory kept per trained block on a stack of trained blocks x growth "
        f"{ACTIVATION_GROWTH}; exact saved-tensor bytes are in measurements.block_train")
    cost = CostModel(shape, cfg.quant.value, fits, base_rss_mb, load_peak_rss_mb,
                     gemm_gflops=gflops, time_basis=cfg.time_basis)

    # Whole training steps: how far the composition is from the real thing, and calibration.
    # Full mode: three plans at the target shape calibrate time and memory. Quick mode: one
    # cheap step (depth 2, batch 1, a quarter of the sequence) measures only the memory the
    # parts miss (optimizer, autograd engine, allocator), which hardly depends on shape.
    end_to_end: list[dict[str, Any]] = []
    mid = cfg.rank_choices[len(cfg.rank_choices) // 2]
    if cfg.quick:
        runs = [(min(2, n), r_lo, Workload(1, max(8, wl.seq_len // 4), wl.label_fraction), 1)]
    else:
        runs = [(min(2, n), r_lo, wl, 2), (max(1, n // 2), mid, wl, 2), (n, r_hi, wl, 2)]
    for depth, r, w, reps in runs:
        plan = LoRAPlan(rank=r, depth=depth, targets=cfg.targets, alpha=cfg.alpha)
        m = measure_step(model, plan, w.batch_size, w.seq_len, w.label_fraction, 1, reps)
        pred = cost.predict(plan, w)
        m["composed_time_s"] = pred.step_time_s
        m["composed_peak_rss_mb"] = pred.peak_rss_mb
        end_to_end.append(m)
        progress(f"whole step      depth={depth:<3} r={r:<3} B={w.batch_size} T={w.seq_len} "
                 f"{m[tk]:8.3f} s (composed {pred.step_time_s:.3f} s)  peak "
                 f"{m['peak_rss_mb']:.0f} MB (composed {pred.peak_rss_mb:.0f} MB)")
    cost.mem_slack_mb = max(0.0, max(m["peak_rss_mb"] - m["composed_peak_rss_mb"]
                                     for m in end_to_end))
    if not cfg.quick:
        cost.time_scale = statistics.median(m[tk] / m["composed_time_s"] for m in end_to_end)
    for m in end_to_end:
        plan = LoRAPlan.from_json(m["plan"])
        pred = cost.predict(plan, Workload(m["batch"], m["seq_len"], m["label_fraction"]))
        m["calibrated_time_s"] = pred.step_time_s
        m["calibrated_peak_rss_mb"] = pred.peak_rss_mb
        m["time_rel_error"] = pred.step_time_s / m[tk] - 1.0
        m["uncalibrated_time_rel_error"] = m["composed_time_s"] / m[tk] - 1.0

    budget_mb, budget_src = default_budget_mb(cfg, float(info["available_ram_mb"]))
    figures = {
        "ram_budget_mb": Figure(budget_mb, "MB", budget_src),
        "fp32_gflops": Figure(round(gflops, 2), "GFLOP/s",
                              f"measured: torch.mm 256x576 @ 576x1536, all threads, per "
                              f"{cfg.time_basis} second ({g_wall:.1f} wall, {g_cpu:.1f} CPU)"),
        "relative_compute": Figure(round(gflops / PI4_GEMM_GFLOPS, 3), "x Raspberry Pi 4",
                                   f"measured fp32_gflops / {PI4_GEMM_GFLOPS} (Pi 4, "
                                   "profiles/README.md)"),
    }
    profile = DeviceProfile(
        name=f"{info['cpu_model']} / {model_info.get('name', 'model')} / {cfg.quant.value}",
        kind="measured", device=info, figures=figures, model=model_info, workload=wl,
        budget={"memory_budget_mb": budget_mb, "round_deadline_s": cfg.round_deadline_s,
                "steps_per_round": cfg.steps_per_round, "source": budget_src,
                "targets": list(cfg.targets), "rank_choices": list(cfg.rank_choices)},
        measurements={"rss_method": _rss_method(), "time_basis": cfg.time_basis, "warmup": warmup, "repeats": repeats,
                      "quick": cfg.quick, "block_forward": fwd, "block_train": train,
                      "head": head, "optimizer": opt, "end_to_end": end_to_end},
        cost_model=cost,
        legend_cost=cost.legend_cost(wl, cfg.targets, budget_mb),
    )
    profile.extra["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        choice = search_plan(cost.bind(wl), budget_mb, cfg.round_deadline_s, cfg.steps_per_round,
                             n, cfg.targets, cfg.rank_choices, alpha=cfg.alpha)
    except NoPlanFitsError as e:
        profile.extra["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        e.profile = profile  # type: ignore[attr-defined]
        raise
    pred = cost.predict(choice.plan, wl)
    profile.plan = choice.plan
    profile.prediction = {**pred.to_json(),
                          "round_time_s": round(pred.step_time_s * cfg.steps_per_round, 3),
                          "candidates_considered": choice.candidates}
    profile.extra["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    return profile


def _rss_method() -> str:
    from edge_runtime.profiler.measure import PeakRSS

    with PeakRSS(release=False) as m:
        pass
    return m.method


def fit_summary(cost: CostModel) -> list[tuple[str, str, int, float, float | None]]:
    """(fit name, unit, points, relative RMS error, leave-one-out max error) per fit."""
    return [(k, f.unit, f.n_points, f.rel_rms, f.loo_rel_max)
            for k, f in sorted(cost.fits.items())]
