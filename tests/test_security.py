"""Transport security: handshakes, per-frame AEAD, the development PKI and mutual TLS over gRPC."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from silotune.errors import ConfigError, FrameRejected
from silotune.security.cipher import (
    ClientHandshake,
    FrameCipher,
    FrameSealer,
    KeyExchange,
    PlainFrames,
    ServerHandshake,
    session_ciphers,
)
from silotune.security.tls import (
    channel_credentials,
    create_dev_pki,
    peer_identity,
    server_credentials,
)

EXCHANGES: tuple[KeyExchange, ...] = ("x25519", "rsa")


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    """One server-process RSA key, so the tests do not pay for a key generation each."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _session(
    exchange: KeyExchange,
    rsa_key: rsa.RSAPrivateKey | None = None,
    run_id: str = "run-1",
    client_id: str = "site-a",
) -> tuple[FrameCipher, FrameCipher]:
    """Run a full handshake and return (client cipher, server cipher)."""
    hs = ClientHandshake(exchange)
    sh = ServerHandshake.respond(hs.hello(), rsa_key=rsa_key)
    final, client_secret = hs.finish(sh.reply())
    server_secret = sh.finish(final)
    assert client_secret == server_secret
    assert hs.salt == sh.salt
    return (
        session_ciphers(client_secret, hs.salt, run_id, client_id, "client"),
        session_ciphers(server_secret, sh.salt, run_id, client_id, "server"),
    )


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_round_trip_both_directions(exchange: KeyExchange, rsa_key: rsa.RSAPrivateKey) -> None:
    client, server = _session(exchange, rsa_key)
    for i in range(3):
        payload = bytes([i]) * 1000
        seq, wire = client.seal(b"hdr", memoryview(payload))
        assert seq == i and payload not in wire
        assert server.open(seq, b"hdr", wire) == payload
        seq, wire = server.seal(b"", payload)
        assert client.open(seq, b"", wire) == payload


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_keys_differ_per_direction_and_session(
    exchange: KeyExchange, rsa_key: rsa.RSAPrivateKey
) -> None:
    client, server = _session(exchange, rsa_key)
    _, up = client.seal(b"h", b"same payload")
    _, down = server.seal(b"h", b"same payload")
    assert up != down
    with pytest.raises(FrameRejected):
        server.open(0, b"h", down)  # a frame sent down cannot be reflected back up
    other_client, other_server = _session(exchange, rsa_key)
    _, up2 = other_client.seal(b"h", b"same payload")
    assert up2 != up
    with pytest.raises(FrameRejected, match="authentication failed"):
        other_server.open(0, b"h", up)
    assert other_server.open(0, b"h", up2) == b"same payload"


def test_rejections_leave_state_intact() -> None:
    client, server = _session("x25519")
    seq0, f0 = client.seal(b"h0", b"zero")
    seq1, f1 = client.seal(b"h1", b"one")
    seq2, f2 = client.seal(b"h2", b"two")

    tampered = bytearray(f0)
    tampered[3] ^= 1
    with pytest.raises(FrameRejected, match=r"seq 0 \(client->server\).*authentication failed"):
        server.open(seq0, b"h0", bytes(tampered))
    with pytest.raises(FrameRejected, match="authentication failed"):
        server.open(seq0, b"hX", f0)
    with pytest.raises(FrameRejected, match="out of order"):
        server.open(seq1, b"h1", f1)
    assert server.open(seq0, b"h0", f0) == b"zero"

    with pytest.raises(FrameRejected, match="replayed"):
        server.open(seq0, b"h0", f0)
    assert server.open(seq1, b"h1", f1) == b"one"
    with pytest.raises(FrameRejected, match="replayed"):
        server.open(seq1, b"h1", f1)
    assert server.open(seq2, b"h2", f2) == b"two"


def test_wrong_run_or_client_is_rejected() -> None:
    hs = ClientHandshake("x25519")
    sh = ServerHandshake.respond(hs.hello())
    final, secret = hs.finish(sh.reply())
    assert sh.finish(final) == secret
    sender = session_ciphers(secret, hs.salt, "run-1", "site-a", "client")
    seq, wire = sender.seal(b"h", b"payload")
    for run_id, client_id in (("run-2", "site-a"), ("run-1", "site-b")):
        wrong = session_ciphers(secret, sh.salt, run_id, client_id, "server")
        with pytest.raises(FrameRejected, match="authentication failed"):
            wrong.open(seq, b"h", wire)
        genuine = session_ciphers(secret, hs.salt, run_id, client_id, "client")
        seq, right = genuine.seal(b"h", b"payload")
        assert wrong.open(seq, b"h", right) == b"payload"


@pytest.mark.parametrize("plain", [True, False], ids=["plain", "aead"])
def test_sealers_enforce_order(plain: bool) -> None:
    pair: tuple[FrameSealer, FrameSealer] = (
        (PlainFrames("client"), PlainFrames("server")) if plain else _session("x25519")
    )
    client, server = pair
    assert client.next_seq == 0
    (s0, f0), (s1, f1) = client.seal(b"", memoryview(b"\x00")), client.seal(b"", b"\x01")
    assert client.next_seq == 2
    with pytest.raises(FrameRejected, match=r"seq 1 \(client->server\).*out of order"):
        server.open(s1, b"", f1)
    assert server.open(s0, b"", f0) == b"\x00"
    with pytest.raises(FrameRejected, match=r"seq 0 \(client->server\) rejected: replayed"):
        server.open(s0, b"", f0)
    assert server.open(s1, b"", f1) == b"\x01"


def test_malformed_handshakes_are_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(FrameRejected, match="not a silotune handshake"):
        ServerHandshake.respond(b"garbage")
    hello = bytearray(ClientHandshake("x25519").hello())
    hello[4] = 99
    with pytest.raises(FrameRejected, match="unknown key exchange code 99"):
        ServerHandshake.respond(bytes(hello))
    with pytest.raises(FrameRejected, match="invalid X25519"):
        ServerHandshake.respond(ClientHandshake("x25519").hello()[:-1])
    hs = ClientHandshake("x25519")
    other = ServerHandshake.respond(ClientHandshake("rsa").hello(), rsa_key=rsa_key)
    with pytest.raises(FrameRejected, match="answered rsa"):
        hs.finish(other.reply())
    rsa_sh = ServerHandshake.respond(ClientHandshake("rsa").hello(), rsa_key=rsa_key)
    with pytest.raises(FrameRejected, match="does not decrypt"):
        rsa_sh.finish(b"\x00" * 256)
    with pytest.raises(ConfigError, match="unknown key exchange"):
        ClientHandshake("dh")  # type: ignore[arg-type]


# ---- certificates ----


def test_create_dev_pki(tmp_path: Path) -> None:
    create_dev_pki(tmp_path, ["site-a", "site.b"])
    for name in ("ca", "server", "clients/site-a", "clients/site.b"):
        assert (tmp_path / f"{name}.pem").is_file()
        assert stat.S_IMODE((tmp_path / f"{name}.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((tmp_path / "clients/site.b.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site.b"
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert not list(tmp_path.rglob("*.tmp"))

    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(ConfigError, match=r"refusing to overwrite.*overwrite=True"):
        create_dev_pki(tmp_path, ["site-a"])
    assert (tmp_path / "ca.pem").read_bytes() == before
    create_dev_pki(tmp_path, ["site-a"], overwrite=True)
    assert (tmp_path / "ca.pem").read_bytes() != before


@pytest.mark.parametrize("bad", ["a/b", "../x", "", "a b", ".hidden", "é", "x" * 65])
def test_create_dev_pki_rejects_bad_ids(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid client id"):
        create_dev_pki(tmp_path, ["ok", bad])
    assert not any(tmp_path.iterdir())


def test_missing_files_say_how_to_create_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ca\.pem not found.*silotune certs"):
        server_credentials(tmp_path)
    create_dev_pki(tmp_path, ["site-a"])
    with pytest.raises(ConfigError, match=r"site-b\.pem not found.*--clients"):
        channel_credentials(tmp_path, "site-b")


# ---- mutual TLS over gRPC ----

_METHOD = "/silotune.test.Echo/Echo"
_NO_PROXY = [("grpc.enable_http_proxy", 0)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two independent PKIs: the one the server trusts, and a foreign one with the same ids."""
    good, foreign = tmp_path_factory.mktemp("pki"), tmp_path_factory.mktemp("foreign")
    create_dev_pki(good, ["site-a"])
    create_dev_pki(foreign, ["site-a"])
    return good, foreign


@pytest.fixture
def echo_server(pki: tuple[Path, Path]) -> Iterator[tuple[int, list[str]]]:
    """A raw-bytes echo service on mutual TLS; yields its port and the peer ids it saw."""
    seen: list[str] = []

    def echo(request: bytes, context: Any) -> bytes:
        seen.append(peer_identity(context))
        return request

    handler = grpc.method_handlers_generic_handler(
        "silotune.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=2), options=_NO_PROXY)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(pki[0]))
    server.start()
    try:
        yield port, seen
    finally:
        server.stop(grace=None)


def _call(port: int, creds: grpc.ChannelCredentials) -> bytes:
    with grpc.secure_channel(f"localhost:{port}", creds, options=_NO_PROXY) as channel:
        reply: bytes = channel.unary_unary(_METHOD)(b"ping", timeout=5)
        return reply


def test_mtls_accepts_a_valid_client(
    echo_server: tuple[int, list[str]], pki: tuple[Path, Path]
) -> None:
    port, seen = echo_server
    assert _call(port, channel_credentials(pki[0], "site-a")) == b"ping"
    assert seen == ["site-a"]


def test_mtls_refuses_a_client_of_another_ca(
    echo_server: tuple[int, list[str]], pki: tuple[Path, Path]
) -> None:
    port, seen = echo_server
    good, foreign = pki
    # Trust the right server, but present a certificate the server's CA never signed.
    creds = grpc.ssl_channel_credentials(
        root_certificates=(good / "ca.pem").read_bytes(),
        private_key=(foreign / "clients/site-a.key").read_bytes(),
        certificate_chain=(foreign / "clients/site-a.pem").read_bytes(),
    )
    with pytest.raises(grpc.RpcError) as info:
        _call(port, creds)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert seen == []


def test_mtls_refuses_a_client_without_certificate(
    echo_server: tuple[int, list[str]], pki: tuple[Path, Path]
) -> None:
    port, seen = echo_server
    creds = grpc.ssl_channel_credentials(root_certificates=(pki[0] / "ca.pem").read_bytes())
    with pytest.raises(grpc.RpcError) as info:
        _call(port, creds)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert seen == []
