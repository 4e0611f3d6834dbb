"""PaDiM kernels: per-position Gaussian moments and Mahalanobis distances.

Features arrive as the backbone writes them, ``[T, C, P]`` (tiles, channels,
positions), and a channel subset is gathered inside the kernels, so no copy or
transpose is made per frame. Each position's inverse covariance is stored as
its packed upper triangle (row-major, ``d(d+1)/2`` values): half the memory of
a full matrix, and half the bytes to stream per frame, which is what bounds the
speed of this kernel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import config

_F = config.FASTMATH
_C = config.CACHE


def packed_size(d: int) -> int:
    """Number of values in the packed upper triangle of a ``d x d`` matrix."""
    return d * (d + 1) // 2


def pack_upper(mats: np.ndarray) -> np.ndarray:
    """``[..., d, d]`` symmetric matrices -> ``[..., d(d+1)/2]`` packed upper triangles (row-major)."""
    d = mats.shape[-1]
    rows, cols = np.triu_indices(d)
    return mats[..., rows, cols]


def unpack_upper(packed: np.ndarray, d: int) -> np.ndarray:
    """Inverse of ``pack_upper``."""
    out = np.zeros((*packed.shape[:-1], d, d), packed.dtype)
    rows, cols = np.triu_indices(d)
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out


@njit("void(float32[:, :, :, ::1], int64[::1], float64[:, ::1], float64[:, ::1])", parallel=True, fastmath=_F,
      cache=_C)
def _accumulate(x, channels, sums, outer):  # pragma: no cover - compiled
    b_count, t_count, _, p_count = x.shape
    d = channels.shape[0]
    for q in prange(t_count * p_count):
        t, p = q // p_count, q % p_count
        v = np.empty(d, np.float64)
        for b in range(b_count):  # the position's accumulators stay in cache for the whole batch
            for i in range(d):
                v[i] = x[b, t, channels[i], p]
                sums[q, i] += v[i]
            k = 0
            for i in range(d):
                vi = v[i]
                for j in range(i, d):
                    outer[q, k] += vi * v[j]
                    k += 1


@njit(
    "void(float32[:, :, ::1], int64[::1], float32[:, ::1], float32[:, ::1], float32[:, ::1])",
    parallel=True, fastmath=_F, cache=_C,
)
def _mahalanobis(x, channels, mean, inv_packed, out):  # pragma: no cover - compiled
    t_count, _, p_count = x.shape
    d = channels.shape[0]
    for q in prange(t_count * p_count):
        t, p = q // p_count, q % p_count
        v = np.empty(d, np.float32)
        for i in range(d):
            v[i] = x[t, channels[i], p] - mean[q, i]
        total = np.float32(0.0)
        k = 0
        for i in range(d):
            row = np.float32(0.0)
            for j in range(i + 1, d):
                row += inv_packed[q, k + j - i] * v[j]
            total += v[i] * (inv_packed[q, k] * v[i] + 2.0 * row)
            k += d - i
        out[t, p] = np.sqrt(max(total, np.float32(0.0)))


def _check_features(x: np.ndarray, channels: np.ndarray, positions: int) -> None:
    if x.dtype != np.float32 or x.ndim != 3 or not x.flags.c_contiguous:
        raise ValueError(f"features must be C-contiguous float32 [T, C, P], got {x.dtype} {x.shape}")
    if x.shape[0] * x.shape[2] != positions:
        raise ValueError(f"features have {x.shape[0]}x{x.shape[2]} positions, the model has {positions}")
    if channels.dtype != np.int64 or channels.ndim != 1 or not channels.size:
        raise ValueError("channels must be a non-empty int64 vector")
    if channels.min() < 0 or channels.max() >= x.shape[1]:
        raise ValueError(f"channel indices must be in [0, {x.shape[1]})")


def accumulate_moments(x: np.ndarray, channels: np.ndarray, sums: np.ndarray, outer: np.ndarray) -> None:
    """Add a batch of images' features to running per-position sums and packed outer-product sums (float64).

    Batching matters: each position's accumulators (``d(d+1)/2`` doubles) are
    read and written once per batch instead of once per image.

    Args:
        x: ``[B, T, C, P]`` float32 features of ``B`` images.
        channels: int64 indices of the channels used (PaDiM's random subset).
        sums: ``[T*P, d]`` float64, updated in place.
        outer: ``[T*P, d(d+1)/2]`` float64, updated in place.

    """
    if x.ndim != 4:
        raise ValueError(f"features must be a [B, T, C, P] batch, got shape {x.shape}")
    for image in x[:1]:
        _check_features(np.ascontiguousarray(image), channels, sums.shape[0])
    if not x.flags.c_contiguous or x.dtype != np.float32:
        raise ValueError("features must be C-contiguous float32")
    d = channels.size
    if sums.shape != (sums.shape[0], d) or outer.shape != (sums.shape[0], packed_size(d)):
        raise ValueError(f"accumulators must be [{sums.shape[0]}, {d}] and [{sums.shape[0]}, {packed_size(d)}]")
    if sums.dtype != np.float64 or outer.dtype != np.float64:
        raise ValueError("accumulators must be float64")
    _accumulate(x, channels, sums, outer)


def mahalanobis(x: np.ndarray, channels: np.ndarray, mean: np.ndarray, inv_packed: np.ndarray,
                out: np.ndarray | None = None) -> np.ndarray:
    """Mahalanobis distance of every position's feature vector to that position's Gaussian.

    Args:
        x: ``[T, C, P]`` float32 features of one image.
        channels: int64 indices of the ``d`` channels the model uses.
        mean: ``[T*P, d]`` float32 per-position means.
        inv_packed: ``[T*P, d(d+1)/2]`` float32 packed inverse covariances.
        out: optional ``[T, P]`` float32 output buffer.

    Returns:
        ``[T, P]`` float32 distances.

    """
    if mean.ndim != 2 or inv_packed.ndim != 2:
        raise ValueError(f"mean and inverse must be 2-D [T*P, d] and [T*P, d(d+1)/2], got {mean.shape}, "
                         f"{inv_packed.shape}")
    _check_features(x, channels, mean.shape[0])
    d = channels.size
    if mean.shape[1] != d or inv_packed.shape != (mean.shape[0], packed_size(d)):
        raise ValueError(f"mean/inverse shapes {mean.shape}/{inv_packed.shape} do not fit {d} channels")
    if mean.dtype != np.float32 or inv_packed.dtype != np.float32:
        raise ValueError("mean and inverse covariance must be float32")
    if out is None:
        out = np.empty((x.shape[0], x.shape[2]), np.float32)
    elif out.shape != (x.shape[0], x.shape[2]) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {(x.shape[0], x.shape[2])}, got {out.dtype} {out.shape}")
    _mahalanobis(x, channels, np.ascontiguousarray(mean), np.ascontiguousarray(inv_packed), out)
    return out


def mahalanobis_reference(x: np.ndarray, channels: np.ndarray, mean: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """Plain NumPy version of ``mahalanobis`` with full ``[T*P, d, d]`` inverses; for tests."""
    t_count, _, p_count = x.shape
    v = x[:, channels, :].transpose(0, 2, 1).reshape(t_count * p_count, -1).astype(np.float64) - mean
    d2 = np.einsum("qi,qij,qj->q", v, inv.astype(np.float64), v)
    return np.sqrt(np.maximum(d2, 0)).reshape(t_count, p_count)
