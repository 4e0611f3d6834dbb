"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling).

Farthest-point selection picks, one at a time, the point farthest from all points
already chosen. Done naively that is ``k * N * d`` work, which for a real training
set (a million patches, tens of thousands chosen) takes hours in anomalib. Three
things make it fast here without changing the result:

* the distances are computed on a random projection to a few dozen dimensions
  (as in the PatchCore paper), streamed in chunks into one preallocated buffer;
* the triangle inequality skips most rows in most iterations (``greedy``);
* with partitions (PatchCore's patch positions), rows are only covered by centres
  of their own partition. Each partition's sequence of picks then depends on its
  own rows alone, and the global sequence (each pick the row farthest from its
  coverage, over all partitions) is their merge by decreasing distance. So the
  partitions run on threads, in rounds that extend each one down to the distance
  where all together are estimated to reach a fraction of ``k``; a serial pass
  then finishes the merge exactly (dropping picks of a round that went too far).

The selection is exactly the plain loop's (tests check it against NumPy references).
"""

from __future__ import annotations

import heapq
import itertools
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from . import config
from .greedy import Greedy, permute_rows


def _project(features: np.ndarray, matrix: np.ndarray, out: np.ndarray, threads: int) -> None:
    """``out = features @ matrix`` chunk by chunk, chunks on threads.

    Temporaries stay bounded; ``features`` only needs row slices, which may be read concurrently.
    """
    n = out.shape[0]

    def chunk(lo: int) -> None:
        hi = min(n, lo + config.CHUNK_ROWS)
        np.matmul(np.asarray(features[lo:hi]).astype(np.float32, copy=False), matrix, out=out[lo:hi])

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(chunk, range(0, n, config.CHUNK_ROWS)))


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
    threads: int | None = None,
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
        seed: seeds the projection and the first centre (of each partition).
        clusters: plain iterations before pruning starts, shared among the partitions
            (0 disables pruning).
        regroup_factor: the rows are regrouped around all centres chosen so far each time their
            number grows by this factor (tighter groups prune more; 0 or 1: never).
        partitions: ``[N]`` non-negative int partition of each row, or ``None``. Rows are then
            only covered by centres of their own partition: each partition starts from a
            seeded random row, and each later pick is the row farthest from its coverage over
            all partitions (PatchCore partitions by patch position: a patch is matched to bank
            rows from around its own position anyway). Ignored when ``k`` is smaller than
            the number of partitions.
        threads: threads that run partitions side by side (``None``: Numba's thread count).
        return_assignment: also return, for every row, the position in the
            selection of its nearest selected row (in the projected space, within its partition).

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
    labels = None
    if partitions is not None:
        partitions = np.asarray(partitions)
        if partitions.shape != (n,) or partitions.dtype.kind not in "iu" or partitions.min() < 0:
            raise ValueError(f"partitions must be [{n}] non-negative integers")
        labels = _consecutive(partitions)
        if labels.max() + 1 > k or labels.max() == 0:
            labels = None
    rng = np.random.default_rng(seed)
    if projection_dim is None or projection_dim >= dim:
        matrix = np.eye(dim, dtype=np.float32)
    else:
        matrix = projection_matrix(dim, projection_dim, seed)
    threads = threads or numba.get_num_threads()
    x = np.empty((n, matrix.shape[1]), np.float32)
    _project(features, matrix, x, threads)

    if labels is None:
        ids, bounds = np.arange(n, dtype=np.int64), np.array([0, n])
        firsts = [int(rng.integers(n))]
    else:  # partitions become contiguous blocks of rows, in their original order within each
        ids = np.argsort(labels, kind="stable").astype(np.int64)  # a radix sort: labels are int16
        permute_rows(x, ids)
        bounds = np.zeros(labels.max() + 2, np.int64)
        np.cumsum(np.bincount(labels), out=bounds[1:])
        firsts = [int(rng.integers(hi - lo)) for lo, hi in itertools.pairwise(bounds)]
    n_blocks = len(firsts)
    plain = clusters // n_blocks if clusters > 0 else n
    blocks = [Greedy(x[lo:hi], ids[lo:hi], first, plain, regroup_factor)
              for (lo, hi), first in zip(itertools.pairwise(bounds), firsts, strict=True)]
    _select(blocks, k, threads)
    return _merge(blocks, k, return_assignment, n)


def _consecutive(partitions: np.ndarray) -> np.ndarray:
    """Partition ids renumbered 0, 1, 2, ... in the same order (int16 when they fit, for a fast stable sort)."""
    if partitions.max() < 4 * partitions.shape[0]:
        present = np.bincount(partitions) > 0
        labels = (np.cumsum(present) - 1)[partitions]
    else:
        labels = np.unique(partitions, return_inverse=True)[1].reshape(-1)
    return labels.astype(np.int16) if labels.max() < np.iinfo(np.int16).max else labels


def _select(blocks: list[Greedy], k: int, threads: int) -> None:
    """Extend the blocks until their picks include the first ``k`` of the merged sequence."""
    if len(blocks) == 1:
        blocks[0].extend(k)
        return
    rows = sum(b.xs.shape[0] for b in blocks)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    by_size = sorted(blocks, key=lambda b: -b.xs.shape[0])  # biggest first, so the threads end together
    try:
        share = config.CORESET_ROUNDS[0] * k / rows
        _run(pool, [(b, max(1, int(share * b.xs.shape[0])), -1.0) for b in by_size])
        for fraction in config.CORESET_ROUNDS[1:]:
            if sum(b.count for b in blocks) < fraction * k:
                floor2 = _floor_for(blocks, fraction * k)
                _run(pool, [(b, np.iinfo(np.int64).max, floor2) for b in by_size if b.next_d2 > floor2])
    finally:
        if pool is not None:
            pool.shutdown()
    _finish(blocks, k)


def _run(pool: ThreadPoolExecutor | None, work: list[tuple[Greedy, int, float]]) -> None:
    if pool is None:
        for block, limit, floor2 in work:
            block.extend(limit, floor2)
    else:
        for f in [pool.submit(block.extend, limit, floor2) for block, limit, floor2 in work]:
            f.result()


def _floor_for(blocks: list[Greedy], target: float) -> float:
    """The squared distance down to which the blocks together are estimated to hold ``target`` picks.

    Each block's pick count is extrapolated as a power of the distance, ``count ~ d2^-beta``,
    with ``beta`` from its distances at half its picks and now (greedy k-center radii fall
    like that, with ``beta`` about half the data's intrinsic dimension).
    """
    models = []
    for b in blocks:
        m, now = b.count, float(b.next_d2)
        half = float(b.picks_d2[m // 2]) if m >= 4 else np.inf
        if not now > 0 or not np.isfinite(half):
            beta = 0.0  # covered or too few picks: assume it will not grow
        else:
            beta = float(np.clip(np.log(m / (m // 2)) / max(np.log(half / now), 1e-6), 0.1, 10.0))
        models.append((m, now, beta))

    def count(d2: float) -> float:
        return sum(m * (now / d2) ** beta if d2 < now else m for m, now, beta in models)

    top = max(now for _, now, _ in models)
    if not top > 0 or count(top) >= target:
        return top
    lo, hi = np.log(top) - 40.0, np.log(top)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if count(np.exp(mid)) > target else (lo, mid)
    return float(np.exp(hi))


def _finish(blocks: list[Greedy], k: int) -> None:
    """Serial end: extend the block whose next pick comes first until the first ``k`` picks are all made.

    Below ``k`` picks that is simply the next ``k - count`` of the merge. If a round went past
    the k-th pick's distance, a block may still have to go on: while its next pick would come
    before the k-th so far.
    """
    heap = [(b.next_key(), i) for i, b in enumerate(blocks)]
    heapq.heapify(heap)
    for _ in range(k - sum(b.count for b in blocks)):
        _, i = heapq.heappop(heap)
        blocks[i].extend(blocks[i].count + 1)
        heapq.heappush(heap, (blocks[i].next_key(), i))
    d2, ids = _keys(blocks)
    best = np.lexsort((ids, -d2))[:k]
    kept = [(float(d2[j]), -int(ids[j])) for j in best]  # the first k so far; the root is the k-th
    heapq.heapify(kept)
    while heap[0][0] < (-kept[0][0], -kept[0][1]):
        key, i = heapq.heappop(heap)
        blocks[i].extend(blocks[i].count + 1)
        heapq.heapreplace(kept, (-key[0], -key[1]))
        heapq.heappush(heap, (blocks[i].next_key(), i))


def _keys(blocks: list[Greedy]) -> tuple[np.ndarray, np.ndarray]:
    """Squared distance and id of every pick so far, block after block."""
    d2 = np.concatenate([b.picks_d2[: b.count] for b in blocks])
    ids = np.concatenate([b.ids[b.picks[: b.count]] for b in blocks])
    return d2, ids


def _merge(blocks: list[Greedy], k: int, return_assignment: bool, n: int
           ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The first ``k`` picks in merged order (and, for every row, the position of its nearest one).

    Picks past the first ``k`` (a round that went too far) are dropped; the merge keeps a
    prefix of each block's picks, and rows whose nearest pick was dropped are matched again,
    exactly, against the kept picks of their block.
    """
    d2, ids = _keys(blocks)
    merged = np.lexsort((ids, -d2))[:k]  # farthest first, ties to the lowest id
    selected = ids[merged]
    if not return_assignment:
        return selected
    position = np.full(d2.shape[0], -1, np.int32)
    position[merged] = np.arange(k, dtype=np.int32)
    assign = np.empty(n, np.int32)
    start = 0
    for b in blocks:
        local = position[start : start + b.count]
        kept = int((local >= 0).sum())
        labels = b.assignment()
        lost = np.flatnonzero(labels >= kept)
        if lost.size:
            centres, rows = b.vectors(b.picks[:kept]), b.vectors(lost)
            for lo in range(0, lost.size, 4096):  # bounded temporaries
                chunk = rows[lo : lo + 4096]
                gap = (chunk * chunk).sum(1)[:, None] - 2 * chunk @ centres.T + (centres * centres).sum(1)[None]
                labels[lost[lo : lo + 4096]] = gap.argmin(1)
        assign[b.ids] = local[labels]
        start += b.count
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
