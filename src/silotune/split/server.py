"""The split server: holds the middle blocks and their adapter, serves one stream per client.

A session: HELLO (who, which run, key offer) → WELCOME (key answer) → KEY (key final) → READY,
then ACTIVATIONS → HIDDEN and GRAD → GRAD_INPUT for every step, AVERAGE → AVERAGED at a
round's end, BYE. Every request gets exactly one reply; a frame that fails its checks
(`split.screen`: what this run's model and this session expect) gets an ERROR reply and changes
nothing, so the genuine frame can still follow. Only allowed client ids get a session, one live
session per id (a new HELLO replaces the old one), and a session silent for
`split.idle_timeout_s` is closed.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import rsa

from silotune.config import Config
from silotune.errors import FrameRejected, UserError
from silotune.security.cipher import PlainFrames, ServerHandshake, session_ciphers
from silotune.security.tls import peer_identity
from silotune.split.codecs import FloatCodec, decode_mask
from silotune.split.protocol import Frame, Kind, TensorSpec, decode, encode, run_id
from silotune.split.records import ClientStats
from silotune.split.screen import Limits, check_values
from silotune.split.trainers import MiddleTrainer, StepDropped
from silotune.split.transport import TimedSealer, start_server

log = logging.getLogger(__name__)
_SESSION_KINDS = (Kind.ACTIVATIONS, Kind.GRAD, Kind.AVERAGE, Kind.BYE)  # after READY
HANDSHAKE_S = 30.0  # a client sends its hello and key at once; a stream that does not is closed


@dataclass
class ServerState:
    """Sessions seen so far; `done` is set once `expected` clients have ended theirs."""

    expected: int
    stats: dict[str, ClientStats] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    done: threading.Event = field(default_factory=threading.Event)
    live: dict[str, _Session] = field(default_factory=dict)  # the one session of each client
    streams: set[_Session] = field(default_factory=set)  # every open stream, ready or not


class SplitService:
    """The gRPC handler: authenticates each stream, agrees keys, drives the trainer."""

    def __init__(
        self,
        trainer: MiddleTrainer,
        config: Config,
        tls: bool,
        expected: int,
        allowed: set[str] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.trainer = trainer
        self.config = config
        self.tls = tls
        self.run = run_id(config)
        self.state = ServerState(expected)
        self.allowed = allowed  # None: any client the CA signed
        self.limits = limits or Limits.of(config, trainer.middle.config)
        self.activations, self.gradients = FloatCodec.pair(config.split)
        # One RSA key per server process (generating one per session costs ~0.1 s).
        self.rsa_key = (
            rsa.generate_private_key(public_exponent=65537, key_size=3072)
            if config.split.key_exchange == "rsa"
            else None
        )
        self.lock = threading.Lock()

    def __call__(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """One client's session."""
        session = _Session(self, peer_identity(context) if self.tls else None, context)
        with self.lock:
            self.state.streams.add(session)
        try:
            for raw in requests:
                yield session.handle(raw)
                if session.closed:
                    return
        finally:
            with self.lock:
                self.state.streams.discard(session)
            session.end()

    def stats_for(self, client: str) -> ClientStats:
        """The running totals of `client`'s sessions."""
        with self.lock:
            return self.state.stats.setdefault(client, ClientStats())

    def close_idle(self) -> None:
        """Cancel the sessions that have not sent a frame for `split.idle_timeout_s`, and streams
        that have not completed their handshake within HANDSHAKE_S (they hold a worker)."""
        idle = self.config.split.idle_timeout_s
        with self.lock:
            sessions = list(self.state.streams)
        for session in sessions:
            limit = idle if session.ready else min(idle, HANDSHAKE_S)
            if session.idle_s() > limit:
                log.warning(
                    "client %s: no frame for %g s; closing its session", session.client, limit
                )
                session.context.cancel()


class _Session:
    """The state of one stream: identity, sealers, and the handlers for each frame kind."""

    def __init__(
        self, service: SplitService, identity: str | None, context: grpc.ServicerContext
    ) -> None:
        self.service = service
        self.identity = identity
        self.context = context
        self.client = identity or "?"
        self.busy = False  # a request is being answered (waiting for others is not idleness)
        self.kind: Kind | None = None  # the kind of the frame being handled, once its header parsed
        self.last_seen = time.monotonic()
        self.inbound = TimedSealer(PlainFrames("server"))
        self.outbound = self.inbound
        self.handshake: ServerHandshake | None = None
        self.switch_to: TimedSealer | None = None
        self.ready = False
        self.closed = False
        # Counted per client over all its sessions (an identity known from its certificate).
        self.stats = service.stats_for(identity) if identity else ClientStats()
        self.handlers: dict[Kind, Callable[[Frame], Frame]] = {
            Kind.HELLO: self.on_hello,
            Kind.KEY: self.on_key,
            Kind.ACTIVATIONS: self.on_activations,
            Kind.GRAD: self.on_grad,
            Kind.AVERAGE: self.on_average,
            Kind.BYE: self.on_bye,
        }

    def idle_s(self) -> float:
        """Seconds since this session's last frame was answered (0 while one is handled)."""
        return 0.0 if self.busy else time.monotonic() - self.last_seen

    def handle(self, raw: bytes) -> bytes:
        """Decode, screen, dispatch and answer one request frame."""
        self.busy, self.kind = True, None
        self.stats.frames_in += 1
        self.stats.bytes_in += len(raw)
        try:
            frame = decode(raw, self.inbound, self.expect)
            check_values(frame)
            reply = self.handlers[frame.kind](frame)
        except (FrameRejected, StepDropped, UserError) as exc:
            reply = self.refuse(str(exc))
        except Exception as exc:  # a bug on our side must not end the stream or leak a traceback
            log.debug("client %s: internal error", self.client, exc_info=True)
            reply = self.refuse(f"internal error ({type(exc).__name__}: {exc})")
        finally:
            self.busy, self.last_seen = False, time.monotonic()
        if reply.kind == Kind.ERROR and not self.ready:
            self.closed = True  # a failed handshake ends the stream (it held a worker)
        out = encode(reply, self.outbound)
        self.stats.bytes_out += len(out)
        if self.switch_to is not None:
            self.inbound = self.outbound = self.switch_to
            self.switch_to = None
        return out

    def refuse(self, message: str) -> Frame:
        """Count and log a refused request; the ERROR reply that answers it. A refused step
        (activations or gradient) ends there, so the other clients need not wait for it."""
        self.stats.rejected += 1
        log.warning("client %s: %s", self.client, message)
        if self.ready and self.kind in (Kind.ACTIVATIONS, Kind.GRAD):
            self.service.trainer.refused(self.client, f"its step was refused ({message})")
        return Frame(Kind.ERROR, meta={"message": message})

    def expect(self, kind: Kind, specs: list[TensorSpec], meta: dict[str, Any]) -> None:
        """Screen a frame from its header: allowed at this point of the session, and shaped as
        this run's model allows (before a payload byte is decrypted or copied)."""
        self.kind = kind
        allowed = _SESSION_KINDS if self.ready else (Kind.HELLO, Kind.KEY)
        if kind not in allowed or (kind == Kind.HELLO and self.handshake is not None):
            raise FrameRejected(f"unexpected {kind} frame at this point of the session")
        self.service.limits.check_header(kind, specs, meta)

    def on_hello(self, frame: Frame) -> Frame:
        claimed = frame.meta.get("client")
        if not isinstance(claimed, str) or not claimed:
            raise FrameRejected("hello names no client")
        if self.identity is not None and claimed != self.identity:
            raise FrameRejected(
                f"client says it is {claimed!r} but its certificate is for {self.identity!r}"
            )
        allowed = self.service.allowed
        if allowed is not None and claimed not in allowed:
            raise FrameRejected(f"client {claimed!r} is not one of this server's clients")
        if frame.meta.get("run") != self.service.run:
            raise FrameRejected(
                f"client run {frame.meta.get('run')!r} differs from the server's "
                f"{self.service.run!r}: use the same model, lora, split and train settings"
            )
        self.client = claimed
        split = self.service.config.split
        if not split.encrypt:
            return self.start()
        offer = _key_bytes(frame)
        self.handshake = ServerHandshake.respond(offer, rsa_key=self.service.rsa_key)
        return Frame(Kind.WELCOME, meta={"key": base64.b64encode(self.handshake.reply()).decode()})

    def on_key(self, frame: Frame) -> Frame:
        if self.handshake is None or self.ready:
            raise FrameRejected("key frame without a pending key agreement")
        secret = self.handshake.finish(_key_bytes(frame))
        sealer = session_ciphers(
            secret, self.handshake.salt, self.service.run, self.client, "server"
        )
        # READY still goes out under the handshake sealer; both sides switch after it.
        self.switch_to = TimedSealer(sealer)
        return self.start()

    def start(self) -> Frame:
        if self.identity is None:  # known only now, from its hello
            self.stats = self.service.stats_for(self.client)
        with self.service.lock:
            state = self.service.state
            previous = state.live.get(self.client)
            state.live[self.client] = self
        if previous is not None:  # one live session per client: the newer one wins
            log.warning("client %s opened a new session; closing its old one", self.client)
            previous.context.cancel()
            self.service.trainer.leave(self.client)  # frees what the old session held
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
        service = self.service
        hidden = service.activations.decode("hidden", frame.tensors, service.limits.hidden_size)
        mask = decode_mask(frame.tensors, frame.meta)  # (b, t): t = q, or cached + q (generating)
        trainer = self.service.trainer
        start = time.perf_counter()
        if frame.meta.get("train", False):  # screened: a bool, and no cache with training
            micro = service.limits.micro(frame.kind, frame.meta)
            out = trainer.forward(self.client, hidden, mask, micro)
        else:
            out = trainer.infer(self.client, hidden, mask, frame.meta.get("cache", ""))
        server_s = time.perf_counter() - start
        tensors = service.activations.encode("hidden", out)
        return Frame(Kind.HIDDEN, frame.step, tensors, {"server_s": server_s})

    def on_grad(self, frame: Frame) -> Frame:
        service = self.service
        start = time.perf_counter()
        grad = service.gradients.decode("grad", frame.tensors, service.limits.hidden_size)
        micro = service.limits.micro(frame.kind, frame.meta)
        grad = service.trainer.backward(self.client, grad, micro)
        server_s = time.perf_counter() - start
        tensors = service.gradients.encode("grad", grad)
        return Frame(Kind.GRAD_INPUT, frame.step, tensors, {"server_s": server_s})

    def on_average(self, frame: Frame) -> Frame:
        weight = float(frame.meta["weight"])  # screened: finite and positive
        averaged = self.service.trainer.average_clients(self.client, frame.tensors, weight)
        return Frame(Kind.AVERAGED, frame.step, averaged)

    def on_bye(self, frame: Frame) -> Frame:
        self.stats.finished = True
        self.closed = True
        return Frame(Kind.BYE)

    def end(self) -> None:
        """The stream ended (cleanly or not): free what the client held, count it."""
        self.stats.crypto_s += self.inbound.seconds
        if not self.ready:
            return
        state = self.service.state
        with self.service.lock:
            if state.live.get(self.client) is not self:
                return  # replaced by a newer session of the same client, which holds its place
            del state.live[self.client]
        self.service.trainer.leave(self.client)
        with self.service.lock:
            state.ended.add(self.client)
            if state.expected and len(state.ended) >= state.expected:
                state.done.set()


def _key_bytes(frame: Frame) -> bytes:
    """The handshake key material a frame carries, strictly base64."""
    key = frame.meta.get("key")
    if not isinstance(key, str) or len(key) > 8192:
        raise FrameRejected(f"{frame.kind} frame carries no usable key")
    try:
        return base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise FrameRejected(f"{frame.kind} frame key is not valid base64") from None


def serve(
    trainer: MiddleTrainer,
    config: Config,
    listen: str,
    certs: Path | None,
    expected: int,
    allowed: set[str] | None = None,
) -> tuple[grpc.Server, int, SplitService]:
    """Start serving; the caller waits on `service.state.done` (or forever when expected = 0).

    `allowed`: the client ids that may open a session (None: any the CA signed)."""
    service = SplitService(trainer, config, certs is not None, expected, allowed)
    workers = (len(allowed) if allowed else expected or 60) + 4
    server, port = start_server(listen, certs, service, workers, service.limits.max_frame_bytes())
    watchdog = threading.Thread(target=_watch_idle, args=(service,), daemon=True)
    watchdog.start()
    return server, port, service


def _watch_idle(service: SplitService) -> None:
    """Close idle sessions until the server is done (a daemon thread dies with the process)."""
    interval = min(1.0, service.config.split.idle_timeout_s / 4)
    while not service.state.done.wait(interval):
        service.close_idle()
