"""Drift watch: window tests against scipy and on synthetic shifts, hysteresis, the baseline in a real bundle."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom, ks_2samp

import appliance
from appliance import bundle as bundle_module
from appliance.bundle import MANIFEST, load_bundle, load_drift_baseline
from appliance.datasets import load_mvtec
from appliance.drift import (
    MAX_COMPONENTS,
    MIN_BASELINE,
    MIN_WINDOW,
    MMD_MAX_FRAMES,
    VARIANCE_KEPT,
    DriftBaseline,
    DriftState,
    WindowResult,
    mmd_test,
    step,
    window_test,
)
from appliance.errors import BundleError
from appliance.imaging import read_image
from appliance.training import FitOptions, FitReport, fit

SAMPLE = Path(appliance.__file__).parent / "samples" / "ball_screw"
C = 40
#: Standard deviations of the synthetic embedding's independent axes.
SPREADS = np.geomspace(3.0, 0.05, C)


def synthetic(rng: np.random.Generator, n: int, shift: np.ndarray | float = 0.0, score_shift: float = 0.0
              ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` embeddings ``[n, C]`` (independent normal axes of spread ``SPREADS``) and raw scores ``[n]``."""
    x = rng.normal(size=(n, C)) * SPREADS + shift
    return x.astype(np.float32), rng.normal(1.0, 0.2, n) + score_shift


def baseline_of(rng: np.random.Generator, n: int = 60, train: int = 300) -> DriftBaseline:
    """Axes from ``train`` training embeddings, ``n`` calibration images as the reference."""
    return DriftBaseline.fit(synthetic(rng, train)[0], *synthetic(rng, n))


def within_binomial(count: int, trials: int, p: float) -> bool:
    """``count`` is inside the central 99.8 % of Binomial(trials, p)."""
    return binom.ppf(0.001, trials, p) <= count <= binom.ppf(0.999, trials, p)


# --- baseline --------------------------------------------------------------------------------------------------------


def test_baseline_keeps_the_fewest_training_components_for_the_variance_rule() -> None:
    rng = np.random.default_rng(1)
    train = synthetic(rng, 300)[0]
    x, s = synthetic(rng, 60)
    base = DriftBaseline.fit(train, x, s)
    k = len(base.explained)
    centred = train.astype(np.float64) - train.mean(axis=0, dtype=np.float64)
    eig = np.sort(np.linalg.eigvalsh(centred.T @ centred))[::-1]
    share = np.cumsum(eig / eig.sum())
    assert k == min(int(np.argmax(share >= VARIANCE_KEPT)) + 1, MAX_COMPONENTS)
    assert share[k - 2] < VARIANCE_KEPT <= share[k - 1]
    np.testing.assert_allclose(base.components @ base.components.T, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(base.explained, (eig / eig.sum())[:k], rtol=1e-9)  # largest first
    np.testing.assert_allclose(base.mean, centred.mean(axis=0) + train.mean(axis=0, dtype=np.float64))
    np.testing.assert_allclose(base.projected, base.project(x))  # the reference: the calibration images
    np.testing.assert_array_equal(base.scores, s)
    assert base.size == 60 and base.channels == C


def test_components_are_capped_at_max_and_at_n_minus_one() -> None:
    rng = np.random.default_rng(2)
    flat = rng.normal(size=(200, C))  # isotropic: 90 % of the variance needs most axes
    reference = flat[:MIN_BASELINE], np.zeros(MIN_BASELINE)
    assert len(DriftBaseline.fit(flat, *reference).explained) == MAX_COMPONENTS
    assert len(DriftBaseline.fit(flat[:6], *reference).explained) == 5


def test_baseline_refuses_too_few_images_and_bad_shapes() -> None:
    rng = np.random.default_rng(3)
    train = synthetic(rng, 100)[0]
    x, s = synthetic(rng, MIN_BASELINE - 1)
    with pytest.raises(ValueError, match=f"at least {MIN_BASELINE} needed"):
        DriftBaseline.fit(train, x, s)
    x, s = synthetic(rng, 20)
    with pytest.raises(ValueError, match=r"calibration embeddings \[n, C\] and scores \[n\] expected"):
        DriftBaseline.fit(train, x, s[:-1])
    with pytest.raises(ValueError, match=r"calibration embeddings \[n, C\]"):
        DriftBaseline.fit(train[:, :-1], x, s)
    arrays = DriftBaseline.fit(train, x, s).arrays()
    with pytest.raises(ValueError, match="inconsistent shapes"):
        DriftBaseline.from_arrays({**arrays, "mean": arrays["mean"][:-1]})


# --- window test -----------------------------------------------------------------------------------------------------


def test_ks_path_is_scipys_ks_with_bonferroni() -> None:
    rng = np.random.default_rng(4)
    train = synthetic(rng, 300)[0]
    cal_x, cal_s = synthetic(rng, 60)
    base = DriftBaseline.fit(train, cal_x, cal_s)
    x, s = synthetic(rng, 100, shift=0.3 * SPREADS, score_shift=0.05)
    result = window_test(base, x, s, alpha=0.01, method="ks")
    mean = train.astype(np.float64).mean(axis=0)
    ref_cal, ref_win = (cal_x - mean) @ base.components.T, (x - mean) @ base.components.T
    per_component = [ks_2samp(ref_win[:, j], ref_cal[:, j]) for j in range(len(base.explained))]
    p = [r.pvalue for r in per_component]
    assert result.score_p == pytest.approx(ks_2samp(s, cal_s).pvalue, rel=1e-9)
    assert result.score_statistic == pytest.approx(ks_2samp(s, cal_s).statistic)
    assert result.component == int(np.argmin(p))
    assert result.embedding_p == pytest.approx(min(1.0, len(p) * min(p)), rel=1e-9)
    assert result.embedding_statistic == pytest.approx(max(r.statistic for r in per_component))
    assert result.p_value == pytest.approx(min(1.0, 2 * min(result.score_p, result.embedding_p)))
    assert result.significant == (result.p_value <= 0.01)
    assert (result.size, result.baseline_size, result.method) == (100, 60, "ks")
    assert result.score_shift == pytest.approx(s.mean() - cal_s.mean())
    assert result.cpu_ms > 0


@pytest.mark.parametrize("method", ["ks", "mmd"])
def test_a_known_shift_is_detected(method: str) -> None:
    rng = np.random.default_rng(5)
    base = baseline_of(rng)
    on_scores = window_test(base, *synthetic(rng, 100, score_shift=0.4), method=method)  # two score sds
    assert on_scores.significant and on_scores.score_p < 1e-4 and on_scores.score_shift == pytest.approx(0.4, abs=0.1)
    on_embedding = window_test(base, *synthetic(rng, 100, shift=SPREADS), method=method)  # one sd on every axis
    assert on_embedding.significant and on_embedding.embedding_p <= 0.002
    assert window_test(base, *synthetic(rng, 100), method=method).p_value > 0.01


@pytest.mark.parametrize("method", ["ks", "mmd"])
def test_null_p_values_are_roughly_uniform(method: str) -> None:
    """Each trial draws its own baseline: conditional on one baseline, windows' p-values are not independent."""
    rng = np.random.default_rng(6)
    trials = 200
    results = [window_test(baseline_of(rng), *synthetic(rng, 100), alpha=0.05, method=method) for _ in range(trials)]
    for p in ([r.score_p for r in results], [r.embedding_p for r in results] if method == "mmd" else None):
        if p is not None:  # Bonferroni over the components makes the KS path's embedding p-value conservative
            for level in (0.05, 0.2, 0.5):
                assert within_binomial(int(np.sum(np.array(p) <= level)), trials, level), level
    assert np.sum([r.significant for r in results]) <= binom.ppf(0.999, trials, 0.05)


def test_a_shift_in_one_of_sixteen_components_survives_the_correction() -> None:
    """Components given (the first 16 axes), so that the shifted one is known."""
    rng = np.random.default_rng(7)
    calibration = rng.normal(size=(60, C))
    axes = np.eye(16, C)
    base = DriftBaseline(np.zeros(C), axes, np.full(16, 1 / C), calibration @ axes.T, rng.normal(size=60))
    window = rng.normal(size=(100, C))
    window[:, 10] += 1.5  # 1.5 sd along the 11th component only
    result = window_test(base, window, rng.normal(size=100), method="ks")
    assert result.significant and result.component == 10 and result.component_shift == pytest.approx(1.5, abs=0.35)
    assert result.embedding_p < 0.005 and result.score_p > 0.01  # found in the embedding, after a x16 correction


@pytest.mark.parametrize("method", ["ks", "mmd"])
def test_family_wise_false_positives_are_bounded_with_many_components(method: str) -> None:
    rng = np.random.default_rng(8)
    spreads = np.geomspace(2.0, 1.0, C)
    trials, alpha = 200, 0.05
    flagged = 0
    for _ in range(trials):
        base = DriftBaseline.fit(rng.normal(size=(300, C)) * spreads, rng.normal(size=(60, C)) * spreads,
                                 rng.normal(size=60))
        assert len(base.explained) == MAX_COMPONENTS
        window = rng.normal(size=(100, C)) * spreads
        flagged += window_test(base, window, rng.normal(size=100), alpha=alpha, method=method).significant
    assert flagged <= binom.ppf(0.999, trials, alpha)


def test_axes_fitted_on_the_reference_itself_would_flag_windows_without_drift() -> None:
    """Why the axes come from the training images: in-sample projections spread wider than a new frame's."""
    rng = np.random.default_rng(12)
    spreads = np.geomspace(3.0, 0.05, 152)  # as many channels as the backbone's, most of them carrying variance
    flagged = {"separate": 0, "in-sample": 0}
    for _ in range(50):
        train, x = rng.normal(size=(300, 152)) * spreads, rng.normal(size=(56, 152)) * spreads
        s, window, ws = rng.normal(size=56), rng.normal(size=(100, 152)) * spreads, rng.normal(size=100)
        flagged["separate"] += window_test(DriftBaseline.fit(train, x, s), window, ws, method="mmd").significant
        flagged["in-sample"] += window_test(DriftBaseline.fit(x, x, s), window, ws, method="mmd").significant
    assert flagged["separate"] <= binom.ppf(0.999, 50, 0.01) and flagged["in-sample"] >= 15, flagged


def test_window_refuses_short_windows_and_wrong_shapes() -> None:
    rng = np.random.default_rng(9)
    base = baseline_of(rng)
    x, s = synthetic(rng, MIN_WINDOW - 1)
    with pytest.raises(ValueError, match=f"at least {MIN_WINDOW} frames, got {MIN_WINDOW - 1}"):
        window_test(base, x, s)
    x, s = synthetic(rng, 100)
    with pytest.raises(ValueError, match=rf"embeddings \[100, {C}\] and scores \[100\] expected"):
        window_test(base, x[:, :-1], s)
    with pytest.raises(ValueError, match="unknown drift test"):
        window_test(base, x, s, method="kl")
    s[3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        window_test(base, x, s)


def test_mmd_is_the_biased_estimate_with_a_permutation_p_value() -> None:
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=(40, 3)) + 0.1
    z = np.concatenate([x, y])
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    k = np.exp(-d2 / np.median(d2[np.triu_indices(70, 1)]))
    expected = k[:30, :30].mean() + k[30:, 30:].mean() - 2 * k[:30, 30:].mean()
    stat, p = mmd_test(x, y, permutations=199)
    assert stat == pytest.approx(expected, rel=1e-9)
    assert 1 / 200 <= p <= 1 and (stat, p) == mmd_test(x, y, permutations=199)  # pure: same answer twice
    assert mmd_test(x, y + 1.0, permutations=199)[1] == pytest.approx(1 / 200)


def test_mmd_path_tests_the_whitened_components_and_caps_long_windows() -> None:
    rng = np.random.default_rng(13)
    base = baseline_of(rng)
    x, s = synthetic(rng, 120)
    scale = base.projected.std(axis=0, ddof=1)
    result = window_test(base, x, s)
    assert result.method == "mmd"
    assert (result.embedding_statistic, result.embedding_p) == mmd_test(base.project(x) / scale, base.projected / scale)
    long_x, long_s = synthetic(rng, 4 * MMD_MAX_FRAMES)  # tested on a fixed subset of MMD_MAX_FRAMES frames
    assert not window_test(base, long_x, long_s).significant
    assert window_test(base, long_x + 0.5 * SPREADS, long_s).embedding_p <= 0.002


# --- hysteresis ------------------------------------------------------------------------------------------------------


def result(significant: bool) -> WindowResult:
    p = 0.001 if significant else 0.5
    return WindowResult(size=100, baseline_size=60, method="ks", alpha=0.01, p_value=p, significant=significant,
                        score_p=p, score_statistic=0.1, score_shift=0.0, embedding_p=p, embedding_statistic=0.1,
                        component=0, component_shift=0.0)


@pytest.mark.parametrize(("raise_after", "clear_after"), [(1, 1), (2, 2), (3, 2)])
def test_hysteresis_raises_and_clears_after_exactly_n_windows(raise_after: int, clear_after: int) -> None:
    state = DriftState()
    sequence = [True] * (raise_after - 1) + [False] + [True] * raise_after + [False] * (clear_after + 1)
    raised = []
    for i, significant in enumerate(sequence, 1):
        state = step(state, result(significant), raise_after, clear_after, at=float(i))
        raised.append(state.raised)
        assert state.windows == i and state.last == result(significant)
    flip_on = raise_after + raise_after  # the interrupted first run did not count
    flip_off = flip_on + clear_after
    assert raised == [flip_on <= i < flip_off for i in range(1, len(sequence) + 1)]
    assert not state.raised and state.since == flip_off and state.since_time == float(flip_off)
    assert state.significant_run == 0 and state.clean_run == clear_after + 1


def test_hysteresis_records_since_when_and_the_change() -> None:
    state = step(step(DriftState(), result(True), at=10.0), result(True), at=20.0)
    assert state.raised and state.changed and state.since == 2 and state.since_time == 20.0
    state = step(state, result(True), at=30.0)
    assert state.raised and not state.changed and state.since_time == 20.0 and state.significant_run == 3
    state = step(state, result(False), at=40.0)
    assert state.raised and state.clean_run == 1 and state.significant_run == 0
    with pytest.raises(ValueError, match="must be >= 1"):
        step(state, result(True), raise_after=0)


# --- the baseline in a real bundle -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_fit(tmp_path_factory: pytest.TempPathFactory) -> FitReport:
    """PaDiM at 128 px on the bundled ball-screw sample, 24 good images held out (as ``appliance demo``)."""
    base = tmp_path_factory.mktemp("drift")
    options = FitOptions(scorer="padim", height=128, cache_dir=str(base / "cache"))
    return fit(load_mvtec(SAMPLE, calibration_fraction=0.2), base / "model", options)


def reseal(path: Path, manifest: dict, key: bytes | None = None) -> None:
    manifest["digest"] = hashlib.sha256(bundle_module._canonical(manifest)).hexdigest()
    if key:
        manifest["signature"] = hmac.new(key, bundle_module._canonical(manifest), hashlib.sha256).hexdigest()
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


def test_baseline_round_trips_through_the_bundle_and_matches_the_engine(sample_fit: FitReport) -> None:
    engine = sample_fit.engine
    record = engine.manifest["drift"]
    assert record["images"] == 24 and record["channels"] == 152
    assert set(record["arrays"].values()) <= set(engine.manifest["files"])
    loaded = load_drift_baseline(sample_fit.bundle, engine.manifest)
    for name, array in sample_fit.drift.arrays().items():
        np.testing.assert_array_equal(loaded.arrays()[name], array, err_msg=name)
    dataset = load_mvtec(SAMPLE, calibration_fraction=0.2)
    train = np.stack([engine.score(read_image(s.path)).embedding for s in dataset.train])
    scored = [engine.score(read_image(s.path)) for s in dataset.calibration if s.label == "good"]
    embeddings = np.stack([s.embedding for s in scored])
    assert embeddings.dtype == np.float32 and embeddings.shape == (24, 152) and train.shape == (96, 152)
    refit = DriftBaseline.fit(train, embeddings, loaded.scores)  # the engine's embeddings give the same baseline
    for name, array in refit.arrays().items():
        np.testing.assert_array_equal(loaded.arrays()[name], array, err_msg=name)
    assert list(loaded.scores) == sample_fit.calibration_scores["good"]  # leave-one-out, as an unseen image's
    in_sample = np.array([s.image_score for s in scored])  # with a norm they took part in: biased low
    assert np.median(in_sample) < np.median(loaded.scores)
    assert engine.manifest["training"]["drift"] == loaded.describe()


def test_a_window_of_the_calibration_frames_is_not_drift(sample_fit: FitReport) -> None:
    """The baseline's own frames, repeated to a window: consistent with it, whatever their order."""
    base = sample_fit.drift
    rng = np.random.default_rng(11)
    rows = rng.permutation(np.resize(np.arange(base.size), 3 * base.size))
    embeddings = base.mean + base.projected @ base.components  # back from component coordinates (in their span)
    assert not window_test(base, embeddings[rows], base.scores[rows], min_window=50).significant


def test_an_old_bundle_without_a_baseline_loads(sample_fit: FitReport, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sample_fit.bundle, tmp_path / "v4"))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["format_version"] = 4
    for rel in manifest.pop("drift")["arrays"].values():
        del manifest["files"][rel]
    shutil.rmtree(copy / "drift")
    reseal(copy, manifest, key=b"k")  # signed without a drift key: reading it as None must not break the signature
    engine = load_bundle(copy, cache_dir=tmp_path / "cache", key=b"k")
    assert engine.manifest["drift"] is None and load_drift_baseline(copy, engine.manifest) is None
    assert engine.score(read_image(sorted((SAMPLE / "test" / "good").glob("*.jpg"))[0])).embedding.shape == (152,)


def test_a_format_5_manifest_without_its_drift_record_is_refused(sample_fit: FitReport, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sample_fit.bundle, tmp_path / "b"))
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["drift"]
    reseal(copy, manifest)
    with pytest.raises(BundleError, match="format 5 manifest has no drift record"):
        load_bundle(copy, check_golden=False)


def test_a_resealed_baseline_of_another_width_is_refused(sample_fit: FitReport, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sample_fit.bundle, tmp_path / "b"))
    manifest = json.loads((copy / MANIFEST).read_text())
    baseline = sample_fit.drift
    for name, array in baseline.arrays().items():
        rel = manifest["drift"]["arrays"][name]
        np.save(copy / rel, array[..., :100] if name in ("mean", "components") else array, allow_pickle=False)
        manifest["files"][rel] = {"sha256": bundle_module._sha256(copy / rel), "bytes": (copy / rel).stat().st_size}
    reseal(copy, manifest)
    with pytest.raises(BundleError, match="drift baseline is for 100 embedding channels, the backbone gives 152"):
        load_bundle(copy, check_golden=False)
