"""Per-position score normalisation: statistics, leave-one-out, masking and refusal of bad input."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.errors import ConfigError
from appliance.position_norm import MIN_IMAGES, SPREAD_FLOOR, PositionNorm


def maps(n: int = 9, seed: int = 0) -> np.ndarray:
    """Good-image patch maps ``[n, 2, 3, 4]`` whose mean and spread differ by position."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(1, 5, (2, 3, 4))
    spread = rng.uniform(0.5, 2, (2, 3, 4))
    return (level + spread * rng.standard_normal((n, 2, 3, 4))).astype(np.float32)


def test_fit_gives_per_position_mean_and_sample_spread() -> None:
    m = maps()
    norm = PositionNorm.fit(m)
    assert norm.images == 9 and norm.mean.dtype == norm.scale.dtype == np.float32
    np.testing.assert_allclose(norm.mean, m.astype(np.float64).mean(0), rtol=1e-6)
    std = m.astype(np.float64).std(0, ddof=1)
    np.testing.assert_allclose(norm.scale, np.maximum(std, SPREAD_FLOOR * np.median(std)), rtol=1e-5)


def test_flat_positions_get_the_floor_not_a_tiny_spread() -> None:
    m = maps()
    m[:, 0, 0, 0] = 3.0  # identical on every good image
    norm = PositionNorm.fit(m)
    std = m.astype(np.float64).std(0, ddof=1)
    assert norm.scale[0, 0, 0] == pytest.approx(SPREAD_FLOOR * np.median(std), rel=1e-5)
    # A small change there is a modest score, not a blow-up.
    patches = norm.mean.copy()
    patches[0, 0, 0] += 0.1
    assert 0 < norm.apply(patches)[0, 0, 0] < 1


def test_leave_one_out_equals_fitting_without_that_image() -> None:
    m = maps(7)
    for i, norm in enumerate(PositionNorm.leave_one_out(m)):
        ref = PositionNorm.fit(np.delete(m, i, axis=0))
        assert norm.images == 6
        np.testing.assert_allclose(norm.mean, ref.mean, rtol=1e-5)
        np.testing.assert_allclose(norm.scale, ref.scale, rtol=1e-4)


def test_an_image_scores_higher_against_the_others_than_against_itself() -> None:
    m = maps(8, seed=3)
    full = PositionNorm.fit(m)
    inside = [full.apply(x).max() for x in m]
    held_out = [norm.apply(x).max() for norm, x in zip(PositionNorm.leave_one_out(m), m, strict=True)]
    assert np.mean(held_out) > np.mean(inside)


def test_apply_and_key_agree_and_busy_positions_are_tamed() -> None:
    m = maps()
    norm = PositionNorm.fit(m)
    patches = m[0] + 0.0
    z = norm.apply(patches)
    np.testing.assert_allclose(z, (patches - norm.mean) / norm.scale, rtol=1e-6)
    rows = np.array([0, 5, 23])
    np.testing.assert_allclose(norm.key(patches.reshape(-1)[rows], rows), z.reshape(-1)[rows], rtol=1e-6)
    np.testing.assert_allclose(norm.raw(1.5, rows), norm.mean.reshape(-1)[rows] + 1.5 * norm.scale.reshape(-1)[rows])
    np.testing.assert_allclose(norm.key(norm.raw(1.5, rows), rows), 1.5, rtol=1e-5)
    # A raw value that is ordinary at a busy position but high at a quiet one ranks as the quiet one says.
    busy, quiet = np.unravel_index(np.argmax(norm.mean), m.shape[1:]), np.unravel_index(np.argmin(norm.mean),
                                                                                           m.shape[1:])
    probe = norm.mean.copy()
    probe[busy] = norm.mean[busy]  # exactly typical where it is busy
    probe[quiet] = norm.mean[quiet] + 4 * norm.scale[quiet]
    assert np.unravel_index(int(np.argmax(norm.apply(probe))), m.shape[1:]) == quiet


def test_outside_the_valid_area_is_never_the_maximum() -> None:
    m = maps()
    valid = np.ones((2, 3, 4), bool)
    valid[1] = False
    m[:, 1] = 0.0  # scorers zero the patches outside the valid area
    norm = PositionNorm.fit(m, valid)
    # The floor comes from the valid positions' spreads only.
    std = m.astype(np.float64).std(0, ddof=1)
    assert norm.scale[1].min() == pytest.approx(SPREAD_FLOOR * np.median(std[0]), rel=1e-5)
    z = norm.apply(m[0] - 3.0, valid)  # every valid patch well below normal
    assert (z[1] == z[0].min()).all() and z.max() == z[0].max()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PositionNorm.fit(maps(MIN_IMAGES - 1)), "at least 3 good maps"),
        (lambda: PositionNorm.fit(maps()[:, 0]), r"\[N, T, h, w\]"),
        (lambda: PositionNorm.leave_one_out(maps(MIN_IMAGES)), "at least 4 maps"),
        (lambda: PositionNorm(np.zeros((1, 2, 2), np.float32), np.ones((1, 2, 3), np.float32), 5), "one"),
        (lambda: PositionNorm(np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 2), np.float32), 5), "> 0"),
        (lambda: PositionNorm(np.full((1, 2, 2), np.nan, np.float32), np.ones((1, 2, 2), np.float32), 5), "finite"),
    ],
)
def test_bad_statistics_are_refused(build, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()
