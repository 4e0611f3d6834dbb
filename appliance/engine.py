"""The engine: one frame in, one prediction out. The data flow reads top to bottom here.

frame -> preprocess (ROI, resize, tiles) -> backbone (OpenVINO) -> scorer (PatchCore
or PaDiM, patch scores per-position normalised when the bundle has a position norm)
-> stitched patch map and raw score -> calibration (normalise) -> decision.

An ``Engine`` is only ever built by ``bundle.load_bundle`` (and by the trainer
before it writes a bundle), fully verified, so a daemon can swap engines
between two frames. Preprocessing is stateless and the backbone guards its own
request, so only the scorer (not re-entrant) is serialised: one thread's backbone
call never waits for another thread's scoring.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .anomaly_map import source_map, working_map
from .backbone import Backbone
from .calibration import Calibration
from .decision import DEFAULT_THRESHOLD, decide
from .errors import ApplianceError, BackboneError
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
