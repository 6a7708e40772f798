"""Every final model on every client's own held-out records (partition.client_eval_size).

The global held-out set says how a model does on the federation's data as a whole; a client
cares about its own distribution. Each client's held-out records come from its own partition,
so the model each client ends with (the shared one, its LocIT model, FedPIT's global + its
private adapter) is scored on every client's held-out set: the diagonal is what each client
gets; the rest says how far a local model has specialised.
"""

from __future__ import annotations

from typing import Any

from silotune.evaluation.evaluator import EvalResult, EvalSet, evaluate
from silotune.evaluation.intervals import LOSS, TOKENS, PerRecord
from silotune.jobs import AlgorithmResult, AlgorithmSpec
from silotune.modeling.adapters import GLOBAL, PRIVATE, StateDict, load_adapter_state
from silotune.run_folder import RunFolder, client_adapter_dir, client_name
from silotune.training.workbench import Workbench

# A client's final model: the adapter in the global slot, and a private one on top (or None).
ClientModel = tuple[StateDict, StateDict | None]


def client_models(
    spec: AlgorithmSpec, result: AlgorithmResult, work: RunFolder, clients: int
) -> list[ClientModel] | str:
    """The model each client ends with, or why the run's models cannot be scored here."""
    if result.adapter_config is not None and result.adapter_config.get("peft_type") != "LORA":
        return f"{spec.name} ends with {result.adapter_config.get('peft_type')} adapters"
    if all(client_name(c) in result.adapters for c in range(clients)):
        return [(result.adapters[client_name(c)], None) for c in range(clients)]
    if GLOBAL not in result.adapters:
        return f"{spec.name} keeps neither a shared adapter nor one per client"
    shared = result.adapters[GLOBAL]
    if spec.adapters == 1:
        return [(shared, None)] * clients
    privates = [client_adapter_dir(work.clients / client_name(c), PRIVATE) for c in range(clients)]
    if missing := [p for p in privates if not p.is_dir()]:
        return f"{spec.name}: no private adapter at {missing[0]}"
    return [(shared, load_adapter_state(p)) for p in privates]


def score_clients(
    bench: Workbench, models: list[ClientModel], eval_sets: list[EvalSet]
) -> dict[str, Any]:
    """summary.json's "per_client_eval": the held-out loss of client c's model on client d's
    records (`matrix[c][d]`), and each client's model on its own records, pooled (`own`)."""
    if any(private is not None for _, private in models):
        bench.add_private()
    cache: dict[tuple[int, int, int], EvalResult] = {}  # a shared model is scored once per set
    matrix: list[list[EvalResult]] = []
    for state, private in models:
        row = []
        for d, eval_set in enumerate(eval_sets):
            key = (id(state), id(private), d)
            if key not in cache:
                cache[key] = bench.evaluate(state, eval_set, private=private, generate=False)
            row.append(cache[key])
        matrix.append(row)
    own: PerRecord = {LOSS: [], TOKENS: []}
    for c, row in enumerate(matrix):
        own[LOSS] += row[c].per_record[LOSS]
        own[TOKENS] += row[c].per_record[TOKENS]
    n = len(matrix)
    off = [matrix[c][d].eval_loss for c in range(n) for d in range(n) if c != d]
    return {
        "records": [len(s.examples) for s in eval_sets],
        "matrix": [[r.eval_loss for r in row] for row in matrix],
        "own": {"eval_loss": pooled_loss(own)},
        # Mean loss of a client's model on its own records and on the other clients' records.
        "own_mean": sum(matrix[c][c].eval_loss for c in range(n)) / n,
        "others_mean": sum(off) / len(off) if off else None,
        "own_per_record": own,
    }


def base_on_clients(bench: Workbench, eval_sets: list[EvalSet]) -> PerRecord:
    """The base model's per-record scores on every client's held-out records, pooled."""
    pooled: PerRecord = {LOSS: [], TOKENS: []}
    with bench.model.disable_adapter():
        for eval_set in eval_sets:
            found = evaluate(bench.model, bench.tokenizer, eval_set, bench.config.eval, 0, False)
            pooled[LOSS] += found.per_record[LOSS]
            pooled[TOKENS] += found.per_record[TOKENS]
    return pooled


def pooled_loss(scores: PerRecord) -> float:
    """The token-weighted loss of pooled per-record scores."""
    return sum(scores[LOSS]) / max(sum(scores[TOKENS]), 1.0)
