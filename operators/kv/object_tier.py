"""The object-store tier (S3 API: SeaweedFS here, MinIO or S3 in production).

Each block is two objects: ``<key>`` and its summary ``<key>.mean``, written in that
order, so a listed summary always has a complete block behind it. An S3 PUT is
atomic: a reader sees the whole object or none. Reads verify every byte against
the key. ``nbytes`` counts what this process wrote minus what it deleted (the
bucket may hold more from earlier runs).
"""

from __future__ import annotations

from collections.abc import Iterator

from streamvqa.storage.object_store import ObjectNotFound, ObjectStore

from .errors import BlockNotFound
from .tier import ByteTier


class ObjectTier(ByteTier):
    def __init__(self, store: ObjectStore, *, name: str = "object") -> None:
        super().__init__(name)
        self.store = store

    def _write(self, path: str, data: bytes) -> int:
        self.store.put(path, data)
        return 0  # the size of an object it replaced is unknown without another request

    def _read(self, path: str) -> bytes:
        try:
            return self.store.get(path)
        except ObjectNotFound:
            raise BlockNotFound(f"{self.name}: no object {path}") from None

    def _exists(self, path: str) -> bool:
        return self.store.contains(path)

    def _remove(self, path: str) -> int:
        sizes = [info.size for info in self.store.list(path) if info.key == path]
        if not sizes:
            return 0
        self.store.delete(path)
        return sizes[0]

    def _list(self, prefix: str) -> Iterator[tuple[str, int]]:
        for info in self.store.list(prefix):
            yield info.key, info.size
