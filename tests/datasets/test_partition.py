import math
from collections import Counter

import pytest

from edge_runtime.datasets.partition import (
    partition_by_group,
    partition_dirichlet,
    partition_iid,
    split_train_test,
)
from edge_runtime.errors import ConfigError


def _is_partition(parts, n):
    flat = [i for p in parts for i in p]
    return sorted(flat) == list(range(n))


def test_by_group_one_group_per_client_and_splits_when_more_clients():
    groups = ["b"] * 4 + ["a"] * 6 + ["c"] * 5
    parts = partition_by_group(groups, 3)
    assert _is_partition(parts, 15)
    assert [{groups[i] for i in p} for p in parts] == [{"a"}, {"b"}, {"c"}]
    parts = partition_by_group(groups, 2)  # a, c -> client 0; b -> client 1
    assert [{groups[i] for i in p} for p in parts] == [{"a", "c"}, {"b"}]
    parts = partition_by_group(groups, 6)  # each group cut between two clients
    assert _is_partition(parts, 15)
    assert all(len({groups[i] for i in p}) == 1 for p in parts)
    assert Counter(groups[p[0]] for p in parts) == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(ConfigError):
        partition_by_group(["a", "b"], 3)


def _mean_entropy(parts, labels):
    ent = []
    for p in parts:
        cnt = Counter(labels[i] for i in p)
        tot = sum(cnt.values())
        ent.append(-sum(c / tot * math.log(c / tot) for c in cnt.values()))
    return sum(ent) / len(ent)


def test_dirichlet_covers_everything_is_seeded_and_skews_with_small_alpha():
    labels = [i % 5 for i in range(1000)]
    a = partition_dirichlet(labels, 8, 0.5, seed=1)
    assert _is_partition(a, 1000)
    assert a == partition_dirichlet(labels, 8, 0.5, seed=1)
    assert a != partition_dirichlet(labels, 8, 0.5, seed=2)
    skewed = partition_dirichlet(labels, 8, 0.05, seed=0)
    flat = partition_dirichlet(labels, 8, 100.0, seed=0)
    assert _mean_entropy(skewed, labels) < 0.8 < _mean_entropy(flat, labels)
    assert _mean_entropy(flat, labels) > 0.95 * math.log(5)
    assert min(len(p) for p in partition_dirichlet(labels, 8, 0.05, seed=0, min_size=5)) >= 5
    with pytest.raises(ConfigError, match="alpha"):
        partition_dirichlet(labels, 8, 0.0)


def test_iid_and_train_test_split():
    parts = partition_iid(10, 3, seed=0)
    assert _is_partition(parts, 10) and sorted(len(p) for p in parts) == [3, 3, 4]
    train, test = split_train_test(range(10), 0.2, seed=0)
    assert len(test) == 2 and sorted(train + test) == list(range(10))
    train, test = split_train_test([7, 9], 0.2, seed=0)
    assert len(test) == 1 and len(train) == 1  # at least one of each
