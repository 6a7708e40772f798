"""The algorithms silotune runs; each registers itself on import (see `silotune.jobs`)."""

from silotune.algorithms import fedit, fedpit, fewfedweight, local, split, split_central
from silotune.jobs import ALGORITHMS

__all__ = ["ALGORITHMS", "fedit", "fedpit", "fewfedweight", "local", "split", "split_central"]
