"""The run config on the command line: `--config run.toml`, flags, then `--set KEY=VALUE`.

Precedence, lowest first: the RunConfig defaults (`edge_runtime.config`), a command's own
base values, the run file, the command's flags, `--set` overrides. Every flag here
defaults to None ("not given"), so a default is written once, in the config.
"""

from __future__ import annotations

import argparse
from typing import Any

from edge_runtime.config import RunConfig, load_run_file, parse_override, set_key

__all__ = ["add_run_file_args", "add_plan_args", "add_dp_args", "resolve_run", "PLAN_FLAGS",
           "DP_FLAGS"]

# flag dest -> run config key, for the flags of `add_plan_args`
PLAN_FLAGS = {"r_max": "adapter.r_max", "r_min": "adapter.r_min", "depth": "adapter.depth",
              "targets": "adapter.targets", "alpha": "adapter.alpha",
              "local_steps": "train.steps", "lr": "train.lr", "batch_size": "train.batch_size",
              "seq_len": "train.seq_len"}
# flag dest -> run config key, for the flags of `add_dp_args` (privacy: DP and SecAgg)
DP_FLAGS = {"dp_clip": "fleet.dp.clip", "dp_noise_multiplier": "fleet.dp.noise_multiplier",
            "dp_delta": "fleet.dp.delta", "secagg": "fleet.secagg"}


def add_run_file_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="RUN.toml",
                   help="a run file (sections model, adapter, train, strategy, fleet, sim, "
                   "data, mqtt); flags override it")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set strategy.gamma=0.95 (repeatable)")


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """The global adapter's extent and the local recipe (all optional: defaults live in the
    run config)."""
    from edge_runtime.cli.common import positive_float, positive_int

    p.add_argument("--r-max", "--rank-max", dest="r_max", type=positive_int,
                   help="global adapter rank (the largest a device gets)")
    p.add_argument("--r-min", "--rank-min", dest="r_min", type=positive_int,
                   help="the smallest rank a device class gets")
    p.add_argument("--depth", type=int, help="global adapter depth (0 = every block)")
    p.add_argument("--targets", help="LoRA targets among q,k,v,o,gate,up,down")
    p.add_argument("--alpha", type=positive_float)
    p.add_argument("--local-steps", type=positive_int, help="local steps per round")
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--seq-len", type=positive_int)


def add_dp_args(p: argparse.ArgumentParser) -> None:
    """Client-level differential privacy (`fleet.dp`) and secure aggregation
    (`fleet.secagg`); docs/PRIVACY.md."""
    p.add_argument("--dp-clip", type=float, metavar="C",
                   help="DP: bound on the L2 norm of each device's change per round (0: off)")
    p.add_argument("--dp-noise-multiplier", type=float, metavar="Z",
                   help="DP: Gaussian noise std on the round's sum is Z x C")
    p.add_argument("--dp-delta", type=float, metavar="DELTA",
                   help="DP: the delta epsilon is reported at (default 1e-5)")
    p.add_argument("--secagg", action="store_const", const=True,
                   help="secure aggregation (SecAgg+): the aggregator sees masked updates "
                   "and merges their sum (extra `secagg`; docs/PRIVACY.md)")


def resolve_run(args: argparse.Namespace, flags: dict[str, str],
                base: dict[str, Any] | None = None) -> RunConfig:
    """The run's config from `base`, `--config`, the flags named in `flags` (dest ->
    SECTION.KEY) and `--set`; any bad value raises ConfigError naming its key."""
    d: dict[str, Any] = {}
    for key, value in (base or {}).items():
        set_key(d, key, value)
    if getattr(args, "config", None):
        for section, value in load_run_file(args.config).items():
            if isinstance(value, dict) and isinstance(d.get(section), dict):
                d[section].update(value)
            else:
                d[section] = value
    for dest, key in flags.items():
        value = getattr(args, dest, None)
        if value is not None:
            set_key(d, key, value)
    for item in getattr(args, "set", None) or []:
        key, value = parse_override(item)
        set_key(d, key, value)
    return RunConfig.from_dict(d)
