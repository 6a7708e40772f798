"""FedPIT: self-generated synthetic data + parameter isolation (Zhang et al., arXiv 2403.06131).

One round on one client, with two LoRA adapters on one frozen base:

    base + global ──self-generate──▶ synthetic ──train `global` (alone)──▶ global'
    base + global' (frozen) + private ──train `private` on local (+ synthetic)──▶ private'
    upload: beta * global' + (1 - beta) * private'      (beta = 1: global' only)
    keep:   private' in the client's own state, never sent

The server averages uploads with a stock Flower strategy. Clients infer with global + private,
so they evaluate themselves every round; the server also evaluates global alone.
"""

from __future__ import annotations

from silotune.config import Config
from silotune.data.dp_synthetic import check_budget
from silotune.data.generators import generator_for, generator_note
from silotune.data.sft import tokenize_dataset
from silotune.data.synthetic import self_generate
from silotune.data.synthetic_quality import RatedJudge, quality_metrics, write_round
from silotune.errors import ConfigError
from silotune.evaluation.evaluator import EvalResult, EvalSet
from silotune.evaluation.judge import filter_judge
from silotune.federated.local import LOCAL_ROLES, LocalReply, LocalRequest, LocalRole
from silotune.federated.simulation import run_federated
from silotune.jobs import AlgorithmResult, Job, register
from silotune.modeling.adapters import GLOBAL, PRIVATE, mix_adapters, save_adapter
from silotune.modeling.memory import Process
from silotune.privacy.accounting import central_releases, planned_uses
from silotune.privacy.ledger import record_delta
from silotune.privacy.mechanisms import Releases
from silotune.privacy.noise import mechanism_seed
from silotune.run_folder import client_adapter_dir
from silotune.seeds import derive_seed


def fedpit_round(req: LocalRequest) -> LocalReply:
    """Generate, filter, train `global` on synthetic data and `private` on local data."""
    cfg, syn, bench = req.config, req.config.synthetic, req.bench
    seed = derive_seed(cfg.experiment.seed, "fedpit", req.client, req.round)
    private = req.store.get(PRIVATE, bench.initial_private)
    bench.put(GLOBAL, req.global_state)
    bench.put(PRIVATE, private)
    # The generator (by default the current global model: base + global, never the private
    # adapter) sees only what it is configured to.
    generator = generator_for(syn, bench, [GLOBAL])
    # With synthetic.dp the instructions are DP (and reported as the ledger's "synthetic" use).
    private_use, generation_seed = None, seed
    if syn.dp:
        private_use = planned_uses(cfg, {"synthetic": None}, len(req.records))["synthetic"]
        # The samples and the votes' noise must be unknown to whoever holds the config.
        generation_seed = mechanism_seed(cfg.privacy, seed, "dp-generation")
    # The judge filter's ratings are kept for the round's metrics (it is not asked twice).
    judge = RatedJudge.around(filter_judge(cfg))
    synthetic, stats = self_generate(
        generator,
        req.records,
        syn,
        cfg.data,
        generation_seed,
        judge,
        private_use,
    )
    synthetic_examples = tokenize_dataset(
        synthetic, bench.tokenizer, cfg.data.prompt_style, cfg.data.max_length
    )
    steps = cfg.train.local_steps
    # Every client reports the same metric keys (Flower aggregates only consistent replies).
    metrics: dict[str, int | float] = {
        **stats.to_metrics(),
        **quality_metrics(synthetic, judge),
        **(private_use.metrics("synthetic") if private_use else {}),
        "global_train_loss": 0.0,
        "train_s": 0.0,
    }
    # Closeness to the records is a function of them: it stays on the client's own disk.
    write_round(req.client_dir, "fedpit", req.round, synthetic, req.records)
    if synthetic_examples:
        trained = bench.fit(
            GLOBAL, synthetic_examples, steps, seed + 1, [GLOBAL], proximal_mu=req.proximal_mu
        )
        metrics.update(global_train_loss=trained.loss, train_s=trained.seconds)
    private_examples = req.examples
    if syn.private_data == "local+synthetic":
        private_examples = req.examples + synthetic_examples
    # `global` takes part in the private adapter's training, frozen.
    trained_private = bench.fit(PRIVATE, private_examples, steps, seed + 2, [GLOBAL, PRIVATE])
    metrics["train_loss"] = trained_private.loss
    metrics["train_s"] += trained_private.seconds
    new_global, new_private = bench.take(GLOBAL), bench.take(PRIVATE)
    req.store[PRIVATE] = new_private
    # The client's own disk keeps its private adapter as a stock PEFT folder.
    target = client_adapter_dir(req.client_dir, PRIVATE)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(bench.model, new_private, target, PRIVATE)
    return LocalReply(
        upload=mix_adapters(new_global, new_private, syn.beta),
        # Clients that kept no synthetic example send the global back unchanged, with the
        # smallest weight that keeps the average defined.
        weight=max(len(synthetic_examples), 1),
        metrics=metrics,
    )


def fedpit_evaluate(req: LocalRequest, eval_set: EvalSet) -> EvalResult:
    """Held-out metrics of what this client infers with: base + global + its private adapter."""
    private = req.store.get(PRIVATE, req.bench.initial_private)
    return req.bench.evaluate(req.global_state, eval_set, private=private, round_=req.round)


LOCAL_ROLES.register("fedpit")(
    LocalRole(train=fedpit_round, evaluate=fedpit_evaluate, needs_private_slot=True)
)


def check_fedpit(config: Config) -> None:
    """Refuse the settings FedPIT cannot run with."""
    if config.defence.dp == "server-fixed":
        raise ConfigError(
            "defence.dp = 'server-fixed' cannot run FedPIT: Flower's server-side clipping fails "
            "on a client that sends an unchanged global adapter (no synthetic data kept); use "
            "defence.dp = 'client-fixed'"
        )
    per_round, ratio = config.synthetic.per_round, config.federated.max_weight_ratio
    if config.defence.dp == "none" and per_round > ratio:
        raise ConfigError(
            f"FedPIT clients weigh their updates by the synthetic examples they keep (1 to "
            f"synthetic.per_round = {per_round}), but federated.max_weight_ratio = "
            f"{ratio:g} rejects a weight above that multiple of the median: "
            f"set max_weight_ratio to at least {per_round}"
        )


def fedpit_releases(config: Config) -> Releases:
    """The shared adapter learns from synthetic data prompted with real records; with beta < 1
    the upload also mixes in the private adapter, trained on real records."""
    releases: Releases = {
        "synthetic": None
        if config.synthetic.dp
        else "the shared global adapter trains on synthetic data whose generator was prompted "
        "with real records (synthetic.dp = false)"
    }
    # What the report needs from the clients, computed with the private adapter.
    releases["evaluation"] = (
        "each client sends its private adapter's training loss and its own held-out scores and "
        "generations (private adapter on, trained on its records without DP) to the server"
    )
    if config.synthetic.beta < 1.0:
        releases["adapter"] = (
            "the upload mixes in the private adapter (synthetic.beta < 1), trained on real records"
        )
    return {**releases, **central_releases(config)}


@register(
    "fedpit",
    "federated",
    "global adapter trained only on self-generated data and shared; private adapter on real data, "
    "never shared",
    processes=lambda _: (Process("fedpit client", "client", adapters=2, generates=True),),
    releases=fedpit_releases,
    shared_adapter=True,
    deployable=True,
    adapters=len((GLOBAL, PRIVATE)),
    # Clients weigh their uploads by the synthetic examples they keep: at most per_round.
    weight_bound=lambda config, _: float(config.synthetic.per_round),
    check=check_fedpit,
)
def run_fedpit(job: Job) -> AlgorithmResult:
    """Run FedPIT on Flower's Simulation Engine."""
    cfg, syn = job.config, job.config.synthetic
    if syn.dp:  # before any client starts: every client's generation must fit its budget
        for examples in job.client_examples:
            delta = record_delta(cfg.privacy.delta, len(examples))
            check_budget(syn, cfg.train.rounds, len(examples), delta, cfg.privacy.accountant)
    result = run_federated(job, "fedpit")
    result.notes += [
        "Headline metrics: the mean over clients of base + global + their own private adapter; "
        "global_* columns in metrics.jsonl: the shared global adapter alone.",
        f"Per round each client generates {syn.per_round} candidates, trains `global` on the kept "
        f"ones and `private` on {syn.private_data} data ({job.config.train.local_steps} steps "
        f"each); upload = {syn.beta} × global + {1 - syn.beta:g} × private.",
        generator_note(syn),
    ]
    return result
