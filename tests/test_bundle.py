"""Bundles end to end: fit on a tiny MVTec-style dataset, load, and refuse every kind of tampering."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance import bundle as bundle_module
from appliance.bundle import FORMAT_VERSION, MANIFEST, load_bundle, pack, verify_files
from appliance.datasets import Dataset, load_mvtec
from appliance.errors import BundleError, DatasetError, ImageError
from appliance.imaging import read_image
from appliance.position_norm import PositionNorm
from appliance.training import FitOptions, FitReport, fit, in_order

SHAPE = (96, 160)
TRAIN = 20
KEY = b"line-7 secret"
OPTIONS = FitOptions(height=96, settings={"coreset_ratio": 0.1}, golden=3, position_norm_min_images=5)


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def make_category(root: Path, textures, corrupt: str | None = "005_corrupt.png", seed: int = 0) -> Path:
    """train/good (20 + an unreadable file: under the 5 % a fit tolerates), validation/{good (5),blob} with masks,
    test/{good,blob} with masks."""
    rng = np.random.default_rng(seed)
    for i in range(TRAIN):
        write_rgb(root / "train" / "good" / f"{i:03d}.png", textures.good(rng, SHAPE))
    if corrupt:
        (root / "train" / "good" / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    centres = [(40, 30), (120, 60), (80, 48), (30, 70)]
    for split, gt in (("validation", root / "validation" / "ground_truth"), ("test", root / "ground_truth")):
        for i in range(5 if split == "validation" else 2):  # 5 held-out goods: enough for a position norm
            write_rgb(root / split / "good" / f"{i:03d}.png", textures.good(rng, SHAPE))
        for i in range(2):
            image, mask = textures.blob(textures.good(rng, SHAPE), centres.pop(), 7)
            write_rgb(root / split / "blob" / f"{i:03d}.png", image)
            gt.joinpath("blob").mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(gt / "blob" / f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return root


@dataclass(frozen=True)
class Fitted:
    dataset: Dataset
    report: FitReport
    cache: Path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, textures) -> Fitted:
    base = tmp_path_factory.mktemp("bundle")
    dataset = load_mvtec(make_category(base / "screws", textures))
    cache = base / "cache"
    report = fit(dataset, base / "model", FitOptions(**{**OPTIONS.__dict__, "cache_dir": str(cache)}), key=KEY)
    return Fitted(dataset, report, cache)


@pytest.fixture
def copy(fitted: Fitted, tmp_path: Path) -> Path:
    """A private copy of the fitted bundle, free to tamper with."""
    return Path(shutil.copytree(fitted.report.bundle, tmp_path / "bundle"))


def manifest_of(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def rewrite_manifest(path: Path, change: Callable[[dict], None], key: bytes | None = KEY) -> dict:
    """Change the manifest and re-seal it with the module's own digest (and signature), as a forger would."""
    manifest = manifest_of(path)
    change(manifest)
    manifest["digest"] = hashlib.sha256(bundle_module._canonical(manifest)).hexdigest()
    if key:
        manifest["signature"] = hmac.new(key, bundle_module._canonical(manifest), hashlib.sha256).hexdigest()
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def load(path: Path, fitted: Fitted, **kw):
    return load_bundle(path, cache_dir=fitted.cache, **{"key": KEY, **kw})


# --- fit -------------------------------------------------------------------------------------------------------------


def test_fit_writes_a_bundle_that_loads_and_separates_defects(fitted: Fitted) -> None:
    report = fitted.report
    manifest = manifest_of(report.bundle)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["signature"]
    assert manifest["backbone"]["precision"] == "f32"
    assert manifest["preprocess"]["size"] == [96, 160] and manifest["preprocess"]["source_size"] == [96, 160]
    assert manifest["scorer"]["type"] == "patchcore" and manifest["calibration"]["method"] == "best_f1"
    assert len(manifest["golden"]) == 3
    assert sorted(manifest["files"]) == sorted(
        p.relative_to(report.bundle).as_posix() for p in report.bundle.rglob("*") if p.is_file() and p.name != MANIFEST)
    engine = load(report.bundle, fitted)
    assert engine.model_id == manifest["model_id"] == report.engine.model_id
    for sample in fitted.dataset.test:
        image = read_image(sample.path)
        prediction = engine.predict(image)
        assert prediction.decision.anomalous == (sample.label == "defect"), (sample.path, prediction.decision)
        np.testing.assert_allclose(prediction.score.image_score, report.engine.score(image).image_score, rtol=1e-6)
        if sample.label == "defect":
            amap = engine.anomaly_map(prediction.score)
            assert amap.shape == SHAPE
            mask = cv2.dilate(sample.read_mask(SHAPE).astype(np.uint8), np.ones((17, 17), np.uint8)) > 0
            assert mask.reshape(-1)[int(np.argmax(amap))], f"{sample.path}: anomaly map peaks outside the defect"


def test_position_norm_is_learned_leave_one_out_and_shipped(fitted: Fitted) -> None:
    report, manifest = fitted.report, manifest_of(fitted.report.bundle)
    record = manifest["position_norm"]
    assert record == {"mean": "calibration/position_mean.npy", "scale": "calibration/position_scale.npy",
                      "images": 5}
    engine = load(report.bundle, fitted)
    norm = engine.position_norm
    assert norm.mean.shape == norm.scale.shape == (1, 12, 20)
    # The statistics are those of the held-out good images' raw patch maps ...
    goods = [s for s in fitted.dataset.calibration if s.label == "good"]
    feats = [engine.features(read_image(s.path)) for s in goods]
    raw = np.stack([engine.scorer.score(f)[0] for f in feats])
    np.testing.assert_allclose(norm.mean, raw.mean(0), rtol=1e-5, atol=1e-6)
    # ... and each good image's calibration score is its score against the other four.
    others = [PositionNorm.fit(np.delete(raw, i, axis=0)) for i in range(5)]
    want = [engine.scorer.score(f, o)[1] for f, o in zip(feats, others, strict=True)]
    np.testing.assert_allclose(sorted(report.calibration_scores["good"]), sorted(want), rtol=1e-4)
    # The engine scores frames in normalised units: the maximum of the normalised patch map.
    score = engine.score(read_image(fitted.dataset.test[0].path))
    assert score.image_score == pytest.approx(float(score.patch_map.max()), rel=1e-6)


def test_results_arriving_out_of_order_are_yielded_in_order() -> None:
    keys = np.random.default_rng(0).permutation(50)
    assert list(in_order((int(k), f"img{k}") for k in keys)) == [f"img{k}" for k in range(50)]
    # Each result is released as soon as everything before it has arrived, not at the end.
    seen = []
    for value in in_order(iter([(1, "b"), (0, "a"), (3, "d"), (2, "c")])):
        seen.append(value)
        if value == "b":
            break
    assert seen == ["a", "b"]
    with pytest.raises(RuntimeError, match=r"results \[2\] arrived without result 1"):
        list(in_order(iter([(0, "a"), (2, "c")])))


def test_fitting_the_same_data_twice_gives_the_same_model(tmp_path: Path, fitted: Fitted) -> None:
    """Asynchronous feature extraction finishes out of order; the model must not depend on that."""
    options = FitOptions(**{**OPTIONS.__dict__, "cache_dir": str(fitted.cache)})
    again = fit(fitted.dataset, tmp_path / "again", options)
    for name in ("bank", "shortlist"):
        np.testing.assert_array_equal(np.load(again.bundle / "scorer" / f"{name}.npy"),
                                      np.load(fitted.report.bundle / "scorer" / f"{name}.npy"))
    np.testing.assert_array_equal(again.engine.position_norm.mean, fitted.report.engine.position_norm.mean)
    assert manifest_of(again.bundle)["calibration"] == manifest_of(fitted.report.bundle)["calibration"]


@pytest.mark.parametrize(("change", "says"), [
    ({"position_norm": False}, "none"),
    ({"position_norm_min_images": 6}, "none (5 held-out good images, 6 wanted)"),
])
def test_fit_without_position_norm_ships_none(tmp_path: Path, fitted: Fitted, change: dict, says: str) -> None:
    options = FitOptions(**{**OPTIONS.__dict__, **change, "cache_dir": str(fitted.cache)})
    report = fit(fitted.dataset, tmp_path / "model", options)
    assert manifest_of(report.bundle)["position_norm"] is None
    assert manifest_of(report.bundle)["training"]["position_norm"] == says
    assert report.engine.position_norm is None and not (report.bundle / "calibration").exists()


@pytest.mark.parametrize("name", ["position_mean.npy", "position_scale.npy"])
def test_tampered_position_norm_is_refused(copy: Path, fitted: Fitted, name: str) -> None:
    arr = np.load(copy / "calibration" / name)
    np.save(copy / "calibration" / name, arr * 1.5)
    with pytest.raises(BundleError, match=f"calibration/{name}"):
        load(copy, fitted)


def test_resealed_position_norm_for_another_grid_is_refused(copy: Path, fitted: Fitted) -> None:
    for name in ("position_mean.npy", "position_scale.npy"):
        np.save(copy / "calibration" / name, np.ones((1, 12, 10), np.float32))

    def reseal(m: dict) -> None:
        for name in ("position_mean.npy", "position_scale.npy"):
            p = copy / "calibration" / name
            m["files"][f"calibration/{name}"] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                                 "bytes": p.stat().st_size}

    rewrite_manifest(copy, reseal)
    with pytest.raises(BundleError, match=r"position norm is for a \(1, 12, 10\) patch grid"):
        load(copy, fitted)


def test_unreadable_training_image_is_skipped_and_reported(fitted: Fitted) -> None:
    report = fitted.report
    assert len(report.skipped) == 1
    path, reason = report.skipped[0]
    assert path.endswith("005_corrupt.png") and "not a readable image" in reason
    training = manifest_of(report.bundle)["training"]
    assert training["images"] == {"train": TRAIN, "calibration_good": 5, "calibration_defect": 2}
    assert [s["path"] for s in training["skipped"]] == [path]
    assert manifest_of(report.bundle)["scorer"]["meta"]["bank"] == round(0.1 * TRAIN * 12 * 20)


def test_unreadable_first_training_image_is_reported_once(tmp_path: Path, textures) -> None:
    dataset = load_mvtec(make_category(tmp_path / "cat", textures, corrupt="-corrupt.png", seed=1))
    assert dataset.train[0].path.name == "-corrupt.png"
    report = fit(dataset, tmp_path / "model", OPTIONS)
    assert len(report.skipped) == 1
    assert manifest_of(report.bundle)["training"]["images"]["train"] == TRAIN


def test_empty_or_unreadable_training_data_is_a_dataset_error(tmp_path: Path, textures) -> None:
    root = make_category(tmp_path / "cat", textures, corrupt=None)
    for image in (root / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match="train/good"):
        load_mvtec(root)
    dataset = load_mvtec(make_category(tmp_path / "cat2", textures, corrupt=None))
    with pytest.raises(DatasetError, match="no training images"):
        fit(Dataset(dataset.name, dataset.root, (), dataset.calibration, dataset.test), tmp_path / "m1", OPTIONS)
    for sample in dataset.train:
        sample.path.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"none of the \d+ training images can be read: .*is empty \(0 bytes\)"):
        fit(dataset, tmp_path / "m2", OPTIONS)
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def test_fit_refuses_to_overwrite_a_folder_that_is_not_a_bundle(fitted: Fitted, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="exists and is not a bundle; refusing to overwrite it"):
        fit(fitted.dataset, target, OPTIONS)
    assert (target / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]  # no temporary folder left behind


# --- tampering: every change is refused ---------------------------------------------------------------------------


def flip_byte(path: Path, offset: int = -1) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x20
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda b: flip_byte(b / "scorer" / "bank.npy"), r"scorer/bank\.npy does not match its sha256"),
        (lambda b: flip_byte(b / "backbone" / "efficientnet_lite0_patch.bin", 5000),
         r"backbone/efficientnet_lite0_patch\.bin does not match its sha256"),
        (lambda b: flip_byte(b / "golden" / "01.png", 100), r"golden/01\.png does not match its sha256"),
        (lambda b: (b / "scorer" / "bank.npy").write_bytes((b / "scorer" / "bank.npy").read_bytes()[:-64]),
         r"scorer/bank\.npy is \d+ bytes, expected \d+; the bundle is truncated or altered"),
        (lambda b: (b / "scorer" / "shortlist.npy").unlink(), r"file scorer/shortlist\.npy is missing"),
        (lambda b: shutil.rmtree(b / "golden"), r"file golden/00\.png is missing"),
        (lambda b: (b / "scorer" / "extra.npy").write_bytes(b"x"),
         r"files not in the manifest: \['scorer/extra\.npy'\]"),
        (lambda b: (b / "notes.txt").write_text("hi"), r"files not in the manifest: \['notes\.txt'\]"),
        (lambda b: (b / MANIFEST).unlink(), r"no manifest\.json; this is not a model bundle"),
        (lambda b: (b / MANIFEST).write_text("{ not json"), "manifest is not valid JSON"),
        (lambda b: (b / MANIFEST).write_text((b / MANIFEST).read_text()[:500]), "manifest is not valid JSON"),
        (lambda b: (b / MANIFEST).write_text("[1, 2]"), "not an anomaly-appliance-bundle manifest"),
    ],
    ids=["array-byte", "backbone-byte", "golden-byte", "truncated", "deleted", "deleted-folder", "extra-file",
         "extra-top-level", "no-manifest", "garbage-manifest", "truncated-manifest", "wrong-manifest"],
)
def test_tampered_files_are_refused(copy: Path, fitted: Fitted, tamper: Callable[[Path], object],
                                    message: str) -> None:
    tamper(copy)
    with pytest.raises(BundleError, match=message):
        load(copy, fitted)


def _double_threshold(m: dict) -> None:
    m["calibration"]["threshold"] *= 2


def _set(keys: tuple[str, ...], value: object) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value
    return change


def test_edited_manifest_value_without_new_digest_is_refused(copy: Path, fitted: Fitted) -> None:
    manifest = manifest_of(copy)
    _double_threshold(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest, indent=2))
    with pytest.raises(BundleError, match="manifest digest does not match its content; the manifest was altered"):
        load(copy, fitted)
    with pytest.raises(BundleError, match="manifest digest"):
        load(copy, fitted, key=None)  # the digest is checked with or without a key


def test_edited_manifest_with_new_digest_but_no_key_fails_the_signature(copy: Path, fitted: Fitted) -> None:
    rewrite_manifest(copy, _double_threshold, key=None)  # digest recomputed, stale signature kept
    with pytest.raises(BundleError, match="signature is missing or wrong for this key"):
        load(copy, fitted)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set(("format_version",), FORMAT_VERSION + 1),
         rf"bundle format version {FORMAT_VERSION + 1} is newer than this appliance supports .*upgrade"),
        (_set(("format_version",), "1"), "format_version must be a positive integer, got '1'"),
        (_set(("format",), "something-else"), "not an anomaly-appliance-bundle manifest"),
        (_set(("scorer", "type"), "knn"), r"scorer type 'knn' is not known to this appliance \(known: \["),
        (_set(("scorer", "config", "index"), "annoy"), "incompatible with this appliance: patchcore.index must be"),
        (_set(("scorer", "config", "unknown_knob"), 1), r"incompatible .*unknown setting\(s\) \['unknown_knob'\]"),
        (_set(("scorer", "meta", "bank"), 3), "incompatible .*do not match their recorded shapes"),
        (_set(("preprocess", "size"), [90, 160]), "incompatible .*must be positive multiples of 16"),
        (_set(("backbone", "output_channels"), 100), "backbone gives 152 channels, bundle expects 100"),
        (_set(("files", "scorer/bank.npy", "sha256"), "0" * 64), r"scorer/bank\.npy does not match its sha256"),
    ],
    ids=["newer-version", "version-string", "format", "scorer-type", "scorer-config", "unknown-setting",
         "scorer-meta", "preprocess", "channels", "listed-hash"],
)
def test_resealed_incompatible_manifests_are_refused(copy: Path, fitted: Fitted, change: Callable[[dict], None],
                                                     message: str) -> None:
    rewrite_manifest(copy, change)
    with pytest.raises(BundleError, match=message):
        load(copy, fitted)


# --- signatures ---------------------------------------------------------------------------------------------------


def test_signed_bundle_needs_the_right_key(copy: Path, fitted: Fitted) -> None:
    assert load(copy, fitted).model_id == manifest_of(copy)["model_id"]
    with pytest.raises(BundleError, match="bundle signature is missing or wrong for this key; refusing it"):
        load(copy, fitted, key=b"line-8 secret")
    with pytest.raises(BundleError, match="signature is missing or wrong"):
        load(copy, fitted, key=b"")
    load(copy, fitted, key=None)  # without a key configured, signatures are not required


def test_stripped_signature_is_refused_when_a_key_is_configured(copy: Path, fitted: Fitted) -> None:
    rewrite_manifest(copy, lambda m: m.pop("signature"), key=None)
    assert "signature" not in manifest_of(copy)
    with pytest.raises(BundleError, match="signature is missing or wrong"):
        load(copy, fitted)


# --- frame format ---------------------------------------------------------------------------------------------------


def test_bundle_records_its_frame_format_and_refuses_frames_of_another(fitted: Fitted) -> None:
    assert manifest_of(fitted.report.bundle)["preprocess"]["frame"] == {"channels": 3, "bits": 8, "convert": "refuse"}
    engine = load(fitted.report.bundle, fitted)
    good = read_image(next(s.path for s in fitted.dataset.test if s.label == "good"))
    assert not engine.predict(good).decision.anomalous
    grey = cv2.cvtColor(good, cv2.COLOR_RGB2GRAY)  # the same good part, saved grey
    with pytest.raises(ImageError, match=r"^frame is grey 8-bit but the model was fitted on RGB 8-bit frames; set the "
                                         r"camera to colour \(RGB\) output, or fit a model on grey 8-bit frames"):
        engine.predict(grey)
    deep = good.astype(np.uint16) * 257  # the same pixels from a 16-bit camera
    with pytest.raises(ImageError, match=r"^frame is RGB 16-bit but the model was fitted on RGB 8-bit frames; set the "
                                         "camera's pixel format to 8 bits, or fit a model on 16-bit frames"):
        engine.predict(deep)


def test_a_format_3_bundle_without_a_frame_format_scores_grey_frames_as_before(copy: Path, fitted: Fitted) -> None:
    def as_format_3(m: dict) -> None:
        m["format_version"] = 3
        del m["preprocess"]["frame"]

    rewrite_manifest(copy, as_format_3)
    engine = load(copy, fitted)
    assert engine.spec.frame is None
    good = read_image(next(s.path for s in fitted.dataset.test if s.label == "good"))
    grey = cv2.cvtColor(good, cv2.COLOR_RGB2GRAY)
    assert engine.predict(grey).score.image_score == pytest.approx(
        engine.predict(np.repeat(grey[:, :, None], 3, 2)).score.image_score, rel=1e-6)  # grey copied into RGB


# --- golden images --------------------------------------------------------------------------------------------------


def test_golden_check_catches_a_consistently_resealed_change(copy: Path, fitted: Fitted, textures) -> None:
    """Hashes, digest and signature all agree; only scoring the golden image can tell."""
    rel = "golden/00.png"
    image = read_image(copy / rel)
    changed, _ = textures.blob(image, (80, 48), 9)
    write_rgb(copy / rel, changed)
    path = copy / rel
    rewrite_manifest(copy, _set(("files", rel), {"sha256": bundle_module._sha256(path), "bytes": path.stat().st_size}))
    verify_files(copy, KEY)  # every hash checks out
    with pytest.raises(BundleError, match=r"golden image golden/00\.png scores .* when the bundle was built"):
        load(copy, fitted)
    assert load(copy, fitted, check_golden=False).model_id  # nothing else objects


def test_golden_check_catches_a_preprocessing_change(copy: Path, fitted: Fitted) -> None:
    """A bundle whose recorded preprocessing differs from the build's (here: a crop) fails its golden check."""
    rewrite_manifest(copy, _set(("preprocess", "roi"), [16, 0, 144, 96]))
    with pytest.raises(BundleError, match=r"golden image .* the runtime's preprocessing or backbone differs"):
        load(copy, fitted)


# --- archives -------------------------------------------------------------------------------------------------------


def test_archive_round_trip(copy: Path, fitted: Fitted, tmp_path: Path) -> None:
    archive = pack(copy, tmp_path / "model.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert f"bundle/{MANIFEST}" in names and "bundle/scorer/bank.npy" in names
    cache = tmp_path / "cache"
    from_archive = load_bundle(archive, cache_dir=cache, key=KEY)
    from_dir = load(copy, fitted)
    assert from_archive.model_id == from_dir.model_id
    image = read_image(fitted.dataset.test[-1].path)
    assert from_archive.score(image).image_score == from_dir.score(image).image_score
    assert from_archive.bundle_path.is_relative_to(cache)
    assert load_bundle(archive, cache_dir=cache, key=KEY).model_id == from_dir.model_id  # extracted once, reused
    assert len(list((cache / "bundles").iterdir())) == 1


def test_truncated_archive_is_refused(copy: Path, tmp_path: Path) -> None:
    archive = pack(copy, tmp_path / "model.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(BundleError, match=r"cut\.tar\.gz: not a readable bundle archive .*it may be truncated"):
        load_bundle(cut, cache_dir=tmp_path / "cache", key=KEY)
    assert not list((tmp_path / "cache" / "bundles").iterdir())  # nothing half-extracted is kept


def test_archive_of_a_tampered_bundle_is_refused(copy: Path, fitted: Fitted, tmp_path: Path) -> None:
    flip_byte(copy / "scorer" / "bank.npy")
    with pytest.raises(BundleError, match="does not match its sha256"):
        pack(copy, tmp_path / "model.tar.gz")  # pack verifies first
    archive = tmp_path / "forged.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # packed by hand, bypassing pack()
        tar.add(copy, arcname="bundle")
    with pytest.raises(BundleError, match=r"scorer/bank\.npy does not match its sha256"):
        load_bundle(archive, cache_dir=tmp_path / "cache", key=KEY)


def test_archive_holding_two_bundles_is_refused(copy: Path, fitted: Fitted, tmp_path: Path) -> None:
    archive = tmp_path / "two.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(copy, arcname="a")
        tar.add(copy, arcname="b")
    with pytest.raises(BundleError, match="expected exactly one bundle inside, found 2"):
        load_bundle(archive, cache_dir=tmp_path / "cache", key=KEY)


def test_missing_bundle_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle directory"):
        load_bundle(tmp_path / "nowhere")


# --- drift baseline -------------------------------------------------------------------------------------------------


def test_too_few_held_out_images_ship_no_drift_baseline(fitted: Fitted) -> None:
    """5 held-out good images: below ``MIN_BASELINE``, so the bundle says why it has none (see test_drift.py)."""
    manifest = manifest_of(fitted.report.bundle)
    assert manifest["drift"] is None and fitted.report.drift is None
    assert manifest["training"]["drift"] == "none (5 held-out good images, 10 wanted)"
    assert not any(rel.startswith("drift/") for rel in manifest["files"])
