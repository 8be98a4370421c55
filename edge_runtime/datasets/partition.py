"""Partitioners: pure functions from item labels/groups to per-client index lists.

- `partition_by_group`: domain skew (one domain per client, e.g. imdb/yelp/amazon) or
  task skew (one BIG-bench task per client, FlexLoRA's multi-task non-IID setting,
  Bai et al. arXiv 2402.11505 sec. 4.1).
- `partition_dirichlet`: label skew, each label's items split over clients by
  proportions drawn from Dir(alpha) (Hsu, Qi & Brown, arXiv 1909.06335, sec. 3); small
  alpha = strong skew.
- `partition_iid`: a seeded shuffle cut into near-equal parts.
- `split_train_test`: a seeded per-client hold-out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_runtime.errors import ConfigError

__all__ = ["partition_by_group", "partition_dirichlet", "partition_iid", "split_train_test"]


def _check_clients(n_clients: int, n_items: int) -> None:
    if n_clients <= 0:
        raise ConfigError(f"--clients must be positive, got {n_clients}")
    if n_items < n_clients:
        raise ConfigError(f"{n_items} items cannot feed {n_clients} clients; pass fewer --clients")


def partition_by_group(groups: Sequence[str], n_clients: int, seed: int = 0) -> list[list[int]]:
    """One group per client where possible.

    With G groups (sorted by name) and N clients: if N <= G, group g goes whole to client
    g mod N (clients may get several groups); if N > G, client c serves group c mod G and
    each group's items are shuffled and cut evenly among the clients serving it.
    """
    _check_clients(n_clients, len(groups))
    names = sorted(set(groups))
    members: dict[str, list[int]] = {g: [] for g in names}
    for i, g in enumerate(groups):
        members[g].append(i)
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(n_clients)]
    if n_clients <= len(names):
        for gi, g in enumerate(names):
            out[gi % n_clients].extend(members[g])
        return [sorted(c) for c in out]
    for gi, g in enumerate(names):
        serving = [c for c in range(n_clients) if c % len(names) == gi]
        idx = np.array(members[g])
        rng.shuffle(idx)
        for part, c in zip(np.array_split(idx, len(serving)), serving, strict=True):
            out[c] = sorted(int(i) for i in part)
    if any(not c for c in out):
        raise ConfigError(f"some groups are too small for {n_clients} clients; pass fewer --clients")
    return out


def partition_dirichlet(labels: Sequence[str | int], n_clients: int, alpha: float,
                        seed: int = 0, min_size: int = 1, max_tries: int = 100
                        ) -> list[list[int]]:
    """Label skew: for each label, proportions p ~ Dir(alpha * 1_N) split its items.

    Redraws (up to max_tries) until every client has at least `min_size` items.
    """
    if alpha <= 0:
        raise ConfigError(f"--alpha must be positive, got {alpha}; try 0.5")
    _check_clients(n_clients, len(labels))
    rng = np.random.default_rng(seed)
    by_label: dict[str | int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    for _ in range(max_tries):
        out: list[list[int]] = [[] for _ in range(n_clients)]
        for y in sorted(by_label, key=str):
            idx = np.array(by_label[y])
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for c, part in enumerate(np.split(idx, cuts)):
                out[c].extend(int(i) for i in part)
        if min(len(c) for c in out) >= min_size:
            return [sorted(c) for c in out]
    raise ConfigError(f"could not give every client {min_size} items with alpha={alpha} "
                      f"after {max_tries} draws; raise --alpha or pass fewer --clients")


def partition_iid(n_items: int, n_clients: int, seed: int = 0) -> list[list[int]]:
    """A seeded shuffle cut into n_clients near-equal parts."""
    _check_clients(n_clients, n_items)
    idx = np.random.default_rng(seed).permutation(n_items)
    return [sorted(int(i) for i in part) for part in np.array_split(idx, n_clients)]


def split_train_test(indices: Sequence[int], test_fraction: float, seed: int = 0
                     ) -> tuple[list[int], list[int]]:
    """Seeded split; the test part has round(f * n) items, at least 1 when n >= 2."""
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test fraction must be in [0, 1), got {test_fraction}")
    idx = np.array(list(indices))
    np.random.default_rng(seed).shuffle(idx)
    n_test = int(round(test_fraction * len(idx)))
    if test_fraction > 0 and len(idx) >= 2:
        n_test = max(1, min(n_test, len(idx) - 1))
    test = sorted(int(i) for i in idx[:n_test])
    train = sorted(int(i) for i in idx[n_test:])
    return train, test
