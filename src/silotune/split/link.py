"""A split client's session with the server: the link, its costs, and the middle behind it.

`MiddleLink` is one client's gRPC stream (handshake, frames, averaging); `RemoteMiddle` makes it
a callable middle whose autograd function sends activations forward and gradients back.
"""

from __future__ import annotations

import base64
import binascii
import math
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import torch

from silotune.config import Config
from silotune.defences.split import WireNoise
from silotune.errors import FrameRejected, UserError
from silotune.modeling.adapters import StateDict
from silotune.privacy.noise import mechanism_seed
from silotune.security.cipher import ClientHandshake, PlainFrames, session_ciphers
from silotune.split.codecs import FloatCodec, encode_mask
from silotune.split.protocol import Frame, Kind, decode, encode, run_id
from silotune.split.records import LinkStats
from silotune.split.replies import averaged_adapter, reply_tensor
from silotune.split.transport import TimedSealer, open_channel, stream_method


class SplitError(UserError):
    """The split server refused a request or the connection failed; the message says why."""


class MiddleLink:
    """One client's session with the split server (a bidirectional gRPC stream)."""

    def __init__(self, config: Config, client_id: str, target: str, certs: Path | None) -> None:
        self.config = config
        self.client_id = client_id
        self.activations, self.gradients = FloatCodec.pair(config.split)
        self.sealer = TimedSealer(PlainFrames("client"))
        self.stats = LinkStats()
        self.step = 0
        self.server_round = 0  # the rounds the server had finished when this session began
        self.server_resumed = False  # the server started from a checkpoint
        self.broken = False  # the stream failed: no goodbye is possible
        # The configured defences: noise on everything this client lets the server see.
        self.noise = WireNoise(
            config.defence,
            mechanism_seed(config.privacy, config.experiment.seed, "wire-noise", client_id),
        )
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._channel = open_channel(target, certs, client_id)
        timeout = config.split.connect_timeout_s
        try:  # the server may still be starting: wait for it rather than fail (or sleep)
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise SplitError(
                f"cannot reach the split server at {target} within {timeout:g} s; check the "
                "address, that the server runs, and that this client's certificate is signed "
                "by the server's CA"
            ) from None
        self._replies: Iterator[bytes] = stream_method(self._channel)(self._requests())
        self.target = target
        # Sees every frame and its wire bytes before they are sent (tests inspect them).
        self.on_frame: Callable[[Frame, bytes], None] | None = None
        self._handshake()

    def _requests(self) -> Iterator[bytes]:
        while (item := self._outbox.get()) is not None:
            yield item

    def call(self, frame: Frame) -> Frame:
        """Send one frame, wait for the server's reply; ERROR replies raise SplitError."""
        self.post(frame)
        return self.receive()

    def post(self, frame: Frame) -> None:
        """Seal and send one frame without waiting for its reply (`receive` takes replies in
        the order their requests went out: the server answers each request once, in order)."""
        start, crypto_before = time.perf_counter(), self.sealer.seconds
        raw = encode(frame, self.sealer)
        if self.on_frame is not None:
            self.on_frame(frame, raw)
        self.stats.serialize_s += (
            time.perf_counter() - start - (self.sealer.seconds - crypto_before)
        )
        self._put(raw)

    def send_raw(self, raw: bytes) -> Frame:
        """Send already encoded bytes and wait for the reply (`call` without the encoding)."""
        self._put(raw)
        return self.receive()

    def _put(self, raw: bytes) -> None:
        self._outbox.put(raw)
        self.stats.bytes_up += len(raw)

    def receive(self) -> Frame:
        """The reply to the oldest request still unanswered; ERROR replies raise SplitError."""
        start = time.perf_counter()
        try:
            reply_raw = next(self._replies)
        except grpc.RpcError as exc:
            self.broken = True
            raise SplitError(_rpc_message(exc, self.target)) from None
        except StopIteration:
            self.broken = True
            raise SplitError(f"the split server at {self.target} closed the session") from None
        received, crypto_before = time.perf_counter(), self.sealer.seconds
        reply = decode(reply_raw, self.sealer)
        crypto = self.sealer.seconds - crypto_before
        self.stats.serialize_s += time.perf_counter() - received - crypto
        self.stats.wait_s += received - start
        server_s = reply.meta.get("server_s", 0.0)  # the server's own timing: only counted
        if type(server_s) in (int, float) and math.isfinite(server_s):
            self.stats.server_s += server_s
        self.stats.bytes_down += len(reply_raw)
        self.stats.frames += 1
        if reply.kind == Kind.ERROR:
            raise SplitError(f"split server: {reply.meta.get('message', 'refused')}")
        return reply

    def drain(self, count: int) -> None:
        """Read and drop `count` replies (after a refusal ends a pipelined step early)."""
        for _ in range(count):
            try:
                self.receive()
            except SplitError:
                if self.broken:
                    return

    def _handshake(self) -> None:
        split = self.config.split
        hello: dict[str, Any] = {"client": self.client_id, "run": run_id(self.config)}
        handshake = ClientHandshake(split.key_exchange) if split.encrypt else None
        if handshake is not None:
            hello["key"] = base64.b64encode(handshake.hello()).decode()
        reply = self.call(Frame(Kind.HELLO, meta=hello))
        if handshake is None:
            self._ready(reply)
            return
        key = reply.meta.get("key")
        if reply.kind != Kind.WELCOME or not isinstance(key, str):
            raise FrameRejected(f"expected a welcome with a key from the server, got {reply.kind}")
        try:
            answer = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            raise FrameRejected("the server's key is not valid base64") from None
        final, secret = handshake.finish(answer)
        self._ready(self.call(Frame(Kind.KEY, meta={"key": base64.b64encode(final).decode()})))
        run = run_id(self.config)
        cipher = session_ciphers(secret, handshake.salt, run, self.client_id, "client")
        crypto = self.sealer.seconds
        self.sealer = TimedSealer(cipher, crypto)

    def _ready(self, reply: Frame) -> None:
        """Take the server's READY: the rounds it had finished, whether it resumed."""
        rounds, resumed = reply.meta.get("round", 0), reply.meta.get("resumed", False)
        if reply.kind != Kind.READY:
            raise FrameRejected(f"expected ready from the server, got {reply.kind}")
        if type(rounds) is not int or rounds < 0 or type(resumed) is not bool:
            raise FrameRejected(
                f"the server's ready is malformed (round {str(rounds)[:20]!r}, resumed "
                f"{str(resumed)[:20]!r})"
            )
        self.server_round, self.server_resumed = rounds, resumed

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor, train: bool, cache: str = ""
    ) -> torch.Tensor:
        """The middle's output for `hidden` (b, q, d); with `train` the server keeps the graph.

        Without training, `cache` "new" / "next" has the server keep the middle's KV cache for
        this client's generation, so each new token crosses the wire alone.
        """
        self.post_forward(hidden, mask, train, cache)
        return self.take_forward(hidden)

    def post_forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        train: bool,
        cache: str = "",
        micro: tuple[int, int] = (0, 1),
    ) -> None:
        """Send activations (micro-batch `micro` of a training step) without waiting."""
        if train and micro[0] == 0:
            self.step += 1
        # The wire is CPU bytes: move first, so the noise (a CPU generator) applies anywhere.
        sent = self.noise.activations(hidden.detach().cpu())
        masks, meta = encode_mask(mask)
        tensors = {**self.activations.encode("hidden", sent), **masks}
        meta.update(train=train, cache=cache)
        if micro != (0, 1):
            meta["micro"] = list(micro)
        self.post(Frame(Kind.ACTIVATIONS, self.step, tensors, meta))

    def take_forward(self, like: torch.Tensor) -> torch.Tensor:
        """The middle's output for the oldest activations sent, on `like`'s device and dtype."""
        return self._reply_tensor(Kind.HIDDEN, "hidden", self.activations, like)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        """Send dL/d(middle output); receive dL/d(front output)."""
        self.post_backward(grad)
        return self.take_backward(grad)

    def post_backward(self, grad: torch.Tensor, micro: tuple[int, int] = (0, 1)) -> None:
        """Send dL/d(middle output) of a step (or of one micro-batch) without waiting."""
        sent = self.noise.gradients(grad.detach().cpu())
        meta = {"micro": list(micro)} if micro != (0, 1) else {}
        self.post(Frame(Kind.GRAD, self.step, self.gradients.encode("grad", sent), meta))

    def take_backward(self, like: torch.Tensor) -> torch.Tensor:
        """dL/d(front output) for the oldest gradient sent, on `like`'s device and dtype."""
        return self._reply_tensor(Kind.GRAD_INPUT, "grad", self.gradients, like)

    def _reply_tensor(
        self, kind: Kind, name: str, codec: FloatCodec, like: torch.Tensor
    ) -> torch.Tensor:
        """The reply to the oldest request, screened as `like` (what went out), on its device."""
        reply = self._for_this_step(self.receive())
        try:
            out = reply_tensor(reply, kind, name, codec, like)
        except FrameRejected as exc:
            raise _refused_reply(exc) from None
        return out.to(like.device, like.dtype)

    def _for_this_step(self, reply: Frame) -> Frame:
        """A reply must answer this client's current step; anything else is a protocol fault."""
        if reply.step != self.step:
            raise SplitError(
                f"the split server answered step {reply.step} while this client is at step "
                f"{self.step}; the session is out of step"
            )
        return reply

    def average(self, state: StateDict, weight: float) -> StateDict:
        """Hand in this client's front/back adapter; get the average over the clients."""
        reply = self.call(Frame(Kind.AVERAGE, self.step, state, {"weight": weight}))
        try:
            return averaged_adapter(reply, state)
        except FrameRejected as exc:
            raise _refused_reply(exc) from None

    def close(self) -> None:
        """Say goodbye (unless the session is already broken) and close the channel."""
        try:
            if not self.broken:
                self.call(Frame(Kind.BYE))
        finally:
            self._outbox.put(None)
            self._channel.close()


def _refused_reply(exc: FrameRejected) -> SplitError:
    return SplitError(
        f"refused the split server's reply: {exc}; the server is faulty or not this run's"
    )


def _rpc_message(exc: grpc.RpcError, target: str) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"cannot reach the split server at {target} ({details}); check the address, that "
            "the server runs, and that this client's certificate is signed by the server's CA"
        )
    return f"split server at {target} failed: {code} {details}"


class _RemoteMiddleFn(torch.autograd.Function):
    """Forward over the link; the backward sends the gradient and returns the server's."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, mask: torch.Tensor, link: MiddleLink) -> Any:
        ctx.link = link
        return link.forward(hidden, mask, train=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return ctx.link.backward(grad), None, None


class RemoteMiddle:
    """The middle as a callable that runs on the split server."""

    def __init__(self, link: MiddleLink) -> None:
        self.link = link

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.link.forward(hidden, mask, train=False)
        if not hidden.requires_grad:  # a frozen front: the server still needs our gradient
            hidden = hidden.detach().requires_grad_(True)
        out: torch.Tensor = _RemoteMiddleFn.apply(hidden, mask, self.link)  # type: ignore[no-untyped-call]
        return out
