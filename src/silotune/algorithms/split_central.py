"""`split-central`: the split model trained in one place on the pooled data — split's reference.

The same segments with the same adapters (LoRA or p-tuning v2) and the same number of steps as
the split server takes, without the wire: what split learning would reach if privacy did not
stop the data from being pooled. Split learning computes the same gradients (see the tests), so
any gap comes from the data being spread over clients, not from the split.
"""

from __future__ import annotations

import time

from silotune.algorithms.split import check_split_adapters
from silotune.evaluation.evaluator import evaluate, generates
from silotune.jobs import AlgorithmResult, Job, RoundLog, register
from silotune.modeling.adapters import GLOBAL
from silotune.modeling.generation import pad_id
from silotune.modeling.memory import Process
from silotune.privacy.accounting import POOLED
from silotune.seeds import derive_seed
from silotune.split.adapters import add_segment_adapter, build_split_model, whole_model_adapter
from silotune.split.loading import load_segments
from silotune.split.trainers import adapter_state
from silotune.training.loop import train_steps


@register(
    "split-central",
    "centralized",
    "the split model with the same adapters trained on the pooled data, no wire; split's reference",
    # A second copy of the model in the runner's process.
    processes=lambda _: (Process("split-central", "resident"),),
    releases=lambda _: {"records": POOLED},
    check=check_split_adapters,
)
def run_split_central(job: Job) -> AlgorithmResult:
    """Train front, middle and back together on the pooled data, as many steps as split takes."""
    cfg = job.config
    tokenizer = job.workbench.tokenizer
    segments = load_segments(cfg)
    add_segment_adapter(segments.middle, cfg, "middle")
    model = build_split_model(cfg, segments, segments.middle)
    pooled = [ex for examples in job.client_examples for ex in examples]
    steps = cfg.train.local_steps * len(job.client_examples)
    rounds: list[RoundLog] = []
    result = None
    for rnd in range(1, cfg.train.rounds + 1):
        start = time.perf_counter()
        seed = derive_seed(cfg.experiment.seed, "split-central", rnd)
        trained = train_steps(model, pooled, cfg.train, steps, pad_id(tokenizer), seed)
        now = generates(cfg.eval, rnd, cfg.train.rounds)
        result = evaluate(model, tokenizer, job.eval_set, cfg.eval, generate_now=now)
        log = RoundLog(
            round=rnd,
            metrics=result.metrics(),
            train_loss=trained.loss,
            wall_s=time.perf_counter() - start,
        )
        rounds.append(log)
        job.on_round(log)
    assert result is not None
    state, adapter_config = whole_model_adapter(cfg, model.back.config, adapter_state(model))
    return AlgorithmResult(
        rounds=rounds,
        adapters={GLOBAL: state},
        adapter_config=adapter_config,
        samples=result.samples,
        final_predictions=[result.predictions],
        final_per_record=result.per_record,
        notes=[
            f"The split model ({cfg.split.adapter} adapters on every segment) trained in one "
            f"process: {steps} steps per round on {len(pooled)} pooled records, as many as all "
            "split clients take together in a round. adapters/global: the trained segments as "
            "one PEFT adapter of the base model."
        ],
    )
