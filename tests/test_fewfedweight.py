"""FewFedWeight: energy-weighted pseudo samples, adaptive client weights, and a run on Flower.

Self-generation is replaced by a fixed list of pseudo records (the real generator is tested in
test_synthetic.py and end to end in the slow test), so every tensor can be replayed exactly.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from silotune.algorithms import ALGORITHMS, fewfedweight
from silotune.algorithms.fewfedweight import (
    client_weight,
    energy_weights,
    response_scores,
    weighted_multiset,
)
from silotune.config import Config, load_config
from silotune.data.load import as_records, load_records
from silotune.data.sft import IGNORE_INDEX, tokenize_dataset
from silotune.data.synthetic import SyntheticStats
from silotune.errors import ConfigError
from silotune.federated.local import LocalRequest
from silotune.modeling.adapters import GLOBAL, StateDict
from silotune.modeling.load import resolve_model
from silotune.runner import plan_experiment, run_experiment
from silotune.seeds import derive_seed
from silotune.training.loop import Examples
from silotune.training.workbench import Workbench

from .conftest import CONFIGS
from .test_hostile_federated import _fresh, _reply

PSEUDO = [
    {"instruction": f"What is pseudo condition {i} ?", "input": "", "output": f"It is made up {i}."}
    for i in range(6)
]


@pytest.fixture
def fake_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    def generate(*args: object, **kwargs: object) -> tuple[list[dict[str, str]], SyntheticStats]:
        return [dict(r) for r in PSEUDO], SyntheticStats(generated=8, kept=len(PSEUDO))

    monkeypatch.setattr(fewfedweight, "self_generate", generate)


def _config(*overrides: str) -> Config:
    return load_config(
        CONFIGS / "tiny.toml", ["experiment.algorithms=['fewfedweight']", *overrides]
    )


def _examples(bench: Workbench, records: list[dict[str, str]], config: Config) -> Examples:
    return tokenize_dataset(records, bench.tokenizer, "alpaca", config.data.max_length)


def test_lower_energy_weighs_more_and_the_mean_weight_is_one() -> None:
    weights = energy_weights([-3.0, -2.0, -1.0], temperature=1.0)
    assert weights[0] > weights[1] > weights[2]
    assert sum(weights) == pytest.approx(3.0)
    assert weights[0] / weights[1] == pytest.approx(math.e)
    flatter = energy_weights([-3.0, -2.0, -1.0], temperature=10.0)
    assert weights[0] > flatter[0] > flatter[2] > weights[2]
    assert energy_weights([5.0, 5.0], temperature=1.0) == pytest.approx([1.0, 1.0])


def test_weights_share_out_the_training_slots() -> None:
    a, b, c = ([1], [1]), ([2], [2]), ([3], [3])
    assert weighted_multiset([a, b], [1.0, 1.0], copies=3) == [a, a, a, b, b, b]
    assert weighted_multiset([a, b], [1.0, 3.0], copies=2) == [a, b, b, b]
    # A heavily down-weighted sample gets no slot; the slots always add up.
    out = weighted_multiset([a, b, c], [1.0, 1.0, 0.01], copies=2)
    assert len(out) == 6 and c not in out


def test_energy_is_the_mean_free_energy_of_the_response_tokens(tiny_bench: Workbench) -> None:
    bench, config = tiny_bench, load_config(CONFIGS / "tiny.toml")
    bench.put(GLOBAL, bench.initial)
    bench.use([GLOBAL])
    examples = _examples(
        bench, [*PSEUDO[:1], {**PSEUDO[1], "output": "A much longer answer."}], config
    )
    batched = response_scores(bench.model, examples, bench.pad_id, 2.0, batch_size=2)
    for (ids, labels), score in zip(examples, batched, strict=True):
        with torch.no_grad():
            logits = bench.model(input_ids=torch.tensor([ids])).logits[0, :-1]  # (t-1, vocab)
        response = torch.tensor(labels[1:]) != IGNORE_INDEX
        energy = -2.0 * torch.logsumexp(logits[response] / 2.0, dim=-1)
        assert score.tokens == int(response.sum())
        # Right padding in a batch changes nothing.
        assert score.energy == pytest.approx(float(energy.mean()), rel=1e-5)
        nll = torch.nn.functional.cross_entropy(
            logits[response], torch.tensor(labels[1:])[response]
        )
        assert score.loss_sum / score.tokens == pytest.approx(float(nll), rel=1e-5)


@pytest.mark.usefixtures("fake_generator")
def test_a_round_trains_on_energy_weighted_pseudo_data(tmp_path: Path) -> None:
    config = _config()
    bench = Workbench(resolve_model(config.model), config)
    rows = as_records(load_records(config.data).dataset)[:10]
    examples = _examples(bench, rows, config)

    def round_(cfg: Config) -> tuple[StateDict, dict[str, float], int]:
        req = LocalRequest(bench, cfg, 0, 1, bench.initial, {}, rows, examples, tmp_path)
        reply = fewfedweight.fewfedweight_round(req)
        return reply.upload, {k: float(v) for k, v in reply.metrics.items()}, reply.weight

    upload, metrics, weight = round_(config)
    # Replay: the received global model scores the pseudo samples, then trains on the slots.
    pseudo = _examples(bench, PSEUDO, config)
    bench.put(GLOBAL, bench.initial)
    bench.use([GLOBAL])
    scores = response_scores(bench.model, pseudo, bench.pad_id, 1.0, config.eval.batch_size)
    weights = energy_weights([s.energy for s in scores], 1.0)
    assert metrics["pseudo_weight_max"] == pytest.approx(max(weights)) and max(weights) > 1.0
    slots = weighted_multiset(examples + pseudo, [1.0] * len(examples) + weights, 4)
    seed = derive_seed(config.experiment.seed, "fewfedweight", 0, 1) + 1
    replay, _ = bench.train(bench.initial, slots, config.train.local_steps, seed)
    assert all(torch.allclose(upload[k], replay[k]) for k in replay)
    # The upload weighs exp(p / t) with p the likelihood of the client's own records.
    own = response_scores(bench.model, examples, bench.pad_id, 1.0, config.eval.batch_size)
    loss = sum(s.loss_sum for s in own) / sum(s.tokens for s in own)
    assert metrics["records_loss"] == pytest.approx(loss, rel=1e-5)
    assert weight == client_weight(loss, 0.5) == metrics["client_weight"]
    # Without energy weighting the same round trains on a different set.
    plain, plain_metrics, _ = round_(_config("fewfedweight.sample_weighting='none'"))
    assert plain_metrics["pseudo_weight_max"] == 1.0
    assert any(not torch.equal(plain[k], upload[k]) for k in upload)
    _, _, equal = round_(_config("fewfedweight.client_weighting='equal'"))
    assert equal == 1


@pytest.mark.usefixtures("flower_task")
def test_adaptive_client_weights_pull_the_average_to_the_better_client() -> None:
    good, poor = client_weight(0.2, 0.5), client_weight(2.0, 0.5)
    assert good > poor
    strategy = _fresh()
    aggregated, _ = strategy.aggregate_train(1, [_reply(0, 0.0, good), _reply(1, 1.0, poor)])
    assert aggregated is not None
    # FedAvg's weight / sum of weights: a softmax over the clients' p = exp(-loss), at t = 0.5.
    p = np.exp(-np.array([0.2, 2.0])) / 0.5
    softmax = np.exp(p) / np.exp(p).sum()
    np.testing.assert_allclose(aggregated["w"].numpy(), softmax[1], rtol=1e-3)
    assert softmax[1] < 0.5
    # No upload can outweigh another by more than exp(1 / t).
    assert client_weight(0.0, 0.5) / client_weight(1e9, 0.5) == pytest.approx(math.e**2, rel=1e-3)


def test_settings_fewfedweight_cannot_run_are_refused() -> None:
    with pytest.raises(ConfigError, match="dp-sgd"):
        _config('privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0")
    with pytest.raises(ConfigError, match="client_weighting = 'equal'"):
        _config('defence.dp="client-fixed"', "defence.dp_noise_multiplier=0.5")
    with pytest.raises(ConfigError, match=r"max_weight_ratio to at least 7\.39"):
        _config("federated.max_weight_ratio=5")
    _config("fewfedweight.client_weighting='equal'", "federated.max_weight_ratio=5")
    with pytest.raises(ConfigError, match=r"fewfedweight\.copies must be >= 1"):
        _config("fewfedweight.copies=0")


def test_what_leaves_a_client_has_no_guarantee() -> None:
    releases = ALGORITHMS.get("fewfedweight").releases(_config())
    assert set(releases) == {"adapter", "synthetic"}
    assert all(releases.values())


@pytest.mark.slow
def test_fewfedweight_end_to_end_on_flower(tmp_path: Path) -> None:
    """Two real rounds on the Simulation Engine with real pseudo data on the tiny model."""
    config = _config(
        "train.rounds=2",
        "eval.generate=false",
        "synthetic.per_round=4",
        "synthetic.truncated='keep'",
    )
    out = run_experiment(plan_experiment(config, tmp_path / "run"), Console(file=io.StringIO()))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "fewfedweight"
    assert summary["synthetic"]["generated"] == 2 * 3 * 4
    privacy = summary["privacy"]
    for client in ("0", "1", "2"):
        ledger = privacy["clients"][client]
        assert ledger["epsilon"] == privacy["infinity"]
        assert set(ledger["mechanisms"]) == {"adapter", "synthetic"}
        assert not any(m["guarantee"] for m in ledger["mechanisms"].values())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = [c["client_weight"] for r in rows for c in r["clients"]]
    assert len(weights) == 2 * 3
    assert all(1000 <= w <= client_weight(0.0, 0.5) for w in weights)
    assert "Privacy ledger" in (out / "report.md").read_text()
