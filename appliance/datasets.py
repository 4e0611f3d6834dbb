"""Datasets for fitting, calibrating and evaluating a detector trained on good images only.

Two layouts are read:

* MVTec AD (one category folder): ``train/good``, ``test/good``, ``test/<defect>``,
  ``ground_truth/<defect>/<stem>_mask.png``, optionally ``test/unknown`` and a
  ``validation/`` (or ``val/``) folder laid out like ``test/``.
* Flat folders: a folder of good images, optionally one of defect images, one of
  masks and one of unlabelled images.

Loaders only list files; no image is opened here, so an unreadable image is
reported (as ``ImageError``) when it is read. Masks are paired with images by
stem name, never by sorted position: pairing by position is how ``num_1`` ends up
with the mask of ``num_10``.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetError
from .imaging import is_image_file, read_image, read_mask

LABELS = ("good", "defect", "unknown")
GOOD = "good"
UNKNOWN = "unknown"
GROUND_TRUTH = "ground_truth"
_MASK_SUFFIX = "_mask"
_MAX_PROBLEMS = 5  # problems listed in one error message; the rest are counted


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and what is known about it.

    Attributes:
        path: the image file.
        label: ``"good"``, ``"defect"`` or ``"unknown"`` (unlabelled).
        defect_type: ``"good"`` for good images, the defect folder's name for defects,
            ``"unknown"`` for unlabelled images.
        mask: the ground-truth mask file (non-zero = defect), if there is one.

    """

    path: Path
    label: str
    defect_type: str
    mask: Path | None = None

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {self.label!r}")

    def read(self) -> np.ndarray:
        """Read the image's pixels (raises ``ImageError`` naming the file)."""
        return read_image(self.path)

    def read_mask(self, shape: tuple[int, int]) -> np.ndarray | None:
        """Read the ground truth as a bool ``shape`` (H, W) array, or return ``None`` when it is not known.

        A good image without a mask file has an all-false mask; a defect or unknown
        image without one has no usable ground truth, so pixel metrics must skip it.
        """
        if self.mask is not None:
            return read_mask(self.mask, shape)
        if self.label == GOOD:
            return np.zeros(shape, dtype=bool)
        return None


@dataclass(frozen=True)
class Dataset:
    """Train (good only), calibration and test splits of one dataset."""

    name: str
    root: Path
    train: tuple[Sample, ...]
    calibration: tuple[Sample, ...]
    test: tuple[Sample, ...]

    def __post_init__(self) -> None:
        bad = next((s for s in self.train if s.label != GOOD), None)
        if bad is not None:
            raise ValueError(f"the train split must hold good images only; {bad.path} is {bad.label!r}")

    @property
    def defect_types(self) -> tuple[str, ...]:
        """Sorted names of the defect types found in any split."""
        samples = self.train + self.calibration + self.test
        return tuple(sorted({s.defect_type for s in samples if s.label == "defect"}))

    def describe(self) -> str:
        """Summarise in one paragraph: images per split, by label and defect type, and masks."""
        parts = [_describe_split(split, samples) for split, samples in self.splits()]
        defects = ", ".join(self.defect_types) or "none"
        return f"Dataset {self.name!r} at {self.root}: " + "; ".join(parts) + f". Defect types: {defects}."

    def splits(self) -> tuple[tuple[str, tuple[Sample, ...]], ...]:
        """``(name, samples)`` for train, calibration and test, in that order."""
        return (("train", self.train), ("calibration", self.calibration), ("test", self.test))


def _describe_split(split: str, samples: Sequence[Sample]) -> str:
    if not samples:
        return f"{split} 0 images"
    counts = Counter(s.defect_type for s in samples)
    order = sorted(counts, key=lambda t: (t != GOOD, t == UNKNOWN, t))
    detail = ", ".join(f"{counts[t]} {t}" for t in order)
    masks = sum(s.mask is not None for s in samples)
    mask_note = f", {masks} with masks" if masks else ""
    return f"{split} {len(samples)} images ({detail}{mask_note})"


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files directly in ``folder``; hidden files, non-images and sub-folders are skipped."""
    folder = Path(folder)
    if not folder.exists():
        raise DatasetError(f"{folder}: no such folder; check the path")
    if not folder.is_dir():
        raise DatasetError(f"{folder}: is a file, expected a folder of images")
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _require_images(folder: Path, what: str) -> list[Path]:
    if not folder.exists():
        raise DatasetError(f"{folder}: missing; expected a folder of {what}")
    images = list_images(folder)
    if not images:
        raise DatasetError(f"{folder}: holds no images; expected {what} (.png, .jpg, .bmp, .tif, ...)")
    return images


def _raise_problems(problems: list[str], context: str) -> None:
    if not problems:
        return
    shown = "\n  - ".join(problems[:_MAX_PROBLEMS])
    more = f"\n  ... and {len(problems) - _MAX_PROBLEMS} more" if len(problems) > _MAX_PROBLEMS else ""
    raise DatasetError(f"{context}: {len(problems)} problem(s):\n  - {shown}{more}")


def _pair_masks(images: Sequence[Path], image_dir: Path, mask_dir: Path) -> dict[Path, Path]:
    """Pair every image with exactly one mask named ``<stem>_mask.*`` or ``<stem>.*``, and every mask with an image."""
    by_stem: dict[str, list[Path]] = {}
    for image in images:
        by_stem.setdefault(image.stem, []).append(image)
    problems = [
        f"images {', '.join(p.name for p in same)} share the stem {stem!r}, so their masks cannot be told apart; "
        "rename all but one"
        for stem, same in by_stem.items()
        if len(same) > 1
    ]
    claims: dict[str, list[Path]] = {}
    for mask in list_images(mask_dir):
        names = [mask.stem] + ([mask.stem[: -len(_MASK_SUFFIX)]] if mask.stem.endswith(_MASK_SUFFIX) else [])
        owners = [n for n in names if n in by_stem]
        if not owners:
            problems.append(
                f"mask {mask} has no image named {names[-1]}.* in {image_dir}; remove the mask or add its image"
            )
        elif len(owners) > 1:
            problems.append(f"mask {mask} could belong to image {owners[0]!r} or {owners[1]!r}; rename one of them")
        else:
            claims.setdefault(owners[0], []).append(mask)
    pairs: dict[Path, Path] = {}
    for stem, same in by_stem.items():
        found = claims.get(stem, [])
        if not found:
            problems.append(
                f"image {same[0]} has no mask {stem}{_MASK_SUFFIX}.png (or {stem}.png) in {mask_dir}; "
                "add the mask or remove the image"
            )
        elif len(found) > 1:
            problems.append(f"image {same[0]} has several masks ({', '.join(m.name for m in found)}); keep one")
        else:
            pairs[same[0]] = found[0]
    _raise_problems(problems, f"pairing masks in {mask_dir} with their images")
    return pairs


def _samples(images: Iterable[Path], label: str, defect_type: str, masks: dict[Path, Path] | None) -> list[Sample]:
    masks = masks or {}
    return [Sample(p, label, defect_type, masks.get(p)) for p in images]


def _holdout_count(n: int, fraction: float) -> int:
    """Count how many of ``n`` items ``fraction`` takes.

    Rounded half up; at least 1 if ``fraction > 0`` and ``n >= 2``; at least 1 left behind unless ``fraction == 1``.
    """
    if n == 0 or fraction <= 0:
        return 0
    k = math.floor(fraction * n + 0.5)
    if n >= 2:
        k = max(k, 1)
    if fraction < 1:
        k = min(k, n - 1)
    return k


def _shuffled(items: Sequence[Path], seed: int) -> list[Path]:
    out = sorted(items)
    random.Random(seed).shuffle(out)
    return out


def _check_fraction(name: str, value: float, *, allow_one: bool) -> None:
    upper_ok = value <= 1 if allow_one else value < 1
    if not (value >= 0 and upper_ok):
        bound = "1]" if allow_one else "1)"
        raise DatasetError(f"{name} must be in [0, {bound}, got {value}")


# --- MVTec AD layout ---------------------------------------------------------------------------------------------


def _load_labelled_split(split_dir: Path, gt_dir: Path | None, *, allow_unknown: bool) -> list[Sample]:
    """Read a ``test/``-like folder (``good/``, defect folders, maybe ``unknown/``), masks from ``gt_dir``."""
    folders = [p for p in _subfolders(split_dir) if p.name != GROUND_TRUTH]
    names = {p.name for p in folders}
    if UNKNOWN in names and not allow_unknown:
        raise DatasetError(
            f"{split_dir / UNKNOWN}: unlabelled images cannot calibrate a threshold; move them to test/unknown"
        )
    gt_folders = _subfolders(gt_dir) if gt_dir is not None and gt_dir.is_dir() else []
    orphans = [
        f"{p} has masks for {p.name!r} but there is no {split_dir / p.name} folder; remove or rename it"
        for p in gt_folders
        if p.name not in names
    ]
    _raise_problems(orphans, f"reading ground truth in {gt_dir}")
    gt_names = {p.name for p in gt_folders}
    samples: list[Sample] = []
    for folder in sorted(folders, key=lambda p: (p.name != GOOD, p.name == UNKNOWN, p.name)):
        images = list_images(folder)
        masks = (
            _pair_masks(images, folder, gt_dir / folder.name)
            if gt_dir is not None and folder.name in gt_names
            else None
        )
        label = folder.name if folder.name in (GOOD, UNKNOWN) else "defect"
        samples += _samples(images, label, folder.name, masks)
    return samples


def _test_ground_truth(root: Path, test_dir: Path) -> Path:
    """``root/ground_truth`` (MVTec AD), or ``test/ground_truth`` (MVTec AD 2 style), not both."""
    shared, nested = root / GROUND_TRUTH, test_dir / GROUND_TRUTH
    if shared.is_dir() and nested.is_dir():
        raise DatasetError(f"{root}: masks found in both {shared} and {nested}; keep one ground_truth folder")
    return nested if nested.is_dir() else shared


def _validation_dir(root: Path) -> Path | None:
    found = [root / n for n in ("validation", "val") if (root / n).is_dir()]
    if len(found) > 1:
        raise DatasetError(f"{root}: has both validation/ and val/; keep one calibration folder")
    return found[0] if found else None


def load_mvtec(root: str | Path, *, calibration_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Load one category folder in MVTec AD layout.

    Calibration comes from ``root/validation/`` (or ``root/val/``) when it exists: laid out
    like ``test/`` (``good/`` required, defect folders optional), with masks, if any, in
    ``validation/ground_truth/<defect>/``; all of ``train/good`` is then the train split and
    ``calibration_fraction`` is ignored. Otherwise ``calibration_fraction`` of ``train/good``
    (rounded half up, at least 1 when there are two or more, never all) is held out at random,
    deterministically given ``seed``.

    Test masks live in ``root/ground_truth/<defect>/`` (or ``test/ground_truth/<defect>/``). A
    defect folder without a ground-truth folder is allowed (pixel metrics are skipped for it);
    with one, every image needs exactly one mask and every mask an image.

    Raises:
        DatasetError: the folder is missing, ``train/good`` is missing or empty, or masks do not pair up.

    """
    root = Path(root)
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise DatasetError(f"{root}: {what}; expected an MVTec AD category folder containing train/good/")
    _check_fraction("calibration_fraction", calibration_fraction, allow_one=False)
    train_good = _require_images(root / "train" / GOOD, "good training images (MVTec layout: <category>/train/good/)")

    val_dir = _validation_dir(root)
    if val_dir is not None:
        _require_images(val_dir / GOOD, f"good calibration images (or remove {val_dir} to hold out train images)")
        calibration = _load_labelled_split(val_dir, val_dir / GROUND_TRUTH, allow_unknown=False)
        train = train_good
    else:
        shuffled = _shuffled(train_good, seed)
        k = _holdout_count(len(shuffled), calibration_fraction)
        calibration = _samples(sorted(shuffled[:k]), GOOD, GOOD, None)
        train = sorted(shuffled[k:])

    test_dir = root / "test"
    test: list[Sample] = []
    if test_dir.is_dir():
        test = _load_labelled_split(test_dir, _test_ground_truth(root, test_dir), allow_unknown=True)
    train_samples = _samples(train, GOOD, GOOD, None)
    return Dataset(root.resolve().name, root, tuple(train_samples), tuple(calibration), tuple(test))


# --- flat folders -------------------------------------------------------------------------------------------------


def split_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """Split ``n`` items by ``ratios`` into counts that sum to ``n``.

    Largest-remainder rounding (ties go to the earlier split); then each split with a non-zero ratio
    but no item takes one from the largest split, if that can spare it. Earlier splits are served first.
    """
    total = sum(ratios)
    exact = [r / total * n for r in ratios]
    counts = [math.floor(x) for x in exact]
    # Rounded so that float noise (2 * 0.7 - 1 = 0.3999...) does not break ties against the earlier split.
    by_remainder = sorted(range(len(ratios)), key=lambda i: (-round(exact[i] - counts[i], 9), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    for i, ratio in enumerate(ratios):
        if ratio > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] = 1
    return counts


def _check_split(split: Sequence[float]) -> None:
    if len(split) != 3 or any(not math.isfinite(r) or r < 0 for r in split):
        raise DatasetError(f"split must be three non-negative fractions (train, calibration, test), got {split}")
    if not math.isclose(sum(split), 1.0, abs_tol=1e-6):
        raise DatasetError(f"split fractions must sum to 1, got {split} (sum {sum(split):g})")
    if split[0] <= 0:
        raise DatasetError(f"split must give the train split a fraction above 0, got {split}")


def load_folder(
    normal_dir: str | Path,
    *,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    unknown_dir: str | Path | None = None,
    split: Sequence[float] = (0.7, 0.1, 0.2),
    abnormal_calibration_fraction: float = 0.3,
    seed: int = 0,
    name: str | None = None,
) -> Dataset:
    """Load flat folders of images.

    Good images are split train/calibration/test by ``split`` (counts by largest remainder; a
    non-zero fraction gets at least one image when another split can spare it). Defect images
    (``defect_type`` = the folder's name) go to calibration (``abnormal_calibration_fraction``,
    rounded half up) and test. Masks in ``mask_dir`` pair with defect images by stem
    (``<stem>.png`` or ``<stem>_mask.png``). Unlabelled images all go to test. Deterministic given ``seed``.

    Raises:
        DatasetError: a folder is missing or empty, the fractions are invalid, or masks do not pair up.

    """
    _check_split(split)
    _check_fraction("abnormal_calibration_fraction", abnormal_calibration_fraction, allow_one=True)
    normal_dir = Path(normal_dir)
    dirs = {"normal_dir": normal_dir}
    for key, value in (("abnormal_dir", abnormal_dir), ("mask_dir", mask_dir), ("unknown_dir", unknown_dir)):
        if value is not None:
            dirs[key] = Path(value)
    if mask_dir is not None and abnormal_dir is None:
        raise DatasetError(f"mask_dir {mask_dir} given without abnormal_dir; masks belong to defect images")
    seen: dict[Path, str] = {}
    for key, folder in dirs.items():
        resolved = folder.resolve()
        if resolved in seen:
            raise DatasetError(f"{key} and {seen[resolved]} are the same folder ({folder}); give each its own folder")
        seen[resolved] = key

    normal = _require_images(normal_dir, "good images")
    n_train, n_cal, _ = split_counts(len(normal), split)
    shuffled = _shuffled(normal, seed)
    good_train = sorted(shuffled[:n_train])
    good_cal = _samples(sorted(shuffled[n_train : n_train + n_cal]), GOOD, GOOD, None)
    good_test = _samples(sorted(shuffled[n_train + n_cal :]), GOOD, GOOD, None)

    bad_cal: list[Sample] = []
    bad_test: list[Sample] = []
    if abnormal_dir is not None:
        abnormal_dir = Path(abnormal_dir)
        abnormal = _require_images(abnormal_dir, "defect images")
        masks = _pair_masks(abnormal, abnormal_dir, Path(mask_dir)) if mask_dir is not None else None
        shuffled = _shuffled(abnormal, seed + 1)  # its own stream: adding good images leaves this split alone
        k = _holdout_count(len(shuffled), abnormal_calibration_fraction)
        defect_type = abnormal_dir.resolve().name
        bad_cal = _samples(sorted(shuffled[:k]), "defect", defect_type, masks)
        bad_test = _samples(sorted(shuffled[k:]), "defect", defect_type, masks)
    unknown = _samples(list_images(unknown_dir), UNKNOWN, UNKNOWN, None) if unknown_dir is not None else []

    root = Path(os.path.commonpath([str(p.resolve()) for p in dirs.values()]))
    return Dataset(
        name or normal_dir.resolve().name,
        root,
        tuple(_samples(good_train, GOOD, GOOD, None)),
        tuple(good_cal + bad_cal),
        tuple(good_test + bad_test + unknown),
    )


# --- layout detection ---------------------------------------------------------------------------------------------


def load_dataset(path: str | Path, *, calibration_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Load ``path`` in whichever layout it has.

    An MVTec category (has ``train/``) goes to ``load_mvtec``; a dataset root holding exactly one
    such category is accepted too; a flat folder of good images goes to ``load_folder``, which
    holds ``calibration_fraction`` of them out for calibration and keeps no test split (a folder
    of good images has nothing to evaluate on).
    """
    path = Path(path)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise DatasetError(f"{path}: {what}; expected an MVTec category folder or a folder of good images")
    if (path / "train").is_dir():
        return load_mvtec(path, calibration_fraction=calibration_fraction, seed=seed)
    if list_images(path):
        _check_fraction("calibration_fraction", calibration_fraction, allow_one=False)
        return load_folder(path, split=(1.0 - calibration_fraction, calibration_fraction, 0.0), seed=seed)
    categories = [p for p in _subfolders(path) if (p / "train").is_dir()]
    if len(categories) == 1:
        return load_mvtec(categories[0], calibration_fraction=calibration_fraction, seed=seed)
    if categories:
        names = ", ".join(p.name for p in categories)
        raise DatasetError(f"{path}: holds several categories ({names}); pass one of them, e.g. {categories[0]}")
    raise DatasetError(
        f"{path}: no dataset found; expected an MVTec category (train/good/, test/...), a root holding one "
        "such category, or a folder of good images"
    )
