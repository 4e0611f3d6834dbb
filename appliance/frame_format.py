"""The pixel format a model was fitted on (grey or RGB, 8 or 16 bits), and what happens to a frame of another.

A grey copy of a good part sent to a colour model used to be silently expanded to RGB and scored
NG. Now the bundle records the format of its training frames, and a frame of another format is an
error that says so, unless the model was fitted with ``convert="grey"``: then every frame, at fit
and at inference, is converted to grey luminance first (monochrome lines whose cameras differ).
Bundles written before this record (format 3) have no frame format and check nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import ConfigError, DatasetError, ImageError
from .imaging import ImageHeader, read_header

#: What a model does with a frame of another format: ``refuse`` it, or convert every frame to ``grey``.
CONVERSIONS = ("refuse", "grey")


@dataclass(frozen=True)
class FrameFormat:
    """Channels and bit depth of the frames a model takes.

    Attributes:
        channels: 1 (grey) or 3 (RGB), as decoded (alpha is dropped).
        bits: 8 or 16 bits per sample.
        convert: ``refuse``: a frame of other channels or bit depth is an error; ``grey``: every frame
            is converted to grey luminance first, so only the bit depth must match.

    """

    channels: int
    bits: int
    convert: str = "refuse"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"preprocess.frame.channels must be 1 (grey) or 3 (RGB), got {self.channels!r}")
        if self.bits not in (8, 16):
            raise ConfigError(f"preprocess.frame.bits must be 8 or 16, got {self.bits!r}")
        if self.convert not in CONVERSIONS:
            raise ConfigError(f"preprocess.frame.convert must be one of {CONVERSIONS}, got {self.convert!r}")
        if self.convert == "grey" and self.channels != 1:
            raise ConfigError("preprocess.frame: convert 'grey' gives grey frames (channels 1), got channels "
                              f"{self.channels}")

    @classmethod
    def from_dict(cls, data: dict) -> FrameFormat:
        """From the manifest's ``preprocess.frame``; unknown keys are an error."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"preprocess.frame: unknown keys {sorted(unknown)}")
        return cls(**data)

    def describe(self) -> str:
        """``RGB 8-bit``, ``grey 16-bit``..."""
        return describe(self.channels, self.bits)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The frame in this format (converted to grey when so fitted), or ``ImageError`` saying what to do."""
        if self.convert == "grey" and image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        channels, bits = _format_of(image)
        if (channels, bits) == (self.channels, self.bits):
            return image
        if channels != self.channels:
            advice = (f"set the camera to {'grey (mono)' if self.channels == 1 else 'colour (RGB)'} output, or fit "
                      f"a model on {describe(channels, bits)} frames (fit --frame-convert grey makes a model that "
                      "converts every frame to grey)")
        else:
            advice = (f"set the camera's pixel format to {self.bits} bits, or fit a model on {bits}-bit frames")
        raise ImageError(None, f"frame is {describe(channels, bits)} but the model was fitted on {self.describe()} "
                               f"frames; {advice}")


def describe(channels: int, bits: int) -> str:
    """``grey 8-bit`` or ``RGB 16-bit``."""
    return f"{'grey' if channels == 1 else 'RGB'} {bits}-bit"


def _format_of(image: np.ndarray) -> tuple[int, int]:
    """``(channels, bits)`` of decoded pixels (``HxW`` or ``HxWx3``, uint8 or uint16)."""
    colour = image.ndim == 3 and image.shape[2] == 3
    if image.dtype not in (np.uint8, np.uint16) or not (image.ndim == 2 or colour):
        raise ImageError(None, f"frame has unsupported pixels ({image.dtype}, shape {image.shape}); expected grey "
                               "or RGB, 8- or 16-bit")
    return (3 if colour else 1), (8 if image.dtype == np.uint8 else 16)


def of_headers(headers: Iterable[tuple[Path, ImageHeader]], convert: str = "refuse") -> FrameFormat:
    """The one frame format of a fit's training images (from their headers), or ``DatasetError`` if they mix.

    With ``convert="grey"`` colour and grey images may mix (all become grey); bit depths never may.
    """
    if convert not in CONVERSIONS:
        raise ConfigError(f"frame conversion must be one of {CONVERSIONS}, got {convert!r}")
    kinds: dict[tuple[int, int], list[Path]] = {}
    for path, header in headers:
        channels = 1 if convert == "grey" else header.channels
        kinds.setdefault((channels, 16 if header.bits > 8 else 8), []).append(path)
    if not kinds:
        raise DatasetError("no training image header could be read, so their frame format is unknown")
    if len(kinds) > 1:
        ranked = sorted(kinds.items(), key=lambda kv: -len(kv[1]))
        mix = "; ".join(f"{len(paths)} {describe(*kind)} (e.g. {paths[0]})" for kind, paths in ranked)
        bits_differ = len({bits for _, bits in kinds}) > 1
        advice = ("convert them to one bit depth" if bits_differ else
                  "convert them to one format, or fit with --frame-convert grey to convert every frame (training "
                  "and inspected) to grey")
        raise DatasetError(f"training images mix frame formats: {mix}; a model takes one: {advice}")
    (channels, bits), = kinds
    return FrameFormat(channels, bits, convert)


def survey(paths: Sequence[Path], convert: str = "refuse") -> FrameFormat:
    """``of_headers`` of the readable images among ``paths`` (headers only; unreadable ones are reported elsewhere)."""
    headers = []
    for path in paths:
        try:
            headers.append((path, read_header(path)))
        except ImageError:
            continue
    return of_headers(headers, convert)
