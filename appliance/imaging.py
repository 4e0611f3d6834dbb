"""Reading images and masks robustly, and bringing pixels to the backbone's format.

Industrial images arrive as 8- or 16-bit, grey or colour, sometimes with an
alpha channel, sometimes corrupt or empty. Everything here either returns
pixels in a known format or raises ``ImageError`` naming the file. The header is
read before the pixels, so an image too large to be a frame is refused before it
is allocated, and what the decoders print becomes a log record naming the file.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import BmpImagePlugin, ImageFile, JpegImagePlugin, PngImagePlugin, PpmImagePlugin, TiffImagePlugin

from .decoder_messages import DAMAGED, RateLimitedLog, captured
from .errors import ImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})
#: Largest image decoded when no tighter limit is given: OpenCV's default limit, checked here from the header
#: rather than left to OpenCV, whose ``OPENCV_IO_MAX_IMAGE_PIXELS`` is read once inside OpenCV and cannot be relied on.
MAX_PIXELS = 1 << 30
#: Decoder warnings go to the ``appliance.imaging`` log, at most 10 a minute.
log = logging.getLogger(__name__)
_decoder_log = RateLimitedLog(log)

# Header readers by leading bytes. The plugin classes read the header only, and (unlike ``Image.open``) apply no
# decompression-bomb limit: line-scan frames are far above PIL's, and ``decode_image`` applies its own.
_HEADER_READERS: tuple[tuple[bytes, type[ImageFile.ImageFile]], ...] = (
    (b"\x89PNG\r\n\x1a\n", PngImagePlugin.PngImageFile),
    (b"\xff\xd8\xff", JpegImagePlugin.JpegImageFile),
    (b"II*\x00", TiffImagePlugin.TiffImageFile), (b"MM\x00*", TiffImagePlugin.TiffImageFile),
    (b"II+\x00", TiffImagePlugin.TiffImageFile), (b"MM\x00+", TiffImagePlugin.TiffImageFile),
    (b"BM", BmpImagePlugin.BmpImageFile),
    *((b"P" + bytes([c]), PpmImagePlugin.PpmImageFile) for c in b"123456"),
)
_FORMATS = "PNG, JPEG, TIFF, BMP, PGM/PPM or WebP"


@dataclass(frozen=True)
class ImageHeader:
    """What an encoded image's header says about its pixels, read without decoding them.

    Attributes:
        height: rows.
        width: columns.
        channels: 1 for a grey image, 3 for colour (a palette counts as colour, alpha is not counted):
            what ``decode_image`` returns.
        bits: bits per sample as stored (1, 2, 4 and 8 decode to uint8, 16 to uint16).
        format: ``PNG``, ``JPEG``, ``TIFF``, ``BMP``, ``PPM`` (PGM/PPM/PBM) or ``WEBP``.

    """

    height: int
    width: int
    channels: int
    bits: int
    format: str

    @property
    def pixels(self) -> int:
        """Pixels per channel, ``height * width``."""
        return self.height * self.width


def image_header(data: bytes, path: str | Path | None = None) -> ImageHeader:
    """Read an encoded image's header (size, channels, bit depth, format) without decoding it, or ``ImageError``."""
    return _header(io.BytesIO(data), path)


def read_header(path: str | Path) -> ImageHeader:
    """``image_header`` of a file, reading only as much of it as the header takes."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(path, "is empty (0 bytes)")
        with path.open("rb") as f:
            return _header(f, path)
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory, not an image file") from None
    except OSError as exc:
        raise ImageError(path, f"cannot be read: {exc.strerror or exc}") from None


def _header(fp: BinaryIO, path: str | Path | None) -> ImageHeader:
    prefix = fp.read(32)
    fp.seek(0)
    if prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP":
        return _webp_header(prefix, path)
    reader = next((cls for magic, cls in _HEADER_READERS if prefix.startswith(magic)), None)
    if reader is None:
        raise ImageError(path, f"is not a readable image (not a {_FORMATS} file)")
    try:
        image = reader(fp)
        mode, (width, height) = image.mode, image.size
        args = image.tile[0].args if image.tile else None
    except (SyntaxError, OSError, ValueError, EOFError) as exc:
        raise ImageError(path, f"is not a readable image (bad {reader.format} header: {exc})") from None
    grey = mode in ("1", "L", "LA", "La", "I", "F") or mode.startswith("I;16")
    return ImageHeader(height, width, 1 if grey else 3, _bits(reader.format, mode, args), str(reader.format))


def _bits(fmt: str, mode: str, args: object) -> int:
    """Bits per sample from PIL's mode and the raw mode of its first tile (``RGB;16B``; PPM: ``(mode, maxval)``)."""
    if mode == "1":
        return 1
    if fmt == "BMP":  # its raw modes count packed bits per pixel (BGR;16 is 5-6-5): samples are 8 bits or fewer
        return 8
    raw = args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else args
    if isinstance(args, tuple) and len(args) == 2 and isinstance(args[1], int) and args[1] > 255:
        return 16  # a PPM's maxval
    match = re.search(r";(\d+)", raw) if isinstance(raw, str) else None
    if match:
        return int(match.group(1))
    return 32 if mode in ("I", "F") else 8


def _webp_header(prefix: bytes, path: str | Path | None) -> ImageHeader:
    """Size of a WebP file from its first chunk (PIL would create a decoder, and its canvas, to read it)."""
    chunk = prefix[12:16]
    if chunk == b"VP8 " and prefix[23:26] == b"\x9d\x01\x2a":
        width, height = (int.from_bytes(prefix[i : i + 2], "little") & 0x3FFF for i in (26, 28))
    elif chunk == b"VP8L" and prefix[20] == 0x2F:
        bits = int.from_bytes(prefix[21:25], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    elif chunk == b"VP8X" and len(prefix) >= 30:
        width, height = (1 + int.from_bytes(prefix[i : i + 3], "little") for i in (24, 27))
    else:
        raise ImageError(path, "is not a readable image (bad WebP header)")
    return ImageHeader(height, width, 3, 8, "WEBP")


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory, not an image file") from None
    except OSError as exc:
        raise ImageError(path, f"cannot be read: {exc.strerror or exc}") from None
    if not data:
        raise ImageError(path, "is empty (0 bytes)")
    return data


def decode_image(data: bytes, path: str | Path | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to RGB (``HxWx3``) or grey (``HxW``) pixels, uint8 or uint16.

    The header is read first: an image of more than ``max_pixels`` (default ``MAX_PIXELS``) is refused
    before anything of its size is allocated. What the decoder prints goes to the ``appliance.imaging``
    log naming the file; a warning that pixels are missing or garbled (a JPEG cut short) is an error.
    """
    header = image_header(data, path)
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    if header.pixels > limit:
        whose = "the largest image this appliance decodes" if max_pixels is None else "this camera's limit"
        raise ImageError(
            path, f"is {header.width}x{header.height} pixels ({header.pixels / 1e6:.1f} MP), above {whose} of "
            f"{limit / 1e6:.1f} MP (refused before decoding; check the camera's resolution, or that the file is "
            "the frame it should be)")
    with captured() as messages:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    said = f": the decoder said {'; '.join(messages)!r}" if messages else ""
    if image is None or image.size == 0:
        raise ImageError(path, f"is not a readable image (corrupt, truncated or unsupported format){said}")
    if any(DAMAGED.search(m) for m in messages):
        raise ImageError(path, f"is damaged (pixels missing or garbled; a frame cut short in transfer?){said}")
    if messages:
        _decoder_log.log(logging.WARNING, "%s: decoded with warnings: %s", path or "image", "; ".join(messages))
    if header.channels == 1 and image.ndim == 3:  # grey + alpha PNGs come back as BGRA
        image = np.ascontiguousarray(image[:, :, 0])
    return normalise_pixels(image, path)


def normalise_pixels(image: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Bring decoded pixels (OpenCV channel order) to uint8/uint16 grey or RGB; drop alpha."""
    if image.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(image.dtype, np.floating):
            raise ImageError(path, f"has floating-point pixels ({image.dtype}); save it as 8- or 16-bit")
        raise ImageError(path, f"has unsupported pixel type {image.dtype}; expected 8- or 16-bit")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ImageError(path, f"has an unsupported shape {image.shape}")
    code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(image, code)


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as RGB or grey pixels (uint8 or uint16), or raise ``ImageError`` (see ``decode_image``)."""
    path = Path(path)
    return decode_image(_read_bytes(path), path, max_pixels)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header alone (no decoding), or ``ImageError``."""
    header = read_header(path)
    return header.height, header.width


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask (non-zero = defect) of exactly ``shape`` (H, W) as bool."""
    path = Path(path)
    mask = read_image(path)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.shape != tuple(shape):
        raise ImageError(
            path, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]} (WxH)"
        )
    return mask > 0


def to_rgb8(image: np.ndarray, white_level: int | None = None) -> np.ndarray:
    """Convert grey/RGB, 8/16-bit pixels to contiguous uint8 RGB.

    Args:
        image: ``HxW`` or ``HxWx3`` uint8/uint16 pixels.
        white_level: for 16-bit input, the value that maps to 255 (e.g. 4095 for a
            12-bit camera); ``None`` means 65535. Ignored for 8-bit input.

    """
    if image.dtype == np.uint16:
        level = 65535 if white_level is None else int(white_level)
        image = cv2.convertScaleAbs(image, alpha=255.0 / level)  # saturates above the white level
    elif image.dtype != np.uint8:
        raise ImageError(None, f"unsupported pixel type {image.dtype}; expected uint8 or uint16")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(image)


def is_image_file(path: Path) -> bool:
    """True for a visible file with a known image suffix."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
