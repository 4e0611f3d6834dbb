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

from dataclasses import dataclass

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


@njit(inline="always")
def _farthest(min_d2, original, lo, hi):  # pragma: no cover - compiled
    """The largest ``min_d2`` of rows ``lo:hi`` and its row (ties: the lowest original row, as the plain loop)."""
    best, arg = np.float32(-1.0), np.int64(-1)
    for i in range(lo, hi):
        v = min_d2[i]
        if v > best or (v == best and original[i] < original[arg]):
            best, arg = v, i
    return best, arg


@njit(
    "void(float32[:, ::1], float32[::1], float32[::1], int32[::1], int32, int64[::1], float32[:, ::1],"
    " float32[::1], float32[::1], int64[::1], float32[::1], int64[::1], int64, int64)",
    parallel=True, fastmath=_F, cache=_C,
)
def _update_pruned(x, centre, min_d2, assign, label, offsets, centres, radius, dc, original, group_max2,
                   group_arg, g_lo, g_hi):  # pragma: no cover - compiled
    """One pruned iteration over rows sorted by (group, distance to the group's centre ``dc``).

    With ``e`` the new centre's distance to a group's centre, a row can only get closer to
    the new centre than to its current nearest if ``|e - dc| < current distance <= D_g``: so
    groups with ``e - r_g >= D_g`` are skipped, and in the others only the rows whose ``dc``
    lies in ``(e - D_g, e + D_g)`` (a binary search) are looked at. Only groups
    ``g_lo:g_hi`` (the new centre's partition) can be reached at all.
    """
    for g in prange(g_lo, g_hi):
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
        if arg_moved:  # the group's farthest row got closer: find the new farthest
            group_max2[g], group_arg[g] = _farthest(min_d2, original, lo, hi)


@njit("void(float32[:, ::1], float32[:, ::1], int64[::1], float32[::1])", parallel=True, fastmath=_F, cache=_C)
def _centre_distances(x, centres, offsets, dc):  # pragma: no cover - compiled
    """dc[i] = distance of row i to the centre of its group."""
    for g in prange(centres.shape[0]):
        for i in range(offsets[g], offsets[g + 1]):
            dc[i] = np.sqrt(sq_dist(x[i], centres[g]))


def _project(features: np.ndarray, matrix: np.ndarray, out: np.ndarray, part: np.ndarray | None = None) -> None:
    """The projection ``features @ matrix``, chunk by chunk (bounded temporaries; ``features`` only needs row slices).

    With partitions, ``out`` has one more column: the row's partition times a distance no two
    rows of the same partition reach, so rows of different partitions never cover each other.
    """
    n, d = out.shape[0], matrix.shape[1]
    for lo in range(0, n, config.CHUNK_ROWS):
        hi = min(n, lo + config.CHUNK_ROWS)
        np.matmul(np.asarray(features[lo:hi]).astype(np.float32, copy=False), matrix, out=out[lo:hi, :d])
        if part is not None:
            out[lo:hi, d] = part[lo:hi]


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
    regroup_factor: int = config.CORESET_REGROUP,
    partitions: np.ndarray | None = None,
    return_assignment: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Indices of ``k`` rows of ``features`` chosen by greedy k-center selection.

    Args:
        features: ``[N, D]`` float32 or float16 rows, or anything with ``shape``, ``dtype`` and
            row slices (a disk-backed store): read once, in chunks, never copied whole; only a
            projected ``[N, projection_dim]`` float32 buffer is allocated.
        k: how many rows to select, ``1 <= k <= N``.
        projection_dim: random-projection width used for the distances; ``None``
            uses the features as they are.
        seed: seeds the projection and the first centre.
        clusters: plain iterations before pruning starts (0 disables pruning).
        regroup_factor: the rows are regrouped around all centres chosen so far each time their
            number grows by this factor (tighter groups prune more; 0 or 1: never).
        partitions: ``[N]`` non-negative int partition of each row, or ``None``. Rows are then
            only covered by centres of their own partition: each iteration still picks the row
            farthest from its coverage over all partitions, but updates only that partition, so
            the work drops by about the number of partitions (PatchCore partitions by patch
            position: a patch is matched to bank rows from around its own position anyway).
        return_assignment: also return, for every row, the position in the
            selection of its nearest selected row (in the projected space).

    Returns:
        int64 indices into ``features``, in selection order (and the int32 assignment).

    """
    if len(features.shape) != 2 or features.shape[0] == 0:
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
    part = None
    if partitions is not None:
        partitions = np.asarray(partitions)
        if partitions.shape != (n,) or partitions.dtype.kind not in "iu" or partitions.min() < 0:
            raise ValueError(f"partitions must be [{n}] non-negative integers")
        partitions = partitions.astype(np.int64, copy=False)
        part = partitions.astype(np.float32)  # scaled below, once the rows' extent is known
    width = matrix.shape[1] + (part is not None)
    x = np.empty((n, width), np.float32)
    _project(features, matrix, x, part)
    if part is not None:  # partition p sits at p * spacing on an extra axis, beyond any in-partition distance
        step = config.CHUNK_ROWS
        norm2 = max(float(np.einsum("ij,ij->i", x[lo : lo + step, :-1], x[lo : lo + step, :-1]).max())
                    for lo in range(0, n, step))
        spacing = np.float32(4.0 * np.sqrt(norm2) + 1.0)
        part *= spacing
        x[:, -1] *= spacing

    first = int(rng.integers(n))
    selected = np.empty(k, np.int64)
    min_d2 = np.full(n, np.inf, np.float32)
    assign = np.zeros(n, np.int32)
    chunk_max = np.empty(64, np.float32)
    chunk_arg = np.empty(64, np.int64)
    # Rows without a centre in their partition are the farthest of all, so every partition has
    # one after at most as many plain iterations as there are partitions. A plain iteration scans
    # every row, a pruned one only the new centre's partition: with P partitions, pruning starts
    # after max(P, clusters / P) iterations.
    n_parts = 1 if partitions is None else int(partitions.max()) + 1
    plain = k if clusters <= 0 else min(k, max(n_parts, clusters // n_parts))
    nxt = first
    for i in range(plain):
        selected[i] = nxt
        _update_all(x, np.ascontiguousarray(x[nxt]), min_d2, assign, np.int32(i), chunk_arg, chunk_max)
        nxt = int(chunk_arg[int(np.argmax(chunk_max))])
    if plain == k:
        return (selected, assign) if return_assignment else selected

    state = _regroup(x, partitions, n_parts, selected[:plain], min_d2, assign, np.arange(n, dtype=np.int64))
    del x, min_d2, assign  # now state.xs (the same buffer, rows permuted in place), state.min_d2, ...
    next_regroup = plain * regroup_factor if regroup_factor > 1 else k
    for i in range(plain, k):
        if i >= next_regroup:  # finer groups now that the centres are denser: tighter pruning
            state = _regroup(state.xs, partitions, n_parts, selected[:i], state.min_d2, state.assign, state.order)
            next_regroup = i * regroup_factor
        g = int(np.argmax(state.group_max2))
        tied = np.flatnonzero(state.group_max2 == state.group_max2[g])
        if tied.size > 1:  # break exact ties by original row index, as the plain loop does
            g = int(tied[np.argmin(state.order[state.group_arg[tied]])])
        row = int(state.group_arg[g])
        selected[i] = state.order[row]
        p = 0 if partitions is None else int(partitions[selected[i]])
        _update_pruned(state.xs, np.ascontiguousarray(state.xs[row]), state.min_d2, state.assign, np.int32(i),
                       state.offsets, state.centres, state.radius, state.dc, state.order, state.group_max2,
                       state.group_arg, state.part_start[p], state.part_start[p + 1])
    if not return_assignment:
        return selected
    assign = np.empty(n, np.int32)
    assign[state.order] = state.assign
    return selected, assign


@dataclass
class _Groups:
    """Rows grouped by nearest centre for the pruned loop; every array is in grouped row order."""

    order: np.ndarray  # original row index of each grouped row
    xs: np.ndarray  # projected rows
    min_d2: np.ndarray  # squared distance to the nearest selected row
    assign: np.ndarray  # selection position of that row
    dc: np.ndarray  # distance to the row's group centre (ascending within a group)
    offsets: np.ndarray  # group g is rows offsets[g]:offsets[g+1]
    centres: np.ndarray  # projected group centres
    radius: np.ndarray  # largest dc of each group (with slack)
    group_max2: np.ndarray  # largest min_d2 of each group
    group_arg: np.ndarray  # its grouped row (ties: lowest original row)
    part_start: np.ndarray  # the groups of partition p are part_start[p]:part_start[p+1]


def _regroup(xs: np.ndarray, partitions: np.ndarray | None, n_parts: int, centre_rows: np.ndarray,
             min_d2: np.ndarray, assign: np.ndarray, order: np.ndarray) -> _Groups:
    """Group rows by their nearest selected centre, sorted within a group by distance to it.

    ``xs[j]`` is the projection of original row ``order[j]``; its rows are permuted in place
    (one projected buffer, computed once) so each group is contiguous and its annuli are
    slices. Groups are ordered by partition.
    """
    n, g_count = xs.shape[0], centre_rows.shape[0]
    where = np.empty(n, np.int64)
    where[order] = np.arange(n)
    centre_part = np.zeros(g_count, np.int64) if partitions is None else partitions[centre_rows]
    by_part = np.argsort(centre_part, kind="stable")  # group slot -> centre, partitions contiguous
    slot = np.empty(g_count, np.int64)
    slot[by_part] = np.arange(g_count)
    part_start = np.searchsorted(centre_part[by_part], np.arange(n_parts + 1))
    centres = np.ascontiguousarray(xs[where[centre_rows[by_part]]])
    # Sort by (group slot, min_d2) in one pass: non-negative float32 bit patterns order like the values.
    key = (slot[assign].astype(np.uint64) << np.uint64(32)) | min_d2.view(np.uint32).astype(np.uint64)
    perm = np.argsort(key, kind="stable")
    del key
    order, min_d2, assign = order[perm], min_d2[perm], assign[perm]
    _permute_rows(xs, perm, np.zeros(n, np.bool_), np.empty(xs.shape[1], np.float32))
    offsets = np.zeros(g_count + 1, np.int64)
    np.cumsum(np.bincount(slot[assign], minlength=g_count), out=offsets[1:])
    dc = np.empty(n, np.float32)
    _centre_distances(xs, centres, offsets, dc)
    # dc and min_d2 come from different kernels and may differ in the last bit: keep each slice sorted by dc
    unsorted = np.flatnonzero(np.diff(dc) < 0) + 1
    for g in np.unique(np.searchsorted(offsets, unsorted, side="right") - 1):
        lo, hi = offsets[g], offsets[g + 1]
        if hi - lo > 1 and (np.diff(dc[lo:hi]) < 0).any():
            fix = lo + np.argsort(dc[lo:hi], kind="stable")
            order[lo:hi], xs[lo:hi], min_d2[lo:hi], dc[lo:hi], assign[lo:hi] = (
                order[fix], xs[fix], min_d2[fix], dc[fix], assign[fix])
    group_max2 = np.full(g_count, -1.0, np.float32)
    group_arg = np.full(g_count, -1, np.int64)
    radius = np.zeros(g_count, np.float32)
    _group_extremes(min_d2, dc, order, offsets, group_max2, group_arg, radius)
    return _Groups(order, xs, min_d2, assign, dc, offsets, centres, radius, group_max2, group_arg, part_start)


@njit("void(float32[:, ::1], int64[::1], boolean[::1], float32[::1])", cache=_C)
def _permute_rows(x, perm, done, tmp):  # pragma: no cover - compiled
    """x[i] = x_before[perm[i]] in place, by following the permutation's cycles."""
    for start in range(perm.shape[0]):
        if done[start]:
            continue
        tmp[:] = x[start]
        j = start
        while True:
            done[j] = True
            k = perm[j]
            if k == start:
                x[j] = tmp
                break
            x[j] = x[k]
            j = k


@njit("void(float32[::1], float32[::1], int64[::1], int64[::1], float32[::1], int64[::1], float32[::1])",
      cache=_C)
def _group_extremes(min_d2, dc, order, offsets, group_max2, group_arg, radius):  # pragma: no cover - compiled
    """Per group: the largest min_d2 (ties: lowest original row), its row, and the radius."""
    for g in range(offsets.shape[0] - 1):
        lo, hi = offsets[g], offsets[g + 1]
        if lo == hi:  # only when rows duplicate an earlier centre exactly
            continue
        group_max2[g], group_arg[g] = _farthest(min_d2, order, lo, hi)
        radius[g] = dc[hi - 1] * (1 + _SLACK)


def greedy_coreset_reference(x: np.ndarray, k: int, first: int) -> np.ndarray:
    """Plain NumPy greedy k-center on ``x`` as given (no projection); for tests."""
    selected = [first]
    min_d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        nxt = int(np.argmax(min_d2))
        selected.append(nxt)
        min_d2 = np.minimum(min_d2, ((x - x[nxt]) ** 2).sum(1))
    return np.array(selected, np.int64)
