"""Tests for appliance.datasets: layouts, mask pairing by stem, splits and error messages."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.datasets import (
    Dataset,
    Sample,
    list_images,
    load_dataset,
    load_folder,
    load_mvtec,
    split_counts,
)
from appliance.errors import DatasetError, ImageError

BSDATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsdata" / "ball_screw"


def write_image(path: Path, value: int = 128, shape: tuple[int, int] = (4, 6)) -> Path:
    """Write a tiny real image (PNG, JPEG, BMP, ... by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((*shape, 3), value, np.uint8))
    return path


def write_mask(path: Path, shape: tuple[int, int] = (4, 6), on: tuple[int, int] = (0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(shape, np.uint8)
    mask[on] = 255
    assert cv2.imwrite(str(path), mask)
    return path


def make_mvtec(root: Path, *, n_train: int = 10, masks: bool = True) -> Path:
    """An MVTec-style category whose defect names hit the ``num_1``/``num_10`` sorting trap."""
    for i in range(n_train):
        write_image(root / "train" / "good" / f"{i:03d}.png")
    write_image(root / "test" / "good" / "000.png")
    write_image(root / "test" / "good" / "001.jpg")
    for i, stem in enumerate(["num_1", "num_2", "num_10"]):
        write_image(root / "test" / "crack" / f"{stem}.png")
        if masks:
            # Mask rows differ so a mis-paired mask would be caught by its content too.
            write_mask(root / "ground_truth" / "crack" / f"{stem}_mask.png", on=(i, 0))
    return root


def stems(samples: tuple[Sample, ...] | list[Sample]) -> list[str]:
    return [s.path.stem for s in samples]


# --- list_images ---------------------------------------------------------------------------------------------------


def test_list_images_sorted_skips_hidden_non_images_and_subfolders(tmp_path: Path) -> None:
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "c.BMP")
    write_image(tmp_path / ".hidden.png")
    write_image(tmp_path / "sub" / "d.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder.png").mkdir()  # a folder with an image suffix is not an image
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png", "c.BMP"]


def test_list_images_missing_or_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder"):
        list_images(tmp_path / "nope")
    image = write_image(tmp_path / "x.png")
    with pytest.raises(DatasetError, match="is a file"):
        list_images(image)


# --- MVTec layout --------------------------------------------------------------------------------------------------


def test_mvtec_pairs_masks_by_stem_not_position(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    ds = load_mvtec(root)
    defects = [s for s in ds.test if s.label == "defect"]
    # Sorted, images go num_1, num_10, num_2 but masks num_10_mask, num_1_mask, num_2_mask: zip() would mis-pair.
    assert stems(defects) == ["num_1", "num_10", "num_2"]
    for s in defects:
        assert s.defect_type == "crack"
        assert s.mask is not None and s.mask.stem == f"{s.path.stem}_mask"
    expected_row = {"num_1": 0, "num_2": 1, "num_10": 2}
    for s in defects:
        mask = s.read_mask((4, 6))
        assert mask is not None and mask.sum() == 1 and mask[expected_row[s.path.stem], 0]
    good = [s for s in ds.test if s.label == "good"]
    assert stems(good) == ["000", "001"] and all(s.mask is None and s.defect_type == "good" for s in good)
    assert ds.name == "cat" and ds.defect_types == ("crack",)


def test_mvtec_accepts_plain_stem_masks_with_any_suffix(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat", masks=False)
    write_mask(root / "ground_truth" / "crack" / "num_1.png")
    write_mask(root / "ground_truth" / "crack" / "num_10_mask.bmp")
    write_mask(root / "ground_truth" / "crack" / "num_2.tif")
    ds = load_mvtec(root)
    assert {s.path.stem: s.mask.name for s in ds.test if s.mask} == {
        "num_1": "num_1.png",
        "num_10": "num_10_mask.bmp",
        "num_2": "num_2.tif",
    }


def test_mvtec_missing_mask_names_the_image(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    (root / "ground_truth" / "crack" / "num_10_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"image .*num_10\.png has no mask"):
        load_mvtec(root)


def test_mvtec_orphan_mask_names_the_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    write_mask(root / "ground_truth" / "crack" / "num_3_mask.png")
    with pytest.raises(DatasetError, match=r"mask .*num_3_mask\.png has no image named num_3"):
        load_mvtec(root)


def test_mvtec_two_masks_for_one_image_is_ambiguous(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    write_mask(root / "ground_truth" / "crack" / "num_1.png")
    with pytest.raises(DatasetError, match=r"num_1\.png has several masks"):
        load_mvtec(root)


def test_mvtec_images_sharing_a_stem_are_ambiguous_when_masked(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    write_image(root / "test" / "crack" / "num_1.jpg")
    with pytest.raises(DatasetError, match="share the stem 'num_1'"):
        load_mvtec(root)


def test_mvtec_defect_without_ground_truth_folder_has_no_masks(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat", masks=False)
    ds = load_mvtec(root)
    defects = [s for s in ds.test if s.label == "defect"]
    assert len(defects) == 3 and all(s.mask is None for s in defects)
    assert defects[0].read_mask((4, 6)) is None  # unknown extent: pixel metrics skip it
    good_mask = ds.test[0].read_mask((4, 6))
    assert good_mask is not None and not good_mask.any()


def test_mvtec_ground_truth_for_a_missing_defect_folder(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    write_mask(root / "ground_truth" / "scratch" / "000_mask.png")
    with pytest.raises(DatasetError, match="masks for 'scratch'"):
        load_mvtec(root)


def test_mvtec_unknown_folder(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    write_image(root / "test" / "unknown" / "u1.png")
    write_image(root / "test" / "unknown" / "u0.png")
    ds = load_mvtec(root)
    unknown = [s for s in ds.test if s.label == "unknown"]
    assert stems(unknown) == ["u0", "u1"]
    assert all(s.defect_type == "unknown" and s.mask is None for s in unknown)
    assert ds.defect_types == ("crack",)
    assert [s.label for s in ds.test][-2:] == ["unknown", "unknown"]  # good, defects, then unknown


@pytest.mark.parametrize("folder", ["validation", "val"])
def test_mvtec_validation_folder_is_the_calibration_split(tmp_path: Path, folder: str) -> None:
    root = make_mvtec(tmp_path / "cat")
    val = root / folder
    write_image(val / "good" / "v0.png")
    write_image(val / "good" / "v1.png")
    write_image(val / "crack" / "num_1.png")  # same name as a test image: masks are per split
    write_mask(val / "ground_truth" / "crack" / "num_1_mask.png", on=(3, 5))
    ds = load_mvtec(root, calibration_fraction=0.5)
    assert len(ds.train) == 10  # no hold-out from train/good
    assert stems(ds.calibration) == ["v0", "v1", "num_1"]
    defect = ds.calibration[2]
    assert defect.label == "defect" and defect.mask == val / "ground_truth" / "crack" / "num_1_mask.png"
    assert len(ds.test) == 5


def test_mvtec_validation_errors(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    write_image(root / "validation" / "crack" / "x.png")
    with pytest.raises(DatasetError, match=r"validation.good: missing; expected a folder of good calibration"):
        load_mvtec(root)
    write_image(root / "validation" / "good" / "g.png")
    write_image(root / "validation" / "unknown" / "u.png")
    with pytest.raises(DatasetError, match="move them to test/unknown"):
        load_mvtec(root)
    (root / "validation" / "unknown" / "u.png").unlink()
    (root / "validation" / "unknown").rmdir()
    load_mvtec(root)
    write_image(root / "val" / "good" / "g.png")
    with pytest.raises(DatasetError, match="both validation/ and val/"):
        load_mvtec(root)


def test_mvtec_calibration_holdout_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat", n_train=10)
    ds = load_mvtec(root, calibration_fraction=0.25, seed=3)
    train, cal = {s.path for s in ds.train}, {s.path for s in ds.calibration}
    assert len(cal) == 3  # 2.5 rounds half up
    assert not train & cal
    assert train | cal == set(list_images(root / "train" / "good"))
    assert all(s.label == "good" and s.defect_type == "good" for s in ds.calibration)
    assert load_mvtec(root, calibration_fraction=0.25, seed=3) == ds
    others = {
        frozenset(s.path for s in load_mvtec(root, calibration_fraction=0.25, seed=k).calibration) for k in range(5)
    }
    assert len(others) > 1  # the seed matters
    assert load_mvtec(root, calibration_fraction=0).calibration == ()


@pytest.mark.parametrize(("n_train", "fraction", "expected"), [(1, 0.5, 0), (2, 0.1, 1), (3, 0.9, 2), (20, 0.1, 2)])
def test_mvtec_calibration_holdout_counts(tmp_path: Path, n_train: int, fraction: float, expected: int) -> None:
    ds = load_mvtec(make_mvtec(tmp_path / "cat", n_train=n_train), calibration_fraction=fraction)
    assert (len(ds.calibration), len(ds.train)) == (expected, n_train - expected)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, float("nan")])
def test_mvtec_calibration_fraction_range(tmp_path: Path, fraction: float) -> None:
    with pytest.raises(DatasetError, match=r"calibration_fraction must be in \[0, 1\)"):
        load_mvtec(make_mvtec(tmp_path / "cat"), calibration_fraction=fraction)


def test_mvtec_missing_root_and_train_good(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist; expected an MVTec AD category folder"):
        load_mvtec(tmp_path / "nope")
    (tmp_path / "cat" / "test").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"train.good: missing; expected a folder of good training images"):
        load_mvtec(tmp_path / "cat")
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    (tmp_path / "cat" / "train" / "good" / "readme.txt").write_text("x")
    write_image(tmp_path / "cat" / "train" / "good" / ".hidden.png")
    with pytest.raises(DatasetError, match=r"train.good: holds no images"):
        load_mvtec(tmp_path / "cat")


def test_mvtec_without_test_folder_and_lazy_reading(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    write_image(root / "train" / "good" / "a.png")
    (root / "train" / "good" / "b.png").write_bytes(b"not a png")  # listed, not opened
    ds = load_mvtec(root, calibration_fraction=0)
    assert stems(ds.train) == ["a", "b"] and ds.test == ()
    assert ds.train[0].read().shape == (4, 6, 3)
    with pytest.raises(ImageError, match=r"b\.png"):
        ds.train[1].read()


# --- flat folders --------------------------------------------------------------------------------------------------


def make_flat(root: Path, n_good: int = 10, n_bad: int = 5) -> tuple[Path, Path, Path]:
    for i in range(n_good):
        write_image(root / "good" / f"g{i}.png")
    for i in range(n_bad):
        write_image(root / "scratch" / f"s{i}.jpg")
        write_mask(root / "masks" / (f"s{i}_mask.png" if i % 2 else f"s{i}.png"))
    return root / "good", root / "scratch", root / "masks"


def test_load_folder_splits_and_masks(tmp_path: Path) -> None:
    good, bad, masks = make_flat(tmp_path)
    write_image(tmp_path / "unlabelled" / "u.png")
    ds = load_folder(good, abnormal_dir=bad, mask_dir=masks, unknown_dir=tmp_path / "unlabelled")
    assert (len(ds.train), len(ds.calibration), len(ds.test)) == (7, 1 + 2, 2 + 3 + 1)
    all_good = {s.path for s in ds.train} | {s.path for s in ds.calibration + ds.test if s.label == "good"}
    assert all_good == set(list_images(good))
    defects = [s for s in ds.calibration + ds.test if s.label == "defect"]
    assert len(defects) == 5 and {s.defect_type for s in defects} == {"scratch"}
    for s in defects:
        assert s.mask is not None and s.mask.stem in (s.path.stem, f"{s.path.stem}_mask")
    assert ds.test[-1].label == "unknown" and ds.test[-1].defect_type == "unknown"
    assert ds.root == tmp_path.resolve() and ds.name == "good"
    assert load_folder(good, abnormal_dir=bad, mask_dir=masks, unknown_dir=tmp_path / "unlabelled") == ds
    assert load_folder(good, name="parts").name == "parts"


def test_load_folder_seed_changes_split(tmp_path: Path) -> None:
    good, _, _ = make_flat(tmp_path, n_good=20, n_bad=0)
    trains = {frozenset(s.path for s in load_folder(good, seed=k).train) for k in range(4)}
    assert len(trains) > 1


def test_load_folder_mask_errors(tmp_path: Path) -> None:
    good, bad, masks = make_flat(tmp_path)
    with pytest.raises(DatasetError, match="without abnormal_dir"):
        load_folder(good, mask_dir=masks)
    (masks / "s1_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"s1\.jpg has no mask"):
        load_folder(good, abnormal_dir=bad, mask_dir=masks)
    with pytest.raises(DatasetError, match="same folder"):
        load_folder(good, abnormal_dir=good)


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ((0.5, 0.1, 0.2), "must sum to 1"),
        ((0.0, 0.5, 0.5), "fraction above 0"),
        ((1.2, -0.1, -0.1), "non-negative"),
        ((0.8, 0.2), "three non-negative fractions"),
    ],
)
def test_load_folder_rejects_bad_split(tmp_path: Path, split: tuple[float, ...], message: str) -> None:
    good, _, _ = make_flat(tmp_path, n_bad=0)
    with pytest.raises(DatasetError, match=message):
        load_folder(good, split=split)


def test_load_folder_abnormal_fraction(tmp_path: Path) -> None:
    good, bad, _ = make_flat(tmp_path, n_bad=4)
    assert sum(s.label == "defect" for s in load_folder(good, abnormal_dir=bad).calibration) == 1
    assert (
        sum(s.label == "defect" for s in load_folder(good, abnormal_dir=bad, abnormal_calibration_fraction=1).test) == 0
    )
    assert (
        sum(s.label == "defect" for s in load_folder(good, abnormal_dir=bad, abnormal_calibration_fraction=0).test) == 4
    )
    with pytest.raises(DatasetError, match="abnormal_calibration_fraction"):
        load_folder(good, abnormal_dir=bad, abnormal_calibration_fraction=1.5)


def test_load_folder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="missing; expected a folder of good images"):
        load_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="holds no images"):
        load_folder(tmp_path / "empty")
    good, _, _ = make_flat(tmp_path, n_bad=0)
    with pytest.raises(DatasetError, match="expected a folder of defect images"):
        load_folder(good, abnormal_dir=tmp_path / "nope")


@pytest.mark.parametrize(
    ("n", "ratios", "expected"),
    [
        (10, (0.7, 0.1, 0.2), [7, 1, 2]),
        (1, (0.7, 0.1, 0.2), [1, 0, 0]),
        (2, (0.7, 0.1, 0.2), [1, 1, 0]),
        (3, (0.7, 0.1, 0.2), [1, 1, 1]),
        (7, (0.7, 0.1, 0.2), [5, 1, 1]),
        (5, (1.0, 0.0, 0.0), [5, 0, 0]),
    ],
)
def test_split_counts(n: int, ratios: tuple[float, ...], expected: list[int]) -> None:
    assert split_counts(n, ratios) == expected


def test_split_counts_always_sums_to_n() -> None:
    for n in range(60):
        for ratios in [(0.7, 0.1, 0.2), (0.34, 0.33, 0.33), (0.9, 0.05, 0.05), (0.29, 0.71, 0.0)]:
            assert sum(split_counts(n, ratios)) == n


# --- types ---------------------------------------------------------------------------------------------------------


def test_sample_and_dataset_validate_and_describe(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="label"):
        Sample(tmp_path / "x.png", "bad", "bad", None)
    defect = Sample(tmp_path / "d.png", "defect", "dent", None)
    with pytest.raises(ValueError, match="good images only"):
        Dataset("d", tmp_path, (defect,), (), ())
    ds = load_mvtec(make_mvtec(tmp_path / "cat"), calibration_fraction=0.2)
    text = ds.describe()
    assert "train 8 images (8 good)" in text
    assert "calibration 2 images (2 good)" in text
    assert "test 5 images (2 good, 3 crack, 3 with masks)" in text
    assert "Defect types: crack" in text and "\n" not in text


# --- layout detection ----------------------------------------------------------------------------------------------


def test_load_dataset_detects_layouts(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec" / "cat")
    assert load_dataset(root) == load_mvtec(root)
    assert load_dataset(tmp_path / "mvtec", seed=1) == load_mvtec(root, seed=1)  # root holding one category
    good, _, _ = make_flat(tmp_path / "flat", n_bad=0)
    ds = load_dataset(good)  # a plain folder of good images: train and calibration, nothing to test on
    n = len(list(good.iterdir()))
    assert (len(ds.train), len(ds.calibration), len(ds.test)) == (n - 1, 1, 0)
    assert len(load_dataset(good, calibration_fraction=0.3).calibration) == round(0.3 * n)
    make_mvtec(tmp_path / "mvtec" / "dog")
    with pytest.raises(DatasetError, match=r"several categories \(cat, dog\)"):
        load_dataset(tmp_path / "mvtec")
    (tmp_path / "nothing" / "sub").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no dataset found"):
        load_dataset(tmp_path / "nothing")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_load_dataset_broken_mvtec_reports_train_good(tmp_path: Path) -> None:
    (tmp_path / "cat" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"train.good: missing"):
        load_dataset(tmp_path / "cat")


# --- real data -----------------------------------------------------------------------------------------------------


def test_bsdata_ball_screw_counts() -> None:
    if not BSDATA.is_dir():
        pytest.skip(f"{BSDATA} not present")
    ds = load_dataset(BSDATA)
    assert len(ds.train) + len(ds.calibration) == 557
    assert len(ds.calibration) == 56
    assert sum(s.label == "good" for s in ds.test) == 131
    pitting = [s for s in ds.test if s.label == "defect"]
    assert len(pitting) == 167 and ds.defect_types == ("pitting",)
    assert all(s.mask is not None and s.mask.stem == f"{s.path.stem}_mask" for s in pitting)
    assert len(ds.test) == 131 + 167
