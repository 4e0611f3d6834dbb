"""PatchCore's certified search: tighten upper bounds until the image's largest score is provably exact.

Pure NumPy, Numba kernels and FAISS over a bank, its k-NN graph and indexes; no scorer state
(see ``patchcore`` for where the bounds come from and what is exact).
"""

from __future__ import annotations

import faiss
import numpy as np
from appliance_kernels.nn_search import graph_beam

from ..position_norm import PositionNorm

#: Certified search: bounds tightened per round while many patches are open; patches searched
#: exactly per round then, and per round once few are left; "few"; graph rows expanded per patch.
_LAZY_BATCH = 16
_REFINE_START = 2
_REFINE_BATCH = 4
_CLEAR_BULK = 64
BEAM_EXPAND = 32
_EXACT = 3
#: Open patches the certified search's rounds look at before rescanning all of them.
_POOL = 256


def search_into(index: faiss.Index, x: np.ndarray, rows: np.ndarray, d2: np.ndarray, nn: np.ndarray) -> None:
    """Search queries ``rows`` of ``x`` (``[T, C, P]``) in ``index``; keep the smaller of found and current distance."""
    p = x.shape[2]
    ed2, enn = index.search(np.ascontiguousarray(x[rows // p, :, rows % p]), 1)
    better = (enn[:, 0] >= 0) & (ed2[:, 0] < d2[rows])
    d2[rows[better]], nn[rows[better]] = ed2[better, 0], enn[better, 0]


def certify(x: np.ndarray, d2: np.ndarray, nn: np.ndarray, norm: PositionNorm | None, mask: np.ndarray | None,
            bank: np.ndarray, graph: np.ndarray, hnsw: faiss.Index, index: faiss.Index) -> tuple[int, int]:
    """Make the largest (normalised) patch score exact, in place; the other bounds stay bounds.

    A lazy loop over the largest bounds: each is first tightened by a best-first search on the
    bank's k-NN graph, then by HNSW, and only then searched exactly. That raises the best exact
    score M quickly even when the largest bounds were loose. Once few patches remain above M,
    each only has to be shown to have *some* bank row within M: graph search with M as its
    target clears most, HNSW most of the rest, and exact search settles what is left.

    Args:
        x: ``[T, C, P]`` float32 queries.
        d2: ``[T*P]`` squared distances to some bank row (upper bounds), tightened in place.
        nn: ``[T*P]`` those rows, updated in place.
        norm: the position norm the image score is taken in, or ``None``.
        mask: ``[T, h, w]`` patches scored, or ``None`` (all).
        bank: ``[B, C]`` float32 bank.
        graph: its ``[B, K]`` k-NN graph.
        hnsw: its HNSW index.
        index: its exact (or configured) index.

    Returns:
        Patches searched in ``index`` and in ``hnsw`` (for benchmarks).

    """

    def key(rows: np.ndarray) -> np.ndarray:
        dist = np.sqrt(np.maximum(d2[rows], 0.0))
        return dist if norm is None else norm.key(dist, rows)

    def target(rows: np.ndarray, best: float) -> np.ndarray:  # squared distance that scores best
        limit = np.full(rows.size, best) if norm is None else norm.raw(best, rows)
        return np.where(limit >= 0, limit * limit, -1.0).astype(np.float32)

    def beam(rows: np.ndarray, targets: np.ndarray) -> None:
        graph_beam(x, bank, graph, rows, d2, nn, targets, BEAM_EXPAND)
        state[rows] = 1
        keys[rows] = key(rows)

    def approximate(rows: np.ndarray) -> None:
        nonlocal approx
        search_into(hnsw, x, rows, d2, nn)
        state[rows] = 2
        keys[rows] = key(rows)
        approx += rows.size

    state = np.zeros(d2.size, np.int8)  # 0 bound, 1 graph-searched, 2 HNSW-searched, 3 exact
    if mask is not None:
        state[~mask.reshape(-1)] = _EXACT  # nothing to certify outside the valid area
    keys = key(np.arange(d2.size))  # kept current for every row a stage touches
    best = -np.inf
    refined = approx = 0

    def refill() -> tuple[np.ndarray, float]:
        """The open rows with the largest keys, and the largest key of the others (keys only fall)."""
        rows = np.flatnonzero((state < _EXACT) & (keys > best))
        if rows.size <= _POOL:
            return rows, -np.inf
        part = np.argpartition(-keys[rows], _POOL)
        return rows[part[:_POOL]], float(keys[rows[part[_POOL]]])

    candidates, outside = refill()  # the rounds work on this pool while it provably holds what they need
    while True:
        candidates = candidates[(state[candidates] < _EXACT) & (keys[candidates] > best)]
        if outside > best and (candidates.size <= max(_CLEAR_BULK, _LAZY_BATCH)
                               or np.partition(keys[candidates], -_LAZY_BATCH)[-_LAZY_BATCH] < outside):
            candidates, outside = refill()
            continue
        if not candidates.size:
            break
        if candidates.size <= _CLEAR_BULK and best > -np.inf:
            fresh = candidates[state[candidates] == 0]
            beam(fresh, target(fresh, best))
            candidates = candidates[keys[candidates] > best]
            approximate(candidates[state[candidates] == 1])
            candidates = candidates[keys[candidates] > best]
            batch = candidates[np.argsort(-keys[candidates])[:_REFINE_BATCH]]
        else:
            k = min(_LAZY_BATCH, candidates.size)
            top = candidates[np.argpartition(-keys[candidates], k - 1)[:k]]
            if (state[top] == 0).any():
                fresh = top[state[top] == 0]
                beam(fresh, np.full(fresh.size, -1.0, np.float32))
                continue
            if (state[top] == 1).any():
                approximate(top[state[top] == 1])
                continue
            batch = top[np.argsort(-keys[top])[:_REFINE_START]]
        if batch.size:
            search_into(index, x, batch, d2, nn)
            state[batch] = _EXACT
            keys[batch] = key(batch)
            refined += batch.size
            best = max(best, float(keys[batch].max()))
    return refined, approx
