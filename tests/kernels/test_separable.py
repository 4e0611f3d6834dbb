"""The banded ``rows @ grid @ cols_t`` kernel against the dense NumPy product."""

from __future__ import annotations

import numpy as np
import pytest
from appliance_kernels.separable import row_bands, sandwich, sandwich_reference


def banded(rows: int, cols: int, width: int, seed: int) -> np.ndarray:
    """A float32 matrix that is zero outside a band of ``width`` columns around its diagonal (scaled)."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((rows, cols)).astype(np.float32)
    centre = np.arange(rows)[:, None] * cols / rows
    m[np.abs(np.arange(cols)[None, :] - centre) > width] = 0.0
    return m


@pytest.mark.parametrize(("big_h", "h", "w", "big_w", "width"), [(448, 56, 138, 1104, 3), (40, 5, 7, 33, 1),
                                                                 (16, 16, 4, 4, 100), (9, 3, 2, 1, 0)])
def test_matches_the_dense_product(big_h: int, h: int, w: int, big_w: int, width: int) -> None:
    rows, cols_t = banded(big_h, h, width, 0), banded(w, big_w, width * 8, 1)
    grid = np.random.default_rng(2).standard_normal((h, w)).astype(np.float32)
    got = sandwich(rows, grid, cols_t, row_bands(rows), row_bands(cols_t))
    want = sandwich_reference(rows, grid, cols_t)
    assert got.shape == (big_h, big_w) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_row_bands() -> None:
    m = np.array([[0, 1, 2, 0], [0, 0, 0, 0], [3, 0, 0, 4]], np.float32)
    lo, hi = row_bands(m)
    np.testing.assert_array_equal(lo, [1, 0, 0])
    np.testing.assert_array_equal(hi, [3, 0, 4])


def test_a_band_that_misses_nonzeros_drops_them() -> None:
    """The bands are trusted: they are what makes the product cheap (``row_bands`` gives the exact ones)."""
    rows = np.ones((2, 3), np.float32)
    grid, cols_t = np.eye(3, dtype=np.float32), np.ones((3, 2), np.float32)
    narrow = (np.zeros(2, np.int64), np.ones(2, np.int64))  # rows use grid row 0 only
    got = sandwich(rows, grid, cols_t, narrow, row_bands(cols_t))
    np.testing.assert_allclose(got, np.ones((2, 2)))
    np.testing.assert_allclose(sandwich(rows, grid, cols_t, row_bands(rows), row_bands(cols_t)), 3 * np.ones((2, 2)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r, g, c, rb, cb: (r.astype(np.float64), g, c, rb, cb), "rows must be"),
        (lambda r, g, c, rb, cb: (r, g[:, :-1].copy(), c, rb, cb), "do not fit"),
        (lambda r, g, c, rb, cb: (r, g, np.asfortranarray(c), rb, cb), "cols_t must be"),
        (lambda r, g, c, rb, cb: (r, g, c, (rb[0][:-1], rb[1]), cb), "rows_band must be"),
        (lambda r, g, c, rb, cb: (r, g, c, rb, (cb[0], cb[1] + 100)), "cols_band must lie"),
        (lambda r, g, c, rb, cb: (r, g, c, (rb[1], rb[0]), cb), "rows_band must lie"),
    ],
)
def test_validation(change, message: str) -> None:
    rows, cols_t = banded(12, 4, 1, 0), banded(5, 20, 4, 1)
    grid = np.ones((4, 5), np.float32)
    with pytest.raises(ValueError, match=message):
        sandwich(*change(rows, grid, cols_t, row_bands(rows), row_bands(cols_t)))
