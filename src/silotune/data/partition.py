"""Split records into a held-out eval set and per-client partitions with flwr-datasets.

Deterministic by seed: the eval set is drawn first, the rest is shuffled and handed to a
flwr-datasets partitioner, then each client holds out `client_eval_size` of its own records (its
distribution's held-out set) and is capped at `max_examples_per_client` (few-shot).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from silotune.config_sections import DataConfig, PartitionConfig
from silotune.errors import DataError
from silotune.registry import Registry

PartitionerFactory = Callable[[PartitionConfig, int], Partitioner]
PARTITIONERS: Registry[PartitionerFactory] = Registry("partitioner")


@PARTITIONERS.register("iid")
def _iid(cfg: PartitionConfig, seed: int) -> Partitioner:
    return IidPartitioner(num_partitions=cfg.clients)


@PARTITIONERS.register("dirichlet")
def _dirichlet(cfg: PartitionConfig, seed: int) -> Partitioner:
    return DirichletPartitioner(
        num_partitions=cfg.clients,
        partition_by="label",
        alpha=cfg.alpha,
        min_partition_size=cfg.min_partition_size,
        self_balancing=False,
        seed=seed,
    )


@dataclass(frozen=True)
class Partitions:
    """The held-out eval set and one dataset per client (+ each client's own held-out set)."""

    eval: datasets.Dataset
    clients: list[datasets.Dataset]
    client_evals: list[datasets.Dataset] = field(default_factory=list)  # partition.client_eval_size

    def pooled(self) -> datasets.Dataset:
        """All clients' records together (what centralized training may see)."""
        return datasets.concatenate_datasets(self.clients)

    def stats(self) -> list[dict[str, object]]:
        """Per client: its size and its label mix."""
        rows: list[dict[str, object]] = []
        for i, part in enumerate(self.clients):
            labels = Counter(part["label"]) if "label" in part.column_names else Counter()
            rows.append({"client": i, "size": len(part), "labels": dict(sorted(labels.items()))})
            if self.client_evals:
                rows[-1]["held_out"] = len(self.client_evals[i])
        return rows


def split_dataset(
    dataset: datasets.Dataset, data: DataConfig, cfg: PartitionConfig, seed: int
) -> Partitions:
    """Hold out `data.eval_size` records, then partition the rest across `cfg.clients`."""
    needed = data.eval_size + cfg.clients
    if len(dataset) < needed:
        raise DataError(
            f"{len(dataset)} records cannot give {data.eval_size} eval records and at least one "
            f"per client for {cfg.clients} clients; lower data.eval_size or partition.clients"
        )
    shuffled = dataset.shuffle(seed=seed)
    eval_set = shuffled.select(range(data.eval_size))
    pool = shuffled.select(range(data.eval_size, len(shuffled)))
    partitioner = PARTITIONERS.get(cfg.method)(cfg, seed)
    partitioner.dataset = pool
    try:
        parts = [partitioner.load_partition(i) for i in range(cfg.clients)]
    except ValueError as exc:
        raise DataError(
            f"could not partition {len(pool)} records into {cfg.clients} clients with "
            f"{cfg.method!r}: {exc} (try fewer clients, a larger partition.alpha or a smaller "
            "partition.min_partition_size)"
        ) from None
    client_evals = []
    if cfg.client_eval_size:
        parts = [p.shuffle(seed=seed + i) for i, p in enumerate(parts)]
        # Each client's held-out records come from its own (shuffled) partition: its distribution.
        held = [min(cfg.client_eval_size, len(p) // 2) for p in parts]
        client_evals = [
            p.select(range(len(p) - h, len(p))) for p, h in zip(parts, held, strict=True)
        ]
        parts = [p.select(range(len(p) - h)) for p, h in zip(parts, held, strict=True)]
        for i, evals in enumerate(client_evals):
            if len(evals) == 0:
                raise DataError(
                    f"client {i} has too few records to hold any out for partition."
                    "client_eval_size; use fewer clients, a larger partition.alpha, or more data"
                )
    if cfg.max_examples_per_client:
        parts = [
            p.shuffle(seed=seed + i).select(range(min(len(p), cfg.max_examples_per_client)))
            for i, p in enumerate(parts)
        ]
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise DataError(
                f"client {i} received no records; use fewer clients, a larger partition.alpha, "
                "or more data"
            )
    return Partitions(eval=eval_set, clients=parts, client_evals=client_evals)
