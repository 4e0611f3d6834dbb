"""Where PatchCore collects its training patches: memory, or a temporary file for fits too big for RAM.

A tiled PatchCore fit collects millions of patch embeddings (1.3 GB for 501 images in
8 tiles) but needs them only twice: once, in order, to project them for the coreset,
and once more for the few thousand rows it keeps. Both are plain reads, so the rows
can live in a file: the process holds one chunk at a time, and the operating system's
page cache keeps the file in RAM when there is room, so nothing is slower where memory
is plentiful.
"""

from __future__ import annotations

import errno
import os
import tempfile

import numpy as np

from ..errors import ScorerError


def patch_rows(rows: int, dim: int, spill_mb: float | None) -> MemoryRows | SpilledRows:
    """A ``[rows, dim]`` float16 store: in memory, or in a temporary file past ``spill_mb`` MB."""
    if spill_mb is not None and rows * dim * 2 > spill_mb * 1e6:
        return SpilledRows(rows, dim)
    return MemoryRows(rows, dim)


class MemoryRows:
    """The in-memory store, with the same interface as ``SpilledRows``."""

    dtype = np.dtype(np.float16)
    spilled = False

    def __init__(self, rows: int, dim: int) -> None:
        self._rows = np.empty((rows, dim), self.dtype)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, dim)``."""
        return self._rows.shape

    def write(self, start: int, rows: np.ndarray) -> None:
        """Store ``rows`` from row ``start`` on."""
        self._rows[start : start + len(rows)] = rows

    def truncate(self, rows: int) -> MemoryRows:
        """Keep only the first ``rows`` rows; returns itself."""
        self._rows = self._rows[:rows]
        return self

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        return self._rows[key]

    def close(self) -> None:
        """Nothing to release but the memory, which goes with the object."""


class SpilledRows:
    """A write-once ``[N, D]`` float16 matrix in an unlinked temporary file.

    Supports what the coreset and the bank need: ``shape``, ``dtype``, row slices and
    row-index arrays (reads return fresh arrays). The file disappears when the object is
    closed or collected, and with the process.
    """

    dtype = np.dtype(np.float16)
    spilled = True

    def __init__(self, rows: int, dim: int, directory: str | None = None) -> None:
        self._fd: int | None = None
        self.shape = (rows, dim)
        self._row_bytes = dim * self.dtype.itemsize
        try:
            fd, path = tempfile.mkstemp(prefix="appliance-patches-", dir=directory)
        except OSError as exc:
            raise ScorerError(f"cannot create a temporary file for training patches in "
                              f"{directory or tempfile.gettempdir()}: {exc.strerror or exc}; point TMPDIR at a "
                              "writable folder, or raise patchcore.spill_mb to keep them in memory") from exc
        os.unlink(path)  # nothing to clean up after a crash
        self._fd = fd
        self._where = path

    def write(self, start: int, rows: np.ndarray) -> None:
        """Store ``rows`` from row ``start`` on."""
        data = np.ascontiguousarray(rows, self.dtype)
        if data.ndim != 2 or data.shape[1] != self.shape[1] or start < 0 or start + len(data) > self.shape[0]:
            raise ValueError(f"rows {data.shape} at {start} do not fit a {self.shape} store")
        try:
            view, offset = memoryview(data).cast("B"), start * self._row_bytes
            while view:
                done = os.pwrite(self._fd, view, offset)
                view, offset = view[done:], offset + done
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ScorerError(
                    f"no room for {self.shape[0] * self._row_bytes / 1e6:.0f} MB of training patches in "
                    f"{os.path.dirname(self._where)}: free space there, point TMPDIR elsewhere, or raise "
                    "patchcore.spill_mb to keep them in memory") from exc
            raise

    def truncate(self, rows: int) -> SpilledRows:
        """Keep only the first ``rows`` rows (fewer were written than announced); returns itself."""
        if not 0 <= rows <= self.shape[0]:
            raise ValueError(f"cannot truncate {self.shape[0]} rows to {rows}")
        self.shape = (rows, self.shape[1])
        return self

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("only contiguous row slices are supported")
            return self._read(start, max(0, stop - start))
        rows = np.asarray(key)
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise IndexError("rows must be a 1-d integer array")
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for {self.shape[0]} rows")
        out = np.empty((rows.size, self.shape[1]), self.dtype)
        order = np.argsort(rows, kind="stable")  # read in file order
        for i in order:
            out[i] = self._read(int(rows[i]), 1)[0]
        return out

    def _read(self, start: int, count: int) -> np.ndarray:
        size = count * self._row_bytes
        buf = bytearray(size)
        view, offset = memoryview(buf), start * self._row_bytes
        while view:
            got = os.preadv(self._fd, [view], offset)
            if got == 0:
                raise ScorerError(f"training-patch file ended early at byte {offset}")
            view, offset = view[got:], offset + got
        return np.frombuffer(buf, self.dtype).reshape(count, self.shape[1])

    def close(self) -> None:
        """Release the file (its space is freed at once: it was never linked)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()
