"""Which resize policy a fit uses, decided from the training images' sizes before any work starts.

A fit used to take the first image's geometry and skip every image of another aspect ratio;
on crops of varying size that silently dropped most of the training set. Now the sizes of
all training images are read first (file headers only), and the policy follows from them:
one aspect ratio means a fixed camera (``fixed``), several mean crops of varying extent
(``stretch``, as anomalib does). ``letterbox`` is there to be asked for. The choice and its
reason are printed and recorded in the bundle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ApplianceError, DatasetError
from .imaging import image_size
from .preprocess import ASPECT_TOLERANCE, RESIZE_POLICIES


@dataclass(frozen=True)
class Geometry:
    """The fit's frame geometry.

    Attributes:
        resize: ``fixed``, ``stretch`` or ``letterbox``.
        source_size: ``(H, W)``: the frames' size (``fixed``) or the median size (otherwise).
        aspect: working aspect ratio (width / height) of the (ROI's) frames, or their median.
        reason: one line saying why, for the terminal and the bundle.
        unreadable: ``(path, reason)`` of training images whose size could not be read.

    """

    resize: str
    source_size: tuple[int, int]
    aspect: float
    reason: str
    unreadable: tuple[tuple[str, str], ...] = ()


def survey(paths: Sequence[Path]) -> tuple[list[tuple[int, int]], list[tuple[str, str]]]:
    """``(H, W)`` of every readable image, and ``(path, reason)`` of the others."""
    sizes, bad = [], []
    for path in paths:
        try:
            sizes.append(image_size(path))
        except ApplianceError as exc:
            bad.append((str(path), str(exc)))
    return sizes, bad


def _span(values: np.ndarray, fmt: str = "{:.0f}") -> str:
    lo, hi = values.min(), values.max()
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def choose(paths: Sequence[Path], requested: str | None = None,
           roi: tuple[int, int, int, int] | None = None) -> Geometry:
    """The resize policy for training images ``paths`` (``requested``: ``None``/``auto`` or a policy).

    Raises:
        DatasetError: no image size is readable, or ``fixed`` (or an ROI) was asked for frames
            whose aspect ratios differ.

    """
    if requested not in (None, "auto", *RESIZE_POLICIES):
        raise DatasetError(f"resize must be auto or one of {RESIZE_POLICIES}, got {requested!r}")
    sizes, bad = survey(paths)
    if not sizes:
        shown = "; ".join(r for _, r in bad[:3])
        raise DatasetError(f"none of the {len(paths)} training images can be read: {shown}")
    hw = np.array(sizes, np.float64)
    aspects = hw[:, 1] / hw[:, 0]
    median_aspect = float(np.median(aspects))
    one_geometry = bool(np.all(np.abs(aspects - median_aspect) <= ASPECT_TOLERANCE * median_aspect))
    common = Counter(sizes).most_common(1)[0][0]
    n = len(sizes)
    described = (f"all {n} training images are {common[1]}x{common[0]}" if len(set(sizes)) == 1 else
                 f"all {n} training images have aspect ratio {median_aspect:.3g} (widths {_span(hw[:, 1])}, "
                 f"heights {_span(hw[:, 0])})")
    varied = (f"training image sizes vary (widths {_span(hw[:, 1])}, heights {_span(hw[:, 0])}, "
              f"aspect ratios {_span(aspects, '{:.2g}')})")
    policy = requested if requested in RESIZE_POLICIES else None
    if roi is not None or policy == "fixed":
        if not one_geometry:
            odd = int(np.sum(np.abs(aspects - median_aspect) > ASPECT_TOLERANCE * median_aspect))
            what = "an ROI needs" if roi is not None else "resize 'fixed' needs"
            raise DatasetError(f"{what} frames of one aspect ratio, but {varied}: {odd} of {n} differ from the "
                               "median; fit with --resize stretch or --resize letterbox")
        aspect = roi[2] / roi[3] if roi is not None else median_aspect
        return Geometry("fixed", common, aspect, f"fixed: {described}", tuple(bad))
    median = (int(np.median(hw[:, 0])), int(np.median(hw[:, 1])))
    if policy is None:
        if one_geometry:
            return Geometry("fixed", common, median_aspect,
                            f"fixed: {described} (a fixed camera); --resize stretch or letterbox for frames "
                            "of varying size", tuple(bad))
        return Geometry("stretch", median, median_aspect,
                        f"stretch: {varied}; each frame is stretched to the working size at their median aspect "
                        "ratio, as anomalib does; --resize letterbox keeps each frame's aspect ratio", tuple(bad))
    note = ("each frame is stretched to the working size" if policy == "stretch" else
            "each frame is scaled to fit the working size, aspect ratio kept, the rest padded and not scored")
    seen = described if one_geometry else varied
    return Geometry(policy, median, median_aspect, f"{policy} (asked for): {note}; {seen}", tuple(bad))
