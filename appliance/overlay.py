"""HMI overlay images: the frame, its anomaly heat map, defect contours and a verdict banner.

An overlay is what an operator sees on a small screen next to the line, so it is
drawn for legibility at its output size: the heat map fades in only near the
threshold (a good part stays readable), regions at or above the threshold get a
strong contour, and a banner above the frame states the verdict. The verdict and
its numbers also travel inside the PNG as EXIF, so a file copied off the
appliance still says what the model decided and when.

An overlay may be drawn for every inspection on a two-core device, so it is drawn
straight into one canvas of the output size (no drawing big and shrinking, no
intermediate copies), the heat is blended only where it shows, and the PNG is encoded
once (``encode_overlay``) for every place it goes. ``bench/overlay_bench.py`` has the figures.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import math
import struct
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
from .atomic import write_atomic
from .errors import ApplianceError, ImageError
from .imaging import to_rgb8
from .png import encode_png
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
VERDICT_RGB = {"ng": (235, 40, 40), "ok": (40, 200, 70)}
OTHER_VERDICT_RGB = (240, 170, 0)  # amber: anything else (e.g. "error")
#: Letterbox padding: darker than the banner, so a panel shows where the image ends.
PAD_RGB = (12, 12, 12)

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MIN_FONT_SCALE = 0.5  # about 11 px capitals: the smallest that reads well on a panel
_MAX_FONT_SCALE = 1.4
_FONT_PER_PIXEL = 1 / 1000  # font scale per pixel of output width
_MIN_MAX_SIDE = 64
#: The colour map as an RGB lookup table (``applyColorMap`` takes it as is: no BGR-to-RGB pass per frame).
_COLORMAP_RGB = np.ascontiguousarray(
    cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), COLORMAP)[..., ::-1])


# --------------------------------------------------------------------------- rendering


def render_overlay(image: np.ndarray, anomaly_map: np.ndarray, *, score: float, threshold: float, verdict: str,
                   model_id: str, max_side: int | None = 1280, alpha: float = 0.45) -> np.ndarray:
    """Draw the HMI overlay of one frame.

    The output is the frame (resized) under a banner strip; its longer side is at
    most ``max_side`` including the banner. Frames are never enlarged.

    Args:
        image: the frame's pixels, ``HxW`` or ``HxWx3`` RGB, uint8 or uint16.
        anomaly_map: normalised anomaly map in [0, 1], ``HxW`` like the image (0.5 = bundle threshold).
        score: normalised image score.
        threshold: normalised threshold in force; contours enclose ``anomaly_map >= threshold``.
        verdict: ``"ng"`` or ``"ok"``, shown as NG (red) or OK (green); anything else (``"error"``) in amber.
        model_id: the bundle that produced the score.
        max_side: longest side of the output in pixels, or ``None`` to keep the frame's size.
        alpha: opacity of the heat map at and above the threshold.

    Returns:
        ``HxWx3`` uint8 RGB overlay.

    """
    _check(image, anomaly_map, threshold, alpha)
    if max_side is not None and max_side < _MIN_MAX_SIDE:
        raise ValueError(f"max_side must be at least {_MIN_MAX_SIDE} pixels (or None), got {max_side}")
    src_h, src_w = anomaly_map.shape
    items = _banner_items(verdict, score, threshold, model_id)
    if max_side is None:
        out_w, out_h, banner = src_w, src_h, _layout_banner(src_w, items)
    else:
        out_w, out_h, banner = _fit(src_w, src_h, items, max_side, max_side, grow=False)
    out = np.empty((banner.height + out_h, out_w, 3), np.uint8)
    _draw_banner(out[:banner.height], banner)
    _draw_frame(out[banner.height:], image, anomaly_map, threshold, alpha)
    return out


def render_panel(image: np.ndarray, anomaly_map: np.ndarray, width: int, height: int, *, score: float,
                 threshold: float, verdict: str, model_id: str, alpha: float = 0.45,
                 pad_rgb: tuple[int, int, int] = PAD_RGB) -> np.ndarray:
    """The overlay drawn straight at a panel's size: exactly ``width x height``, letterboxed on ``pad_rgb``.

    Banner and frame are drawn at the size they are shown (a frame smaller than the panel is
    enlarged, a larger one shrunk, the aspect kept) into one canvas: no drawing big then
    shrinking, no intermediate copies. Arguments as ``render_overlay``.
    """
    _check(image, anomaly_map, threshold, alpha)
    src_h, src_w = anomaly_map.shape
    items = _banner_items(verdict, score, threshold, model_id)
    w, h, banner = _fit(src_w, src_h, items, width, height, grow=True)
    if banner.height + h > height:  # a panel too small for the banner's text: draw it whole, then shrink
        out = render_overlay(image, anomaly_map, score=score, threshold=threshold, verdict=verdict,
                             model_id=model_id, max_side=None, alpha=alpha)
        return letterbox(out, width, height, pad_rgb)
    canvas = np.empty((height, width, 3), np.uint8)
    y0, x0 = (height - banner.height - h) // 2, (width - w) // 2
    _pad(canvas, y0, x0, banner.height + h, w, pad_rgb)
    _draw_banner(canvas[y0:y0 + banner.height, x0:x0 + w], banner)
    _draw_frame(canvas[y0 + banner.height:y0 + banner.height + h, x0:x0 + w], image, anomaly_map, threshold,
                alpha)
    return canvas


def letterbox(image: np.ndarray, width: int, height: int, pad_rgb: tuple[int, int, int] = PAD_RGB) -> np.ndarray:
    """``image`` (uint8 RGB) scaled to fit ``width x height`` with its aspect kept, centred on ``pad_rgb``."""
    h, w = image.shape[:2]
    s = min(width / w, height / h)
    nw, nh = min(width, max(1, round(w * s))), min(height, max(1, round(h * s)))
    canvas = np.empty((height, width, 3), np.uint8)
    y0, x0 = (height - nh) // 2, (width - nw) // 2
    _pad(canvas, y0, x0, nh, nw, pad_rgb)
    if (nw, nh) == (w, h):
        canvas[y0:y0 + nh, x0:x0 + nw] = image
    else:
        cv2.resize(image, (nw, nh), dst=canvas[y0:y0 + nh, x0:x0 + nw], interpolation=_interpolation(s))
    return canvas


def fill(view: np.ndarray, rgb: tuple[int, int, int]) -> None:
    """Fill an ``HxWx3`` view with one colour; a grey one as fast as ``memset`` (broadcasting a triple is not)."""
    if rgb[0] == rgb[1] == rgb[2]:
        view.fill(rgb[0])
    else:
        view[:] = rgb


def _pad(canvas: np.ndarray, y0: int, x0: int, h: int, w: int, rgb: tuple[int, int, int]) -> None:
    """Fill the canvas around the ``h x w`` box at ``(y0, x0)``: only what nothing else will draw over."""
    fill(canvas[:y0], rgb)
    fill(canvas[y0 + h:], rgb)
    fill(canvas[y0:y0 + h, :x0], rgb)
    fill(canvas[y0:y0 + h, x0 + w:], rgb)


def _check(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, alpha: float) -> None:
    if image.ndim not in (2, 3) or anomaly_map.ndim != 2 or anomaly_map.shape != image.shape[:2]:
        raise ValueError(f"anomaly_map must be HxW like the image {image.shape[:2]}, got {anomaly_map.shape}; "
                         "pass Engine.anomaly_map(score, frame_shape=image.shape[:2])")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be on the normalised scale [0, 1], got {threshold}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _interpolation(scale: float) -> int:
    """Area averaging only where shrinking by more than half would alias; bilinear (several times faster) else."""
    return cv2.INTER_AREA if scale < 0.5 else cv2.INTER_LINEAR


def _draw_frame(dst: np.ndarray, image: np.ndarray, anomaly_map: np.ndarray, threshold: float, alpha: float
                ) -> None:
    """The frame with its heat map and contours, drawn into ``dst`` (an ``hxwx3`` view of the output)."""
    src_h, src_w = anomaly_map.shape
    h, w = dst.shape[:2]
    same = (w, h) == (src_w, src_h)
    interp = _interpolation(min(w / src_w, h / src_h))
    if image.ndim == 2:  # resize the single channel, then spread it to RGB
        dst[:] = to_rgb8(image if same else cv2.resize(image, (w, h), interpolation=interp))
    elif same:
        dst[:] = to_rgb8(image)
    else:
        cv2.resize(to_rgb8(image), (w, h), dst=dst, interpolation=interp)
    heat = anomaly_map if anomaly_map.dtype == np.float32 else anomaly_map.astype(np.float32)
    if not math.isfinite(float(heat.sum())):  # rare: a NaN or infinity somewhere
        heat = np.nan_to_num(heat, nan=0.0, posinf=1.0, neginf=0.0)
    heat8 = cv2.multiply(heat, 255.0, dtype=cv2.CV_8U)  # rounded and saturated to 0..255
    if not same:
        heat8 = cv2.resize(heat8, (w, h), interpolation=interp)
    _blend_heat(dst, heat8, threshold, alpha)
    _draw_contours(dst, anomaly_map, threshold, (w / src_w, h / src_h))


@functools.lru_cache(maxsize=16)
def _heat_weights(threshold: float, alpha: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Per heat level 0..255: the frame's weight, the colour's weight, and the first level with any colour."""
    lo = threshold - FADE_BELOW
    t = np.clip((np.arange(256, dtype=np.float64) / 255 - lo) / max(threshold - lo, 1e-6), 0.0, 1.0)
    weight = alpha * t * t * (3.0 - 2.0 * t)  # smoothstep: no visible edge where the fade starts
    first = int(np.argmax(weight > 0)) if weight.any() else 256
    return (1.0 - weight).astype(np.float32), weight.astype(np.float32), first


def _blend_heat(dst: np.ndarray, heat8: np.ndarray, threshold: float, alpha: float) -> None:
    """Colour-mapped heat over the frame in place, opaque only near and above the threshold.

    Only the bounding box of the pixels that get any colour is blended: a good part, whose map
    stays far below the threshold, costs one pass to find its maximum.
    """
    keep, weight, first = _heat_weights(float(threshold), float(alpha))
    if first > 255 or cv2.minMaxLoc(heat8)[1] < first:
        return
    x, y, bw, bh = cv2.boundingRect(cv2.threshold(heat8, first - 1, 255, cv2.THRESH_BINARY)[1])
    levels, frame = heat8[y:y + bh, x:x + bw], dst[y:y + bh, x:x + bw]
    colours = cv2.applyColorMap(levels, _COLORMAP_RGB)
    frame[:] = cv2.blendLinear(frame, colours, cv2.LUT(levels, keep), cv2.LUT(levels, weight))


def _draw_contours(frame: np.ndarray, anomaly_map: np.ndarray, threshold: float, scale: tuple[float, float]
                   ) -> None:
    """Outline regions at or above the threshold, found at source resolution so small ones survive resizing."""
    mask = (anomaly_map >= threshold).view(np.uint8)  # NaN compares false: no contour
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return
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


def _draw_banner(strip: np.ndarray, banner: _Banner) -> None:
    """The banner drawn into ``strip`` (a ``banner.height x width x 3`` view of the output)."""
    fill(strip, BANNER_RGB)
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


def _fit(src_w: int, src_h: int, items: list[tuple[str, tuple[int, int, int], bool]], box_w: int, box_h: int,
         grow: bool) -> tuple[int, int, _Banner]:
    """Frame size and banner such that the banner over the frame fits ``box_w x box_h``, the frame's aspect kept.

    ``grow``: a frame smaller than the box is enlarged to fill it (else it keeps its size).
    """
    s = min(box_w / src_w, box_h / src_h)
    s = s if grow else min(1.0, s)
    w, h = min(box_w, max(1, round(src_w * s))), max(1, round(src_h * s))
    banner = _layout_banner(w, items)
    for _ in range(8):  # a narrower frame may wrap the banner onto more lines; a few rounds settle it
        if h + banner.height <= box_h:
            break
        h = max(1, box_h - banner.height)
        w = min(box_w, max(1, round(src_w * h / src_h)))
        banner = _layout_banner(w, items)
    if h + banner.height > box_h:  # pathological aspect ratios: keep the promise, squeeze the frame
        h = max(1, box_h - banner.height)
    slack = box_h - h - banner.height
    if slack > 0 and w < box_w and h < src_h * s:  # the banner shrank with the frame: give the frame the room
        h2 = h + slack
        w2 = min(box_w, max(1, round(src_w * h2 / src_h)))
        if grow or (h2 <= src_h and w2 <= src_w):
            w, h = w2, h2  # a banner laid out for a narrower frame still fits
    return w, h, banner


# --------------------------------------------------------------------------- files


def overlay_metadata(prediction: Prediction) -> dict:
    """Build the metadata that ``save_overlay`` stores from a prediction."""
    frame, decision = prediction.frame, prediction.decision
    return {"score": decision.score, "threshold": decision.threshold, "threshold_source": decision.threshold_source,
            "verdict": decision.verdict, "model_id": prediction.model_id,
            "raw_score": float(prediction.score.image_score), "timestamp": frame.timestamp, "camera": frame.camera,
            "seq": frame.seq, "source": frame.source}


#: Deflate level of overlay PNGs: 1 is the fast end that still compresses (see ``appliance.png`` and
#: bench/overlay_bench.py); an overlay is encoded for every drawn inspection, so speed wins over size.
PNG_COMPRESS_LEVEL = 1


def encode_overlay(overlay: np.ndarray, metadata: Mapping) -> bytes:
    """An overlay's PNG bytes with its metadata in EXIF: what ``save_overlay`` writes, encoded once.

    ``metadata`` goes as compact JSON into ``Exif.UserComment``; a one-line summary into
    ``ImageDescription``. The same bytes may go to several places (the file, ``latest.png``, the
    live page) without encoding again.

    Args:
        overlay: ``HxWx3`` uint8 RGB, as ``render_overlay`` returns.
        metadata: at least the keys in ``REQUIRED_KEYS``; see ``overlay_metadata``.

    """
    if overlay.dtype != np.uint8 or overlay.ndim != 3 or overlay.shape[2] != 3:
        raise ValueError(f"overlay must be HxWx3 uint8 RGB, got {overlay.shape} {overlay.dtype}")
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"overlay metadata lacks {', '.join(missing)}; build it with overlay_metadata(prediction)")
    return encode_png(overlay, _exif_bytes(metadata), PNG_COMPRESS_LEVEL)


def save_overlay(path: str | Path, overlay: np.ndarray, metadata: Mapping) -> Path:
    """Write an overlay as PNG with the verdict in EXIF (``encode_overlay``), atomically (``write_png``).

    Returns:
        The path written.

    Raises:
        ApplianceError: the disk (or quota) is full.
        OSError: any other failure to write.

    """
    path = _png_path(path)
    return write_png(path, encode_overlay(overlay, metadata))


def write_png(path: str | Path, data: bytes) -> Path:
    """Write encoded PNG bytes atomically: a reader never sees a partial file.

    The bytes go to a hidden temporary file next to ``path``, which is then renamed over it;
    missing parent folders are created.

    Raises:
        ApplianceError: the disk (or quota) is full.
        OSError: any other failure to write.

    """
    path = _png_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApplianceError(f"cannot write overlay {path}: disk full ({exc.strerror}); free space on that "
                                 "disk or lower the overlay retention") from exc
        raise
    return path


def _png_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"overlay path must end in .png, got {path}")
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
    return _parse_metadata(raw, path)


def png_overlay_metadata(data: bytes) -> dict:
    """``read_overlay_metadata`` of overlay bytes held in memory (``encode_overlay``'s output).

    Raises:
        ImageError: not an image, or no overlay metadata.

    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            raw = im.info.get("exif") or im.getexif().tobytes()
    except (OSError, SyntaxError) as exc:
        raise ImageError(None, f"overlay bytes are not a readable image: {exc}") from None
    return _parse_metadata(raw, None)


def _parse_metadata(raw: bytes | None, path: Path | None) -> dict:
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
