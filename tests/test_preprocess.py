"""Preprocessing: spec validation, working-size rounding, tile plans, stitching, ROI, pixel formats, valid areas."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from appliance.errors import ConfigError, ImageError
from appliance.frame_format import FrameFormat
from appliance.preprocess import STRIDE, Preprocessor, PreprocessSpec, frame_pixel_limit, plan_tiles, round_to

# --- PreprocessSpec validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source_size": (0, 100), "size": (64, 64)}, "source_size must be positive"),
        ({"source_size": (100, -1), "size": (64, 64)}, "source_size must be positive"),
        ({"source_size": (100, 100), "size": (60, 64)}, r"size \(60, 64\) must be positive multiples of 16"),
        ({"source_size": (100, 100), "size": (64, 0)}, "must be positive multiples of 16"),
        ({"source_size": (100, 100), "size": (-16, 64)}, "must be positive multiples of 16"),
        ({"source_size": (100, 100), "size": (64, 64), "tile": (40, 32)}, r"tile \(40, 32\) must be positive"),
        ({"source_size": (100, 100), "size": (64, 64), "tile": (0, 32)}, "tile .* must be positive"),
        ({"source_size": (100, 100), "size": (64, 64), "tile": (80, 32)}, "larger than the working size"),
        ({"source_size": (100, 100), "size": (64, 64), "tile": (32, 32), "overlap": 32}, r"overlap 32 must be in"),
        ({"source_size": (100, 100), "size": (64, 64), "tile": (32, 48), "overlap": -8}, "overlap -8 must be in"),
        ({"source_size": (100, 200), "size": (64, 64), "roi": (150, 0, 60, 50)}, r"roi .* does not fit in a 200x100"),
        ({"source_size": (100, 200), "size": (64, 64), "roi": (0, 60, 50, 50)}, "does not fit"),
        ({"source_size": (100, 200), "size": (64, 64), "roi": (-1, 0, 50, 50)}, "does not fit"),
        ({"source_size": (100, 200), "size": (64, 64), "roi": (0, 0, 0, 50)}, "does not fit"),
        ({"source_size": (100, 100), "size": (64, 64), "white_level": 0}, r"white_level must be in \[1, 65535\]"),
        ({"source_size": (100, 100), "size": (64, 64), "white_level": 70000}, "white_level must be in"),
    ],
)
def test_spec_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PreprocessSpec(**kwargs)


def test_spec_accepts_edge_values_and_round_trips_through_a_dict() -> None:
    spec = PreprocessSpec((100, 200), (64, 128), tile=(64, 64), overlap=0, roi=(0, 0, 200, 100), white_level=65535)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    as_json = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.to_dict().items()}  # what JSON gives back
    assert PreprocessSpec.from_dict(as_json) == spec


def test_from_dict_refuses_unknown_keys() -> None:
    data = PreprocessSpec((10, 10), (16, 16)).to_dict() | {"stride": 8}
    with pytest.raises(ConfigError, match=r"unknown keys \['stride'\]"):
        PreprocessSpec.from_dict(data)
    data = PreprocessSpec((10, 10), (16, 16), frame=FrameFormat(3, 8)).to_dict()
    data["frame"]["gamma"] = 2.2
    with pytest.raises(ConfigError, match=r"preprocess\.frame: unknown keys \['gamma'\]"):
        PreprocessSpec.from_dict(data)


def test_frame_format_round_trips_and_a_format_3_spec_has_none() -> None:
    spec = PreprocessSpec((100, 200), (64, 128), frame=FrameFormat(1, 16, "grey"))
    assert spec.to_dict()["frame"] == {"channels": 1, "bits": 16, "convert": "grey"}
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    v3 = {"source_size": [100, 200], "size": [64, 128], "tile": None, "overlap": 32, "roi": None, "white_level": None,
          "interpolation": "linear", "resize": "fixed"}  # a manifest's preprocess before frame formats were recorded
    old = PreprocessSpec.from_dict(v3)
    assert old.frame is None
    grey = np.full((100, 200), 77, np.uint8)
    np.testing.assert_array_equal(Preprocessor(old).working_image(grey), np.full((64, 128, 3), 77, np.uint8))


@pytest.mark.parametrize(
    ("source_size", "factor", "limit"),
    [
        ((460, 1130), 4.0, 4 * 460 * 1130),  # 0.52 MP frames: 2.08 MP
        ((2048, 2448), 4.0, 4 * 2048 * 2448),
        ((2048, 2448), 1.5, int(1.5 * 2048 * 2448)),
        ((96, 160), 4.0, 1_000_000),  # a small model still takes a 1 MP camera's frames
    ],
)
def test_frame_pixel_limit_is_a_multiple_of_the_source_frame_with_a_floor(source_size, factor, limit) -> None:
    assert frame_pixel_limit(PreprocessSpec(source_size, (64, 64)), factor) == limit


def test_frame_pixel_limit_refuses_a_factor_that_is_not_positive() -> None:
    with pytest.raises(ConfigError, match="factor must be positive"):
        frame_pixel_limit(PreprocessSpec((100, 100), (64, 64)), 0)


# --- for_source ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "height", "roi"),
    [((460, 1130), 224, None), ((460, 1130), 448, None), ((480, 640), 250, None), ((1000, 333), 300, None),
     ((96, 160), 96, None), ((600, 800), 200, (100, 50, 500, 120))],
)
def test_for_source_keeps_aspect_ratio_and_rounds_to_16(source: tuple, height: int, roi: tuple | None) -> None:
    spec = PreprocessSpec.for_source(source, height, roi=roi)
    h, w = spec.size
    assert h % 16 == 0 and w % 16 == 0
    assert abs(h - height) <= 8
    rh, rw = (roi[3], roi[2]) if roi else source
    assert abs(w - h * rw / rh) <= 8  # nearest multiple of 16 to the aspect-preserving width
    assert spec.source_size == source and spec.roi == roi


@pytest.mark.parametrize(
    ("source", "roi", "size"),
    [((460, 1130), None, (448, 1104)), ((480, 640), None, (480, 640)), ((600, 800), (100, 50, 500, 127), (112, 448)),
     ((10, 40), None, (16, 64))],
)
def test_for_source_without_height_works_at_the_frames_own_resolution(source: tuple, roi: tuple | None,
                                                                      size: tuple) -> None:
    """Rounded down, never up: the working image is never larger than the frame (or ROI) it comes from."""
    assert PreprocessSpec.for_source(source, None, roi=roi).size == size


def test_for_source_explicit_width_and_tiny_sizes() -> None:
    assert PreprocessSpec.for_source((100, 100), 100, 250).size == (96, 256)
    assert PreprocessSpec.for_source((100, 1000), 5).size == (16, 160)  # never below one multiple
    assert round_to(7) == 16 and round_to(24) == 32 and round_to(23.9) == 16


# --- tile plans and stitching --------------------------------------------------------------------------------------

TILED = [
    ((256, 544), (128, 128), 32),
    ((224, 544), (224, 224), 32),
    ((448, 1088), (224, 224), 48),
    ((96, 160), (64, 64), 16),
    ((128, 128), (64, 96), 0),
    ((400, 160), (144, 160), 8),
    ((64, 64), (64, 64), 32),
]


@pytest.mark.parametrize(("size", "tile", "overlap"), TILED)
def test_tile_plan_covers_the_image_on_the_stride_grid(size: tuple, tile: tuple, overlap: int) -> None:
    spec = PreprocessSpec(size, size, tile, overlap)
    plan = plan_tiles(spec)
    h, w = size
    th, tw = tile
    assert plan.tile == tile and plan.grid == (h // STRIDE, w // STRIDE)
    assert plan.weights.shape == (plan.count, th // STRIDE, tw // STRIDE)
    covered = np.zeros((h, w), int)
    for y, x in plan.origins:
        assert y % STRIDE == 0 and x % STRIDE == 0
        assert 0 <= y <= h - th and 0 <= x <= w - tw
        covered[y : y + th, x : x + tw] += 1
    assert covered.min() >= 1
    for axis, (side, total) in enumerate(((th, h), (tw, w))):
        starts = sorted({o[axis] for o in plan.origins})
        assert starts[0] == 0 and starts[-1] == total - side
        assert all(b - a <= side - overlap for a, b in itertools.pairwise(starts))  # overlap kept
    assert len(set(plan.origins)) == plan.count


@pytest.mark.parametrize(("size", "tile", "overlap"), TILED)
def test_tile_weights_sum_to_one_over_the_global_grid(size: tuple, tile: tuple, overlap: int) -> None:
    spec = PreprocessSpec(size, size, tile, overlap)
    plan = plan_tiles(spec)
    assert (plan.weights > 0).all() and np.isfinite(plan.weights).all()
    total = np.zeros(plan.grid, np.float64)
    ph, pw = tile[0] // STRIDE, tile[1] // STRIDE
    for (y, x), weight in zip(plan.origins, plan.weights, strict=True):
        total[y // STRIDE : y // STRIDE + ph, x // STRIDE : x // STRIDE + pw] += weight
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)
    ones = Preprocessor(spec).stitch(np.ones((plan.count, ph, pw), np.float32))
    assert ones.shape == plan.grid
    np.testing.assert_allclose(ones, 1.0, rtol=1e-6)


@pytest.mark.parametrize(("size", "tile", "overlap"), TILED)
def test_stitching_a_global_map_cut_into_tiles_gives_it_back(size: tuple, tile: tuple, overlap: int) -> None:
    spec = PreprocessSpec(size, size, tile, overlap)
    pre = Preprocessor(spec)
    global_map = np.random.default_rng(0).random(pre.plan.grid).astype(np.float32)
    ph, pw = tile[0] // STRIDE, tile[1] // STRIDE
    tiles = np.stack([global_map[y // STRIDE : y // STRIDE + ph, x // STRIDE : x // STRIDE + pw]
                      for y, x in pre.plan.origins])
    np.testing.assert_allclose(pre.stitch(tiles), global_map, rtol=1e-5, atol=1e-6)


def test_tiles_are_windows_of_the_working_image_aligned_with_the_patch_grid() -> None:
    spec = PreprocessSpec((96, 160), (96, 160), (64, 64), 16)
    pre = Preprocessor(spec)
    image = np.random.default_rng(1).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    batch = pre.tiles(image)
    assert batch.shape == (pre.plan.count, 64, 64, 3) and batch.dtype == np.uint8
    for t, (y, x) in enumerate(pre.plan.origins):
        np.testing.assert_array_equal(batch[t], image[y : y + 64, x : x + 64])


def test_untiled_plan_is_one_tile_and_stitch_is_identity() -> None:
    spec = PreprocessSpec((96, 160), (96, 160))
    pre = Preprocessor(spec)
    assert pre.plan.count == 1 and pre.plan.origins == ((0, 0),) and pre.plan.tile == (96, 160)
    scores = np.random.default_rng(2).random((1, 12, 20)).astype(np.float32)
    np.testing.assert_array_equal(pre.stitch(scores), scores[0])
    image = np.random.default_rng(3).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pre.tiles(image)[0], image)


# --- frames: resize, ROI, pixel formats, geometry checks ----------------------------------------------------------


def test_working_image_resizes_to_the_working_size_with_area_interpolation() -> None:
    spec = PreprocessSpec.for_source((192, 320), 96)
    image = np.random.default_rng(4).integers(0, 256, (192, 320, 3), dtype=np.uint8)
    work = Preprocessor(spec).working_image(image)
    assert work.shape == (96, 160, 3) and work.dtype == np.uint8
    np.testing.assert_array_equal(work, cv2.resize(image, (160, 96), interpolation=cv2.INTER_AREA))


def test_roi_crop_selects_the_region_before_resizing() -> None:
    roi = (50, 20, 128, 64)  # x, y, w, h
    spec = PreprocessSpec.for_source((100, 240), 32, roi=roi)
    assert spec.size == (32, 64)
    rng = np.random.default_rng(5)
    image = np.zeros((100, 240, 3), np.uint8)
    image[20:84, 50:178] = rng.integers(1, 256, (64, 128, 3), dtype=np.uint8)
    work = Preprocessor(spec).working_image(image)
    expected = cv2.resize(image[20:84, 50:178], (64, 32), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(work, expected)
    image[:20] = 255  # pixels outside the ROI do not matter
    image[:, 200:] = 255
    np.testing.assert_array_equal(Preprocessor(spec).working_image(image), expected)


def test_roi_larger_than_the_frame_raises_image_error() -> None:
    spec = PreprocessSpec.for_source((100, 240), 32, roi=(50, 20, 128, 64))
    with pytest.raises(ImageError, match=r"frame is 150x80, too small for the ROI"):
        Preprocessor(spec).tiles(np.zeros((80, 150, 3), np.uint8))


def test_grey_and_16_bit_frames_become_8_bit_rgb() -> None:
    spec = PreprocessSpec((32, 48), (32, 48))
    pre = Preprocessor(spec)
    grey = np.arange(32 * 48, dtype=np.uint16).reshape(32, 48) * 40  # up to 61400
    work = pre.working_image(grey)
    assert work.shape == (32, 48, 3) and work.dtype == np.uint8
    expected = np.clip(np.round(grey.astype(np.float64) * 255 / 65535), 0, 255)
    for c in range(3):
        np.testing.assert_allclose(work[:, :, c], expected, atol=1)
    grey8 = (grey // 256).astype(np.uint8)
    np.testing.assert_array_equal(pre.working_image(grey8), np.repeat(grey8[:, :, None], 3, 2))


def test_white_level_scales_12_bit_frames() -> None:
    spec = PreprocessSpec((16, 16), (16, 16), white_level=4095)
    frame = np.full((16, 16, 3), 4095, np.uint16)
    frame[0, 0] = (0, 2048, 65535)  # above the white level saturates
    work = Preprocessor(spec).working_image(frame)
    assert (work[1:, :] == 255).all()
    assert tuple(work[0, 0]) == (0, 128, 255)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((32, 48), np.uint8), "frame is grey 8-bit but the model was fitted on RGB 8-bit frames; set the "
                                       "camera to colour"),
        (np.zeros((32, 48, 3), np.uint16), "frame is RGB 16-bit but the model was fitted on RGB 8-bit frames; set "
                                           "the camera's pixel format to 8 bits"),
    ],
)
def test_a_frame_of_another_format_is_refused_by_a_model_that_records_its_format(frame, message) -> None:
    pre = Preprocessor(PreprocessSpec((32, 48), (32, 48), frame=FrameFormat(3, 8)))
    with pytest.raises(ImageError, match=message):
        pre.tiles(frame)
    assert pre.tiles(np.zeros((32, 48, 3), np.uint8)).shape == (1, 32, 48, 3)


def test_a_grey_converting_model_takes_colour_and_grey_frames_alike() -> None:
    pre = Preprocessor(PreprocessSpec((32, 48), (32, 48), frame=FrameFormat(1, 8, "grey")))
    rgb = np.random.default_rng(5).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(pre.working_image(rgb), pre.working_image(grey))
    np.testing.assert_array_equal(pre.working_image(grey), np.repeat(grey[:, :, None], 3, 2))
    with pytest.raises(ImageError, match="frame is grey 16-bit but the model was fitted on grey 8-bit frames"):
        pre.tiles(rgb.astype(np.uint16) * 256)


def test_the_valid_area_mask_is_not_a_frame() -> None:
    spec = PreprocessSpec((32, 48), (32, 48), frame=FrameFormat(3, 8))
    assert Preprocessor(spec).valid_patches(np.ones((32, 48), bool)).all()


@pytest.mark.parametrize("shape", [(96, 96, 3), (100, 160, 3), (160, 96, 3)])
def test_aspect_ratio_mismatch_raises_image_error(shape: tuple) -> None:
    pre = Preprocessor(PreprocessSpec.for_source((96, 160), 96))
    with pytest.raises(ImageError, match=r"fitted on 160x96 frames \(aspect ratio differs; a model fitted with resize"):
        pre.tiles(np.zeros(shape, np.uint8))


def test_same_aspect_at_another_resolution_is_accepted() -> None:
    pre = Preprocessor(PreprocessSpec.for_source((96, 160), 96))
    assert pre.tiles(np.zeros((192, 321, 3), np.uint8)).shape == (1, 96, 160, 3)  # within the 2 % tolerance


# --- valid-area masks ----------------------------------------------------------------------------------------------


def test_valid_patches_marks_patches_at_least_half_inside() -> None:
    spec = PreprocessSpec((96, 160), (96, 160), (64, 96), 32)
    pre = Preprocessor(spec)
    mask = np.zeros((96, 160), bool)
    mask[:, :84] = True  # patch column 10 (pixels 80..87) is half inside, column 11 is not
    valid = pre.valid_patches(mask)
    assert valid.dtype == bool and valid.shape == (pre.plan.count, 8, 12)
    global_valid = np.zeros(pre.plan.grid, bool)
    global_valid[:, :11] = True
    for t, (y, x) in enumerate(pre.plan.origins):
        np.testing.assert_array_equal(valid[t], global_valid[y // 8 : y // 8 + 8, x // 8 : x // 8 + 12])
    assert pre.valid_patches(None) is None


def test_valid_patches_at_source_resolution_with_roi() -> None:
    spec = PreprocessSpec.for_source((200, 400), 48, roi=(100, 50, 192, 96))  # working 48x96: half scale
    pre = Preprocessor(spec)
    mask = np.zeros((200, 400), bool)
    mask[50 + 48 :, :] = True  # lower half of the ROI
    valid = pre.valid_patches(mask)
    assert valid.shape == (1, 6, 12)
    np.testing.assert_array_equal(valid[0], np.repeat([[False], [False], [False], [True], [True], [True]], 12, 1))


def test_valid_patches_refuses_a_mask_of_another_size() -> None:
    pre = Preprocessor(PreprocessSpec((96, 160), (96, 160)))
    with pytest.raises(ImageError, match=r"valid-area mask is \(80, 96\) \(WxH\) but frames are \(160, 96\)"):
        pre.valid_patches(np.ones((96, 80), bool))


# --- resize policies -----------------------------------------------------------------------------------------------


def test_stretch_takes_any_frame_to_the_working_size() -> None:
    pre = Preprocessor(PreprocessSpec((60, 100), (64, 96), resize="stretch"))
    for shape in [(60, 100), (20, 300), (300, 20), (64, 96)]:
        image = np.random.default_rng(0).integers(0, 255, shape, np.uint8)
        work = pre.working_image(image)
        assert work.shape == (64, 96, 3)
        expected = cv2.resize(cv2.cvtColor(image, cv2.COLOR_GRAY2RGB), (96, 64), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(work, expected)
        assert pre.frame_valid(shape) is None and pre.letterbox_box(shape) == (0, 0, 64, 96)


@pytest.mark.parametrize(("shape", "box"), [((50, 200), (20, 0, 24, 96)), ((200, 50), (0, 40, 64, 16)),
                                            ((64, 96), (0, 0, 64, 96))])
def test_letterbox_keeps_the_aspect_ratio_and_marks_only_the_frame_valid(shape: tuple, box: tuple) -> None:
    pre = Preprocessor(PreprocessSpec((60, 100), (64, 96), resize="letterbox"))
    assert pre.letterbox_box(shape) == box
    image = np.full((*shape, 3), 200, np.uint8)
    image[:, : shape[1] // 2] = 10  # left half dark: the content's own layout must survive
    work = pre.working_image(image)
    y, x, h, w = box
    assert work.shape == (64, 96, 3)
    np.testing.assert_array_equal(work[y : y + h, x : x + w], cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA
                                                                      if shape[0] > h else cv2.INTER_LINEAR))
    valid = pre.frame_valid(shape)[0]
    assert valid.shape == (8, 12)
    cells = np.zeros((64, 96), np.float32)
    cells[y : y + h, x : x + w] = 1
    expected = cells.reshape(8, 8, 12, 8).mean(axis=(1, 3)) >= 0.5  # at least half of each 8x8 patch inside
    np.testing.assert_array_equal(valid, expected)


def test_fixed_refuses_another_aspect_but_not_another_resolution_and_roi_needs_fixed() -> None:
    pre = Preprocessor(PreprocessSpec((50, 100), (32, 64)))
    assert pre.working_image(np.zeros((100, 200), np.uint8)).shape == (32, 64, 3)
    with pytest.raises(ImageError, match="aspect ratio differs"):
        pre.working_image(np.zeros((100, 100), np.uint8))
    with pytest.raises(ConfigError, match="roi needs resize 'fixed'"):
        PreprocessSpec((50, 100), (32, 64), roi=(0, 0, 50, 50), resize="stretch")
    with pytest.raises(ConfigError, match="resize must be one of"):
        PreprocessSpec((50, 100), (32, 64), resize="crop")
