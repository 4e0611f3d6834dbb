"""The engine: one frame in, one prediction out. The data flow reads top to bottom here.

frame -> preprocess (ROI, resize, tiles) -> backbone (OpenVINO) -> scorer (PatchCore
or PaDiM, patch scores per-position normalised when the bundle has a position norm)
-> stitched patch map and raw score -> calibration (normalise) -> decision.

An ``Engine`` is only ever built by ``bundle.load_bundle`` (and by the trainer
before it writes a bundle), fully verified, so a daemon can swap engines
between two frames.
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
from .errors import ApplianceError
from .position_norm import PositionNorm
from .preprocess import Preprocessor, PreprocessSpec
from .scorers import Scorer
from .types import Frame, Prediction, Score

#: Called with the frame and the error when a frame of a stream cannot be scored.
OnError = Callable[[Frame, ApplianceError], None]


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
        self._lock = threading.Lock()  # the preprocessor's tile buffer and the scorer are not re-entrant

    # ------------------------------------------------------------ stages
    def features(self, image: np.ndarray) -> np.ndarray:
        """Backbone features ``[T, C, h, w]`` of one frame's pixels."""
        with self._lock:
            return self.backbone.infer(self.preprocessor.tiles(image))

    def score_features(self, features: np.ndarray) -> Score:
        """Scorer output for one frame's features (position-normalised when calibrated so), tiles stitched."""
        with self._lock:
            tile_scores, raw = self.scorer.score(features, self.position_norm)
            return Score(image_score=raw, patch_map=self.preprocessor.stitch(tile_scores))

    def score(self, image: np.ndarray) -> Score:
        """Raw score of one frame's pixels (no calibration needed)."""
        return self.score_features(self.features(image))

    def predict(self, frame: Frame | np.ndarray, threshold: float | None = None, source: str = "bundle"
                ) -> Prediction:
        """Score and judge one frame synchronously.

        Args:
            frame: a ``Frame`` or bare pixels.
            threshold: normalised threshold in force (default: the bundle's, 0.5).
            source: where ``threshold`` comes from, recorded in the decision.

        """
        frame = frame if isinstance(frame, Frame) else Frame(image=frame)
        t0 = time.perf_counter()
        with self._lock:
            batch = self.preprocessor.tiles(frame.image)
            t1 = time.perf_counter()
            feats = self.backbone.infer(batch)
        t2 = time.perf_counter()
        score = self.score_features(feats)
        t3 = time.perf_counter()
        return self._prediction(frame, score, threshold, source,
                                {"preprocess": t1 - t0, "backbone": t2 - t1, "scorer": t3 - t2, "total": t3 - t0})

    def _prediction(self, frame: Frame, score: Score, threshold: float | None, source: str,
                    seconds: dict[str, float]) -> Prediction:
        if self.calibration is None:
            raise ApplianceError("this engine has no calibration yet; it can score but not decide")
        normalised = self.calibration.normalise(score.image_score)
        decision = decide(normalised, DEFAULT_THRESHOLD if threshold is None else threshold,
                          "bundle" if threshold is None else source)
        return Prediction(frame, score, decision, self.model_id, {k: v * 1e3 for k, v in seconds.items()})

    def score_stream(self, frames: Iterable[Frame], on_error: OnError | None = None, depth: int = 2
                     ) -> Iterator[tuple[Frame, Score, dict[str, float]]]:
        """Raw scores of frames in order; the backbone of the next frames runs while this one is scored.

        A frame that cannot be preprocessed is passed to ``on_error`` (or raises if none) and skipped.

        Yields:
            ``(frame, score, seconds per stage)``: ``backbone`` is the inference itself,
            ``compute`` the frame's own work (preprocess + backbone + scorer), ``total`` the time
            from submission to score, which includes waiting behind other frames.

        """
        done: dict[int, tuple[np.ndarray, float]] = {}
        cond = threading.Condition()

        def finished(feats: np.ndarray, key: int, seconds: float) -> None:
            with cond:
                done[key] = (feats, seconds)
                cond.notify_all()

        inflight: collections.deque[tuple[int, Frame, float, float]] = collections.deque()
        source_iter = iter(frames)
        counter = 0

        def submit_next() -> bool:
            nonlocal counter
            for frame in source_iter:
                t0 = time.perf_counter()
                try:
                    with self._lock:
                        self.backbone.submit(self.preprocessor.tiles(frame.image), counter, finished)
                except ApplianceError as exc:
                    if on_error is None:
                        raise
                    on_error(frame, exc)
                    continue
                inflight.append((counter, frame, t0, time.perf_counter()))
                counter += 1
                return True
            return False

        while len(inflight) < depth and submit_next():
            pass
        while inflight:
            key, frame, t0, t1 = inflight.popleft()
            with cond:
                cond.wait_for(lambda k=key: k in done)
                feats, inference = done.pop(key)
            t2 = time.perf_counter()
            submit_next()
            t3 = time.perf_counter()
            score = self.score_features(feats)
            t4 = time.perf_counter()
            yield frame, score, {"preprocess": t1 - t0, "backbone": inference, "backbone_wait": t2 - t1,
                                 "scorer": t4 - t3, "compute": (t1 - t0) + inference + (t4 - t3), "total": t4 - t0}

    def predict_stream(self, frames: Iterable[Frame], threshold: float | None = None, source: str = "bundle",
                       on_error: OnError | None = None, depth: int = 2) -> Iterator[Prediction]:
        """Predictions for frames in order, pipelined as ``score_stream``."""
        for frame, score, seconds in self.score_stream(frames, on_error, depth):
            yield self._prediction(frame, score, threshold, source, seconds)

    # ------------------------------------------------------------ maps
    def anomaly_map(self, score: Score, *, normalised: bool = True, in_source: bool = True,
                    frame_shape: tuple[int, int] | None = None) -> np.ndarray:
        """Smoothed anomaly map of a score, in frame pixels (or working pixels), normalised or raw."""
        work = working_map(score.patch_map, self.spec.size)
        if normalised and self.calibration is not None:
            work = self.calibration.normalise(work)
        if not in_source:
            return work
        return source_map(work, self.spec, frame_shape)
