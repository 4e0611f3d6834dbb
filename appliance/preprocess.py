"""From a source frame to the backbone's input tiles, and from tile scores back to one map.

The same ``Preprocessor`` runs at fit time and at inference time and is fully
described by a ``PreprocessSpec`` stored in the bundle: a mismatch between the
two is the most common production bug with exported models, so there is only
one implementation.

Geometry: the frame is cropped to the ROI, resized to a working size whose sides
are multiples of 16 and, optionally, cut into overlapping tiles of one fixed size,
which go through the backbone as one batch. How a frame reaches the working size
is the spec's resize policy:

* ``fixed``: every frame has the fitted aspect ratio (a fixed camera); others are
  refused, because the position-dependent parts of a model (PaDiM's per-position
  Gaussians, the position norm, PatchCore's positional shortlists) assume that a
  patch position shows the same place of the part in every frame;
* ``stretch``: any frame is resized to the working size, its aspect ratio not kept
  (what anomalib does); a position then shows the same *relative* place of the
  frame, which suits crops of one part whose extent varies;
* ``letterbox``: the frame is scaled to fit inside the working size with its
  aspect ratio kept and centred; the rest is padding (mirrored content, so that
  patches at the content's edge see natural surroundings), outside the frame's
  valid area: it is never scored.
Tile origins are multiples of the feature stride, so each tile's patch grid is a
window of one global patch grid; the tile maps are blended back with weights
that fade towards inner tile edges, where zero padding distorts features.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from .errors import ConfigError, ImageError
from .frame_format import FrameFormat
from .imaging import to_rgb8

#: Feature stride of the backbone's patch grid; tile origins are multiples of it.
STRIDE = 8
#: Input sides must be multiples of this (the deepest tap has stride 16).
MULTIPLE = 16
#: Resampling used when shrinking a frame to the working size (enlarging is always linear).
INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}
#: Relative aspect-ratio difference tolerated between a frame and the fitted geometry.
ASPECT_TOLERANCE = 0.02
#: How a frame reaches the working size (see the module docstring).
RESIZE_POLICIES = ("fixed", "stretch", "letterbox")
#: Letterbox padding: mirrored content (no artificial edge at the frame's border).
_PAD_BORDER = cv2.BORDER_REFLECT_101
#: Smallest frame-size limit (pixels) of ``frame_pixel_limit``, whatever the model's frames.
MIN_PIXEL_LIMIT = 1_000_000


def round_to(value: float, multiple: int = MULTIPLE) -> int:
    """Nearest positive multiple of ``multiple``."""
    return max(multiple, round(value / multiple) * multiple)


@dataclass(frozen=True)
class PreprocessSpec:
    """How a source frame becomes backbone input; saved in the bundle.

    Attributes:
        source_size: ``(H, W)`` of the frames the model is fitted on.
        size: working ``(H, W)`` after ROI crop and resize, multiples of 16.
        tile: tile ``(H, W)`` (multiples of 16), or ``None`` for one whole-image pass.
        overlap: minimum overlap between neighbouring tiles, working pixels.
        roi: ``(x, y, w, h)`` crop in source pixels, or ``None`` for the whole frame.
        white_level: 16-bit value mapped to 255 (``None``: 65535).
        interpolation: ``area`` (anti-aliased, best for small defects when shrinking a lot)
            or ``linear`` (about 1 ms less per 1-megapixel frame).
        resize: ``fixed``, ``stretch`` or ``letterbox`` (see the module docstring). With
            ``stretch`` and ``letterbox``, ``source_size`` is the typical (median) frame size.
        frame: the training frames' channels and bit depth, and whether other frames are refused
            or converted to grey (``appliance.frame_format``); ``None`` in bundles written before it
            was recorded (format 3): no check.

    """

    source_size: tuple[int, int]
    size: tuple[int, int]
    tile: tuple[int, int] | None = None
    overlap: int = 32
    roi: tuple[int, int, int, int] | None = None
    white_level: int | None = None
    interpolation: str = "linear"
    resize: str = "fixed"
    frame: FrameFormat | None = None

    def __post_init__(self) -> None:
        check_spec(self)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        """Inverse of ``to_dict``; unknown keys are an error."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"preprocess: unknown keys {sorted(unknown)}")
        tup = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if isinstance(tup.get("frame"), dict):
            tup["frame"] = FrameFormat.from_dict(tup["frame"])
        return cls(**tup)

    @classmethod
    def for_source(
        cls,
        source_size: tuple[int, int],
        height: int | None,
        width: int | None = None,
        tile: tuple[int, int] | None = None,
        overlap: int = 32,
        roi: tuple[int, int, int, int] | None = None,
        white_level: int | None = None,
        interpolation: str = "linear",
        resize: str = "fixed",
        frame: FrameFormat | None = None,
    ) -> PreprocessSpec:
        """A spec whose working width keeps the (ROI's) aspect ratio unless ``width`` is given.

        ``height=None`` works at the (ROI's) own resolution: its height rounded down to a multiple
        of 16, never upscaled. That is what tiling is for: small defects seen at full resolution.
        """
        rh, rw = (roi[3], roi[2]) if roi else source_size
        h = round_to(height) if height is not None else max(MULTIPLE, rh // MULTIPLE * MULTIPLE)
        w = round_to(width) if width else round_to(h * rw / rh)
        return cls(tuple(source_size), (h, w), tile and tuple(tile), overlap, roi and tuple(roi), white_level,
                   interpolation, resize, frame)


def check_spec(spec: PreprocessSpec) -> None:
    """Cross-field checks; raises ``ConfigError`` saying which setting is wrong."""
    sh, sw = spec.source_size
    if sh <= 0 or sw <= 0:
        raise ConfigError(f"preprocess.source_size must be positive, got {spec.source_size}")
    h, w = spec.size
    if h % MULTIPLE or w % MULTIPLE or h <= 0 or w <= 0:
        raise ConfigError(f"preprocess.size {spec.size} must be positive multiples of {MULTIPLE}")
    if spec.tile is not None:
        th, tw = spec.tile
        if th % MULTIPLE or tw % MULTIPLE or th <= 0 or tw <= 0:
            raise ConfigError(f"preprocess.tile {spec.tile} must be positive multiples of {MULTIPLE}")
        if th > h or tw > w:
            raise ConfigError(f"preprocess.tile {spec.tile} is larger than the working size {spec.size}")
        if not 0 <= spec.overlap < min(th, tw):
            raise ConfigError(f"preprocess.overlap {spec.overlap} must be in [0, tile side)")
    if spec.roi is not None:
        x, y, rw, rh = spec.roi
        if x < 0 or y < 0 or rw <= 0 or rh <= 0 or x + rw > sw or y + rh > sh:
            raise ConfigError(f"preprocess.roi {spec.roi} (x, y, w, h) does not fit in a {sw}x{sh} frame")
    if spec.interpolation not in INTERPOLATIONS:
        raise ConfigError(f"preprocess.interpolation must be one of {sorted(INTERPOLATIONS)}, got "
                          f"{spec.interpolation!r}")
    if spec.resize not in RESIZE_POLICIES:
        raise ConfigError(f"preprocess.resize must be one of {RESIZE_POLICIES}, got {spec.resize!r}")
    if spec.roi is not None and spec.resize != "fixed":
        raise ConfigError(f"preprocess.roi needs resize 'fixed' (an ROI in pixels means nothing on frames of "
                          f"varying size), got resize {spec.resize!r}")
    if spec.white_level is not None and not 1 <= spec.white_level <= 65535:
        raise ConfigError(f"preprocess.white_level must be in [1, 65535], got {spec.white_level}")
    if spec.frame is not None and not isinstance(spec.frame, FrameFormat):
        raise ConfigError(f"preprocess.frame must be a frame format, got {spec.frame!r}")


def frame_pixel_limit(spec: PreprocessSpec, factor: float = 4.0) -> int:
    """The most pixels a frame for this model may have; larger ones are refused before they are decoded.

    The rule: ``factor`` (4) times the pixels of the model's source frames (``spec.source_size``: the
    training frames' size, or their median size for ``stretch`` and ``letterbox``), and never less than
    1 megapixel. A frame 4x the expected size is a misconfigured camera or a wrong file, and one of
    400 megapixels would take gigabytes and tens of seconds to decode before it could be refused.
    """
    if factor <= 0:
        raise ConfigError(f"frame pixel limit factor must be positive, got {factor}")
    sh, sw = spec.source_size
    return max(MIN_PIXEL_LIMIT, int(factor * sh * sw))


def _origins(total: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: evenly spread, multiples of STRIDE, covering [0, total)."""
    if tile >= total:
        return [0]
    n = math.ceil((total - overlap) / (tile - overlap))
    n = max(n, 2)
    last = total - tile
    origins = sorted({min(last, round(i * last / (n - 1) / STRIDE) * STRIDE) for i in range(n)})
    origins[-1] = last
    return origins


def _ramp(n: int, fade_lo: int, fade_hi: int) -> np.ndarray:
    """1-D blending weights: rise over ``fade_lo`` cells at the start, fall over ``fade_hi`` at the end."""
    w = np.ones(n, np.float32)
    for i in range(n):
        if fade_lo:
            w[i] = min(w[i], (i + 0.5) / fade_lo)
        if fade_hi:
            w[i] = min(w[i], (n - i - 0.5) / fade_hi)
    return w


@dataclass(frozen=True)
class TilePlan:
    """Where each tile sits in the working image and how tile maps are blended back."""

    origins: tuple[tuple[int, int], ...]
    tile: tuple[int, int]
    grid: tuple[int, int]
    weights: np.ndarray = field(repr=False, compare=False)  # [T, th/8, tw/8], already normalised

    @property
    def count(self) -> int:
        """Number of tiles."""
        return len(self.origins)


def plan_tiles(spec: PreprocessSpec) -> TilePlan:
    """The tiling of ``spec``'s working image (one tile when ``spec.tile`` is None)."""
    h, w = spec.size
    th, tw = spec.tile or spec.size
    ys, xs = _origins(h, th, spec.overlap), _origins(w, tw, spec.overlap)
    origins = tuple((y, x) for y in ys for x in xs)
    gh, gw, ph, pw = h // STRIDE, w // STRIDE, th // STRIDE, tw // STRIDE
    weights = np.zeros((len(origins), ph, pw), np.float32)
    for t, (y, x) in enumerate(origins):
        fade = [0, 0, 0, 0]  # fade in over the overlap with the neighbour on each inner side
        for (yy, xx) in origins:
            if xx == x and 0 < y - yy < th:
                fade[0] = max(fade[0], (yy + th - y) // STRIDE)
            if xx == x and 0 < yy - y < th:
                fade[1] = max(fade[1], (y + th - yy) // STRIDE)
            if yy == y and 0 < x - xx < tw:
                fade[2] = max(fade[2], (xx + tw - x) // STRIDE)
            if yy == y and 0 < xx - x < tw:
                fade[3] = max(fade[3], (x + tw - xx) // STRIDE)
        weights[t] = np.outer(_ramp(ph, fade[0], fade[1]), _ramp(pw, fade[2], fade[3]))
    total = np.zeros((gh, gw), np.float32)
    for t, (y, x) in enumerate(origins):
        total[y // STRIDE : y // STRIDE + ph, x // STRIDE : x // STRIDE + pw] += weights[t]
    for t, (y, x) in enumerate(origins):
        weights[t] /= total[y // STRIDE : y // STRIDE + ph, x // STRIDE : x // STRIDE + pw]
    return TilePlan(origins, (th, tw), (gh, gw), weights)


class Preprocessor:
    """Applies a ``PreprocessSpec``: frame pixels -> uint8 NHWC tile batch, tile scores -> patch map.

    Stateless after construction, so one preprocessor may serve several threads at once.
    """

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.plan = plan_tiles(spec)
        sh, sw = spec.source_size
        rh, rw = (spec.roi[3], spec.roi[2]) if spec.roi else (sh, sw)
        self._aspect = rw / rh

    def region(self, image: np.ndarray) -> np.ndarray:
        """The ROI of a frame, after checking the frame's geometry against the spec."""
        spec = self.spec
        h, w = image.shape[:2]
        if spec.roi is not None:
            x, y, rw, rh = spec.roi
            if x + rw > w or y + rh > h:
                raise ImageError(None, f"frame is {w}x{h}, too small for the ROI {spec.roi} (x, y, w, h)")
            return image[y : y + rh, x : x + rw]
        if spec.resize == "fixed" and abs(w / h - self._aspect) > ASPECT_TOLERANCE * self._aspect:
            sh, sw = spec.source_size
            raise ImageError(
                None, f"frame is {w}x{h} but the model was fitted on {sw}x{sh} frames (aspect ratio differs; "
                "a model fitted with resize 'stretch' or 'letterbox' takes frames of any size)"
            )
        return image

    def letterbox_box(self, frame_shape: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(y, x, h, w)`` of a frame's content inside the working image (the whole of it unless letterboxed)."""
        H, W = self.spec.size  # noqa: N806 - working size, as in the spec
        if self.spec.resize != "letterbox":
            return 0, 0, H, W
        fh, fw = frame_shape
        scale = min(H / fh, W / fw)
        h, w = min(H, max(1, round(fh * scale))), min(W, max(1, round(fw * scale)))
        return (H - h) // 2, (W - w) // 2, h, w

    def working_image(self, image: np.ndarray) -> np.ndarray:
        """ROI crop, 8-bit RGB, brought to the working size by the spec's resize policy: ``[H, W, 3]`` uint8.

        A frame whose channels or bit depth differ from the model's (``spec.frame``) is refused or converted here,
        the one place fit, predict, eval and the daemon share.
        """
        region = self.region(image)
        if self.spec.frame is not None:
            region = self.spec.frame.apply(region)
        region = to_rgb8(region, self.spec.white_level)
        H, W = self.spec.size  # noqa: N806
        y, x, h, w = self.letterbox_box(region.shape[:2])
        rh, rw = region.shape[:2]
        interp = INTERPOLATIONS[self.spec.interpolation] if rh > h or rw > w else cv2.INTER_LINEAR
        work = cv2.resize(region, (w, h), interpolation=interp)
        if (h, w) != (H, W):
            work = cv2.copyMakeBorder(work, y, H - h - y, x, W - w - x, _PAD_BORDER)
        return work

    def tiles(self, image: np.ndarray) -> np.ndarray:
        """The backbone batch ``[T, th, tw, 3]`` uint8 for one frame (a new array: callers may keep it)."""
        work = self.working_image(image)
        if self.plan.count == 1:
            return work[None]
        th, tw = self.plan.tile
        return np.stack([work[y : y + th, x : x + tw] for y, x in self.plan.origins])

    def frame_valid(self, frame_shape: tuple[int, int]) -> np.ndarray | None:
        """Per-tile bool ``[T, th/8, tw/8]`` of the patches that show a frame of this shape, ``None``: all do.

        Only letterboxing leaves patches outside the frame (its padding); a patch counts as
        inside when at least half of it is.
        """
        if self.spec.resize != "letterbox":
            return None
        y, x, h, w = self.letterbox_box(frame_shape)
        inside = np.zeros(self.spec.size, np.float32)
        inside[y : y + h, x : x + w] = 1.0
        return self._per_tile(inside)

    def _per_tile(self, area: np.ndarray) -> np.ndarray:
        """A 0/1 area over the working image (at any resolution) as per-tile patch flags (at least half inside)."""
        gh, gw = self.plan.grid
        grid = cv2.resize(area, (gw, gh), interpolation=cv2.INTER_AREA) >= 0.5
        ph, pw = self.plan.tile[0] // STRIDE, self.plan.tile[1] // STRIDE
        return np.stack([grid[y // STRIDE : y // STRIDE + ph, x // STRIDE : x // STRIDE + pw]
                         for y, x in self.plan.origins])

    def stitch(self, tile_scores: np.ndarray) -> np.ndarray:
        """Blend per-tile patch scores ``[T, th/8, tw/8]`` into one ``[H/8, W/8]`` map."""
        plan = self.plan
        if plan.count == 1:
            return np.ascontiguousarray(tile_scores[0], dtype=np.float32)
        out = np.zeros(plan.grid, np.float32)
        ph, pw = tile_scores.shape[1:]
        for t, (y, x) in enumerate(plan.origins):
            out[y // STRIDE : y // STRIDE + ph, x // STRIDE : x // STRIDE + pw] += tile_scores[t] * plan.weights[t]
        return out

    def valid_patches(self, valid_mask: np.ndarray | None) -> np.ndarray | None:
        """Per-tile bool ``[T, th/8, tw/8]``: patches at least half inside the valid area of a source-size mask."""
        if valid_mask is None:
            return None
        spec = self.spec
        if spec.resize != "fixed":
            raise ConfigError(f"a valid-area mask needs resize 'fixed' (frames of one geometry), not {spec.resize!r}")
        if valid_mask.shape != tuple(spec.source_size):
            raise ImageError(None, f"valid-area mask is {valid_mask.shape[::-1]} (WxH) but frames are "
                             f"{spec.source_size[::-1]}")
        return self._per_tile(self.region(valid_mask.astype(np.float32)))
