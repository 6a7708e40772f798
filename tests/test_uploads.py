"""Uploads other than the server's adapter in float32: clients of other ranks, FLoRA stacking and
compressed codes — exact where they claim to be, bounded where they round, refused when hostile."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from rich.console import Console
from safetensors.torch import load_file

from silotune.config import config_from_dict, load_config
from silotune.config_federation import FederatedConfig
from silotune.errors import ConfigError
from silotune.federated import lora_ranks
from silotune.federated.compression import ABSMAX, CODECS, CODES
from silotune.federated.metering import ARRAYS, METRICS, RoundTraffic
from silotune.federated.screening import Layout
from silotune.federated.strategies import build_strategy
from silotune.federated.uploads import UploadPlan
from silotune.modeling.adapters import GLOBAL
from silotune.runner import plan_experiment, run_experiment

from .conftest import CONFIGS

MODULES = ("layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj")
IN, OUT = 24, 16


def _adapter(rank: int, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module in MODULES:
        state[f"{module}.lora_A.weight"] = torch.randn(rank, IN, generator=g) * scale
        state[f"{module}.lora_B.weight"] = torch.randn(OUT, rank, generator=g) * scale
    return state


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# Largest error of one value, as a share of its block's largest magnitude: half the widest gap
# between neighbouring levels of the code (NF4: -1 and -0.6962; bitsandbytes' dynamic 8-bit
# map is finest near 0 and coarsest, 0.0141 apart, near 1).
ERROR_BOUND = {"int8": 0.0141 / 2 + 1e-6, "nf4": (1 - 0.6962) / 2 + 1e-6}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_a_coded_adapter_decodes_within_its_codes_error_bound(name: str) -> None:
    codec = CODECS[name]
    # Sizes that are and are not whole blocks, scales as different as A's and B's.
    state = {
        "a.lora_A.weight": torch.randn(8, 100) * 0.05,
        "a.lora_B.weight": torch.randn(100, 8) * 1e-4,
        "b.lora_A.weight": torch.randn(3, 7),
    }
    decoded = codec.decode(codec.encode(state), _shapes(state))
    assert isinstance(decoded, ArrayRecord), decoded
    assert list(decoded) == sorted(state)
    for key, original in state.items():
        got = torch.from_numpy(decoded[key].numpy())
        assert got.shape == original.shape and got.dtype == torch.float32
        flat = torch.nn.functional.pad(original.reshape(-1), (0, -original.numel() % codec.block))
        blocks = flat.reshape(-1, codec.block).abs().amax(dim=1, keepdim=True)
        bound = (blocks * ERROR_BOUND[name]).expand(-1, codec.block).reshape(-1)[: original.numel()]
        assert ((got - original).reshape(-1).abs() <= bound).all(), key
    # Deterministic: a resumed run codes the same tensors to the same bytes.
    again = codec.encode(state)
    assert np.array_equal(again[CODES].numpy(), codec.encode(state)[CODES].numpy())


@pytest.mark.parametrize(("name", "goal"), [("int8", 0.27), ("nf4", 0.15)])
def test_coded_uploads_are_the_promised_share_of_float32(name: str, goal: float) -> None:
    codec = CODECS[name]
    # The 7B preset's shape (4096-wide, rank 16) and the tiny test model's.
    for width, rank in ((4096, 16), (64, 4)):
        state = {
            "m.lora_A.weight": torch.randn(rank, width),
            "m.lora_B.weight": torch.zeros(width, rank),
        }
        record = codec.encode(state)
        raw = sum(t.numel() * 4 for t in state.values())
        coded = sum(a.numpy().nbytes for a in record.values())
        assert coded / raw == pytest.approx(codec.ratio(_shapes(state)))
        assert coded / raw <= goal, (width, rank, coded / raw)


def _coded(name: str, **change: np.ndarray) -> ArrayRecord:
    record = CODECS[name].encode(_adapter(4, 0))
    arrays = {k: change.get(k, record[k].numpy()) for k in record}
    arrays.update({k: v for k, v in change.items() if k not in arrays})
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({ABSMAX: np.full(9, np.nan, np.float32)}, "NaN or Inf"),
        ({ABSMAX: -np.ones(9, np.float32)}, "negative"),
        ({ABSMAX: np.ones(8, np.float32)}, "expected float32 (9,)"),
        ({ABSMAX: np.ones(9, np.float64)}, "expected float32"),
        ({CODES: np.zeros(10, np.uint8)}, "expected uint8"),
        ({CODES: np.zeros(288, np.int32)}, "expected uint8"),
        ({"extra": np.zeros(1, np.float32)}, "holds 'codes' and 'absmax'"),
    ],
)
def test_a_malformed_coded_upload_is_refused_with_the_reason(
    change: dict[str, np.ndarray], reason: str
) -> None:
    decoded = CODECS["nf4"].decode(_coded("nf4", **change), _shapes(_adapter(4, 0)))
    assert isinstance(decoded, str) and reason in decoded, decoded


def test_truncation_is_the_first_components_and_padding_undoes_it() -> None:
    full = _adapter(8, 1)
    part = lora_ranks.truncate(full, 3)
    assert _shapes(part) == lora_ranks.truncated_shapes(_shapes(full), 3)
    padded = lora_ranks.pad(part, _shapes(full))
    for name in full:
        if lora_ranks.is_a(name):
            assert torch.equal(padded[name][:3], full[name][:3]) and not padded[name][3:].any()
            # The truncated pair's product is the sum over the first 3 components.
            want = full[lora_ranks.partner(name)][:, :3] @ full[name][:3]
            torch.testing.assert_close(lora_ranks.product(part, name), want.double())


def test_stacking_is_exact_and_the_projection_is_the_best_pair() -> None:
    ranks, weights = (2, 4, 8), (10.0, 30.0, 5.0)
    states = [
        lora_ranks.pad(_adapter(r, seed), _shapes(_adapter(8, 0))) for seed, r in enumerate(ranks)
    ]
    stacked = lora_ranks.stack(states, weights)
    for name in (n for n in states[0] if lora_ranks.is_a(n)):
        want = sum(
            w * lora_ranks.product(s, name) for s, w in zip(states, weights, strict=True)
        ) / sum(weights)
        got = lora_ranks.product(stacked, name)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()
        # Rank 14 holds the whole sum; rank 8 is the truncated SVD's (Eckart-Young) error.
        whole = lora_ranks.project(stacked, 14, _adapter(14, 0))
        torch.testing.assert_close(lora_ranks.product(whole, name), want, rtol=0, atol=1e-6)
        best = lora_ranks.project(stacked, 8, states[0])
        tail = torch.linalg.svdvals(want)[8:].square().sum().sqrt()
        error = torch.linalg.matrix_norm(lora_ranks.product(best, name) - want)
        assert error == pytest.approx(float(tail), rel=1e-4)


def test_a_lower_rank_client_computes_what_the_servers_adapter_does_with_its_first_components(
    tiny_bench,  # type: ignore[no-untyped-def]
) -> None:
    """Scaled alpha / r as the server's: the truncated adapter in its own slot gives the same
    logits as the server-rank adapter with the other components zeroed."""
    bench = tiny_bench
    assert bench.config.lora.r > 2
    full = {k: torch.randn_like(v) * 0.1 for k, v in bench.initial.items()}
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    bench.model.eval()  # no LoRA dropout
    bench.put(GLOBAL, lora_ranks.pad(lora_ranks.truncate(full, 2), _shapes(full)))
    bench.use([GLOBAL])
    with torch.no_grad():
        want = bench.model(input_ids=ids).logits
    bench.put(GLOBAL, lora_ranks.truncate(full, 2))
    bench.use([GLOBAL])
    with torch.no_grad():
        got = bench.model(input_ids=ids).logits
    a = next(k for k in full if lora_ranks.is_a(k))
    assert bench.take(GLOBAL)[a].shape[0] == 2  # trained in a slot of its own rank
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    bench.put(GLOBAL, bench.initial)  # the fixture is shared: leave the server's rank in place
    assert _shapes(bench.take(GLOBAL)) == _shapes(bench.initial)


def _plan(**fed: object) -> UploadPlan:
    raw = {
        "lora": {"r": 8, "client_ranks": [2, 4, 8]},
        "federated": {"aggregation": "hetlora", **fed},
    }
    return UploadPlan.of(config_from_dict(raw))


def test_the_server_decodes_and_pads_a_lower_rank_clients_coded_update() -> None:
    plan = _plan(compression="int8")
    sent = _adapter(8, 3)
    record = ArrayRecord(sent)
    received = plan.receive(sent, 0)
    trained = {k: v + 1e-3 * torch.randn_like(v) for k, v in received.items()}
    got = plan.decode(plan.send(trained, received), 0, record)
    assert isinstance(got, ArrayRecord) and Layout.of(got) == Layout.of(record)
    a = "layers.0.q_proj.lora_A.weight"
    # The update is coded, not the adapter: the error is a share of the update's size.
    np.testing.assert_allclose(got[a].numpy()[:2], trained[a].numpy(), atol=3e-3 * 1e-2)
    assert not got[a].numpy()[2:].any()
    # A client may not send another client's rank, nor be a client the run does not have.
    plain = _plan()
    wrong = plain.decode(plain.send(sent, sent), 0, record)
    assert wrong == "layers.0.q_proj.lora_A.weight has shape (8, 24), expected (2, 24)"
    assert "not one of this run's clients" in str(plan.decode(plan.send(sent, sent), 3, record))
    assert "not one of this run's clients" in str(plan.decode(plan.send(sent, sent), "0", record))


def _reply(client: int, upload: ArrayRecord, examples: int) -> Message:
    metrics = MetricRecord({"num-examples": examples, "client": client, "train_loss": 0.5})
    request = Message(
        content=RecordDict({ARRAYS: ArrayRecord({})}), dst_node_id=7, message_type="train"
    )
    return Message(content=RecordDict({ARRAYS: upload, METRICS: metrics}), reply_to=request)


@pytest.mark.usefixtures("flower_task")
def test_a_flora_round_aggregates_the_products_and_counts_the_coded_bytes() -> None:
    plan = _plan(aggregation="flora", compression="nf4")
    strategy = build_strategy(FederatedConfig(), clients=3)
    strategy.uploads = plan
    server = _adapter(8, 0)
    strategy.traffic = {1: RoundTraffic(started=0.0, bytes_down=0, tensor_bytes_down=0)}
    strategy.traffic[1].sent = ArrayRecord(server)
    received = [plan.receive(server, c) for c in range(3)]
    trained = [plan.receive(_adapter(8, 10 + c), c) for c in range(3)]
    replies = [_reply(c, plan.send(trained[c], received[c]), 10 * (c + 1)) for c in range(3)]
    hostile = _reply(1, ArrayRecord({CODES: Array(np.zeros(3, np.uint8))}), 20)
    coded = sum(sum(a.numpy().nbytes for a in r.content[ARRAYS].values()) for r in replies)
    aggregated, _ = strategy.aggregate_train(1, [*replies, hostile])
    assert aggregated is not None
    traffic = strategy.traffic[1]
    assert len(traffic.failures) == 1 and "rejected: a nf4 upload holds" in traffic.failures[0]
    assert traffic.tensor_bytes_up == coded
    # Tensors this small are mostly padding to whole blocks: still under a fifth of float32.
    assert coded / sum(4 * t.numel() for s in trained for t in s.values()) < 0.2
    # Each reply now holds its decoded upload, padded to rank 8. The aggregate's product is the
    # best rank-8 pair of the weighted mean of their products: 2 + 4 + 8 = 14 components, so not
    # exact, but no worse than the tail of the singular values.
    decoded = [
        {k: torch.from_numpy(v.numpy()) for k, v in r.content[ARRAYS].items()} for r in replies
    ]
    a = "layers.0.q_proj.lora_A.weight"
    want = (
        sum(w * lora_ranks.product(s, a) for s, w in zip(decoded, (10, 20, 30), strict=True)) / 60
    )
    got = lora_ranks.product({k: torch.from_numpy(v.numpy()) for k, v in aggregated.items()}, a)
    tail = torch.linalg.svdvals(want)[8:].square().sum().sqrt()
    assert float(torch.linalg.matrix_norm(got - want)) == pytest.approx(float(tail), rel=1e-3)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"lora": {"client_ranks": [4, 8]}}, "one rank per client"),
        ({"lora": {"client_ranks": [4, 8, 16]}}, "each from 1 to lora.r = 8"),
        ({"lora": {"client_ranks": [4, 8, 8]}}, "plain fedavg cannot average"),
        ({"federated": {"aggregation": "flora", "strategy": "fedprox"}}, 'set strategy = "fedavg"'),
        ({"federated": {"aggregation": "flora"}, "lora": {"freeze_a": True}}, "freeze_a"),
        ({"federated": {"aggregation": "flora"}, "defence": {"dp": "server-fixed"}}, "defence.dp"),
        ({"federated": {"compression": "int8"}, "defence": {"secagg": True}}, "defence.secagg"),
        ({"federated": {"aggregation": "fedsa"}, "lora": {"freeze_a": True}}, "freeze_a"),
        ({"federated": {"aggregation": "fedex", "strategy": "fedadam"}, "lora": {}}, "fedavg"),
        ({"federated": {"aggregation": "fedex"}, "defence": {"secagg": True}}, "secagg"),
        (
            {"federated": {"aggregation": "fedex"}, "lora": {"client_ranks": [4, 8, 8]}},
            "equal-rank",
        ),
        (
            {
                "lora": {"client_ranks": [4, 8, 8]},
                "federated": {"aggregation": "hetlora"},
                "defence": {"dp": "client-fixed"},
            },
            "another rank",
        ),
        (
            {
                "experiment": {"algorithms": ["fedpit"]},
                "federated": {"aggregation": "fedsa"},
                "synthetic": {"beta": 0.5},
            },
            "set beta = 1",
        ),
        (
            {"federated": {"compression": "int8"}, "defence": {"dp": "client-fixed"}},
            "server-fixed",
        ),
    ],
)
def test_schemes_refuse_what_they_cannot_run_with(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


@pytest.mark.usefixtures("flower_task")
def test_a_fedsa_server_sends_and_takes_only_a_matrices() -> None:
    plan = UploadPlan.of(config_from_dict({"federated": {"aggregation": "fedsa"}}))
    whole = _adapter(4, 0)
    shared = plan.shared(whole)
    assert shared and all(lora_ranks.is_a(k) for k in shared)
    assert set(plan.send(whole, whole)) == set(shared), "an upload never holds B"
    own = plan.own(_adapter(4, 1))
    merged = plan.whole(shared, own)
    assert set(merged) == set(whole)
    assert all(torch.equal(merged[k], (shared | own)[k]) for k in merged)
    strategy = build_strategy(FederatedConfig(aggregation="fedsa"), clients=3)
    strategy.uploads = plan
    strategy.traffic = {1: RoundTraffic(started=0.0, bytes_down=0, tensor_bytes_down=0)}
    strategy.traffic[1].sent = ArrayRecord(shared)
    strategy.traffic[1].layout = Layout.of(ArrayRecord(shared))
    honest = [_reply(c, plan.send(_adapter(4, c), whole), 10) for c in range(2)]
    leaking = _reply(2, ArrayRecord(_adapter(4, 2)), 10)  # B along with A
    aggregated, _ = strategy.aggregate_train(1, [*honest, leaking])
    assert aggregated is not None and set(aggregated) == set(shared)
    (failure,) = strategy.traffic[1].failures
    assert "client 2" in failure and "wrong tensor names: unknown" in failure, failure


@pytest.mark.slow
@pytest.mark.parametrize("secagg", [False, True])
def test_fedsa_clients_share_a_and_keep_their_own_b(tmp_path: Path, secagg: bool) -> None:
    config = load_config(
        CONFIGS / "tiny.toml",
        [
            "experiment.algorithms=['fedit']",
            "federated.aggregation='fedsa'",
            "eval.generate=false",
            f"defence.secagg={str(secagg).lower()}",
        ],
    )
    out = run_experiment(plan_experiment(config, tmp_path / "run"), Console(file=io.StringIO()))
    name = "adapter_model.safetensors"
    shared = load_file(str(out / "adapters" / "global" / name))
    clients = [load_file(str(out / "adapters" / f"client-{c}" / name)) for c in range(3)]
    a_keys = [k for k in shared if lora_ranks.is_a(k)]
    b_keys = [k for k in shared if not lora_ranks.is_a(k)]
    for own in clients:
        assert all(torch.equal(own[k], shared[k]) for k in a_keys), "the A every client infers with"
    assert not any(shared[k].any() for k in b_keys), "the server never held a B"
    assert not torch.equal(clients[0][b_keys[0]], clients[1][b_keys[0]]), "each client its own B"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    a_bytes = sum(shared[k].numel() * 4 for k in a_keys)
    if not secagg:  # SecAgg+ sends masked integers instead
        assert all(r["tensor_bytes_up"] == 3 * a_bytes for r in rows)
    # The headline is the clients' mean (shared A + own B); the server's own view is the base.
    summary = json.loads((out / "summary.json").read_text())
    assert rows[-1]["global_eval_loss"] == pytest.approx(summary["base"]["eval_loss"], rel=1e-5)
    assert rows[-1]["eval_loss"] < rows[-1]["global_eval_loss"]


@pytest.mark.usefixtures("flower_task")
def test_a_fedex_round_makes_the_model_the_exact_mean_of_the_clients_products() -> None:
    plan = UploadPlan.of(config_from_dict({"federated": {"aggregation": "fedex"}}))
    assert not plan.standard and "FedEx" in plan.describe(3), "the run's notes say so"
    assert UploadPlan.of(config_from_dict({})).standard
    strategy = build_strategy(FederatedConfig(aggregation="fedex"), clients=3)
    strategy.uploads = plan
    server = _adapter(4, 0)
    old = lora_ranks.compress(lora_ranks.concat(_adapter(2, 7)))  # an earlier round's
    sent = ArrayRecord(plan.joined(server, old))
    strategy.traffic = {1: RoundTraffic(started=0.0, bytes_down=0, tensor_bytes_down=0)}
    # What configure_train records: clients train and upload the adapter, not the correction.
    strategy.traffic[1].sent = ArrayRecord(server)
    strategy.traffic[1].layout = Layout.of(ArrayRecord(server))
    strategy.traffic[1].correction = old
    trained = [_adapter(4, 20 + c) for c in range(3)]
    replies = [_reply(c, plan.send(trained[c], server), 10 * (c + 1)) for c in range(3)]
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert aggregated is not None
    adapter, correction = plan.split(
        {k: torch.from_numpy(v.numpy()) for k, v in aggregated.items()}
    )
    assert set(adapter) == set(server) and correction and set(sent) - set(server)
    for name in (n for n in server if lora_ranks.is_a(n)):
        # Every client trained with the old correction beside its adapter.
        want = (
            sum(
                w * (lora_ranks.product(t, name) + lora_ranks.product(old, name))
                for t, w in zip(trained, (10, 20, 30), strict=True)
            )
            / 60
        )
        got = lora_ranks.product(adapter, name) + lora_ranks.product(correction, name)
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
        # The adapter itself is the plain mean of the factors.
        mean_a = sum(w * t[name] for t, w in zip(trained, (10, 20, 30), strict=True)) / 60
        torch.testing.assert_close(adapter[name], mean_a)
    assert strategy.traffic[1].product_gap is not None and strategy.traffic[1].product_gap < 1e-6


def test_a_correction_takes_part_only_beside_the_global_adapter(
    tiny_bench,  # type: ignore[no-untyped-def]
) -> None:
    bench = tiny_bench
    bench.model.eval()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    state = {k: torch.randn_like(v) * 0.1 for k, v in bench.initial.items()}

    def logits(active: list[str]) -> torch.Tensor:
        bench.put(GLOBAL, state)
        bench.use(active)
        with torch.no_grad():
            return bench.model(input_ids=ids).logits

    plain, base = logits([GLOBAL]), logits([])
    correction = lora_ranks.compress(lora_ranks.concat(_like(bench.initial, 3)))
    bench.set_correction(correction)
    rank = lora_ranks.rank_of(_shapes(correction))
    try:
        assert not torch.allclose(logits([GLOBAL]), plain)
        torch.testing.assert_close(logits([]), base)
        # One adapter of the summed rank computes the same: what a FedEx run saves.
        merged = {k: v.float() for k, v in lora_ranks.concat(state, correction).items()}
        bench.set_correction({})
        assert f"correction-r{rank}" not in bench.model.peft_config
        bench.put(GLOBAL, merged)
        bench.use([GLOBAL])
        with torch.no_grad():
            single = bench.model(input_ids=ids).logits
        bench.set_correction(correction)
        torch.testing.assert_close(single, logits([GLOBAL]), rtol=1e-4, atol=1e-4)
    finally:
        bench.set_correction({})
        bench.put(GLOBAL, bench.initial)


def _like(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Random pairs of rank `rank` for the modules of `state`."""
    out = {}
    for name, t in state.items():
        shape = (rank, t.shape[1]) if lora_ranks.is_a(name) else (t.shape[0], rank)
        out[name] = torch.randn(shape) * 0.05
    return out
