"""HMI overlay images: the frame, its anomaly heat map, defect contours and a verdict banner.

An overlay is what an operator sees on a small screen next to the line, so it is
drawn for legibility at its output size: the heat map fades in only near the
threshold (a good part stays readable), regions at or above the threshold get a
strong contour, and a banner above the frame states the verdict. The verdict and
its numbers also travel inside the PNG as EXIF, so a file copied off the
appliance still says what the model decided and when.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import piexif
import piexif.helper
from PIL import Image

from . import __version__
from .errors import ApplianceError, ImageError
from .imaging import to_rgb8
from .types import Prediction

#: Keys ``save_overlay`` requires in its metadata (``overlay_metadata`` provides them all).
REQUIRED_KEYS = ("score", "threshold", "verdict", "model_id", "raw_score", "timestamp", "camera", "source")

COLORMAP = cv2.COLORMAP_JET
#: Heat starts fading in this far (normalised scale) below the threshold and is at full ``alpha`` at it.
FADE_BELOW = 0.25
#: Contours of above-threshold regions; magenta never occurs in JET, nor in a blend of JET with grey.
CONTOUR_RGB = (255, 0, 255)
BANNER_RGB = (24, 24, 24)
TEXT_RGB = (240, 240, 240)
VERDICT_RGB = {"anomalous": (235, 40, 40), "good": (40, 200, 70)}
OTHER_VERDICT_RGB = (240, 170, 0)  # amber: anything else (e.g. "error")

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MIN_FONT_SCALE = 0.5  # about 11 px capitals: the smallest that reads well on a panel
_MAX_FONT_SCALE = 1.4
_FONT_PER_PIXEL = 1 / 1000  # font scale per pixel of output width
_MIN_MAX_SIDE = 64


# --------------------------------------------------------------------------- rendering


def render_overlay(image: np.ndarray, anomaly_map: np.ndarray, *, score: float, threshold: float, verdict: str,
                   model_id: str, max_side: int | None = 1280, alpha: float = 0.45) -> np.ndarray:
    """Draw the HMI overlay of one frame.

    The output is the frame (resized) under a banner strip; its longer side is at
    most ``max_side`` including the banner.

    Args:
        image: the frame's pixels, ``HxW`` or ``HxWx3`` RGB, uint8 or uint16.
        anomaly_map: normalised anomaly map in [0, 1], ``HxW`` like the image (0.5 = bundle threshold).
        score: normalised image score.
        threshold: normalised threshold in force; contours enclose ``anomaly_map >= threshold``.
        verdict: ``"anomalous"`` or ``"good"`` (anything else is shown in amber).
        model_id: the bundle that produced the score.
        max_side: longest side of the output in pixels, or ``None`` to keep the frame's size.
        alpha: opacity of the heat map at and above the threshold.

    Returns:
        ``HxWx3`` uint8 RGB overlay.

    """
    if image.ndim not in (2, 3) or anomaly_map.ndim != 2 or anomaly_map.shape != image.shape[:2]:
        raise ValueError(f"anomaly_map must be HxW like the image {image.shape[:2]}, got {anomaly_map.shape}; "
                         "pass Engine.anomaly_map(score, frame_shape=image.shape[:2])")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be on the normalised scale [0, 1], got {threshold}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if max_side is not None and max_side < _MIN_MAX_SIDE:
        raise ValueError(f"max_side must be at least {_MIN_MAX_SIDE} pixels (or None), got {max_side}")

    rgb = to_rgb8(image)
    heat = np.nan_to_num(anomaly_map.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
    src_h, src_w = heat.shape
    items = _banner_items(verdict, score, threshold, model_id)
    out_w, out_h, banner = _fit(src_w, src_h, items, max_side)

    if (out_w, out_h) != (src_w, src_h):
        shrink = out_w < src_w
        rgb = cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        heat = cv2.resize(heat, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    frame = _blend_heat(rgb, np.clip(heat, 0.0, 1.0), threshold, alpha)
    _draw_contours(frame, anomaly_map, threshold, (out_w / src_w, out_h / src_h))
    return np.concatenate([_draw_banner(out_w, banner), frame], axis=0)


def _blend_heat(rgb: np.ndarray, heat: np.ndarray, threshold: float, alpha: float) -> np.ndarray:
    """Colour-mapped heat over the frame, opaque only near and above the threshold."""
    colours = cv2.cvtColor(cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), COLORMAP), cv2.COLOR_BGR2RGB)
    lo = threshold - FADE_BELOW
    t = np.clip((heat - lo) / max(threshold - lo, 1e-6), 0.0, 1.0)
    weight = (alpha * t * t * (3.0 - 2.0 * t))[..., None]  # smoothstep: no visible edge where the fade starts
    out = rgb.astype(np.float32) * (1.0 - weight) + colours.astype(np.float32) * weight
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _draw_contours(frame: np.ndarray, anomaly_map: np.ndarray, threshold: float, scale: tuple[float, float]
                   ) -> None:
    """Outline regions at or above the threshold, found at source resolution so small ones survive resizing."""
    mask = (np.nan_to_num(anomaly_map, nan=0.0) >= threshold).astype(np.uint8)
    if not mask.any():
        return
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    sx, sy = scale
    h, w = frame.shape[:2]
    scaled = []
    for c in contours:
        pts = c.astype(np.float64) * (sx, sy)
        pts[..., 0] = np.clip(pts[..., 0], 0, w - 1)
        pts[..., 1] = np.clip(pts[..., 1], 0, h - 1)
        scaled.append(np.round(pts).astype(np.int32))
    thickness = max(1, round(min(h, w) / 320))
    cv2.drawContours(frame, scaled, -1, CONTOUR_RGB, thickness, lineType=cv2.LINE_8)
    ring = 5 * thickness
    for pts in scaled:  # a region a few pixels across would be a dot on a panel: ring it
        x, y, bw, bh = cv2.boundingRect(pts)
        if max(bw, bh) < ring:
            cv2.circle(frame, (x + bw // 2, y + bh // 2), ring, CONTOUR_RGB, thickness, lineType=cv2.LINE_8)


# --------------------------------------------------------------------------- banner


@dataclass(frozen=True)
class _Banner:
    """Banner layout: lines of ``(text, colour, bold)`` items at one font scale."""

    lines: list[list[tuple[str, tuple[int, int, int], bool]]]
    font_scale: float
    thickness: int
    line_height: int
    pad: int

    @property
    def height(self) -> int:
        return len(self.lines) * self.line_height + self.pad


def _banner_items(verdict: str, score: float, threshold: float, model_id: str
                  ) -> list[tuple[str, tuple[int, int, int], bool]]:
    colour = VERDICT_RGB.get(verdict.lower(), OTHER_VERDICT_RGB)
    model = model_id.encode("ascii", "replace").decode()  # Hershey fonts draw ASCII only
    return [(verdict.upper(), colour, True), (f"score {score:.3f}", TEXT_RGB, False),
            (f"threshold {threshold:.3f}", TEXT_RGB, False), (f"model {model}", TEXT_RGB, False)]


def _text_width(text: str, scale: float, thickness: int) -> int:
    return cv2.getTextSize(text, _FONT, scale, thickness)[0][0]


def _layout_banner(width: int, items: list[tuple[str, tuple[int, int, int], bool]]) -> _Banner:
    """Pack the items into as few lines as fit ``width``, with the font scaled to the width."""
    scale = min(max(width * _FONT_PER_PIXEL, _MIN_FONT_SCALE), _MAX_FONT_SCALE)
    thickness = max(1, round(scale * 1.5))
    pad = max(4, round(12 * scale))
    gap = _text_width("  ", scale, thickness)
    room = max(1, width - 2 * pad)
    lines: list[list[tuple[str, tuple[int, int, int], bool]]] = [[]]
    used = 0
    for text, colour, bold in items:
        tw = _text_width(text, scale, thickness + bold)
        while tw > room and len(text) > 4:  # only a long model id gets here: cut it, keep the start
            text = text[:-4] + "..."
            tw = _text_width(text, scale, thickness + bold)
        if lines[-1] and used + gap + tw > room:
            lines.append([])
            used = 0
        used += (gap if lines[-1] else 0) + tw
        lines[-1].append((text, colour, bold))
    (_, text_h), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness + 1)
    return _Banner(lines, scale, thickness, text_h + baseline + pad // 2, pad)


def _draw_banner(width: int, banner: _Banner) -> np.ndarray:
    strip = np.empty((banner.height, width, 3), np.uint8)
    strip[:] = BANNER_RGB
    gap = _text_width("  ", banner.font_scale, banner.thickness)
    (_, text_h), _ = cv2.getTextSize("Ag", _FONT, banner.font_scale, banner.thickness + 1)
    y = banner.pad // 2 + banner.pad // 4 + text_h
    for line in banner.lines:
        x = banner.pad
        for text, colour, bold in line:
            t = banner.thickness + bold
            cv2.putText(strip, text, (x, y), _FONT, banner.font_scale, colour, t, cv2.LINE_AA)
            x += _text_width(text, banner.font_scale, t) + gap
        y += banner.line_height
    return strip


def _fit(src_w: int, src_h: int, items: list[tuple[str, tuple[int, int, int], bool]], max_side: int | None
         ) -> tuple[int, int, _Banner]:
    """Frame size and banner such that the longer side of both together is at most ``max_side``."""
    s = 1.0 if max_side is None else min(1.0, max_side / max(src_w, src_h))
    w, h = max(1, round(src_w * s)), max(1, round(src_h * s))
    banner = _layout_banner(w, items)
    if max_side is None:
        return w, h, banner
    for _ in range(8):  # a narrower frame may wrap the banner onto more lines; a few rounds settle it
        if h + banner.height <= max_side:
            break
        h = max(1, max_side - banner.height)
        w = max(1, round(src_w * h / src_h))
        banner = _layout_banner(w, items)
    if h + banner.height > max_side:  # pathological aspect ratios: keep the promise, squeeze the frame
        h = max(1, max_side - banner.height)
    return w, h, banner


# --------------------------------------------------------------------------- files


def overlay_metadata(prediction: Prediction) -> dict:
    """Build the metadata that ``save_overlay`` stores from a prediction."""
    frame, decision = prediction.frame, prediction.decision
    return {"score": decision.score, "threshold": decision.threshold, "threshold_source": decision.threshold_source,
            "verdict": decision.verdict, "model_id": prediction.model_id,
            "raw_score": float(prediction.score.image_score), "timestamp": frame.timestamp, "camera": frame.camera,
            "seq": frame.seq, "source": frame.source}


#: zlib level of overlay PNGs: 1 encodes a 1130x460 overlay in ~27 ms against ~120 ms at PIL's default 6,
#: for files ~20 % larger; an overlay is written for every frame, so speed wins.
PNG_COMPRESS_LEVEL = 1


def save_overlay(path: str | Path, overlay: np.ndarray, metadata: Mapping) -> Path:
    """Write an overlay as PNG with the verdict in EXIF, atomically.

    ``metadata`` goes as compact JSON into ``Exif.UserComment``; a one-line summary
    into ``ImageDescription``. A reader never sees a partial file: the PNG is written
    to a hidden temporary file next to ``path`` and renamed over it.

    Args:
        path: destination, ending in ``.png``; missing parent folders are created.
        overlay: ``HxWx3`` uint8 RGB, as ``render_overlay`` returns.
        metadata: at least the keys in ``REQUIRED_KEYS``; see ``overlay_metadata``.

    Returns:
        The path written.

    Raises:
        ApplianceError: the disk (or quota) is full.
        OSError: any other failure to write.

    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"overlay path must end in .png, got {path}")
    if overlay.dtype != np.uint8 or overlay.ndim != 3 or overlay.shape[2] != 3:
        raise ValueError(f"overlay must be HxWx3 uint8 RGB, got {overlay.shape} {overlay.dtype}")
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"overlay metadata lacks {', '.join(missing)}; build it with overlay_metadata(prediction)")

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(overlay)).save(buf, format="PNG", exif=_exif_bytes(metadata),
                                                        compress_level=PNG_COMPRESS_LEVEL)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, buf.getvalue())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApplianceError(f"cannot write overlay {path}: disk full ({exc.strerror}); free space on that "
                                 "disk or lower the overlay retention") from exc
        raise
    return path


def _exif_bytes(metadata: Mapping) -> bytes:
    comment = json.dumps(dict(metadata), separators=(",", ":"), ensure_ascii=True, default=_json_default)
    exif = {"0th": {piexif.ImageIFD.ImageDescription: _describe(metadata),
                    piexif.ImageIFD.Software: f"anomaly-appliance {__version__}"},
            "Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(comment, encoding="ascii")}}
    ts = metadata.get("timestamp")
    if isinstance(ts, int | float) and math.isfinite(ts):
        when = datetime.fromtimestamp(ts, UTC)
        exif["Exif"][piexif.ExifIFD.DateTimeOriginal] = when.strftime("%Y:%m:%d %H:%M:%S")
        exif["Exif"][piexif.ExifIFD.OffsetTimeOriginal] = "+00:00"
    return piexif.dump(exif)


def _describe(metadata: Mapping) -> str:
    """One ASCII line for ``ImageDescription``: what any image viewer shows."""
    def num(key: str) -> str:
        value = metadata.get(key)
        return f"{value:.3f}" if isinstance(value, int | float) else str(value)

    line = (f"{str(metadata.get('verdict')).upper()} score {num('score')} threshold {num('threshold')} "
            f"model {metadata.get('model_id')} camera {metadata.get('camera')}")
    return line.encode("ascii", "replace").decode()


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)  # Path, datetime and the like


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file in ``path``'s folder and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, 0o644)  # mkstemp makes 0600; the HMI server may run as another user
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- reading


def read_overlay_metadata(path: str | Path) -> dict:
    """Read back the metadata that ``save_overlay`` stored in an overlay PNG.

    Raises:
        ImageError: the file is missing, not an image, or carries no overlay metadata.

    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            raw = im.info.get("exif") or im.getexif().tobytes()
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except (OSError, SyntaxError) as exc:  # PIL raises UnidentifiedImageError (an OSError) or SyntaxError
        raise ImageError(path, f"is not a readable image: {exc}") from None
    try:
        comment = piexif.load(raw)["Exif"].get(piexif.ExifIFD.UserComment) if raw else None
        if comment is None:
            raise ImageError(path, "carries no overlay metadata (no EXIF UserComment); was it saved by save_overlay?")
        metadata = json.loads(piexif.helper.UserComment.load(comment))
    except (ValueError, struct.error, piexif.InvalidImageDataError) as exc:
        raise ImageError(path, f"has unreadable overlay metadata: {exc}") from None
    if not isinstance(metadata, dict):
        raise ImageError(path, "has an EXIF UserComment that is not overlay metadata (not a JSON object)")
    return metadata
