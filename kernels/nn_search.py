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
from ._common import gather_position, sq_dist

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
        v = np.empty(c_count, np.float32)
        gather_position(x, q, v)
        best, arg = np.float32(np.inf), np.int32(-1)
        for m in range(n_cand):
            row = shortlist[q, m]
            if row < 0:
                break
            s = sq_dist(v, bank[row])
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


@njit(
    "void(float32[:, :, ::1], float32[:, ::1], int32[:, ::1], float32[::1], int32[::1], int64[::1], int64)",
    parallel=True, fastmath=_F, cache=_C,
)
def _graph_descent(x, bank, graph, dist2, nearest, positions, max_steps):  # pragma: no cover - compiled
    c_count = x.shape[1]
    degree = graph.shape[1]
    for k in prange(positions.shape[0]):
        q = positions[k]
        v = np.empty(c_count, np.float32)
        gather_position(x, q, v)
        best, arg = dist2[q], nearest[q]
        for _ in range(max_steps):
            start = arg
            for m in range(degree):
                row = graph[start, m]
                if row < 0:
                    break
                s = sq_dist(v, bank[row])
                if s < best:
                    best, arg = s, row
            if arg == start:
                break
        dist2[q] = best
        nearest[q] = arg


def graph_descent(x: np.ndarray, bank: np.ndarray, graph: np.ndarray, dist2: np.ndarray, nearest: np.ndarray,
                  max_steps: int = 2, positions: np.ndarray | None = None) -> None:
    """Tighten nearest-neighbour bounds by greedy steps on the bank's k-NN graph, in place.

    From each query's current nearest bank row, look at that row's graph neighbours and move to
    the nearest one if it is nearer; repeat up to ``max_steps`` times. Distances stay true
    distances to bank rows, so they remain upper bounds of the exact nearest-neighbour distance.

    Args:
        x: ``[T, C, P]`` float32 queries.
        bank: ``[B, C]`` float32 bank.
        graph: ``[B, K]`` int32 nearest bank rows of each bank row (padded with -1).
        dist2: ``[T*P]`` float32 current squared distances (updated).
        nearest: ``[T*P]`` int32 current nearest rows (updated).
        max_steps: greedy steps per query.
        positions: flat positions to tighten (default: all).

    """
    n = x.shape[0] * x.shape[2]
    if graph.dtype != np.int32 or graph.ndim != 2 or graph.shape[0] != bank.shape[0] or not graph.flags.c_contiguous:
        raise ValueError(f"graph must be C-contiguous int32 [{bank.shape[0]}, K], got {graph.dtype} {graph.shape}")
    if dist2.shape != (n,) or nearest.shape != (n,) or dist2.dtype != np.float32 or nearest.dtype != np.int32:
        raise ValueError(f"dist2/nearest must be float32/int32 vectors of length {n}")
    if graph.size and graph.max() >= bank.shape[0]:
        raise ValueError("graph rows must index the bank")
    if nearest.min() < 0 or nearest.max() >= bank.shape[0]:
        raise ValueError("nearest must index the bank")
    positions = np.arange(n, dtype=np.int64) if positions is None else np.ascontiguousarray(positions, np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= n):
        raise ValueError(f"positions must be in [0, {n})")
    _graph_descent(x, bank, graph, dist2, nearest, positions, int(max_steps))


def graph_descent_reference(x: np.ndarray, bank: np.ndarray, graph: np.ndarray, dist2: np.ndarray,
                            nearest: np.ndarray, max_steps: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Plain NumPy version of ``graph_descent`` (returns new arrays); for tests."""
    q = x.transpose(0, 2, 1).reshape(-1, x.shape[1]).astype(np.float64)
    d2, nn = dist2.astype(np.float64).copy(), nearest.astype(np.int64).copy()
    for i in range(len(q)):
        for _ in range(max_steps):
            start = nn[i]
            rows = graph[start]
            end = np.flatnonzero(rows < 0)
            rows = rows[: end[0]] if end.size else rows
            d = ((bank[rows].astype(np.float64) - q[i]) ** 2).sum(1)
            if d.size and d.min() < d2[i]:
                d2[i], nn[i] = d.min(), rows[np.argmin(d)]
            if nn[i] == start:
                break
    return d2, nn


@njit(
    "void(float32[:, ::1], float32[:, ::1], float32[:, ::1], float32[::1], float32[:, :, ::1], int32[:, :, ::1])",
    parallel=True, fastmath=_F, cache=_C,
)
def _pruned_knn(queries, head_t, rows, bound, best_out, arg_out):  # pragma: no cover - compiled
    head, n_rows = head_t.shape
    c_count = rows.shape[1]
    n_chunks, n_q, k = best_out.shape
    block = config.PRUNE_ROW_BLOCK
    per = ((n_rows + n_chunks - 1) // n_chunks + block - 1) // block * block
    step = config.PRUNE_HEAD
    for ch in prange(n_chunks):
        lo, hi = ch * per, min(n_rows, (ch + 1) * per)
        best = np.empty((n_q, k), np.float32)  # sorted ascending; best[i, k-1] is the cut-off
        arg = np.full((n_q, k), -1, np.int32)
        for i in range(n_q):
            best[i, :] = bound[i]
        partial = np.empty(block, np.float32)
        for start in range(lo, hi, block):
            width = min(hi, start + block) - start
            for i in range(n_q):
                # Leading coordinates of a block of rows at once (vectorised across rows).
                partial[:width] = 0.0
                for j in range(head):
                    qj = queries[i, j]
                    hj = head_t[j, start : start + width]
                    for r in range(width):
                        t = qj - hj[r]
                        partial[r] += t * t
                for r in range(width):
                    s = partial[r]
                    if s >= best[i, k - 1]:
                        continue
                    row = rows[start + r]
                    j0 = head
                    while s < best[i, k - 1] and j0 < c_count:  # the rest, abandoned once too far
                        j1 = min(c_count, j0 + step)
                        for j in range(j0, j1):
                            t = queries[i, j] - row[j]
                            s += t * t
                        j0 = j1
                    if s < best[i, k - 1]:  # insert, keeping the k best sorted
                        m = k - 1
                        while m > 0 and best[i, m - 1] > s:
                            best[i, m], arg[i, m] = best[i, m - 1], arg[i, m - 1]
                            m -= 1
                        best[i, m], arg[i, m] = s, start + r
        best_out[ch] = best
        arg_out[ch] = arg


class PrunedBank:
    """A bank laid out for exact nearest-neighbour search with early abandoning.

    Rows are centred and rotated onto their principal axes (an orthonormal change of
    basis: distances are unchanged), so the first few coordinates carry most of every
    distance. A row whose partial distance over them already exceeds the query's best is
    dropped without reading the rest. Searching a few query patches exactly this way
    reads a fraction of what a full scan does; the answer is the same.
    """

    def __init__(self, bank: np.ndarray) -> None:
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"bank must be a non-empty [B, C] array, got {bank.shape}")
        b64 = bank.astype(np.float64)
        self.mean = b64.mean(0)
        centred = b64 - self.mean
        _, eigvecs = np.linalg.eigh(centred.T @ centred)
        self.rotation = np.ascontiguousarray(eigvecs[:, ::-1])  # largest variance first
        self.rows = np.ascontiguousarray((centred @ self.rotation).astype(np.float32))
        self.head_t = np.ascontiguousarray(self.rows[:, : min(config.PRUNE_HEAD, bank.shape[1])].T)

    def add(self, rows: np.ndarray) -> None:
        """Append bank rows (same rotation: still exact, the pruning just stays tuned to the old rows)."""
        new = self.rotate(rows)
        self.rows = np.ascontiguousarray(np.concatenate([self.rows, new]))
        self.head_t = np.ascontiguousarray(np.concatenate([self.head_t, new[:, : self.head_t.shape[0]].T], axis=1))

    def rotate(self, queries: np.ndarray) -> np.ndarray:
        """Queries ``[n, C]`` in the bank's rotated coordinates (float32)."""
        return np.ascontiguousarray(((queries.astype(np.float64) - self.mean) @ self.rotation).astype(np.float32))

    def search(self, queries: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact nearest row of each query, given a squared distance it cannot exceed.

        Args:
            queries: ``[n, C]`` queries in the original coordinates.
            bound: ``[n]`` squared upper bounds of each query's nearest-neighbour distance
                (a distance to some bank row; ``inf`` when none is known). The tighter, the faster.

        Returns:
            ``(dist2 [n] float32, nearest [n] int32)``; ``nearest`` is -1 where no row is
            strictly nearer than the bound (the bound was already exact).

        """
        bound = np.ascontiguousarray(bound, np.float32)
        if queries.ndim == 2 and bound.shape != queries.shape[:1]:
            raise ValueError(f"bound must have one value per query, got {bound.shape}")
        d2, nn = self._knn(queries, bound, 1)
        return d2[:, 0], nn[:, 0]

    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact ``k`` nearest rows of each query: ``(dist2 [n, k], rows [n, k])``, nearest first.

        Fewer than ``k`` rows in the bank leave ``inf`` and -1 in the last columns.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return self._knn(queries, np.full(queries.shape[:1], np.inf, np.float32), k)

    def _knn(self, queries: np.ndarray, bound: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if queries.ndim != 2 or queries.shape[1] != self.rows.shape[1]:
            raise ValueError(f"queries must be [n, {self.rows.shape[1]}], got {queries.shape}")
        n = queries.shape[0]
        chunks = max(1, min(config.PRUNE_CHUNKS, self.rows.shape[0] // config.PRUNE_ROW_BLOCK))
        best = np.empty((chunks, n, k), np.float32)
        arg = np.empty((chunks, n, k), np.int32)
        _pruned_knn(self.rotate(queries), self.head_t, self.rows, bound, best, arg)
        if chunks == 1:
            return best[0], arg[0]
        best = best.transpose(1, 0, 2).reshape(n, chunks * k)  # merge the slices' k best
        arg = arg.transpose(1, 0, 2).reshape(n, chunks * k)
        pick = np.argsort(best, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(best, pick, 1), np.take_along_axis(arg, pick, 1)


def exact_nn_reference(queries: np.ndarray, bank: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force squared distance to, and index of, the nearest bank row(s) (float64); for tests.

    ``k == 1``: ``[n]`` arrays; otherwise ``[n, k]``, nearest first.
    """
    d = ((queries.astype(np.float64)[:, None, :] - bank.astype(np.float64)[None]) ** 2).sum(-1)
    if k == 1:
        return d.min(1), d.argmin(1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order
