"""Per-stream state snapshots in the object store, written with compare-and-set.

Layout (``<p>`` is the processor name, e.g. ``curvature``)::

    streams/<stream>/snapshots/<p>/<generation>-<hash16>   immutable blob (If-None-Match)
    streams/<stream>/snapshots/<p>/HEAD                    {"generation", "blob"}, replaced with If-Match

A writer that read HEAD at generation g can only install g+1: a second writer
(a zombie after a restart) loses the If-Match race and gets SnapshotConflict
instead of silently overwriting newer state. The blob's header repeats the
stream id and is checked on load, so a key crafted to point at another
stream's blob is refused.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field

from streamvqa.storage.keys import content_hash, stream_prefix
from streamvqa.storage.object_store import ObjectNotFound, ObjectStore, PreconditionFailed

MAGIC = b"SVQS\x01"
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


class SnapshotConflict(RuntimeError):
    """Another writer installed a newer snapshot of this stream: this one is stale."""


class CorruptSnapshot(RuntimeError):
    """A snapshot blob is unreadable or does not belong to the stream asked for."""


@dataclass
class Snapshot:
    stream_id: str
    processor: str
    generation: int
    next_offsets: dict[str, int]  # "topic:partition" -> first offset not yet absorbed
    state: bytes
    extra: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        header = json.dumps(
            {
                "stream_id": self.stream_id,
                "processor": self.processor,
                "generation": self.generation,
                "next_offsets": self.next_offsets,
                "extra": self.extra,
            },
            sort_keys=True,
        ).encode()
        return MAGIC + struct.pack(">I", len(header)) + header + self.state

    @classmethod
    def from_bytes(cls, data: bytes) -> Snapshot:
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
            raise CorruptSnapshot("not a streamvqa snapshot (bad magic)")
        (length,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
        start = len(MAGIC) + 4
        if start + length > len(data):
            raise CorruptSnapshot("truncated snapshot header")
        try:
            header = json.loads(data[start : start + length])
            return cls(
                stream_id=str(header["stream_id"]),
                processor=str(header["processor"]),
                generation=int(header["generation"]),
                next_offsets={str(k): int(v) for k, v in header["next_offsets"].items()},
                state=data[start + length :],
                extra=dict(header.get("extra", {})),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptSnapshot(f"unreadable snapshot header: {err}") from err


@dataclass(frozen=True)
class Head:
    """Where a stream's HEAD stood when it was read or written: what ``save`` must match."""

    etag: str
    blob_key: str


class SnapshotStore:
    """Snapshots of one processor namespace (``<group>.<processor>``) for any stream."""

    def __init__(self, store: ObjectStore, processor: str) -> None:
        if not _NAMESPACE_RE.fullmatch(processor):
            raise ValueError(f"invalid snapshot namespace {processor!r}")
        self.store = store
        self.processor = processor

    def _dir(self, stream_id: str) -> str:
        return f"{stream_prefix(stream_id)}snapshots/{self.processor}/"

    def load(self, stream_id: str) -> tuple[Snapshot | None, Head | None]:
        """The newest snapshot and the Head to pass to ``save`` (None, None if none)."""
        try:
            head, etag = self.store.get_with_etag(self._dir(stream_id) + "HEAD")
        except ObjectNotFound:
            return None, None
        try:
            pointer = json.loads(head)
            blob_key = str(pointer["blob"])
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptSnapshot(f"unreadable HEAD of stream {stream_id!r}: {err}") from err
        if not blob_key.startswith(self._dir(stream_id)):
            raise CorruptSnapshot(f"HEAD of stream {stream_id!r} points outside its prefix: {blob_key!r}")
        snapshot = Snapshot.from_bytes(self.store.get(blob_key))
        if snapshot.stream_id != stream_id or snapshot.processor != self.processor:
            raise CorruptSnapshot(
                f"blob {blob_key!r} belongs to stream {snapshot.stream_id!r}/{snapshot.processor!r}"
            )
        return snapshot, Head(etag, blob_key)

    def save(self, snapshot: Snapshot, head: Head | None) -> Head:
        """Install ``snapshot`` if HEAD is still ``head`` (None: no snapshot yet).

        Returns the new Head; raises SnapshotConflict when another writer won.
        The blob HEAD pointed at before is deleted once HEAD has moved on.
        """
        data = snapshot.to_bytes()
        directory = self._dir(snapshot.stream_id)
        blob_key = f"{directory}{snapshot.generation:012d}-{content_hash(data)[:16]}"
        try:
            self.store.put(blob_key, data, if_none_match=True)
        except PreconditionFailed:
            pass  # the same bytes are already there (content-addressed)
        pointer = json.dumps({"generation": snapshot.generation, "blob": blob_key}).encode()
        try:
            if head is None:
                new_etag = self.store.put(directory + "HEAD", pointer, if_none_match=True)
            else:
                new_etag = self.store.put(directory + "HEAD", pointer, if_match=head.etag)
        except PreconditionFailed as err:
            raise SnapshotConflict(
                f"stream {snapshot.stream_id!r}: another writer installed a snapshot "
                f"while generation {snapshot.generation} was being written"
            ) from err
        if head is not None and head.blob_key != blob_key:
            self.store.delete(head.blob_key)
        return Head(new_etag, blob_key)
