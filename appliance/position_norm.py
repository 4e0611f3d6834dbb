"""Per-position normalisation of patch scores, learned from held-out good images.

On a fixed camera some places are always busier than others: the part's edges,
a reflection, the border of the frame. Their patch scores are high on every
good image, so the image maximum comes from them and a small real defect
elsewhere is hidden. Scoring each patch by how unusual it is *for its
position*, ``(score - mean) / spread`` over held-out good images, removes
that. It sits outside the model, beside the threshold: the scorer's memory
bank or Gaussians are untouched, and a re-calibration never needs a refit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

#: Smallest spread, as a fraction of the median spread: a position where good images barely vary
#: (a masked or saturated area) must not turn a tiny change into a huge score.
SPREAD_FLOOR = 0.5
#: Fewest good images to estimate a spread from.
MIN_IMAGES = 3


@dataclass(frozen=True)
class PositionNorm:
    """``(patch score - mean) / scale`` at every scorer position ``[T, h, w]``.

    Attributes:
        mean: mean patch score of the good calibration images, float32 ``[T, h, w]``.
        scale: their standard deviation, floored, float32 ``[T, h, w]`` (> 0).
        images: how many images the statistics come from.

    """

    mean: np.ndarray
    scale: np.ndarray
    images: int

    def __post_init__(self) -> None:
        if self.mean.shape != self.scale.shape or self.mean.ndim != 3:
            raise ConfigError(f"position norm: mean {self.mean.shape} and scale {self.scale.shape} must be one "
                              "[T, h, w] grid")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.scale).all() and (self.scale > 0).all()):
            raise ConfigError("position norm: mean must be finite and scale finite and > 0")

    @classmethod
    def fit(cls, maps: np.ndarray, valid: np.ndarray | None = None, shown: np.ndarray | None = None
            ) -> PositionNorm:
        """Statistics of ``[N, T, h, w]`` patch-score maps of good images.

        ``shown`` (``[N, T, h, w]`` bool) marks, per image, the positions that show it (letterboxed
        frames do not fill the grid); each position's statistics come from the images it shows.
        """
        maps = np.asarray(maps, np.float64)
        if maps.ndim != 4 or maps.shape[0] < MIN_IMAGES:
            raise ConfigError(f"position norm needs at least {MIN_IMAGES} good maps [N, T, h, w], got {maps.shape}")
        w = np.ones(maps.shape, np.float64) if shown is None else np.asarray(shown, np.float64)
        return cls._from_sums((w * maps).sum(0), (w * maps * maps).sum(0), w.sum(0), maps.shape[0], valid)

    @classmethod
    def _from_sums(cls, s1: np.ndarray, s2: np.ndarray, counts: np.ndarray, n: int, valid: np.ndarray | None
                   ) -> PositionNorm:
        """Mean and floored spread per position.

        Positions seen by fewer than ``MIN_IMAGES`` images take the median mean and spread of the
        others (they are mostly padding, never the image's maximum alone).
        """
        enough = counts >= MIN_IMAGES
        c = np.maximum(counts, 1)
        mean = s1 / c
        var = np.maximum(s2 - c * mean * mean, 0.0) / np.maximum(c - 1, 1)
        std = np.sqrt(var)
        inside = enough if valid is None else enough & np.asarray(valid, bool).reshape(std.shape)
        floor = max(SPREAD_FLOOR * float(np.median(std[inside])) if inside.any() else 0.0, 1e-6)
        if not enough.all() and enough.any():
            mean = np.where(enough, mean, float(np.median(mean[enough])))
            std = np.where(enough, std, float(np.median(std[enough])))
        return cls(mean.astype(np.float32), np.maximum(std, floor).astype(np.float32), n)

    @classmethod
    def leave_one_out(cls, maps: np.ndarray, valid: np.ndarray | None = None, shown: np.ndarray | None = None
                      ) -> list[PositionNorm]:
        """For each map, the statistics of all the others: its score then is what an unseen image gets."""
        maps = np.asarray(maps, np.float64)
        n = maps.shape[0]
        if n - 1 < MIN_IMAGES:
            raise ConfigError(f"leave-one-out position norms need at least {MIN_IMAGES + 1} maps, got {n}")
        w = np.ones(maps.shape, np.float64) if shown is None else np.asarray(shown, np.float64)
        s1, s2, cnt = (w * maps).sum(0), (w * maps * maps).sum(0), w.sum(0)
        return [cls._from_sums(s1 - wi * m, s2 - wi * m * m, cnt - wi, n - 1, valid)
                for m, wi in zip(maps, w, strict=True)]

    def apply(self, patches: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Normalised patch scores; outside ``valid``, the image's lowest valid value (never the maximum)."""
        z = (np.asarray(patches, np.float32) - self.mean) / self.scale
        if valid is not None:
            inside = np.asarray(valid, bool).reshape(z.shape)
            z[~inside] = z[inside].min() if inside.any() else 0.0
        return z.astype(np.float32, copy=False)

    def key(self, dist: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Normalised score of raw scores ``dist`` at flat positions ``positions`` (for search ordering)."""
        return (dist - self.mean.reshape(-1)[positions]) / self.scale.reshape(-1)[positions]

    def raw(self, score: float, positions: np.ndarray) -> np.ndarray:
        """The raw score that has normalised score ``score`` at each of the flat ``positions`` (inverse of ``key``)."""
        return self.mean.reshape(-1)[positions] + score * self.scale.reshape(-1)[positions]
