"""Overlay files for the HMI: one PNG per inspection, sized for the panel, plus ``latest.png`` per camera.

The drawing and the EXIF come from ``appliance.overlay`` (the same renderer and file format as
``appliance predict``), drawn straight at the panel's exact size (letterboxed) and encoded once;
this output draws an error card when a frame failed, files the image as
``<dir>/<camera>/<YYYY-MM-DD>/<inspection id>.png`` (UTC date of capture), hands the same bytes
to the live page (``context.latest``), swaps ``<dir>/<camera>/latest.png`` atomically, and keeps
each camera's folder within a file count and a disk budget, oldest first. Nothing is written
while the disk is below its floor (``context.disk``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field, field_validator

from ...atomic import write_atomic
from ...errors import ApplianceError, ConfigError, PublishError
from ...imaging import to_rgb8
from ...overlay import (
    OTHER_VERDICT_RGB,
    PAD_RGB,
    encode_overlay,
    fill,
    letterbox,
    render_panel,
    write_png,
)
from ..latest import LatestDrawer, LatestImage
from ..records import ERROR, NG, OK, Inspection
from .base import Delivery, OutputContext, Publisher, PublisherConfig, register_publisher

log = logging.getLogger(__name__)

LATEST = "latest.png"
ERROR_TEXT_RGB = (16, 16, 16)  # dark text on the amber error banner
_DISPLAY_VERDICT = {OK: OK, NG: NG}  # the renderer takes the wire verdicts as they are (shown as OK / NG)
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_FONT = cv2.FONT_HERSHEY_SIMPLEX


class OverlayConfig(PublisherConfig):
    """Where overlay files go, the panel's size, and how many of them to keep."""

    type: Literal["overlay"] = "overlay"
    dir: Path | None = Field(None, description="folder of the overlay files (absolute); default <state_dir>/overlays")
    width: int = Field(1024, ge=64, le=8192, description="HMI panel width in pixels; every overlay is exactly "
                                                         "width x height, letterboxed with the aspect kept")
    height: int = Field(600, ge=64, le=8192, description="HMI panel height in pixels")
    only_ng: bool = Field(False, description="keep files only for NG and error inspections (latest.png still "
                                             "shows every part)")
    ok_per_s: float = Field(0.0, ge=0, description="OK inspections drawn at most this often per camera and second "
                                                   "(their files and latest.png); NG and error ones always. "
                                                   "Drawing a PNG costs tens of ms of CPU: at line rate, 1-5 keeps "
                                                   "the panel live and the cores for inspection. 0: every one")
    keep: int = Field(2000, ge=1, description="most overlay files kept per camera; the oldest are deleted first")
    max_mb: float = Field(1024, gt=0, description="disk budget per camera in MiB; the oldest files are deleted "
                                                  "first (the newest is always kept)")

    @field_validator("dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"overlay dir {str(value)!r} is relative; give an absolute path "
                             "(under systemd the working directory is /)")
        return value


def overlay_root(config: OverlayConfig, state_dir: Path) -> Path:
    """The folder holding one sub-folder per camera."""
    return config.dir if config.dir is not None else Path(state_dir) / "overlays"


def planned_path(config: OverlayConfig, state_dir: Path, inspection_id: str, camera: str, captured_at: float,
                 verdict: str) -> Path | None:
    """Where the overlay of an inspection will be written, known before publishing (for the audit row).

    Returns ``None`` when no file will be kept (an OK record under ``only_ng``).

    Raises:
        ConfigError: the camera or inspection id cannot be used as a file name.

    """
    if config.only_ng and verdict == OK:
        return None
    day = datetime.fromtimestamp(captured_at, UTC).strftime("%Y-%m-%d")
    return (overlay_root(config, state_dir) / _file_name(camera, "camera id") / day
            / f"{_file_name(inspection_id, 'inspection id')}.png")


def _file_name(name: str, what: str) -> str:
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(f"{what} {name!r} cannot name a file or folder; use letters, digits, '-', '_' and "
                          "'.' (not first)")
    return name


# --------------------------------------------------------------------------- drawing


def render_error_card(width: int, height: int, message: str, image: np.ndarray | None = None,
                      camera: str = "") -> np.ndarray:
    """A ``width x height`` card for a failed inspection: an amber ERROR banner with the message, over the greyed frame.

    The message is wrapped to the width (at most about half the card's height of it, then cut
    with "..."); without a frame the rest of the card is dark.
    """
    scale = min(max(width / 1000, 0.5), 1.4)  # the overlay banner's font scale at this width
    thickness = max(1, round(scale * 1.5))
    pad = max(4, round(12 * scale))
    (_, text_h), base = cv2.getTextSize("Ag", _FONT, scale, thickness + 1)
    line_h = text_h + base + pad // 2
    lines = _wrap(message.encode("ascii", "replace").decode(), width - 2 * pad, scale, thickness)
    room = max(1, (height // 2 - pad) // line_h - 1)
    if len(lines) > room:
        lines = [*lines[:room - 1], _cut(lines[room - 1] + " ...", width - 2 * pad, scale, thickness)]
    banner_h = min(height, pad + line_h * (1 + len(lines)))

    card = np.empty((height, width, 3), np.uint8)
    fill(card[banner_h:], PAD_RGB)
    fill(card[:banner_h], OTHER_VERDICT_RGB)
    y = pad // 2 + pad // 4 + text_h
    title = "ERROR" + (f"  camera {camera}".encode("ascii", "replace").decode() if camera else "")
    cv2.putText(card, _cut(title, width - 2 * pad, scale, thickness + 1), (pad, y), _FONT, scale,
                ERROR_TEXT_RGB, thickness + 1, cv2.LINE_AA)
    for line in lines:
        y += line_h
        cv2.putText(card, line, (pad, y), _FONT, scale, ERROR_TEXT_RGB, thickness, cv2.LINE_AA)
    if image is not None and height - banner_h >= 16:
        try:
            grey = cv2.cvtColor(to_rgb8(image), cv2.COLOR_RGB2GRAY)
        except (ApplianceError, cv2.error, ValueError):
            return card  # pixels we cannot show: the message still stands
        dim = cv2.convertScaleAbs(grey, alpha=0.5, beta=40)  # greyed and flattened: clearly not a live verdict
        card[banner_h:] = letterbox(cv2.cvtColor(dim, cv2.COLOR_GRAY2RGB), width, height - banner_h)
    return card


def _text_width(text: str, scale: float, thickness: int) -> int:
    return cv2.getTextSize(text, _FONT, scale, thickness)[0][0]


def _cut(text: str, room: int, scale: float, thickness: int) -> str:
    while len(text) > 4 and _text_width(text, scale, thickness) > room:
        text = text[:-4] + "..."
    return text


def _wrap(message: str, room: int, scale: float, thickness: int) -> list[str]:
    """Greedy word wrap to ``room`` pixels; words wider than a line are split."""
    lines: list[str] = []
    for paragraph in message.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            while _text_width(word, scale, thickness) > room and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and _text_width(word[:cut], scale, thickness) > room:
                    cut -= 1
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cut])
                word = word[cut:]
            candidate = f"{line} {word}" if line else word
            if line and _text_width(candidate, scale, thickness) > room:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return lines


def record_metadata(record: Inspection) -> dict[str, Any]:
    """What an overlay PNG carries in EXIF: the record's identity, numbers and verdict (wire words: ok/ng/error)."""
    return {"inspection_id": record.id, "camera": record.camera, "seq": record.seq, "trigger_id": record.trigger_id,
            "score": record.score, "raw_score": record.raw_score, "threshold": record.threshold,
            "threshold_source": record.threshold_source, "verdict": record.verdict, "error": record.error,
            "model_id": record.model_id, "bank_hash": record.bank_hash, "timestamp": record.captured_at,
            "finished_at": record.finished_at, "source": record.source, "image_sha256": record.image_sha256}


# --------------------------------------------------------------------------- retention


class _Retained:
    """One camera's overlay files, oldest first, with their total size in bytes."""

    def __init__(self) -> None:
        self.files: OrderedDict[Path, int] = OrderedDict()
        self.bytes = 0

    @classmethod
    def scan(cls, folder: Path) -> _Retained:
        """The files under ``folder/<YYYY-MM-DD>/``, in date then id (= time) order; leftover temp files removed."""
        kept = cls()
        if not folder.is_dir():
            return kept
        days = [folder, *sorted(p for p in folder.iterdir() if p.is_dir() and _DAY.match(p.name))]
        for day in days:
            for f in sorted(day.iterdir()):
                if f.name.startswith(".") and f.name.endswith(".tmp"):  # a write cut short by a kill
                    f.unlink(missing_ok=True)
                elif day is not folder and f.suffix == ".png" and not f.name.startswith(".") and f.is_file():
                    kept.add(f, f.stat().st_size)
        return kept

    def add(self, path: Path, size: int) -> None:
        """Track a file just written as the newest (a rewritten one moves to the end)."""
        self.bytes -= self.files.pop(path, 0)
        self.files[path] = size
        self.bytes += size

    def trim(self, keep: int, max_bytes: float) -> None:
        """Delete the oldest files beyond ``keep`` or ``max_bytes`` (never the newest), and emptied date folders."""
        while len(self.files) > keep or (self.bytes > max_bytes and len(self.files) > 1):
            path, size = self.files.popitem(last=False)
            self.bytes -= size
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # forgotten either way: a file we cannot delete must not stall every write
                log.warning("cannot delete old overlay %s: %s", path, exc)
            if _DAY.match(path.parent.name):
                with contextlib.suppress(OSError):  # not empty: it still holds newer overlays
                    path.parent.rmdir()


# --------------------------------------------------------------------------- the output


@register_publisher
class OverlayPublisher(Publisher):
    """Writes each inspection's overlay (or error card) as a PNG with EXIF, and keeps each camera's latest image.

    Each image is drawn at the panel's size and encoded once; the same bytes become the file,
    the in-memory latest image the live page shows (``context.latest``) and ``latest.png``
    (a hard link to the file where possible). The latest image shows the newest inspection of the
    camera, OK ones included even when they keep no file (``only_ng``, a camera's files turned
    off): those are drawn by a ``LatestDrawer`` that draws only the newest of a burst, and
    ``publish`` returns ``Delivery("skipped")`` for them. ``publish`` writes to
    ``record.overlay_path`` when the pipeline has set it (from ``planned_path``), else to the
    planned path; when the disk is below its floor (``context.disk``) it writes nothing and
    returns ``Delivery("dropped")``, but the latest image is still drawn.
    """

    type: ClassVar[str] = "overlay"
    Config: ClassVar[type[PublisherConfig]] = OverlayConfig

    def __init__(self, config: OverlayConfig, context: OutputContext) -> None:
        super().__init__(config, context)
        self.cfg = config  # self.config, typed as this output's config
        self.root = overlay_root(config, context.state_dir)
        self._retained: dict[str, _Retained] = {}
        self._per_camera: dict[str, dict[str, Any]] = {}  # per-camera overrides: enabled, only_ng, keep, max_mb
        # When each camera's last OK overlay was planned (pipeline thread) and drawn (this output's thread).
        self._ok_planned: dict[str, float] = {}
        self._ok_drawn: dict[str, float] = {}
        self.drawer = LatestDrawer(self._draw_latest)
        self._latest_lock = threading.Lock()  # latest.png is written from this output's thread and the drawer's
        self._latest_at: dict[str, float] = {}  # capture time of the inspection each latest.png shows
        self._latest_error: str | None = None

    def set_camera_options(self, camera: str, **options: Any) -> None:
        """Override ``only_ng``, ``keep`` and ``max_mb`` for one camera, or turn its files off (``enabled=False``)."""
        self._per_camera[camera] = {k: v for k, v in options.items() if v is not None}

    def effective(self, camera: str) -> OverlayConfig | None:
        """The output's settings for one camera, ``None`` when the camera keeps no overlay files."""
        options = dict(self._per_camera.get(camera, {}))
        if not options.pop("enabled", True):
            return None
        return self.cfg.model_copy(update=options) if options else self.cfg

    def plan(self, inspection_id: str, camera: str, captured_at: float, verdict: str) -> Path | None:
        """Where this inspection's file will be written, or ``None`` (see ``planned_path``)."""
        cfg = self.effective(camera)
        if cfg is None or (verdict == OK and not _due(self._ok_planned, camera, captured_at, cfg.ok_per_s)):
            return None
        return planned_path(cfg, self.context.state_dir, inspection_id, camera, captured_at, verdict)

    def _unplanned(self, rec: Inspection) -> Path | None:
        """The file of a record the pipeline did not plan (no ``overlay_path``); rate-limited OK ones get none."""
        cfg = self.effective(rec.camera)
        if cfg is None or (rec.verdict == OK and cfg.ok_per_s):
            return None
        return planned_path(cfg, self.context.state_dir, rec.id, rec.camera, rec.captured_at, rec.verdict)

    def start(self) -> None:
        """Create the folder, index every camera's files and apply retention (``keep`` may have been lowered)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                self._camera_files(folder.name)
        except OSError as exc:
            raise PublishError(_os_message(exc, self.root)) from exc

    def close(self) -> None:
        """Draw the latest images still waiting (one per camera), then stop the drawer."""
        self.drawer.close()

    def publish(self, inspection: Inspection) -> Delivery:
        """Draw, write and file one record's overlay; ``PublishError`` if it cannot be drawn or written.

        Every way that does not write the planned file says so: ``skipped`` only when no file was
        planned, ``dropped`` when the disk is below its floor, ``PublishError`` on any failure.
        """
        rec = inspection
        try:
            target = Path(rec.overlay_path) if rec.overlay_path else self._unplanned(rec)
            _file_name(rec.camera, "camera id")
        except ConfigError as exc:
            raise PublishError(f"overlay of inspection {rec.id}: {exc}") from exc
        self._check_drawable(rec)
        cfg = self.effective(rec.camera)
        if target is None:
            per_s = (cfg or self.cfg).ok_per_s
            if rec.verdict == OK and not _due(self._ok_drawn, rec.camera, rec.captured_at, per_s):
                return Delivery("skipped", detail=f"OK overlays at most {per_s:g} per second")
            self.drawer.put(rec)
            return Delivery("skipped")  # no file planned: only the latest image shows it
        disk = self.context.disk
        if disk is not None and not disk.allows(target.parent):
            self.drawer.put(rec)  # the panel still shows the current part
            return Delivery("dropped", detail=f"disk below its floor ({target.parent}): overlay file not written")
        if rec.verdict == OK:
            self._ok_drawn[rec.camera] = max(rec.captured_at, self._ok_drawn.get(rec.camera, rec.captured_at))
        self.drawer.discard_older(rec.camera, rec.captured_at)  # drawn here now: an older one waiting would lose
        data = self._encode(rec)
        self._show(rec, data)
        try:
            write_png(target, data)
            files = self._camera_files(rec.camera)
            files.add(target, len(data))
            self._trim(rec.camera, files)
        except ApplianceError as exc:  # write_png's "disk full"
            raise PublishError(f"overlay of inspection {rec.id}: {exc}") from exc
        except OSError as exc:
            raise PublishError(f"overlay of inspection {rec.id}: {_os_message(exc, Path(exc.filename or target))}"
                               ) from exc
        try:  # the file is written: a latest.png that cannot be swapped is logged, not the delivery's failure
            self._write_latest(rec, data, target)
        except OSError as exc:
            self._latest_failed(f"latest.png of inspection {rec.id}: {_os_message(exc, Path(exc.filename or target))}")
        else:
            self._latest_failed(None)
        return Delivery("sent", detail=str(target))

    @classmethod
    def check(cls, config: PublisherConfig, state_dir: Path) -> tuple[str, str]:
        """The overlay folder exists (or can be created) and is writable."""
        root = overlay_root(config, state_dir)
        folder = root if root.exists() else next((p for p in root.parents if p.exists()), root)
        if not os.access(folder, os.W_OK):
            return "fail", f"{folder} is not writable for this user"
        return "ok", f"{root} writable" + ("" if root.exists() else " (will be created)")

    def state(self) -> dict[str, Any]:
        """The folder, per camera the files kept and their size, and the latest images drawn and skipped."""
        return {"dir": str(self.root),
                "cameras": {c: {"files": len(r.files), "mb": round(r.bytes / 2**20, 1)}
                            for c, r in self._retained.items()},
                "latest": {"drawn": self.drawer.drawn, "superseded": self.drawer.superseded,
                           "last_error": self._latest_error}}

    # ------------------------------------------------------------------ the latest image

    def _draw_latest(self, rec: Inspection) -> None:
        """The drawer's work: a record that keeps no file becomes the latest image (memory, then disk)."""
        try:
            data = self._encode(rec)
            self._show(rec, data)
            self._write_latest(rec, data, None)
        except (ApplianceError, OSError) as exc:
            self._latest_failed(f"latest image of inspection {rec.id}: {exc}")
        else:
            self._latest_failed(None)

    def _show(self, rec: Inspection, data: bytes) -> None:
        if self.context.latest is not None:
            self.context.latest.put(rec.camera, LatestImage(rec.id, rec.seq, rec.verdict, rec.captured_at,
                                                            time.time(), data))

    def _write_latest(self, rec: Inspection, data: bytes, source: Path | None) -> None:
        """``<camera>/latest.png``: a hard link to ``source`` (no bytes written) or the bytes; newest wins.

        Skipped while the disk is below its floor; the in-memory image still shows the part.
        """
        folder = self.root / rec.camera
        disk = self.context.disk
        if disk is not None and not disk.allows(folder):
            return
        with self._latest_lock:
            if rec.captured_at < self._latest_at.get(rec.camera, float("-inf")):
                return  # a newer inspection's image is already there
            folder.mkdir(parents=True, exist_ok=True)
            latest = folder / LATEST
            if source is None or not _link_atomic(source, latest):
                write_atomic(latest, data)
            self._latest_at[rec.camera] = rec.captured_at

    def _latest_failed(self, error: str | None) -> None:
        if error != self._latest_error and error is not None:
            log.warning("overlay output: %s", error)  # once per kind of failure, not per frame
        self._latest_error = error

    # ------------------------------------------------------------------ files and drawing

    def _camera_files(self, camera: str) -> _Retained:
        files = self._retained.get(camera)
        if files is None:
            files = self._retained[camera] = _Retained.scan(self.root / camera)
            self._trim(camera, files)
        return files

    def _trim(self, camera: str, files: _Retained) -> None:
        cfg = self.effective(camera) or self.cfg
        files.trim(cfg.keep, cfg.max_mb * 2**20)

    @staticmethod
    def _check_drawable(rec: Inspection) -> None:
        missing = [name for name in ("image", "anomaly_map", "score", "threshold") if getattr(rec, name) is None]
        if rec.verdict != ERROR and missing:
            raise PublishError(f"inspection {rec.id} ({rec.verdict}) has no {', '.join(missing)}; an OK or NG record "
                               "must carry them for its overlay")

    def _encode(self, rec: Inspection) -> bytes:
        """The record's overlay (or error card) at the panel's size, as PNG bytes with EXIF."""
        try:
            return encode_overlay(self._draw(rec), record_metadata(rec))
        except ValueError as exc:
            raise PublishError(f"overlay of inspection {rec.id} cannot be encoded: {exc}") from exc

    def _draw(self, rec: Inspection) -> np.ndarray:
        width, height = self.cfg.width, self.cfg.height
        if rec.verdict == ERROR:
            return render_error_card(width, height, rec.error or "error", rec.image, rec.camera)
        self._check_drawable(rec)
        try:
            anomaly_map = rec.anomaly_map()
        except Exception as exc:  # computed on demand from the engine's score: anything may surface here
            raise PublishError(f"the anomaly map of inspection {rec.id} could not be computed: {exc}") from exc
        try:
            return render_panel(rec.image, anomaly_map, width, height, score=rec.score, threshold=rec.threshold,
                                verdict=_DISPLAY_VERDICT[rec.verdict], model_id=rec.model_id or "unknown",
                                pad_rgb=PAD_RGB)
        except (ValueError, ApplianceError) as exc:
            raise PublishError(f"overlay of inspection {rec.id} cannot be drawn: {exc}") from exc


def _link_atomic(source: Path, path: Path) -> bool:
    """Make ``path`` a hard link to ``source``, replacing it atomically; False where links cannot be made."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:  # another file system, or one without hard links: the caller writes the bytes
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


def _due(last: dict[str, float], camera: str, when: float, per_s: float) -> bool:
    """Whether an OK overlay of ``camera`` captured at ``when`` is due under ``per_s`` (and note it if so)."""
    if per_s and when - last.get(camera, float("-inf")) < 1.0 / per_s:
        return False
    last[camera] = when
    return True


def _os_message(exc: OSError, path: Path) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {path}: disk full ({reason}); free space or lower 'keep'/'max_mb' of the overlay output"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {path}: {reason}; make the folder writable for the daemon's user or point 'dir' "
                "of the overlay output at a writable folder")
    return f"cannot write {path}: {reason}"
