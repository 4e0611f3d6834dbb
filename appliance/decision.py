"""Verdicts: pure functions of a normalised score and the threshold in force."""

from __future__ import annotations

from .types import Decision

#: The bundle's calibrated threshold on the normalised scale.
DEFAULT_THRESHOLD = 0.5


def decide(score: float, threshold: float = DEFAULT_THRESHOLD, source: str = "bundle") -> Decision:
    """Anomalous when ``score >= threshold``; records where the threshold came from."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return Decision(score=float(score), threshold=float(threshold), anomalous=bool(score >= threshold),
                    threshold_source=source)
