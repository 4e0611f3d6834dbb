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

import numpy as np
from appliance_kernels import config as mk_config
from appliance_kernels import mahalanobis as mk
from pydantic.dataclasses import dataclass
from threadpoolctl import threadpool_limits

from ..errors import ConfigError, ScorerError
from ..position_norm import PositionNorm
from .base import STRICT, Progress, Scorer, check_norm, frame_mask, register

#: Positions inverted per chunk (bounds the float64 temporaries).
_INVERT_CHUNK = 64
#: Images accumulated per kernel call (each block's accumulators stay in cache across a batch).
_BATCH = 16
#: Positions per block of the kernels' interleaved layout.
_BLOCK = mk_config.POSITION_BLOCK


@dataclass(frozen=True, config=STRICT)
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
    learning_refusal = (
        "PaDiM learns at the next rebuild: it keeps, for every position, the mean and the inverted covariance of "
        "the training images, not the running sums that adding one image would need. The image stays labelled "
        "good; fit the model again with it among the training images (a PatchCore model learns at once)")

    def __init__(self, config: PadimConfig) -> None:
        super().__init__(config)
        self.channels: np.ndarray | None = None
        self.positions = 0
        self.mean_blocks: np.ndarray | None = None  # [nb, d, block] (see kernels.mahalanobis.to_blocks)
        self.inv_blocks: np.ndarray | None = None  # [nb, d(d+1)/2, block]
        self.valid: np.ndarray | None = None

    def _choose_channels(self, c: int) -> np.ndarray:
        n = self.config.n_features
        if n is None or n >= c:
            return np.arange(c, dtype=np.int64)
        rng = np.random.default_rng(self.config.seed)
        return np.sort(rng.choice(c, n, replace=False)).astype(np.int64)

    def fit(self, features: Iterable[np.ndarray], n_images: int, valid: np.ndarray | None = None,
            progress: Progress | None = None) -> dict:
        """Accumulate per-position moments batch by batch, then invert the covariances."""
        t0 = time.perf_counter()
        sums = outer = batch = None
        count = filled = 0
        for x in features:
            t, c, h, w = x.shape
            if sums is None:
                self.channels = self._choose_channels(c)
                d = self.channels.size
                self.positions = t * h * w
                nb = -(-self.positions // _BLOCK)
                sums = np.zeros((nb, d, _BLOCK), np.float64)
                outer = np.zeros((nb, mk.packed_size(d), _BLOCK), np.float64)
                batch = np.empty((_BATCH, t, c, h * w), np.float32)
                shape = x.shape
            elif x.shape != shape:
                raise ScorerError(f"training features changed shape from {shape} to {x.shape}")
            batch[filled] = x.reshape(t, c, h * w)
            filled += 1
            if filled == _BATCH:
                mk.accumulate_moments(batch, self.channels, sums, outer, positions=self.positions)
                filled = 0
            count += 1
            if progress:
                progress(count, n_images)
        if filled:
            mk.accumulate_moments(batch[:filled], self.channels, sums, outer, positions=self.positions)
        if count < 2:
            raise ScorerError(f"PaDiM needs at least 2 training images, got {count}")
        t1 = time.perf_counter()
        d = self.channels.size
        mean = sums / count  # [nb, d, block]
        inv = np.empty(outer.shape, np.float32)
        eye = np.eye(d) * self.config.ridge
        chunk = max(1, _INVERT_CHUNK // _BLOCK)

        def invert(b0: int) -> None:
            b1 = min(mean.shape[0], b0 + chunk)
            m = mk.from_blocks(mean[b0:b1], (b1 - b0) * _BLOCK)
            cov = mk.unpack_upper(mk.from_blocks(outer[b0:b1], (b1 - b0) * _BLOCK), d) / count
            cov -= m[:, :, None] * m[:, None, :]
            cov *= count / (count - 1)
            cov += eye
            inv[b0:b1] = mk.to_blocks(mk.pack_upper(np.linalg.inv(cov)).astype(np.float32))

        # Many small inversions: single-threaded BLAS per chunk, chunks in parallel (LAPACK releases the GIL).
        # Padding positions past the last have all-zero moments; with the ridge they invert harmlessly.
        with threadpool_limits(1), ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(invert, range(0, mean.shape[0], chunk)))
        self.mean_blocks = mean.astype(np.float32)
        self.inv_blocks = inv
        self.valid = None if valid is None else valid.astype(bool)
        return {"images": count, "positions": int(self.positions), "channels": int(d),
                "moments_s": round(t1 - t0, 3), "invert_s": round(time.perf_counter() - t1, 3)}

    def score(self, features: np.ndarray, norm: PositionNorm | None = None, valid: np.ndarray | None = None
              ) -> tuple[np.ndarray, float]:
        """Mahalanobis distance at every position (normalised with ``norm``); the image score is the maximum."""
        if self.mean_blocks is None:
            raise ScorerError("PaDiM scorer used before fit or load")
        t, c, h, w = features.shape
        x = np.ascontiguousarray(features.reshape(t, c, h * w), np.float32)
        try:
            dist = mk.mahalanobis_blocked(x, self.channels, self.mean_blocks, self.inv_blocks, self.positions)
        except ValueError as exc:
            raise ScorerError(f"PaDiM cannot score features of shape {features.shape}: {exc}") from None
        dist = dist.reshape(t, h, w)
        mask = frame_mask(self.valid, valid)
        if mask is not None:
            dist *= mask
        if norm is not None:
            check_norm(norm, dist.shape)
            dist = norm.apply(dist, mask)
        return dist, float(dist.max())

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Channels, per-position means, packed inverse covariances (position-major) and the valid mask."""
        arrays = {"channels": self.channels, "mean": mk.from_blocks(self.mean_blocks, self.positions),
                  "inv_packed": mk.from_blocks(self.inv_blocks, self.positions)}
        if self.valid is not None:
            arrays["valid"] = self.valid
        return arrays, {"channels": int(self.channels.size), "positions": int(self.positions)}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Restore a fitted state, checking the shapes agree."""
        channels, mean, inv = arrays["channels"], arrays["mean"], arrays["inv_packed"]
        if mean.shape != (meta["positions"], meta["channels"]) or inv.shape != (
            meta["positions"], mk.packed_size(meta["channels"])) or channels.shape != (meta["channels"],):
            raise ScorerError("PaDiM state arrays do not match their recorded shapes")
        self.channels = channels.astype(np.int64)
        self.positions = int(meta["positions"])
        self.mean_blocks = mk.to_blocks(np.asarray(mean, np.float32), _BLOCK)
        self.inv_blocks = mk.to_blocks(np.asarray(inv, np.float32), _BLOCK)
        self.valid = arrays.get("valid")

    def warm_up(self, shape: tuple[int, ...]) -> None:
        """Score zeros once (compiles or loads the kernel, touches the matrices)."""
        self.score(np.zeros(shape, np.float32))
