"""Turn a source's records into per-client JSONL splits plus a manifest.

Layout of an output directory:
    manifest.json                 source, pins, partition, per-client counts/groups
    test.jsonl                    union of the client test splits (global held-out set)
    client_000/train.jsonl, client_000/test.jsonl, ...
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.datasets.partition import (
    partition_by_group,
    partition_dirichlet,
    partition_iid,
    split_train_test,
)
from edge_runtime.datasets.readers import (
    Record,
    read_bigbench,
    read_chatterbot,
    read_fortunes,
    read_sentiment,
)
from edge_runtime.datasets.sources import SOURCES, extract_source
from edge_runtime.errors import ConfigError, DataError

__all__ = ["DataSpec", "parse_data_name", "read_records", "partition_records", "write_splits",
           "pull_dataset", "PARTITIONS"]

PARTITIONS = ("domain", "task", "dirichlet", "iid")
DEFAULT_PARTITION = {"sentiment": "domain", "fortunes": "dirichlet", "chatterbot": "domain",
                     "bigbench": "task"}


@dataclass(frozen=True)
class DataSpec:
    source: str
    tasks: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        return self.source + ("-" + "+".join(self.tasks) if self.tasks else "")


def parse_data_name(name: str) -> DataSpec:
    """`sentiment`, `fortunes`, `chatterbot` or `bigbench:TASK[,TASK...]`."""
    source, _, rest = name.partition(":")
    if source not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose sentiment, fortunes, chatterbot or "
                        "bigbench:TASK[,TASK...]")
    tasks = tuple(t.strip() for t in rest.split(",") if t.strip())
    if source == "bigbench" and not tasks:
        raise DataError("bigbench needs tasks: bigbench:navigate,sports_understanding,...")
    if source != "bigbench" and tasks:
        raise DataError(f"{source} takes no tasks; pass just `{source}`")
    return DataSpec(source, tasks)


def read_records(spec: DataSpec, raw: Path, *, seed: int = 0,
                 max_per_task: int = 1000) -> list[Record]:
    if spec.source == "sentiment":
        return read_sentiment(raw)
    if spec.source == "fortunes":
        return read_fortunes(raw)
    if spec.source == "chatterbot":
        return read_chatterbot(raw)
    return read_bigbench(raw, spec.tasks, max_per_task=max_per_task, seed=seed)


def partition_records(records: list[Record], n_clients: int, partition: str, *,
                      alpha: float = 0.5, seed: int = 0) -> list[list[int]]:
    """Indices of each client's records under the named partition."""
    if partition in ("domain", "task"):
        return partition_by_group([r.group for r in records], n_clients, seed)
    if partition == "dirichlet":
        return partition_dirichlet([r.label for r in records], n_clients, alpha, seed,
                                   min_size=2)
    if partition == "iid":
        return partition_iid(len(records), n_clients, seed)
    raise ConfigError(f"unknown partition {partition!r}; choose {', '.join(PARTITIONS)}")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_splits(records: list[Record], parts: list[list[int]], out: Path, *,
                 test_fraction: float, seed: int, meta: dict) -> dict:
    """Write client_XXX/{train,test}.jsonl, test.jsonl and manifest.json; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    clients = []
    all_test: list[dict] = []
    for c, idx in enumerate(parts):
        train, test = split_train_test(idx, test_fraction, seed + c)
        d = out / f"client_{c:03d}"
        _write_jsonl(d / "train.jsonl", [records[i].row for i in train])
        _write_jsonl(d / "test.jsonl", [records[i].row for i in test])
        all_test.extend(records[i].row for i in test)
        clients.append({"dir": d.name, "train": len(train), "test": len(test),
                        "groups": dict(Counter(records[i].group for i in idx)),
                        "labels": dict(Counter(records[i].label for i in idx))})
    _write_jsonl(out / "test.jsonl", all_test)
    manifest = {**meta, "clients": clients, "num_records": len(records)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def pull_dataset(name: str, out: Path, *, n_clients: int, partition: str | None = None,
                 alpha: float = 0.5, seed: int = 0, test_fraction: float = 0.2,
                 max_per_task: int = 1000, raw: Path | None = None) -> dict:
    """Fetch (pinned, checked), read, partition and write one dataset. Returns the manifest.

    `raw` points at already extracted source files (tests use a vendored slice).
    """
    spec = parse_data_name(name)
    partition = partition or DEFAULT_PARTITION[spec.source]
    if partition not in PARTITIONS:
        raise ConfigError(f"unknown partition {partition!r}; choose {', '.join(PARTITIONS)}")
    raw_dir = raw if raw is not None else extract_source(spec.source, spec.tasks)
    records = read_records(spec, raw_dir, seed=seed, max_per_task=max_per_task)
    parts = partition_records(records, n_clients, partition, alpha=alpha, seed=seed)
    pins = [{"command": " ".join(a.command), "file": a.filename, "sha256": a.sha256}
            for a in SOURCES[spec.source]]
    meta = {"dataset": name, "source": spec.source, "tasks": list(spec.tasks),
            "partition": partition, "alpha": alpha if partition == "dirichlet" else None,
            "seed": seed, "test_fraction": test_fraction, "pins": pins}
    return write_splits(records, parts, out, test_fraction=test_fraction, seed=seed, meta=meta)
