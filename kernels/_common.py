"""Small compiled helpers shared by the kernels (inlined at every call site)."""

from __future__ import annotations

import numpy as np
from numba import njit

from . import config


@njit(inline="always", fastmath=config.FASTMATH)
def sq_dist(a, b):  # pragma: no cover - compiled
    """Squared Euclidean distance of two equal-length float32 vectors."""
    s = np.float32(0.0)
    for j in range(a.shape[0]):
        t = a[j] - b[j]
        s += t * t
    return s


@njit(inline="always", fastmath=config.FASTMATH)
def nearest_of(v, bank, rows, best, arg):  # pragma: no cover - compiled
    """The nearer of ``(best, arg)`` and the bank rows listed in ``rows``.

    The list ends at its first -1, or at a row past the bank (never read out of bounds).
    """
    for m in range(rows.shape[0]):
        row = rows[m]
        if row < 0 or row >= bank.shape[0]:
            break
        s = sq_dist(v, bank[row])
        if s < best:
            best, arg = s, row
    return best, arg


@njit(inline="always", fastmath=config.FASTMATH)
def gather_position(x, q, out):  # pragma: no cover - compiled
    """out[c] = x[t, c, p] for flat position ``q = t * P + p`` of ``[T, C, P]`` features."""
    p_count = x.shape[2]
    t, p = q // p_count, q % p_count
    for c in range(out.shape[0]):
        out[c] = x[t, c, p]
