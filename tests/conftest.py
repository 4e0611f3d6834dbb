"""Shared fixtures: the shipped backbone IR and small synthetic texture images with pasted defects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from appliance_models import backbone_dir
from servers import pg_server, postgres_url, seaweed_s3, seaweed_server  # noqa: F401  (fixtures)
from skimage import data


@pytest.fixture(scope="session")
def backbone_xml() -> Path:
    """The shipped backbone IR (its files checked against ``backbone.json``)."""
    return next(backbone_dir().glob("*.xml"))


@dataclass(frozen=True)
class Textures:
    """A fixed camera looking at a textured part: good images are one crop of a scikit-image texture with a few
    pixels of jitter, a gain change and sensor noise; defects are pasted blobs and scratches."""

    texture: np.ndarray  # grey uint8

    def good(self, rng: np.random.Generator, shape: tuple[int, int], jitter: int = 4, gain: float = 0.1,
             noise: float = 3.0) -> np.ndarray:
        """One good ``shape`` (H, W) frame as contiguous RGB uint8."""
        h, w = shape
        y0, x0 = (self.texture.shape[0] - h) // 2, (self.texture.shape[1] - w) // 2
        dy, dx = (int(v) for v in rng.integers(-jitter, jitter + 1, 2))
        crop = self.texture[y0 + dy : y0 + dy + h, x0 + dx : x0 + dx + w].astype(np.float32)
        crop = crop * rng.uniform(1 - gain, 1 + gain) + rng.normal(0, noise, crop.shape)
        return np.ascontiguousarray(cv2.cvtColor(np.clip(crop, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2RGB))

    @staticmethod
    def blob(image: np.ndarray, centre: tuple[int, int], radius: int = 8,
             colour: tuple[int, int, int] = (220, 40, 40)) -> tuple[np.ndarray, np.ndarray]:
        """A copy of ``image`` with a filled disc at ``centre`` (x, y), and the disc's bool mask."""
        out = image.copy()
        mask = np.zeros(image.shape[:2], np.uint8)
        cv2.circle(out, centre, radius, colour, -1)
        cv2.circle(mask, centre, radius, 255, -1)
        return out, mask > 0

    @staticmethod
    def scratch(image: np.ndarray, start: tuple[int, int], end: tuple[int, int], thickness: int = 3,
                colour: tuple[int, int, int] = (255, 255, 255)) -> tuple[np.ndarray, np.ndarray]:
        """A copy of ``image`` with a straight line from ``start`` to ``end`` (x, y), and its bool mask."""
        out = image.copy()
        mask = np.zeros(image.shape[:2], np.uint8)
        cv2.line(out, start, end, colour, thickness)
        cv2.line(mask, start, end, 255, thickness)
        return out, mask > 0


@pytest.fixture(scope="session")
def textures() -> Textures:
    """Crops of scikit-image's gravel texture (512x512 grey), as a small image factory."""
    return Textures(data.gravel())


def patch_hits_mask(patch_yx: tuple[int, int], mask: np.ndarray, stride: int = 8, margin: int = 0) -> bool:
    """True when the ``stride`` x ``stride`` cell of patch (y, x), grown by ``margin`` pixels, touches ``mask``."""
    y, x = patch_yx
    y0, x0 = max(0, y * stride - margin), max(0, x * stride - margin)
    return bool(mask[y0 : (y + 1) * stride + margin, x0 : (x + 1) * stride + margin].any())


@pytest.fixture(scope="session")
def hits_mask():
    """``patch_hits_mask`` as a fixture, so test modules need not import conftest."""
    return patch_hits_mask
