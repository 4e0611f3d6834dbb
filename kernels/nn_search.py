"""Nearest-neighbour search over per-position candidate shortlists (PatchCore).

On a fixed camera, the bank patches that match a query patch come from the
same place in the image. Each query position therefore has a shortlist of bank
rows (learned at fit time); the distance to the nearest shortlisted row is a
true distance to a bank row, so it is an *upper bound* of the exact
nearest-neighbour distance. The scorer refines the largest bounds with an exact
search until the image score is provably exact.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import config

_F = config.FASTMATH
_C = config.CACHE


@njit(
    "void(float32[:, :, ::1], float32[:, ::1], int32[:, ::1], float32[::1], int32[::1])",
    parallel=True, fastmath=_F, cache=_C,
)
def _shortlist_nn(x, bank, shortlist, dist2, nearest):  # pragma: no cover - compiled
    t_count, c_count, p_count = x.shape
    n_cand = shortlist.shape[1]
    for q in prange(t_count * p_count):
        t, p = q // p_count, q % p_count
        v = np.empty(c_count, np.float32)
        for c in range(c_count):
            v[c] = x[t, c, p]
        best, arg = np.float32(np.inf), np.int32(-1)
        for m in range(n_cand):
            row = shortlist[q, m]
            if row < 0:
                break
            s = np.float32(0.0)
            for c in range(c_count):
                diff = v[c] - bank[row, c]
                s += diff * diff
            if s < best:
                best, arg = s, row
        dist2[q] = best
        nearest[q] = arg


def shortlist_nn(x: np.ndarray, bank: np.ndarray, shortlist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared distance to, and index of, the nearest shortlisted bank row for every position.

    Args:
        x: ``[T, C, P]`` float32 query features (the backbone's NCHW output, flattened).
        bank: ``[B, C]`` float32 memory bank.
        shortlist: ``[T*P, L]`` int32 bank rows per position, most useful first; a row's candidates
            end at its first -1 (padding).

    Returns:
        ``(dist2 [T*P] float32, nearest [T*P] int32)``.

    """
    if x.dtype != np.float32 or x.ndim != 3 or not x.flags.c_contiguous:
        raise ValueError(f"queries must be C-contiguous float32 [T, C, P], got {x.dtype} {x.shape}")
    if bank.dtype != np.float32 or bank.ndim != 2 or not bank.flags.c_contiguous or bank.shape[1] != x.shape[1]:
        raise ValueError(f"bank must be C-contiguous float32 [B, {x.shape[1]}], got {bank.dtype} {bank.shape}")
    if shortlist.dtype != np.int32 or shortlist.ndim != 2 or shortlist.shape[0] != x.shape[0] * x.shape[2]:
        raise ValueError(f"shortlist must be int32 [{x.shape[0] * x.shape[2]}, L], got {shortlist.dtype} "
                         f"{shortlist.shape}")
    if shortlist.shape[1] == 0 or shortlist.max() >= bank.shape[0] or (shortlist[:, 0] < 0).any():
        raise ValueError("shortlist rows must index the bank and have at least one candidate each")
    dist2 = np.empty(shortlist.shape[0], np.float32)
    nearest = np.empty(shortlist.shape[0], np.int32)
    _shortlist_nn(x, bank, np.ascontiguousarray(shortlist), dist2, nearest)
    return dist2, nearest


def shortlist_nn_reference(x: np.ndarray, bank: np.ndarray, shortlist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain NumPy version of ``shortlist_nn``; for tests."""
    q = x.transpose(0, 2, 1).reshape(-1, x.shape[1]).astype(np.float64)
    dist2 = np.empty(len(q))
    nearest = np.empty(len(q), np.int64)
    for i, rows in enumerate(shortlist):
        end = np.flatnonzero(rows < 0)
        rows = rows[: end[0]] if end.size else rows
        d = ((bank[rows].astype(np.float64) - q[i]) ** 2).sum(1)
        dist2[i], nearest[i] = d.min(), rows[np.argmin(d)]
    return dist2, nearest
