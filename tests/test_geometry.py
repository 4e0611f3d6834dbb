"""Choosing the resize policy from the training images' sizes, before any work."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.errors import DatasetError
from appliance.geometry import choose


def write(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"{i:03d}.png"
        assert cv2.imwrite(str(path), np.full((h, w), 100 + i, np.uint8))
        paths.append(path)
    return paths


def test_one_geometry_is_a_fixed_camera(tmp_path: Path) -> None:
    g = choose(write(tmp_path, [(46, 113)] * 5))
    assert (g.resize, g.source_size) == ("fixed", (46, 113))
    assert g.reason.startswith("fixed: all 5 training images are 113x46")
    assert g.aspect == pytest.approx(113 / 46)


def test_same_aspect_at_several_resolutions_is_still_fixed(tmp_path: Path) -> None:
    g = choose(write(tmp_path, [(46, 113), (92, 226), (92, 226)]))
    assert g.resize == "fixed" and g.source_size == (92, 226) and "aspect ratio 2.46" in g.reason


def test_varying_sizes_are_stretched_at_their_median_aspect(tmp_path: Path) -> None:
    sizes = [(60, 40), (60, 120), (60, 240), (60, 100), (60, 60)]
    g = choose(write(tmp_path, sizes))
    assert g.resize == "stretch" and g.source_size == (60, 100)
    assert g.aspect == pytest.approx(100 / 60)
    assert "widths 40-240" in g.reason and "letterbox" in g.reason


def test_asked_for_policies_are_kept_and_fixed_refuses_varying_frames(tmp_path: Path) -> None:
    paths = write(tmp_path, [(60, 40), (60, 120), (60, 240)])
    assert choose(paths, "letterbox").resize == "letterbox"
    assert choose(paths, "stretch").reason.startswith("stretch (asked for)")
    with pytest.raises(DatasetError, match=r"resize 'fixed' needs frames of one aspect ratio.*2 of 3 differ"):
        choose(paths, "fixed")
    with pytest.raises(DatasetError, match="an ROI needs"):
        choose(paths, None, roi=(0, 0, 20, 20))
    with pytest.raises(DatasetError, match="resize must be auto or one of"):
        choose(paths, "squash")


def test_unreadable_images_are_reported_not_sized(tmp_path: Path) -> None:
    paths = write(tmp_path, [(30, 30)] * 3)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    g = choose([*paths, tmp_path / "empty.png", tmp_path / "junk.png"])
    assert g.resize == "fixed"
    reasons = dict(g.unreadable)
    assert "is empty (0 bytes)" in reasons[str(tmp_path / "empty.png")]
    assert "not a readable image" in reasons[str(tmp_path / "junk.png")]
    with pytest.raises(DatasetError, match="none of the 2 training images can be read"):
        choose([tmp_path / "empty.png", tmp_path / "junk.png"])
