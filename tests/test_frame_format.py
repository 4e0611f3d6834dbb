"""Frame formats on real files: what a fit records, what it refuses to mix, and what a grey-converting model does."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.datasets import load_mvtec
from appliance.errors import ConfigError, DatasetError
from appliance.frame_format import FrameFormat, of_headers, survey
from appliance.imaging import ImageHeader, read_image
from appliance.training import FitOptions, fit

SHAPE = (96, 160)
OPTIONS = FitOptions(height=96, settings={"coreset_ratio": 0.1}, golden=2, position_norm=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 4, "bits": 8}, r"channels must be 1 \(grey\) or 3 \(RGB\), got 4"),
        ({"channels": 3, "bits": 12}, "bits must be 8 or 16, got 12"),
        ({"channels": 1, "bits": 8, "convert": "rgb"}, r"convert must be one of \('refuse', 'grey'\), got 'rgb'"),
        ({"channels": 3, "bits": 8, "convert": "grey"}, "convert 'grey' gives grey frames"),
    ],
)
def test_frame_format_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FrameFormat(**kwargs)


def _headers(*kinds: tuple[int, int]) -> list[tuple[Path, ImageHeader]]:
    return [(Path(f"img{i}.png"), ImageHeader(10, 10, c, b, "PNG")) for i, (c, b) in enumerate(kinds)]


def test_one_format_is_recorded_and_a_mix_is_refused_naming_files_of_each_kind() -> None:
    assert of_headers(_headers((3, 8), (3, 8))) == FrameFormat(3, 8, "refuse")
    assert of_headers(_headers((1, 16), (1, 16))) == FrameFormat(1, 16)
    with pytest.raises(DatasetError, match=r"mix frame formats: 2 RGB 8-bit \(e\.g\. img0\.png\); 1 grey 8-bit "
                                           r"\(e\.g\. img2\.png\); .*fit with --frame-convert grey"):
        of_headers(_headers((3, 8), (3, 8), (1, 8)))
    assert of_headers(_headers((3, 8), (1, 8)), "grey") == FrameFormat(1, 8, "grey")  # grey makes them alike
    with pytest.raises(DatasetError, match=r"1 grey 16-bit \(e\.g\. img1\.png\); a model takes one: convert them "
                                           "to one bit depth"):
        of_headers(_headers((3, 8), (3, 16)), "grey")  # a bit depth is never guessed


def test_survey_reads_real_files_and_leaves_unreadable_ones_to_the_geometry(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint16))
    cv2.imwrite(str(tmp_path / "b.tif"), np.zeros((8, 8), np.uint16))
    (tmp_path / "c.png").write_bytes(b"not a png")
    assert survey(sorted(tmp_path.iterdir())) == FrameFormat(1, 16)


def _category(root: Path, textures, grey_every: int = 0) -> Path:
    """train/good (16) and validation/good (4) of one textured part; every ``grey_every``-th image saved grey."""
    rng = np.random.default_rng(3)
    for split, count in (("train", 16), ("validation", 4)):
        folder = root / split / "good"
        folder.mkdir(parents=True)
        for i in range(count):
            bgr = cv2.cvtColor(textures.good(rng, SHAPE), cv2.COLOR_RGB2BGR)
            grey = grey_every and i % grey_every == 0
            assert cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) if grey else bgr)
    return root


def test_fit_refuses_a_training_set_that_mixes_grey_and_colour(tmp_path: Path, textures) -> None:
    dataset = load_mvtec(_category(tmp_path / "mixed", textures, grey_every=4))
    with pytest.raises(DatasetError, match=r"training images mix frame formats: 12 RGB 8-bit \(e\.g\. .*001\.png\); "
                                           r"4 grey 8-bit \(e\.g\. .*000\.png\)"):
        fit(dataset, tmp_path / "model", OPTIONS)
    assert not (tmp_path / "model").exists()


def test_a_grey_converting_fit_takes_the_mix_and_scores_colour_and_grey_alike(tmp_path: Path, textures) -> None:
    dataset = load_mvtec(_category(tmp_path / "mixed", textures, grey_every=4))
    options = FitOptions(**{**OPTIONS.__dict__, "frame_convert": "grey"})
    lines: list[str] = []
    report = fit(dataset, tmp_path / "model", options, notify=lines.append)
    assert "frames   grey 8-bit (every frame is converted to grey first)" in lines
    manifest = json.loads((report.bundle / "manifest.json").read_text())
    assert manifest["preprocess"]["frame"] == {"channels": 1, "bits": 8, "convert": "grey"}
    rgb = read_image(dataset.calibration[1].path)
    assert rgb.ndim == 3
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    assert report.engine.predict(rgb).score.image_score == pytest.approx(
        report.engine.predict(grey).score.image_score, rel=1e-6)
