"""Application-layer AEAD on every transport frame, on top of mutual TLS.

    client                                   server
    ClientHandshake(kind).hello()  ──hello─▶ ServerHandshake.respond(hello)
                                   ◀─reply── .reply()
    .finish(reply) -> final,secret ──final─▶ .finish(final) -> secret
    session_ciphers(secret, .salt, run, client, side) on both sides -> FrameCipher

x25519: both sides send ephemeral X25519 public keys; final is empty.
rsa (the FL-GLM paper's key encryption): the server sends an RSA public key; the client wraps a
random 32-byte secret with RSA-OAEP(SHA-256) and sends it as final.
The handshake authenticates nobody by itself: it relies on running inside the mutual-TLS channel.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NoReturn, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from silotune.errors import ConfigError, FrameRejected

KeyExchange = Literal["x25519", "rsa"]
Side = Literal["client", "server"]
BytesLike = bytes | bytearray | memoryview

_MAGIC = b"STH1"
_NONCE = 32
_SECRET = 32
_RSA_BITS = 2048
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
# Direction name, 4-byte nonce prefix; the two directions also use different keys.
_DIRECTIONS: dict[Side, tuple[str, bytes]] = {
    "client": ("client->server", b"c2s\x00"),
    "server": ("server->client", b"s2c\x00"),
}
_MAX_SEQ = 2**64 - 1


# ---- key exchanges: one small pair of classes per method, looked up by name ----


class _X25519Client:
    def __init__(self) -> None:
        self._key = x25519.X25519PrivateKey.generate()

    def offer(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def finish(self, answer: bytes) -> tuple[bytes, bytes]:
        return b"", _x25519_exchange(self._key, answer, "reply")


class _X25519Server:
    def __init__(self, offer: bytes, rsa_key: rsa.RSAPrivateKey | None) -> None:
        self._key = x25519.X25519PrivateKey.generate()
        self._secret = _x25519_exchange(self._key, offer, "hello")

    def answer(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def finish(self, final: bytes) -> bytes:
        if final:
            raise FrameRejected("handshake final rejected: x25519 expects an empty final message")
        return self._secret


class _RsaClient:
    def offer(self) -> bytes:
        return b""

    def finish(self, answer: bytes) -> tuple[bytes, bytes]:
        try:
            public = serialization.load_der_public_key(answer)
        except ValueError:
            raise FrameRejected("handshake reply rejected: malformed RSA public key") from None
        if not isinstance(public, rsa.RSAPublicKey) or public.key_size < _RSA_BITS:
            raise FrameRejected(f"handshake reply rejected: need an RSA key of >= {_RSA_BITS} bits")
        secret = os.urandom(_SECRET)
        return public.encrypt(secret, _OAEP), secret


class _RsaServer:
    def __init__(self, offer: bytes, rsa_key: rsa.RSAPrivateKey | None) -> None:
        if offer:
            raise FrameRejected("handshake hello rejected: rsa expects no client key material")
        self._key = rsa_key or rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)

    def answer(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def finish(self, final: bytes) -> bytes:
        try:
            secret = self._key.decrypt(final, _OAEP)
        except ValueError:
            raise FrameRejected(
                "handshake final rejected: the wrapped key does not decrypt"
            ) from None
        if len(secret) != _SECRET:
            raise FrameRejected(f"handshake final rejected: wrapped key is not {_SECRET} bytes")
        return secret


class _ClientSide(Protocol):
    def offer(self) -> bytes: ...
    def finish(self, answer: bytes) -> tuple[bytes, bytes]: ...


class _ServerSide(Protocol):
    def answer(self) -> bytes: ...
    def finish(self, final: bytes) -> bytes: ...


@dataclass(frozen=True)
class _Method:
    code: int
    client: Callable[[], _ClientSide]
    server: Callable[[bytes, rsa.RSAPrivateKey | None], _ServerSide]


_METHODS: dict[KeyExchange, _Method] = {
    "x25519": _Method(1, _X25519Client, _X25519Server),
    "rsa": _Method(2, _RsaClient, _RsaServer),
}


def _x25519_exchange(key: x25519.X25519PrivateKey, peer: bytes, what: str) -> bytes:
    try:
        return key.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
    except ValueError:
        # Wrong length, or a low-order point that would yield an all-zero secret.
        raise FrameRejected(f"handshake {what} rejected: invalid X25519 public key") from None


# ---- handshake messages: MAGIC | method code (1 byte) | 32-byte nonce | method body ----


def _pack(exchange: KeyExchange, nonce: bytes, body: bytes) -> bytes:
    return _MAGIC + bytes([_METHODS[exchange].code]) + nonce + body


def _unpack(message: bytes, what: str) -> tuple[KeyExchange, bytes, bytes]:
    head = len(_MAGIC) + 1 + _NONCE
    if len(message) < head or not message.startswith(_MAGIC):
        raise FrameRejected(f"handshake {what} rejected: not a silotune handshake message")
    code = message[len(_MAGIC)]
    for name, method in _METHODS.items():
        if method.code == code:
            return name, message[len(_MAGIC) + 1 : head], message[head:]
    raise FrameRejected(f"handshake {what} rejected: unknown key exchange code {code}")


def _salt(hello: bytes, reply: bytes) -> bytes:
    # The transcript hash covers both nonces and both sides' key material.
    return hashlib.sha256(len(hello).to_bytes(4, "big") + hello + reply).digest()


class ClientHandshake:
    """The client half of a key agreement; messages are bytes the caller transports."""

    def __init__(self, exchange: KeyExchange) -> None:
        if exchange not in _METHODS:
            raise ConfigError(f"unknown key exchange {exchange!r}; choose one of {list(_METHODS)}")
        self.exchange: KeyExchange = exchange
        self._side = _METHODS[exchange].client()
        self._hello = _pack(exchange, os.urandom(_NONCE), self._side.offer())
        self._salt: bytes | None = None

    def hello(self) -> bytes:
        """The first message, to send to the server."""
        return self._hello

    def finish(self, reply: bytes) -> tuple[bytes, bytes]:
        """Read the server's reply; return (final message to send, even if empty; shared secret)."""
        exchange, _, body = _unpack(reply, "reply")
        if exchange != self.exchange:
            raise FrameRejected(
                f"handshake reply rejected: server answered {exchange}, not {self.exchange}"
            )
        final, secret = self._side.finish(body)
        self._salt = _salt(self._hello, reply)
        return final, secret

    @property
    def salt(self) -> bytes:
        """HKDF salt for `session_ciphers`, available after `finish`."""
        if self._salt is None:
            raise RuntimeError("ClientHandshake.salt is only known after finish(reply)")
        return self._salt


class ServerHandshake:
    """The server half of a key agreement, created from the client's hello."""

    def __init__(self, exchange: KeyExchange, side: _ServerSide, hello: bytes) -> None:
        self.exchange: KeyExchange = exchange
        self._side = side
        self._reply = _pack(exchange, os.urandom(_NONCE), side.answer())
        self.salt = _salt(hello, self._reply)  # HKDF salt for `session_ciphers`

    @classmethod
    def respond(cls, hello: bytes, *, rsa_key: rsa.RSAPrivateKey | None = None) -> ServerHandshake:
        """Answer a hello; `rsa_key` reuses one server-process key instead of a fresh one."""
        exchange, _, body = _unpack(hello, "hello")
        return cls(exchange, _METHODS[exchange].server(body, rsa_key), hello)

    def reply(self) -> bytes:
        """The answer, to send to the client."""
        return self._reply

    def finish(self, final: bytes) -> bytes:
        """Read the client's final message; return the shared secret."""
        return self._side.finish(final)


# ---- frames ----


class FrameSealer(Protocol):
    """Seals outgoing and opens incoming frames of one side of one session, in order."""

    @property
    def next_seq(self) -> int:
        """The sequence number the next `seal` will use (so a header can carry it)."""
        ...

    def seal(self, header: bytes, payload: BytesLike) -> tuple[int, bytes]:
        """Return (sequence number, wire bytes) for the next outgoing frame."""
        ...

    def open(self, seq: int, header: bytes, ciphertext: BytesLike) -> bytes:
        """Return the payload of incoming frame `seq`, or raise FrameRejected."""
        ...


class _Ordered:
    """Outgoing and expected incoming sequence numbers; a rejected frame changes neither."""

    def __init__(self, side: Side) -> None:
        peer: Side = "server" if side == "client" else "client"
        self._out_name, self._out_tag = _DIRECTIONS[side]
        self._in_name, self._in_tag = _DIRECTIONS[peer]
        self._sent = 0
        self._expected = 0

    @property
    def next_seq(self) -> int:
        """The sequence number the next `seal` will use (so a header can carry it)."""
        return self._sent

    def _next_out(self) -> int:
        if self._sent > _MAX_SEQ:
            raise FrameRejected(
                f"{self._out_name}: sequence numbers exhausted; start a new session"
            )
        seq = self._sent
        self._sent += 1
        return seq

    def _check_in(self, seq: int) -> None:
        if seq < self._expected:
            self._reject(seq, f"replayed (expected seq {self._expected})")
        if seq > self._expected:
            self._reject(seq, f"out of order or a frame is missing (expected seq {self._expected})")

    def _reject(self, seq: int, reason: str) -> NoReturn:
        raise FrameRejected(f"frame seq {seq} ({self._in_name}) rejected: {reason}")


class PlainFrames(_Ordered):
    """No encryption (TLS still protects the wire), but the same sequence checks as FrameCipher."""

    def seal(self, header: bytes, payload: BytesLike) -> tuple[int, bytes]:
        """Return (sequence number, payload unchanged)."""
        return self._next_out(), payload if isinstance(payload, bytes) else bytes(payload)

    def open(self, seq: int, header: bytes, ciphertext: BytesLike) -> bytes:
        """Return the payload if `seq` is the next expected frame."""
        self._check_in(seq)
        self._expected += 1
        return ciphertext if isinstance(ciphertext, bytes) else bytes(ciphertext)


class FrameCipher(_Ordered):
    """AES-256-GCM for one side of one session; AAD binds run, client, direction, seq, header."""

    def __init__(
        self, send_key: bytes, recv_key: bytes, run_id: str, client_id: str, side: Side
    ) -> None:
        super().__init__(side)
        self._send = AESGCM(send_key)
        self._recv = AESGCM(recv_key)
        # Length-prefixed so that no two (run id, client id) pairs encode alike.
        self._aad_prefix = b"silotune-frame-v1" + _lp(run_id.encode()) + _lp(client_id.encode())

    def seal(self, header: bytes, payload: BytesLike) -> tuple[int, bytes]:
        """Encrypt the next outgoing frame; return (seq, ciphertext with tag)."""
        seq = self._next_out()
        nonce, aad = self._nonce_aad(self._out_tag, seq, header)
        return seq, self._send.encrypt(nonce, payload, aad)

    def open(self, seq: int, header: bytes, ciphertext: BytesLike) -> bytes:
        """Decrypt incoming frame `seq`, or raise FrameRejected (replayed, reordered, tampered)."""
        self._check_in(seq)
        nonce, aad = self._nonce_aad(self._in_tag, seq, header)
        try:
            payload = self._recv.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            self._reject(
                seq, "authentication failed: tampered, or sealed for another key, run or client"
            )
        self._expected += 1
        return payload

    def _nonce_aad(self, tag: bytes, seq: int, header: bytes) -> tuple[bytes, bytes]:
        seq_bytes = seq.to_bytes(8, "big")
        return tag + seq_bytes, self._aad_prefix + tag + seq_bytes + header


def session_ciphers(
    secret: bytes, salt: bytes, run_id: str, client_id: str, side: Side
) -> FrameCipher:
    """The FrameCipher for `side`, with one HKDF-SHA256 key per direction."""
    if len(secret) < _SECRET:
        raise ValueError(f"shared secret must be at least {_SECRET} bytes, got {len(secret)}")
    peer: Side = "server" if side == "client" else "client"
    send, recv = (_derive(secret, salt, run_id, client_id, _DIRECTIONS[s][0]) for s in (side, peer))
    return FrameCipher(send, recv, run_id, client_id, side)


def _derive(secret: bytes, salt: bytes, run_id: str, client_id: str, direction: str) -> bytes:
    info = b"silotune-frame-key-v1" + _lp(run_id.encode()) + _lp(client_id.encode())
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info + direction.encode())
    return hkdf.derive(secret)


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data
