"""What a frame source is: open, read the next frame, close; a registry keyed by ``type``.

A source knows nothing of the engine or the outputs. It hands over ``Captured`` items:
a frame, or the reason one frame could not be read (a corrupt file is an inspection with
an error verdict, never a silent skip). When the device itself is gone it raises
``SourceError``; the capture loop then reports the camera as lost and retries with backoff.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from ...errors import SourceError  # noqa: F401 - re-exported for plug-ins
from ...types import Frame


class SourceConfig(BaseModel):
    """Base of every source's config: strict (unknown keys are errors), with a ``type`` tag."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str


@dataclass(frozen=True)
class Captured:
    """One item from a source: a frame, or why the frame at ``source`` could not be read.

    Attributes:
        frame: the pixels and their provenance, or ``None`` when reading failed.
        error: why reading failed (``None`` when ``frame`` is set).
        source: file path or URI of the item.
        done: called once the inspection of this item is recorded (``True``: scored, ``False``:
            error); a hot folder moves the file to ``done/`` or ``failed/`` then, not before.
        file_sha256: sha256 of the file's own bytes, where the item came from a file (``sha256sum``
            of the file finds its audit row; ``Inspection.image_sha256`` is of the decoded pixels).
        data: the file's own bytes, where the item came from a file: what a frame store keeps
            losslessly (a camera stream has none; its frames are encoded when kept).

    """

    frame: Frame | None
    error: str | None = None
    source: str | None = None
    done: Callable[[bool], None] | None = None
    file_sha256: str | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.frame is None) == (self.error is None):
            raise ValueError("a captured item has either a frame or an error")


class EndOfStream(Exception):  # noqa: N818 - a signal, like StopIteration
    """A finite source (a replay without looping) has delivered everything."""


class Source(ABC):
    """A camera, a folder or a replay. Used from one capture thread only."""

    type: ClassVar[str]
    Config: ClassVar[type[SourceConfig]]
    #: A source that can wait (a hot folder) is never dropped from: when the queue is full its next
    #: item waits (backpressure). A live camera cannot wait: its oldest queued frame is dropped instead.
    can_wait: ClassVar[bool] = False

    def __init__(self, config: SourceConfig, camera: str) -> None:
        self.config = config
        self.camera = camera
        #: Largest frame (pixels) a file-based source decodes; larger files are error items, checked on
        #: the header before decoding. Set by the pipeline from the camera's bundle.
        self.max_pixels: int | None = None

    @abstractmethod
    def open(self) -> None:
        """Connect; raise ``SourceError`` (retried with backoff) if the device is not there."""

    @abstractmethod
    def read(self, timeout: float) -> Captured | None:
        """The next item, or ``None`` if none came within ``timeout`` seconds.

        Raises:
            SourceError: the device or folder is gone (the loop closes, reports and reopens).
            EndOfStream: a finite source is exhausted.

        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device; must not raise."""

    def describe(self) -> str:
        """One line for status and logs: the type and where it reads from."""
        return self.type


SOURCES: dict[str, type[Source]] = {}


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: make a source available under its ``type``."""
    if cls.type in SOURCES and SOURCES[cls.type] is not cls:
        raise ValueError(f"source type {cls.type!r} is registered twice")
    SOURCES[cls.type] = cls
    return cls


def create_source(config: SourceConfig, camera: str) -> Source:
    """An unopened source for a validated config."""
    return SOURCES[config.type](config, camera)
