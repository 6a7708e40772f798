"""The checks of what federated clients upload (lora.client_ranks, federated.aggregation and
federated.compression): what each scheme cannot be combined with, in one message each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from silotune.errors import ConfigError

if TYPE_CHECKING:
    from silotune.config import Config


def check_uploads(config: Config) -> None:
    """Client ranks, FLoRA and compressed uploads, and what they cannot be combined with."""
    fed, lora, clients = config.federated, config.lora, config.partition.clients
    ranks = lora.client_ranks
    if ranks:
        if len(ranks) != clients or not all(1 <= r <= lora.r for r in ranks):
            raise ConfigError(
                f"lora.client_ranks lists one rank per client, each from 1 to lora.r = {lora.r} "
                f"(the server's); got {list(ranks)} for {clients} clients"
            )
        if fed.aggregation == "fedavg":
            raise ConfigError(
                'lora.client_ranks needs federated.aggregation = "hetlora" (zero-padded '
                'averaging), "flora" (stacked products) or "fedsa" (zero-padded A): plain '
                "fedavg cannot average adapters of different ranks"
            )
        if config.defence.dp == "client-fixed":
            raise ConfigError(
                'lora.client_ranks cannot run with defence.dp = "client-fixed": Flower\'s '
                "clipping mod takes the update as the upload less what the server sent, which "
                'has another rank; use defence.dp = "server-fixed"'
            )
    if fed.aggregation in ("flora", "fedex"):
        if fed.strategy != "fedavg":
            raise ConfigError(
                f"federated.aggregation = {fed.aggregation!r} makes the model the mean of the "
                f"clients' products; federated.strategy = {fed.strategy!r} would aggregate "
                f'otherwise: set strategy = "fedavg"'
            )
        if config.defence.dp != "none":
            raise ConfigError(
                f"federated.aggregation = {fed.aggregation!r} cannot run with defence.dp: the "
                "noise is calibrated to the average of clipped factors, not to a mean of products"
            )
    if fed.aggregation == "fedex" and ranks:
        raise ConfigError(
            'federated.aggregation = "fedex" corrects the mean of equal-rank factors; with '
            'lora.client_ranks use "flora" (the mean of products, projected) or "hetlora"'
        )
    if fed.aggregation == "flora" and lora.freeze_a:
        raise ConfigError(
            'federated.aggregation = "flora" rewrites A every round (the projection), which '
            "lora.freeze_a keeps fixed; turn one of them off"
        )
    if fed.aggregation == "fedsa" and lora.freeze_a:
        raise ConfigError(
            'federated.aggregation = "fedsa" shares only A, which lora.freeze_a never '
            "trains: nothing would be federated; turn one of them off"
        )
    mixing = "lora.client_ranks" if ranks else 'federated.aggregation = "fedsa"'
    fedpit_mix = "fedpit" in config.experiment.algorithms and config.synthetic.beta < 1.0
    if fedpit_mix and (ranks or fed.aggregation == "fedsa"):
        raise ConfigError(
            f"{mixing} cannot run FedPIT with synthetic.beta < 1: the upload would mix in the "
            "private adapter (rank lora.r, with its B); set beta = 1"
        )
    exact = fed.aggregation in ("flora", "fedex")
    if config.defence.secagg and (ranks or exact or fed.compression != "none"):
        raise ConfigError(
            "defence.secagg shows the server only the sum of the uploads, which it cannot pad, "
            "stack or decode client by client: use it without lora.client_ranks, "
            'aggregation = "flora" or "fedex", and federated.compression'
        )
    if fed.compression != "none" and config.defence.dp == "client-fixed":
        raise ConfigError(
            'federated.compression cannot run with defence.dp = "client-fixed": Flower\'s '
            'clipping mod would clip the codes; use defence.dp = "server-fixed", which clips '
            "the decoded updates"
        )
