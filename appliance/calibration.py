"""Score normalisation and the bundle's threshold, learned from held-out images.

Raw scores (a distance in feature space) mean nothing to an operator. A logistic
map puts them in [0, 1] with the calibrated threshold at exactly 0.5 and a slope
set by the spread of good scores, so "0.7" reads the same for every model. The
threshold is the best-F1 cut when labelled defects are available, otherwise the
level of good scores that gives the target false-reject rate (the sample quantile,
or a normal fit when there are too few images for it); which one was used is
recorded, because they mean different things on the line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np

from .errors import ConfigError
from .metrics import best_f1_threshold, binary_stats

METHODS = ("best_f1", "false_reject_rate")


@dataclass(frozen=True)
class Calibration:
    """Raw score -> normalised score; threshold at 0.5.

    Attributes:
        threshold: raw score that maps to 0.5.
        scale: raw-score units per unit of logit (the good scores' robust spread).
        method: ``best_f1`` or ``false_reject_rate``.
        target_false_reject_rate: the target when ``method`` is ``false_reject_rate``.
        stats: what the calibration set said at the threshold (counts, rates, F1).

    """

    threshold: float
    scale: float
    method: str
    target_false_reject_rate: float | None = None
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"calibration.method must be one of {METHODS}, got {self.method!r}")
        if not self.scale > 0:
            raise ConfigError(f"calibration.scale must be > 0, got {self.scale}")

    def normalise(self, raw: float | np.ndarray) -> float | np.ndarray:
        """Logistic map of raw scores (scalars or arrays) to [0, 1]."""
        z = (np.asarray(raw, np.float64) - self.threshold) / self.scale
        out = 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)) without overflow
        return float(out) if np.ndim(out) == 0 else out.astype(np.float32)

    def describe(self) -> str:
        """One line for a terminal: how the threshold was chosen."""
        s = self.stats
        if self.method == "best_f1":
            return (f"threshold by best F1 on {s.get('n_good')} good + {s.get('n_defect')} defect calibration "
                    f"images (F1 {s.get('f1', 0):.3f}, false rejects {s.get('false_reject_rate', 0):.1%})")
        return (f"threshold by target false-reject rate {self.target_false_reject_rate:.1%} on "
                f"{s.get('n_good')} good calibration images (no labelled defects; "
                f"{s.get('threshold_from', 'sample quantile')})")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """Inverse of ``to_dict``."""
        return cls(**data)


def calibrate(good: np.ndarray, defect: np.ndarray | None = None, target_false_reject_rate: float = 0.01
              ) -> Calibration:
    """Learn normalisation and threshold from raw image scores of held-out images.

    Args:
        good: raw scores of held-out good images (at least 2).
        defect: raw scores of labelled defect images, if any.
        target_false_reject_rate: used when there are no defects.

    """
    good = np.asarray(good, np.float64)
    defect = np.asarray([] if defect is None else defect, np.float64)
    if good.size < 2:
        raise ConfigError(f"calibration needs at least 2 held-out good images, got {good.size}")
    if not 0 < target_false_reject_rate < 1:
        raise ConfigError(f"target false-reject rate must be in (0, 1), got {target_false_reject_rate}")
    mad = float(np.median(np.abs(good - np.median(good)))) * 1.4826
    scale = max(mad, float(good.std()) * 0.5, 1e-6 * max(1.0, float(np.abs(good).max())))
    if defect.size:
        labels = np.r_[np.zeros(good.size, bool), np.ones(defect.size, bool)]
        scores = np.r_[good, defect]
        threshold, _ = best_f1_threshold(labels, scores)
        method, target = "best_f1", None
    else:
        labels, scores = np.zeros(good.size, bool), good
        threshold, source = _false_reject_threshold(good, target_false_reject_rate)
        method, target = "false_reject_rate", target_false_reject_rate
    stats = {k: v for k, v in binary_stats(labels, scores, threshold).items() if v is not None}
    stats |= {"n_good": int(good.size), "n_defect": int(defect.size)}
    if not defect.size:
        stats["threshold_from"] = source
    return Calibration(float(threshold), float(scale), method, target, stats)


def _false_reject_threshold(good: np.ndarray, rate: float) -> tuple[float, str]:
    """The good-score level that about ``rate`` of good images exceed, and how it was found.

    The sample quantile cannot see past the highest calibration image: with 6 good images a
    1 % target gives their maximum, which about 1 in 7 new good images exceed. A normal fit to
    the good scores (mean + z * spread) extrapolates; the higher of the two is used.
    """
    quantile = float(np.quantile(good, 1.0 - rate, method="higher"))
    fitted = float(good.mean() + NormalDist().inv_cdf(1.0 - rate) * good.std(ddof=1))
    threshold, source = (fitted, "normal fit") if fitted > quantile else (quantile, "sample quantile")
    return threshold + 1e-6 * max(1.0, abs(threshold)), source  # strictly above the quantile image
