"""The newest overlay image of each camera, in memory: what the live page shows beside the verdict.

The overlay output puts each camera's newest drawn image here (encoded once), the HTTP output
serves it; neither reads it back from disk, so the panel keeps its image when the disk is below
its floor, and the page can tell which inspection the image belongs to and mark it stale when
it is not the one whose verdict it shows. An HTTP output without an overlay output in its
process reads ``<camera>/latest.png`` instead (``read_latest_file``), the inspection taken from
the file's EXIF.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import ImageError
from ..overlay import png_overlay_metadata
from .records import Inspection

log = logging.getLogger(__name__)

#: Images kept per camera: the page asks for an image by inspection id right after /recent named
#: it, and the overlay output may have drawn a newer one in between.
KEEP = 4


@dataclass(frozen=True)
class LatestImage:
    """One camera's newest overlay: the encoded image and the inspection it shows (``None``: not known)."""

    inspection_id: str | None
    seq: int | None
    verdict: str | None
    captured_at: float | None
    drawn_at: float
    data: bytes
    content_type: str = "image/png"


class LatestImages:
    """Thread-safe: the overlay output's threads write, the HTTP output's loop reads."""

    def __init__(self, keep: int = KEEP) -> None:
        self._lock = threading.Lock()
        self._images: dict[str, deque[LatestImage]] = {}
        self._keep = keep

    def put(self, camera: str, image: LatestImage) -> bool:
        """Keep ``image`` as the camera's newest, unless a newer inspection's image is already there.

        Returns whether it was kept.
        """
        with self._lock:
            held = self._images.setdefault(camera, deque(maxlen=self._keep))
            if held and (held[-1].captured_at or 0.0) > (image.captured_at or 0.0):
                return False
            held.append(image)
            return True

    def get(self, camera: str, inspection_id: str | None = None) -> LatestImage | None:
        """The camera's newest image (or the one of ``inspection_id`` while it is still held); ``None`` if none."""
        with self._lock:
            held = list(self._images.get(camera, ()))
        if inspection_id is None:
            return held[-1] if held else None
        return next((im for im in reversed(held) if im.inspection_id == inspection_id), None)


class LatestDrawer:
    """Draws the overlays that are only a camera's latest image, on its own thread, and only the newest of them.

    One slot per camera: a record waiting there is replaced by a newer one of the same camera
    (``superseded``), so a burst of OK parts that keep no file costs one drawing, not one each,
    and the overlay output's queue never waits behind a picture nobody will see.
    """

    def __init__(self, draw: Callable[[Inspection], None], name: str = "overlay-latest") -> None:
        self._draw = draw
        self._name = name
        self._cond = threading.Condition()
        self._pending: dict[str, Inspection] = {}
        self._thread: threading.Thread | None = None
        self._busy = False
        self._closed = False
        self.drawn = self.superseded = 0

    def put(self, record: Inspection) -> None:
        """Draw ``record`` soon, instead of any older record of its camera still waiting."""
        with self._cond:
            if self._closed:
                return
            waiting = self._pending.get(record.camera)
            if waiting is not None and waiting.captured_at > record.captured_at:
                self.superseded += 1  # an older record arrived late: the newer one stands
                return
            if waiting is not None:
                self.superseded += 1
            self._pending[record.camera] = record
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def discard_older(self, camera: str, captured_at: float) -> None:
        """Forget the camera's waiting record if it is older than one being drawn elsewhere (it would lose)."""
        with self._cond:
            waiting = self._pending.get(camera)
            if waiting is not None and waiting.captured_at <= captured_at:
                del self._pending[camera]
                self.superseded += 1

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until nothing waits and nothing is being drawn; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout: float = 5.0) -> None:
        """Draw what still waits (one image per camera at most), then end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                camera = next(iter(self._pending))
                record = self._pending.pop(camera)
                self._busy = True
            try:
                self._draw(record)
                self.drawn += 1
            except Exception:  # a bug must not end the thread: the next part still gets its picture
                log.exception("drawing the latest overlay of inspection %s failed", record.id)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def read_latest_file(path: Path) -> LatestImage | None:
    """``latest.png`` as another process's overlay output wrote it, with the inspection from its EXIF.

    ``None`` when there is no such file. A PNG without overlay metadata is still an image: its
    inspection is then unknown (``None`` fields), which the page shows as such.
    """
    try:
        data = path.read_bytes()
        mtime = path.stat().st_mtime
    except OSError:
        return None
    try:
        meta = png_overlay_metadata(data)
    except ImageError:
        meta = {}
    seq, when = meta.get("seq"), meta.get("timestamp")
    return LatestImage(inspection_id=_str(meta.get("inspection_id")), seq=seq if isinstance(seq, int) else None,
                       verdict=_str(meta.get("verdict")),
                       captured_at=float(when) if isinstance(when, int | float) else None, drawn_at=mtime, data=data)


def thumbnail(image: LatestImage, width: int = 320, quality: int = 80) -> bytes:
    """A JPEG of ``image`` at most ``width`` pixels wide, for the camera list.

    Raises:
        ImageError: the image cannot be decoded.

    """
    pixels = cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_COLOR)
    if pixels is None:
        raise ImageError(None, f"the latest image of inspection {image.inspection_id} cannot be decoded")
    h, w = pixels.shape[:2]
    if w > width:
        pixels = cv2.resize(pixels, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError(None, "the thumbnail cannot be encoded")
    return jpeg.tobytes()


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None
