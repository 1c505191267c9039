"""Block keys: ``streams/<stream>/kv/<model slug>/<index:010d>-<hash16>``.

- The stream prefix comes from :func:`streamvqa.storage.keys.stream_prefix`, which
  validates the stream id (no ``/``, no ``..``): no stream can address another's keys.
- A model id (``HuggingFaceTB/SmolLM2-135M-Instruct``) may contain ``/`` and other
  characters a path must not; :func:`model_slug` escapes it reversibly (``_`` plus two
  hex digits per UTF-8 byte), so two model ids never share a slug and a listed key
  gives back the exact model id.
- The index is zero-padded so keys list in block order.
- ``hash16`` is the first 16 hex digits of the block's content hash (SHA-256 over its
  header fields and tensor bytes, see :mod:`.block`): two different contents never
  share a key, and a read checks the bytes against it.

Each block has a small sidecar, its summary (``<block key>.mean``): metadata and the
per-layer mean keys, so retrieval can score a block without fetching it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from streamvqa.storage.keys import key_stream_id, stream_prefix

KIND = "kv"
SUMMARY_SUFFIX = ".mean"
MAX_MODEL_ID_CHARS = 200
MAX_SLUG_CHARS = 240  # one path component: must stay under the 255-byte file name limit
MAX_INDEX = 10**10 - 1

_SAFE = re.compile(r"[A-Za-z0-9-]")
_SLUG_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_HASH16_RE = re.compile(r"^[0-9a-f]{16}$")
_NAME_RE = re.compile(r"^(\d{10})-([0-9a-f]{16})$")


def validate_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not model_id or len(model_id) > MAX_MODEL_ID_CHARS:
        raise ValueError(f"model id must be 1..{MAX_MODEL_ID_CHARS} characters, got {model_id!r}")
    if not model_id.isprintable():
        raise ValueError(f"model id {model_id!r} contains non-printable characters")
    return model_id


def model_slug(model_id: str) -> str:
    """The reversible, path-safe form of a model id (``/`` -> ``_2f``; a leading ``.`` escaped)."""
    validate_model_id(model_id)
    out: list[str] = []
    for position, char in enumerate(model_id):
        if _SAFE.match(char) or (char == "." and position > 0):
            out.append(char)
        else:
            out.extend(f"_{byte:02x}" for byte in char.encode("utf-8"))
    slug = "".join(out)
    if len(slug) > MAX_SLUG_CHARS:
        raise ValueError(f"model id {model_id!r} is too long once escaped ({len(slug)} > {MAX_SLUG_CHARS})")
    return slug


def model_id_from_slug(slug: str) -> str:
    """Inverse of :func:`model_slug`; raises ValueError for anything it would not produce."""
    if not _SLUG_RE.match(slug):
        raise ValueError(f"invalid model slug {slug!r}")
    raw = bytearray()
    i = 0
    while i < len(slug):
        if slug[i] == "_":
            try:
                raw.append(int(slug[i + 1 : i + 3], 16))
            except ValueError:
                raise ValueError(f"invalid escape in model slug {slug!r}") from None
            if len(slug[i + 1 : i + 3]) != 2:
                raise ValueError(f"invalid escape in model slug {slug!r}")
            i += 3
        else:
            raw.extend(slug[i].encode())
            i += 1
    try:
        model_id = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"invalid escape in model slug {slug!r}") from None
    if model_slug(model_id) != slug:  # only the canonical spelling is a key
        raise ValueError(f"non-canonical model slug {slug!r}")
    return model_id


def kv_prefix(stream_id: str, model_id: str | None = None) -> str:
    """Prefix of every block key of a stream (and of one model when given)."""
    prefix = f"{stream_prefix(stream_id)}{KIND}/"
    return prefix if model_id is None else f"{prefix}{model_slug(model_id)}/"


@dataclass(frozen=True, order=True)
class BlockKey:
    """Where one block lives in every tier. Ordered by stream, model, index."""

    stream_id: str
    model_id: str
    block_index: int
    hash16: str

    def __post_init__(self) -> None:
        stream_prefix(self.stream_id)
        validate_model_id(self.model_id)
        if isinstance(self.block_index, bool) or not isinstance(self.block_index, int):
            raise ValueError(f"block index must be an int, got {self.block_index!r}")
        if not 0 <= self.block_index <= MAX_INDEX:
            raise ValueError(f"block index {self.block_index} outside 0..{MAX_INDEX}")
        if not isinstance(self.hash16, str) or not _HASH16_RE.match(self.hash16):
            raise ValueError(f"hash16 must be 16 lowercase hex digits, got {self.hash16!r}")

    @property
    def path(self) -> str:
        """The block's object key / relative file path."""
        return f"{kv_prefix(self.stream_id, self.model_id)}{self.block_index:010d}-{self.hash16}"

    @property
    def summary_path(self) -> str:
        return self.path + SUMMARY_SUFFIX

    def __str__(self) -> str:
        return self.path

    @classmethod
    def parse(cls, path: str) -> BlockKey:
        """The key of a block path (not of a summary path); ValueError for anything else."""
        parts = path.split("/")
        if len(parts) != 5 or parts[2] != KIND:
            raise ValueError(f"{path!r} is not a KV block key")
        stream_id = key_stream_id(path)
        match = _NAME_RE.match(parts[4])
        if not match:
            raise ValueError(f"{path!r} is not a KV block key")
        key = cls(stream_id, model_id_from_slug(parts[3]), int(match.group(1)), match.group(2))
        if key.path != path:
            raise ValueError(f"{path!r} is not a canonical KV block key")
        return key
