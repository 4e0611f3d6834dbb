"""Reading real image files (PNG, JPEG, 16-bit, grey, RGBA, TIFF) and refusing broken ones with the file's name."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from appliance.errors import ImageError
from appliance.imaging import decode_image, is_image_file, read_image, read_mask, to_rgb8


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """A real photo (scikit-image's astronaut), small: 48x64 RGB uint8."""
    return np.ascontiguousarray(cv2.resize(data.astronaut(), (64, 48), interpolation=cv2.INTER_AREA))


def write(path: Path, pixels: np.ndarray, params: list[int] | None = None) -> Path:
    """Write with OpenCV (which expects BGR/BGRA channel order)."""
    assert cv2.imwrite(str(path), pixels, params or [])
    return path


# --- readable files -----------------------------------------------------------------------------------------------


def test_png_round_trip_is_exact_and_rgb_ordered(tmp_path: Path, rgb: np.ndarray) -> None:
    path = write(tmp_path / "a.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    got = read_image(path)
    assert got.dtype == np.uint8 and got.shape == (48, 64, 3) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, rgb)


def test_channel_order_is_rgb(tmp_path: Path) -> None:
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's order
    got = read_image(write(tmp_path / "red.png", bgr))
    assert (got[..., 0] == 200).all() and (got[..., 1:] == 0).all()


def test_jpeg_is_read_close_to_the_original(tmp_path: Path, rgb: np.ndarray) -> None:
    path = write(tmp_path / "a.jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    got = read_image(str(path))  # str paths work too
    assert got.dtype == np.uint8 and got.shape == rgb.shape
    error = np.abs(got.astype(int) - rgb).mean()
    assert error < 8 and error < 0.3 * np.abs(got[..., ::-1].astype(int) - rgb).mean()  # RGB, not BGR
    with Image.open(path) as pil:  # an independent decoder agrees up to IDCT rounding
        assert np.abs(np.asarray(pil.convert("RGB")).astype(int) - got).mean() < 1


def test_16_bit_png_keeps_16_bits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    got = read_image(write(tmp_path / "deep.png", pixels))
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, pixels[..., ::-1])
    grey = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    got = read_image(write(tmp_path / "deep_grey.png", grey))
    assert got.dtype == np.uint16 and got.shape == (20, 30)
    np.testing.assert_array_equal(got, grey)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".pgm"])
def test_grey_file_is_read_as_two_dimensional(tmp_path: Path, rgb: np.ndarray, suffix: str) -> None:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    got = read_image(write(tmp_path / f"g{suffix}", grey))
    assert got.shape == (48, 64) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, grey)


def test_rgba_drops_alpha(tmp_path: Path, rgb: np.ndarray) -> None:
    bgra = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
    bgra[..., 3] = np.random.default_rng(1).integers(0, 256, (48, 64))  # alpha must not change colours
    got = read_image(write(tmp_path / "alpha.png", bgra))
    assert got.shape == (48, 64, 3)
    np.testing.assert_array_equal(got, rgb)


def test_float_tiff_is_refused_with_advice(tmp_path: Path) -> None:
    path = write(tmp_path / "float.tif", np.random.default_rng(2).random((8, 8)).astype(np.float32))
    with pytest.raises(ImageError, match=r"floating-point pixels .* save it as 8- or 16-bit") as info:
        read_image(path)
    assert info.value.path == str(path)


def test_decode_image_from_bytes(rgb: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    np.testing.assert_array_equal(decode_image(encoded.tobytes()), rgb)
    with pytest.raises(ImageError, match="not a readable image") as info:
        decode_image(b"\x89PNG\r\n\x1a\n garbage")
    assert info.value.path is None


# --- unreadable files: each error names the file ------------------------------------------------------------------


def _broken(tmp_path: Path, kind: str, rgb: np.ndarray) -> Path:
    if kind == "missing":
        return tmp_path / "nowhere" / "missing.png"
    if kind == "directory":
        path = tmp_path / "folder.png"
        path.mkdir()
        return path
    path = tmp_path / f"{kind}.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(3).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    elif kind == "text":
        path.write_text("this is not an image\n")
    else:  # truncated after the header, mid-stream, and just before the end
        full = cv2.imencode(".png", rgb)[1].tobytes()
        path.write_bytes(full[: {"truncated_header": 40, "truncated_half": len(full) // 2,
                                 "truncated_end": len(full) - 20}[kind]])
    return path


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory, not an image file"),
        ("empty", r"is empty \(0 bytes\)"),
        ("garbage", "is not a readable image"),
        ("text", "is not a readable image"),
        ("truncated_header", "is not a readable image"),
        ("truncated_half", "is not a readable image"),
        ("truncated_end", "is not a readable image"),
    ],
)
def test_unreadable_files_raise_image_error_naming_the_file(tmp_path: Path, rgb: np.ndarray, kind: str,
                                                              reason: str) -> None:
    path = _broken(tmp_path, kind, rgb)
    with pytest.raises(ImageError, match=reason) as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)


def test_truncated_jpeg_is_refused(tmp_path: Path, rgb: np.ndarray) -> None:
    full = cv2.imencode(".jpg", rgb)[1].tobytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(full[: len(full) * 3 // 4])
    with pytest.raises(ImageError, match=r"cut\.jpg: is not a readable image"):
        read_image(path)


# --- masks --------------------------------------------------------------------------------------------------------


def test_read_mask_is_boolean_non_zero(tmp_path: Path) -> None:
    mask = np.zeros((10, 20), np.uint8)
    mask[2:4, 5:9] = 1  # any non-zero value is defect
    mask[7, 0] = 255
    got = read_mask(write(tmp_path / "m.png", mask), (10, 20))
    assert got.dtype == bool
    np.testing.assert_array_equal(got, mask > 0)


def test_read_mask_accepts_colour_masks(tmp_path: Path) -> None:
    mask = np.zeros((10, 20, 3), np.uint8)
    mask[1, 1, 0] = 9  # a single non-zero channel counts
    got = read_mask(write(tmp_path / "m.png", mask), (10, 20))
    assert got.sum() == 1 and got[1, 1]


def test_read_mask_size_mismatch_message(tmp_path: Path) -> None:
    path = write(tmp_path / "small_mask.png", np.zeros((10, 20), np.uint8))
    with pytest.raises(ImageError, match=r"mask is 20x10 but its image is 40x30 \(WxH\)") as info:
        read_mask(path, (30, 40))
    assert info.value.path == str(path) and "small_mask.png" in str(info.value)


# --- to_rgb8 ------------------------------------------------------------------------------------------------------


def test_to_rgb8_passes_8_bit_rgb_through_and_expands_grey() -> None:
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb8(rgb), rgb)
    np.testing.assert_array_equal(to_rgb8(rgb, white_level=100), rgb)  # ignored for 8-bit input
    grey = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    out = to_rgb8(grey)
    assert out.shape == (6, 7, 3) and out.flags.c_contiguous
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)
    strided = np.ascontiguousarray(rgb[:, ::-1])[:, ::-1]  # a non-contiguous view
    assert not strided.flags.c_contiguous and to_rgb8(strided).flags.c_contiguous


@pytest.mark.parametrize("white_level", [None, 65535, 4095, 1023, 1])
def test_to_rgb8_scales_16_bit_by_the_white_level(white_level: int | None) -> None:
    level = 65535 if white_level is None else white_level
    values = np.unique(np.r_[np.linspace(0, level, 50).round(), level + np.arange(0, 3), 65535]).astype(np.uint16)
    image = np.stack([values, values[::-1], values], -1)[None]  # 1 x n x 3
    got = to_rgb8(image, white_level)
    assert got.dtype == np.uint8
    expected = np.clip(np.round(image.astype(np.float64) * 255.0 / level), 0, 255)
    np.testing.assert_allclose(got, expected, atol=1)  # rounding of x.5 may go either way
    assert (got[image >= level] == 255).all()  # the white level and above are white


def test_to_rgb8_refuses_other_pixel_types() -> None:
    with pytest.raises(ImageError, match="unsupported pixel type float32"):
        to_rgb8(np.zeros((2, 2, 3), np.float32))


def test_is_image_file(tmp_path: Path) -> None:
    image = write(tmp_path / "x.PNG", np.zeros((2, 2), np.uint8))
    hidden = write(tmp_path / ".hidden.png", np.zeros((2, 2), np.uint8))
    other = tmp_path / "notes.txt"
    other.write_text("x")
    folder = tmp_path / "dir.png"
    folder.mkdir()
    assert is_image_file(image)
    assert not is_image_file(hidden) and not is_image_file(other) and not is_image_file(folder)
