"""The split server: holds the middle blocks and their adapter, serves one stream per client.

A session: HELLO (who, which run, key offer) → WELCOME (key answer) → KEY (key final) → READY,
then ACTIVATIONS → HIDDEN and GRAD → GRAD_INPUT for every step, AVERAGE → AVERAGED at a
round's end, BYE. Every request gets exactly one reply; a frame that fails its checks gets an
ERROR reply and changes nothing, so the genuine frame can still follow.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric import rsa

from silotune.config import Config
from silotune.errors import FrameRejected, UserError
from silotune.security.cipher import PlainFrames, ServerHandshake, session_ciphers
from silotune.security.tls import peer_identity
from silotune.split.protocol import WIRE_DTYPES, Frame, Kind, decode, encode, run_id
from silotune.split.trainers import MiddleTrainer, StepDropped
from silotune.split.transport import TimedSealer, start_server

log = logging.getLogger(__name__)


@dataclass
class ClientStats:
    """What one client's session cost the server."""

    frames_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    crypto_s: float = 0.0
    rejected: int = 0
    finished: bool = False


@dataclass
class ServerState:
    """Sessions seen so far; `done` is set once `expected` clients have ended theirs."""

    expected: int
    stats: dict[str, ClientStats] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    done: threading.Event = field(default_factory=threading.Event)


class SplitService:
    """The gRPC handler: authenticates each stream, agrees keys, drives the trainer."""

    def __init__(self, trainer: MiddleTrainer, config: Config, tls: bool, expected: int) -> None:
        self.trainer = trainer
        self.config = config
        self.tls = tls
        self.run = run_id(config)
        self.state = ServerState(expected)
        self.wire = WIRE_DTYPES[config.split.wire_dtype]
        # One RSA key per server process (generating one per session costs ~0.1 s).
        self.rsa_key = (
            rsa.generate_private_key(public_exponent=65537, key_size=3072)
            if config.split.key_exchange == "rsa"
            else None
        )
        self.lock = threading.Lock()

    def __call__(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """One client's session."""
        session = _Session(self, peer_identity(context) if self.tls else None)
        try:
            for raw in requests:
                yield session.handle(raw)
                if session.closed:
                    return
        finally:
            session.end()


class _Session:
    """The state of one stream: identity, sealers, and the handlers for each frame kind."""

    def __init__(self, service: SplitService, identity: str | None) -> None:
        self.service = service
        self.identity = identity
        self.client = identity or "?"
        self.inbound = TimedSealer(PlainFrames("server"))
        self.outbound = self.inbound
        self.handshake: ServerHandshake | None = None
        self.switch_to: TimedSealer | None = None
        self.ready = False
        self.closed = False
        self.stats = ClientStats()
        self.handlers: dict[Kind, Callable[[Frame], Frame]] = {
            Kind.HELLO: self.on_hello,
            Kind.KEY: self.on_key,
            Kind.ACTIVATIONS: self.on_activations,
            Kind.GRAD: self.on_grad,
            Kind.AVERAGE: self.on_average,
            Kind.BYE: self.on_bye,
        }

    def handle(self, raw: bytes) -> bytes:
        """Decode, dispatch and answer one request frame."""
        self.stats.frames_in += 1
        self.stats.bytes_in += len(raw)
        try:
            frame = decode(raw, self.inbound)
            handler = self.handlers.get(frame.kind)
            if handler is None or (not self.ready and frame.kind not in (Kind.HELLO, Kind.KEY)):
                raise FrameRejected(f"unexpected {frame.kind} frame at this point of the session")
            reply = handler(frame)
        except (FrameRejected, StepDropped, UserError) as exc:
            self.stats.rejected += 1
            log.warning("client %s: %s", self.client, exc)
            reply = Frame(Kind.ERROR, meta={"message": str(exc)})
        out = encode(reply, self.outbound)
        self.stats.bytes_out += len(out)
        if self.switch_to is not None:
            self.inbound = self.outbound = self.switch_to
            self.switch_to = None
        return out

    def on_hello(self, frame: Frame) -> Frame:
        claimed = str(frame.meta.get("client", ""))
        if self.identity is not None and claimed != self.identity:
            raise FrameRejected(
                f"client says it is {claimed!r} but its certificate is for {self.identity!r}"
            )
        if frame.meta.get("run") != self.service.run:
            raise FrameRejected(
                f"client run {frame.meta.get('run')!r} differs from the server's "
                f"{self.service.run!r}: use the same model, lora, split and train settings"
            )
        self.client = claimed
        split = self.service.config.split
        if not split.encrypt:
            return self.start()
        offer = base64.b64decode(str(frame.meta.get("key", "")))
        self.handshake = ServerHandshake.respond(offer, rsa_key=self.service.rsa_key)
        return Frame(Kind.WELCOME, meta={"key": base64.b64encode(self.handshake.reply()).decode()})

    def on_key(self, frame: Frame) -> Frame:
        if self.handshake is None or self.ready:
            raise FrameRejected("key frame without a pending key agreement")
        secret = self.handshake.finish(base64.b64decode(str(frame.meta.get("key", ""))))
        sealer = session_ciphers(
            secret, self.handshake.salt, self.service.run, self.client, "server"
        )
        # READY still goes out under the handshake sealer; both sides switch after it.
        self.switch_to = TimedSealer(sealer)
        return self.start()

    def start(self) -> Frame:
        with self.service.lock:
            self.service.state.stats[self.client] = self.stats
        self.service.trainer.join(self.client)
        self.ready = True
        trainer = self.service.trainer
        meta = {
            "mode": self.service.config.split.mode,
            "round": trainer.rounds,
            "resumed": trainer.resumed,
        }
        return Frame(Kind.READY, meta=meta)

    def on_activations(self, frame: Frame) -> Frame:
        hidden = frame.tensors["hidden"].float()  # (b, t, d)
        mask = frame.tensors["mask"].long()  # (b, t)
        trainer = self.service.trainer
        start = time.perf_counter()
        if frame.meta.get("train", False):
            out = trainer.forward(self.client, hidden, mask)
        else:
            cache = str(frame.meta.get("cache", ""))
            if cache not in ("", "new", "next"):
                raise FrameRejected(f"unknown cache instruction {cache!r}")
            out = trainer.infer(self.client, hidden, mask, cache)  # type: ignore[arg-type]
        server_s = time.perf_counter() - start
        tensors = {"hidden": out.to(self.service.wire)}
        return Frame(Kind.HIDDEN, frame.step, tensors, {"server_s": server_s})

    def on_grad(self, frame: Frame) -> Frame:
        start = time.perf_counter()
        grad = self.service.trainer.backward(self.client, frame.tensors["grad"].float())
        server_s = time.perf_counter() - start
        tensors = {"grad": grad.to(self.service.wire)}
        return Frame(Kind.GRAD_INPUT, frame.step, tensors, {"server_s": server_s})

    def on_average(self, frame: Frame) -> Frame:
        weight = float(frame.meta.get("weight", 1.0))
        averaged = self.service.trainer.average_clients(self.client, frame.tensors, weight)
        return Frame(Kind.AVERAGED, frame.step, averaged)

    def on_bye(self, frame: Frame) -> Frame:
        self.stats.finished = True
        self.closed = True
        return Frame(Kind.BYE)

    def end(self) -> None:
        """The stream ended (cleanly or not): free what the client held, count it."""
        self.stats.crypto_s = self.inbound.seconds
        if not self.ready:
            return
        self.service.trainer.leave(self.client)
        state = self.service.state
        with self.service.lock:
            state.ended.add(self.client)
            if state.expected and len(state.ended) >= state.expected:
                state.done.set()


def serve(
    trainer: MiddleTrainer,
    config: Config,
    listen: str,
    certs: Path | None,
    expected: int,
) -> tuple[grpc.Server, int, SplitService]:
    """Start serving; the caller waits on `service.state.done` (or forever when expected = 0)."""
    service = SplitService(trainer, config, tls=certs is not None, expected=expected)
    server, port = start_server(listen, certs, service, workers=expected + 4 if expected else 64)
    return server, port, service
