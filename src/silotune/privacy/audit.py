"""The canary audit of a run: secret records put into one client's data before the split is
written, and after each algorithm an empirical ε lower bound from how its released model scores
them (see `silotune.privacy.canaries` for the bound).

The canaries, and which of them went in, live in `partitions/canaries.json` (owner-only, like
the partitions: the included ones are training records). A resumed run reads them back, so it
trains on the same split and its audit scores the same canaries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from silotune.attacks.membership import example_losses
from silotune.config import Config
from silotune.config_sections import DataConfig
from silotune.data.partition import Partitions
from silotune.data.private import write_private
from silotune.data.sft import tokenize_dataset
from silotune.errors import UserError
from silotune.jobs import AlgorithmResult, AlgorithmSpec
from silotune.modeling.adapters import GLOBAL, StateDict
from silotune.privacy.canaries import (
    canary_score,
    choose_included,
    epsilon_lower_bound,
    guess,
    make_canaries,
)
from silotune.privacy.ledger import record_delta
from silotune.run_folder import canaries_file, client_name
from silotune.training.workbench import Workbench

CONFIDENCE = 0.95
# The label a canary carries in data with a label column: the client's label mix shows them.
CANARY_LABEL = "canary"


@dataclass(frozen=True)
class Canaries:
    """The audit's secret records, which of them client `client` trains on, and where from."""

    client: int
    records: tuple[dict[str, str], ...]
    included: tuple[bool, ...]

    def inserted(self) -> list[dict[str, str]]:
        """The canaries that are part of the client's training data."""
        return [r for r, x in zip(self.records, self.included, strict=True) if x]

    def to_json(self) -> dict[str, Any]:
        """What canaries.json holds."""
        return {"client": self.client, "records": list(self.records), "included": self.included}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Canaries:
        """The inverse of `to_json`."""
        return cls(int(data["client"]), tuple(data["records"]), tuple(data["included"]))


def canary_fields(data: DataConfig) -> tuple[str, ...]:
    """The record fields a canary fills: instruction and output, and input where the data has
    one (a canary looks like the data's records)."""
    return ("instruction", "input", "output") if data.input_field else ("instruction", "output")


def draw_canaries(config: Config) -> Canaries:
    """`privacy.canaries` fresh canaries for `privacy.audit_client`, each in with probability
    1/2; the same for the same `experiment.seed`."""
    privacy, seed = config.privacy, config.experiment.seed
    drawn = make_canaries(privacy.canaries, seed, canary_fields(config.data))
    records = tuple({"instruction": "", "input": "", **r} for r in drawn)
    return Canaries(privacy.audit_client, records, tuple(choose_included(len(records), seed)))


def prepare_canaries(config: Config, partitions: Path, resuming: bool) -> Canaries:
    """A resumed run's canaries as it saved them (drawn afresh if it stopped before saving)."""
    file = canaries_file(partitions)
    if not (resuming and file.is_file()):
        return draw_canaries(config)
    canaries = Canaries.from_json(json.loads(file.read_text(encoding="utf-8")))
    privacy = config.privacy
    if canaries.client != privacy.audit_client or len(canaries.records) != privacy.canaries:
        raise UserError(
            f"cannot resume: {file} holds {len(canaries.records)} canaries for client "
            f"{canaries.client}, the config asks for {privacy.canaries} for client "
            f"{privacy.audit_client}"
        )
    return canaries


def save_canaries(partitions: Path, canaries: Canaries) -> None:
    """Write canaries.json beside the partitions, owner-only like them."""
    data = json.dumps(canaries.to_json(), ensure_ascii=False, indent=1).encode("utf-8")
    write_private(canaries_file(partitions), data)


def insert_canaries(split: Partitions, canaries: Canaries) -> Partitions:
    """The split with the included canaries appended to their client's records."""
    part = split.clients[canaries.client]
    columns: dict[str, list[str]] = {c: [] for c in part.column_names}
    for record in canaries.inserted():
        for column, values in columns.items():
            values.append(CANARY_LABEL if column == "label" else record.get(column, ""))
    added = datasets.Dataset.from_dict(columns, features=part.features)
    clients = list(split.clients)
    clients[canaries.client] = datasets.concatenate_datasets([part, added])
    return Partitions(eval=split.eval, clients=clients, client_evals=split.client_evals)


def released_state(spec: AlgorithmSpec, result: AlgorithmResult, client: int) -> StateDict | str:
    """The adapter of `result` that carries `client`'s records out, or why it is not audited."""
    if result.adapter_config is not None and result.adapter_config.get("peft_type") != "LORA":
        # A split model with prefixes: not a LoRA the run's own slots can load.
        return f"not audited yet: {spec.name} releases {result.adapter_config.get('peft_type')}"
    # A split model with LoRA is a whole-model PEFT adapter of the run's own [lora] layout.
    pooled = spec.shared_adapter or set(result.adapters) == {GLOBAL}  # everyone's records
    name = GLOBAL if pooled else client_name(client)
    if name not in result.adapters:
        return f"not audited yet: {spec.name} keeps no adapter {name!r}"
    return result.adapters[name]


def audit_canaries(
    bench: Workbench,
    state: StateDict,
    canaries: Canaries,
    config: Config,
    records: int,
) -> dict[str, Any]:
    """Score every canary under base + `state` against the base model and turn the guesses
    into an ε lower bound at δ of a client with `records` records."""
    data, privacy = config.data, config.privacy
    examples = _encode(canaries.records, bench.tokenizer, data)
    bench.put(GLOBAL, state)
    bench.use([GLOBAL])
    batch = config.eval.batch_size
    tuned = example_losses(bench.model, examples, bench.pad_id, batch)
    with bench.model.disable_adapter():
        base = example_losses(bench.model, examples, bench.pad_id, batch)
    scores = [canary_score(t, b) for t, b in zip(tuned, base, strict=True)]
    m = len(scores)
    guesses = privacy.audit_guesses or m
    calls = guess(scores, canaries.included, guesses)
    assert calls.correct is not None  # membership was given
    delta = record_delta(privacy.delta, records)
    return {
        "client": canaries.client,
        "canaries": m,
        "included": sum(canaries.included),
        "guesses": calls.made,
        "correct": calls.correct,
        "epsilon_lower_bound": epsilon_lower_bound(m, calls.made, calls.correct, delta, CONFIDENCE),
        "confidence": CONFIDENCE,
        "delta": delta,
        "mean_score": {
            "included": _mean(s for s, x in zip(scores, canaries.included, strict=True) if x),
            "excluded": _mean(s for s, x in zip(scores, canaries.included, strict=True) if not x),
        },
    }


def audit_result(
    spec: AlgorithmSpec,
    result: AlgorithmResult,
    bench: Workbench,
    canaries: Canaries,
    config: Config,
    records: int,
) -> dict[str, Any]:
    """summary.json's "audit" of a finished algorithm (`records`: the audited client's count,
    canaries included), or why its model is not audited."""
    state = released_state(spec, result, canaries.client)
    if isinstance(state, str):
        return {
            "client": canaries.client,
            "canaries": len(canaries.records),
            "included": sum(canaries.included),
            "not_audited": state,
        }
    return audit_canaries(bench, state, canaries, config, records)


def describe_audit(audit: dict[str, Any]) -> str:
    """One line of progress output for an audit result."""
    if "not_audited" in audit:
        return f"canary audit: {audit['not_audited']}"
    return (
        f"canary audit: empirical ε ≥ {audit['epsilon_lower_bound']:.3g} "
        f"({audit['correct']} of {audit['guesses']} guesses right)"
    )


def _encode(
    records: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase, data: DataConfig
) -> list[tuple[list[int], list[int]]]:
    return tokenize_dataset(records, tokenizer, data.prompt_style, data.max_length)


def _mean(values: Any) -> float | None:
    chosen = list(values)
    return round(sum(chosen) / len(chosen), 4) if chosen else None
