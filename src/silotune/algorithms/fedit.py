"""FedIT: federated instruction tuning of one LoRA adapter, averaged by a stock Flower strategy."""

from __future__ import annotations

import math

from silotune.federated.local import LOCAL_ROLES, LocalReply, LocalRequest, LocalRole
from silotune.federated.simulation import run_federated
from silotune.jobs import AlgorithmResult, Job, register
from silotune.modeling.memory import Process
from silotune.privacy.accounting import central_releases, dp_sgd_release
from silotune.seeds import derive_seed


def fedit_round(req: LocalRequest) -> LocalReply:
    """Train the received global adapter on this client's data; send it back."""
    cfg = req.config
    state, result = req.bench.train(
        req.global_state,
        req.examples,
        cfg.train.local_steps,
        derive_seed(cfg.experiment.seed, "client", req.client, req.round),
        proximal_mu=req.proximal_mu,
    )
    return LocalReply(
        upload=state,
        weight=result.examples,
        metrics={
            # Under DP-SGD the loss on the client's records would leave unnoised: it stays.
            "train_loss": result.loss if result.privacy is None else math.nan,
            "train_s": result.seconds,
            **(result.privacy.metrics("adapter") if result.privacy else {}),
        },
    )


LOCAL_ROLES.register("fedit")(LocalRole(train=fedit_round))


@register(
    "fedit",
    "federated",
    "one shared LoRA adapter averaged across clients (Flower)",
    processes=lambda _: (Process("fedit client", "client"),),
    releases=lambda config: {
        "adapter": dp_sgd_release(config, "the uploaded adapter"),
        **central_releases(config),
    },
    shared_adapter=True,
    deployable=True,
)
def run_fedit(job: Job) -> AlgorithmResult:
    """Run FedIT on Flower's Simulation Engine, evaluating the global adapter after each round."""
    return run_federated(job, "fedit", weighs_examples=True)
