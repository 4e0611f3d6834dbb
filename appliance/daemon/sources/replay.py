"""Replay a folder of image files at a set rate: for tests, demos and commissioning without a camera.

Files are delivered in name order (``appliance.imaging.is_image_file`` decides what is an image),
no faster than ``fps``; with ``loop`` the folder is listed again and replayed from the start,
so files added meanwhile join the next pass. A file that cannot be decoded is an error item,
not a skip: commissioning with a folder of known-bad files must show them as errors.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from ...errors import ImageError
from ...imaging import decode_image, is_image_file
from ...types import Frame
from .base import Captured, EndOfStream, Source, SourceConfig, SourceError, register_source


def read_item(path: Path, camera: str, max_pixels: int | None = None) -> Captured:
    """Decode one image file into a captured frame, or an error item saying why it cannot be read.

    Shared by the file-based sources so that a zero-byte, truncated, non-image or over-size file reads
    the same everywhere. A file of more than ``max_pixels`` pixels (``preprocess.frame_pixel_limit`` of
    the camera's bundle) is an error item, refused from its header before it is decoded.
    ``FileNotFoundError`` is left to the caller (a vanished file may not be an error).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        return Captured(None, error=f"{path}: cannot be read: {exc.strerror or exc}", source=str(path))
    if not data:
        return Captured(None, error=f"{path}: is empty (0 bytes)", source=str(path))
    digest = hashlib.sha256(data).hexdigest()  # the file's own hash: sha256sum of the file finds its audit row
    try:
        image = decode_image(data, path, max_pixels)
    except ImageError as exc:
        return Captured(None, error=str(exc), source=str(path), file_sha256=digest, data=data)
    return Captured(Frame(image, camera=camera, source=str(path)), source=str(path), file_sha256=digest, data=data)


class ReplayConfig(SourceConfig):
    """A folder of image files replayed at a fixed rate."""

    type: Literal["replay"] = Field(description="Source type: replay the image files of a folder.")
    path: Path = Field(description="Folder whose image files are replayed in name order.")
    fps: float = Field(10.0, gt=0, le=1000, description="Items per second at most (read waits between items).")
    loop: bool = Field(False, description="Start again from the first file after the last; otherwise the stream ends.")


@register_source
class ReplaySource(Source):
    """Image files of a folder, in name order, at ``fps`` items per second."""

    type = "replay"
    Config = ReplayConfig

    def __init__(self, config: ReplayConfig, camera: str) -> None:
        super().__init__(config, camera)
        self.config: ReplayConfig = config
        self._files: list[Path] = []
        self._next = 0
        self._due = 0.0  # monotonic time the next item may be delivered

    def open(self) -> None:
        """List the folder; ``SourceError`` if it is missing or holds no image file."""
        self._files = self._list()
        self._next = 0
        self._due = time.monotonic()

    def read(self, timeout: float) -> Captured | None:
        """The next file's frame (or error item) once its slot in the ``fps`` schedule has come."""
        wait = self._due - time.monotonic()
        if wait > timeout:
            time.sleep(max(0.0, timeout))
            return None
        if wait > 0:
            time.sleep(wait)
        if not self.config.path.is_dir():
            raise SourceError(
                f"replay folder {self.config.path} has gone away; restore it or fix the camera's source.path"
            )
        if self._next >= len(self._files):
            if not self.config.loop:
                raise EndOfStream(f"replayed all {len(self._files)} files of {self.config.path}")
            self._files = self._list()
            self._next = 0
        path = self._files[self._next]
        self._next += 1
        # Slots advance from the previous slot so the rate holds on average; after a slow consumer
        # the schedule restarts from now instead of bursting to catch up.
        self._due = max(self._due, time.monotonic() - 1.0 / self.config.fps) + 1.0 / self.config.fps
        try:
            return read_item(path, self.camera, self.max_pixels)
        except FileNotFoundError:
            return Captured(None, error=f"{path}: was removed before it could be read", source=str(path))

    def close(self) -> None:
        """Forget the listing (the next ``open`` lists the folder again)."""
        self._files = []

    def describe(self) -> str:
        """``replay:<folder>``."""
        return f"replay:{self.config.path}"

    def _list(self) -> list[Path]:
        folder = self.config.path
        if not folder.is_dir():
            raise SourceError(f"replay folder {folder} does not exist; create it or fix the camera's source.path")
        try:
            files = sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)
        except OSError as exc:
            raise SourceError(f"replay folder {folder} cannot be listed: {exc.strerror or exc}") from None
        if not files:
            raise SourceError(f"replay folder {folder} holds no image files; copy some images there")
        return files
