"""A client with a valid certificate that sends anything: the split server refuses each hostile
frame with one ERROR reply, changes no training state, and keeps serving the honest client."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from silotune.config import Config, load_config
from silotune.security.cipher import PlainFrames
from silotune.security.tls import create_dev_pki
from silotune.split.adapters import add_segment_adapter
from silotune.split.link import MiddleLink, RemoteMiddle, SplitError
from silotune.split.model import SplitCausalLM
from silotune.split.protocol import Frame, Kind, decode, encode, run_id
from silotune.split.segments import split_model
from silotune.split.server import serve
from silotune.split.trainers import adapter_state, build_trainer
from silotune.split.transport import open_channel, stream_method
from tests.test_split import (
    batch,
    client_model,
    genuine_activations,
    running_server,
    split_config,
    tiny_llama,
    train_client,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

Mutation = Callable[[dict[str, object]], None]


def reheader(raw: bytes, mutate: Mutation) -> bytes:
    """`raw` (a sealed frame) with its clear header changed by `mutate`, payload untouched."""
    (n,) = struct.unpack(">I", raw[:4])
    head = json.loads(raw[4 : 4 + n])
    mutate(head)
    header = json.dumps(head).encode()
    return struct.pack(">I", len(header)) + header + raw[4 + n :]


def _shape(index: int, shape: object) -> Mutation:
    def mutate(head: dict[str, object]) -> None:
        head["tensors"][index]["shape"] = shape  # type: ignore[index]

    return mutate


def _drop_tensor(name: str) -> Mutation:
    def mutate(head: dict[str, object]) -> None:
        head["tensors"] = [t for t in head["tensors"] if t["name"] != name]  # type: ignore[attr-defined]

    return mutate


def header_attacks(rows: int, tokens: int, d: int) -> dict[str, Mutation]:
    """Ways to lie in the clear header of a genuine activations frame of (rows, tokens, d)."""
    return {
        "huge shape": _shape(0, [2**32, 2**32, d]),
        "negative shape": _shape(0, [-rows, tokens, d]),
        "non-numeric shape": _shape(0, [str(rows), tokens, d]),
        "zero-size tensor": _shape(0, [0, tokens, d]),
        "wrong hidden size": _shape(0, [rows, tokens // 2, 2 * d]),
        "mask unlike the hidden states": _shape(1, [rows - 1, 2]),
        "mask narrower than the hidden states": lambda head: head.__setitem__("mask_width", 1),
        "mask width as text": lambda head: head.__setitem__("mask_width", str(tokens)),
        "no mask": _drop_tensor("mask_span"),
        "missing hidden": _drop_tensor("hidden"),
        "unknown kind": lambda head: head.__setitem__("kind", "shutdown"),
        "hello mid-session": lambda head: head.__setitem__("kind", "hello"),
        "training flag as text": lambda head: head.__setitem__("train", "yes"),
        "unknown cache instruction": lambda head: head.__setitem__("cache", "all"),
    }


def refused(send: Callable[[], object]) -> str:
    """The server's ERROR message for one request (the test fails if it was accepted)."""
    with pytest.raises(SplitError) as caught:
        send()
    return str(caught.value)


@pytest.mark.parametrize("mode", ["serial", "batch"])
def test_hostile_frames_are_refused_and_change_nothing(mode: str) -> None:
    config = split_config(f"split.mode={mode}", "split.tls=false", "split.batch_window_s=0.2")
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    with running_server(segments, config) as (port, trainer):
        evil, link = client_model(config, port, "evil", 0)
        ids, mask, _ = batch()
        hidden = evil.front(ids, mask).detach()
        before = adapter_state(segments.middle)

        # Header attacks are refused before decryption: the genuine frame with the same
        # sequence number still opens afterwards.
        genuine = genuine_activations(link, hidden, mask)
        for name, mutate in header_attacks(*hidden.shape).items():
            message = refused(lambda m=mutate: link.send_raw(reheader(genuine, m)))  # type: ignore[misc]
            assert "split server:" in message, name
        assert link.send_raw(genuine).kind == Kind.HIDDEN

        nan = hidden.clone()
        nan[0, 0, 0] = float("nan")
        assert "NaN" in refused(lambda: link.forward(nan, mask, train=True))
        inf = hidden.clone()
        inf[1, 2, 3] = float("inf")
        assert "NaN or Inf" in refused(lambda: link.forward(inf, mask, train=False))
        out = link.forward(hidden, mask, train=True)  # a real forward, then bad gradients
        bad_grad = torch.ones_like(out)
        bad_grad[0, 0, 0] = float("nan")
        assert "NaN" in refused(lambda: link.backward(bad_grad))
        link.forward(hidden, mask, train=True)
        assert "shape" in refused(lambda: link.backward(torch.ones(2, 5, out.shape[2])))
        # A gradient after a refused one: the step was dropped, not kept half-done.
        assert refused(lambda: link.backward(torch.ones_like(out)))
        assert trainer.steps == 0
        after = adapter_state(segments.middle)
        assert all(torch.equal(before[k], after[k]) for k in before)  # no state touched

        # The same (hostile) client's session goes on, and an honest one trains normally.
        honest, honest_link = client_model(config, port, "honest", 1)
        losses = train_client(honest, 2, seed=1)
        assert all(math.isfinite(x) for x in losses)
        assert trainer.steps == 2
        assert all(bool(torch.isfinite(v).all()) for v in adapter_state(segments.middle).values())
        honest_link.close()
        link.close()


def test_hostile_averages_are_refused_and_weights_capped() -> None:
    config = split_config("split.tls=false", "split.step_timeout_s=20")
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    with running_server(segments, config) as (port, trainer):
        clients = [client_model(config, port, f"c{i}", i) for i in range(3)]
        states = [adapter_state(model) for model, _ in clients]
        evil = clients[2][1]
        good = states[2]
        name = next(iter(good))
        attacks: list[tuple[dict[str, torch.Tensor], object]] = [
            ({**good, name: torch.full_like(good[name], float("nan"))}, 1.0),
            (good, float("nan")),
            (good, 0.0),
            (good, -5.0),
            (good, "many"),
            ({**good, name: torch.zeros(3, 3)}, 1.0),
            ({k: v for k, v in good.items() if k != name}, 1.0),
            ({**good, "extra.weight": torch.zeros(2)}, 1.0),
        ]
        for state, weight in attacks:
            frame = Frame(Kind.AVERAGE, evil.step, state, {"weight": weight})
            refused(lambda f=frame: evil.call(f))  # type: ignore[misc]
        assert trainer.rounds == 0  # nothing was deposited
        # Frames refused from their header used no sequence number, so this session's own
        # numbering is now ahead of the server's: the client starts a new one (replacing it).
        clients[2] = (clients[2][0], MiddleLink(config, "c2", f"localhost:{port}", None))

        def average(i: int, weight: float) -> dict[str, torch.Tensor]:
            return clients[i][1].average(states[i], weight)

        results: list[dict[str, torch.Tensor]] = [{}] * 3
        weights = [4.0, 6.0, 1e30]  # the third claims to hold all the data in the world
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, average(i, weights[i])))
            for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        cap = 10 * 6.0  # federated.max_weight_ratio x the median weight
        for key in good:
            expected = (4 * states[0][key] + 6 * states[1][key] + cap * states[2][key]) / 70
            torch.testing.assert_close(results[0][key], expected)
        assert trainer.rounds == 1
        for _, link in clients:
            link.close()


def test_one_session_per_client_and_an_allowlist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("silotune.split.server.HANDSHAKE_S", 1.0)
    create_dev_pki(tmp_path, ["site-a", "site-b"])
    config = split_config()
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    trainer = build_trainer(segments.middle, config)
    server, port, service = serve(trainer, config, "127.0.0.1:0", tmp_path, 0, {"site-a"})
    try:
        with pytest.raises(SplitError, match="not one of this server's clients"):
            MiddleLink(config, "site-b", f"localhost:{port}", tmp_path)
        # A stream that never completes its handshake is closed: it would hold a worker.
        channel = open_channel(f"localhost:{port}", tmp_path, "site-b")
        mute = stream_method(channel)(iter(threading.Event().wait, True))
        deadline = time.monotonic() + 10
        while service.state.streams and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not service.state.streams
        with pytest.raises(grpc.RpcError):
            next(mute)
        channel.close()
        # Many sessions under one identity: each replaces the last, so they hold one place.
        links = [MiddleLink(config, "site-a", f"localhost:{port}", tmp_path) for _ in range(8)]
        assert len(service.state.live) == 1
        s = split_model(tiny_llama(), 1, 1)
        model = SplitCausalLM(s.front, s.back, RemoteMiddle(links[-1]))
        ids, mask, labels = batch()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        assert trainer.steps == 1
        with pytest.raises(SplitError):  # an older session was closed by the newer one
            links[0].forward(model.front(ids, mask), mask, train=False)
        links[-1].close()
    finally:
        server.stop(grace=None)


def test_a_silent_session_is_closed() -> None:
    config = split_config("split.tls=false", "split.idle_timeout_s=1")
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    with running_server(segments, config) as (port, _):
        model, link = client_model(config, port, "sleepy", 0)
        ids, mask, _ = batch()
        time.sleep(3)
        with pytest.raises(SplitError, match=r"CANCELLED|closed"):
            link.forward(model.front(ids, mask), mask, train=False)


# --- a real server process -------------------------------------------------------------------


def _server_overrides() -> list[str]:
    return ["model.tiny_layers=3", "lora.dropout=0.0", "train.lr=0.01", "split.idle_timeout_s=60"]


@contextmanager
def server_process(out: Path, certs: Path) -> Iterator[int]:
    """`silotune split-server` for clients honest and evil; yields its port and its pid."""
    sets = [arg for kv in _server_overrides() for arg in ("--set", kv)]
    cmd = [sys.executable, "-m", "silotune.cli", "split-server", str(CONFIGS / "tiny.toml")]
    cmd += [*sets, "--certs", str(certs), "--listen", "127.0.0.1:0", "--out", str(out)]
    cmd += ["--clients", "honest,evil"]
    log = (out.parent / f"{out.name}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "port").is_file():
            assert proc.poll() is None, (out.parent / f"{out.name}.log").read_text()
            assert time.monotonic() < deadline, "the split server did not start"
            time.sleep(0.2)
        yield proc.pid
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
        log.close()


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def honest_client(config: Config, port: int, certs: Path) -> tuple[SplitCausalLM, MiddleLink]:
    from silotune.split.loading import load_segments

    s = load_segments(config, "client")
    add_segment_adapter(s.front, config, "front")
    add_segment_adapter(s.back, config, "back")
    link = MiddleLink(config, "honest", f"localhost:{port}", certs)
    return SplitCausalLM(s.front, s.back, RemoteMiddle(link)), link


def honest_steps(model: SplitCausalLM, steps: int, gen: torch.Generator) -> None:
    for _ in range(steps):
        ids = torch.randint(0, 200, (2, 16), generator=gen)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()


@pytest.mark.slow
def test_a_real_server_survives_a_hostile_client(tmp_path: Path) -> None:
    """Against `silotune split-server`: a 900 MiB frame, hostile frames and sessions; the
    server's memory stays put, the honest client's steps and the middle adapter are exactly
    those of a run without the hostile client, and the log has no traceback."""
    certs = tmp_path / "pki"
    create_dev_pki(certs, ["honest", "evil", "stranger"])
    config = load_config(CONFIGS / "tiny.toml", _server_overrides())

    # Reference: the honest client alone (the evil one only says goodbye).
    with server_process(tmp_path / "alone", certs) as _:
        port = int((tmp_path / "alone" / "port").read_text())
        model, link = honest_client(config, port, certs)
        honest_steps(model, 3, torch.Generator().manual_seed(7))
        link.close()
        MiddleLink(config, "evil", f"localhost:{port}", certs).close()
    reference = (tmp_path / "alone" / "middle-adapter.safetensors").read_bytes()

    out = tmp_path / "attacked"
    with server_process(out, certs) as pid:
        port = int((out / "port").read_text())
        model, link = honest_client(config, port, certs)
        gen = torch.Generator().manual_seed(7)
        honest_steps(model, 1, gen)
        rss_before = peak_rss(pid)
        huge = b"\0" * (900 << 20)  # a "hello" before any key agreement, on a fresh stream
        channel = open_channel(f"localhost:{port}", certs, "evil")
        with pytest.raises(grpc.RpcError) as caught:
            next(stream_method(channel)(iter([huge])))
        channel.close()
        del huge
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert peak_rss(pid) - rss_before < 64 << 20
        with pytest.raises(SplitError, match="not one of this server's clients"):
            MiddleLink(config, "stranger", f"localhost:{port}", certs)
        evil = MiddleLink(config, "evil", f"localhost:{port}", certs)
        hidden = torch.randn(2, 16, config_hidden(config))
        mask = torch.ones(2, 16, dtype=torch.long)
        nan = hidden.clone()
        nan[0, 0, 0] = float("nan")
        refused(lambda: evil.forward(nan, mask, train=True))
        genuine = genuine_activations(evil, hidden, mask)
        for name, mutate in header_attacks(*hidden.shape).items():
            assert "split server:" in refused(
                lambda m=mutate: evil.send_raw(reheader(genuine, m))
            ), name  # type: ignore[misc]
        assert evil.send_raw(genuine).kind == Kind.HIDDEN
        answer = evil.forward(hidden, mask, train=True)
        refused(lambda: evil.backward(torch.full_like(answer, float("nan"))))
        adapter = {name: torch.zeros(shape) for name, shape in client_layout(config).items()}
        for weight in (float("nan"), 0.0, -1.0):
            refused(lambda w=weight: evil.average(adapter, w))  # type: ignore[misc]
        honest_steps(model, 2, gen)  # the hostile client cost the honest one nothing
        link.close()
        # Frames refused from their header used no sequence number on the server, so this
        # session's numbering ran ahead: it can only end without a goodbye.
        evil.broken = True
        evil.close()
    assert (out / "middle-adapter.safetensors").read_bytes() == reference
    summary = json.loads((out / "server.json").read_text())
    assert summary["steps"] == 3
    assert summary["clients"]["evil"]["rejected"] >= 1
    assert summary["clients"]["honest"]["rejected"] == 0
    log = (tmp_path / "attacked.log").read_text()
    assert "Traceback" not in log
    middle = load_file(str(out / "middle-adapter.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in middle.values())
    assert os.path.exists(out / "server.json")


def config_hidden(config: Config) -> int:
    return int(config.model.tiny_hidden)


def client_layout(config: Config) -> dict[str, tuple[int, ...]]:
    """The front/back adapter layout a client of this config averages."""
    from silotune.split.loading import load_segments
    from silotune.split.screen import client_adapter_layout

    return client_adapter_layout(config, load_segments(config, "client").front.config)


@pytest.mark.parametrize("mode", ["serial", "batch", "per-client"])
def test_attacks_during_training_do_not_hold_honest_steps(mode: str) -> None:
    """A hostile client attacking while the honest one trains: its refused steps leave the
    stacked batch and the averaging meetings at once, so the honest one never waits for it."""
    config = split_config(
        f"split.mode={mode}",
        "split.tls=false",
        "split.batch_window_s=0.2",
        "split.step_timeout_s=30",
    )
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    with running_server(segments, config) as (port, trainer):
        evil, evil_link = client_model(config, port, "evil", 0)
        honest, honest_link = client_model(config, port, "honest", 1)
        ids, mask, _ = batch()
        hidden = evil.front(ids, mask).detach()
        nan_grad = torch.full_like(hidden, float("nan"))
        stop = threading.Event()
        refusals = [0]

        def attack() -> None:
            while not stop.is_set():
                for hit in (
                    lambda: (evil_link.forward(hidden, mask, True), evil_link.backward(nan_grad)),
                    lambda: evil_link.backward(torch.ones(1, 2, hidden.shape[2])),
                ):
                    with pytest.raises(SplitError):
                        hit()
                    refusals[0] += 1

        attacker = threading.Thread(target=attack)
        attacker.start()
        began = time.monotonic()
        try:
            losses = train_client(honest, 4, seed=1)
        finally:
            stop.set()
            attacker.join(60)
        assert time.monotonic() - began < 20  # never the 30 s step timeout
        assert refusals[0] >= 2 and all(math.isfinite(x) for x in losses)
        assert all(bool(torch.isfinite(v).all()) for v in adapter_state(segments.middle).values())
        if mode != "per-client":
            assert trainer.steps == 4
        honest_link.close()
        evil_link.close()


def test_a_malformed_handshake_gets_one_error_and_ends_the_stream() -> None:
    config = split_config("split.tls=false")
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    with running_server(segments, config) as (port, trainer):
        for key in ("not base64!", 7, "A" * 100_000):
            channel = open_channel(f"localhost:{port}", None, "x")
            sealer = PlainFrames("client")
            hello = Frame(Kind.HELLO, meta={"client": "x", "run": run_id(config), "key": key})
            replies = stream_method(channel)(iter([encode(hello, sealer)]))
            reply = decode(next(replies), sealer)
            assert reply.kind == Kind.ERROR and "key" in reply.meta["message"], reply.meta
            with pytest.raises(StopIteration):  # the server ended the stream
                next(replies)
            channel.close()
        assert trainer.members == set()
