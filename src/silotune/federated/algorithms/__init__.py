"""Algorithms register themselves on import; import this package to populate the registry."""

from silotune.federated.algorithms import fedit, fedpit, local
from silotune.federated.algorithms.base import ALGORITHMS
from silotune.split import algorithm as split
from silotune.split import central as split_central

__all__ = ["ALGORITHMS", "fedit", "fedpit", "local", "split", "split_central"]
