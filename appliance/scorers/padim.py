"""PaDiM: one Gaussian per patch position, scored by Mahalanobis distance.

Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly
Detection and Localization" (2020). Position-specific statistics suit a fixed
camera: a patch is compared with what is normally seen at that very place.
Moments are accumulated image by image (bounded memory), inverse covariances
are stored packed; the per-frame distance is one parallel Numba kernel.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from appliance_kernels import mahalanobis as mk
from threadpoolctl import threadpool_limits

from ..errors import ConfigError, ScorerError
from .base import Progress, Scorer, register

#: Positions inverted per chunk (bounds the float64 temporaries).
_INVERT_CHUNK = 256
#: Images accumulated per kernel call (each position's accumulators stay in cache across a batch).
_BATCH = 16


@dataclass(frozen=True)
class PadimConfig:
    """PaDiM settings.

    Attributes:
        n_features: size of the random channel subset (``None``: all channels).
        ridge: added to every covariance diagonal before inversion (PaDiM uses 0.01).
        seed: seeds the channel subset.

    """

    n_features: int | None = None
    ridge: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_features is not None and self.n_features < 1:
            raise ConfigError(f"padim.n_features must be >= 1 or null, got {self.n_features}")
        if self.ridge <= 0:
            raise ConfigError(f"padim.ridge must be > 0, got {self.ridge}")


@register
class Padim(Scorer):
    """Per-position Gaussian scorer."""

    type = "padim"
    Config = PadimConfig
    default_backbone = "efficientnet_lite0_padim"  # raw activations, no local averaging, as in PaDiM

    def __init__(self, config: PadimConfig) -> None:
        super().__init__(config)
        self.channels: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.inv_packed: np.ndarray | None = None
        self.valid: np.ndarray | None = None

    def _choose_channels(self, c: int) -> np.ndarray:
        n = self.config.n_features
        if n is None or n >= c:
            return np.arange(c, dtype=np.int64)
        rng = np.random.default_rng(self.config.seed)
        return np.sort(rng.choice(c, n, replace=False)).astype(np.int64)

    def fit(self, features: Iterable[np.ndarray], n_images: int, valid: np.ndarray | None = None,
            progress: Progress | None = None) -> dict:
        """Accumulate per-position moments image by image, then invert the covariances."""
        t0 = time.perf_counter()
        sums = outer = batch = None
        count = filled = 0
        for x in features:
            t, c, h, w = x.shape
            if sums is None:
                self.channels = self._choose_channels(c)
                d = self.channels.size
                sums = np.zeros((t * h * w, d), np.float64)
                outer = np.zeros((t * h * w, mk.packed_size(d)), np.float64)
                batch = np.empty((_BATCH, t, c, h * w), np.float32)
                shape = x.shape
            elif x.shape != shape:
                raise ScorerError(f"training features changed shape from {shape} to {x.shape}")
            batch[filled] = x.reshape(t, c, h * w)
            filled += 1
            if filled == _BATCH:
                mk.accumulate_moments(batch, self.channels, sums, outer)
                filled = 0
            count += 1
            if progress:
                progress(count, n_images)
        if filled:
            mk.accumulate_moments(np.ascontiguousarray(batch[:filled]), self.channels, sums, outer)
        if count < 2:
            raise ScorerError(f"PaDiM needs at least 2 training images, got {count}")
        t1 = time.perf_counter()
        d = self.channels.size
        mean = sums / count
        self.mean = mean.astype(np.float32)
        self.inv_packed = np.empty((mean.shape[0], mk.packed_size(d)), np.float32)
        eye = np.eye(d) * self.config.ridge

        def invert(lo: int) -> None:
            hi = min(mean.shape[0], lo + _INVERT_CHUNK)
            cov = mk.unpack_upper(outer[lo:hi], d) / count
            cov -= mean[lo:hi, :, None] * mean[lo:hi, None, :]
            cov *= count / (count - 1)
            cov += eye
            self.inv_packed[lo:hi] = mk.pack_upper(np.linalg.inv(cov))

        # Many small inversions: single-threaded BLAS per chunk, chunks in parallel (LAPACK releases the GIL).
        with threadpool_limits(1), ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(invert, range(0, mean.shape[0], _INVERT_CHUNK)))
        self.valid = None if valid is None else valid.astype(bool)
        return {"images": count, "positions": int(mean.shape[0]), "channels": int(d),
                "moments_s": round(t1 - t0, 3), "invert_s": round(time.perf_counter() - t1, 3)}

    def score(self, features: np.ndarray) -> tuple[np.ndarray, float]:
        """Mahalanobis distance at every position; the image score is the maximum."""
        if self.mean is None:
            raise ScorerError("PaDiM scorer used before fit or load")
        t, c, h, w = features.shape
        x = np.ascontiguousarray(features.reshape(t, c, h * w), np.float32)
        try:
            dist = mk.mahalanobis(x, self.channels, self.mean, self.inv_packed)
        except ValueError as exc:
            raise ScorerError(f"PaDiM cannot score features of shape {features.shape}: {exc}") from None
        dist = dist.reshape(t, h, w)
        if self.valid is not None:
            dist *= self.valid
        return dist, float(dist.max())

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Channels, means, packed inverse covariances and the valid-patch mask."""
        arrays = {"channels": self.channels, "mean": self.mean, "inv_packed": self.inv_packed}
        if self.valid is not None:
            arrays["valid"] = self.valid
        return arrays, {"channels": int(self.channels.size), "positions": int(self.mean.shape[0])}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Restore a fitted state, checking the shapes agree."""
        channels, mean, inv = arrays["channels"], arrays["mean"], arrays["inv_packed"]
        if mean.shape != (meta["positions"], meta["channels"]) or inv.shape != (
            meta["positions"], mk.packed_size(meta["channels"])) or channels.shape != (meta["channels"],):
            raise ScorerError("PaDiM state arrays do not match their recorded shapes")
        self.channels = channels.astype(np.int64)
        self.mean = np.ascontiguousarray(mean, np.float32)
        self.inv_packed = np.ascontiguousarray(inv, np.float32)
        self.valid = arrays.get("valid")

    def warm_up(self, shape: tuple[int, ...]) -> None:
        """Score zeros once (compiles or loads the kernel, touches the matrices)."""
        self.score(np.zeros(shape, np.float32))
