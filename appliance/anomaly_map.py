"""From a patch-score grid to a smooth anomaly map in working or source pixels.

As anomalib does: bilinear upsampling to the input resolution, then a Gaussian
of sigma 4 (input pixels). Done only when a map is wanted (overlays, pixel
metrics), never to get the image score.
"""

from __future__ import annotations

import cv2
import numpy as np

from .preprocess import PreprocessSpec

#: Gaussian sigma in working-resolution pixels (anomalib's default).
SIGMA = 4.0


def working_map(patch_map: np.ndarray, size: tuple[int, int], sigma: float = SIGMA) -> np.ndarray:
    """Upsample ``[H/8, W/8]`` patch scores to ``size`` (H, W) and smooth them."""
    h, w = size
    up = cv2.resize(patch_map.astype(np.float32, copy=False), (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(up, (0, 0), sigma) if sigma > 0 else up


def source_map(work_map: np.ndarray, spec: PreprocessSpec, frame_shape: tuple[int, int] | None = None,
               fill: float = 0.0) -> np.ndarray:
    """A working-resolution map brought back to frame pixels (outside the ROI: ``fill``)."""
    sh, sw = frame_shape or spec.source_size
    if spec.roi is None:
        return cv2.resize(work_map, (sw, sh), interpolation=cv2.INTER_LINEAR)
    x, y, rw, rh = spec.roi
    out = np.full((sh, sw), fill, np.float32)
    out[y : y + rh, x : x + rw] = cv2.resize(work_map, (rw, rh), interpolation=cv2.INTER_LINEAR)
    return out
