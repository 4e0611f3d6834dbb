"""All of a file or none of it: the one place that writes files which must survive a crash mid-write.

Overlays, frames, bank deltas, thresholds and TriggerIDs are read back after a power cut; a reader must
see the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o644, sync: bool = True,
                 sync_folder: bool = False) -> None:
    """Write ``data`` to a hidden temporary beside ``path``, fsync it, rename it over ``path``.

    ``mode`` is applied explicitly because mkstemp makes 0600 and the HMI server or trainer may run as
    another user. ``sync_folder`` also fsyncs the folder, so the rename itself survives a power cut
    (wanted where a later step trusts the file, as the bank delta's index). ``sync=False`` skips the
    fsync where the write sits on a PLC's round trip and a lost last value is harmless (the rename still
    keeps readers from a torn file).
    """
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_folder:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` durable; a no-op where folders cannot be opened (not POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
