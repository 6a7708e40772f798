"""Pipelined micro-batches (`split.micro_batches`): the same update as whole batches, frames in
flight in the right order, refusals that leave the session in step."""

from __future__ import annotations

import time

import pytest
import torch

from silotune.config import load_config
from silotune.errors import ConfigError
from silotune.split.adapters import add_segment_adapter
from silotune.split.link import SplitError
from silotune.split.protocol import Frame, Kind
from silotune.split.segments import split_model
from silotune.split.trainers import adapter_state, build_trainer
from silotune.split.trainers.base import Micro, StepDropped
from silotune.split.trainers.batch import BatchTrainer
from tests.test_split import (
    batch,
    client_model,
    in_threads,
    running_server,
    split_config,
    tiny_llama,
    train_client,
)


def train_pipelined(mode: str, count: int) -> tuple[list[float], dict[str, torch.Tensor], list]:
    """Three steps of one client against a fresh server: losses, every adapter, frames sent."""
    config = split_config(
        "split.tls=false",
        "split.encrypt=false",
        f"split.mode={mode}",
        f"split.micro_batches={count}",
    )
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    frames: list[Frame] = []
    with running_server(segments, config) as (port, trainer):
        model, link = client_model(config, port, "c0", 0)
        link.on_frame = lambda frame, raw: frames.append(frame)
        losses = train_client(model, 3, seed=0)
        link.close()
    middle = trainer.client_middles().get("c0", segments.middle)
    state = {f"client.{k}": v for k, v in adapter_state(model).items()}
    state.update({f"server.{k}": v for k, v in adapter_state(middle).items()})
    return losses, state, frames


@pytest.mark.parametrize("mode", ["serial", "per-client", "batch"])
def test_micro_batches_give_the_whole_batch_update(mode: str) -> None:
    want_losses, want, _ = train_pipelined(mode, 1)
    for count in (2, 3):
        losses, got, frames = train_pipelined(mode, count)
        assert losses == pytest.approx(want_losses, abs=1e-6)
        assert got.keys() == want.keys() and len(got) == 16  # 4 blocks: q, v x A, B
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
        # Every micro-batch's activations go out before the first reply is read, then every
        # gradient: a step is k activations then k gradients, each numbered in order.
        step = [
            (f.kind, f.meta.get("micro")) for f in frames if f.kind in (Kind.ACTIVATIONS, Kind.GRAD)
        ]
        micros = [[j, count] for j in range(count)]
        assert step[: 2 * count] == [(Kind.ACTIVATIONS, m) for m in micros] + [
            (Kind.GRAD, m) for m in micros
        ]
        assert len(step) == 3 * 2 * count


def test_micro_batches_out_of_order_or_beyond_the_run_are_refused_and_the_session_goes_on() -> None:
    config = split_config("split.tls=false", "split.micro_batches=2")
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    with running_server(segments, config) as (port, trainer):
        model, link = client_model(config, port, "c0", 0)
        ids, mask, _ = batch()
        hidden = model.front(ids, mask).detach()
        link.post_forward(hidden, mask, train=True, micro=(1, 2))  # its first micro-batch is 0
        with pytest.raises(SplitError, match="holds no forward"):
            link.take_forward(hidden)
        link.post_forward(hidden[:2], mask[:2], train=True, micro=(0, 2))
        out = link.take_forward(hidden[:2])
        link.post_backward(torch.ones_like(out), micro=(1, 2))  # the gradient of 0 is due
        with pytest.raises(SplitError, match="out of order"):
            link.take_backward(out)
        assert trainer.steps == 0
        # The session is in step again: a whole pipelined step trains.
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        assert trainer.steps == 1
        link.post_forward(hidden, mask, train=True, micro=(0, 3))  # the run allows 2
        with pytest.raises(SplitError, match=r"micro must be \[index, count\]"):
            link.take_forward(hidden)
        link.broken = True  # refused from its header: its sequence number is spent here only
        link.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.mode=dp-sgd"], "dp-sgd"),
        (["train.batch_size=2", "split.micro_batches=3"], "needs a row"),
    ],
)
def test_micro_batches_are_refused_where_they_cannot_work(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["split.micro_batches=2", *overrides])


@pytest.mark.parametrize("mode", ["serial", "per-client", "batch"])
def test_a_step_abandoned_half_way_leaves_nothing_in_the_next(mode: str) -> None:
    """Forward both micro-batches, backward only the first, start over: the server's update is
    the clean step's, not one with the abandoned half's gradient in it."""
    config = split_config(f"split.mode={mode}", "split.micro_batches=2")
    ids, mask, _ = batch()
    states = []
    for abandon in (False, True):
        segments = split_model(tiny_llama(), 1, 1)
        add_segment_adapter(segments.middle, config, "middle")
        trainer = build_trainer(segments.middle, config)
        trainer.join("c0")
        hidden = segments.front(ids, mask).detach()
        if abandon:
            out = trainer.forward("c0", hidden[:2], mask[:2], (0, 2))
            trainer.forward("c0", hidden[2:], mask[2:], (1, 2))
            trainer.backward("c0", torch.ones_like(out), (0, 2))
        for j, rows in enumerate((slice(0, 2), slice(2, 3))):
            out = trainer.forward("c0", hidden[rows], mask[rows], (j, 2))
        for j, rows in enumerate((slice(0, 2), slice(2, 3))):
            trainer.backward("c0", torch.full((rows.stop - rows.start, 12, 32), 0.1), (j, 2))
        assert trainer.steps == 1
        states.append(adapter_state(trainer.client_middles().get("c0", segments.middle)))
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=0, atol=1e-7, msg=name)


def two_clients_stacked(
    count: int, rows: tuple[int, int]
) -> tuple[dict[str, torch.Tensor], list[list[float]], int]:
    """Two clients (batches of `rows` rows each), three steps each, against a batch-mode
    server: the middle's adapter, the clients' losses and the server's steps."""
    config = split_config(
        "split.mode=batch",
        "split.tls=false",
        "split.encrypt=false",
        "split.batch_window_s=20",
        f"split.micro_batches={count}",
    )
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    with running_server(segments, config) as (port, trainer):
        clients = [client_model(config, port, f"c{i}", i) for i in range(2)]
        losses = in_threads(
            [
                lambda m=m, i=i: train_client(m, 3, seed=i, rows=rows[i])
                for i, (m, _) in enumerate(clients)
            ]
        )
        for _, link in clients:
            link.close()
    return adapter_state(segments.middle), losses, trainer.steps  # type: ignore[return-value]


def assert_same_training(
    got: tuple[dict[str, torch.Tensor], list[list[float]]],
    want: tuple[dict[str, torch.Tensor], list[list[float]]],
) -> None:
    """The same middle adapter and the same client losses, to 1e-6."""
    for run, want_run in zip(got[1], want[1], strict=True):
        assert run == pytest.approx(want_run, abs=1e-6)
    for name, value in want[0].items():
        torch.testing.assert_close(got[0][name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("count", "rows"),
    [(2, (3, 3)), (3, (3, 1))],
    ids=["same-micro-batches", "one-client-sends-fewer"],
)
def test_batch_mode_stacks_every_clients_micro_batches_into_the_whole_batch_update(
    count: int, rows: tuple[int, int]
) -> None:
    """Micro-batch j of every client in the j-th stacked forward; a client whose batch has
    fewer rows than micro-batches sends fewer, and the step waits for the others' last."""
    want, want_losses, steps = two_clients_stacked(1, rows)
    got, losses, pipelined_steps = two_clients_stacked(count, rows)
    assert steps == pipelined_steps == 3  # both clients in one stacked step, every step
    assert_same_training((got, losses), (want, want_losses))


def test_a_client_done_with_its_micro_batches_leaves_the_others_step_going_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client with one row sends one micro-batch of three: once its gradient is back it
    starts its next step (and after its last, leaves) while the other's later micro-batches are
    still in the server's backward. Neither gives the step up: the update is the whole one."""
    want, want_losses, _ = two_clients_stacked(1, (3, 1))
    slow = BatchTrainer.backward

    def backward(self: BatchTrainer, client: str, grad: torch.Tensor, micro: Micro) -> torch.Tensor:
        if micro[0] > 0:
            time.sleep(0.3)  # the two-row client's later micro-batches arrive late
        return slow(self, client, grad, micro)

    monkeypatch.setattr(BatchTrainer, "backward", backward)
    got, losses, steps = two_clients_stacked(3, (3, 1))
    assert steps == 3
    assert_same_training((got, losses), (want, want_losses))


def test_a_client_leaving_a_stacked_step_half_way_gives_the_step_up_for_everyone() -> None:
    """Its first micro-batch's gradient is already in the stacked sums and cannot be taken out:
    no half-done update is applied; the other client is told why."""
    config = split_config("split.mode=batch", "split.micro_batches=2", "split.batch_window_s=20")
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    before = adapter_state(segments.middle)
    trainer = build_trainer(segments.middle, config)
    ids, mask, _ = batch()
    hidden = segments.front(ids, mask).detach()
    for client in ("c0", "c1"):
        trainer.join(client)

    def first_half(client: str) -> None:
        outs = [trainer.forward(client, hidden[j::2], mask[j::2], (j, 2)) for j in range(2)]
        trainer.backward(client, torch.ones_like(outs[0]), (0, 2))

    in_threads([lambda c=c: first_half(c) for c in ("c0", "c1")])
    trainer.leave("c0")
    with pytest.raises(StepDropped, match="another client left the stacked step"):
        trainer.backward("c1", torch.ones_like(hidden[1::2]), (1, 2))
    assert trainer.steps == 0
    after = adapter_state(segments.middle)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in segments.middle.parameters())
