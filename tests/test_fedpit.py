"""FedPIT parameter isolation, driven through the real ClientApp in-process.

Self-generation is replaced by a fixed list of synthetic records (the real generator is tested in
test_synthetic.py and end to end in the slow test), so every tensor can be replayed exactly.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from rich.console import Console

from silotune.algorithms import fedpit
from silotune.config import Config, load_config
from silotune.data.load import as_records, load_records
from silotune.data.sft import tokenize_dataset
from silotune.data.synthetic import SyntheticStats
from silotune.federated.client_app import ClientSpec, make_client_app, partition_file
from silotune.federated.local import LocalRequest
from silotune.federated.metering import (
    ARRAYS,
)
from silotune.modeling.adapters import GLOBAL, PRIVATE, StateDict
from silotune.modeling.load import resolve_model
from silotune.records import adapter_to_record, load_store, record_to_adapter
from silotune.runner import plan_experiment, run_experiment
from silotune.seeds import derive_seed
from silotune.training.workbench import Workbench

from .conftest import CONFIGS

SYNTHETIC = [
    {
        "instruction": f"What is synthetic condition {i} ?",
        "input": "",
        "output": f"It is made up {i}.",
    }
    for i in range(6)
]


@pytest.fixture
def fake_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    def generate(*args: object, **kwargs: object) -> tuple[list[dict[str, str]], SyntheticStats]:
        return [dict(r) for r in SYNTHETIC], SyntheticStats(generated=8, kept=len(SYNTHETIC))

    monkeypatch.setattr(fedpit, "self_generate", generate)


def _config(*overrides: str) -> Config:
    return load_config(CONFIGS / "tiny.toml", ["experiment.algorithms=['fedpit']", *overrides])


def _spec(config: Config, tmp_path: Path) -> ClientSpec:
    parts = tmp_path / "partitions"
    parts.mkdir(parents=True, exist_ok=True)
    records = load_records(config.data).dataset
    records.select(range(12)).to_json(str(partition_file(parts, 0)), lines=True)
    records.select(range(12, 16)).to_json(str(parts / "eval.jsonl"), lines=True)
    source = resolve_model(config.model)
    return ClientSpec(config, source, str(parts), "fedpit", str(tmp_path / "clients"))


def _message(kind: str, state: StateDict, server_round: int) -> Message:
    config = ConfigRecord({"server-round": server_round})
    content = RecordDict({ARRAYS: adapter_to_record(state), "config": config})
    return Message(content=content, dst_node_id=1, message_type=kind)


def _context() -> Context:
    return Context(
        run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )


def _tensors(message: Message) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, record in message.content.array_records.items():
        out.update({f"{name}/{k}": v for k, v in record_to_adapter(record).items()})
    return out


@pytest.mark.usefixtures("flower_task", "fake_generator")
def test_private_never_leaves_the_client_and_survives_rounds(tmp_path: Path) -> None:
    config = _config()
    spec = _spec(config, tmp_path)
    app = make_client_app(spec)
    bench = Workbench(spec.source, config, private=True)
    context = _context()
    global_state = bench.initial
    privates: list[StateDict] = []
    for server_round in (1, 2):
        reply = app(_message("train", global_state, server_round), context)
        private = load_store(context.state)[PRIVATE]
        privates.append(private)
        sent = _tensors(reply)
        assert set(sent) == {f"{ARRAYS}/{k}" for k in bench.initial}, "only global keys go out"
        assert not any("private" in key for key in sent)
        for value in sent.values():
            for key, secret in private.items():
                same = value.shape == secret.shape and torch.allclose(value, secret)
                assert not same, f"a private tensor ({key}) was sent"
        evaluated = app(
            _message("evaluate", record_to_adapter(reply.content[ARRAYS]), server_round), context
        )
        assert set(evaluated.content.array_records) == set(), "evaluation replies carry no tensors"
        # The aggregated global that comes back does not touch the private adapter.
        assert all(
            torch.equal(load_store(context.state)[PRIVATE][k], v) for k, v in private.items()
        )
        global_state = record_to_adapter(reply.content[ARRAYS])
    assert any(not torch.equal(privates[0][k], privates[1][k]) for k in privates[0])
    saved = tmp_path / "clients" / "client-0" / "adapters" / PRIVATE / "adapter_config.json"
    assert saved.is_file(), "the client keeps its private adapter on its own disk"


@pytest.mark.usefixtures("fake_generator")
def test_global_learns_only_from_synthetic_data(tmp_path: Path) -> None:
    config = _config()
    bench = Workbench(resolve_model(config.model), config, private=True)
    local = load_records(config.data).dataset

    def run(records: list[dict[str, str]]) -> tuple[StateDict, StateDict]:
        examples = tokenize_dataset(records, bench.tokenizer, "alpaca", config.data.max_length)
        req = LocalRequest(
            bench=bench,
            config=config,
            client=0,
            round=1,
            global_state=bench.initial,
            store={},
            records=records,
            examples=examples,
            client_dir=tmp_path,
        )
        reply = fedpit.fedpit_round(req)
        return reply.upload, req.store[PRIVATE]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fedpit, "save_adapter", lambda *a, **k: None)
        rows = as_records(local)
        global_a, private_a = run(rows[:10])
        global_b, private_b = run(rows[10:20])
    # Different real data, same synthetic data: the shared adapter is identical...
    assert all(torch.equal(global_a[k], global_b[k]) for k in global_a)
    # ...and equals training the received global on the synthetic records alone.
    synthetic = tokenize_dataset(SYNTHETIC, bench.tokenizer, "alpaca", config.data.max_length)
    seed = derive_seed(config.experiment.seed, "fedpit", 0, 1) + 1
    replay, _ = bench.train(bench.initial, synthetic, config.train.local_steps, seed)
    assert all(torch.allclose(global_a[k], replay[k]) for k in replay)
    # The private adapters did learn from the real data.
    assert any(not torch.equal(private_a[k], private_b[k]) for k in private_a)


@pytest.mark.usefixtures("flower_task", "fake_generator")
def test_beta_mixes_global_and_private(tmp_path: Path) -> None:
    config = _config("synthetic.beta=0.25")
    spec = _spec(config, tmp_path)
    context = _context()
    reply = make_client_app(spec)(
        _message("train", Workbench(spec.source, config).initial, 1), context
    )
    upload = record_to_adapter(reply.content[ARRAYS])
    private = load_store(context.state)[PRIVATE]
    # Replay the round's global without the mix (beta = 1) from the same inputs.
    plain_spec = _spec(_config(), tmp_path / "plain")
    plain = make_client_app(plain_spec)(
        _message("train", Workbench(spec.source, config).initial, 1), _context()
    )
    global_only = record_to_adapter(plain.content[ARRAYS])
    for key in upload:
        expected = 0.25 * global_only[key] + 0.75 * private[key]
        assert torch.allclose(upload[key], expected, atol=1e-6), key


@pytest.mark.slow
def test_fedpit_end_to_end_on_flower(tmp_path: Path) -> None:
    """Two real rounds on the Simulation Engine with real self-generation on the tiny model."""
    config = _config(
        "train.rounds=2",
        "eval.generate=false",
        "synthetic.per_round=4",
        "synthetic.truncated='keep'",
    )
    out = run_experiment(plan_experiment(config, tmp_path / "run"), Console(file=io.StringIO()))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "fedpit"
    assert summary["synthetic"]["generated"] == 2 * 3 * 4
    dropped = sum(summary["synthetic"]["dropped_by_filter"].values())
    assert summary["synthetic"]["kept"] + dropped == summary["synthetic"]["generated"]
    comm = summary["communication"]
    # Each round uploads exactly one global adapter per client, nothing else.
    assert comm["tensor_bytes_up"] == 2 * 3 * comm["adapter_bytes"]
    assert comm["adapters_up_per_round"] == [3.0, 3.0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("global_eval_loss" in r and "eval_loss" in r for r in rows)
    for client in range(3):
        folder = out / "clients" / f"client-{client}" / "adapters" / PRIVATE
        assert (folder / "adapter_model.safetensors").is_file()
    assert (out / "adapters" / GLOBAL / "adapter_config.json").is_file()
    assert "self-generated examples: kept" in (out / "report.md").read_text()
    # The clients' models are the headline, so their per-record scores make the intervals.
    assert len(summary["per_record"]["loss"]) == config.data.eval_size
    assert set(summary["intervals"]["vs"]["base"]) >= {"eval_loss"}


@pytest.mark.usefixtures("flower_task", "fake_generator")
def test_a_client_refuses_a_server_with_another_base_model(tmp_path: Path) -> None:
    config = _config()
    spec = _spec(config, tmp_path)
    app = make_client_app(spec)
    bench = Workbench(spec.source, config, private=True)
    message = _message("train", bench.initial, 1)
    message.content["config"]["base-fingerprint"] = "0123456789abcdef"
    message.content["config"]["base-model"] = "someone else's model"
    with pytest.raises(
        RuntimeError,
        match=r"client 0 has base model .* fingerprint [0-9a-f]{16}; "
        r"the server has someone else's model with 0123456789abcdef",
    ):
        app(message, _context())
    # The right fingerprint trains as usual.
    message.content["config"]["base-fingerprint"] = bench.fingerprint()
    assert not app(message, _context()).has_error()
