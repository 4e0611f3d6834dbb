"""Overlay rendering and overlay PNG files with EXIF, written and read back for real."""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import piexif
import piexif.helper
import pytest
from PIL import Image

from appliance import __version__, atomic, overlay, png
from appliance.errors import ApplianceError, ImageError
from appliance.imaging import to_rgb8
from appliance.overlay import (
    CONTOUR_RGB,
    REQUIRED_KEYS,
    VERDICT_RGB,
    overlay_metadata,
    read_overlay_metadata,
    render_overlay,
    save_overlay,
)
from appliance.types import Decision, Frame, Prediction, Score

KW = {"score": 0.734, "threshold": 0.5, "verdict": "ng", "model_id": "patchcore-test-1"}


def textured(h, w, dtype=np.uint8, rgb=False):
    yy, xx = np.mgrid[0:h, 0:w]
    top = 65535 if dtype == np.uint16 else 255
    grey = ((np.sin(xx / 7.0) + np.cos(yy / 5.0) + 2) / 4 * top).astype(dtype)
    return np.stack([grey, grey[::-1], grey[:, ::-1]], axis=2) if rgb else grey


def blob_map(h, w, cy, cx, peak=0.9, base=0.1, sigma=6.0):
    yy, xx = np.mgrid[0:h, 0:w]
    return (base + (peak - base) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))).astype(np.float32)


def contour_pixels(img):
    return np.all(img == np.array(CONTOUR_RGB, np.uint8), axis=2)


def prediction(score=0.734, threshold=0.5, raw=12.5, camera="cam-1", seq=7, source="/data/in/a.png"):
    frame = Frame(image=np.zeros((8, 8), np.uint8), camera=camera, seq=seq, timestamp=1_750_000_000.25,
                  source=source)
    decision = Decision(score=score, threshold=threshold, anomalous=score >= threshold, threshold_source="camera")
    return Prediction(frame, Score(raw, np.zeros((1, 1), np.float32)), decision, "patchcore-test-1",
                      {"preprocess": 1.234, "backbone": 20.5, "scorer": 3.0, "total": 24.734})


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(("dtype", "rgb"), [(np.uint8, False), (np.uint8, True), (np.uint16, False),
                                            (np.uint16, True)])
def test_render_keeps_frame_size_and_pixels_under_a_banner(dtype, rgb):
    image = textured(90, 160, dtype, rgb)
    out = render_overlay(image, np.zeros((90, 160), np.float32), **KW)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[1] == 160 and out.shape[0] > 90  # banner strip above the frame
    # A map far below the threshold leaves the frame untouched.
    np.testing.assert_array_equal(out[-90:], to_rgb8(image))


@pytest.mark.parametrize(("h", "w"), [(600, 1800), (1800, 600), (1000, 1000)])
def test_max_side_bounds_the_whole_overlay(h, w):
    image = textured(h, w)
    out = render_overlay(image, blob_map(h, w, h // 2, w // 2, sigma=40), **KW, max_side=320)
    assert max(out.shape[:2]) <= 320
    assert max(out.shape[:2]) >= 300  # and uses the room it has
    banner = out.shape[0] - round(out.shape[1] * h / w)
    assert 0 < banner < out.shape[0] // 2 + 60


def test_max_side_none_keeps_size_and_small_frames_are_not_upscaled():
    image = textured(200, 300)
    for max_side in (None, 1280):
        out = render_overlay(image, np.zeros((200, 300), np.float32), **KW, max_side=max_side)
        assert out.shape[1] == 300


def test_font_scales_with_output_size():
    big = render_overlay(textured(720, 1280), np.zeros((720, 1280), np.float32), **KW)
    small = render_overlay(textured(720, 1280), np.zeros((720, 1280), np.float32), **KW, max_side=400)
    big_banner = big.shape[0] - 720
    small_banner = small.shape[0] - round(small.shape[1] * 720 / 1280)
    assert big_banner > small_banner >= 20


def test_contours_only_where_the_map_crosses_the_threshold():
    image = textured(120, 160)
    below = blob_map(120, 160, 60, 100, peak=0.49)
    above = blob_map(120, 160, 60, 100, peak=0.9)

    out = render_overlay(image, below, **KW, max_side=None)
    assert not contour_pixels(out).any()

    out = render_overlay(image, above, **KW, max_side=None)
    frame = out[-120:]
    ys, xs = np.nonzero(contour_pixels(frame))
    assert ys.size > 0
    assert not contour_pixels(out[:-120]).any()  # none in the banner
    region = above >= 0.5
    ry, rx = np.nonzero(region)
    assert ys.min() >= ry.min() - 2 and ys.max() <= ry.max() + 2
    assert xs.min() >= rx.min() - 2 and xs.max() <= rx.max() + 2

    # The threshold in force, not 0.5, decides what is outlined.
    out = render_overlay(image, above, **{**KW, "threshold": 0.95}, max_side=None)
    assert not contour_pixels(out).any()


def test_tiny_region_survives_downscaling():
    h, w = 1200, 1600
    anomaly = np.full((h, w), 0.1, np.float32)
    anomaly[600, 800] = 0.8  # one source pixel
    out = render_overlay(textured(h, w), anomaly, **KW, max_side=400)
    assert contour_pixels(out).sum() > 10


def test_heat_fades_in_below_threshold():
    image = np.full((50, 50), 128, np.uint8)
    diff = [np.abs(render_overlay(image, np.full((50, 50), v, np.float32), **KW, max_side=None)[-50:].astype(int)
                   - 128).mean() for v in (0.0, 0.3, 0.45, 0.6)]
    assert diff[0] == 0
    assert diff[0] < diff[1] < diff[2] < diff[3]


@pytest.mark.parametrize("verdict", ["ng", "ok"])
def test_banner_verdict_is_colour_coded(verdict):
    out = render_overlay(textured(100, 400), np.zeros((100, 400), np.float32), **{**KW, "verdict": verdict})
    banner = out[:-100].astype(int)

    def has(rgb):
        return (np.abs(banner - np.array(rgb)).sum(axis=2) < 30).sum() > 20

    other = "ok" if verdict == "ng" else "ng"
    assert has(VERDICT_RGB[verdict])
    assert not has(VERDICT_RGB[other])


def test_render_rejects_mismatched_map():
    with pytest.raises(ValueError, match="anomaly_map"):
        render_overlay(textured(40, 50), np.zeros((50, 40), np.float32), **KW)
    with pytest.raises(ValueError, match="threshold"):
        render_overlay(textured(40, 50), np.zeros((40, 50), np.float32), **{**KW, "threshold": 50.0})


# --------------------------------------------------------------------------- files


def metadata():
    return {**overlay_metadata(prediction()), "camera": "Linie-Ä"}


def test_overlay_metadata_has_the_required_keys():
    md = overlay_metadata(prediction())
    assert set(REQUIRED_KEYS) <= set(md)
    assert md["verdict"] == "ng" and md["raw_score"] == 12.5 and md["source"] == "/data/in/a.png"


def test_save_round_trip(tmp_path):
    out = render_overlay(textured(60, 80, rgb=True), blob_map(60, 80, 30, 40), **KW)
    md = metadata()
    path = save_overlay(tmp_path / "a" / "b" / "frame.png", out, md)
    assert path == tmp_path / "a" / "b" / "frame.png"
    assert read_overlay_metadata(path) == md

    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (out.shape[1], out.shape[0])
        np.testing.assert_array_equal(np.asarray(im), out)
        exif = piexif.load(im.info["exif"])
    assert exif["0th"][piexif.ImageIFD.Software] == f"anomaly-appliance {__version__}".encode()
    desc = exif["0th"][piexif.ImageIFD.ImageDescription].decode("ascii")
    assert desc.startswith("NG score 0.734 threshold 0.500 model patchcore-test-1")
    comment = piexif.helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment])
    assert json.loads(comment) == md
    assert exif["Exif"][piexif.ExifIFD.DateTimeOriginal] == b"2025:06:15 15:06:40"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_save_accepts_numpy_values_and_overwrites_atomically(tmp_path):
    path = tmp_path / "frame.png"
    first = np.zeros((10, 12, 3), np.uint8)
    save_overlay(path, first, metadata())
    second = np.full((10, 12, 3), 200, np.uint8)
    md = {**metadata(), "score": np.float32(0.25), "seq": np.int64(3), "source": Path("/x/y.png")}
    save_overlay(path, second, md)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame.png"]  # no temp files left
    back = read_overlay_metadata(path)
    assert back["score"] == 0.25 and back["seq"] == 3 and back["source"] == "/x/y.png"
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im), second)


def test_save_validates(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="model_id"):
        save_overlay(tmp_path / "x.png", img, {k: 1 for k in REQUIRED_KEYS if k != "model_id"})
    with pytest.raises(ValueError, match=r"\.png"):
        save_overlay(tmp_path / "x.jpg", img, metadata())
    with pytest.raises(ValueError, match="uint8"):
        save_overlay(tmp_path / "x.png", img.astype(np.uint16), metadata())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_raises_appliance_error_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "frame.png"
    save_overlay(path, np.zeros((8, 8, 3), np.uint8), metadata())
    before = path.read_bytes()
    real_mkstemp = tempfile.mkstemp

    def mkstemp_on_full_disk(*args, **kwargs):
        # A real temp file is created (and must be cleaned up), but its bytes go to /dev/full: ENOSPC.
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp_on_full_disk)
    with pytest.raises(ApplianceError, match="disk full") as info:
        save_overlay(path, np.full((64, 64, 3), 7, np.uint8), metadata())
    assert str(path) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame.png"]
    assert path.read_bytes() == before  # the old overlay is intact


def test_other_os_errors_stay_os_errors(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError) as info:
        save_overlay(tmp_path / "file" / "frame.png", np.zeros((4, 4, 3), np.uint8), metadata())
    assert not isinstance(info.value, ApplianceError)


def test_read_metadata_errors(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_overlay_metadata(tmp_path / "missing.png")
    plain = tmp_path / "plain.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(plain)
    with pytest.raises(ImageError, match="no overlay metadata"):
        read_overlay_metadata(plain)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        read_overlay_metadata(junk)


# --------------------------------------------------------------------------- drawn at panel size, encoded once


def test_blend_matches_a_float_reference():
    """The LUT blend (heat quantised to 256 levels) against the obvious float formula, pixel for pixel."""
    image = textured(120, 160, rgb=True)
    anomaly = blob_map(120, 160, 60, 90, peak=0.95, base=0.05, sigma=25)
    out = render_overlay(image, anomaly, **KW, max_side=None)[-120:]
    lo = KW["threshold"] - overlay.FADE_BELOW
    t = np.clip((anomaly - lo) / (KW["threshold"] - lo), 0, 1)
    weight = (0.45 * t * t * (3 - 2 * t))[..., None]
    colours = cv2.cvtColor(cv2.applyColorMap(np.round(anomaly * 255).astype(np.uint8), cv2.COLORMAP_JET),
                           cv2.COLOR_BGR2RGB)
    expected = np.round(image * (1 - weight) + colours * weight)
    outside = ~contour_pixels(out)
    diff = np.abs(out.astype(int) - expected)[outside]
    assert diff.max() <= 3 and diff.mean() < 0.5


@pytest.mark.parametrize(("shape", "panel"), [((460, 1130), (1024, 600)), ((600, 200), (1024, 600)),
                                              ((40, 60), (320, 200)), ((500, 500), (1024, 600))])
def test_render_panel_fills_the_panel_with_the_aspect_kept(shape, panel):
    width, height = panel
    h, w = shape
    out = overlay.render_panel(textured(h, w, rgb=True), blob_map(h, w, h // 2, w // 2, sigma=h / 8), width, height,
                               **KW)
    assert out.shape == (height, width, 3) and out.dtype == np.uint8
    content = ~np.all(out == np.array(overlay.PAD_RGB, np.uint8), axis=2)
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    assert rows[-1] - rows[0] + 1 == height or cols[-1] - cols[0] + 1 == width  # enlarged or shrunk to fit
    box = out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    banner = np.flatnonzero(np.all(box == np.array(overlay.BANNER_RGB, np.uint8), axis=2).mean(axis=1) > 0.2)
    frame_h = box.shape[0] - banner[-1] - 1
    assert abs((box.shape[1] / frame_h) / (w / h) - 1) < 0.02
    assert contour_pixels(out).any()


def test_a_panel_too_small_for_the_banner_still_holds_everything():
    out = overlay.render_panel(textured(300, 900), blob_map(300, 900, 150, 450, sigma=30), 64, 64,
                               **{**KW, "model_id": "a-very-long-model-identifier-2026-11-30"})
    assert out.shape == (64, 64, 3)


def test_encoded_overlay_is_a_standard_png_with_the_metadata(monkeypatch):
    img = overlay.render_panel(textured(46, 113, rgb=True), blob_map(46, 113, 20, 50), 256, 150, **KW)
    md = metadata()
    for deflate in ("installed", "zlib"):
        if deflate == "zlib":  # what a device without ISA-L writes
            monkeypatch.setattr(png, "COMPRESS", zlib.compress)
        data = overlay.encode_overlay(img, md)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # chunk CRCs and structure
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), img)
        np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1], img)
        assert overlay.png_overlay_metadata(data) == md


def test_png_overlay_metadata_errors():
    with pytest.raises(ImageError, match="not a readable image"):
        overlay.png_overlay_metadata(b"not a png")
    plain = png.encode_png(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ImageError, match="no overlay metadata"):
        overlay.png_overlay_metadata(plain)
