"""Model bundles: the one way a fitted model is stored, shipped and loaded.

A bundle is a directory (or a ``.tar``/``.tar.gz`` of one)::

    manifest.json        format/version, ids, preprocessing, scorer, calibration,
                         golden scores, training record, sha256 of every other file
    backbone/            the OpenVINO IR the scorer's features came from
    scorer/*.npy         the scorer's arrays (no pickles)
    golden/*.png         a few source images with the raw scores they had at build time
    calibration/*.npy    optional per-position score normalisation (format 2)
    drift/*.npy          optional drift baseline: PCA axes, held-out images in them, their scores (format 5)
    valid_mask.png       optional valid-area mask (source pixels)

``load_bundle`` verifies everything before it hands back an engine: format and
version, every file's presence, size and hash, the manifest's own digest (and
HMAC signature when a key is given), scorer and backbone compatibility, and
finally that the golden images score as recorded. That last check catches
export and preprocessing mismatches, which hashes cannot.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import __version__, runtime
from .backbone import Backbone
from .calibration import Calibration
from .drift import DriftBaseline
from .engine import Engine
from .errors import ApplianceError, BundleError
from .imaging import read_image
from .position_norm import PositionNorm
from .preprocess import PreprocessSpec, plan_tiles
from .scorers import SCORERS, Scorer, create

log = logging.getLogger(__name__)

FORMAT = "anomaly-appliance-bundle"
#: 2: optional per-position score normalisation; 3: the preprocessing's resize policy; 4: the frame format
#: (``preprocess.frame``); 5: the drift baseline (``drift``, ``None`` when too few images were held out). Older
#: bundles load as before: without a frame format, frames are not checked; without a baseline, drift is not watched.
FORMAT_VERSION = 5
MANIFEST = "manifest.json"
#: Relative difference allowed between a golden image's score now and at build time.
GOLDEN_TOLERANCE = {"f32": 0.02, "bf16": 0.08}
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class Golden:
    """A source image stored in the bundle with the raw score it had at build time."""

    image: np.ndarray
    raw_score: float
    label: str = "good"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k not in ("digest", "signature")}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _write_png(path: Path, image: np.ndarray) -> None:
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    if not cv2.imwrite(str(path), pixels):
        raise BundleError(f"cannot write {path}")


def write_bundle(out: str | Path, *, spec: PreprocessSpec, backbone_dir: Path, precision: str, scorer: Scorer,
                 calibration: Calibration, golden: list[Golden], training: dict,
                 valid_mask: np.ndarray | None = None, key: bytes | None = None,
                 position_norm: PositionNorm | None = None, drift: DriftBaseline | None = None) -> Path:
    """Write a bundle directory atomically (a temporary sibling renamed into place).

    Returns:
        The bundle directory.

    """
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file():
        raise BundleError(f"{out} exists and is not a bundle; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        info = json.loads((backbone_dir / "backbone.json").read_text())
        (tmp / "backbone").mkdir()
        for name in (*info["files"], "backbone.json"):
            shutil.copy2(backbone_dir / name, tmp / "backbone" / name)
        xml = next(n for n in info["files"] if n.endswith(".xml"))
        arrays, scorer_meta = scorer.state()
        (tmp / "scorer").mkdir()
        array_files = {}
        for name, arr in arrays.items():
            np.save(tmp / "scorer" / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
            array_files[name] = f"scorer/{name}.npy"
        (tmp / "golden").mkdir()
        golden_records = []
        for i, g in enumerate(golden):
            rel = f"golden/{i:02d}.png"
            _write_png(tmp / rel, g.image)
            golden_records.append({"file": rel, "raw_score": g.raw_score, "label": g.label})
        if valid_mask is not None:
            _write_png(tmp / "valid_mask.png", valid_mask.astype(np.uint8) * 255)
        norm_record = None
        if position_norm is not None:
            (tmp / "calibration").mkdir()
            norm_record = {"mean": "calibration/position_mean.npy", "scale": "calibration/position_scale.npy",
                           "images": position_norm.images}
            np.save(tmp / norm_record["mean"], position_norm.mean, allow_pickle=False)
            np.save(tmp / norm_record["scale"], position_norm.scale, allow_pickle=False)
        drift_record = None if drift is None else _write_drift(tmp, drift)
        files = {p.relative_to(tmp).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        content_id = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": f"{scorer.type}-{content_id}",
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "appliance_version": __version__,
            "backbone": {"name": info["name"], "xml": f"backbone/{xml}", "precision": precision,
                         "sha256": info["files"], "output_channels": info["output"]["channels"],
                         "stride": info["output"]["stride"]},
            "preprocess": spec.to_dict(),
            "scorer": {"type": scorer.type, "config": scorer.config.__dict__, "meta": scorer_meta,
                       "arrays": array_files},
            "calibration": calibration.to_dict(),
            "position_norm": norm_record,
            "drift": drift_record,
            "golden": golden_records,
            "valid_mask": "valid_mask.png" if valid_mask is not None else None,
            "training": training,
            "files": files,
        }
        manifest["digest"] = hashlib.sha256(_canonical(manifest)).hexdigest()
        if key:
            manifest["signature"] = hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_drift(tmp: Path, drift: DriftBaseline) -> dict:
    """Save the drift baseline's arrays under ``drift/``; returns the manifest record."""
    (tmp / "drift").mkdir()
    arrays = {}
    for name, arr in drift.arrays().items():
        arrays[name] = f"drift/{name}.npy"
        np.save(tmp / arrays[name], np.ascontiguousarray(arr), allow_pickle=False)
    return {"arrays": arrays, "images": drift.size, "components": len(drift.explained),
            "variance_explained": round(float(drift.explained.sum()), 4), "channels": drift.channels}


def pack(bundle_dir: str | Path, archive: str | Path) -> Path:
    """A ``.tar.gz`` of a verified bundle directory, for transport."""
    bundle_dir, archive = Path(bundle_dir), Path(archive)
    verify_files(bundle_dir)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle_dir, arcname=bundle_dir.name)
    return archive


def _unpack(archive: Path, cache_dir: Path | None) -> Path:
    """Extract an archive once into a folder named by its hash; returns the bundle folder inside."""
    digest = _sha256(archive)[:16]
    base = (cache_dir or Path(tempfile.gettempdir()) / "anomaly-appliance") / "bundles" / digest
    if not base.is_dir():
        base.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unpack.", dir=base.parent))
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            tmp.rename(base)
        except (tarfile.TarError, EOFError, OSError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BundleError(f"{archive}: not a readable bundle archive ({exc}); it may be truncated") from None
    found = [p.parent for p in base.glob(f"*/{MANIFEST}")] + ([base] if (base / MANIFEST).is_file() else [])
    if len(found) != 1:
        raise BundleError(f"{archive}: expected exactly one bundle inside, found {len(found)}")
    return found[0]


def read_manifest(bundle_dir: Path) -> dict:
    """The manifest, checked for format, version and its own digest."""
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle directory")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: no {MANIFEST}; this is not a model bundle") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: manifest is not valid JSON ({exc}); the bundle is corrupt or truncated") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not an {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {version!r} is newer than this appliance supports "
                          f"({FORMAT_VERSION}); upgrade the appliance")
    if manifest.get("digest") != hashlib.sha256(_canonical(manifest)).hexdigest():
        raise BundleError(f"{path}: manifest digest does not match its content; the manifest was altered")
    if version >= 5 and "drift" not in manifest:
        raise BundleError(f"{path}: format {version} manifest has no drift record; the bundle is corrupt")
    return manifest


def verify_files(bundle_dir: Path, key: bytes | None = None) -> dict:
    """Check every file listed in the manifest (presence, size, sha256) and that nothing is unlisted."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if key is not None:
        sig = manifest.get("signature")
        good = hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()
        if not sig or not hmac.compare_digest(sig, good):
            raise BundleError(f"{bundle_dir}: bundle signature is missing or wrong for this key; refusing it")
    listed = manifest.get("files", {})
    for rel, rec in listed.items():
        path = bundle_dir / rel
        if not path.is_file():
            raise BundleError(f"{bundle_dir}: file {rel} is missing; the bundle is incomplete")
        if path.stat().st_size != rec["bytes"]:
            raise BundleError(f"{bundle_dir}: {rel} is {path.stat().st_size} bytes, expected {rec['bytes']}; "
                              "the bundle is truncated or altered")
        if _sha256(path) != rec["sha256"]:
            raise BundleError(f"{bundle_dir}: {rel} does not match its sha256; the bundle was altered")
    extra = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()} - set(listed) - {
        MANIFEST}
    if extra:
        raise BundleError(f"{bundle_dir}: files not in the manifest: {sorted(extra)[:5]}; refusing a modified bundle")
    manifest.setdefault("drift", None)  # formats before 5 had no baseline: read them as having none (digest checked)
    return manifest


def load_bundle(path: str | Path, *, threads: int | None = None, streams: int = 1, precision: str | None = None,
                cache_dir: str | Path | None = None, key: bytes | None = None, check_golden: bool = True) -> Engine:
    """Verify a bundle and return a ready engine (nothing half-loaded is ever returned).

    Args:
        path: bundle directory or archive.
        threads: CPU threads for the backbone (``None``: all).
        streams: asynchronous backbone requests (2 for throughput).
        precision: override the bundle's backbone precision (``f32``/``bf16``).
        cache_dir: OpenVINO model cache and archive extraction folder.
        key: HMAC key; when given, the bundle must carry a valid signature.
        check_golden: score the golden images and compare (on by default).

    """
    path = Path(path)
    cache = Path(cache_dir) if cache_dir else None
    runtime.configure(threads)
    if path.is_file() and path.name.endswith(_ARCHIVE_SUFFIXES):
        path = _unpack(path, cache)
    step = time.monotonic()
    manifest = verify_files(path, key)
    log.info("bundle %s: %d files verified in %.1f s", path, len(manifest.get("files", {})),
             time.monotonic() - step)
    step = time.monotonic()
    try:
        spec = PreprocessSpec.from_dict(manifest["preprocess"])
        scorer_rec = manifest["scorer"]
        if scorer_rec["type"] not in SCORERS:
            raise BundleError(f"{path}: scorer type {scorer_rec['type']!r} is not known to this appliance "
                              f"(known: {sorted(SCORERS)})")
        scorer = create(scorer_rec["type"], scorer_rec["config"])
        arrays = {name: np.load(path / rel, allow_pickle=False) for name, rel in scorer_rec["arrays"].items()}
        scorer.load_state(arrays, scorer_rec["meta"])
        calibration = Calibration.from_dict(manifest["calibration"])
        chosen = precision or manifest["backbone"]["precision"]
        plan_batch = _batch_shape(spec)
        backbone = Backbone(path / manifest["backbone"]["xml"], plan_batch, precision=chosen, threads=threads,
                            streams=streams, cache_dir=(cache / "openvino") if cache else None)
    except BundleError:
        raise
    except (ApplianceError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: bundle is incompatible with this appliance: {exc}") from None
    if backbone.output_shape[1] != manifest["backbone"]["output_channels"]:
        raise BundleError(f"{path}: backbone gives {backbone.output_shape[1]} channels, bundle expects "
                          f"{manifest['backbone']['output_channels']}")
    position_norm = _load_position_norm(path, manifest, backbone.output_shape)
    load_drift_baseline(path, manifest)  # checked here so that an unusable baseline refuses the bundle
    engine = Engine(spec, backbone, scorer, calibration, manifest["model_id"], manifest=manifest, bundle_path=path,
                    position_norm=position_norm)
    log.info("bundle %s: scorer loaded, backbone compiled (%s%s) in %.1f s", path, backbone.precision,
             ", model cache unusable" if backbone.cache_problem else "", time.monotonic() - step)
    step = time.monotonic()
    scorer.warm_up(backbone.output_shape)
    log.info("bundle %s: scorer kernels ready in %.1f s (compiled on a cold cache, loaded from it after)", path,
             time.monotonic() - step)
    if check_golden:
        step = time.monotonic()
        check_golden_images(engine, path, manifest, chosen)
        log.info("bundle %s: %d golden images score as recorded (%.1f s)", path, len(manifest.get("golden", [])),
                 time.monotonic() - step)
    return engine


def _load_position_norm(path: Path, manifest: dict, output_shape: tuple[int, ...]) -> PositionNorm | None:
    """The bundle's per-position normalisation, checked against the backbone's patch grid."""
    record = manifest.get("position_norm")
    if not record:
        return None
    try:
        norm = PositionNorm(np.load(path / record["mean"], allow_pickle=False),
                            np.load(path / record["scale"], allow_pickle=False), int(record["images"]))
    except (ApplianceError, KeyError, TypeError, ValueError, OSError) as exc:
        raise BundleError(f"{path}: bundle's position norm is unusable: {exc}") from None
    grid = (output_shape[0], *output_shape[2:])
    if norm.mean.shape != grid:
        raise BundleError(f"{path}: position norm is for a {norm.mean.shape} patch grid, the backbone gives {grid}")
    return norm


def load_drift_baseline(bundle_path: str | Path, manifest: dict) -> DriftBaseline | None:
    """The bundle's drift baseline, or ``None`` when it has none (formats before 5, or too few held-out images).

    ``manifest`` is the verified one (``engine.manifest``); its files' hashes were checked when it was loaded.
    """
    record = manifest.get("drift")
    if not record:
        return None
    path = Path(bundle_path)
    try:
        baseline = DriftBaseline.from_arrays(
            {name: np.load(path / rel, allow_pickle=False) for name, rel in record["arrays"].items()})
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise BundleError(f"{path}: bundle's drift baseline is unusable: {exc}") from None
    channels = manifest["backbone"]["output_channels"]
    if baseline.channels != channels:
        raise BundleError(f"{path}: drift baseline is for {baseline.channels} embedding channels, the backbone "
                          f"gives {channels}")
    return baseline


def _batch_shape(spec: PreprocessSpec) -> tuple[int, int, int]:
    plan = plan_tiles(spec)
    return (plan.count, *plan.tile)


def check_golden_images(engine: Engine, path: Path, manifest: dict, precision: str) -> None:
    """Score the stored golden images; refuse the bundle if any differs from its recorded score.

    The tolerance is relative to the larger of the recorded score and the threshold: position-normalised
    scores can sit near zero, where a relative test alone would trip on rounding.
    """
    tol = GOLDEN_TOLERANCE.get(precision, 0.08)
    threshold = abs(engine.calibration.threshold) if engine.calibration else 0.0
    for rec in manifest.get("golden", []):
        raw = engine.score(read_image(path / rec["file"])).image_score
        ref = rec["raw_score"]
        if abs(raw - ref) > tol * max(abs(ref), threshold, 1e-6):
            raise BundleError(
                f"{path}: golden image {rec['file']} scores {raw:.5g} here but {ref:.5g} when the bundle was built "
                f"(tolerance {tol:.0%}); the runtime's preprocessing or backbone differs from the build's")
