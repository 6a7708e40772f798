"""Every registered algorithm carries all its traits, and the rest of silotune agrees with them."""

from __future__ import annotations

import pytest

from silotune.algorithms import ALGORITHMS
from silotune.config import load_config
from silotune.config_federation import ATTACK_TARGETS, SHARED_ADAPTER_ALGORITHMS
from silotune.federated.local import LOCAL_ROLES
from silotune.modeling.memory import WORKLOADS


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_every_algorithm_describes_its_processes(name: str) -> None:
    """The memory plan sizes what the registration describes, from any config it accepts."""
    spec = ALGORITHMS.get(name)
    config = load_config(None, [f"experiment.algorithms=['{name}']"])
    processes = spec.processes(config)
    assert processes and WORKLOADS.get(name) is spec.processes
    trainers = [p for p in processes if p.host != "resident"]
    assert all(p.adapters == spec.adapters for p in trainers)
    assert spec.max_weight(config, [3, 7]) > 0


def test_traits_agree_with_the_attacks_and_the_clients() -> None:
    """The attacks' targets and the federated client roles follow the registrations."""
    shared = [n for n in ALGORITHMS if ALGORITHMS.get(n).shared_adapter]
    assert sorted(SHARED_ADAPTER_ALGORITHMS) == shared
    assert list(ATTACK_TARGETS["inversion"]) == [
        n for n in ALGORITHMS if ALGORITHMS.get(n).mode == "split"
    ]
    federated = [n for n in ALGORITHMS if ALGORITHMS.get(n).mode == "federated"]
    assert LOCAL_ROLES.names() == federated
    assert all(ALGORITHMS.get(n).deployable for n in federated)
