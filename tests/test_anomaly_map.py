"""The anomaly map: the two-matrix form against OpenCV's upsample-then-blur, which it replaces."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from appliance.anomaly_map import SIGMA, source_map, working_map
from appliance.preprocess import PreprocessSpec


def upsample_then_blur(grid: np.ndarray, size: tuple[int, int], sigma: float) -> np.ndarray:
    """What anomalib does: bilinear upsampling to the input size, then a Gaussian blur."""
    up = cv2.resize(grid.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(up, (0, 0), sigma) if sigma > 0 else up


@pytest.mark.parametrize(
    ("grid", "size", "sigma"),
    [((56, 138), (448, 1104), SIGMA), ((32, 32), (256, 256), SIGMA), ((7, 5), (61, 37), 2.5), ((3, 9), (24, 72), 0.0),
     ((1, 4), (8, 32), SIGMA)],
)
def test_working_map_is_opencvs_upsample_then_blur(grid: tuple[int, int], size: tuple[int, int], sigma: float) -> None:
    rng = np.random.default_rng(0)
    patch_map = (rng.random(grid) * 10).astype(np.float32)
    patch_map[grid[0] // 2, grid[1] // 2] = 40.0  # a sharp peak: the blur's reach and the borders matter
    got = working_map(patch_map, size, sigma)
    want = upsample_then_blur(patch_map, size, sigma)
    assert got.shape == size and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_working_map_is_linear_and_keeps_a_constant_map() -> None:
    a = working_map(np.ones((4, 6), np.float32), (32, 48))
    b = working_map(np.full((4, 6), 2.0, np.float32), (32, 48))
    np.testing.assert_allclose(b, 2 * a, rtol=1e-6)  # linear (and the cached operators are reused unchanged)
    np.testing.assert_allclose(a, 1.0, rtol=1e-5)  # a constant map stays constant (weights sum to one)


def test_source_map_fills_outside_the_roi() -> None:
    spec = PreprocessSpec.for_source((100, 200), 64, None, None, 32, (20, 10, 120, 60), None, "linear")
    out = source_map(np.ones(spec.size, np.float32), spec, fill=-1.0)
    assert out.shape == (100, 200)
    assert (out[10:70, 20:140] == 1.0).all() and (out[:10] == -1.0).all() and (out[:, 140:] == -1.0).all()
