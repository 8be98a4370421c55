"""Public text data for federated benchmarks: pinned pulls, partitioners, JSONL splits."""

from edge_runtime.datasets.build import PARTITIONS, parse_data_name, pull_dataset
from edge_runtime.datasets.partition import (
    partition_by_group,
    partition_dirichlet,
    partition_iid,
    split_train_test,
)

__all__ = ["PARTITIONS", "parse_data_name", "pull_dataset", "partition_by_group",
           "partition_dirichlet", "partition_iid", "split_train_test"]
