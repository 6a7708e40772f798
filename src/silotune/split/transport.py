"""gRPC plumbing for the split stream: one bidirectional byte stream per client, mutual TLS.

No generated protobuf code: the one method carries raw frame bytes (see protocol.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from silotune.errors import ConfigError
from silotune.security.cipher import BytesLike, FrameSealer
from silotune.security.tls import channel_credentials, server_credentials

SERVICE = "silotune.split.Middle"
METHOD = "Session"
# gRPC refuses messages over 4 MiB by default; activations of long batches are larger.
MAX_MESSAGE_BYTES = 1 << 30
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    # Silo-to-silo traffic goes direct; an HTTP proxy from the environment would break loopback.
    ("grpc.enable_http_proxy", 0),
]

Handler = Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]]


# Clients ping every 30 s to keep quiet streams alive (a long server step, a wait for other
# clients); by default a gRPC server refuses pings more often than every 5 minutes and closes the
# connection ("too_many_pings"), so the server must accept them.
SERVER_OPTIONS = [
    *OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 0),
]


def start_server(
    listen: str, certs: Path | None, handler: Handler, workers: int, max_message: int
) -> tuple[grpc.Server, int]:
    """Serve `handler` on `listen` (host:port, port 0 = any free one); returns (server, port).

    Each open session holds one worker thread for its whole life: `workers` bounds the number of
    clients served at once. gRPC refuses a request over `max_message` bytes before buffering it
    (its default, 4 MiB, is too small for activations; 1 GiB would let one frame cost 1 GiB)."""
    options = [o for o in SERVER_OPTIONS if o[0] != "grpc.max_receive_message_length"]
    options.append(("grpc.max_receive_message_length", max_message))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=options,
        maximum_concurrent_rpcs=workers,  # a client beyond that is refused, not left hanging
    )
    method = grpc.stream_stream_rpc_method_handler(handler)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {METHOD: method}),)
    )
    try:
        if certs is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, server_credentials(certs))
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc}") from None
    if port == 0:
        raise ConfigError(f"cannot listen on {listen} (address in use or not local?)")
    server.start()
    return server, port


def open_channel(target: str, certs: Path | None, client_id: str) -> grpc.Channel:
    """A channel to the split server; mutual TLS with this client's certificate unless None."""
    if certs is None:
        return grpc.insecure_channel(target, options=OPTIONS)
    return grpc.secure_channel(target, channel_credentials(certs, client_id), options=OPTIONS)


def stream_method(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    """The session method on `channel`, carrying raw bytes."""
    return channel.stream_stream(f"/{SERVICE}/{METHOD}")


@dataclass
class TimedSealer:
    """A FrameSealer that adds up the seconds spent sealing and opening (the crypto cost)."""

    inner: FrameSealer
    seconds: float = 0.0

    @property
    def next_seq(self) -> int:
        """The sequence number of the next sealed frame."""
        return self.inner.next_seq

    def seal(self, header: bytes, payload: BytesLike) -> tuple[int, bytes]:
        """Seal through the wrapped sealer, timed."""
        start = time.perf_counter()
        try:
            return self.inner.seal(header, payload)
        finally:
            self.seconds += time.perf_counter() - start

    def open(self, seq: int, header: bytes, ciphertext: BytesLike) -> bytes:
        """Open through the wrapped sealer, timed."""
        start = time.perf_counter()
        try:
            return self.inner.open(seq, header, ciphertext)
        finally:
            self.seconds += time.perf_counter() - start
