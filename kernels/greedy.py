"""Greedy k-center over one block of projected rows: the compiled loops behind ``coreset``.

After a first round of plain iterations (each scans every row), the rows are grouped
by their nearest centre, and each later iteration skips every group that the
triangle inequality proves the new centre cannot reach: ``|c - g| - r_g >= D_g``,
with ``r_g`` the group's radius and ``D_g`` the largest remaining min-distance in
it. The pruned loop selects exactly what the plain loop would. Kernels are serial
and release the GIL: parallelism comes from running blocks (partitions) on threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from . import config
from ._common import sq_dist

_F = config.FASTMATH
_C = config.CACHE

#: Relative slack on every triangle-inequality test, so float rounding can never skip a row that matters.
_SLACK = np.float32(1e-4)


@njit("float32(float32[:, ::1], float32[::1], float32[::1], int32[::1], int32, int64[::1])",
      nogil=True, fastmath=_F, cache=_C)
def _update_all(x, centre, min_d2, assign, label, farthest):  # pragma: no cover - compiled
    """min_d2 = min(min_d2, |x - centre|^2) for every row; returns the largest result, its row in ``farthest[0]``."""
    best, arg = np.float32(-1.0), -1
    for i in range(x.shape[0]):
        s = sq_dist(x[i], centre)
        if s < min_d2[i]:
            min_d2[i] = s
            assign[i] = label
        if min_d2[i] > best:  # strict: ties go to the lowest row
            best, arg = min_d2[i], i
    farthest[0] = arg
    return best


@njit(inline="always")
def _farthest(min_d2, original, lo, hi):  # pragma: no cover - compiled
    """The largest ``min_d2`` of rows ``lo:hi`` and its row (ties: the lowest original row, as the plain loop)."""
    best, arg = np.float32(-1.0), np.int64(-1)
    for i in range(lo, hi):
        v = min_d2[i]
        if v > best or (v == best and original[i] < original[arg]):
            best, arg = v, i
    return best, arg


@njit("int64(float32[::1], int64[::1], int64[::1])", nogil=True, cache=_C)
def _farthest_group(group_max2, group_arg, original):  # pragma: no cover - compiled
    """The group holding the farthest row (ties: the lowest original row); -1 if every group is empty."""
    g_best = -1
    for g in range(group_max2.shape[0]):
        v = group_max2[g]
        if v < 0:
            continue
        if g_best < 0 or v > group_max2[g_best] or (
                v == group_max2[g_best] and original[group_arg[g]] < original[group_arg[g_best]]):
            g_best = g
    return g_best


@njit(
    "int64(float32[:, ::1], float32[::1], int32[::1], int64[::1], float32[:, ::1], float32[::1], float32[::1],"
    " int64[::1], float32[::1], int64[::1], int64, int64, float32, int64[::1], float32[::1])",
    nogil=True, fastmath=_F, cache=_C,
)
def _run_pruned(xs, min_d2, assign, offsets, centres, radius, dc, original, group_max2, group_arg, count, limit,
                floor2, picks, picks_d2):  # pragma: no cover - compiled
    """Pruned greedy picks ``count, count + 1, ...`` until ``limit``, or until the farthest row is within ``floor2``.

    Rows are sorted by (group, distance to the group's centre ``dc``). With ``e`` the new
    centre's distance to a group's centre, a row can only get closer to the new centre than
    to its current nearest if ``|e - dc| < current distance <= D_g``: so groups with
    ``e - r_g >= D_g`` are skipped, and in the others only the rows whose ``dc`` lies in
    ``(e - D_g, e + D_g)`` (a binary search) are looked at. Pick ``i`` is recorded as its
    original row in ``picks[i]`` and its squared distance in ``picks_d2[i]``. Returns the new count.
    """
    while count < limit:
        g_new = _farthest_group(group_max2, group_arg, original)
        if g_new < 0 or group_max2[g_new] <= floor2:
            break
        row = group_arg[g_new]
        picks[count] = original[row]
        picks_d2[count] = group_max2[g_new]
        centre = xs[row]  # rows never move during a run: only min_d2 and assign change
        label = np.int32(count)
        for g in range(offsets.shape[0] - 1):
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
                s = sq_dist(xs[i], centre)
                if s < min_d2[i]:
                    min_d2[i] = s
                    assign[i] = label
                    if i == arg:
                        arg_moved = True
            if arg_moved:  # the group's farthest row got closer: find the new farthest
                group_max2[g], group_arg[g] = _farthest(min_d2, original, lo, hi)
        count += 1
    return count


@njit("void(float32[:, ::1], float32[:, ::1], int64[::1], float32[::1])", nogil=True, fastmath=_F, cache=_C)
def _centre_distances(x, centres, offsets, dc):  # pragma: no cover - compiled
    """dc[i] = distance of row i to the centre of its group."""
    for g in range(centres.shape[0]):
        for i in range(offsets[g], offsets[g + 1]):
            dc[i] = np.sqrt(sq_dist(x[i], centres[g]))


@njit("void(float32[:, ::1], int64[::1], boolean[::1], float32[::1])", nogil=True, cache=_C)
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


def permute_rows(x: np.ndarray, perm: np.ndarray) -> None:
    """``x[:] = x[perm]`` without a second copy of ``x`` (C-contiguous float32 ``[N, D]``)."""
    _permute_rows(x, perm, np.zeros(x.shape[0], np.bool_), np.empty(x.shape[1], np.float32))


@njit("void(float32[::1], float32[::1], int64[::1], int64[::1], float32[::1], int64[::1], float32[::1])",
      nogil=True, cache=_C)
def _group_extremes(min_d2, dc, order, offsets, group_max2, group_arg, radius):  # pragma: no cover - compiled
    """Per group: the largest min_d2 (ties: lowest original row), its row, and the radius."""
    for g in range(offsets.shape[0] - 1):
        lo, hi = offsets[g], offsets[g + 1]
        if lo == hi:  # only when rows duplicate an earlier centre exactly
            continue
        group_max2[g], group_arg[g] = _farthest(min_d2, order, lo, hi)
        radius[g] = dc[hi - 1] * (1 + _SLACK)


@dataclass
class _Groups:
    """Rows grouped by nearest centre for the pruned loop; every array is in grouped row order."""

    dc: np.ndarray  # distance to the row's group centre (ascending within a group)
    offsets: np.ndarray  # group g is rows offsets[g]:offsets[g+1]
    centres: np.ndarray  # projected group centres
    radius: np.ndarray  # largest dc of each group (with slack)
    group_max2: np.ndarray  # largest min_d2 of each group
    group_arg: np.ndarray  # its grouped row (ties: lowest original row)


class Greedy:
    """Greedy k-center over one block of projected rows, extended on demand.

    The rows (a view, permuted in place as they are regrouped) are numbered ``0..n-1`` in
    their given order; picks, ties and the assignment refer to that numbering, whose order
    must agree with ``ids``. Plain iterations scan every row; after ``plain`` of them, rows
    are grouped around the centres for the pruned loop, and regrouped each time the centres
    grow by ``regroup_factor``.
    """

    def __init__(self, xs: np.ndarray, ids: np.ndarray, first: int, plain: int, regroup_factor: int) -> None:
        n = xs.shape[0]
        self.xs = xs
        self.ids = ids  # caller's id of each row (ties between blocks are broken by it)
        self.order = np.arange(n, dtype=np.int64)  # row number of each (grouped) row
        self.min_d2 = np.full(n, np.inf, np.float32)
        self.assign = np.zeros(n, np.int32)
        self.picks = np.empty(16, np.int64)
        self.picks_d2 = np.empty(16, np.float32)
        self.count = 0
        self.plain = max(1, plain)
        self.regroup_factor = regroup_factor
        self.next_regroup = self.plain
        self.groups: _Groups | None = None
        self.next_d2 = np.float32(np.inf)  # squared distance of the next pick ...
        self.next_row = first  # ... and its grouped row
        self._farthest = np.zeros(1, np.int64)

    def next_key(self) -> tuple[float, int]:
        """Sort key of the next pick: larger distances first, then lower ids."""
        return -float(self.next_d2), int(self.ids[self.order[self.next_row]])

    def extend(self, limit: int, floor2: float = -1.0) -> None:
        """Pick until ``limit`` picks, or until the next one would be within ``floor2`` (squared)."""
        while self.count < limit and self.next_d2 > floor2:
            if self.groups is None and self.count < self.plain:
                self._reserve(self.count + 1)
                row, label = self.next_row, self.count
                self.picks[label], self.picks_d2[label] = self.order[row], self.next_d2
                self.count += 1
                self.next_d2 = _update_all(self.xs, self.xs[row], self.min_d2, self.assign, np.int32(label),
                                           self._farthest)
                self.next_row = int(self._farthest[0])
                continue
            if self.count >= self.next_regroup:
                self._regroup()
                factor = self.regroup_factor
                self.next_regroup = self.count * factor if factor > 1 else np.iinfo(np.int64).max
            g, stop = self.groups, min(limit, self.next_regroup)
            self._reserve(stop)
            self.count = _run_pruned(self.xs, self.min_d2, self.assign, g.offsets, g.centres, g.radius, g.dc,
                                     self.order, g.group_max2, g.group_arg, self.count, stop, np.float32(floor2),
                                     self.picks, self.picks_d2)
            nxt = _farthest_group(g.group_max2, g.group_arg, self.order)
            self.next_d2, self.next_row = g.group_max2[nxt], int(g.group_arg[nxt])

    def assignment(self) -> np.ndarray:
        """For every row (in the given numbering), the number of its nearest pick."""
        out = np.empty_like(self.assign)
        out[self.order] = self.assign
        return out

    def vectors(self, numbers: np.ndarray) -> np.ndarray:
        """The projected rows numbered ``numbers`` (rows move in ``xs`` as they are regrouped)."""
        where = np.empty(self.order.shape[0], np.int64)
        where[self.order] = np.arange(self.order.shape[0])
        return self.xs[where[numbers]]

    def _reserve(self, size: int) -> None:
        if size > self.picks.shape[0]:
            grow = max(size, 2 * self.picks.shape[0])
            self.picks = np.concatenate([self.picks, np.empty(grow - self.picks.shape[0], np.int64)])
            self.picks_d2 = np.concatenate([self.picks_d2, np.empty(grow - self.picks_d2.shape[0], np.float32)])

    def _regroup(self) -> None:
        """Group rows by their nearest pick, sorted within a group by distance to it.

        The rows are permuted in place (one projected buffer, computed once) so each group is
        contiguous and its annuli are slices.
        """
        xs, n, g_count = self.xs, self.xs.shape[0], self.count
        centres = self.vectors(self.picks[:g_count])
        # Sort by (group, min_d2) in one pass: non-negative float32 bit patterns order like the values.
        key = (self.assign.astype(np.uint64) << np.uint64(32)) | self.min_d2.view(np.uint32).astype(np.uint64)
        perm = np.argsort(key, kind="stable")
        del key
        order, min_d2, assign = self.order[perm], self.min_d2[perm], self.assign[perm]
        permute_rows(xs, perm)
        offsets = np.zeros(g_count + 1, np.int64)
        np.cumsum(np.bincount(assign, minlength=g_count), out=offsets[1:])
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
        self.order, self.min_d2, self.assign = order, min_d2, assign
        self.groups = _Groups(dc, offsets, centres, radius, group_max2, group_arg)
