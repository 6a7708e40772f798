"""A faulty or hostile split server: the client refuses every reply it did not ask for (wrong
kind, tensors, dtypes, shapes, NaN; a malformed handshake), with one message, before any of it
reaches its model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from silotune.errors import FrameRejected
from silotune.split.codecs import FloatCodec
from silotune.split.link import SplitError
from silotune.split.protocol import Frame, Kind
from silotune.split.replies import averaged_adapter, reply_tensor
from silotune.split.segments import split_model
from silotune.split.server import _Session
from tests.test_split import batch, client_model, running_server, split_config, tiny_llama

Tensors = dict[str, torch.Tensor]


def hidden_reply(codec: FloatCodec, x: torch.Tensor) -> Frame:
    return Frame(Kind.HIDDEN, 1, codec.encode("hidden", x))


def _edit(change: Callable[[Tensors], None]) -> Callable[[Frame], Frame]:
    def edit(frame: Frame) -> Frame:
        tensors = dict(frame.tensors)
        change(tensors)
        return Frame(frame.kind, frame.step, tensors)

    return edit


def _set(name: str, value: Callable[[Tensors], torch.Tensor]) -> Callable[[Tensors], None]:
    def change(tensors: Tensors) -> None:
        tensors[name] = value(tensors)

    return change


HOSTILE = {
    "another kind": (lambda f: Frame(Kind.GRAD_INPUT, f.step, f.tensors), "GRAD_INPUT|grad_input"),
    "no tensor": (_edit(lambda t: t.clear()), "expected"),
    "an extra tensor": (_edit(_set("extra", lambda t: torch.zeros(1))), "expected"),
    "a row too many": (_edit(_set("hidden", lambda t: torch.zeros(3, 5, 8))), "3 rows"),
    "a token too few": (_edit(_set("hidden", lambda t: torch.zeros(2, 4, 8))), "request of"),
    "another width": (_edit(_set("hidden", lambda t: torch.zeros(2, 5, 9))), "must be"),
    "integers": (_edit(_set("hidden", lambda t: torch.zeros(2, 5, 8, dtype=torch.int8))), "must"),
    "NaN": (_edit(_set("hidden", lambda t: torch.full((2, 5, 8), float("nan")))), "NaN"),
    "Inf": (_edit(_set("hidden", lambda t: torch.full((2, 5, 8), float("inf")))), "NaN or Inf"),
}


@pytest.mark.parametrize("attack", list(HOSTILE))
def test_hostile_hidden_replies_are_refused(attack: str) -> None:
    codec, x = FloatCodec("none"), torch.randn(2, 5, 8)
    honest = hidden_reply(codec, x)
    assert torch.equal(reply_tensor(honest, Kind.HIDDEN, "hidden", codec, x), x)
    mutate, message = HOSTILE[attack]
    with pytest.raises(FrameRejected, match=message):
        reply_tensor(mutate(honest), Kind.HIDDEN, "hidden", codec, x)


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_quantized_replies_are_screened_scale_and_all(codec: str) -> None:
    wire, x = FloatCodec(codec), torch.randn(2, 5, 8)
    honest = hidden_reply(wire, x)
    out = reply_tensor(honest, Kind.HIDDEN, "hidden", wire, x)
    assert out.shape == x.shape and (out - x).abs().max() < x.abs().max() / 7
    for change, message in (
        (_set("hidden.scale", lambda t: torch.ones(1, 1, 1)), "scale must be"),
        (_set("hidden.scale", lambda t: -t["hidden.scale"]), "negative scale"),
        (_set("hidden.scale", lambda t: t["hidden.scale"] * float("inf")), "NaN or Inf"),
    ):
        with pytest.raises(FrameRejected, match=message):
            reply_tensor(_edit(change)(honest), Kind.HIDDEN, "hidden", wire, x)


def test_hostile_averages_are_refused() -> None:
    sent = {"a": torch.randn(4, 2), "b": torch.randn(3)}
    honest = Frame(Kind.AVERAGED, 1, {k: v * 0.5 for k, v in sent.items()})
    got = averaged_adapter(honest, sent)
    assert all(torch.equal(got[k], sent[k] * 0.5) for k in sent)
    for tensors, message in (
        ({"a": sent["a"]}, "missing"),
        ({**sent, "c": torch.zeros(1)}, "unexpected"),
        ({**sent, "b": torch.zeros(4)}, r"expected a float \[3\]"),
        ({**sent, "b": torch.zeros(3, dtype=torch.int8)}, "torch.int8"),
        ({**sent, "a": torch.full((4, 2), float("nan"))}, "NaN"),
    ):
        with pytest.raises(FrameRejected, match=message):
            averaged_adapter(Frame(Kind.AVERAGED, 1, tensors), sent)
    with pytest.raises(FrameRejected, match="where averaged was due"):
        averaged_adapter(Frame(Kind.HIDDEN, 1, dict(sent)), sent)


def test_a_client_stops_with_a_message_when_its_server_answers_nan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over the real wire: a server answering NaN activations is refused before the client's
    back segment or loss sees them."""
    config = split_config()
    segments = split_model(tiny_llama(), 1, 1)
    ids, mask, labels = batch()
    honest = _Session.on_activations
    answered = []

    def poisoned(self: _Session, frame: Frame) -> Frame:  # honest once, then NaN
        reply = honest(self, frame)
        answered.append(reply)
        if len(answered) == 1:
            return reply
        return Frame(reply.kind, reply.step, {"hidden": reply.tensors["hidden"] * float("nan")})

    monkeypatch.setattr(_Session, "on_activations", poisoned)  # before the session binds it
    with running_server(segments, config) as (port, _):
        model, link = client_model(config, port, "site-a", seed=0)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert loss is not None and bool(torch.isfinite(loss))
        with pytest.raises(SplitError, match=r"refused the split server's reply: .*NaN"):
            model(input_ids=ids, attention_mask=mask, labels=labels)
        assert len(answered) == 2
        link.close()


def test_a_malformed_ready_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    config = split_config("split.encrypt=false")
    segments = split_model(tiny_llama(), 1, 1)
    honest = _Session.start

    def boasting(self: _Session) -> Frame:
        reply = honest(self)
        return Frame(reply.kind, reply.step, meta={**reply.meta, "round": "many"})

    monkeypatch.setattr(_Session, "start", boasting)
    with (
        running_server(segments, config) as (port, _),
        pytest.raises(FrameRejected, match="ready is malformed"),
    ):
        client_model(config, port, "site-a", seed=0)
