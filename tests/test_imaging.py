"""Reading real image files (PNG, JPEG, 16-bit, grey, RGBA, TIFF) and refusing broken ones with the file's name."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from appliance.errors import ImageError
from appliance.imaging import (
    ImageHeader,
    decode_image,
    image_header,
    image_size,
    is_image_file,
    read_header,
    read_image,
    read_mask,
    to_rgb8,
)


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


# --- headers: size, channels and bit depth before decoding ------------------------------------------------------


def _pil_bytes(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _encoded_variants() -> list[tuple[str, bytes]]:
    """Real files of every format we read, grey and colour, 8 and 16 bits, with and without alpha."""
    rng = np.random.default_rng(7)
    pixels = {"grey8": rng.integers(0, 256, (30, 41), dtype=np.uint8),
              "grey16": rng.integers(0, 65536, (30, 41), dtype=np.uint16),
              "bgr8": rng.integers(0, 256, (30, 41, 3), dtype=np.uint8),
              "bgr16": rng.integers(0, 65536, (30, 41, 3), dtype=np.uint16),
              "bgra8": rng.integers(0, 256, (30, 41, 4), dtype=np.uint8)}
    out = []
    for suffix, kinds in ((".png", pixels), (".tif", pixels), (".jpg", ("grey8", "bgr8")), (".bmp", ("grey8", "bgr8")),
                          (".pgm", ("grey8", "grey16")), (".ppm", ("bgr8", "bgr16")), (".webp", ("bgr8", "bgra8"))):
        for kind in kinds:
            ok, buf = cv2.imencode(suffix, pixels[kind])
            assert ok
            out.append((f"{kind}{suffix}", buf.tobytes()))
    grey = Image.fromarray(pixels["grey8"])
    out += [("grey+alpha.png", _pil_bytes(Image.merge("LA", (grey, grey)), "PNG")),
            ("palette.png", _pil_bytes(grey.convert("P"), "PNG")),
            ("bilevel.png", _pil_bytes(grey.convert("1"), "PNG")),
            ("lossy.webp", _pil_bytes(Image.fromarray(pixels["bgr8"]), "WEBP", quality=80)),
            ("lossy_alpha.webp", _pil_bytes(Image.fromarray(pixels["bgra8"], "RGBA"), "WEBP", quality=80)),
            ("lossless.webp", _pil_bytes(Image.fromarray(pixels["bgr8"]), "WEBP", lossless=True))]
    return out


@pytest.mark.parametrize(("name", "encoded"), _encoded_variants(), ids=lambda v: v if isinstance(v, str) else "")
def test_header_says_what_decoding_gives(name: str, encoded: bytes) -> None:
    header = image_header(encoded, name)
    pixels = decode_image(encoded, name)
    assert (header.height, header.width) == pixels.shape[:2] == (30, 41)
    assert header.channels == (1 if pixels.ndim == 2 else 3), name
    assert (np.uint16 if header.bits > 8 else np.uint8) == pixels.dtype, name
    assert header.format == {".png": "PNG", ".tif": "TIFF", ".jpg": "JPEG", ".bmp": "BMP", ".pgm": "PPM",
                             ".ppm": "PPM", ".webp": "WEBP"}[Path(name).suffix]


def test_header_needs_only_the_header(tmp_path: Path, rgb: np.ndarray) -> None:
    full = cv2.imencode(".png", rgb)[1].tobytes()
    half = full[: len(full) // 2]  # the pixels are cut, the header is whole
    assert image_header(half) == ImageHeader(48, 64, 3, 8, "PNG")
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(half)
    path = tmp_path / "half.png"
    path.write_bytes(half)
    assert read_header(path) == ImageHeader(48, 64, 3, 8, "PNG") and image_size(path) == (48, 64)


@pytest.mark.parametrize("encoded", [b"this is not an image", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBPjunk"])
def test_unreadable_header_names_the_file(encoded: bytes) -> None:
    with pytest.raises(ImageError, match=r"^cam7\.png: is not a readable image"):
        image_header(encoded, "cam7.png")


def big_png(path: Path, height: int = 20000, width: int = 20000) -> Path:
    """A real constant grey PNG of ``height`` x ``width`` (400 MP by default: about 1.7 MB), written row block by
    row block, so that the test never holds the image."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    deflate = zlib.compressobj(1)
    rows = bytes(width + 1) * 50  # filter byte 0 and black pixels, 50 rows at a time
    idat = b"".join(deflate.compress(rows) for _ in range(height // 50)) + deflate.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return big_png(tmp_path_factory.mktemp("huge") / "huge.png")


def test_huge_image_is_refused_from_its_header_without_allocating_it(huge: Path) -> None:
    assert huge.stat().st_size < 3_000_000
    code = f"""
import json, resource, sys, time
from appliance.errors import ImageError
from appliance.imaging import decode_image
data = open({str(huge)!r}, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    decode_image(data, "huge.png", max_pixels=2_100_000)
    error = None
except ImageError as exc:
    error = str(exc)
seconds = time.perf_counter() - t0
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({{"error": error, "seconds": seconds, "grown_mb": grown_mb}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout)
    assert result["error"] == ("huge.png: is 20000x20000 pixels (400.0 MP), above this camera's limit of 2.1 MP "
                               "(refused before decoding; check the camera's resolution, or that the file is the frame "
                               "it should be)")
    assert result["seconds"] < 0.5 and result["grown_mb"] < 100, result  # decoding it takes ~0.8 GB and seconds


def test_header_of_a_line_scan_frame_is_read_whatever_pils_bomb_limit(huge: Path) -> None:
    pil_limit = Image.MAX_IMAGE_PIXELS
    assert pil_limit is not None
    with pytest.raises(Image.DecompressionBombError), Image.open(huge):
        pass  # what PIL's own open does with it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_header(huge) == ImageHeader(20000, 20000, 1, 8, "PNG")
    assert pil_limit == Image.MAX_IMAGE_PIXELS  # nothing global was switched off


def test_image_under_the_limit_decodes_unchanged(rgb: np.ndarray) -> None:
    encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    np.testing.assert_array_equal(decode_image(encoded, max_pixels=48 * 64), rgb)
    with pytest.raises(ImageError, match=r"is 64x48 pixels \(0\.0 MP\), above this camera's limit of 0\.0 MP"):
        decode_image(encoded, max_pixels=48 * 64 - 1)


# --- decoder warnings: a log record naming the file, nothing on stderr ---------------------------------------------

_DECODE_AND_LOG = """
import json, logging, sys
records = []
handler = logging.Handler()
handler.emit = lambda r: records.append({"name": r.name, "level": r.levelname, "message": r.getMessage()})
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.INFO)
from appliance.errors import ImageError
from appliance.imaging import read_image
try:
    shape = list(read_image(sys.argv[1]).shape)
    error = None
except ImageError as exc:
    shape, error = None, str(exc)
print(json.dumps({"shape": shape, "error": error, "records": records}))
"""


def _decode_in_child(path: Path) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", _DECODE_AND_LOG, str(path)], capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout), done.stderr


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    """A 1130x460 JPEG of a real photo, the size of a line camera's frame."""
    photo = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (1130, 460))
    return cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def test_jpeg_with_extraneous_bytes_is_decoded_and_logged_naming_the_file(tmp_path: Path, photo_jpeg: bytes) -> None:
    assert photo_jpeg.endswith(b"\xff\xd9")
    path = tmp_path / "cam1_0042.jpg"
    path.write_bytes(photo_jpeg[:-2] + bytes(12) + b"\xff\xd9")  # 12 bytes of padding before the end marker
    result, stderr = _decode_in_child(path)
    assert stderr == ""
    assert result["shape"] == [460, 1130, 3] and result["error"] is None
    assert result["records"] == [{"name": "appliance.imaging", "level": "WARNING",
                                  "message": f"{path}: decoded with warnings: Corrupt JPEG data: 12 extraneous bytes "
                                             "before marker 0xd9"}]


def test_png_with_a_bad_iccp_chunk_is_decoded_and_logged_naming_the_file(tmp_path: Path, rgb: np.ndarray) -> None:
    png = cv2.imencode(".png", rgb)[1].tobytes()
    body = b"ICC Profile\x00\x00" + zlib.compress(bytes(200))  # a colour profile of zeros: not a profile
    iccp = struct.pack(">I", len(body)) + b"iCCP" + body + struct.pack(">I", zlib.crc32(b"iCCP" + body))
    path = tmp_path / "profiled.png"
    path.write_bytes(png[:33] + iccp + png[33:])  # after the signature and IHDR, as a camera writes it
    result, stderr = _decode_in_child(path)
    assert stderr == ""
    assert result["shape"] == [48, 64, 3]
    [record] = result["records"]
    assert record["name"] == "appliance.imaging" and record["level"] == "WARNING"
    assert record["message"].startswith(f"{path}: decoded with warnings: libpng warning: iCCP: ")


def test_jpeg_cut_short_is_an_error_naming_the_file(tmp_path: Path, photo_jpeg: bytes) -> None:
    path = tmp_path / "cut.jpg"
    path.write_bytes(photo_jpeg[: len(photo_jpeg) // 2] + b"\xff\xd9")  # half the scan, then a proper end marker
    result, stderr = _decode_in_child(path)
    assert stderr == "" and result["shape"] is None and result["records"] == []
    assert result["error"] == (f"{path}: is damaged (pixels missing or garbled; a frame cut short in transfer?): the "
                               "decoder said 'Corrupt JPEG data: premature end of data segment'")
