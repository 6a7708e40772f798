"""Algorithms register themselves on import; import this package to populate the registry."""

from silotune.federated.algorithms import fedit, local
from silotune.federated.algorithms.base import ALGORITHMS

__all__ = ["ALGORITHMS", "fedit", "local"]
