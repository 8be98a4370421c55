"""Methods x seeds on one simulated fleet, with cached runs and a report.

A comparison file (TOML) has three parts:

    [base]                       a run config (sections as in a run file): the fleet,
                                 the data, the model, rounds, local steps, ...
    [compare]
    seeds = [0, 1, 2]            final runs, one per seed (at least 1; report >= 3)
    lrs = [3e-4, 1e-3, 3e-3]     candidate learning rates, chosen per method on the
                                 validation split with the first seed (one value: fixed,
                                 no validation runs; none: the base's train.lr)
                                 validation split with the first seed
    validation_fraction = 0.2    of each device's training rows, held out for that
    [methods.NAME]               one method: sections merged over [base]
    strategy = {name = "hetlora"}

Every run is cached in OUT/runs/<sha256 of its resolved config>.json with the code
version (a digest of the package's source files): an interrupted grid resumes, a finished
one re-renders in seconds, and a cached run of other code is recomputed, not reused.
Every run config is resolved before anything trains, so an unknown method setting, a
bad value or a missing dataset stops the comparison with one line naming it.

Reported (report.json, report.md): per method, the mean and sample std over seeds of the
FINAL round's held-out loss and accuracy (not the best round), bytes up/down summed over
rounds, simulated time; plots of loss vs round, vs MB sent, vs simulated time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from edge_runtime.config import RunConfig, set_key
from edge_runtime.errors import ConfigError, UserError

__all__ = ["CompareSpec", "load_compare", "run_compare", "code_version", "run_key"]

log = logging.getLogger(__name__)

PKG = Path(__file__).resolve().parent


@dataclass
class CompareSpec:
    base: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    seeds: list[int]
    lrs: list[float]
    validation_fraction: float


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_compare(path: str | Path, overrides: list[tuple[str, Any]] | None = None
                 ) -> CompareSpec:
    """Parse and check a comparison file; ConfigError names the method and key at fault."""
    p = Path(path)
    try:
        d = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"comparison file {p} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"comparison file {p} is not valid TOML ({e})") from None
    unknown = set(d) - {"base", "compare", "methods"}
    if unknown:
        raise ConfigError(f"unknown section {sorted(unknown)[0]!r} in {p}; use base, compare "
                          "and methods.NAME")
    cmp = d.get("compare", {})
    extra = set(cmp) - {"seeds", "lrs", "validation_fraction"}
    if extra:
        raise ConfigError(f"unknown key compare.{sorted(extra)[0]}; known: seeds, lrs, "
                          "validation_fraction")
    seeds = cmp.get("seeds", [0, 1, 2])
    lrs = cmp.get("lrs", [])
    vf = cmp.get("validation_fraction", 0.2)
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError("compare.seeds must be a non-empty list of integers")
    if not isinstance(lrs, list) or not all(isinstance(x, (int, float)) and x > 0 for x in lrs):
        raise ConfigError("compare.lrs must be a list of positive numbers")
    if not isinstance(vf, (int, float)) or not 0.0 < vf < 1.0:
        raise ConfigError("compare.validation_fraction must be in (0, 1)")
    methods = d.get("methods", {})
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{p} names no method; add a [methods.NAME] table")
    base = d.get("base", {})
    for key, value in overrides or []:
        set_key(base, key, value)
    spec = CompareSpec(base, methods, seeds, [float(x) for x in lrs], float(vf))
    for name in methods:
        _check_data(_run_config(spec, name, seeds[0], None, validation=False), name)
    for name in methods:  # resolve everything before anything trains
        for lr in ([*spec.lrs] if len(spec.lrs) > 1 else [None]):
            _run_config(spec, name, seeds[0], lr, validation=True)
        _run_config(spec, name, seeds[0], None, validation=False)
    return spec


def _run_config(spec: CompareSpec, method: str, seed: int, lr: float | None, *,
                validation: bool) -> RunConfig:
    over = spec.methods[method]
    if not isinstance(over, dict):
        raise ConfigError(f"methods.{method} must be a table of run config sections")
    d = _merge(spec.base, over)
    d["seed"] = seed
    d.setdefault("data", {})
    d["data"] = {**d["data"], "validation_fraction": spec.validation_fraction,
                 "eval_split": "validation" if validation else "test"}
    if lr is not None:
        d.setdefault("train", {})
        d["train"] = {**d["train"], "lr": lr}
    try:
        return RunConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"methods.{method}: {e}") from None


def _check_data(run: RunConfig, method: str) -> None:
    """The data is a folder of client splits or a dataset name `edge-rt data pull` knows."""
    from edge_runtime.datasets.build import parse_data_name

    path = run.data.path
    if path is None:
        raise ConfigError(f"methods.{method}: no data; set base.data.path to a folder from "
                          "`edge-rt data pull` or a dataset name (sentiment, bigbench:TASK)")
    if not Path(path).is_dir():
        try:
            parse_data_name(path)
        except UserError as e:
            raise ConfigError(f"methods.{method}: data.path: {e}") from None


def code_version() -> str:
    """A digest of the package's Python sources (a cached run of other code is stale)."""
    h = hashlib.sha256()
    for f in sorted(PKG.rglob("*.py")):
        h.update(str(f.relative_to(PKG)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_key(run: RunConfig) -> str:
    return hashlib.sha256(json.dumps(run.to_json(), sort_keys=True).encode()).hexdigest()[:20]


def _cached(out: Path, run: RunConfig, version: str,
            simulate: Callable[[RunConfig], dict[str, Any]]) -> dict[str, Any]:
    path = out / "runs" / f"{run_key(run)}.json"
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
            if doc.get("code") == version:
                return dict(doc["metrics"])
            log.info("cached run %s is of other code; recomputing", path.name)
        except (ValueError, KeyError):
            log.warning("cached run %s is unreadable; recomputing", path.name)
    metrics = simulate(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"code": version, "metrics": metrics}))
    tmp.replace(path)
    return metrics


def _stats(values: list[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "values": values}
    return {"mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": values}


def run_compare(spec: CompareSpec, out: Path,
                simulate: Callable[[RunConfig], dict[str, Any]] | None = None
                ) -> dict[str, Any]:
    """Run (or reuse) every cell; write OUT/report.json, OUT/report.md and plots."""
    from edge_runtime.simulation import run_simulation

    sim = simulate or run_simulation
    out.mkdir(parents=True, exist_ok=True)
    version = code_version()
    report: dict[str, Any] = {"code": version, "seeds": spec.seeds, "lrs": spec.lrs,
                              "validation_fraction": spec.validation_fraction, "methods": {}}
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    for method in spec.methods:
        chosen, picks = None, {}
        if len(spec.lrs) == 1:  # fixed: nothing to choose
            chosen = spec.lrs[0]
        elif spec.lrs:  # chosen on the validation split, first seed, final round
            for lr in spec.lrs:
                m = _cached(out, _run_config(spec, method, spec.seeds[0], lr, validation=True),
                            version, sim)
                picks[lr] = m["rounds"][-1]["eval_loss"]
            chosen = min(picks, key=lambda x: picks[x])
        runs = [_cached(out, _run_config(spec, method, s, chosen, validation=False), version,
                        sim) for s in spec.seeds]
        finals = [r["rounds"][-1] for r in runs]
        report["methods"][method] = {
            "lr": chosen if chosen is not None else runs[0]["config"]["train"]["lr"],
            "validation_loss_by_lr": {str(k): v for k, v in picks.items()},
            "final_round": finals[0]["round"],
            "eval_loss": _stats([f["eval_loss"] for f in finals]),
            "eval_accuracy": _stats([f["eval_accuracy"] for f in finals]),
            "mb_up": _stats([sum(x["bytes_up"] for x in r["rounds"]) / 1e6 for r in runs]),
            "mb_down": _stats([sum(x["bytes_down"] for x in r["rounds"]) / 1e6 for r in runs]),
            "sim_time_s": _stats([f["time_s"] for f in finals]),
            "base_eval_loss": runs[0]["rounds"][0]["eval_loss"],
            "base_eval_accuracy": runs[0]["rounds"][0]["eval_accuracy"],
            "runs": [run_key(_run_config(spec, method, s, chosen, validation=False))
                     for s in spec.seeds],
        }
        curves[method] = [r["rounds"] for r in runs]
    add_time_to_target(report, curves)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    plot_curves(curves, out)
    return report


def add_time_to_target(report: dict[str, Any], curves: dict[str, list[list[dict[str, Any]]]],
                       share: float = 0.95) -> None:
    """Simulated time and MB sent until a run first reaches `share` of the best method's
    mean final accuracy (or, without accuracy, loss within 1/share of the best mean final
    loss); per method, over seeds (a run that never gets there counts as not reaching)."""
    accs = [m["eval_accuracy"]["mean"] for m in report["methods"].values()]
    use_acc = all(a is not None for a in accs)
    if use_acc:
        target = share * max(accs)
    else:
        target = min(m["eval_loss"]["mean"] for m in report["methods"].values()) / share
    report["target"] = {"metric": "eval_accuracy" if use_acc else "eval_loss",
                        "share": share, "value": target}
    for name, runs in curves.items():
        times: list[float | None] = []
        mbs: list[float | None] = []
        for rounds in runs:
            sent, hit = 0.0, None
            for r in rounds:
                sent += r["bytes_up"] + r["bytes_down"]
                ok = (r["eval_accuracy"] is not None and r["eval_accuracy"] >= target
                      if use_acc else r["eval_loss"] <= target)
                if ok:
                    hit = (float(r["time_s"]), sent / 1e6)
                    break
            times.append(hit[0] if hit else None)
            mbs.append(hit[1] if hit else None)
        m = report["methods"][name]
        m["reached_target"] = sum(t is not None for t in times)
        m["time_to_target_s"] = _stats(times)
        m["mb_to_target"] = _stats(mbs)


def _fmt(s: dict[str, Any], digits: int = 4) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    how = ("chosen per method on the validation split (first seed, final round)"
           if len(report["lrs"]) > 1 else "fixed (not chosen here)")
    lines = [f"Final round, mean ± sample std over {len(seeds)} seeds ({seeds}); learning "
             f"rate {how}.", "",
             "| method | lr | held-out loss | accuracy | MB up | MB down | sim. time (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        lines.append(f"| {name} | {m['lr']:g} | {_fmt(m['eval_loss'])} | "
                     f"{_fmt(m['eval_accuracy'], 3)} | {_fmt(m['mb_up'], 2)} | "
                     f"{_fmt(m['mb_down'], 2)} | {_fmt(m['sim_time_s'], 0)} |")
    tgt = report.get("target")
    if tgt is not None:
        lines += ["", f"To target ({tgt['metric']} {'>=' if tgt['metric'] == 'eval_accuracy' else '<='} "
                  f"{tgt['value']:.4f}: {tgt['share']:.0%} of the best method's mean final "
                  "value), over the seeds that reached it:", "",
                  "| method | reached | sim. time to target (s) | MB to target |",
                  "|---|---|---|---|"]
        for name, m in report["methods"].items():
            lines.append(f"| {name} | {m['reached_target']}/{len(seeds)} | "
                         f"{_fmt(m['time_to_target_s'], 0)} | {_fmt(m['mb_to_target'], 2)} |")
    first = next(iter(report["methods"].values()))
    lines += ["", f"Base model: held-out loss {first['base_eval_loss']:.4f}"
              + (f", accuracy {first['base_eval_accuracy']:.3f}"
                 if first["base_eval_accuracy"] is not None else "") + "."]
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[list[dict[str, Any]]]], out: Path) -> bool:
    """Mean held-out loss over seeds vs round, vs MB sent, vs simulated time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, runs in curves.items():
        n = min(len(r) for r in runs)
        loss = [statistics.fmean(r[i]["eval_loss"] for r in runs) for i in range(n)]
        mb, total = [], 0.0
        for i in range(n):
            total += statistics.fmean(r[i]["bytes_up"] + r[i]["bytes_down"] for r in runs)
            mb.append(total / 1e6)
        t = [statistics.fmean(r[i]["time_s"] for r in runs) for i in range(n)]
        for ax, x in zip(axes, (list(range(n)), mb, t), strict=True):
            ax.plot(x, loss, marker="o", label=name)
    for ax, label in zip(axes, ("round", "MB sent (up + down)", "simulated time (s)"),
                         strict=True):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (mean over seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return True
