"""Cameras and streams through ``cv2.VideoCapture``: USB/V4L2 devices, video files, RTSP/HTTP, GStreamer.

A live device that stops delivering is a ``SourceError`` (the capture loop reports the camera
lost and reopens it with backoff); a video file or image sequence that reaches its end is an
``EndOfStream`` unless ``loop`` is set. ``CAP_PROP_BUFFERSIZE`` is set to 1 where the backend
supports it, so that a frame read on a trigger is the newest one, not one queued seconds ago.

OpenCV's ``read`` blocks until a frame comes or the backend gives up (V4L2 after about 10 s,
FFmpeg after about 30 s), so the ``timeout`` of ``read`` is not honoured to the millisecond;
the capture loop's trigger timeout still answers every trigger in time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import Field, field_validator

from ...errors import ImageError
from ...imaging import normalise_pixels
from ...types import Frame
from .base import Captured, EndOfStream, Source, SourceConfig, SourceError, register_source

#: ``api`` names to OpenCV's capture backends.
BACKENDS: dict[str, int] = {
    "auto": cv2.CAP_ANY,
    "ffmpeg": cv2.CAP_FFMPEG,
    "gstreamer": cv2.CAP_GSTREAMER,
    "v4l2": cv2.CAP_V4L2,
    "images": cv2.CAP_IMAGES,
}

_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact(device: int | str) -> str:
    """The device as text with any ``user:password@`` of a URL masked, for logs, status and the audit log."""
    return _USERINFO.sub(r"\1***@", str(device))


class OpenCVConfig(SourceConfig):
    """A camera or stream opened with ``cv2.VideoCapture``."""

    type: Literal["opencv"] = Field(description="Source type: a camera or stream read through OpenCV.")
    device: int | str = Field(
        description="Device index (0 = /dev/video0), video file path, rtsp:// or http:// URL, or GStreamer pipeline."
    )
    api: Literal["auto", "ffmpeg", "gstreamer", "v4l2", "images"] = Field(
        "auto", description="OpenCV capture backend; auto lets OpenCV choose."
    )
    width: int | None = Field(None, gt=0, description="Requested frame width in pixels (camera default if unset).")
    height: int | None = Field(None, gt=0, description="Requested frame height in pixels (camera default if unset).")
    fps: float | None = Field(None, gt=0, description="Requested camera frame rate (camera default if unset).")
    grey: bool = Field(False, description="Convert frames to grey (for monochrome parts and cameras).")
    loop: bool = Field(False, description="For a video file or image sequence: start again at the end.")

    @field_validator("device")
    @classmethod
    def _index_from_text(cls, value: int | str) -> int | str:
        # "0" from an environment variable or a quoted YAML value means the device index, not a file named 0.
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if isinstance(value, int) and value < 0:
            raise ValueError("a device index is 0 or more (0 = /dev/video0)")
        return value


@register_source
class OpenCVSource(Source):
    """Frames from ``cv2.VideoCapture``, as RGB (or grey) uint8/uint16 pixels."""

    type = "opencv"
    Config = OpenCVConfig

    def __init__(self, config: OpenCVConfig, camera: str) -> None:
        super().__init__(config, camera)
        self.config: OpenCVConfig = config
        self._cap: cv2.VideoCapture | None = None
        self._name = redact(config.device)

    @property
    def finite(self) -> bool:
        """True for a video file or an image sequence (they end), False for a device or a stream."""
        device = self.config.device
        return isinstance(device, str) and (self.config.api == "images" or Path(device).is_file())

    def open(self) -> None:
        """Open the device or stream and apply the requested properties; ``SourceError`` if it cannot be opened."""
        self.close()
        cap = cv2.VideoCapture(self.config.device, BACKENDS[self.config.api])
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"cannot open {self._name} with OpenCV backend {self.config.api!r}: check that the camera is "
                "connected and powered, the path or URL and its credentials, and that no other program holds it"
            )
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # ignored by backends that do not support it
        for prop, value in (
            (cv2.CAP_PROP_FRAME_WIDTH, self.config.width),
            (cv2.CAP_PROP_FRAME_HEIGHT, self.config.height),
            (cv2.CAP_PROP_FPS, self.config.fps),
        ):
            if value is not None:
                cap.set(prop, float(value))
        self._cap = cap

    def read(self, timeout: float) -> Captured | None:
        """The next frame (blocking in OpenCV, see the module docstring)."""
        if self._cap is None:
            raise SourceError(f"{self._name} is not open")
        ok, image = self._cap.read()
        if not ok or image is None:
            if not self.finite:
                raise SourceError(
                    f"camera {self._name} stopped delivering frames; check its cable, power and network"
                )
            if not self.config.loop:
                raise EndOfStream(f"{self._name} has no more frames")
            self.open()  # rewinding by reopening works with every backend
            ok, image = self._cap.read()
            if not ok or image is None:
                raise SourceError(f"{self._name} yields no frames; check that it is a readable video")
        try:
            pixels = self._convert(image)
        except ImageError as exc:
            return Captured(None, error=str(exc), source=self._name)
        except cv2.error as exc:
            return Captured(None, error=f"{self._name}: unusable frame: {exc}", source=self._name)
        return Captured(Frame(pixels, camera=self.camera, source=self._name), source=self._name)

    def close(self) -> None:
        """Release the device."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def describe(self) -> str:
        """``opencv:<device>`` with credentials masked."""
        return f"opencv:{self._name}"

    def _convert(self, image: np.ndarray) -> np.ndarray:
        """BGR(A) or grey from OpenCV to RGB, or to grey if configured."""
        if self.config.grey and image.ndim == 3 and image.shape[2] in (3, 4):
            code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
            image = cv2.cvtColor(image, code)
        return normalise_pixels(image, self._name)
