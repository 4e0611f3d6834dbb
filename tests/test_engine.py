"""The engine's seams the daemon relies on: stream order, errors, depth, per-frame thresholds, timeouts, close."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.bundle import load_bundle
from appliance.datasets import load_mvtec
from appliance.errors import ApplianceError, BackboneError, ImageError
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
