"""The local-disk tier: one file per block (and one per summary) under a folder.

Files mirror the keys (``<root>/streams/<stream>/kv/<model slug>/<index>-<hash16>``).
Writes are atomic: a temporary file in the same folder, then ``os.replace``; with
``fsync=True`` the file and its folder are fsynced first, so a power cut leaves the
old state or the new one. Temporary files a crash left behind are removed when
the tier opens. Reads verify every byte (see :mod:`.codec`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import BlockNotFound
from .keys import BlockKey
from .tier import ByteTier

_TMP_SUFFIX = ".tmp"


class DiskTier(ByteTier):
    def __init__(self, root: str | os.PathLike, *, name: str = "disk", fsync: bool = False) -> None:
        super().__init__(name)
        self.root = Path(root).resolve()
        self.fsync = fsync
        (self.root / "streams").mkdir(parents=True, exist_ok=True)
        total = 0
        for dirpath, _, files in os.walk(self.root / "streams"):
            for file in files:
                path = Path(dirpath, file)
                if file.startswith(".") and file.endswith(_TMP_SUFFIX):
                    path.unlink(missing_ok=True)  # an interrupted write
                else:
                    total += path.stat().st_size
        self._nbytes = total

    def _path(self, relative: str) -> Path:
        # Keys are validated (no "..", no absolute parts); check anyway before touching the disk.
        path = self.root / relative
        if ".." in Path(relative).parts or not path.is_relative_to(self.root):
            raise ValueError(f"path {relative!r} escapes {self.root}")
        return path

    def _write(self, path: str, data: bytes) -> int:
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            replaced = target.stat().st_size
        except FileNotFoundError:
            replaced = 0
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            with open(tmp, "xb") as handle:
                handle.write(data)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            directory = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        return replaced

    def _read(self, path: str) -> bytes:
        try:
            return self._path(path).read_bytes()
        except FileNotFoundError:
            raise BlockNotFound(f"{self.name}: no file {path}") from None

    def _exists(self, path: str) -> bool:
        return self._path(path).is_file()

    def _remove(self, path: str) -> int:
        target = self._path(path)
        try:
            size = target.stat().st_size
            target.unlink()
            return size
        except FileNotFoundError:
            return 0

    def _list(self, prefix: str) -> Iterator[tuple[str, int]]:
        base = self._path(prefix)
        for dirpath, dirs, files in os.walk(base):
            dirs.sort()
            for file in sorted(files):
                if file.startswith("."):
                    continue
                path = Path(dirpath, file)
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue  # removed while listing
                yield path.relative_to(self.root).as_posix(), size

    def scan(self) -> list[tuple[BlockKey, int]]:
        """What is on disk, oldest file first (so the store's LRU resumes roughly where it was)."""
        entries = []
        for key, size in super().scan():
            try:
                mtime = self._path(key.path).stat().st_mtime_ns
            except FileNotFoundError:
                continue
            entries.append((mtime, key, size))
        entries.sort()
        return [(key, size) for _, key, size in entries]
