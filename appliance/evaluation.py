"""Evaluating an engine on a labelled test split: image and pixel metrics, per defect type.

Images are scored through the engine's pipelined stream; pixel metrics are
accumulated image by image at the masks' full resolution (see ``metrics``), so
memory does not grow with the test set.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .datasets import Sample
from .engine import Engine
from .errors import ApplianceError
from .imaging import read_image
from .metrics import PixelMetrics, format_table, summarise
from .training import StageProgress
from .types import Frame, Score


@dataclass
class EvalResult:
    """Per-image records, the metric summary and what could not be scored."""

    records: list[dict]
    summary: dict
    skipped: list[tuple[str, str]]
    seconds: float

    def table(self) -> str:
        """The summary as a terminal table."""
        return format_table(self.summary)


def score_samples(engine: Engine, samples: Sequence[Sample], skipped: list[tuple[str, str]],
                  progress: StageProgress | None = None, stage: str = "score"
                  ) -> Iterator[tuple[Sample, tuple[int, int], Score]]:
    """``(sample, its image's (H, W), score)`` per readable sample, pipelined; unreadable ones go to ``skipped``."""
    by_key: dict[int, Sample] = {}

    def frames() -> Iterator[Frame]:
        for i, s in enumerate(samples):
            try:
                image = read_image(s.path)
            except ApplianceError as exc:
                skipped.append((str(s.path), str(exc)))
                continue
            by_key[i] = s
            yield Frame(image=image, seq=i, source=str(s.path))

    def failed(frame: Frame, exc: ApplianceError) -> None:
        skipped.append((frame.source or "?", str(exc)))

    for n, (frame, score, _) in enumerate(engine.score_stream(frames(), on_error=failed), 1):
        if progress:
            progress(stage, n, len(samples))
        yield by_key.pop(frame.seq), frame.image.shape[:2], score


def evaluate(engine: Engine, samples: Sequence[Sample], *, pixel: bool = True,
             progress: StageProgress | None = None) -> EvalResult:
    """Score ``samples`` and compute image AUROC, pixel AUROC, PRO and F1 at the bundle threshold."""
    t0 = time.perf_counter()
    skipped: list[tuple[str, str]] = []
    records: list[dict] = []
    pixel_by_type: dict[str, PixelMetrics] = {}
    for sample, shape, score in score_samples(engine, samples, skipped, progress, "evaluate"):
        normalised = engine.calibration.normalise(score.image_score)
        records.append({"path": str(sample.path), "label": sample.label, "defect_type": sample.defect_type,
                        "raw_score": score.image_score, "score": normalised})
        if not pixel or sample.label == "unknown":
            continue
        try:
            mask = sample.read_mask(shape)
        except ApplianceError as exc:
            skipped.append((str(sample.mask), str(exc)))
            continue
        if mask is None:
            continue
        amap = engine.anomaly_map(score, normalised=False, frame_shape=shape)
        pixel_by_type.setdefault(sample.defect_type, PixelMetrics()).add(amap, mask)
    summary = summarise(records, pixel_by_type or None, 0.5)
    return EvalResult(records, summary, skipped, time.perf_counter() - t0)
