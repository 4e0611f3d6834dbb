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
from ._common import gather_position, nearest_of, sq_dist

_F = config.FASTMATH
_C = config.CACHE


@njit(
    "void(float32[:, :, ::1], float32[:, ::1], int32[:, ::1], int32[:, ::1], int64, float32[::1], int32[::1])",
    parallel=True, fastmath=_F, cache=_C,
)
def _shortlist_nn(x, bank, shortlist, graph, max_steps, dist2, nearest):  # pragma: no cover - compiled
    t_count, c_count, p_count = x.shape
    for q in prange(t_count * p_count):
        v = np.empty(c_count, np.float32)
        gather_position(x, q, v)
        best, arg = nearest_of(v, bank, shortlist[q], np.float32(np.inf), np.int32(-1))
        for _ in range(max_steps):  # greedy descent on the graph, while the query is gathered
            start = arg
            best, arg = nearest_of(v, bank, graph[start], best, arg)
            if arg == start:
                break
        dist2[q] = best
        nearest[q] = arg


def shortlist_nn(x: np.ndarray, bank: np.ndarray, shortlist: np.ndarray, graph: np.ndarray | None = None,
                 max_steps: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Squared distance to, and index of, the nearest shortlisted bank row for every position.

    With a graph, each result is then tightened by greedy steps on the bank's k-NN graph: from
    the current nearest row, move to the nearest of its graph neighbours if it is nearer, up to
    ``max_steps`` times. Distances stay true distances to bank rows, so they remain upper
    bounds of the exact nearest-neighbour distance. (One pass for both, so each query is
    gathered once: 5.2 against 6.2 ms for two passes on a tiled 448x1104 frame, 50k bank.)

    Args:
        x: ``[T, C, P]`` float32 query features (the backbone's NCHW output, flattened).
        bank: ``[B, C]`` float32 memory bank.
        shortlist: ``[T*P, L]`` int32 bank rows per position, most useful first; a row's candidates
            end at its first -1 (padding).
        graph: ``[B, K]`` int32 nearest bank rows of each bank row (padded with -1; see
            ``check_graph``), or ``None``.
        max_steps: greedy graph steps per query.

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
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    if graph is None:
        graph, max_steps = np.zeros((bank.shape[0], 0), np.int32), 0
    _check_graph_layout(graph, bank)
    dist2 = np.empty(shortlist.shape[0], np.float32)
    nearest = np.empty(shortlist.shape[0], np.int32)
    _shortlist_nn(x, bank, np.ascontiguousarray(shortlist), graph, int(max_steps), dist2, nearest)
    return dist2, nearest


def _listed(rows: np.ndarray) -> np.ndarray:
    """The rows of a -1-padded candidate list, up to its first -1."""
    end = np.flatnonzero(rows < 0)
    return rows[: end[0]] if end.size else rows


def shortlist_nn_reference(x: np.ndarray, bank: np.ndarray, shortlist: np.ndarray, graph: np.ndarray | None = None,
                           max_steps: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Plain NumPy version of ``shortlist_nn``; for tests."""
    q = x.transpose(0, 2, 1).reshape(-1, x.shape[1]).astype(np.float64)
    dist2 = np.empty(len(q))
    nearest = np.empty(len(q), np.int64)
    for i, listed in enumerate(shortlist):
        rows = _listed(listed)
        d = ((bank[rows].astype(np.float64) - q[i]) ** 2).sum(1)
        dist2[i], nearest[i] = d.min(), rows[np.argmin(d)]
        for _ in range(max_steps if graph is not None else 0):
            start = nearest[i]
            rows = _listed(graph[start])
            d = ((bank[rows].astype(np.float64) - q[i]) ** 2).sum(1)
            if d.size and d.min() < dist2[i]:
                dist2[i], nearest[i] = d.min(), rows[np.argmin(d)]
            if nearest[i] == start:
                break
    return dist2, nearest


def _check_graph_layout(graph: np.ndarray, bank: np.ndarray) -> None:
    """Dtype and shape of a k-NN graph (its contents: ``check_graph``, once, where it is installed)."""
    if graph.dtype != np.int32 or graph.ndim != 2 or graph.shape[0] != bank.shape[0] or not graph.flags.c_contiguous:
        raise ValueError(f"graph must be C-contiguous int32 [{bank.shape[0]}, K], got {graph.dtype} {graph.shape}")


def check_graph(graph: np.ndarray, bank_rows: int) -> None:
    """Refuse a k-NN graph that names rows past the bank.

    A scan of the whole graph, so it runs once, where a graph is installed, not per search:
    the searches stop a neighbour list at such a row rather than read past the bank.
    """
    if graph.size and graph.max() >= bank_rows:
        raise ValueError(f"graph rows must index the bank (rows 0..{bank_rows - 1}), found {graph.max()}")


@njit(
    "void(float32[:, :, ::1], float32[:, ::1], int32[:, ::1], int64[::1], float32[::1], int32[::1], float32[::1],"
    " int64)",
    parallel=True, fastmath=_F, cache=_C,
)
def _graph_beam(x, bank, graph, rows, dist2, nearest, targets, max_expand):  # pragma: no cover - compiled
    k_count = graph.shape[1]
    cap = max_expand * k_count + 1
    table = 1
    while table < 4 * cap:
        table *= 2
    for i in prange(rows.shape[0]):
        q = rows[i]
        v = np.empty(x.shape[1], np.float32)
        gather_position(x, q, v)
        best, arg = dist2[q], nearest[q]
        cand_d = np.empty(cap, np.float32)
        cand_r = np.empty(cap, np.int32)
        expanded = np.zeros(cap, np.bool_)
        seen = np.full(table, -1, np.int32)
        cand_d[0], cand_r[0] = best, arg
        seen[(arg * 2654435761) & (table - 1)] = arg
        n = 1
        for _ in range(max_expand):
            if best <= targets[i]:
                break
            j, bd = -1, np.float32(np.inf)
            for m in range(n):  # nearest candidate not expanded yet (first in insertion order on ties)
                if not expanded[m] and cand_d[m] < bd:
                    j, bd = m, cand_d[m]
            if j < 0:
                break
            expanded[j] = True
            for kk in range(k_count):
                nb = graph[cand_r[j], kk]
                if nb < 0 or nb >= bank.shape[0]:  # end of the list (a row past the bank is never read)
                    break
                h = (nb * 2654435761) & (table - 1)
                fresh = True
                while seen[h] >= 0:
                    if seen[h] == nb:
                        fresh = False
                        break
                    h = (h + 1) & (table - 1)
                if not fresh:
                    continue
                seen[h] = nb
                d = sq_dist(v, bank[nb])
                cand_d[n], cand_r[n] = d, nb
                n += 1
                if d < best:
                    best, arg = d, nb
        dist2[q] = best
        nearest[q] = arg


def graph_beam(x: np.ndarray, bank: np.ndarray, graph: np.ndarray, rows: np.ndarray, dist2: np.ndarray,
               nearest: np.ndarray, targets: np.ndarray, max_expand: int = 32) -> None:
    """Best-first search on the bank's k-NN graph for the queries ``rows``, in place.

    From each query's current nearest bank row, repeatedly expand the nearest candidate not yet
    expanded (adding its graph neighbours as candidates), until a row within ``targets[i]``
    (squared) is found or ``max_expand`` rows were expanded. Unlike the greedy steps of
    ``shortlist_nn`` it climbs out of local minima; found distances are true distances to bank rows, so they stay upper
    bounds of the exact nearest-neighbour distance.

    Args:
        x: ``[T, C, P]`` float32 queries.
        bank: ``[B, C]`` float32 bank.
        graph: ``[B, K]`` int32 nearest bank rows of each bank row (padded with -1; see ``check_graph``).
        rows: ``[R]`` int64 flat query positions to search.
        dist2: ``[T*P]`` float32 current squared distances (updated at ``rows``).
        nearest: ``[T*P]`` int32 current nearest rows (updated at ``rows``).
        targets: ``[R]`` float32 squared distances that are good enough (negative: never).
        max_expand: rows expanded per query at most.

    """
    rows = np.ascontiguousarray(rows, np.int64)
    targets = np.ascontiguousarray(targets, np.float32)
    _check_graph_layout(graph, bank)
    n = x.shape[0] * x.shape[2]
    if dist2.shape != (n,) or nearest.shape != (n,) or dist2.dtype != np.float32 or nearest.dtype != np.int32:
        raise ValueError(f"dist2/nearest must be float32/int32 vectors of length {n}")
    if rows.ndim != 1 or targets.shape != rows.shape:
        raise ValueError(f"rows and targets must be vectors of one length, got {rows.shape} and {targets.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValueError("rows must index the queries")
    if rows.size and (nearest[rows].min() < 0 or nearest[rows].max() >= bank.shape[0]):
        raise ValueError("nearest must index the bank at rows")
    if max_expand < 0:
        raise ValueError(f"max_expand must be >= 0, got {max_expand}")
    if rows.size and max_expand:
        _graph_beam(x, bank, graph, rows, dist2, nearest, targets, int(max_expand))


def graph_beam_reference(x: np.ndarray, bank: np.ndarray, graph: np.ndarray, rows: np.ndarray, dist2: np.ndarray,
                         nearest: np.ndarray, targets: np.ndarray, max_expand: int = 32
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Plain NumPy version of ``graph_beam`` (returns new arrays); for tests."""
    q = x.transpose(0, 2, 1).reshape(-1, x.shape[1]).astype(np.float64)
    d2, nn = dist2.astype(np.float64).copy(), nearest.astype(np.int64).copy()
    for i, row in enumerate(rows):
        best, arg = d2[row], nn[row]
        cand = [(best, arg)]
        expanded = [False]
        seen = {int(arg)}
        for _ in range(max_expand):
            if best <= targets[i]:
                break
            free = [m for m in range(len(cand)) if not expanded[m]]
            if not free:
                break
            j = min(free, key=lambda m: (cand[m][0], m))
            expanded[j] = True
            for nb in _listed(graph[cand[j][1]]):
                if int(nb) in seen:
                    continue
                seen.add(int(nb))
                d = float(((bank[nb].astype(np.float64) - q[row]) ** 2).sum())
                cand.append((d, nb))
                expanded.append(False)
                if d < best:
                    best, arg = d, nb
        d2[row], nn[row] = best, arg
    return d2, nn
