"""How a PatchCore memory bank is laid out, connected and grown: functions and a row buffer, no scorer state.

Position partitions for the coreset, the per-position shortlists and the bank's row order
that follows them, the HNSW index and k-NN graph the certified search walks, and the greedy
choice of rows an operator's "good" label adds.
"""

from __future__ import annotations

import contextlib
from typing import Any

import faiss
import numpy as np

from ..errors import ScorerError

#: Thinnest band (in patches) of a coreset partition.
_MIN_BAND = 4


def build_index(bank: np.ndarray, config: Any) -> faiss.Index:
    """The FAISS index a ``PatchCoreConfig`` asks for, holding ``bank``.

    Bank rows are float16 values (features are kept in float16 from extraction on), so the
    indexes store them as float16 scalars: lossless, and half the memory traffic. For the
    exact index that pays off when few patches are searched at a time (the certified
    search); for whole images (``candidates="none"``) ``IndexFlatL2``'s BLAS path is faster.
    """
    n, d = bank.shape
    fp16 = faiss.ScalarQuantizer.QT_fp16
    if config.index == "hnsw":
        index = faiss.IndexHNSWSQ(d, fp16, config.hnsw_m)
        index.hnsw.efSearch = config.ef_search
    elif config.index == "ivf":
        lists = config.ivf_lists or max(1, int(4 * np.sqrt(n)))
        lists = min(lists, max(1, n // 39))  # FAISS wants >= 39 training points per list
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(d), d, lists, fp16, faiss.METRIC_L2, False)
        index.train(bank)  # by_residual=False above: rows are stored as they are, so distances stay exact
        index.nprobe = config.nprobe
    elif config.candidates == "none":
        index = faiss.IndexFlatL2(d)
    else:
        index = faiss.IndexScalarQuantizer(d, fp16, faiss.METRIC_L2)
    index.add(bank)
    return index


def build_hnsw(bank: np.ndarray, ef_search: int) -> faiss.Index:
    """An HNSW index over the bank (float16 rows, lossless): the certified search's middle stage."""
    index = faiss.IndexHNSWSQ(bank.shape[1], faiss.ScalarQuantizer.QT_fp16, 16)
    index.hnsw.efSearch = ef_search
    index.add(bank)
    return index


def build_graph(bank: np.ndarray, hnsw: faiss.Index, degree: int) -> np.ndarray:
    """``[B, degree]`` int32: each bank row's nearest other rows (approximate, from the HNSW), -1 padded."""
    return graph_rows(hnsw, bank, np.arange(bank.shape[0]), degree)


def graph_rows(hnsw: faiss.Index, rows: np.ndarray, ids: np.ndarray, degree: int) -> np.ndarray:
    """``[len(rows), degree]`` int32 graph rows of bank rows ``ids`` (vectors ``rows``, already in ``hnsw``).

    Each row's nearest other rows by an HNSW search, itself and missing results dropped, -1 padded:
    how the fitted graph is built, and how rows learned later join it.
    """
    n = hnsw.ntotal
    graph = np.full((rows.shape[0], degree), -1, np.int32)
    if degree == 0 or n < 2 or not rows.shape[0]:
        return graph
    _, nn = hnsw.search(np.ascontiguousarray(rows, np.float32), min(degree + 1, n))
    keep = (nn != np.asarray(ids)[:, None]) & (nn >= 0)  # drop each row itself and missing results
    first = np.argsort(~keep, axis=1, kind="stable")[:, :degree]  # kept columns first, in rank order
    picked = np.take_along_axis(nn, first, 1)
    ok = np.take_along_axis(keep, first, 1)
    graph[:, : picked.shape[1]] = np.where(ok, picked, -1)
    return graph


def reserve(index: faiss.Index, rows: int) -> None:
    """Make room in ``index`` for ``rows`` more rows now, so that adding them later copies nothing.

    FAISS keeps codes and HNSW links in vectors sized exactly at load; the first row added after
    that copied them all: 30 ms for the exact index and 46 ms for the HNSW of a 125k-row bank,
    on the first label after every start. Growing each vector and shrinking it back keeps its
    capacity. Indexes without such vectors (IVF lists grow one by one) are left as they are.
    """
    index = faiss.downcast_index(index)
    if rows <= 0 or index.ntotal == 0:
        return
    vectors = []
    if isinstance(index, faiss.IndexHNSW):
        hnsw = index.hnsw
        links = hnsw.offsets.at(index.ntotal) // index.ntotal  # mean links per row
        vectors += [(hnsw.levels, rows), (hnsw.offsets, rows), (hnsw.neighbors, rows * (links + 1))]
        index = faiss.downcast_index(index.storage)
    if hasattr(index, "codes") and hasattr(index, "code_size"):
        vectors.append((index.codes, rows * index.code_size))
    for vector, extra in vectors:
        size = vector.size()
        with contextlib.suppress(RuntimeError):  # a vector FAISS does not own (memory-mapped): the first add copies
            vector.resize(size + extra)
            vector.resize(size)


def position_partitions(grid: tuple[int, int, int], count: int) -> np.ndarray:
    """``[T*h*w]`` partition of each patch position: about ``count`` parts, tiles first.

    With at least ``count`` tiles, each tile is a partition; otherwise every tile is cut into
    equal bands along its longer side, so that there are about ``count`` in all, none thinner
    than ``_MIN_BAND`` patches (a patch's nearest bank rows come from around its position, not
    necessarily from its own column).
    """
    t_count, h, w = grid
    bands = min(max(1, -(-count // t_count)), max(1, max(h, w) // _MIN_BAND))  # ceil(count / T), not too thin
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    band = (xs * bands // w) if w >= h else (ys * bands // h)
    parts = np.arange(t_count)[:, None, None] * bands + band[None]
    return parts.reshape(-1).astype(np.int64)


def locality_order(shortlist: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A bank order in which neighbouring positions read neighbouring rows, and the shortlists in it.

    Rows are numbered by their first use in the position-ordered shortlists (unused rows last),
    so a scan over consecutive positions touches memory that is mostly in cache already
    (measured: shortlist + graph stage 3.45 -> 2.72 ms per 256x624 frame on a 50k bank).

    Returns:
        ``(order, remapped)``: new row ``i`` is old row ``order[i]``; ``remapped`` is
        ``shortlist`` in the new numbering (-1 padding kept).

    """
    flat = shortlist.reshape(-1)
    used, first = np.unique(flat[flat >= 0], return_index=True)
    order = np.concatenate([used[np.argsort(first, kind="stable")], np.setdiff1d(np.arange(rows), used)])
    new_of_old = np.empty(rows, np.int64)
    new_of_old[order] = np.arange(rows)
    remapped = np.where(shortlist >= 0, new_of_old[np.maximum(shortlist, 0)], -1).astype(np.int32)
    return order, remapped


def build_shortlists(assign: np.ndarray, grid: tuple[int, int, int], length: int, radius: int) -> np.ndarray:
    """Per position, the ``length`` bank rows most often matched around it in training.

    Args:
        assign: ``[N_images, T*h*w]`` bank row matched by each training patch (-1: not valid).
        grid: ``(T, h, w)`` of the patch positions.
        length: shortlist length ``L``.
        radius: neighbourhood radius in patches (within a tile).

    Returns:
        ``[T*h*w, L]`` int32, padded with -1.

    """
    t_count, h, w = grid
    a = assign.reshape(assign.shape[0], t_count, h, w)
    out = np.full((t_count * h * w, length), -1, np.int32)
    fallback = np.bincount(assign[assign >= 0]).argsort()[::-1][:length]  # globally most used rows
    for t in range(t_count):
        for y in range(h):
            for x in range(w):
                block = a[:, t, max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1].ravel()
                block = block[block >= 0]
                rows = fallback
                if block.size:
                    values, counts = np.unique(block, return_counts=True)
                    rows = values[np.argsort(-counts, kind="stable")[:length]]
                out[(t * h + y) * w + x, : rows.size] = rows
    return out


def greedy_cover(queries: np.ndarray, dist: np.ndarray, goal: np.ndarray, offset: np.ndarray, scale: np.ndarray,
                 budget: int | None = None) -> np.ndarray:
    """The patches whose own (float16) rows bring every patch within its ``goal``, highest score first.

    The patch scoring highest, ``(dist - offset) / scale``, becomes a row; every open patch's distance
    is then lowered to its distance to that row, and so on while any patch is beyond its goal. A
    patch is its own nearest row after that, so one new row often covers its neighbours too (a
    lighting change on one part of the frame needed 1 or 2 rows for the whole frame).

    Args:
        queries: ``[P, C]`` float32 patch features.
        dist: ``[P]`` distances to the bank (upper bounds will do: they only cost extra rows).
        goal: ``[P]`` largest distance allowed at each patch (0 or less outside the area scored, with
            ``dist`` 0 there).
        offset: ``[P]`` per-patch score offset (a position norm's mean; zeros without one).
        scale: ``[P]`` per-patch score scale (> 0).
        budget: most rows allowed (``None``: no limit).

    Returns:
        ``[n]`` int64 patch indices, in the order chosen.

    Raises:
        ScorerError: more rows are needed than ``budget``, or some patch cannot reach its goal even
            with its own row (a goal below float16 rounding).

    """
    dist = np.asarray(dist, np.float64).copy()
    open_ = np.flatnonzero(dist > goal)
    chosen: list[int] = []
    taken: set[int] = set()
    while open_.size:
        keys = (dist[open_] - offset[open_]) / scale[open_]
        q = int(open_[np.argmax(keys)])
        if q in taken:
            raise ScorerError(f"patch {q} cannot score below the target even with its own row (its limit is "
                              f"{goal[q]:.4g}); choose a higher target")
        if budget is not None and len(chosen) >= budget:
            raise ScorerError(f"the bank delta is full: this image needs more than the {budget} learned rows left "
                              "(patchcore.max_learned_rows); a rebuild is due: fit the model again with the "
                              "images learned so far among its training images")
        chosen.append(q)
        taken.add(q)
        row = queries[q].astype(np.float16).astype(np.float32)  # the bank keeps float16 values
        near = np.sqrt(((queries[open_] - row) ** 2).sum(1, dtype=np.float64))
        dist[open_] = np.minimum(dist[open_], near)
        open_ = open_[dist[open_] > goal[open_]]
    return np.asarray(chosen, np.int64)


def promote(shortlist: np.ndarray, position: int, row: int, grid: tuple[int, int, int], radius: int) -> None:
    """Put bank ``row`` first in the shortlists within ``radius`` of ``position`` (in its tile), in place."""
    _t_count, h, w = grid
    t, rem = divmod(int(position), h * w)
    y, x = divmod(rem, w)
    for yy in range(max(0, y - radius), min(h, y + radius + 1)):
        for xx in range(max(0, x - radius), min(w, x + radius + 1)):
            q = (t * h + yy) * w + xx
            shortlist[q, 1:] = shortlist[q, :-1].copy()
            shortlist[q, 0] = row


class RowBuffer:
    """Rows ``[n, K]`` with room for more, so that appending copies only the new rows.

    ``rows`` is a C-contiguous view of the buffer's first rows (what the kernels take); when the
    room runs out the buffer doubles, so a long run of appends costs amortised constant time per row.
    """

    def __init__(self, rows: np.ndarray, dtype: type, room: int) -> None:
        self._buf = np.empty((rows.shape[0] + max(room, 0), rows.shape[1]), dtype)
        self._buf[: rows.shape[0]] = rows
        self.rows = self._buf[: rows.shape[0]]

    def append(self, more: np.ndarray) -> np.ndarray:
        """Write ``more`` after the rows; returns the new view (the old one stays valid, unchanged)."""
        used, total = self.rows.shape[0], self.rows.shape[0] + more.shape[0]
        if total > self._buf.shape[0]:
            grown = np.empty((max(total, 2 * self._buf.shape[0]), self._buf.shape[1]), self._buf.dtype)
            grown[:used] = self.rows
            self._buf = grown
        self._buf[used:total] = more
        self.rows = self._buf[:total]
        return self.rows
