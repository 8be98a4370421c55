"""The run config on the command line: `--config run.toml`, flags, then `--set KEY=VALUE`.

Precedence, lowest first: the RunConfig defaults (`edge_runtime.config`), a command's own
base values, the run file, the command's flags, `--set` overrides. Every flag here
defaults to None ("not given"), so a default is written once, in the config.
"""

from __future__ import annotations

import argparse
from typing import Any

from edge_runtime.config import RunConfig, load_run_file, parse_override, set_key

__all__ = ["add_run_file_args", "resolve_run"]


def add_run_file_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="RUN.toml",
                   help="a run file (sections model, adapter, train, strategy, fleet, sim, "
                   "data, mqtt); flags override it")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set strategy.gamma=0.95 (repeatable)")


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
