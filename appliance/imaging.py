"""Reading images and masks robustly, and bringing pixels to the backbone's format.

Industrial images arrive as 8- or 16-bit, grey or colour, sometimes with an
alpha channel, sometimes corrupt or empty. Everything here either returns
pixels in a known format or raises ``ImageError`` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .errors import ImageError

# PIL only reads headers here (OpenCV decodes); line-scan cameras give frames far above its bomb limit.
Image.MAX_IMAGE_PIXELS = None

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})


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


def decode_image(data: bytes, path: str | Path | None = None) -> np.ndarray:
    """Decode encoded image bytes to RGB (``HxWx3``) or grey (``HxW``) pixels, uint8 or uint16."""
    buf = np.frombuffer(data, np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageError(path, "is not a readable image (corrupt, truncated or unsupported format)")
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


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB or grey pixels (uint8 or uint16), or raise ``ImageError``."""
    path = Path(path)
    return decode_image(_read_bytes(path), path)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header alone (no decoding), or ``ImageError``."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(path, "is empty (0 bytes)")
        with Image.open(path) as image:
            width, height = image.size
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(path, f"is not a readable image ({exc})") from None
    return height, width


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
