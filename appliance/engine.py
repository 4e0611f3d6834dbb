"""The engine: one frame in, one prediction out. The data flow reads top to bottom here.

frame -> preprocess (ROI, resize, tiles) -> backbone (OpenVINO) -> scorer (PatchCore
or PaDiM, patch scores per-position normalised when the bundle has a position norm)
-> stitched patch map and raw score -> calibration (normalise) -> decision.

An ``Engine`` is only ever built by ``bundle.load_bundle`` (and by the trainer
before it writes a bundle), fully verified, so a daemon can swap engines
between two frames. Preprocessing is stateless and the backbone guards its own
request, so only the scorer (not re-entrant) is serialised: one thread's backbone
call never waits for another thread's scoring.

An operator's "good" label on a false reject goes into a PatchCore bank at once
(``learn_good``): rows are added under the same lock, so every frame is scored by
the bank before or after, never half of it. ``forget`` takes one label back,
``apply_learned`` replays stored labels at load (``bank_delta`` keeps them on disk).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .anomaly_map import source_map, working_map
from .backbone import Backbone
from .calibration import Calibration
from .decision import DEFAULT_THRESHOLD, decide
from .errors import ApplianceError, BackboneError, ConfigError, ScorerError
from .position_norm import PositionNorm
from .preprocess import Preprocessor, PreprocessSpec
from .scorers import Scorer
from .types import Frame, Prediction, Score

#: Called with the frame and the error when a frame of a stream cannot be scored.
OnError = Callable[[Frame, ApplianceError], None]
#: A threshold in force for one frame: ``frame -> (normalised threshold, where it came from)``.
ThresholdFor = Callable[[Frame], tuple[float, str]]
#: Longest wait for one asynchronous backbone inference before its frame is given up as failed.
STREAM_TIMEOUT_S = 30.0
_END = object()

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Learned:
    """Rows an operator's "good" label added to the memory bank, and what they did to that frame.

    Attributes:
        entry_id: the label's id (also its file name in a ``bank_delta.DeltaStore``).
        rows: ``[n, C]`` float16 bank rows: the frame's own patch features (``n`` may be 0).
        positions: ``[n]`` flat patch positions they came from (replay puts them in those shortlists).
        score_before: the frame's normalised score before it was learned.
        score_after: its normalised score after (below the target asked for).
        seconds: time the learning took, features included.

    """

    entry_id: str
    rows: np.ndarray
    positions: np.ndarray
    score_before: float
    score_after: float
    seconds: float

    def digest(self) -> str:
        """sha256 of the rows and positions: what the bank identity takes from this entry."""
        h = hashlib.sha256(np.ascontiguousarray(self.rows, np.float16).tobytes())
        h.update(np.ascontiguousarray(self.positions, np.int64).tobytes())
        return h.hexdigest()


class Engine:
    """A fitted model ready to score frames."""

    def __init__(self, spec: PreprocessSpec, backbone: Backbone, scorer: Scorer,
                 calibration: Calibration | None, model_id: str, manifest: dict | None = None,
                 bundle_path: Path | None = None, position_norm: PositionNorm | None = None) -> None:
        self.spec = spec
        self.manifest = manifest
        self.bundle_path = bundle_path
        self.preprocessor = Preprocessor(spec)
        self.backbone = backbone
        self.scorer = scorer
        self.calibration = calibration
        self.position_norm = position_norm
        self.model_id = model_id
        self.stream_timeout = STREAM_TIMEOUT_S
        self._lock = threading.Lock()  # the scorer is not re-entrant
        self._learn_lock = threading.Lock()  # one learn, replay or forget at a time: nothing else changes the bank
        self._learned: list[Learned] = []
        self._identity: str | None = None  # bank_identity, until the next change
        self._closed = False

    # ------------------------------------------------------------ stages
    def features(self, image: np.ndarray) -> np.ndarray:
        """Backbone features ``[T, C, h, w]`` of one frame's pixels."""
        self._check_open()
        return self.backbone.infer(self.preprocessor.tiles(image))

    def score_features(self, features: np.ndarray, frame_shape: tuple[int, int] | None = None) -> Score:
        """Scorer output for one frame's features (position-normalised when calibrated so), tiles stitched.

        ``frame_shape`` (H, W) is the frame's own size: with letterboxing, it says which patches show the frame.
        """
        valid = None if frame_shape is None else self.preprocessor.frame_valid(frame_shape)
        with self._lock:
            tile_scores, raw = self.scorer.score(features, self.position_norm, valid)
        embedding = features.mean(axis=(0, 2, 3), dtype=np.float32)
        return Score(image_score=raw, patch_map=self.preprocessor.stitch(tile_scores), embedding=embedding)

    def score(self, image: np.ndarray) -> Score:
        """Raw score of one frame's pixels (no calibration needed)."""
        return self.score_features(self.features(image), image.shape[:2])

    def predict(self, frame: Frame | np.ndarray, threshold: float | None = None, source: str = "bundle"
                ) -> Prediction:
        """Score and judge one frame synchronously.

        Args:
            frame: a ``Frame`` or bare pixels.
            threshold: normalised threshold in force (default: the bundle's, 0.5).
            source: where ``threshold`` comes from, recorded in the decision.

        """
        self._check_open()
        frame = frame if isinstance(frame, Frame) else Frame(image=frame)
        t0 = time.perf_counter()
        batch = self.preprocessor.tiles(frame.image)
        t1 = time.perf_counter()
        feats = self.backbone.infer(batch)
        t2 = time.perf_counter()
        score = self.score_features(feats, frame.image.shape[:2])
        t3 = time.perf_counter()
        return self._prediction(frame, score, _fixed(threshold, source),
                                {"preprocess": t1 - t0, "backbone": t2 - t1, "scorer": t3 - t2, "total": t3 - t0})

    def _prediction(self, frame: Frame, score: Score, threshold_for: ThresholdFor, seconds: dict[str, float]
                    ) -> Prediction:
        if self.calibration is None:
            raise ApplianceError("this engine has no calibration yet; it can score but not decide")
        normalised = self.calibration.normalise(score.image_score)
        decision = decide(normalised, *threshold_for(frame))
        return Prediction(frame, score, decision, self.model_id, {k: v * 1e3 for k, v in seconds.items()})

    def score_stream(self, frames: Iterable[Frame | None], on_error: OnError | None = None, depth: int = 2
                     ) -> Iterator[tuple[Frame, Score, dict[str, float]]]:
        """Raw scores of frames in order; the backbone of the next frames runs while this one is scored.

        At most ``depth`` frames are in the backbone at once. A live source may yield ``None`` for
        "no frame right now": finished frames are then yielded without waiting for the next one
        (a triggered camera's result must not wait for the next trigger); the iterator should
        block briefly before yielding ``None`` when it has nothing. A frame that cannot be preprocessed,
        whose inference fails or does not finish within ``stream_timeout`` seconds, or that cannot
        be scored is passed to ``on_error`` (or raises if none) and skipped; the stream goes on.

        Yields:
            ``(frame, score, seconds per stage)``: ``backbone`` is the inference itself,
            ``compute`` the frame's own work (preprocess + backbone + scorer), ``total`` the time
            from submission to score, which includes waiting behind other frames.

        """
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._check_open()
        done: dict[int, tuple[np.ndarray | None, float]] = {}
        abandoned: set[int] = set()  # timed out: their late results are dropped on arrival
        cond = threading.Condition()

        def finished(feats: np.ndarray | None, key: int, seconds: float) -> None:
            with cond:
                if key in abandoned:
                    abandoned.discard(key)
                    return
                done[key] = (feats, seconds)
                cond.notify_all()

        def fail(frame: Frame, exc: ApplianceError) -> None:
            if on_error is None:
                raise exc
            on_error(frame, exc)

        inflight: collections.deque[tuple[int, Frame, float, float]] = collections.deque()
        source_iter = iter(frames)
        counter = 0
        exhausted = False

        def fill() -> None:
            """Submit frames until ``depth`` are in flight, the source is exhausted or has nothing right now."""
            nonlocal counter, exhausted
            while not exhausted and len(inflight) < depth:
                frame = next(source_iter, _END)
                if frame is _END:
                    exhausted = True
                elif frame is None:  # a live source with no frame yet: do not hold back finished results
                    return
                else:
                    t0 = time.perf_counter()
                    try:
                        self.backbone.submit(self.preprocessor.tiles(frame.image), counter, finished)
                    except ApplianceError as exc:
                        fail(frame, exc)
                        continue
                    inflight.append((counter, frame, t0, time.perf_counter()))
                    counter += 1

        fill()
        while inflight or not exhausted:
            if not inflight:
                fill()  # idle: a live source blocks briefly in its iterator before it yields None
                continue
            key, frame, t0, t1 = inflight.popleft()
            with cond:
                arrived = cond.wait_for(lambda k=key: k in done, timeout=self.stream_timeout)
                feats, inference = done.pop(key) if arrived else (None, 0.0)
                if not arrived:
                    abandoned.add(key)
            t2 = time.perf_counter()
            fill()  # the next frames' backbone runs while this one is scored
            if feats is None:
                reason = "failed" if arrived else f"did not finish within {self.stream_timeout:g} s"
                fail(frame, BackboneError(f"backbone inference {reason}"))
                continue
            t3 = time.perf_counter()
            try:
                score = self.score_features(feats, frame.image.shape[:2])
            except ApplianceError as exc:
                fail(frame, exc)
                continue
            t4 = time.perf_counter()
            yield frame, score, {"preprocess": t1 - t0, "backbone": inference, "backbone_wait": t2 - t1,
                                 "scorer": t4 - t3, "compute": (t1 - t0) + inference + (t4 - t3), "total": t4 - t0}

    def predict_stream(self, frames: Iterable[Frame | None], threshold: float | ThresholdFor | None = None,
                       source: str = "bundle", on_error: OnError | None = None, depth: int = 2
                       ) -> Iterator[Prediction]:
        """Predictions for frames in order, pipelined as ``score_stream``.

        ``threshold`` is one normalised threshold for every frame (recorded with ``source``), or a
        function giving each frame its own threshold and source (a camera's shift schedule).
        """
        threshold_for = threshold if callable(threshold) else _fixed(threshold, source)
        for frame, score, seconds in self.score_stream(frames, on_error, depth):
            yield self._prediction(frame, score, threshold_for, seconds)

    # ------------------------------------------------------------ learning from the operator
    def learn_good(self, image: np.ndarray, entry_id: str, target: float = 0.45) -> Learned:
        """Learn a frame an operator labelled good (a false reject): it scores below ``target`` from the next frame on.

        The frame's features and the rows it needs (``Scorer.learn_rows``: its highest-scoring patches
        first, until its normalised score, position norm and calibration included, is below
        ``target``) are found while frames keep being scored; the rows go in under the scoring lock
        (the next frame scored uses them), and the frame is scored again for ``score_after``.

        Args:
            image: the frame's pixels, as the camera gave them.
            entry_id: the label's id (unique; ``forget`` takes it).
            target: normalised score to end below (the threshold in force less a margin).

        Raises:
            ScorerError: the scorer learns at the rebuild only (PaDiM), the bank delta is full
                (``max_learned_rows``: a rebuild is due), or ``entry_id`` is learned already.

        """
        t0 = time.perf_counter()
        self._check_open()
        if not 0.0 < target < 1.0:
            raise ConfigError(f"learning target must be a normalised score in (0, 1), got {target}")
        if self.calibration is None:
            raise ApplianceError("this engine has no calibration yet; it cannot tell what scores below a target")
        limit = self.calibration.threshold + self.calibration.scale * math.log(target / (1.0 - target))
        with self._learn_lock:
            if any(e.entry_id == entry_id for e in self._learned):
                raise ScorerError(f"entry {entry_id!r} is learned already; forget it first to learn it again")
            budget = self.scorer.learn_capacity()
            features = self.features(image)
            valid = self.preprocessor.frame_valid(image.shape[:2])
            with self._reading():
                growth = self.scorer.learn_rows(features, limit, self.position_norm, valid, budget)
            before = self.calibration.normalise(growth.image_score)
            learned = Learned(entry_id, growth.rows, growth.positions, before, before, time.perf_counter() - t0)
            with self._lock:
                if growth.rows.shape[0]:
                    self.scorer.add_rows(growth.rows, growth.positions, (features.shape[0], *features.shape[2:]))
                self._learned.append(learned)  # the bank and its identity change together
                self._identity = None
            if growth.rows.shape[0]:  # the frame again, after the next frames' (they need not wait for it)
                with self._reading():
                    after = self.scorer.score(features, self.position_norm, valid)[1]
                done = dataclasses.replace(learned, score_after=self.calibration.normalise(after),
                                           seconds=time.perf_counter() - t0)
                if done.score_after >= target:  # learn_rows' bounds say it cannot happen; say so if it does
                    log.warning("engine %s: %s scores %.4f after learning, not below %.4f", self.model_id, entry_id,
                                done.score_after, target)
                with self._lock:
                    self._learned[self._learned.index(learned)] = done  # same rows: the identity stands
                learned = done
        return learned

    def forget(self, entry_id: str) -> None:
        """Take back one learned entry: every frame then scores exactly as it did before that entry was learned.

        FAISS cannot delete from an HNSW graph, so a new scorer is built from the fitted state and
        the other entries, in their order (the same rows in the same order give the same bank, bit
        for bit), and swapped in under the lock; frames are scored by the old one meanwhile.
        """
        t0 = time.perf_counter()
        with self._learn_lock:
            ids = [e.entry_id for e in self._learned]
            if entry_id not in ids:
                raise ScorerError(f"no learned entry {entry_id!r} to forget ({len(ids)} learned)")
            remaining = [e for e in self._learned if e.entry_id != entry_id]
            fresh = self.scorer.rebased()
            for entry in remaining:
                fresh.add_rows(entry.rows, entry.positions, self._grid())
            with self._lock:
                self.scorer = fresh
                self._learned = remaining
                self._identity = None
        log.info("engine %s: forgot %s, %d entries replayed in %.2f s", self.model_id, entry_id, len(remaining),
                 time.perf_counter() - t0)

    def apply_learned(self, entries: list[Learned]) -> None:
        """Replay stored entries in order (at load): the same bank as learning them live, without their frames."""
        if not entries:
            return
        with self._learn_lock:
            ids = [e.entry_id for e in self._learned] + [e.entry_id for e in entries]
            if len(set(ids)) != len(ids):
                raise ScorerError("learned entries repeat an id; each label is learned once")
            t, c, h, w = self.backbone.output_shape
            for e in entries:  # all checked before any goes in
                if e.rows.ndim != 2 or e.rows.shape[1] != c or e.positions.shape != (e.rows.shape[0],) or (
                        e.positions.size and not 0 <= e.positions.min() <= e.positions.max() < t * h * w):
                    raise ScorerError(f"learned entry {e.entry_id!r} ({e.rows.shape} rows) does not fit this model "
                                      f"({c} channels, {t * h * w} positions)")
            rows = sum(e.rows.shape[0] for e in entries)
            if rows > self.scorer.learn_capacity():
                raise ScorerError(f"the bank delta holds {rows} rows, more than the {self.scorer.learn_capacity()} "
                                  "this model still takes (patchcore.max_learned_rows); a rebuild is due")
            for entry in entries:
                with self._lock:
                    self.scorer.add_rows(entry.rows, entry.positions, self._grid())
                    self._learned.append(entry)
                    self._identity = None

    @property
    def learned(self) -> list[Learned]:
        """The entries learned (or replayed), in order."""
        with self._lock:
            return list(self._learned)

    @property
    def max_learned_rows(self) -> int:
        """Rows this model may learn live in all before a rebuild is due (0: it learns at the rebuild only)."""
        try:
            return self.scorer.learned_rows + self.scorer.learn_capacity()
        except ScorerError:
            return 0

    def base_identity(self) -> str:
        """Short hash of the bundle's scorer arrays (their manifest digests): the bank as fitted."""
        files = (self.manifest or {}).get("files", {})
        digests = sorted(rec["sha256"] for name, rec in files.items() if name.startswith("scorer/"))
        return hashlib.sha256("".join(digests or [self.model_id]).encode()).hexdigest()[:16]

    def bank_identity(self) -> str:
        """Short hash of the bank in force: the fitted arrays plus every learned entry's id and rows, in order.

        With nothing learned it is ``base_identity()``; it changes with every learn and forget.
        """
        with self._lock:
            if self._identity is None:
                h = hashlib.sha256(self.base_identity().encode())
                for entry in self._learned:
                    h.update(f"\n{entry.entry_id}:{entry.digest()}".encode())
                self._identity = h.hexdigest()[:16] if self._learned else self.base_identity()
            return self._identity

    def _grid(self) -> tuple[int, int, int]:
        t, _c, h, w = self.backbone.output_shape
        return t, h, w

    def _reading(self) -> contextlib.AbstractContextManager:
        """No lock where the scorer's reads may run beside scoring; the scoring lock otherwise."""
        return contextlib.nullcontext() if self.scorer.reads_beside_scoring() else self._lock

    # ------------------------------------------------------------ maps
    def anomaly_map(self, score: Score, *, normalised: bool = True, in_source: bool = True,
                    frame_shape: tuple[int, int] | None = None, match_peak: bool = False) -> np.ndarray:
        """Smoothed anomaly map of a score, in frame pixels (or working pixels), normalised or raw.

        ``match_peak`` (for display): the smoothing lowers a small defect's peak below the image
        score, so an NG frame could show no region at or above the threshold. The map's excess over
        its median is then stretched so that its peak equals the image score: same shape, and the
        region the verdict comes from is always drawn. Metrics use the unstretched map.
        """
        work = working_map(score.patch_map, self.spec.size)
        if match_peak:
            base, peak = float(np.median(work)), float(work.max())
            if peak > base:
                work = base + (work - base) * ((score.image_score - base) / (peak - base))
        if normalised and self.calibration is not None:
            work = self.calibration.normalise(work)
        if not in_source:
            return work
        box = self.preprocessor.letterbox_box(frame_shape or self.spec.source_size)
        return source_map(work, self.spec, frame_shape, box)

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Wait for in-flight inferences, then release the compiled backbone; later calls raise."""
        if self._closed:
            return
        self._closed = True
        self.backbone.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ApplianceError(f"engine {self.model_id} is closed")


def _fixed(threshold: float | None, source: str) -> ThresholdFor:
    """The same threshold (the bundle's when ``None``) for every frame."""
    value, origin = (DEFAULT_THRESHOLD, "bundle") if threshold is None else (float(threshold), source)
    return lambda _frame: (value, origin)
