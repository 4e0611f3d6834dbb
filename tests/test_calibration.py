"""Score calibration: the logistic map, the two ways of choosing a threshold, and refusal of bad input."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from appliance.calibration import Calibration, calibrate
from appliance.errors import ConfigError


def test_threshold_maps_to_one_half_and_the_map_is_monotonic() -> None:
    cal = Calibration(threshold=10.0, scale=2.0, method="false_reject_rate", target_false_reject_rate=0.01)
    assert cal.normalise(10.0) == pytest.approx(0.5)
    raw = np.linspace(-50, 80, 200)
    out = cal.normalise(raw)
    assert out.dtype == np.float32 and ((out >= 0) & (out <= 1)).all() and (np.diff(out) >= 0).all()
    assert cal.normalise(12.0) == pytest.approx(1 / (1 + np.exp(-1)))  # one scale above: logit 1
    assert cal.normalise(1e6) == 1.0 and cal.normalise(-1e6) == 0.0  # no overflow


def test_labelled_defects_give_the_best_f1_threshold() -> None:
    good = np.array([1.0, 1.2, 1.4, 1.1, 2.5])
    defect = np.array([2.0, 3.0, 3.5])
    cal = calibrate(good, defect)
    assert cal.method == "best_f1" and cal.target_false_reject_rate is None
    # 2.0 < t <= 2.5 would reject a good image for no gain; the best cut keeps all defects or drops one.
    predicted = np.r_[good, defect] >= cal.threshold
    labels = np.r_[np.zeros(5, bool), np.ones(3, bool)]
    f1 = 2 * (predicted & labels).sum() / (predicted.sum() + labels.sum())
    assert cal.stats["f1"] == pytest.approx(f1) and f1 >= 0.85
    assert "best F1 on 5 good + 3 defect" in cal.describe()


def test_many_good_images_use_the_sample_quantile() -> None:
    good = np.random.default_rng(0).gamma(20, 0.5, 2000)  # skewed: the normal fit falls short of the tail
    cal = calibrate(good, target_false_reject_rate=0.01)
    assert cal.method == "false_reject_rate" and cal.stats["threshold_from"] == "sample quantile"
    assert cal.threshold == pytest.approx(np.quantile(good, 0.99, method="higher"), rel=1e-5)
    assert (good >= cal.threshold).mean() <= 0.01
    assert "sample quantile" in cal.describe()


def test_few_good_images_extrapolate_with_a_normal_fit() -> None:
    good = np.array([10.0, 11.0, 10.5, 9.5, 10.2, 10.8])
    cal = calibrate(good, target_false_reject_rate=0.01)
    assert cal.stats["threshold_from"] == "normal fit"
    want = good.mean() + NormalDist().inv_cdf(0.99) * good.std(ddof=1)
    assert cal.threshold == pytest.approx(want, rel=1e-5) and cal.threshold > good.max()
    # New good images from the same distribution are rejected at about the target rate, not 1 in 7.
    rng = np.random.default_rng(1)
    rates = []
    for _ in range(200):
        sample = rng.normal(10, 0.5, 6)
        threshold = calibrate(sample, target_false_reject_rate=0.01).threshold
        rates.append((rng.normal(10, 0.5, 2000) >= threshold).mean())
    assert np.mean(rates) < 0.05  # the sample maximum alone gives about 1/7
    assert "normal fit" in cal.describe()


def test_round_trip_and_bad_input() -> None:
    cal = calibrate(np.array([1.0, 2.0, 3.0, 2.5]))
    assert Calibration.from_dict(cal.to_dict()) == cal
    with pytest.raises(ConfigError, match="at least 2 held-out good images"):
        calibrate(np.array([1.0]))
    with pytest.raises(ConfigError, match="false-reject rate must be in"):
        calibrate(np.array([1.0, 2.0]), target_false_reject_rate=1.0)
    with pytest.raises(ConfigError, match="method"):
        Calibration(1.0, 1.0, "guess")
    with pytest.raises(ConfigError, match="scale"):
        Calibration(1.0, 0.0, "best_f1")
