"""Blobs as files under one folder (the embedded store): a key is a relative path, every write is atomic.

A write goes to a temporary file in the target's own folder, is flushed to disk and renamed over the
target, so a reader (or a power cut) sees the old bytes or the new ones, never a torn file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .base import BlobStore
from .keys import check_key

_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_copy(source: bytes | Path, target: Path) -> None:
    """Write ``source`` (bytes or a file's) to ``target`` via a synced temporary file and a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(source, (bytes, bytearray, memoryview)):
                out.write(source)
            else:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out, _CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


class FileBlobStore(BlobStore):
    """Blobs under ``folder``: ``folder/<key>``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The file of ``key`` (``ValueError`` for a key that would leave the folder)."""
        path = self.folder / check_key(key)
        # A symlinked folder inside the store could still point elsewhere: resolve and check.
        if not path.resolve().is_relative_to(self.folder):
            raise ValueError(f"blob key {key!r}: resolves outside the store")
        return path

    def put(self, key: str, data: bytes | Path) -> None:
        """Store bytes or a file's bytes under ``key`` atomically."""
        atomic_copy(data, self.path(key))

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; ``KeyError`` if there are none."""
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds bytes."""
        return self.path(key).is_file()

    def download(self, key: str, target: Path) -> Path:
        """Copy the bytes under ``key`` to ``target`` atomically; ``KeyError`` if there are none."""
        source, target = self.path(key), Path(target)
        try:
            atomic_copy(source, target)
        except (FileNotFoundError, IsADirectoryError):
            if not source.is_file():
                raise KeyError(key) from None
            raise
        return target

    def delete(self, key: str) -> None:
        """Remove ``key``'s file (no error if absent)."""
        self.path(key).unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"FileBlobStore({str(self.folder)!r})"
