"""PaDiM kernels: moment accumulation and packed-inverse Mahalanobis distances against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from appliance_kernels.mahalanobis import (
    accumulate_moments,
    from_blocks,
    mahalanobis,
    mahalanobis_reference,
    pack_upper,
    packed_size,
    to_blocks,
    unpack_upper,
)


def features(t: int, c: int, p: int, seed: int) -> np.ndarray:
    """Features laid out as the backbone writes them: ``[T, C, P]`` float32, C-contiguous."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((t, c, p)) * rng.uniform(0.5, 3.0, (1, c, 1)) + 1.0).astype(np.float32)


def spd_inverses(q: int, d: int, seed: int) -> np.ndarray:
    """``q`` well-conditioned symmetric positive definite ``d x d`` inverse covariances (float64)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((q, d, d)) / np.sqrt(d)
    cov = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(d)
    return np.linalg.inv(cov)


def per_position(x: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """``[T*P, d]`` float64 vectors, position ``q = t * P + p`` (the kernels' order)."""
    t, _, p = x.shape
    return np.ascontiguousarray(x[:, channels, :].transpose(0, 2, 1).reshape(t * p, -1), np.float64)


# --- packing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 5, 40])
def test_pack_unpack_round_trip(d: int) -> None:
    mats = spd_inverses(6, d, seed=d).astype(np.float32)
    packed = pack_upper(mats)
    assert packed.shape == (6, packed_size(d)) and packed_size(d) == d * (d + 1) // 2
    np.testing.assert_array_equal(unpack_upper(packed, d), mats)
    # Row-major upper triangle: the first d values are the first row.
    np.testing.assert_array_equal(packed[:, :d], mats[:, 0, :])


def test_pack_keeps_leading_dimensions_and_unpack_symmetrises() -> None:
    rng = np.random.default_rng(0)
    packed = rng.standard_normal((2, 3, packed_size(4)))
    full = unpack_upper(packed, 4)
    assert full.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(full, full.swapaxes(-1, -2))
    np.testing.assert_array_equal(pack_upper(full), packed)


# --- accumulate_moments -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "c", "p", "d"), [(1, 8, 30, 8), (3, 40, 24, 12), (2, 152, 48, 50)])
def test_accumulate_moments_matches_numpy_sums_and_outer_products(t: int, c: int, p: int, d: int) -> None:
    rng = np.random.default_rng(t * c)
    channels = np.sort(rng.choice(c, d, replace=False)).astype(np.int64)
    sums = to_blocks(np.zeros((t * p, d)))
    outer = to_blocks(np.zeros((t * p, packed_size(d))))
    images = [features(t, c, p, seed=i) for i in range(5)]
    accumulate_moments(np.stack(images[:3]), channels, sums, outer)  # a batch of 3 ...
    accumulate_moments(np.stack(images[3:]), channels, sums, outer)  # ... then a batch of 2 on top
    vectors = np.stack([per_position(x, channels) for x in images])  # [N, T*P, d]
    np.testing.assert_allclose(from_blocks(sums, t * p), vectors.sum(0), rtol=1e-12, atol=1e-9)
    want_outer = np.einsum("nqi,nqj->qij", vectors, vectors)
    np.testing.assert_allclose(from_blocks(outer, t * p), pack_upper(want_outer), rtol=1e-12, atol=1e-9)
    assert not from_blocks(sums, sums.shape[0] * sums.shape[2])[t * p :].any()  # padding lanes stay zero


def test_accumulate_moments_adds_to_existing_values_and_handles_unsorted_repeated_channels() -> None:
    x = features(2, 10, 7, seed=1)
    channels = np.array([7, 2, 2, 9], np.int64)  # gathered in the given order, repeats allowed
    sums = to_blocks(np.full((14, 4), 5.0))
    outer = to_blocks(np.full((14, packed_size(4)), -1.0))
    accumulate_moments(x[None], channels, sums, outer)
    v = per_position(x, channels)
    np.testing.assert_allclose(from_blocks(sums, 14), 5.0 + v, rtol=1e-12)
    np.testing.assert_allclose(from_blocks(outer, 14), -1.0 + pack_upper(v[:, :, None] * v[:, None, :]), rtol=1e-12,
                               atol=1e-12)


# --- mahalanobis --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "c", "p", "d"), [(1, 16, 64, 16), (4, 152, 30, 40), (3, 60, 17, 1), (2, 20, 9, 7)])
def test_mahalanobis_matches_reference_with_a_channel_subset(t: int, c: int, p: int, d: int) -> None:
    rng = np.random.default_rng(c + d)
    channels = np.sort(rng.choice(c, d, replace=False)).astype(np.int64)
    x = features(t, c, p, seed=2)
    mean = (per_position(features(t, c, p, seed=3), channels) * 0.9).astype(np.float32)
    inv = spd_inverses(t * p, d, seed=4).astype(np.float32)
    got = mahalanobis(x, channels, mean, np.ascontiguousarray(pack_upper(inv)))
    want = mahalanobis_reference(x, channels, mean, inv)
    assert got.shape == (t, p) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_mahalanobis_reference_is_a_plain_quadratic_form() -> None:
    """The reference itself, checked on one position with a hand-built inverse (diagonal: a scaled norm)."""
    x = features(1, 3, 1, seed=5)
    channels = np.array([0, 2], np.int64)
    mean = np.array([[0.5, -1.0]], np.float32)
    inv = np.diag([4.0, 0.25]).astype(np.float32)[None]
    v = x[0, [0, 2], 0] - mean[0]
    expected = np.sqrt(4.0 * v[0] ** 2 + 0.25 * v[1] ** 2)
    np.testing.assert_allclose(mahalanobis_reference(x, channels, mean, inv)[0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(mahalanobis(x, channels, mean, np.ascontiguousarray(pack_upper(inv)))[0, 0],
                               expected, rtol=1e-5)


def test_mahalanobis_is_zero_at_the_mean_and_writes_into_out() -> None:
    x = features(2, 12, 10, seed=6)
    channels = np.arange(0, 12, 2, dtype=np.int64)
    mean = per_position(x, channels).astype(np.float32)
    inv = np.ascontiguousarray(pack_upper(spd_inverses(20, 6, seed=7).astype(np.float32)))
    out = np.full((2, 10), np.nan, np.float32)
    got = mahalanobis(x, channels, mean, inv, out=out)
    assert got is out
    np.testing.assert_allclose(out, 0.0, atol=1e-3)


def test_moments_then_inverse_reproduces_numpy_padim_distances() -> None:
    """End to end: accumulated moments -> covariance -> packed inverse -> distance, against np.cov."""
    t, c, p, d = 2, 24, 12, 6
    channels = np.array([1, 3, 8, 13, 20, 23], np.int64)
    train = [features(t, c, p, seed=10 + i) for i in range(30)]
    sums = to_blocks(np.zeros((t * p, d)))
    outer = to_blocks(np.zeros((t * p, packed_size(d))))
    for lo in range(0, len(train), 16):  # batches of 16, the last one partial
        accumulate_moments(np.stack(train[lo : lo + 16]), channels, sums, outer)
    n = len(train)
    mean = from_blocks(sums, t * p) / n
    moments = unpack_upper(from_blocks(outer, t * p), d) / n - mean[:, :, None] * mean[:, None, :]
    cov = moments * n / (n - 1) + 0.01 * np.eye(d)
    vectors = np.stack([per_position(x, channels) for x in train], 1)  # [T*P, N, d]
    want_cov = np.stack([np.cov(v, rowvar=False) for v in vectors]) + 0.01 * np.eye(d)
    np.testing.assert_allclose(cov, want_cov, rtol=1e-9, atol=1e-9)
    query = features(t, c, p, seed=99)
    inv = np.linalg.inv(cov)
    got = mahalanobis(query, channels, mean.astype(np.float32), np.ascontiguousarray(pack_upper(inv), np.float32))
    np.testing.assert_allclose(got, mahalanobis_reference(query, channels, mean, inv), rtol=1e-4)


# --- validation ---------------------------------------------------------------------------------------------------


def _setup(t: int = 2, c: int = 6, p: int = 5, d: int = 3) -> tuple:
    x = features(t, c, p, seed=0)
    channels = np.arange(d, dtype=np.int64)
    mean = np.zeros((t * p, d), np.float32)
    inv = np.ascontiguousarray(pack_upper(np.tile(np.eye(d, dtype=np.float32), (t * p, 1, 1))))
    return x, channels, mean, inv


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, ch, m, i: (x.astype(np.float64), ch, m, i), "C-contiguous float32"),
        (lambda x, ch, m, i: (np.asfortranarray(x), ch, m, i), "C-contiguous float32"),
        (lambda x, ch, m, i: (x[:, :, ::2], ch, m, i), "C-contiguous float32"),
        (lambda x, ch, m, i: (x.reshape(2, -1), ch, m, i), "C-contiguous float32"),
        (lambda x, ch, m, i: (x[:1], ch, m, i), "positions"),
        (lambda x, ch, m, i: (x, ch.astype(np.int32), m, i), "int64"),
        (lambda x, ch, m, i: (x, ch[:0], m, i), "non-empty"),
        (lambda x, ch, m, i: (x, np.array([0, 1, 6], np.int64), m, i), r"channel indices must be in \[0, 6\)"),
        (lambda x, ch, m, i: (x, np.array([-1, 1, 2], np.int64), m, i), r"channel indices must be in \[0, 6\)"),
        (lambda x, ch, m, i: (x, ch, m[:, :2], i), "do not fit 3 channels"),
        (lambda x, ch, m, i: (x, ch, m, i[:, :5]), "do not fit 3 channels"),
        (lambda x, ch, m, i: (x, ch, m.astype(np.float64), i), "must be float32"),
        (lambda x, ch, m, i: (x, ch, m, i.astype(np.float64)), "must be float32"),
    ],
)
def test_mahalanobis_validation(change, message: str) -> None:
    args = change(*_setup())
    with pytest.raises(ValueError, match=message):
        mahalanobis(*args)


@pytest.mark.parametrize(
    ("sums_shape", "outer_shape", "dtype", "message"),
    [
        ((1, 2, 16), (1, 6, 16), np.float64, r"accumulators must be \[1, 3, 16\] and \[1, 6, 16\]"),
        ((1, 3, 16), (1, 5, 16), np.float64, r"accumulators must be \[1, 3, 16\] and \[1, 6, 16\]"),
        ((1, 3, 16), (2, 6, 16), np.float64, r"accumulators must be"),
        ((1, 3, 16), (1, 6, 16), np.float32, "float64"),
        ((1, 3, 8), (1, 6, 8), np.float64, "positions"),
        ((2, 3, 16), (2, 6, 16), np.float64, "positions"),
    ],
)
def test_accumulate_moments_validation(sums_shape: tuple, outer_shape: tuple, dtype: type, message: str) -> None:
    x, channels, _, _ = _setup()
    with pytest.raises(ValueError, match=message):
        accumulate_moments(x[None], channels, np.zeros(sums_shape, dtype), np.zeros(outer_shape, dtype))


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (lambda x: x, r"features must be a C-contiguous float32 \[B, T, C, P\] batch, got float32 \(2, 6, 5\)"),
        (lambda x: x[None, None], r"\[B, T, C, P\] batch"),
        (lambda x: np.stack([x, x]).astype(np.float64), "float32"),
        (lambda x: np.stack([x, x])[:, :, :, ::-1], "C-contiguous"),
        (lambda x: np.stack([x, x, x])[::2], "C-contiguous"),
        (lambda x: np.ascontiguousarray(np.stack([x, x])[:, :1]), "positions"),
    ],
)
def test_accumulate_moments_validates_the_batch(batch, message: str) -> None:
    x, channels, _, _ = _setup()
    sums, outer = to_blocks(np.zeros((10, 3))), to_blocks(np.zeros((10, 6)))
    with pytest.raises(ValueError, match=message):
        accumulate_moments(batch(x), channels, sums, outer, positions=10)
    assert not sums.any() and not outer.any()


def test_accumulate_moments_with_an_empty_batch_changes_nothing() -> None:
    x, channels, _, _ = _setup()
    sums, outer = to_blocks(np.ones((10, 3))), to_blocks(np.ones((10, 6)))
    sums[:], outer[:] = 1, 1
    accumulate_moments(np.empty((0, *x.shape), np.float32), channels, sums, outer)
    assert (sums == 1).all() and (outer == 1).all()


def test_mahalanobis_refuses_a_too_small_out_buffer() -> None:
    x, channels, mean, inv = _setup()
    base = np.full((4, 5), -7.0, np.float32)
    out = base[:1]  # a [1, 5] C-contiguous view (the kernel needs [2, 5]); overflow stays inside `base`
    with pytest.raises(ValueError, match="out"):
        mahalanobis(x, channels, mean, inv, out=out)


def test_mahalanobis_refuses_a_one_dimensional_mean() -> None:
    x, channels, mean, inv = _setup()
    with pytest.raises(ValueError):
        mahalanobis(x, channels, mean[:, 0].copy(), inv)


def test_mahalanobis_accepts_pack_upper_output_directly() -> None:
    x, channels, mean, _ = _setup()
    inv = pack_upper(np.tile(np.eye(3, dtype=np.float32), (10, 1, 1)))
    try:
        got = mahalanobis(x, channels, mean, inv)
    except ValueError:
        return  # a clear refusal is acceptable too
    np.testing.assert_allclose(got, np.linalg.norm(x[:, :3, :], axis=1), rtol=1e-5)
