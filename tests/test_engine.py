"""The engine's seams the daemon relies on: stream order, errors, depth, per-frame thresholds, timeouts, close,
and operator feedback: learning a false reject into a PatchCore bank live, forgetting it exactly."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import appliance
from appliance.bundle import load_bundle
from appliance.datasets import load_mvtec
from appliance.engine import Engine
from appliance.errors import ApplianceError, BackboneError, ConfigError, ImageError, ScorerError
from appliance.imaging import read_image
from appliance.scorers import create
from appliance.training import FitOptions, fit
from appliance.types import Frame

SHAPE = (64, 96)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, textures) -> Path:
    root = tmp_path_factory.mktemp("engine") / "cat"
    rng = np.random.default_rng(0)
    for split, n in (("train/good", 14), ("test/good", 2)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / split / f"{i:03d}.png"), textures.good(rng, SHAPE))
    options = FitOptions(scorer="padim", height=SHAPE[0], position_norm=False)
    return fit(load_mvtec(root, calibration_fraction=0.3), root.parent / "bundle", options).bundle


@pytest.fixture()
def frames(textures) -> list[Frame]:
    rng = np.random.default_rng(1)
    return [Frame(image=textures.good(rng, SHAPE), seq=i, source=f"f{i}") for i in range(7)]


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_stream_yields_every_frame_in_order_with_the_synchronous_scores(bundle: Path, frames, depth: int) -> None:
    engine = load_bundle(bundle, streams=2)
    got = list(engine.score_stream(frames, depth=depth))
    assert [f.seq for f, _, _ in got] == list(range(7))
    for frame, score, seconds in got:
        assert score.image_score == pytest.approx(engine.score(frame.image).image_score, rel=1e-5)
        assert seconds["total"] >= seconds["scorer"] >= 0 and seconds["backbone"] > 0


def test_a_bad_frame_goes_to_on_error_and_the_stream_goes_on(bundle: Path, frames) -> None:
    engine = load_bundle(bundle)
    bad = Frame(image=np.zeros((10, 200), np.uint8), seq=99, source="wrong-aspect")
    errors: list[tuple[int, ApplianceError]] = []
    got = [f.seq for f, _, _ in engine.score_stream([*frames[:2], bad, *frames[2:]],
                                                   on_error=lambda f, e: errors.append((f.seq, e)))]
    assert got == list(range(7))
    assert [s for s, _ in errors] == [99] and isinstance(errors[0][1], ImageError)
    with pytest.raises(ImageError, match="aspect ratio differs"):
        list(engine.score_stream([bad]))  # without on_error the error is raised, never swallowed


def test_at_most_depth_frames_are_in_the_backbone(bundle: Path, frames) -> None:
    engine = load_bundle(bundle, streams=2)
    pulled = []

    def source():
        for f in frames:
            pulled.append(f.seq)
            yield f

    for depth in (1, 3):
        pulled.clear()
        stream = engine.score_stream(source(), depth=depth)
        frame, _, _ = next(stream)
        assert frame.seq == 0 and len(pulled) == depth + 1  # depth in flight, then one more after the first
        list(stream)


def test_each_frame_gets_its_own_threshold_and_source(bundle: Path, frames) -> None:
    engine = load_bundle(bundle)
    per_frame = {f.seq: (0.1 * (f.seq + 1), f"shift:{f.seq}") for f in frames}
    preds = list(engine.predict_stream(frames, threshold=lambda f: per_frame[f.seq]))
    assert [(p.decision.threshold, p.decision.threshold_source) for p in preds] == [per_frame[i] for i in range(7)]
    fixed = list(engine.predict_stream(frames[:2], threshold=0.3, source="operator"))
    assert {(p.decision.threshold, p.decision.threshold_source) for p in fixed} == {(0.3, "operator")}


def test_an_inference_that_never_finishes_is_an_error_not_a_hang(bundle: Path, frames) -> None:
    engine = load_bundle(bundle, streams=2)
    real_submit = engine.backbone.submit
    lost = {1, 4}  # fault injection: the device swallows these requests and never calls back

    def submit(batch, key, callback) -> None:
        if key not in lost:
            real_submit(batch, key, callback)

    engine.backbone.submit = submit
    engine.stream_timeout = 0.5
    errors: list[tuple[int, ApplianceError]] = []
    got = [f.seq for f, _, _ in engine.score_stream(frames, on_error=lambda f, e: errors.append((f.seq, e)))]
    assert got == [0, 2, 3, 5, 6]
    assert [seq for seq, _ in errors] == [1, 4]
    assert all(isinstance(e, BackboneError) and "did not finish within 0.5 s" in str(e) for _, e in errors)


def test_backbone_calls_of_two_threads_overlap_with_scoring(bundle: Path, frames) -> None:
    engine = load_bundle(bundle)
    results: dict[int, float] = {}

    def work(i: int) -> None:
        results[i] = engine.predict(frames[i]).score.image_score

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [0, 1, 2, 3]
    for i, value in results.items():
        assert value == pytest.approx(engine.score(frames[i].image).image_score, rel=1e-5)


def test_a_closed_engine_refuses_work(bundle: Path, frames) -> None:
    engine = load_bundle(bundle)
    engine.predict(frames[0])
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(ApplianceError, match="is closed"):
        engine.predict(frames[0])
    with pytest.raises(ApplianceError, match="is closed"):
        list(engine.score_stream(frames))


def test_a_live_source_gets_each_result_before_it_delivers_the_next_frame(bundle: Path, frames) -> None:
    """A triggered camera: the result of frame N must not wait for frame N+1 (``None``: no frame right now)."""
    engine = load_bundle(bundle, streams=2)
    results: list[int] = []

    def live():
        for frame in frames[:3]:
            yield frame
            for _ in range(2000):  # about 2 s of "nothing yet" before giving up
                if len(results) > frame.seq:
                    break
                time.sleep(0.001)
                yield None
            else:
                raise AssertionError(f"the result of frame {frame.seq} waited for the next frame")

    for frame, _, _ in engine.score_stream(live()):
        results.append(frame.seq)
    assert results == [0, 1, 2]


def test_a_display_map_peaks_at_the_image_score(bundle: Path, frames, textures) -> None:
    """An NG verdict always has a region at or above the threshold on the overlay (smoothing lowers small peaks)."""
    engine = load_bundle(bundle)
    image, _ = textures.blob(frames[0].image, (40, 30), radius=3)
    pred = engine.predict(image)
    shown = engine.anomaly_map(pred.score, match_peak=True)
    plain = engine.anomaly_map(pred.score)
    assert shown.max() == pytest.approx(pred.decision.score, abs=1e-4)
    assert plain.max() < shown.max()  # the smoothed map alone would have shown less than the verdict's score
    raw_shown = engine.anomaly_map(pred.score, normalised=False, match_peak=True)
    raw_plain = engine.anomaly_map(pred.score, normalised=False)
    assert raw_shown.max() == pytest.approx(pred.score.image_score, rel=1e-5)
    assert np.argmax(raw_shown) == np.argmax(raw_plain)  # same shape: the peak stays where it was


# --- operator feedback: learning a false reject live ------------------------------------------------------------------

SAMPLE = Path(appliance.__file__).parent / "samples" / "ball_screw"


@pytest.fixture(scope="module")
def patchcore_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small PatchCore bundle on the bundled ball-screw sample (96 px high, position norm on 24 held-out images)."""
    out = tmp_path_factory.mktemp("patchcore") / "bundle"
    dataset = load_mvtec(SAMPLE, calibration_fraction=0.2)
    return fit(dataset, out, FitOptions(height=96, settings={"coreset_ratio": 0.1})).bundle


@pytest.fixture(scope="module")
def sample_images() -> dict[str, list[np.ndarray]]:
    return {kind: [read_image(p) for p in sorted((SAMPLE / "test" / kind).glob("*.jpg"))]
            for kind in ("good", "pitting")}


def normalised(engine: Engine, image: np.ndarray) -> float:
    return engine.calibration.normalise(engine.score(image).image_score)


def false_reject(engine: Engine, goods: list[np.ndarray]) -> np.ndarray:
    """The good test image that scores highest: above the bundle's threshold in this small model."""
    worst = max(goods, key=lambda g: normalised(engine, g))
    assert normalised(engine, worst) > 0.5  # a false reject
    return worst


def near_duplicates(image: np.ndarray) -> dict[str, np.ndarray]:
    """The same part a moment later: 3 % brighter or darker, moved by 2 px, with sensor noise."""
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    moved = cv2.warpAffine(image, np.float32([[1, 0, 2], [0, 1, 1]]), (w, h), borderMode=cv2.BORDER_REPLICATE)
    noisy = np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
    return {"brighter": np.clip(image * 1.03, 0, 255).astype(np.uint8),
            "darker": (image * 0.97).astype(np.uint8), "moved_2px": moved, "noise": noisy}


def test_a_learned_false_reject_scores_below_target_at_once_and_its_near_duplicates_move_down(
        patchcore_bundle: Path, sample_images) -> None:
    engine = load_bundle(patchcore_bundle)
    image = false_reject(engine, sample_images["good"])
    before = normalised(engine, image)
    twins = near_duplicates(image)
    twins_before = {k: normalised(engine, v) for k, v in twins.items()}
    others = [normalised(engine, g) for g in sample_images["pitting"]]
    identity = engine.bank_identity()
    assert identity == engine.base_identity()

    learned = engine.learn_good(image, "label-1", target=0.45)
    after = normalised(engine, image)
    assert after < 0.45 and after == learned.score_after
    assert learned.score_before == pytest.approx(before, abs=1e-6)
    n = learned.rows.shape[0]
    assert n >= 1 and learned.rows.dtype == np.float16 and learned.positions.shape == (n,)
    assert engine.scorer.learned_rows == n and engine.learned == [learned]
    assert engine.bank_identity() != identity
    twins_after = {k: normalised(engine, v) for k, v in twins.items()}
    print(f"false reject {before:.3f} -> {after:.3f} with {n} rows; near duplicates "
          + ", ".join(f"{k} {twins_before[k]:.3f} -> {twins_after[k]:.3f}" for k in twins))
    for k in twins:
        assert twins_after[k] <= twins_before[k] + 1e-9, k
    assert sum(twins_after[k] < 0.5 for k in twins) >= 3  # most near duplicates are no longer rejected
    # Rows only bring neighbours nearer, and the defects are elsewhere: they still score as defects.
    assert [normalised(engine, g) for g in sample_images["pitting"]] == pytest.approx(others, abs=0.05)

    again = engine.learn_good(image, "label-2", target=0.45)  # already below: nothing to add
    assert again.rows.shape[0] == 0 and again.score_before == again.score_after == pytest.approx(after)
    with pytest.raises(ScorerError, match="learned already"):
        engine.learn_good(image, "label-1")
    with pytest.raises(ConfigError, match=r"in \(0, 1\)"):
        engine.learn_good(image, "label-3", target=1.0)


def test_forget_restores_every_score_exactly(patchcore_bundle: Path, sample_images) -> None:
    engine = load_bundle(patchcore_bundle)
    probe = sample_images["good"][::3] + sample_images["pitting"][::4]
    image = false_reject(engine, sample_images["good"])
    second = np.clip(sample_images["good"][4] * 1.15, 0, 255).astype(np.uint8)  # a lighting change
    base = [engine.score(p).image_score for p in [*probe, image, second]]
    identity = engine.bank_identity()

    engine.learn_good(image, "a", target=0.45)
    with_a = [engine.score(p).image_score for p in [*probe, image, second]]
    with_a_identity = engine.bank_identity()
    b = engine.learn_good(second, "b", target=min(0.3, normalised(engine, second) * 0.5))
    assert b.rows.shape[0] >= 1
    assert [engine.score(p).image_score for p in [*probe, image, second]] != with_a

    engine.forget("b")  # the last one: back to the state with "a" only, float for float
    assert [engine.score(p).image_score for p in [*probe, image, second]] == with_a
    assert engine.bank_identity() == with_a_identity and [e.entry_id for e in engine.learned] == ["a"]
    engine.forget("a")
    assert [engine.score(p).image_score for p in [*probe, image, second]] == base
    assert engine.bank_identity() == identity and engine.learned == [] and engine.scorer.learned_rows == 0
    with pytest.raises(ScorerError, match="no learned entry 'a'"):
        engine.forget("a")

    # Forgetting one in the middle leaves what replaying the others alone gives.
    a = engine.learn_good(image, "a", target=0.45)
    b = engine.learn_good(second, "b", target=0.3)
    c = engine.learn_good(np.clip(sample_images["good"][7] * 1.15, 0, 255).astype(np.uint8), "c", target=0.3)
    t0 = time.perf_counter()
    engine.forget("b")
    print(f"forget with {engine.scorer.bank.shape[0]} rows: {time.perf_counter() - t0:.3f} s")
    replayed = load_bundle(patchcore_bundle)
    replayed.apply_learned([a, c])
    assert [engine.score(p).image_score for p in probe] == [replayed.score(p).image_score for p in probe]
    assert engine.bank_identity() == replayed.bank_identity()
    assert b.rows.shape[0] >= 1


def test_scoring_beside_learning_and_forgetting_sees_the_bank_before_or_after(patchcore_bundle: Path,
                                                                               sample_images) -> None:
    """Another thread scores frames all along: every score is the bank's before or after, never a mixture."""
    engine = load_bundle(patchcore_bundle)
    image = false_reject(engine, sample_images["good"])
    frames = [image, *near_duplicates(image).values(), sample_images["good"][0], sample_images["pitting"][0]]
    before = [engine.score(f).image_score for f in frames]
    seen: list[tuple[int, float]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def score_loop() -> None:
        try:
            while not stop.is_set():
                for i, f in enumerate(frames):
                    seen.append((i, engine.score(f).image_score))
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=score_loop)
    thread.start()
    try:
        time.sleep(0.2)
        engine.learn_good(image, "x", target=0.45)
        mark = len(seen)
        after = [engine.score(f).image_score for f in frames]
        while len(seen) < mark + 2 * len(frames) and thread.is_alive():
            time.sleep(0.01)
        learned_seen = list(seen[mark:])
        engine.forget("x")
        mark = len(seen)
        while len(seen) < mark + len(frames) and thread.is_alive():
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert after[0] < before[0]
    for i, value in seen:
        assert value in (before[i], after[i]), (i, value, before[i], after[i])
    # Every frame scored after learn_good returned used the new rows (the first may have begun before).
    assert all(value == after[i] for i, value in learned_seen[1:])
    assert all(value == before[i] for i, value in seen[mark + 1:])


def test_the_delta_cap_asks_for_a_rebuild(patchcore_bundle: Path, sample_images) -> None:
    engine = load_bundle(patchcore_bundle)
    assert engine.max_learned_rows == 1000  # 5 % of a small bank is less than the floor
    small = create("patchcore", engine.scorer.config.__dict__ | {"max_learned_rows": 1})
    small.load_state(*engine.scorer.state())
    engine.scorer = small
    lit = np.clip(sample_images["good"][2] * 1.3, 0, 255).astype(np.uint8)
    with pytest.raises(ScorerError, match=r"the bank delta is full.*rebuild is due"):
        engine.learn_good(lit, "big", target=0.05)
    assert engine.learned == [] and engine.scorer.learned_rows == 0  # nothing half done


def test_padim_learns_at_the_next_rebuild(bundle: Path, frames) -> None:
    engine = load_bundle(bundle)
    with pytest.raises(ScorerError, match=r"PaDiM learns at the next rebuild: .* fit the model again"):
        engine.learn_good(frames[0].image, "p")
    assert engine.max_learned_rows == 0 and engine.learned == []
    engine.apply_learned([])  # nothing to replay is no error
