"""Flower's own strategies, each wrapped by the metering wrapper (`metering.Metered`), registered
by name: the plain ones (FedAvg, FedProx, FedAdam, FedAvgM, FedYogi, FedAdagrad) and the robust
ones for federations that do not trust every member (FedMedian, FedTrimmedAvg, Krum, MultiKrum,
Bulyan).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from silotune.config_federation import FederatedConfig
from silotune.federated.metering import Metered
from silotune.registry import Registry


# One named wrapper per strategy: the run's log and a type check name the strategy inside.
class MeteredFedAvg(Metered):
    """FedAvg, metered."""


class MeteredFedProx(Metered):
    """FedProx (sends `proximal-mu` to clients), metered."""


class MeteredFedAdam(Metered):
    """FedAdam (server-side Adam on the averaged update), metered."""


class MeteredFedAvgM(Metered):
    """FedAvgM (server-side SGD with momentum on the averaged update), metered."""


class MeteredFedYogi(Metered):
    """FedYogi (server-side Yogi on the averaged update), metered."""


class MeteredFedAdagrad(Metered):
    """FedAdagrad (server-side Adagrad on the averaged update), metered."""


class MeteredFedMedian(Metered):
    """FedMedian (coordinate-wise median of the updates), metered."""


class MeteredFedTrimmedAvg(Metered):
    """FedTrimmedAvg (coordinate-wise mean without each tail's extremes), metered."""


class MeteredKrum(Metered):
    """Krum (the one update closest to its neighbours), metered."""


class MeteredMultiKrum(Metered):
    """MultiKrum (the average of the updates closest to their neighbours), metered."""


class MeteredBulyan(Metered):
    """Bulyan (Krum selection, then a trimmed coordinate-wise mean), metered."""


StrategyFactory = Callable[[FederatedConfig, int, bool, str], Metered]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")


def sampled_per_round(cfg: FederatedConfig, clients: int) -> int:
    """How many clients train each round."""
    return max(1, int(clients * cfg.fraction_train))


def _sampling(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> dict[str, Any]:
    per_round = sampled_per_round(cfg, clients)
    # The server always evaluates the global adapter; clients also evaluate when they infer
    # with more than it (FedPIT's private adapter), every client every round.
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0 if client_eval else 0.0,
        "min_train_nodes": per_round,
        "min_evaluate_nodes": clients if client_eval else 0,
        "min_available_nodes": clients,
        "weighted_by_key": weight,
    }


@STRATEGIES.register("fedavg")
def _fedavg(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    return MeteredFedAvg(FedAvg(**_sampling(cfg, clients, client_eval, weight)))


@STRATEGIES.register("fedprox")
def _fedprox(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    sampling = _sampling(cfg, clients, client_eval, weight)
    return MeteredFedProx(FedProx(**sampling, proximal_mu=cfg.proximal_mu))


@STRATEGIES.register("fedadam")
def _fedadam(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    return MeteredFedAdam(
        FedAdam(
            **_sampling(cfg, clients, client_eval, weight),
            eta=cfg.server_lr,
            tau=cfg.server_tau,
            beta_1=cfg.server_beta_1,
            beta_2=cfg.server_beta_2,
        )
    )


@STRATEGIES.register("fedyogi")
def _fedyogi(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    return MeteredFedYogi(
        FedYogi(
            **_sampling(cfg, clients, client_eval, weight),
            eta=cfg.server_lr,
            tau=cfg.server_tau,
            beta_1=cfg.server_beta_1,
            beta_2=cfg.server_beta_2,
        )
    )


@STRATEGIES.register("fedadagrad")
def _fedadagrad(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    sampling = _sampling(cfg, clients, client_eval, weight)
    return MeteredFedAdagrad(FedAdagrad(**sampling, eta=cfg.server_lr, tau=cfg.server_tau))


@STRATEGIES.register("fedavgm")
def _fedavgm(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    return MeteredFedAvgM(
        FedAvgM(
            **_sampling(cfg, clients, client_eval, weight),
            server_learning_rate=cfg.momentum_lr,
            server_momentum=cfg.server_momentum,
        )
    )


@STRATEGIES.register("fedmedian")
def _fedmedian(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    return MeteredFedMedian(FedMedian(**_sampling(cfg, clients, client_eval, weight)))


@STRATEGIES.register("fedtrimmedavg")
def _fedtrimmedavg(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    sampling = _sampling(cfg, clients, client_eval, weight)
    return MeteredFedTrimmedAvg(FedTrimmedAvg(**sampling, beta=cfg.trim_fraction))


@STRATEGIES.register("krum")
def _krum(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    sampling = _sampling(cfg, clients, client_eval, weight)
    return MeteredKrum(Krum(**sampling, num_malicious_nodes=cfg.malicious_clients))


@STRATEGIES.register("multikrum")
def _multikrum(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    select = cfg.multikrum_select or sampled_per_round(cfg, clients) - cfg.malicious_clients
    return MeteredMultiKrum(
        MultiKrum(
            **_sampling(cfg, clients, client_eval, weight),
            num_malicious_nodes=cfg.malicious_clients,
            num_nodes_to_select=max(1, select),
        )
    )


@STRATEGIES.register("bulyan")
def _bulyan(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    sampling = _sampling(cfg, clients, client_eval, weight)
    return MeteredBulyan(Bulyan(**sampling, num_malicious_nodes=cfg.malicious_clients))


def build_strategy(
    cfg: FederatedConfig,
    clients: int,
    client_eval: bool = False,
    weight: str = "num-examples",
    known_weights: Mapping[int, float] | None = None,
) -> Metered:
    """The configured Flower strategy, metered; updates weighted by the metric `weight`, which
    each client must report as `known_weights[client]` where the server knows it."""
    strategy = STRATEGIES.get(cfg.strategy)(cfg, clients, client_eval, weight)
    # Krum and Bulyan guarantee nothing below their minimum (Bulyan then skips the round).
    strategy.quorum = max(cfg.quorum, cfg.min_updates())
    strategy.expected_clients = clients
    strategy.per_round = sampled_per_round(cfg, clients)
    strategy.max_weight_ratio = cfg.max_weight_ratio
    strategy.known_weights = dict(known_weights or {})
    return strategy
