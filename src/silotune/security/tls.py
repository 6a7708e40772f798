"""Mutual TLS for the split-learning gRPC transport: a development PKI and gRPC credentials.

Layout of a certificate directory (what `create_dev_pki` writes and the credentials read):

    ca.pem  ca.key              development certificate authority
    server.pem  server.key      server certificate (SANs = hosts, serverAuth)
    clients/<id>.pem  .key      one certificate per client (CN = id, clientAuth)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from silotune.errors import ConfigError
from silotune.run_folder import write_atomic

_HOW = "create certificates with `silotune certs DIR --clients a,b,c`"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]+")
# X.509 caps a common name at 64 characters (ub-common-name).
_MAX_ID = 64
# Leaves start a few minutes in the past so small clock skew between machines does not reject them.
_SKEW = dt.timedelta(minutes=5)

_Cert = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def check_client_id(client_id: str) -> str:
    """Return `client_id` if it can name a certificate and a file, else raise ConfigError."""
    if len(client_id) > _MAX_ID or not _CLIENT_ID.fullmatch(client_id) or client_id[0] == ".":
        raise ConfigError(
            f"invalid client id {client_id!r}: use 1 to {_MAX_ID} letters, digits, '-', '_' "
            "or '.', not starting with '.'"
        )
    return client_id


def create_dev_pki(
    out_dir: Path,
    clients: Sequence[str],
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    *,
    overwrite: bool = False,
) -> None:
    """Write a development CA, a server certificate for `hosts` and one certificate per client."""
    ids = [check_client_id(c) for c in clients]
    if not ids:
        raise ConfigError("no client ids given: name at least one client (--clients a,b,c)")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"client ids must be unique, got {', '.join(ids)}")
    if not hosts or any(not h.strip() for h in hosts):
        raise ConfigError(f"server hosts must be non-empty names or IP addresses, got {hosts!r}")
    if days < 1:
        raise ConfigError(f"certificate validity must be at least 1 day, got {days}")

    out_dir = Path(out_dir)
    files: dict[Path, _Cert] = {}
    ca = _make_ca(days)
    files[out_dir / "ca"] = ca
    files[out_dir / "server"] = _make_leaf(ca, _server_name(hosts), days, server_hosts=hosts)
    for cid in ids:
        files[out_dir / "clients" / cid] = _make_leaf(ca, cid, days, server_hosts=None)

    targets = [p for stem in files for p in _pair(stem)]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"refusing to overwrite existing certificate files: {', '.join(existing)}; "
            "choose another directory or pass overwrite=True (--overwrite)"
        )
    # Everything was generated above, so a failure here cannot leave a half-built PKI in memory;
    # each file is replaced atomically, so none is ever half-written on disk.
    for stem, (cert, key) in files.items():
        stem.parent.mkdir(parents=True, exist_ok=True)
        pem_path, key_path = _pair(stem)
        write_atomic(pem_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(key_path, key_pem, 0o600)


def server_credentials(cert_dir: Path) -> grpc.ServerCredentials:
    """Server credentials that demand a client certificate signed by `cert_dir/ca.pem`."""
    cert_dir = Path(cert_dir)
    ca, cert, key = (_read(cert_dir / name) for name in ("ca.pem", "server.pem", "server.key"))
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(cert_dir: Path, client_id: str) -> grpc.ChannelCredentials:
    """Channel credentials presenting `clients/<client_id>` and trusting only `ca.pem`."""
    cert_dir = Path(cert_dir)
    pem_path, key_path = _pair(cert_dir / "clients" / check_client_id(client_id))
    ca, cert, key = (_read(p) for p in (cert_dir / "ca.pem", pem_path, key_path))
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def peer_identity(context: grpc.ServicerContext) -> str:
    """The client id of the calling peer: the CN of its verified certificate."""
    names = context.auth_context().get("x509_common_name", [])
    if len(names) != 1:
        raise ConfigError(
            "the peer presented no verified client certificate; serve the transport with "
            "server_credentials(cert_dir) (mutual TLS), never on an insecure port"
        )
    name = names[0]
    return name.decode() if isinstance(name, bytes) else str(name)


def _make_ca(days: int) -> _Cert:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "silotune development CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(ca: _Cert, common_name: str, days: int, server_hosts: Sequence[str] | None) -> _Cert:
    """A CA-signed certificate: a server one when `server_hosts` is given, else a client one."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server_hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h.strip()) for h in server_hosts]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _server_name(hosts: Sequence[str]) -> str:
    # The CN is informational (clients check the SANs); keep it within the X.509 length cap.
    return hosts[0].strip()[:_MAX_ID]


def _pair(stem: Path) -> tuple[Path, Path]:
    # Not with_suffix: a client id such as "site.a" already contains a dot.
    return stem.parent / f"{stem.name}.pem", stem.parent / f"{stem.name}.key"


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigError(f"{path} not found; {_HOW}")
    return path.read_bytes()
