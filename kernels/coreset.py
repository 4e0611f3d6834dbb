"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling).

Farthest-point selection picks, one at a time, the point farthest from all points
already chosen. Done naively that is ``k * N * d`` work, which for a real training
set (a million patches, tens of thousands chosen) takes hours in anomalib. Two
things make it fast here without changing the result:

* the distances are computed on a random projection to a few dozen dimensions
  (as in the PatchCore paper), streamed in chunks into one preallocated buffer;
* after a first round of plain iterations, the points are grouped by their
  nearest centre, and each later iteration skips every group that the triangle
  inequality proves the new centre cannot reach: ``|c - g| - r_g >= D_g``, with
  ``r_g`` the group's radius and ``D_g`` the largest remaining min-distance in it.

The pruned loop selects exactly what the plain loop would (tests check this
against a NumPy reference).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import config
from ._common import sq_dist

_F = config.FASTMATH
_C = config.CACHE


@njit(
    "void(float32[:, ::1], float32[::1], float32[::1], int32[::1], int32, int64[::1], float32[::1])",
    parallel=True, fastmath=_F, cache=_C,
)
def _update_all(x, centre, min_d2, assign, label, chunk_arg, chunk_max):  # pragma: no cover - compiled
    """min_d2 = min(min_d2, |x - centre|^2) for every row; per-chunk argmax of the result."""
    n = x.shape[0]
    n_chunks = chunk_max.shape[0]
    step = (n + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        best, arg = np.float32(-1.0), -1
        for i in range(c * step, min(n, (c + 1) * step)):
            s = sq_dist(x[i], centre)
            if s < min_d2[i]:
                min_d2[i] = s
                assign[i] = label
            if min_d2[i] > best:
                best, arg = min_d2[i], i
        chunk_max[c] = best
        chunk_arg[c] = arg


#: Relative slack on every triangle-inequality test, so float rounding can never skip a row that matters.
_SLACK = np.float32(1e-4)


@njit(
    "void(float32[:, ::1], float32[::1], float32[::1], int32[::1], int32, int64[::1], float32[:, ::1],"
    " float32[::1], float32[::1], int64[::1], float32[::1], int64[::1])",
    parallel=True, fastmath=_F, cache=_C,
)
def _update_pruned(x, centre, min_d2, assign, label, offsets, centres, radius, dc, original, group_max2,
                   group_arg):  # pragma: no cover - compiled
    """One pruned iteration over rows sorted by (group, distance to the group's centre ``dc``).

    With ``e`` the new centre's distance to a group's centre, a row can only get closer to
    the new centre than to its current nearest if ``|e - dc| < current distance <= D_g``: so
    groups with ``e - r_g >= D_g`` are skipped, and in the others only the rows whose ``dc``
    lies in ``(e - D_g, e + D_g)`` (a binary search) are looked at.
    """
    for g in prange(centres.shape[0]):
        lo, hi = offsets[g], offsets[g + 1]
        if lo == hi:
            continue
        e = np.sqrt(sq_dist(centres[g], centre))
        reach = np.sqrt(max(group_max2[g], np.float32(0.0))) * (1 + _SLACK) + np.float32(1e-6)
        if e - radius[g] >= reach:
            continue
        first = lo + np.searchsorted(dc[lo:hi], e - reach)
        last = lo + np.searchsorted(dc[lo:hi], e + reach, side="right")
        arg = group_arg[g]
        arg_moved = False
        for i in range(first, last):
            bound = e - dc[i]
            if bound * bound > min_d2[i] * (1 + _SLACK) + np.float32(1e-6):
                continue
            s = sq_dist(x[i], centre)
            if s < min_d2[i]:
                min_d2[i] = s
                assign[i] = label
                if i == arg:
                    arg_moved = True
        if arg_moved:  # the group's farthest row got closer: find the new farthest (ties: lowest original row)
            best, arg = np.float32(-1.0), np.int64(-1)
            for i in range(lo, hi):
                v = min_d2[i]
                if v > best or (v == best and original[i] < original[arg]):
                    best, arg = v, i
            group_max2[g] = best
            group_arg[g] = arg


@njit("void(float32[:, ::1], float32[:, ::1], int64[::1], float32[::1])", parallel=True, fastmath=_F, cache=_C)
def _centre_distances(x, centres, offsets, dc):  # pragma: no cover - compiled
    """dc[i] = distance of row i to the centre of its group."""
    for g in prange(centres.shape[0]):
        for i in range(offsets[g], offsets[g + 1]):
            dc[i] = np.sqrt(sq_dist(x[i], centres[g]))


def _project(features: np.ndarray, rows: np.ndarray | None, matrix: np.ndarray, out: np.ndarray) -> None:
    """out[i] = features[rows[i]] @ matrix, chunk by chunk (bounded temporaries)."""
    n = out.shape[0]
    for lo in range(0, n, config.CHUNK_ROWS):
        hi = min(n, lo + config.CHUNK_ROWS)
        block = features[lo:hi] if rows is None else features[rows[lo:hi]]
        np.matmul(block.astype(np.float32, copy=False), matrix, out=out[lo:hi])


def projection_matrix(dim_in: int, dim_out: int, seed: int) -> np.ndarray:
    """Gaussian Johnson-Lindenstrauss projection, scaled to preserve distances on average."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim_in, dim_out)) / np.sqrt(dim_out)).astype(np.float32)


def greedy_coreset(
    features: np.ndarray,
    k: int,
    *,
    projection_dim: int | None = 64,
    seed: int = 0,
    clusters: int = config.CORESET_CLUSTERS,
    return_assignment: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Indices of ``k`` rows of ``features`` chosen by greedy k-center selection.

    Args:
        features: ``[N, D]`` float32 or float16 rows (not copied; only a projected
            ``[N, projection_dim]`` float32 buffer is allocated).
        k: how many rows to select, ``1 <= k <= N``.
        projection_dim: random-projection width used for the distances; ``None``
            uses the features as they are.
        seed: seeds the projection and the first centre.
        clusters: plain iterations before pruning starts (0 disables pruning).
        return_assignment: also return, for every row, the position in the
            selection of its nearest selected row (in the projected space).

    Returns:
        int64 indices into ``features``, in selection order (and the int32 assignment).

    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [N, D] array, got shape {features.shape}")
    if features.dtype not in (np.float32, np.float16):
        raise ValueError(f"features must be float32 or float16, got {features.dtype}")
    n, dim = features.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if projection_dim is not None and projection_dim < 1:
        raise ValueError(f"projection_dim must be >= 1 or None, got {projection_dim}")
    rng = np.random.default_rng(seed)
    if projection_dim is None or projection_dim >= dim:
        matrix = np.eye(dim, dtype=np.float32)
    else:
        matrix = projection_matrix(dim, projection_dim, seed)
    x = np.empty((n, matrix.shape[1]), np.float32)
    _project(features, None, matrix, x)

    first = int(rng.integers(n))
    selected = np.empty(k, np.int64)
    min_d2 = np.full(n, np.inf, np.float32)
    assign = np.zeros(n, np.int32)
    chunk_max = np.empty(64, np.float32)
    chunk_arg = np.empty(64, np.int64)
    plain = k if clusters <= 0 else min(k, clusters)
    nxt = first
    for i in range(plain):
        selected[i] = nxt
        _update_all(x, np.ascontiguousarray(x[nxt]), min_d2, assign, np.int32(i), chunk_arg, chunk_max)
        nxt = int(chunk_arg[int(np.argmax(chunk_max))])
    if plain == k:
        return (selected, assign) if return_assignment else selected

    # Group rows by nearest centre, sorted within the group by distance to it (from phase 1), and
    # re-project them in that order so each group is contiguous and its annuli are slices.
    order = np.lexsort((min_d2, assign))
    offsets = np.zeros(plain + 1, np.int64)
    np.cumsum(np.bincount(assign, minlength=plain), out=offsets[1:])
    centres = np.ascontiguousarray(x[selected[:plain]])
    del x
    xs = np.empty((n, matrix.shape[1]), np.float32)
    _project(features, order, matrix, xs)
    min_d2 = min_d2[order]
    assign_sorted = assign[order]
    del assign
    dc = np.empty(n, np.float32)
    _centre_distances(xs, centres, offsets, dc)
    for g in range(plain):  # the re-projection may differ from phase 1 in the last bit: keep each slice sorted
        lo, hi = offsets[g], offsets[g + 1]
        if hi - lo > 1 and (np.diff(dc[lo:hi]) < 0).any():
            fix = lo + np.argsort(dc[lo:hi], kind="stable")
            order[lo:hi], xs[lo:hi], min_d2[lo:hi], dc[lo:hi] = order[fix], xs[fix], min_d2[fix], dc[fix]
    group_max2 = np.full(plain, -1.0, np.float32)
    group_arg = np.full(plain, -1, np.int64)
    radius = np.zeros(plain, np.float32)
    for g in range(plain):
        lo, hi = offsets[g], offsets[g + 1]
        if lo == hi:  # only when rows duplicate an earlier centre exactly
            continue
        vals = min_d2[lo:hi]
        tied = lo + np.flatnonzero(vals == vals.max())
        j = int(tied[np.argmin(order[tied])])
        group_max2[g], group_arg[g], radius[g] = min_d2[j], j, dc[hi - 1] * (1 + 1e-4)
    for i in range(plain, k):
        g = int(np.argmax(group_max2))
        tied = np.flatnonzero(group_max2 == group_max2[g])
        if tied.size > 1:  # break exact ties by original row index, as the plain loop does
            g = int(tied[np.argmin(order[group_arg[tied]])])
        row = int(group_arg[g])
        selected[i] = order[row]
        _update_pruned(xs, np.ascontiguousarray(xs[row]), min_d2, assign_sorted, np.int32(i), offsets, centres,
                       radius, dc, order, group_max2, group_arg)
    if not return_assignment:
        return selected
    assign = np.empty(n, np.int32)
    assign[order] = assign_sorted
    return selected, assign


def greedy_coreset_reference(x: np.ndarray, k: int, first: int) -> np.ndarray:
    """Plain NumPy greedy k-center on ``x`` as given (no projection); for tests."""
    selected = [first]
    min_d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        nxt = int(np.argmax(min_d2))
        selected.append(nxt)
        min_d2 = np.minimum(min_d2, ((x - x[nxt]) ** 2).sum(1))
    return np.array(selected, np.int64)
