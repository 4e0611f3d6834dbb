"""The frame store: the raw frames the learning loop needs, kept losslessly on the device.

An output like the others (its own thread and queue, after the audit row is committed). It keeps
every NG and every error that has pixels (the reject log), a sampled stream of OK frames (at most
``ok_per_hour`` per camera, spread evenly over the hours, so every shift is represented), and on
request the frames an operator labels and the frames of a drift window. Files are content-addressed:
``<dir>/<camera>/<sha256[:2]>/<sha256>.<ext>``, the hash being of the file's own bytes, so the same
picture is kept once. A frame that came from a file is kept as that file's bytes (a JPEG stays the
camera's JPEG); a camera stream's frame is encoded as PNG (lossless). Each file is written to a
temporary name, fsynced and renamed, so a kill -9 never leaves half a frame; the inspection's audit
row names the file (its ``frame`` column) once it is written.

Per camera the store keeps at most ``max_mb`` and nothing older than ``retention_days`` (oldest
first); labelled frames are kept until their label is undone. Nothing is written while the disk is
below its floor (``context.disk``): the delivery is then ``dropped`` with why. The last ``recent``
records of each camera stay in memory, so a frame that was not kept (an OK part) can still be
stored when an operator labels it a moment later.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
from pydantic import Field, field_validator

from ...atomic import write_atomic
from ...errors import PublishError
from ...imaging import IMAGE_SUFFIXES
from ..records import ERROR, NG, Inspection
from .base import Delivery, OutputContext, Publisher, PublisherConfig, register_publisher

log = logging.getLogger(__name__)

REASONS = ("reject", "error", "sample", "label", "drift")


class FramesConfig(PublisherConfig):
    """Which frames the store keeps, where, and for how long."""

    type: Literal["frames"] = "frames"
    dir: Path | None = Field(None, description="folder of the stored frames (absolute); default <state_dir>/frames")
    ok_per_hour: float = Field(60.0, ge=0, description="OK frames kept per camera and hour, evenly spread (rolling "
                                                       "captures of good production); NG and error frames always")
    max_mb: float = Field(4096.0, gt=0, description="disk budget per camera in MiB; the oldest unlabelled frames "
                                                    "are deleted first")
    retention_days: float = Field(90.0, gt=0, description="unlabelled frames older than this are deleted")
    recent: int = Field(32, ge=0, le=4096, description="newest records per camera held in memory, so a frame an "
                                                       "operator labels shortly after it was inspected can be kept")

    @field_validator("dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"frames dir {str(value)!r} is relative; give an absolute path")
        return value


@dataclass(frozen=True)
class StoredFrame:
    """A frame in the store: its path relative to the store, the sha256 of its bytes, and its size."""

    path: str
    sha256: str
    bytes: int


def frame_bytes(record: Inspection) -> tuple[bytes, str] | None:
    """What to keep of a record's frame and its file suffix: the file's own bytes, else a lossless PNG."""
    if record.file_data:
        suffix = Path(record.source or "").suffix.lower()
        return record.file_data, suffix if suffix in IMAGE_SUFFIXES else ".img"
    if record.image is None:
        return None
    image = record.image if record.image.ndim == 2 else cv2.cvtColor(record.image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise PublishError(f"the frame of inspection {record.id} cannot be encoded as PNG")
    return encoded.tobytes(), ".png"


@register_publisher
class FramesPublisher(Publisher):
    """Keeps the frames the learning loop needs (see the module docstring); ``sent`` names the stored file."""

    type: ClassVar[str] = "frames"
    Config: ClassVar[type[PublisherConfig]] = FramesConfig

    def __init__(self, config: FramesConfig, context: OutputContext) -> None:
        super().__init__(config, context)
        self.cfg = config
        self.root = config.dir if config.dir is not None else Path(context.state_dir) / "frames"
        self._lock = threading.Lock()
        self._recent: dict[str, collections.deque[Inspection]] = {}
        self._next_ok: dict[str, float] = {}
        self._files: dict[str, collections.OrderedDict[str, tuple[int, float]]] = {}  # camera -> path -> size, mtime
        self._bytes: dict[str, int] = {}
        self.pinned: set[str] = set()  # labelled frames: kept whatever the budget
        self.kept = collections.Counter()  # by reason

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Create the folder, remove half-written temporaries, index each camera's files."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
                self._index(folder.name)
        except OSError as exc:
            raise PublishError(f"frames output: cannot use {self.root}: {exc.strerror or exc}") from exc

    def _index(self, camera: str) -> None:
        files: list[tuple[float, str, int]] = []
        for path in (self.root / camera).rglob("*"):
            if not path.is_file():
                continue
            if path.name.startswith("."):  # a temporary a kill -9 left: never a frame
                path.unlink(missing_ok=True)
                continue
            st = path.stat()
            files.append((st.st_mtime, path.relative_to(self.root).as_posix(), st.st_size))
        ordered: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()
        for mtime, rel, size in sorted(files):
            ordered[rel] = (size, mtime)
        self._files[camera] = ordered
        self._bytes[camera] = sum(size for size, _ in ordered.values())

    # ------------------------------------------------------------ the output side (worker thread)
    def publish(self, inspection: Inspection) -> Delivery:
        """Keep the frame if its verdict or the OK sampling asks for it; remember the record for labels."""
        rec = inspection
        if self.cfg.recent:
            with self._lock:
                self._recent.setdefault(rec.camera, collections.deque(maxlen=self.cfg.recent)).append(rec)
        reason = self._reason(rec)
        if reason is None:
            return Delivery("skipped")
        stored = self.store(rec, reason)
        if stored is None:
            return Delivery("dropped", detail=f"disk below its floor: frame of {rec.camera} not kept")
        return Delivery("sent", detail=stored.path)

    def _reason(self, rec: Inspection) -> str | None:
        if rec.image is None and not rec.file_data:
            return None  # an error before any pixels: nothing to keep
        if rec.verdict == NG:
            return "reject"
        if rec.verdict == ERROR:
            return "error"
        if not self.cfg.ok_per_hour:
            return None
        period = 3600.0 / self.cfg.ok_per_hour
        due = self._next_ok.get(rec.camera, 0.0)
        if rec.captured_at < due:
            return None
        self._next_ok[rec.camera] = max(due + period, rec.captured_at)  # evenly spread, no burst to catch up
        return "sample"

    def store(self, rec: Inspection, reason: str) -> StoredFrame | None:
        """Write one record's frame (content-addressed, atomically); ``None`` when the disk is below its floor."""
        content = frame_bytes(rec)
        if content is None:
            raise PublishError(f"inspection {rec.id} has no pixels to keep")
        data, suffix = content
        digest = hashlib.sha256(data).hexdigest()
        rel = f"{rec.camera}/{digest[:2]}/{digest}{suffix}"
        path = self.root / rel
        disk = self.context.disk
        if path.exists():
            return StoredFrame(rel, digest, len(data))
        if disk is not None and not disk.allows(path.parent):
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data, mode=0o640)
        except OSError as exc:
            raise PublishError(f"frames output: cannot write {path}: {exc.strerror or exc}") from exc
        with self._lock:
            files = self._files.setdefault(rec.camera, collections.OrderedDict())
            files[rel] = (len(data), time.time())
            self._bytes[rec.camera] = self._bytes.get(rec.camera, 0) + len(data)
        self.kept[reason] += 1
        self._trim(rec.camera)
        return StoredFrame(rel, digest, len(data))

    # ------------------------------------------------------------ labels and drift (any thread)
    def recent(self, inspection_id: str) -> Inspection | None:
        """A record still held in memory (the newest ``recent`` of its camera)."""
        with self._lock:
            for records in self._recent.values():
                for rec in reversed(records):
                    if rec.id == inspection_id:
                        return rec
        return None

    def recent_records(self, camera: str) -> list[Inspection]:
        """The camera's records held in memory, oldest first."""
        with self._lock:
            return list(self._recent.get(camera, ()))

    def pin(self, rel: str, pinned: bool = True) -> None:
        """Keep (or stop keeping) a file whatever the budget: a labelled frame."""
        with self._lock:
            (self.pinned.add if pinned else self.pinned.discard)(rel)

    def path(self, rel: str) -> Path:
        """The absolute path of a stored frame (``rel`` as the audit log names it)."""
        return self.root / rel

    # ------------------------------------------------------------ retention
    def _trim(self, camera: str) -> None:
        """Delete the oldest unlabelled files beyond the budget or the retention age."""
        limit = self.cfg.max_mb * 2**20
        cutoff = time.time() - self.cfg.retention_days * 86400
        gone = []
        with self._lock:
            files = self._files.get(camera, collections.OrderedDict())
            for rel, (size, mtime) in list(files.items()):
                if self._bytes[camera] <= limit and mtime >= cutoff:
                    break
                if rel in self.pinned:
                    continue
                del files[rel]
                self._bytes[camera] -= size
                gone.append(rel)
        for rel in gone:
            with contextlib.suppress(OSError):
                (self.root / rel).unlink()
        if gone and self.context.outbox is not None:
            self.context.outbox.forget_frames(gone)

    def state(self) -> dict[str, Any]:
        """The folder, files and MiB per camera, and how many frames were kept for each reason."""
        with self._lock:
            cameras = {c: {"files": len(f), "mb": round(self._bytes.get(c, 0) / 2**20, 1)}
                       for c, f in self._files.items()}
        return {"dir": str(self.root), "cameras": cameras, "kept": dict(self.kept), "pinned": len(self.pinned)}


