"""PaDiM kernels: per-position Gaussian moments and Mahalanobis distances.

Features arrive as the backbone writes them, ``[T, C, P]`` (tiles, channels,
positions), and a channel subset is gathered inside the kernels, so no copy or
transpose is made per frame. Each position's inverse covariance is stored as
its packed upper triangle (row-major, ``d(d+1)/2`` values): half the memory of
a full matrix. The triangle's rows have different lengths, which defeats SIMD
within one position, so the kernels work across positions instead: blocks of
16 neighbouring positions whose matrices are interleaved (``to_blocks``), every
inner loop then a fixed-length vector operation (measured 4x faster).
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


def to_blocks(a: np.ndarray, block: int = config.POSITION_BLOCK) -> np.ndarray:
    """``[Q, m]`` per-position rows -> ``[ceil(Q/block), m, block]``, zero-padded.

    The kernels vectorise across positions: a block of ``block`` neighbouring
    positions is processed together, each coefficient of the block one contiguous
    vector, so every inner loop has the same fixed length whatever the matrix entry.
    """
    q, m = a.shape
    nb = -(-q // block)
    padded = np.zeros((nb * block, m), a.dtype)
    padded[:q] = a
    return np.ascontiguousarray(padded.reshape(nb, block, m).transpose(0, 2, 1))


def from_blocks(a: np.ndarray, positions: int) -> np.ndarray:
    """Inverse of ``to_blocks``: ``[nb, m, block]`` -> ``[positions, m]``."""
    nb, m, block = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1).reshape(nb * block, m)[:positions])


@njit(inline="always")
def _gather_block(x, channels, b, block, v):  # pragma: no cover - compiled
    """v[i, lane] = x[t, channels[i], p] for the positions of block ``b`` (0 past the last position)."""
    t_count, _, p_count = x.shape
    for lane in range(block):
        q = b * block + lane
        if q < t_count * p_count:
            t, p = q // p_count, q % p_count
            for i in range(channels.shape[0]):
                v[i, lane] = x[t, channels[i], p]
        else:
            for i in range(channels.shape[0]):
                v[i, lane] = 0.0


@njit("void(float32[:, :, :, ::1], int64[::1], float64[:, :, ::1], float64[:, :, ::1])", parallel=True,
      fastmath=_F, cache=_C)
def _accumulate(x, channels, sums, outer):  # pragma: no cover - compiled
    n_images = x.shape[0]
    d = channels.shape[0]
    block = sums.shape[2]
    for b in prange(sums.shape[0]):
        v = np.empty((d, block), np.float32)
        for n in range(n_images):  # a block's accumulators stay in cache for the whole batch of images
            _gather_block(x[n], channels, b, block, v)
            k = 0
            for i in range(d):
                for lane in range(block):
                    sums[b, i, lane] += v[i, lane]
                for j in range(i, d):
                    for lane in range(block):
                        outer[b, k, lane] += np.float64(v[i, lane]) * v[j, lane]
                    k += 1


@njit(
    "void(float32[:, :, ::1], int64[::1], float32[:, :, ::1], float32[:, :, ::1], float32[::1])",
    parallel=True, fastmath=_F, cache=_C,
)
def _mahalanobis(x, channels, mean, inv, out):  # pragma: no cover - compiled
    d = channels.shape[0]
    block = mean.shape[2]
    n_out = out.shape[0]
    for b in prange(mean.shape[0]):
        v = np.empty((d, block), np.float32)
        _gather_block(x, channels, b, block, v)
        for i in range(d):
            for lane in range(block):
                v[i, lane] -= mean[b, i, lane]
        total = np.zeros(block, np.float32)
        acc = np.empty(block, np.float32)
        k = 0
        for i in range(d):
            for lane in range(block):
                acc[lane] = 0.0
            for j in range(i + 1, d):
                for lane in range(block):
                    acc[lane] += inv[b, k + j - i, lane] * v[j, lane]
            for lane in range(block):
                total[lane] += v[i, lane] * (inv[b, k, lane] * v[i, lane] + 2.0 * acc[lane])
            k += d - i
        for lane in range(block):
            q = b * block + lane
            if q < n_out:
                out[q] = np.sqrt(max(total[lane], np.float32(0.0)))


def _check_features(x: np.ndarray, channels: np.ndarray, positions: int | None, *, batched: bool = False) -> int:
    """Check one image's ``[T, C, P]`` (or a batch's ``[B, T, C, P]``) features; returns ``T*P``."""
    what = "a C-contiguous float32 [B, T, C, P] batch" if batched else "C-contiguous float32 [T, C, P]"
    if x.dtype != np.float32 or x.ndim != (4 if batched else 3) or not x.flags.c_contiguous:
        raise ValueError(f"features must be {what}, got {x.dtype} {x.shape}")
    t, c, p = x.shape[-3:]
    if positions is not None and t * p != positions:
        raise ValueError(f"features have {t}x{p} positions, the model has {positions}")
    if channels.dtype != np.int64 or channels.ndim != 1 or not channels.size:
        raise ValueError("channels must be a non-empty int64 vector")
    if channels.min() < 0 or channels.max() >= c:
        raise ValueError(f"channel indices must be in [0, {c})")
    return t * p


def _check_blocks(nb: int, block: int, positions: int) -> None:
    """``nb`` blocks of ``block`` positions must hold ``positions`` with less than one block to spare."""
    if nb * block < positions or (nb - 1) * block >= positions:
        raise ValueError(f"the block layout has {nb} blocks of {block} positions, not {positions} positions")


def accumulate_moments(x: np.ndarray, channels: np.ndarray, sums: np.ndarray, outer: np.ndarray, *,
                       positions: int | None = None) -> None:
    """Add a batch of images' features to running per-position sums and packed outer-product sums (float64).

    Accumulators are in block layout (``to_blocks``); each block's accumulators are
    read and written once per batch of images, not once per image.

    Args:
        x: ``[B, T, C, P]`` float32 features of ``B`` images.
        channels: int64 indices of the ``d`` channels used (PaDiM's random subset).
        sums: ``[nb, d, block]`` float64, updated in place.
        outer: ``[nb, d(d+1)/2, block]`` float64, updated in place.
        positions: the model's ``T*P``, checked against the features when given.

    """
    found = _check_features(x, channels, positions, batched=True)
    d = channels.size
    nb, block = sums.shape[0], sums.shape[-1]
    _check_blocks(nb, block, found)
    if sums.shape != (nb, d, block) or outer.shape != (nb, packed_size(d), block):
        raise ValueError(f"accumulators must be [{nb}, {d}, {block}] and [{nb}, {packed_size(d)}, {block}]")
    if sums.dtype != np.float64 or outer.dtype != np.float64:
        raise ValueError("accumulators must be float64")
    _accumulate(x, channels, sums, outer)


def mahalanobis_blocked(x: np.ndarray, channels: np.ndarray, mean: np.ndarray, inv: np.ndarray, positions: int,
                        out: np.ndarray | None = None) -> np.ndarray:
    """Mahalanobis distance of every position's feature vector to that position's Gaussian.

    Args:
        x: ``[T, C, P]`` float32 features of one image.
        channels: int64 indices of the ``d`` channels the model uses.
        mean: ``[nb, d, block]`` float32 per-position means (``to_blocks`` of ``[T*P, d]``).
        inv: ``[nb, d(d+1)/2, block]`` float32 packed inverse covariances (``to_blocks``).
        positions: how many positions the model has (``T*P`` of the features it was fitted on).
        out: optional ``[T, P]`` float32 output buffer.

    Returns:
        ``[T, P]`` float32 distances.

    """
    if mean.ndim != 3 or inv.ndim != 3:
        raise ValueError(f"mean and inverse must be in block layout [nb, m, block], got {mean.shape}, {inv.shape}")
    nb, d, block = mean.shape
    _check_features(x, channels, positions)
    _check_blocks(nb, block, positions)
    if channels.size != d or inv.shape != (nb, packed_size(d), block):
        raise ValueError(f"mean/inverse shapes {mean.shape}/{inv.shape} do not fit {channels.size} channels")
    if mean.dtype != np.float32 or inv.dtype != np.float32:
        raise ValueError("mean and inverse covariance must be float32")
    if out is None:
        out = np.empty((x.shape[0], x.shape[2]), np.float32)
    elif out.shape != (x.shape[0], x.shape[2]) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {(x.shape[0], x.shape[2])}, got {out.dtype} {out.shape}")
    _mahalanobis(x, channels, np.ascontiguousarray(mean), np.ascontiguousarray(inv), out.reshape(-1))
    return out


def mahalanobis(x: np.ndarray, channels: np.ndarray, mean: np.ndarray, inv_packed: np.ndarray,
                out: np.ndarray | None = None) -> np.ndarray:
    """``mahalanobis_blocked`` for per-position ``[T*P, d]`` means and ``[T*P, d(d+1)/2]`` packed inverses.

    Converts the layout on every call: for tests and one-off use; a scorer keeps the blocks.
    """
    if mean.ndim != 2 or inv_packed.ndim != 2:
        raise ValueError(f"mean and inverse must be 2-D [T*P, d] and [T*P, d(d+1)/2], got {mean.shape}, "
                         f"{inv_packed.shape}")
    if mean.shape[0] != inv_packed.shape[0]:
        raise ValueError(f"mean has {mean.shape[0]} positions, the inverse {inv_packed.shape[0]}")
    if mean.dtype != np.float32 or inv_packed.dtype != np.float32:
        raise ValueError("mean and inverse covariance must be float32")
    return mahalanobis_blocked(x, channels, to_blocks(mean), to_blocks(inv_packed), mean.shape[0], out)


def mahalanobis_reference(x: np.ndarray, channels: np.ndarray, mean: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """Plain NumPy version of ``mahalanobis`` with full ``[T*P, d, d]`` inverses; for tests."""
    t_count, _, p_count = x.shape
    v = x[:, channels, :].transpose(0, 2, 1).reshape(t_count * p_count, -1).astype(np.float64) - mean
    d2 = np.einsum("qi,qij,qj->q", v, inv.astype(np.float64), v)
    return np.sqrt(np.maximum(d2, 0)).reshape(t_count, p_count)
