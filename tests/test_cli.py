"""The ``appliance`` command line end to end on real images: the bundled ball-screw sample.

Real OpenVINO, FAISS, PNG/JPEG files and bundles on disk; the CLI is driven through typer's runner.
One model is fitted per module (a few seconds) and shared by the tests.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from appliance.cli import SAMPLE_DIR, app
from appliance.metrics import image_auroc
from appliance.overlay import read_overlay_metadata

runner = CliRunner()
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsdata" / "ball_screw"


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "bundle"
    code, text = invoke("fit", SAMPLE_DIR, "--out", out, "--size", "128", "--calibration-fraction", "0.15", "-q")
    assert code == 0, text
    assert "bundle" in text and "calib" in text
    return out


def test_fit_writes_a_bundle_that_verifies(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["scorer"]["type"] == "patchcore"
    assert manifest["preprocess"]["size"][0] == 128
    assert manifest["preprocess"]["size"][1] == 320  # 1130x460 keeps its aspect ratio: 128 * 2.457 -> 320
    assert manifest["calibration"]["method"] == "false_reject_rate"  # no labelled defects in train/good
    code, text = invoke("bundle", "verify", bundle)
    assert code == 0 and "golden" in text, text


def test_tiling_without_a_size_works_at_the_frames_own_resolution(tmp_path: Path) -> None:
    out = tmp_path / "tiled"
    code, text = invoke("fit", SAMPLE_DIR, "--out", out, "--tile", "240x288", "--overlap", "16",
                        "--calibration-fraction", "0.15", "-q", "--no-position-norm")
    assert code == 0, text
    preprocess = json.loads((out / "manifest.json").read_text())["preprocess"]
    assert preprocess["size"] == [448, 1104]  # 460 rounded down to a multiple of 16; 1130x460 aspect kept
    assert preprocess["tile"] == [240, 288]


def test_predict_json_scores_real_defects_above_good_images(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    code, text = invoke("predict", bundle, SAMPLE_DIR / "test" / "good", SAMPLE_DIR / "test" / "pitting",
                        "--format", "json", "--output", out, "--out-dir", tmp_path / "overlays")
    assert code == 0, text
    doc = json.loads(out.read_text())
    results = doc["results"]
    n_test = len(list(SAMPLE_DIR.glob("test/*/*.jpg")))
    assert len(results) == n_test and doc["summary"]["total"] == n_test
    labels = [1 if "/pitting/" in r["path"] else 0 for r in results]
    # Real pitting should rank above real good images for most pairs (not a fixed number: a real measurement).
    assert image_auroc(labels, [r["score"] for r in results]) > 0.7
    for r in results:
        assert 0.0 <= r["score"] <= 1.0 and r["verdict"] in ("ok", "ng")
        assert (r["verdict"] == "ng") == (r["score"] >= r["threshold"])
        meta = read_overlay_metadata(r["overlay"])
        assert meta["model_id"] == r["model_id"] and meta["verdict"] == r["verdict"]
        assert meta["score"] == pytest.approx(r["score"])


def test_predict_skips_and_reports_bad_files(bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good = next((SAMPLE_DIR / "test" / "good").glob("*.jpg"))
    shutil.copy(good, folder / "ok.jpg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(good.read_bytes()[:200])
    code, text = invoke("predict", bundle, folder, tmp_path / "missing.png", "--format", "csv")
    assert code == 1  # it ran, but inputs failed: never a silent success
    rows = list(csv.DictReader(io.StringIO(text[text.index("path"):])))
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["ok.jpg"]["verdict"] in ("ok", "ng")
    for name in ("empty.png", "corrupt.jpg", "missing.png"):
        assert by_name[name]["verdict"] == "error" and by_name[name]["error"]
    assert "0 bytes" in by_name["empty.png"]["error"]


def test_eval_reports_image_and_pixel_metrics(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    code, text = invoke("eval", bundle, SAMPLE_DIR, "--json", out, "-q")
    assert code == 0, text
    assert "pitting" in text and "img_auroc" in text
    doc = json.loads(out.read_text())
    overall = doc["summary"]["overall"]
    n_good, n_defect = (len(list(SAMPLE_DIR.glob(f"test/{t}/*.jpg"))) for t in ("good", "pitting"))
    assert overall["n_good"] == n_good and overall["n_defect"] == n_defect
    assert 0.5 < overall["pixel_auroc"] <= 1.0 and 0.0 < overall["pro"] <= 1.0
    assert len(doc["images"]) == n_good + n_defect


def test_tampered_bundle_is_refused_with_exit_code_2(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    bank = copy / "scorer" / "bank.npy"
    data = bytearray(bank.read_bytes())
    data[-1] ^= 0xFF
    bank.write_bytes(bytes(data))
    code, text = invoke("predict", copy, SAMPLE_DIR / "test" / "good")
    assert code == 2 and "sha256" in text


def test_fit_on_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    code, text = invoke("fit", tmp_path / "nowhere", "--out", tmp_path / "b")
    assert code == 2 and "nowhere" in text


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/bsdata/ball_screw not present")
def test_padim_on_the_full_ball_screw_set(tmp_path: Path) -> None:
    """A real fit and eval on the shared data (557 train, 298 test images) at a small size."""
    code, text = invoke("fit", SHARED, "--out", tmp_path / "b", "--scorer", "padim", "--size", "128", "-q")
    assert code == 0, text
    code, text = invoke("eval", tmp_path / "b", SHARED, "--json", tmp_path / "e.json", "-q")
    assert code == 0, text
    overall = json.loads((tmp_path / "e.json").read_text())["summary"]["overall"]
    assert overall["n_good"] == 131 and overall["n_defect"] == 167
    assert overall["image_auroc"] > 0.85 and overall["pixel_auroc"] > 0.95


# --- never succeed silently ---------------------------------------------------------------------------------------


def test_fit_on_a_plain_folder_of_good_images(tmp_path: Path) -> None:
    """The README's own example: a folder of good images, no layout (this crashed with a TypeError)."""
    folder = tmp_path / "good"
    shutil.copytree(SAMPLE_DIR / "train" / "good", folder)
    code, text = invoke("fit", folder, "--out", tmp_path / "b", "--size", "64", "--scorer", "padim", "-q")
    assert code == 0, text
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    n = len(list(folder.iterdir()))
    images = manifest["training"]["images"]
    assert images["train"] + images["calibration_good"] == n and images["calibration_good"] >= 2


@pytest.mark.parametrize(("setting", "says"), [("coreset_ratio=abc", "coreset_ratio = 'abc'"),
                                               ("coreset_ratio=2", "coreset_ratio must be in (0, 1]"),
                                               ("reweight=maybe", "valid boolean"),
                                               ("no_such_key=1", "unknown setting")])
def test_a_bad_scorer_setting_is_a_clear_error_not_a_traceback(tmp_path: Path, setting: str, says: str) -> None:
    result = runner.invoke(app, ["fit", str(SAMPLE_DIR), "--out", str(tmp_path / "b"), "--set", setting, "-q"])
    assert result.exit_code == 2 and says in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert not (tmp_path / "b").exists()


def test_set_parses_booleans_as_booleans(tmp_path: Path) -> None:
    code, text = invoke("fit", SAMPLE_DIR, "--out", tmp_path / "b", "--size", "64", "--set", "reweight=no",
                        "--set", "coreset_ratio=0.05", "-q")
    assert code == 0, text
    config = json.loads((tmp_path / "b" / "manifest.json").read_text())["scorer"]["config"]
    assert config["reweight"] is False and config["coreset_ratio"] == 0.05


def test_predict_on_a_missing_path_fails(bundle: Path, tmp_path: Path) -> None:
    code, text = invoke("predict", bundle, tmp_path / "nonexistent")
    assert code == 1 and "nonexistent" in text and "could not be scored" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = invoke("predict", bundle, empty)
    assert code == 1 and "no image files" in text


def mixed_crops(src: Path, dst: Path, seed: int = 0) -> Path:
    """A grey MVTec copy of ``src`` whose images are crops of widths varying by up to 4x (masks cropped alike)."""
    rng = np.random.default_rng(seed)
    for image_path in sorted(src.glob("t*/*/*.jpg")):
        rel = image_path.relative_to(src)
        image = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
        mask_path = src / "ground_truth" / rel.parent.name / f"{image_path.stem}_mask.png"
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) if mask_path.exists() else None
        w = image.shape[1]
        cw = int(rng.integers(w // 4, w + 1))
        x = int(rng.integers(0, w - cw + 1))
        if mask is not None:  # keep the whole defect inside the crop
            xs = np.nonzero(mask.any(0))[0]
            cw = max(cw, int(xs.max() - xs.min() + 1))
            x = int(np.clip(x, xs.max() + 1 - cw, xs.min()))
        out = dst / rel.with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), image[:, x : x + cw])
        if mask is not None:
            mask_out = dst / "ground_truth" / rel.parent.name / f"{image_path.stem}_mask.png"
            mask_out.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(mask_out), mask[:, x : x + cw])
    return dst


@pytest.mark.parametrize("resize", ["auto", "letterbox"])
def test_frames_of_varying_size_are_all_used(tmp_path: Path, resize: str) -> None:
    data = mixed_crops(SAMPLE_DIR, tmp_path / "mixed")
    widths = {cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).shape[1] for p in data.glob("train/good/*.png")}
    assert len(widths) > 10
    code, text = invoke("fit", data, "--out", tmp_path / "b", "--size", "96", "--resize", resize,
                        "--calibration-fraction", "0.15", "-q")
    assert code == 0, text
    assert ("resize   stretch: training image sizes vary" if resize == "auto" else "letterbox (asked for)") in text
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["training"]["skipped"] == []
    n_train = len(list(data.glob("train/good/*.png")))
    images = manifest["training"]["images"]
    assert images["train"] + images["calibration_good"] == n_train
    assert manifest["preprocess"]["resize"] == ("stretch" if resize == "auto" else "letterbox")
    code, text = invoke("eval", tmp_path / "b", data, "--json", tmp_path / "e.json", "-q")
    assert code == 0, text  # masks have their own image's size, whatever the first image's
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["skipped"] == [] and len(doc["images"]) == len(list(data.glob("test/*/*.png")))
    overall = doc["summary"]["overall"]
    assert overall["image_auroc"] > 0.6 and overall["pixel_auroc"] > 0.7


def test_eval_fails_when_too_many_test_images_are_unreadable(bundle: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DIR, data)
    n = len(list(data.glob("test/*/*.jpg")))
    broken = n // 10  # 10 % of the test split: above the 5 % a result may lose
    for i in range(broken):
        (data / "test" / "good" / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really")
    code, text = invoke("eval", bundle, data, "-q")
    assert code == 1 and f"{broken} of {n + broken} test images" in text
    assert "do not describe the whole test split" in text
    (data / "test" / "good" / "broken0.jpg").rename(data / "test" / "good" / "broken0.jpg.bak")
    for i in range(1, broken):
        (data / "test" / "good" / f"broken{i}.jpg").unlink()
    (data / "test" / "good" / "broken.jpg").write_bytes(b"")  # one in n + 1: under the share, still listed
    code, text = invoke("eval", bundle, data, "-q")
    assert code == 0 and "skipped" in text and "broken.jpg" in text
