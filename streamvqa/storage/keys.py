"""Object keys: every stored thing is namespaced by stream id and carries a content hash.

``streams/<stream_id>/<kind>/<name>-<hash16>``: one stream's keys never share a
prefix with another's (stream ids cannot contain ``/``), and two different
contents never share a key (the LMCache lesson: multimodal entries collide
without a content hash).
"""

from __future__ import annotations

import hashlib

from streamvqa.schemas import ID_PATTERN

_PART_RE = ID_PATTERN  # key parts follow the same rule as ids


def content_hash(data: bytes) -> str:
    """SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def valid_stream_id(stream_id: str) -> bool:
    """Ids of the schemas' pattern, and never ``..``: they become one key segment."""
    return ID_PATTERN.fullmatch(stream_id) is not None and ".." not in stream_id


def stream_prefix(stream_id: str) -> str:
    if not valid_stream_id(stream_id):
        raise ValueError(f"invalid stream id {stream_id!r}")
    return f"streams/{stream_id}/"


def object_key(stream_id: str, kind: str, name: str, data: bytes) -> str:
    """The key of ``data`` (a frame, a KV block, a snapshot) of one stream."""
    for label, part in (("kind", kind), ("name", name)):
        if not _PART_RE.fullmatch(part) or ".." in part:
            raise ValueError(f"invalid key {label} {part!r}")
    return f"{stream_prefix(stream_id)}{kind}/{name}-{content_hash(data)[:16]}"


def key_stream_id(key: str) -> str:
    """The stream id a key belongs to (raises ValueError for keys outside any stream)."""
    parts = key.split("/")
    if len(parts) < 3 or parts[0] != "streams":
        raise ValueError(f"{key!r} is not a stream key")
    stream_prefix(parts[1])
    return parts[1]
