"""Hot folder: image files dropped into a folder by a line camera, over FTP or SMB, inspected oldest first.

A file is taken only once it is complete: its size and modification time have not changed for
``settle_s`` and its name is not hidden or temporary (leading dot, ``.tmp``, ``.part``,
``.filepart``, ``.crdownload``, trailing ``~``). Writers that upload under a temporary name and
rename at the end are safe whatever ``settle_s``; a writer that stalls for longer than
``settle_s`` in the middle of a file would have its half file taken, so set ``settle_s`` above
the longest stall on the line.

Delivery is at least once. A file stays in the inbox until its inspection is recorded and the
pipeline calls ``Captured.done(ok)``; only then is it moved to ``done_dir`` (scored) or
``failed_dir`` (could not be read or inspected), never overwriting a file already there, or
deleted if so configured. If the daemon dies in between, the file is still in the inbox and is
inspected again after the restart, so a consumer may see the same file twice, never zero times.
Files that are not images are error items and go to ``failed_dir`` like unreadable images.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading
import time
from collections import deque
from functools import partial
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator

from ...imaging import IMAGE_SUFFIXES
from .base import Captured, Source, SourceConfig, SourceError, register_source
from .replay import read_item

log = logging.getLogger(__name__)

TEMPORARY_SUFFIXES = (".tmp", ".part", ".filepart", ".crdownload")


def is_temporary_name(name: str) -> bool:
    """True for names a writer uses while a file is incomplete, and for hidden files."""
    return name.startswith(".") or name.endswith("~") or name.lower().endswith(TEMPORARY_SUFFIXES)


def move_unique(src: Path, folder: Path) -> Path:
    """Move ``src`` into ``folder`` under its name, or ``stem-1.ext``, ``stem-2.ext``... if taken.

    Never overwrites: the new name is claimed atomically (a hard link, or an exclusive create
    where links are not possible, e.g. across file systems or on FAT). Returns the new path.
    """
    src.stat()  # FileNotFoundError before anything is created (an unmounted inbox must not be re-created)
    folder.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        target = folder / (src.name if n == 0 else f"{src.stem}-{n}{src.suffix}")
        try:
            os.link(src, target)
        except FileExistsError:
            continue
        except FileNotFoundError:
            raise
        except OSError:  # cross-device or no hard links: copy into a newly created file
            with src.open("rb") as fin:
                try:
                    fout = target.open("xb")
                except FileExistsError:
                    continue
                try:
                    with fout:
                        shutil.copyfileobj(fin, fout)
                    shutil.copystat(src, target)
                except OSError:
                    target.unlink(missing_ok=True)  # our own half copy
                    raise
        src.unlink()
        return target
    raise AssertionError("unreachable")


class FolderConfig(SourceConfig):
    """A hot folder that a camera or an FTP server writes image files into."""

    type: Literal["folder"] = Field(description="Source type: image files dropped into a folder.")
    path: Path = Field(description="The inbox folder the camera or FTP server writes into (not created by us).")
    settle_s: float = Field(
        0.5, ge=0, le=600, description="A file is taken once its size and mtime have not changed for this long."
    )
    poll_s: float = Field(0.2, gt=0, le=60, description="How often the folder is listed, seconds.")
    done_dir: Path | None = Field(None, description="Where inspected files go; default <path>/done.")
    failed_dir: Path | None = Field(
        None, description="Where unreadable files and files whose inspection failed go; default <path>/failed."
    )
    on_done: Literal["move", "delete"] = Field("move", description="Move inspected files to done_dir, or delete them.")
    on_failed: Literal["move", "delete"] = Field(
        "move", description="Move failed files to failed_dir (kept for diagnosis), or delete them."
    )

    @model_validator(mode="after")
    def _not_the_inbox(self) -> Self:
        for key in ("done_dir", "failed_dir"):
            value = getattr(self, key)
            if value is not None and Path(os.path.normpath(value)) == Path(os.path.normpath(self.path)):
                raise ValueError(f"{key} must not be the inbox itself ({self.path}): files would be inspected again")
        return self

    @property
    def done_folder(self) -> Path:
        """Where inspected files are moved."""
        return self.done_dir if self.done_dir is not None else self.path / "done"

    @property
    def failed_folder(self) -> Path:
        """Where failed files are moved."""
        return self.failed_dir if self.failed_dir is not None else self.path / "failed"


@register_source
class FolderSource(Source):
    """Complete files of a hot folder, oldest first, each moved away once its inspection is recorded."""

    type = "folder"
    Config = FolderConfig
    can_wait = True  # files wait in the inbox until there is room: nothing is dropped

    def __init__(self, config: FolderConfig, camera: str) -> None:
        super().__init__(config, camera)
        self.config: FolderConfig = config
        self._seen: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, unchanged since)
        self._ready: deque[tuple[str, tuple[int, int]]] = deque()
        self._next_scan = 0.0
        # Names handed out and not yet done, each with the token of its one done() callback.
        # Kept across close/open so a reconnect never hands out a file twice; done() may come from any thread.
        self._taken: dict[str, object] = {}
        self._lock = threading.Lock()

    def open(self) -> None:
        """Check the inbox is there and start watching it (files already present settle first)."""
        self._seen.clear()
        self._ready.clear()
        self._scan()
        self._next_scan = time.monotonic() + self.config.poll_s

    def read(self, timeout: float) -> Captured | None:
        """The oldest complete file as a frame or an error item, or ``None`` if none within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if not self._ready and time.monotonic() >= self._next_scan:
                self._ready.extend(self._scan())
                self._next_scan = time.monotonic() + self.config.poll_s
            while self._ready:
                item = self._take(*self._ready.popleft())
                if item is not None:
                    return item
            now = time.monotonic()
            if now >= deadline:
                return None
            time.sleep(max(0.0, min(deadline, self._next_scan) - now))

    def close(self) -> None:
        """Stop watching; files handed out keep their ``done`` callbacks."""
        self._seen.clear()
        self._ready.clear()

    def describe(self) -> str:
        """``folder:<inbox>``."""
        return f"folder:{self.config.path}"

    def _scan(self) -> list[tuple[str, tuple[int, int]]]:
        """List the inbox; return the settled files not yet handed out, oldest first."""
        folder = self.config.path
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            raise SourceError(
                f"hot folder {folder} does not exist (unmounted or removed); create or mount it, or fix source.path"
            ) from None
        except OSError as exc:
            raise SourceError(f"hot folder {folder} cannot be listed: {exc.strerror or exc}") from None
        now = time.monotonic()
        present: set[str] = set()
        ready: list[tuple[int, str, tuple[int, int]]] = []
        with self._lock:
            taken = set(self._taken)
        for entry in entries:
            if is_temporary_name(entry.name):
                continue
            try:
                if not entry.is_file():  # done/, failed/ and other sub-folders
                    continue
                st = entry.stat()
            except FileNotFoundError:
                continue
            present.add(entry.name)
            if entry.name in taken:
                continue
            key = (st.st_size, st.st_mtime_ns)
            seen = self._seen.get(entry.name)
            if seen is None or seen[:2] != key:
                self._seen[entry.name] = (*key, now)
            elif now - seen[2] >= self.config.settle_s:
                ready.append((st.st_mtime_ns, entry.name, key))
        for name in self._seen.keys() - present:
            del self._seen[name]
        with self._lock:  # a taken file removed by hand: forget it, so a new file of that name is inspected
            for name in taken - present:
                self._taken.pop(name, None)
        return [(name, key) for _, name, key in sorted(ready)]

    def _take(self, name: str, key: tuple[int, int]) -> Captured | None:
        """Read a settled file, unless it changed or vanished since the scan."""
        path = self.config.path / name
        try:
            st = path.stat()
            if (st.st_size, st.st_mtime_ns) != key:
                self._seen[name] = (st.st_size, st.st_mtime_ns, time.monotonic())  # still being written
                return None
            if path.suffix.lower() in IMAGE_SUFFIXES:
                item = read_item(path, self.camera, self.max_pixels)
                st = path.stat()
            else:
                item = Captured(
                    None,
                    error=f"{path}: is not an image file; only {', '.join(sorted(IMAGE_SUFFIXES))} belong in the "
                    "hot folder",
                    source=str(path),
                )
        except FileNotFoundError:
            self._seen.pop(name, None)
            return None
        if (st.st_size, st.st_mtime_ns) != key:  # grew while we read it
            self._seen[name] = (st.st_size, st.st_mtime_ns, time.monotonic())
            return None
        self._seen.pop(name, None)
        token = object()
        with self._lock:
            self._taken[name] = token
        return Captured(
            item.frame, error=item.error, source=item.source, file_sha256=item.file_sha256, data=item.data,
            done=partial(self._done, name, token, item.frame is not None),
        )

    def _done(self, name: str, token: object, readable: bool, ok: bool) -> None:
        """Move (or delete) a handed-out file once its inspection is recorded; never raises."""
        with self._lock:
            if self._taken.get(name) is not token:
                log.debug("done() for %s came twice or after the file was removed; ignored", name)
                return
            success = ok and readable
            src = self.config.path / name
            action = self.config.on_done if success else self.config.on_failed
            folder = self.config.done_folder if success else self.config.failed_folder
            try:
                if action == "delete":
                    src.unlink()
                else:
                    move_unique(src, folder)
            except FileNotFoundError:
                log.warning("hot-folder file %s was removed before it could be moved to %s", src, folder)
            except OSError as exc:
                # Kept as taken: moving it again and again would fail the same way, and inspecting it again
                # would flood the outputs. It is inspected again after a restart (at least once).
                log.error(
                    "cannot %s hot-folder file %s (%s): check the permissions and free space of %s; "
                    "the file stays in the inbox and is inspected again after a restart",
                    action, src, exc.strerror or exc, folder if action == "move" else src.parent,
                )
                return
            del self._taken[name]
