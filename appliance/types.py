"""Typed records that flow through the pipeline: frame -> features -> score -> decision.

Frozen dataclasses, so a result handed to a publisher cannot be changed under it.
This module imports nothing from the package.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One captured image and where it came from.

    Attributes:
        image: ``HxW`` (grey) or ``HxWx3`` RGB pixels, uint8 or uint16.
        camera: camera id (thresholds and drift are kept per camera).
        seq: the source's frame counter.
        timestamp: capture time, seconds since the epoch.
        source: file path or URI the pixels came from, if any.

    """

    image: np.ndarray
    camera: str = "default"
    seq: int = 0
    timestamp: float = field(default_factory=time.time)
    source: str | None = None


@dataclass(frozen=True)
class Features:
    """Patch embeddings of one frame: one ``[C, h, w]`` map per tile, stacked as ``[T, C, h, w]``."""

    embedding: np.ndarray


@dataclass(frozen=True)
class Score:
    """What a scorer says about one frame, before calibration.

    Attributes:
        image_score: raw image-level score (larger is more anomalous).
        patch_map: raw per-patch scores stitched over the working image, ``[H/8, W/8]``;
            the full-resolution anomaly map is derived from it only when needed.
        embedding: the frame's backbone features averaged over every patch and tile, ``[C]``
            float32: the engine's tap for drift statistics (no second backbone pass).

    """

    image_score: float
    patch_map: np.ndarray
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Decision:
    """The verdict on one frame: a pure function of the normalised score and a threshold.

    Attributes:
        score: normalised score in [0, 1]; 0.5 is the bundle's calibrated threshold.
        threshold: threshold in force on the normalised scale.
        anomalous: ``score >= threshold``.
        threshold_source: where ``threshold`` came from (``bundle``, ``camera``, ``shift``, ``operator``).

    """

    score: float
    threshold: float
    anomalous: bool
    threshold_source: str

    @property
    def verdict(self) -> str:
        """``"ng"`` (score at or above the threshold) or ``"ok"``: the words of the daemon, MQTT and the audit log."""
        return "ng" if self.anomalous else "ok"


@dataclass(frozen=True)
class Prediction:
    """Everything known about one scored frame.

    Attributes:
        frame: the frame that was scored.
        score: the raw score and patch map.
        decision: normalised score and verdict.
        model_id: the bundle that produced it.
        timings_ms: wall time per stage (``preprocess``, ``backbone``, ``scorer``, ``total``).

    """

    frame: Frame
    score: Score
    decision: Decision
    model_id: str
    timings_ms: dict[str, float] = field(default_factory=dict)
