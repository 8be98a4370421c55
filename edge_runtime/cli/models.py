"""`edge-rt models`: the known models, whether each is cached, and its size."""

from __future__ import annotations

import argparse
import json

from edge_runtime.checkpoints.pull import KNOWN_MODELS, cache_dir, cached_path

__all__ = ["register", "run", "listing"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list known models, which are cached, and their sizes")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(func=run)


def listing() -> list[dict[str, object]]:
    """One row per known model (plus `tiny`): name, description, size, cached path."""
    rows: list[dict[str, object]] = [
        {"name": "tiny", "description": "small random model of the same architecture "
         "(tests, dry runs; nothing to fetch)", "size_mb": 0.0, "cached": True, "path": None}]
    for name, m in sorted(KNOWN_MODELS.items()):
        path = cached_path(name)
        size = path.stat().st_size / 1e6 if path is not None else m.size_mb
        rows.append({"name": name, "description": m.description or f"{m.package} {m.version}",
                     "size_mb": round(size, 1), "cached": path is not None,
                     "path": str(path) if path is not None else None})
    return rows


def run(args: argparse.Namespace) -> int:
    rows = listing()
    if args.json:
        print(json.dumps({"cache": str(cache_dir()), "models": rows}, indent=1))
        return 0
    print(f"cache: {cache_dir()}")
    width = max(len(str(r["name"])) for r in rows)
    for r in rows:
        state = "cached" if r["cached"] else "fetched on first use"
        print(f"{str(r['name']):<{width}}  {float(r['size_mb']):>7.1f} MB  {state:<20}  "  # type: ignore[arg-type]
              f"{r['description']}")
    return 0
