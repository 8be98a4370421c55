"""`edge-rt profile`: measure this device, fit a cost model, choose a LoRA plan, write JSON."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from edge_runtime.cli.common import add_model_args, positive_float, positive_int

__all__ = ["register", "run", "format_table"]


def _ranks(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ranks like 4,8,16,32, got {text!r}") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"ranks must be positive integers, got {text!r}")
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure this device and choose a LoRA plan that fits")
    add_model_args(p)
    p.add_argument("--seq-len", type=positive_int, default=128, help="training sequence length")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--label-fraction", type=positive_float, default=1.0,
                   help="share of positions with a loss (1.0 = every token, the worst case)")
    p.add_argument("--memory-budget-mb", type=positive_float,
                   help="peak RSS allowed for training (default: 0.6 x available RAM)")
    p.add_argument("--round-deadline-s", type=positive_float,
                   help="wall-clock limit for one round's steps (default: none)")
    p.add_argument("--steps-per-round", type=positive_int, default=20)
    p.add_argument("--targets", default="q,v", help="LoRA targets among q,k,v,o,gate,up,down")
    p.add_argument("--ranks", type=_ranks, default=(4, 8, 16, 32), metavar="R1,R2,...",
                   help="ranks a block may get (default 4,8,16,32)")
    p.add_argument("--alpha", type=positive_float, default=16.0)
    p.add_argument("--threads", type=positive_int,
                   help="torch threads for measuring (train with the same number)")
    p.add_argument("--time-basis", choices=("wall", "cpu"), default="wall",
                   help="fit wall-clock seconds (default) or process CPU seconds (steadier "
                        "on a machine shared with other jobs)")
    p.add_argument("--quick", action="store_true",
                   help="fewer shapes and repeats, no whole-step calibration")
    p.add_argument("--out", metavar="FILE", default="profile.json", help="profile JSON to write")
    p.set_defaults(func=run)


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def format_table(d: dict[str, Any]) -> str:
    """A readable summary of a profile's JSON."""
    lines: list[str] = []
    dev, wl, cm = d["device"], d["workload"], d["cost_model"]
    lines.append(f"device     {dev.get('cpu_model')}  {dev.get('cores_logical')} cores  "
                 f"{dev.get('torch_threads')} torch threads  "
                 f"RAM {dev.get('available_ram_mb')}/{dev.get('total_ram_mb')} MB available  "
                 f"fp32 matmul {d['figures']['fp32_gflops']['value']} GFLOP/s "
                 f"({d['figures']['relative_compute']['value']}x Pi 4)")
    model = d.get("model") or {}
    lines.append(f"model      {model.get('name')}  quant {cm['quant']}  "
                 f"{cm['shape']['n_layers']} blocks  batch {wl['batch_size']} x seq "
                 f"{wl['seq_len']}  label fraction {wl['label_fraction']}")
    lines.append(f"time basis {cm.get('time_basis', 'wall')} seconds")
    lines.append(f"memory     base RSS {cm['base_rss_mb']} MB  load peak "
                 f"{cm['load_peak_rss_mb']} MB  (method: {d['measurements']['rss_method']})")
    lines.append("")
    lines.append(f"{'fit':<20} {'unit':<4} {'points':>6} {'rel RMS':>8} {'LOO max':>8}")
    for name, f in sorted(cm["fits"].items()):
        loo = "-" if f["loo_rel_max"] is None else f"{f['loo_rel_max']:.1%}"
        lines.append(f"{name:<20} {f['unit']:<4} {f['n_points']:>6} {f['rel_rms']:>8.1%} "
                     f"{loo:>8}")
    e2e = d["measurements"].get("end_to_end") or []
    if e2e:
        tk = "cpu_s" if cm.get("time_basis") == "cpu" else "time_s"
        lines.append("")
        lines.append(f"{'whole step':<30} {'measured':>10} {'composed':>10} {'calibrated':>10} "
                     f"{'err':>7} {'peak MB':>8} {'pred MB':>8}")
        for m in e2e:
            p = m["plan"]
            lines.append(f"depth {p['depth']:<3} rank {p['rank']:<3} B{m['batch']:<2} "
                         f"T{m['seq_len']:<4} {_fmt_s(m[tk]):>10} "
                         f"{_fmt_s(m['composed_time_s']):>10} "
                         f"{_fmt_s(m['calibrated_time_s']):>10} {m['time_rel_error']:>7.1%} "
                         f"{m['peak_rss_mb']:>8.0f} {m['calibrated_peak_rss_mb']:>8.0f}")
        quick = d["measurements"].get("quick")
        lines.append(f"calibration: time x {cm['time_scale']:.3f}"
                     + (" (not calibrated in --quick)" if quick else "")
                     + f", memory slack {cm['mem_slack_mb']} MB")
    b = d["budget"]
    lines.append("")
    lines.append(f"budget     {b['memory_budget_mb']:.0f} MB ({b['source']}); deadline "
                 f"{str(b['round_deadline_s']) + ' s' if b['round_deadline_s'] else 'none'} "
                 f"for {b['steps_per_round']} steps")
    plan, pred = d.get("plan"), d.get("prediction")
    if plan and pred:
        ranks = plan["layer_ranks"] or {"all": plan["rank"]}
        lines.append(f"plan       depth {plan['depth']} of {cm['shape']['n_layers']}  targets "
                     f"{','.join(plan['targets'])}  ranks {ranks}  "
                     f"{pred['trainable_params']:,} LoRA parameters")
        parts = pred["parts"]
        lines.append(f"predicted  {_fmt_s(pred['step_time_s'])}/step, "
                     f"{pred['round_time_s']:.1f} s/round, peak RSS {pred['peak_rss_mb']:.0f} MB "
                     f"(base {parts['base_mb']:.0f} + activations {parts['activations_mb']:.0f} + "
                     f"transient {parts['transient_mb']:.0f} + LoRA states "
                     f"{parts['lora_states_mb']:.1f} + slack {parts['slack_mb']:.0f})")
        if cm["load_peak_rss_mb"] > b["memory_budget_mb"]:
            lines.append(f"WARNING    loading the model peaked at {cm['load_peak_rss_mb']:.0f} MB, "
                         "above the budget: the device may run out of memory while loading")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from edge_runtime.checkpoints import load_model
    from edge_runtime.config import ProfileConfig, QuantMode
    from edge_runtime.profiler.chooser import NoPlanFitsError
    from edge_runtime.profiler.measure import load_peak_mb, rss_mb, start_load_window, warm_runtime
    from edge_runtime.profiler.profile_io import save_profile
    from edge_runtime.profiler.runner import run_profile

    cfg = ProfileConfig(quant=QuantMode.parse(args.quant), batch_size=args.batch_size,
                        seq_len=args.seq_len, label_fraction=args.label_fraction,
                        memory_budget_mb=args.memory_budget_mb,
                        round_deadline_s=args.round_deadline_s,
                        steps_per_round=args.steps_per_round, targets=args.targets,
                        rank_choices=args.ranks, alpha=args.alpha, quick=args.quick,
                        time_basis=args.time_basis)
    t0 = time.perf_counter()
    start_load_window()
    loaded = load_model(args.model, cfg.quant)
    load_peak = load_peak_mb()
    warm_runtime()
    load_s = time.perf_counter() - t0
    print(f"loaded {loaded.name} in {load_s:.1f} s (peak RSS {load_peak:.0f} MB)",
          file=sys.stderr)
    info = {"spec": args.model, "name": loaded.name, "fingerprint": loaded.fingerprint,
            "source": loaded.source, "quant": cfg.quant.value, "load_s": round(load_s, 2)}
    try:
        profile = run_profile(loaded.model, cfg, base_rss_mb=rss_mb(), load_peak_rss_mb=load_peak,
                              model_info=info,
                              progress=lambda s: print(s, file=sys.stderr, flush=True))
    except NoPlanFitsError as e:
        partial = getattr(e, "profile", None)
        if partial is not None:
            partial.extra["total_s"] = round(time.perf_counter() - t0, 2)
            save_profile(partial, args.out)
            print(f"measurements written to {args.out} (no plan)", file=sys.stderr)
        raise
    profile.extra["total_s"] = round(time.perf_counter() - t0, 2)
    save_profile(profile, args.out)
    print(format_table(profile.to_json()))
    print(f"profile written to {args.out} in {profile.extra['total_s']:.1f} s "
          f"(train with: edge-rt train {args.model} --quant {cfg.quant.value} "
          f"--profile {args.out} ...)")
    return 0
