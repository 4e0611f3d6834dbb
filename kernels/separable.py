"""A separable linear map of a small grid: ``rows @ grid @ cols_t``, with banded operators.

The anomaly map (bilinear upsampling, then a Gaussian blur) is such a product; its
operators are zero outside a narrow band (the blur's truncated support), so the
product costs a few MACs per output pixel. Done here rather than with BLAS: BLAS's
worker threads keep spinning after a product, and on two cores that took the
backbone's next inference from 45 to 85 ms.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import config

_F = config.FASTMATH
_C = config.CACHE


def row_bands(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``matrix``: its first nonzero column and one past its last (``0, 0`` if none)."""
    nonzero = matrix != 0
    any_ = nonzero.any(1)
    lo = np.where(any_, nonzero.argmax(1), 0)
    hi = np.where(any_, matrix.shape[1] - nonzero[:, ::-1].argmax(1), 0)
    return lo.astype(np.int64), hi.astype(np.int64)


@njit(
    "void(float32[:, ::1], int64[::1], int64[::1], float32[:, ::1], float32[:, ::1], int64[::1], int64[::1],"
    " float32[:, ::1], float32[:, ::1])",
    nogil=True, fastmath=_F, cache=_C,
)
def _sandwich(rows, rows_lo, rows_hi, grid, cols_t, cols_lo, cols_hi, tmp, out):  # pragma: no cover - compiled
    gh, gw = grid.shape
    tmp[:] = 0.0
    for i in range(gh):  # tmp = grid @ cols_t, each grid column spread over its band only
        for j in range(gw):
            g = grid[i, j]
            for x in range(cols_lo[j], cols_hi[j]):
                tmp[i, x] += g * cols_t[j, x]
    out[:] = 0.0
    for y in range(out.shape[0]):  # out = rows @ tmp, each output row from its band of grid rows
        for i in range(rows_lo[y], rows_hi[y]):
            w = rows[y, i]
            for x in range(out.shape[1]):
                out[y, x] += w * tmp[i, x]


def sandwich(rows: np.ndarray, grid: np.ndarray, cols_t: np.ndarray,
             rows_band: tuple[np.ndarray, np.ndarray], cols_band: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``rows @ grid @ cols_t`` for float32 ``rows [H, h]``, ``grid [h, w]``, ``cols_t [w, W]``.

    Args:
        rows: left operator, zero outside ``rows_band`` in each row.
        grid: the small matrix in between.
        cols_t: right operator, zero outside ``cols_band`` in each row.
        rows_band: ``row_bands(rows)``.
        cols_band: ``row_bands(cols_t)``.

    Returns:
        ``[H, W]`` float32.

    """
    for name, a in (("rows", rows), ("grid", grid), ("cols_t", cols_t)):
        if a.dtype != np.float32 or a.ndim != 2 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous float32 matrix, got {a.dtype} {a.shape}")
    (big_h, h), (gh, gw), (w, big_w) = rows.shape, grid.shape, cols_t.shape
    if (h, w) != (gh, gw):
        raise ValueError(f"operators {rows.shape} and {cols_t.shape} do not fit a {grid.shape} grid")
    for name, (lo, hi), size, width in (("rows_band", rows_band, big_h, h), ("cols_band", cols_band, w, big_w)):
        if lo.shape != (size,) or hi.shape != (size,) or lo.dtype != np.int64 or hi.dtype != np.int64:
            raise ValueError(f"{name} must be two int64 vectors of length {size}")
        if size and (lo.min() < 0 or hi.max() > width or (lo > hi).any()):
            raise ValueError(f"{name} must lie within 0..{width}")
    out = np.empty((big_h, big_w), np.float32)
    _sandwich(rows, rows_band[0], rows_band[1], grid, cols_t, cols_band[0], cols_band[1],
              np.empty((gh, big_w), np.float32), out)
    return out


def sandwich_reference(rows: np.ndarray, grid: np.ndarray, cols_t: np.ndarray) -> np.ndarray:
    """Plain NumPy ``rows @ grid @ cols_t`` in float64; for tests."""
    return rows.astype(np.float64) @ grid.astype(np.float64) @ cols_t.astype(np.float64)
