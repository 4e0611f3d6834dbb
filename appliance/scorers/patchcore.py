"""PatchCore: nearest-neighbour distance to a coreset memory bank of good patches.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022).
The bank lives outside the backbone graph, in a FAISS index, so it can be
searched approximately, grown and swapped without recompiling anything.

Search at inference has two stages when ``candidates="positional"``:

1. every query patch is compared with a short list of bank rows learned for its
   position (the rows that training patches around that position matched), then
   a couple of greedy steps on the bank's k-NN graph. That gives a true distance
   to some bank row, i.e. an upper bound of the exact nearest-neighbour distance,
   in a fraction of the time of a full search;
2. the patches with the largest bounds (by normalised score when the bundle has
   a position norm) are tightened (graph search, then HNSW) and searched exactly
   in the FAISS index until the largest exact score found is at least every
   remaining bound. The image score is then exactly what an exhaustive search
   gives; only patches below the maximum keep their (slightly high) bound in the
   anomaly map.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import faiss
import numba
import numpy as np
from appliance_kernels.coreset import greedy_coreset
from appliance_kernels.nn_search import check_graph, graph_beam, shortlist_nn
from pydantic.dataclasses import dataclass

from ..errors import ConfigError, ScorerError
from ..position_norm import PositionNorm
from .base import STRICT, Growth, Progress, Scorer, check_norm, frame_mask, register
from .patchcore_bank import (
    RowBuffer,
    build_graph,
    build_hnsw,
    build_index,
    build_shortlists,
    graph_rows,
    greedy_cover,
    locality_order,
    position_partitions,
    promote,
    reserve,
)
from .patchcore_search import BEAM_EXPAND, certify, search_into
from .spill import MemoryRows, SpilledRows, patch_rows

INDEX_TYPES = ("flat", "hnsw", "ivf")
CANDIDATE_SOURCES = ("positional", "none")
#: Training patches sampled to measure the bank's coverage radius (HNSW distances: each one at least the exact one).
_COVERAGE_SAMPLE = 20000
#: Learned rows allowed by default: this share of the fitted bank, and at least this many.
_LEARNED_SHARE = 0.05
_MIN_LEARNED_ROWS = 1000
#: Learned rows go to the HNSW indexes in calls of at most this many: FAISS inserts up to 100 rows of one
#: call in a fixed order on one thread (more run in parallel, in no fixed order), so the same rows give
#: the same graph, bit for bit, live and on replay.
_ADD_CHUNK = 64
#: A learned frame's patches must end this much (relative) below their limit: our distances and the
#: search's differ in float32 rounding.
_LEARN_MARGIN = 1e-4


@dataclass(frozen=True, config=STRICT)
class PatchCoreConfig:
    """PatchCore settings.

    Attributes:
        coreset_ratio: fraction of training patches kept in the bank.
        max_bank: upper bound on the bank size (``None``: no bound).
        projection_dim: random-projection width for the coreset's distances.
        coreset_partitions: the coreset is selected over this many position partitions (tiles, or
            bands of a tile along its longer side): a patch is only covered by bank rows from its
            own partition, which divides the coreset's work by about this number and lets the
            partitions run on separate threads; 1: one global selection on one thread, as the paper.
        spill_mb: training patches above this many MB are collected in a temporary file (in
            ``TMPDIR``) rather than in memory (``None``: always in memory).
        num_neighbors: support size of the paper's image-score reweighting.
        reweight: apply the reweighting (anomalib does); off uses the plain maximum.
        index: FAISS index over the bank: ``flat`` (exact), ``hnsw`` or ``ivf``.
        hnsw_m: HNSW graph degree.
        ef_search: HNSW search depth.
        ivf_lists: IVF lists (``None``: 4 * sqrt(bank size)).
        nprobe: IVF lists visited per query.
        candidates: ``positional`` shortlists + certified refinement, or ``none``
            (every query goes to the FAISS index).
        shortlist: bank rows per position.
        shortlist_radius: neighbourhood (in patches) pooled into a position's shortlist.
        graph_degree: neighbours per bank row in the bank's k-NN graph, used to tighten the
            shortlist bounds before the exact refinement (0: no graph).
        graph_steps: greedy steps on that graph per patch.
        seed: seeds the projection and the coreset's first pick.
        max_learned_rows: rows that operator feedback (``learn_rows``/``add_rows``) may add to the
            fitted bank before a rebuild is due (``None``: 5 % of the fitted bank, at least
            ``_MIN_LEARNED_ROWS``; 0: no live learning). Learned rows are searched as well as the
            coreset's but chosen one image at a time, and each one is replayed at every start.

    """

    coreset_ratio: float = 0.1
    max_bank: int | None = None
    projection_dim: int = 32
    coreset_partitions: int = 16
    spill_mb: int | None = 512
    num_neighbors: int = 9
    reweight: bool = False
    index: str = "flat"
    hnsw_m: int = 32
    ef_search: int = 64
    ivf_lists: int | None = None
    nprobe: int = 8
    candidates: str = "positional"
    shortlist: int = 32
    shortlist_radius: int = 1
    graph_degree: int = 16
    graph_steps: int = 2
    seed: int = 0
    max_learned_rows: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.coreset_ratio <= 1:
            raise ConfigError(f"patchcore.coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.index not in INDEX_TYPES:
            raise ConfigError(f"patchcore.index must be one of {INDEX_TYPES}, got {self.index!r}")
        if self.candidates not in CANDIDATE_SOURCES:
            raise ConfigError(f"patchcore.candidates must be one of {CANDIDATE_SOURCES}, got {self.candidates!r}")
        for name in ("projection_dim", "coreset_partitions", "num_neighbors", "shortlist", "hnsw_m", "ef_search",
                     "nprobe"):
            if getattr(self, name) < 1:
                raise ConfigError(f"patchcore.{name} must be >= 1, got {getattr(self, name)}")
        if self.graph_degree < 0 or self.graph_steps < 0:
            raise ConfigError("patchcore.graph_degree and graph_steps must be >= 0")
        if self.spill_mb is not None and self.spill_mb < 0:
            raise ConfigError(f"patchcore.spill_mb must be >= 0 or null, got {self.spill_mb}")
        if self.max_bank is not None and self.max_bank < 1:
            raise ConfigError(f"patchcore.max_bank must be >= 1 or null, got {self.max_bank}")
        if self.max_learned_rows is not None and self.max_learned_rows < 0:
            raise ConfigError(f"patchcore.max_learned_rows must be >= 0 or null, got {self.max_learned_rows}")


@register
class PatchCore(Scorer):
    """Memory-bank nearest-neighbour scorer."""

    type = "patchcore"
    Config = PatchCoreConfig
    default_backbone = "efficientnet_lite0_patch"  # 3x3 locally aggregated embedding, as in PatchCore

    def __init__(self, config: PatchCoreConfig) -> None:
        super().__init__(config)
        self.bank: np.ndarray | None = None
        self.index: faiss.Index | None = None
        self.shortlist: np.ndarray | None = None
        self.graph: np.ndarray | None = None
        self.hnsw: faiss.Index | None = None
        self.valid: np.ndarray | None = None
        self.coverage_radius = 0.0
        self.base_rows = 0  # rows of the fitted (or loaded) bank; rows after them were learned
        self._bank_rows: RowBuffer | None = None  # ``bank`` with room for learned rows
        self._graph_rows: RowBuffer | None = None  # ``graph`` likewise
        self._base: tuple[dict[str, np.ndarray], dict] | None = None  # the fitted state, for ``rebased``
        self.refined_last = 0  # patches searched exactly for the last image (for benchmarks)
        self.approx_last = 0  # patches given the HNSW search for the last image (for benchmarks)

    # ---------------------------------------------------------------- fitting
    def fit(self, features: Iterable[np.ndarray], n_images: int, valid: np.ndarray | None = None,
            progress: Progress | None = None) -> dict:
        """Collect valid training patches (float16), select the coreset, index it."""
        t0 = time.perf_counter()
        patches, grid, keep, count = self._collect(features, n_images, valid, progress)
        try:
            t1 = time.perf_counter()
            n_rows = patches.shape[0]
            k = max(1, round(self.config.coreset_ratio * n_rows))
            k = min(k, self.config.max_bank or k, n_rows)
            parts = position_partitions(grid, self.config.coreset_partitions)[keep]
            selected, assign = greedy_coreset(patches, k, projection_dim=self.config.projection_dim,
                                              seed=self.config.seed,
                                              partitions=np.tile(parts, count) if parts.max() > 0 else None,
                                              return_assignment=True)
            t2 = time.perf_counter()
            full_assign = np.full((count, keep.size), -1, np.int32)
            full_assign[:, keep] = assign.reshape(count, -1)
            shortlist = build_shortlists(full_assign, grid, self.config.shortlist, self.config.shortlist_radius)
            self.install(patches[selected], shortlist, valid)
            t3 = time.perf_counter()
            rng = np.random.default_rng(self.config.seed)
            sample = patches[rng.choice(n_rows, min(n_rows, _COVERAGE_SAMPLE), replace=False)].astype(np.float32)
        finally:
            patches.close()
        d2, _ = self.hnsw.search(sample, 1)  # not the exact index: 0.4 against 6.6 s on a 50k bank, same maximum
        self.coverage_radius = float(np.sqrt(max(float(d2.max()), 0.0)))
        return {"images": count, "patches": n_rows, "bank": k, "collect_s": round(t1 - t0, 3),
                "coreset_s": round(t2 - t1, 3), "index_s": round(t3 - t2, 3),
                "coverage_radius": round(self.coverage_radius, 4), "spilled": patches.spilled}

    def _collect(self, features: Iterable[np.ndarray], n_images: int, valid: np.ndarray | None,
                 progress: Progress | None) -> tuple[MemoryRows | SpilledRows, tuple[int, int, int], np.ndarray, int]:
        """The valid patches of every training image as rows, with the patch grid, mask and image count."""
        store = keep = grid = None
        count = per_image = 0
        try:
            for x in features:
                t, c, h, w = x.shape
                if store is None:
                    grid = (t, h, w)
                    keep = np.ones(t * h * w, bool) if valid is None else valid.reshape(-1).astype(bool)
                    per_image = int(keep.sum())
                    if per_image == 0:
                        raise ScorerError("the valid-area mask leaves no patch to learn from")
                    store = patch_rows(n_images * per_image, c, self.config.spill_mb)
                elif (t, h, w) != grid:
                    raise ScorerError(f"training features changed shape from {grid} to {(t, h, w)}")
                if count >= n_images:
                    raise ScorerError(f"more than the announced {n_images} training images")
                store.write(count * per_image, x.reshape(t, c, h * w).transpose(0, 2, 1).reshape(-1, c)[keep])
                count += 1
                if progress:
                    progress(count, n_images)
        except BaseException:
            if store is not None:
                store.close()
            raise
        if store is None:
            raise ScorerError("no training images")
        return store.truncate(count * per_image), grid, keep, count

    def install(self, bank: np.ndarray, shortlist: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """A newly selected bank: stored in locality order (``locality_order``), search structures built.

        Returns:
            The order: installed row ``i`` is given row ``order[i]``.

        """
        order, shortlist = locality_order(shortlist, bank.shape[0])
        self.set_bank(bank[order], shortlist, valid)
        return order

    def set_bank(self, bank: np.ndarray, shortlist: np.ndarray, valid: np.ndarray | None = None, *,
                 index: faiss.Index | None = None, hnsw: faiss.Index | None = None,
                 graph: np.ndarray | None = None) -> None:
        """Install a memory bank and build whatever search structure is not given.

        The one place that ties bank, shortlists, FAISS index, HNSW and k-NN graph together
        (fit and benchmarks through ``install``, bundle loading directly: a stored bank keeps its order).

        Args:
            bank: ``[B, C]`` rows (rounded to float16 values, which the indexes store losslessly).
            shortlist: ``[positions, L]`` int32 bank rows per patch position.
            valid: ``[T, h, w]`` bool valid-patch mask, or ``None``.
            index: the exact (or configured approximate) FAISS index over ``bank``.
            hnsw: the HNSW index over ``bank`` used by the certified search.
            graph: ``[B, K]`` int32 k-NN graph of the bank.

        """
        rows = np.asarray(bank).shape[0]
        self.base_rows = rows
        head = self._learned_cap()  # room for learned rows
        self._bank_rows = RowBuffer(np.asarray(bank).astype(np.float16), np.float32, head)
        self.bank = self._bank_rows.rows
        self.shortlist = np.array(shortlist, np.int32, order="C")  # a copy: learning reorders it in place
        self.valid = None if valid is None else np.asarray(valid, bool)
        self.index = index if index is not None else build_index(self.bank, self.config)
        self.hnsw = hnsw if hnsw is not None else build_hnsw(self.bank, self.config.ef_search)
        graph = np.asarray(graph if graph is not None else build_graph(self.bank, self.hnsw, self.config.graph_degree))
        for name, ntotal in (("FAISS index", self.index.ntotal), ("HNSW index", self.hnsw.ntotal),
                             ("graph", graph.shape[0])):
            if ntotal != rows:
                raise ScorerError(f"PatchCore {name} holds {ntotal} rows, the bank {rows}")
        self._graph_rows = RowBuffer(graph, np.int32, head)
        self.graph = self._graph_rows.rows
        self._base = None
        if self.index.d != self.bank.shape[1]:
            raise ScorerError("the FAISS index's dimension differs from the bank's")
        for faiss_index in (self.index, self.hnsw):
            reserve(faiss_index, head)
        if self.shortlist.size and self.shortlist.max() >= self.bank.shape[0]:
            raise ScorerError("PatchCore shortlists point past the bank")
        try:
            check_graph(self.graph, self.bank.shape[0])
        except ValueError as exc:
            raise ScorerError(f"PatchCore k-NN graph: {exc}") from None

    # ---------------------------------------------------------------- scoring
    def _queries(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        _t, _c, p = x.shape
        return np.ascontiguousarray(x[rows // p, :, rows % p])

    def nearest(self, features: np.ndarray, norm: PositionNorm | None = None, *, certify: bool = True,
                valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Squared NN distance ``[T*P]`` and bank row for every patch (exact at the top, see module doc).

        "The top" is by distance, or by normalised score with ``norm``: the patch with the largest
        normalised score is then the one searched exactly. ``certify=False``: bounds only.
        ``valid``: the patches to score (``frame_mask``; default: the fitted valid area); others get 0.
        """
        if self.bank is None:
            raise ScorerError("PatchCore scorer used before fit or load")
        t, c, h, w = features.shape
        if c != self.bank.shape[1] or t * h * w != self.shortlist.shape[0]:
            raise ScorerError(f"features {features.shape} do not fit this bank ({self.bank.shape[1]} channels, "
                              f"{self.shortlist.shape[0]} positions)")
        check_norm(norm, (t, h, w))
        x = np.ascontiguousarray(features.reshape(t, c, h * w), np.float32)
        if self.config.candidates == "none":
            d2, nn = self.index.search(np.ascontiguousarray(x.transpose(0, 2, 1).reshape(-1, c)), 1)
            self.refined_last = d2.shape[0]
            return np.maximum(d2[:, 0], 0), nn[:, 0].astype(np.int32)
        d2, nn = shortlist_nn(x, self.bank, self.shortlist, self.graph, self.config.graph_steps)
        mask = self.valid if valid is None else valid
        if mask is not None:
            d2[~mask.reshape(-1)] = 0.0
        if certify:
            self._certify(x, d2, nn, norm, mask)
        return np.maximum(d2, 0), nn

    def _certify(self, x: np.ndarray, d2: np.ndarray, nn: np.ndarray, norm: PositionNorm | None,
                 mask: np.ndarray | None) -> None:
        """Make the largest (normalised) patch score exact, in place (``patchcore_search.certify``)."""
        self.refined_last, self.approx_last = certify(x, d2, nn, norm, mask, self.bank, self.graph, self.hnsw,
                                                      self.index)

    def _search(self, index: faiss.Index, x: np.ndarray, rows: np.ndarray, d2: np.ndarray, nn: np.ndarray) -> None:
        search_into(index, x, rows, d2, nn)

    def patch_scores(self, features: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Every patch's NN distance, for the per-position statistics: shortlist bounds refined by HNSW.

        The shortlist bounds alone overestimate unevenly across positions (loose where a position's
        shortlist misses a texture), and statistics taken from them mis-scale the position norm: on
        the solar-cell data, 0.892 image AUROC against 0.910 with exhaustive distances. HNSW finds
        the nearest bank row for nearly every patch at a fraction of an exhaustive search's cost;
        no maximum is certified (nobody uses it here).
        """
        mask = frame_mask(self.valid, valid)
        d2, nn = self.nearest(features, certify=False, valid=mask)
        if self.config.candidates != "none":
            t, c, h, w = features.shape
            x = np.ascontiguousarray(features.reshape(t, c, h * w), np.float32)
            rows = np.arange(d2.shape[0]) if mask is None else np.flatnonzero(mask.reshape(-1))
            self._search(self.hnsw, x, rows, d2, nn)
        return self._distances(np.maximum(d2, 0), features.shape, mask)

    def _distances(self, d2: np.ndarray, shape: tuple[int, ...], mask: np.ndarray | None = None) -> np.ndarray:
        """``[T, h, w]`` patch distances from squared ones, zero outside ``mask`` (default: the valid area)."""
        t, _, h, w = shape
        dist = np.sqrt(d2).reshape(t, h, w)
        mask = self.valid if mask is None else mask
        return dist * mask if mask is not None else dist

    def score(self, features: np.ndarray, norm: PositionNorm | None = None, valid: np.ndarray | None = None
              ) -> tuple[np.ndarray, float]:
        """Patch scores (NN distances, normalised with ``norm``) and the image score (max, optionally reweighted)."""
        mask = frame_mask(self.valid, valid)
        d2, nn = self.nearest(features, norm, valid=mask)
        return self._image(features, d2, nn, norm, mask)

    def _image(self, features: np.ndarray, d2: np.ndarray, nn: np.ndarray, norm: PositionNorm | None,
               mask: np.ndarray | None) -> tuple[np.ndarray, float]:
        """Patch scores and image score from certified distances (``score``'s last step)."""
        dist = self._distances(d2, features.shape, mask)
        patches = dist if norm is None else norm.apply(dist, mask)
        top = int(np.argmax(patches))
        image_score = float(patches.reshape(-1)[top])
        if self.config.reweight and self.bank.shape[0] > 1:
            weighted = float(dist.reshape(-1)[top]) * self._reweight(features, top, int(nn[top]))
            image_score = weighted if norm is None else float(norm.key(np.array([weighted]), np.array([top]))[0])
        return patches, image_score

    def _reweight(self, features: np.ndarray, top: int, row: int) -> float:
        """The paper's weight ``1 - softmax(|m_test - m|)[nn]`` over the NN's bank neighbourhood, as anomalib.

        The neighbourhood (the NN row and its nearest bank rows) comes from the bank's k-NN graph
        when it is wide enough, instead of an exhaustive search of the bank per image: on the
        tiled ball-screw bank (50k rows), the same rows for 59 of 60 test images, weights within 4e-5.
        """
        t, c, h, w = features.shape
        query = self._queries(features.reshape(t, c, h * w), np.array([top]))
        k = min(self.config.num_neighbors, self.bank.shape[0])
        if self.graph.shape[1] >= k - 1:
            support = np.concatenate([[row], self.graph[row, : k - 1]])
        else:
            _, found = self.index.search(self.bank[row : row + 1], k)
            support = found[0]
        support = support[support >= 0]
        dist = np.sqrt(((self.bank[support] - query) ** 2).sum(1))
        weights = np.exp(dist - dist.max())
        return float(1.0 - weights[0] / weights.sum())

    # ---------------------------------------------------------------- growing
    def _learned_cap(self) -> int:
        """Rows that may be learned on top of the fitted bank (``max_learned_rows``)."""
        if self.config.max_learned_rows is not None:
            return self.config.max_learned_rows
        return max(_MIN_LEARNED_ROWS, int(np.ceil(_LEARNED_SHARE * self.base_rows)))

    @property
    def learned_rows(self) -> int:
        """Rows added since the bank was fitted or loaded."""
        return 0 if self.bank is None else self.bank.shape[0] - self.base_rows

    def learn_capacity(self) -> int:
        """Rows that may still be learned before a rebuild is due (``max_learned_rows`` less those learned)."""
        if self.bank is None:
            raise ScorerError("PatchCore scorer used before fit or load")
        return max(0, self._learned_cap() - self.learned_rows)

    def learn_rows(self, features: np.ndarray, limit: float, norm: PositionNorm | None = None,
                   valid: np.ndarray | None = None, budget: int | None = None) -> Growth:
        """The rows whose addition makes every patch of ``features`` score below ``limit``; changes nothing.

        ``limit`` is on the image score's scale (normalised per position with ``norm``). The image is
        scored as ``score`` does (its score before comes with the rows), each patch still above the
        limit has its distance bound tightened by the k-NN graph and HNSW, and ``greedy_cover``
        adds the highest-scoring patches as rows until all are below. No exhaustive search: on the
        ball-screw bank (125k rows) every patch still above its limit after HNSW was above it in an
        exact search too (5/5, 1/1, 6/6, 2/2, 9/9, 58/58 and 617/617 patches over seven frames and
        targets), which would have cost 1.2 ms each. It only reads the bank, so it may run beside
        ``score`` (``reads_beside_scoring``), never beside ``add_rows``.
        """
        mask = frame_mask(self.valid, valid)
        d2, nn = self.nearest(features, norm, valid=mask)
        image_score = self._image(features, d2, nn, norm, mask)[1]
        t, c, h, w = features.shape
        x = np.ascontiguousarray(features.reshape(t, c, h * w), np.float32)
        positions = np.arange(d2.size)
        goal = np.full(d2.size, float(limit)) if norm is None else norm.raw(float(limit), positions).astype(np.float64)
        goal -= _LEARN_MARGIN * np.maximum(np.abs(goal), 1e-3)
        if mask is not None:
            goal[~mask.reshape(-1)] = np.inf  # d2 is 0 there: never a row
        goal2 = np.where(goal > 0, goal * goal, -1.0).astype(np.float32)
        open_ = np.flatnonzero(d2 > goal2)
        if self.config.candidates != "none" and open_.size:  # "none": d2 is already exact
            graph_beam(x, self.bank, self.graph, open_, d2, nn, goal2[open_], BEAM_EXPAND)
            open_ = open_[d2[open_] > goal2[open_]]
            self._search(self.hnsw, x, open_, d2, nn)
        offset = np.zeros(d2.size) if norm is None else norm.mean.reshape(-1).astype(np.float64)
        scale = np.ones(d2.size) if norm is None else norm.scale.reshape(-1).astype(np.float64)
        queries = x.transpose(0, 2, 1).reshape(-1, c)
        chosen = greedy_cover(queries, np.sqrt(np.maximum(d2, 0)), goal, offset, scale, budget)
        return Growth(queries[chosen].astype(np.float16), chosen, image_score)

    def add_rows(self, rows: np.ndarray, positions: np.ndarray, grid: tuple[int, int, int]) -> None:
        """Append learned rows in place: bank, FAISS indexes, k-NN graph, and shortlists around ``positions``.

        Nothing is copied but the new rows (the buffers and the FAISS vectors have room for
        ``max_learned_rows``; beyond it they double). The same rows added in the same calls on the
        same fitted state give the same state bit for bit, which ``rebased`` and replay rely on.
        Not safe beside ``score``: the caller serialises the two.

        Args:
            rows: ``[n, C]`` float16 values (others are rounded to float16).
            positions: ``[n]`` flat patch positions the rows came from (``T*h*w`` grid).
            grid: ``(T, h, w)`` of the patch positions.

        """
        if self.bank is None:
            raise ScorerError("PatchCore scorer used before fit or load")
        rows = np.asarray(rows)
        positions = np.asarray(positions, np.int64).reshape(-1)
        n, c = (rows.shape[0], rows.shape[1]) if rows.ndim == 2 else (-1, -1)
        if c != self.bank.shape[1] or positions.shape != (n,):
            raise ScorerError(f"learned rows {rows.shape} and positions {positions.shape} do not fit this bank "
                              f"({self.bank.shape[1]} channels)")
        if int(np.prod(grid)) != self.shortlist.shape[0] or (n and not 0 <= positions.min() <= positions.max()
                                                              < self.shortlist.shape[0]):
            raise ScorerError(f"learned rows' positions do not fit the {self.shortlist.shape[0]} patch positions")
        if n == 0:
            return
        if self._base is None:  # fitted here, not loaded: keep the fitted state for ``rebased``
            arrays, meta = self.state()
            self._base = ({k: np.array(v, copy=True) for k, v in arrays.items()}, meta)
        vec = np.ascontiguousarray(rows.astype(np.float16).astype(np.float32))
        start = self.bank.shape[0]
        for i in range(0, n, _ADD_CHUNK):
            self.index.add(vec[i : i + _ADD_CHUNK])
            self.hnsw.add(vec[i : i + _ADD_CHUNK])
        self.bank = self._bank_rows.append(vec)
        self.graph = self._graph_rows.append(graph_rows(self.hnsw, vec, np.arange(start, start + n),
                                                        self.graph.shape[1]))
        for row, position in enumerate(positions, start):
            promote(self.shortlist, int(position), row, grid, self.config.shortlist_radius)

    def rebased(self) -> PatchCore:
        """A new scorer holding the fitted (or loaded) state alone: what is left when every learned row goes.

        FAISS cannot delete from an HNSW graph, so forgetting rows means starting again from the
        fitted state and adding the rows that stay, in their order.
        """
        if self.bank is None:
            raise ScorerError("PatchCore scorer used before fit or load")
        arrays, meta = self._base if self._base is not None else self.state()
        other = PatchCore(self.config)
        other.load_state(arrays, meta)
        return other

    def reads_beside_scoring(self) -> bool:
        """``learn_rows`` only reads; its kernels may run beside ``score``'s if Numba's threading layer allows.

        OpenMP and TBB do; Numba's fallback layer ("workqueue") aborts the process when two threads
        launch kernels at once, so then learning waits for the scoring lock.
        """
        try:
            return numba.threading_layer() in ("omp", "tbb")
        except ValueError:  # no parallel kernel has run yet
            return False

    def add(self, features: np.ndarray) -> int:
        """Add the patches of a good image that the bank does not cover yet; returns how many.

        Patches farther than the coverage radius measured at fit time are added greedily (farthest
        first) until every patch of the image is covered, so the bank's guarantee is kept with as
        few new rows as possible. Each new row is put at the front of its position's shortlist.
        """
        growth = self.learn_rows(features, self.coverage_radius)
        t, _c, h, w = features.shape
        self.add_rows(growth.rows, growth.positions, (t, h, w))
        return growth.rows.shape[0]

    # ---------------------------------------------------------------- state
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Bank, shortlists, valid mask and (for approximate indexes) the serialised FAISS index."""
        arrays = {"bank": self.bank.astype(np.float16), "shortlist": self.shortlist, "graph": self.graph,
                  "hnsw_index": faiss.serialize_index(self.hnsw)}
        if self.valid is not None:
            arrays["valid"] = self.valid
        if self.config.index != "flat":
            arrays["faiss_index"] = faiss.serialize_index(self.index)
        meta = {"bank": int(self.bank.shape[0]), "dim": int(self.bank.shape[1]),
                "positions": int(self.shortlist.shape[0]), "coverage_radius": self.coverage_radius}
        return arrays, meta

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Restore a fitted state, checking shapes and that the index holds the bank."""
        bank, shortlist = arrays["bank"], arrays["shortlist"]
        if bank.shape != (meta["bank"], meta["dim"]) or shortlist.shape[0] != meta["positions"]:
            raise ScorerError("PatchCore state arrays do not match their recorded shapes")
        self.coverage_radius = float(meta["coverage_radius"])
        index = hnsw = None
        if "faiss_index" in arrays:
            index = faiss.deserialize_index(np.ascontiguousarray(arrays["faiss_index"]))
            if self.config.index == "hnsw":
                index.hnsw.efSearch = self.config.ef_search
            elif self.config.index == "ivf":
                faiss.extract_index_ivf(index).nprobe = self.config.nprobe
        if "hnsw_index" in arrays:
            hnsw = faiss.deserialize_index(np.ascontiguousarray(arrays["hnsw_index"]))
            hnsw.hnsw.efSearch = self.config.ef_search
        self.set_bank(bank, shortlist, arrays.get("valid"), index=index, hnsw=hnsw, graph=arrays.get("graph"))
        self._base = (arrays, dict(meta))  # never written to (set_bank copies what learning changes)

    def warm_up(self, shape: tuple[int, ...]) -> None:
        """Score once so kernels are loaded before the first frame.

        On features where each patch is its position's first shortlisted bank row, every bound
        is exact and zero, so all stages run but certification ends at once. (Zeros, far from every
        row, made it search exactly patch after patch: 3.9 s on a tiled 50k bank.)
        """
        t, c, h, w = shape
        if self.shortlist is None or c != self.bank.shape[1] or t * h * w != self.shortlist.shape[0]:
            self.score(np.zeros(shape, np.float32))  # refused with a clear error, as a real frame would be
            return
        first = self.bank[self.shortlist[:, 0]].reshape(t, h, w, c).transpose(0, 3, 1, 2)
        self.score(np.ascontiguousarray(first))
