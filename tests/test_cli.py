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
    assert len(results) == 14 and doc["summary"]["total"] == 14
    labels = [1 if "/pitting/" in r["path"] else 0 for r in results]
    # Real pitting should rank above real good images for most pairs (not a fixed number: a real measurement).
    assert image_auroc(labels, [r["score"] for r in results]) > 0.7
    for r in results:
        assert 0.0 <= r["score"] <= 1.0 and r["verdict"] in ("good", "anomalous")
        assert (r["verdict"] == "anomalous") == (r["score"] >= r["threshold"])
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
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(text[text.index("path"):])))
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["ok.jpg"]["verdict"] in ("good", "anomalous")
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
    assert overall["n_good"] == 6 and overall["n_defect"] == 8
    assert 0.5 < overall["pixel_auroc"] <= 1.0 and 0.0 < overall["pro"] <= 1.0
    assert len(doc["images"]) == 14


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
