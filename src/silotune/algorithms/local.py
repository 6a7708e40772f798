"""Non-federated references: LocIT (+SA: self-augmented), each client alone; CenIT, data pooled."""

from __future__ import annotations

import time
from pathlib import Path

from silotune import progress
from silotune.data.generators import generator_for
from silotune.data.load import as_records
from silotune.data.sft import tokenize_dataset
from silotune.data.synthetic import Record, SyntheticStats, self_generate
from silotune.data.synthetic_quality import RatedJudge, quality_metrics, write_round
from silotune.evaluation.evaluator import EvalResult
from silotune.evaluation.intervals import mean_over_models
from silotune.evaluation.judge import filter_judge
from silotune.jobs import (
    AlgorithmResult,
    Job,
    RoundLog,
    mean_metrics,
    register,
)
from silotune.modeling.adapters import GLOBAL, StateDict
from silotune.modeling.memory import Process
from silotune.privacy import budget
from silotune.privacy.accounting import POOLED, dp_sgd_release
from silotune.run_folder import client_name
from silotune.seeds import derive_seed
from silotune.training.loop import Examples


@register(
    "locit",
    "local",
    "each client tunes alone on its own data; no communication",
    processes=lambda _: (Process("runner", "runner"),),
    releases=lambda config: {
        "adapter": dp_sgd_release(config, "each client's own adapter (adapters/client-N)")
    },
)
def run_locit(job: Job) -> AlgorithmResult:
    """Every client trains `local_steps` per round on its own data, as it would in FedIT."""
    return _run_alone(job, self_augment=False)


@register(
    "locit-sa",
    "local",
    "each client tunes alone on its own data plus data it self-generates (no communication)",
    processes=lambda _: (Process("runner", "runner", generates=True),),
    releases=lambda _: {
        "adapter": "each client's own adapter trains on synthetic data whose generator was "
        "prompted with its real records"
    },
)
def run_locit_sa(job: Job) -> AlgorithmResult:
    """LocIT with FedPIT's self-augmentation: each round, generate with the client's own model."""
    result = _run_alone(job, self_augment=True)
    if job.config.synthetic.dp:
        result.notes.append(
            "synthetic.dp does not apply here: a LocIT+SA client generates without DP, as "
            "nothing it generates or trains leaves it."
        )
    return result


def _run_alone(job: Job, self_augment: bool) -> AlgorithmResult:
    cfg, bench = job.config, job.workbench
    states = [bench.initial for _ in job.client_examples]
    records = [as_records(part) for part in job.split.clients]
    synthetic_total = SyntheticStats()
    rounds: list[RoundLog] = []
    last_results: list[EvalResult] = []
    stores: list[dict[str, StateDict]] = [{} for _ in job.client_examples]  # DP spent, per client
    for rnd in range(1, cfg.train.rounds + 1):
        start = time.perf_counter()
        clients: list[dict[str, object]] = []
        evals, losses = [], []
        for cid, examples in enumerate(job.client_examples):
            with progress.reporting(job.run.root / progress.PROGRESS_DIR, f"client {cid}"):
                seed = derive_seed(cfg.experiment.seed, "client", cid, rnd)
                try:
                    budget.check_round(cfg, stores[cid], len(examples))
                except budget.BudgetSpent:  # it trains no more: its model stays as it is
                    result = (
                        last_results[cid]
                        if last_results
                        else bench.evaluate(states[cid], job.eval_set, round_=rnd)
                    )
                    evals.append(result)
                    clients.append({"client": cid, budget.DECLINED: 1, **result.metrics()})
                    continue
                extra: dict[str, object] = {}
                if self_augment:
                    client_dir = job.run.clients / client_name(cid)
                    synthetic, stats, extra = _self_generate(
                        job, states[cid], records[cid], seed, client_dir, rnd
                    )
                    examples = examples + synthetic
                    synthetic_total.add(stats)
                states[cid], trained = bench.train(
                    states[cid], examples, cfg.train.local_steps, seed
                )
                if trained.privacy is not None:
                    budget.record(stores[cid], trained.privacy)
                    extra.update(trained.privacy.metrics("adapter"))
                result = bench.evaluate(states[cid], job.eval_set, round_=rnd)
                evals.append(result)
                losses.append(trained.loss)
                clients.append(
                    {
                        "client": cid,
                        "train_loss": trained.loss,
                        "train_s": trained.seconds,
                        **result.metrics(),
                        **extra,
                    }
                )
        last_results = evals
        log = RoundLog(
            round=rnd,
            metrics=mean_metrics([e.metrics() for e in evals]),
            train_loss=sum(losses) / len(losses) if losses else float("nan"),
            wall_s=time.perf_counter() - start,
            clients=clients,
        )
        rounds.append(log)
        job.on_round(log)
    return AlgorithmResult(
        rounds=rounds,
        adapters={f"client-{cid}": s for cid, s in enumerate(states)},
        per_client_final=[e.metrics() for e in last_results],
        samples=last_results[0].samples,
        synthetic=synthetic_total if self_augment else None,
        final_predictions=[e.predictions for e in last_results],
        # The headline is the mean over the clients' models: so is each record's score.
        final_per_record=mean_over_models([e.per_record for e in last_results]),
        notes=["Metrics are the mean over the clients' own models; per-client values follow."],
    )


def _self_generate(
    job: Job, state: StateDict, records: list[Record], seed: int, client_dir: Path, rnd: int
) -> tuple[Examples, SyntheticStats, dict[str, object]]:
    """Self-generate with the client's current model (base + its adapter): tokenised, counted,
    and the round's metrics; what was kept goes to `client_dir`."""
    cfg, bench = job.config, job.workbench
    bench.put(GLOBAL, state)
    generator = generator_for(cfg.synthetic, bench, [GLOBAL])
    judge = RatedJudge.around(filter_judge(cfg))
    kept, stats = self_generate(generator, records, cfg.synthetic, cfg.data, seed, judge)
    examples = tokenize_dataset(kept, bench.tokenizer, cfg.data.prompt_style, cfg.data.max_length)
    # Closeness to the records is a function of them: it stays on the client's own disk.
    write_round(client_dir, "locit-sa", rnd, kept, records)
    return examples, stats, {**stats.to_metrics(), **quality_metrics(kept, judge)}


@register(
    "cenit",
    "centralized",
    "one model tuned on all clients' data pooled; the ceiling",
    processes=lambda _: (Process("runner", "runner"),),
    releases=lambda _: {"records": POOLED},
    shared_adapter=True,
)
def run_cenit(job: Job) -> AlgorithmResult:
    """Train on the pooled data with the same total number of steps as all clients in FedIT."""
    cfg, bench = job.config, job.workbench
    pooled = [ex for examples in job.client_examples for ex in examples]
    steps = cfg.train.local_steps * len(job.client_examples)
    # Centralizing means uploading the raw records: count their text as the traffic it costs.
    raw_bytes = sum(
        len((r["instruction"] + r["input"] + r["output"]).encode()) for r in job.split.pooled()
    )
    state = bench.initial
    rounds: list[RoundLog] = []
    result = None
    for rnd in range(1, cfg.train.rounds + 1):
        start = time.perf_counter()
        seed = derive_seed(cfg.experiment.seed, "pooled", rnd)
        state, trained = bench.train(state, pooled, steps, seed)
        result = bench.evaluate(state, job.eval_set, round_=rnd)
        log = RoundLog(
            round=rnd,
            metrics=result.metrics(),
            train_loss=trained.loss,
            bytes_up=raw_bytes if rnd == 1 else 0,
            wall_s=time.perf_counter() - start,
        )
        rounds.append(log)
        job.on_round(log)
    assert result is not None
    return AlgorithmResult(
        rounds=rounds,
        adapters={"global": state},
        samples=result.samples,
        final_predictions=[result.predictions],
        final_per_record=result.per_record,
        notes=[
            f"{steps} steps per round on {len(pooled)} pooled records (the same total as all "
            "clients in a federated round); bytes_up is the raw text uploaded once."
        ],
    )
