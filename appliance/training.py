"""Fitting a model: dataset -> features -> scorer -> calibration (and drift baseline) -> golden images -> bundle.

The training images' sizes are read first and decide the resize policy
(``geometry.choose``). Feature extraction is pipelined (a reader thread decodes and
preprocesses while the backbone runs two asynchronous requests) and streamed into
the scorer, so memory is bounded by the scorer's own needs. Unreadable training
images are skipped and reported; more than ``MAX_SKIPPED_SHARE`` of them is an
error, so a fit never succeeds on a fraction of its data unnoticed. The bundle is
written, then loaded back through ``load_bundle`` (the one loading path), so a
fit that returns has produced a bundle that verifies and passes its golden check.
"""

from __future__ import annotations

import queue
import resource
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from appliance_models import backbone_dir

from . import runtime
from .backbone import Backbone
from .bundle import Golden, load_bundle, write_bundle
from .calibration import calibrate
from .datasets import Dataset, Sample
from .drift import MIN_BASELINE, DriftBaseline, pooled_embedding
from .engine import Engine
from .errors import ApplianceError, BackboneError, ConfigError, DatasetError
from .frame_format import survey as survey_frames
from .geometry import choose as choose_geometry
from .imaging import read_image, read_mask
from .position_norm import MIN_IMAGES, PositionNorm
from .preprocess import Preprocessor, PreprocessSpec, plan_tiles, round_to
from .scorers import SCORERS, Scorer, create

#: Called with (stage, done, total).
StageProgress = Callable[[str, int, int], None]
#: Largest share of training (or test) images that may be skipped as unreadable before a command fails.
MAX_SKIPPED_SHARE = 0.05


@dataclass(frozen=True)
class FitOptions:
    """Everything that decides what a fit produces (recorded in the bundle).

    Attributes:
        scorer: ``patchcore`` or ``padim``.
        settings: the scorer's settings (see its config class).
        height: working height in pixels (rounded to a multiple of 16); ``None``: the frame's (ROI's)
            own height, rounded down (full resolution, for tiling).
        width: working width; ``None`` keeps the aspect ratio.
        tile: tile ``(H, W)`` for tiled inference, or ``None``.
        overlap: minimum tile overlap in working pixels.
        roi: ``(x, y, w, h)`` crop in source pixels.
        white_level: 16-bit value that maps to white.
        interpolation: ``area`` or ``linear`` resampling when shrinking frames.
        resize: ``fixed``, ``stretch``, ``letterbox``, or ``None`` to choose from the training
            images' sizes (``geometry.choose``).
        valid_mask: path of a source-size mask of the area to inspect (non-zero = inspect).
        frame_convert: ``refuse``: the model takes frames of its training images' channels and bit depth
            (which must all be the same) and refuses others; ``grey``: every frame, training and
            inspected, is converted to grey luminance first (``appliance.frame_format``).
        precision: backbone precision, ``f32`` or ``bf16``.
        threads: CPU threads (``None``: all).
        target_false_reject_rate: threshold target when there are no labelled defects.
        position_norm: normalise patch scores per position by their mean and spread over the
            held-out good images (see ``appliance.position_norm``), if there are enough of them.
        position_norm_min_images: how many are enough. On the ball-screw data, statistics from 10
            images gave no gain (noisy spreads); from 28 and more, +0.5 to +2 image-AUROC points.
        golden: how many golden images to store.
        backbone: shipped backbone name (``None``: the scorer's own default embedding).
        cache_dir: OpenVINO cache folder.

    """

    scorer: str = "patchcore"
    settings: dict = field(default_factory=dict)
    height: int | None = 256
    width: int | None = None
    tile: tuple[int, int] | None = None
    overlap: int = 32
    roi: tuple[int, int, int, int] | None = None
    white_level: int | None = None
    interpolation: str = "linear"
    resize: str | None = None
    valid_mask: str | None = None
    frame_convert: str = "refuse"
    precision: str = "f32"
    threads: int | None = None
    target_false_reject_rate: float = 0.01
    position_norm: bool = True
    position_norm_min_images: int = 20
    golden: int = 3
    backbone: str | None = None
    cache_dir: str | None = None


@dataclass
class FitReport:
    """What a fit did: the bundle, its engine, its geometry, what was skipped and how long each stage took."""

    bundle: Path
    engine: Engine
    geometry: str
    skipped: list[tuple[str, str]]
    seconds: dict[str, float]
    peak_rss_mb: float
    calibration_scores: dict[str, list[float]]
    drift: DriftBaseline | None = None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def describe_skipped(skipped: Sequence[tuple[str, str]], limit: int = 3) -> str:
    """The reasons images were skipped, most common first, with counts and an example file each."""
    groups: dict[str, list[str]] = {}
    for path, reason in skipped:
        groups.setdefault(reason.removeprefix(f"{path}: "), []).append(path)
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    parts = [f"{len(paths)} x {reason} (e.g. {paths[0]})" for reason, paths in ranked[:limit]]
    if len(ranked) > limit:
        parts.append(f"{sum(len(p) for _, p in ranked[limit:])} more with other reasons")
    return "; ".join(parts)


def check_skipped(skipped: Sequence[tuple[str, str]], total: int, what: str) -> None:
    """Raise ``DatasetError`` when more than ``MAX_SKIPPED_SHARE`` of ``total`` images were skipped."""
    if total and len(skipped) > MAX_SKIPPED_SHARE * total:
        raise DatasetError(f"{len(skipped)} of {total} {what} could not be used (more than "
                           f"{MAX_SKIPPED_SHARE:.0%}): {describe_skipped(skipped)}")


def in_order(items: Iterator[tuple[int, object]]) -> Iterator[object]:
    """Values of ``(key, value)`` pairs numbered 0, 1, 2, ... that arrive in any order, in key order."""
    pending: dict[int, object] = {}
    nxt = 0
    for key, value in items:
        pending[key] = value
        while nxt in pending:
            yield pending.pop(nxt)
            nxt += 1
    if pending:
        raise RuntimeError(f"results {sorted(pending)} arrived without result {nxt}")


def _feature_stream(samples: Sequence[Sample], pre: Preprocessor, backbone: Backbone,
                    skipped: list[tuple[str, str]], progress: StageProgress | None, stage: str = "features"
                    ) -> Iterator[tuple[Sample, np.ndarray, tuple[int, int]]]:
    """``(sample, backbone features, frame shape)`` per readable sample, in sample order; bad ones go to ``skipped``.

    Images are decoded ahead on a reader thread and the backbone runs asynchronous requests,
    which may finish out of order: results are put back in submission order, so the same
    data always gives the same model.
    """
    results: queue.Queue = queue.Queue()
    slots = threading.Semaphore(4)
    stop = threading.Event()
    skipped_before = len(skipped)

    def reader() -> None:
        try:
            submitted = 0
            for s in samples:
                if stop.is_set():
                    return
                try:
                    image = read_image(s.path)
                    batch = pre.tiles(image)
                except ApplianceError as exc:
                    skipped.append((str(s.path), str(exc)))
                    continue
                slots.acquire()
                userdata = (submitted, s, image.shape[:2])
                backbone.submit(batch, userdata, lambda feats, ud, _s: results.put((ud[0], (ud[1], feats, ud[2]))))
                submitted += 1
            backbone.wait()
            results.put(None)
        except BaseException as exc:  # surfaced in the consumer
            results.put(exc)

    thread = threading.Thread(target=reader, name=f"{stage}-reader", daemon=True)
    thread.start()

    def arrivals() -> Iterator[tuple[int, tuple[Sample, np.ndarray, tuple[int, int]]]]:
        while (item := results.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            if item[1][1] is None:
                raise BackboneError(f"{item[1][0].path}: backbone inference failed")
            yield item

    try:
        for done, triple in enumerate(in_order(arrivals()), 1):
            slots.release()
            if progress:
                progress(stage, done + len(skipped) - skipped_before, len(samples))
            yield triple
    finally:
        stop.set()
        for _ in range(4):
            slots.release()


def _load_valid_mask(path: str | None, source_size: tuple[int, int]) -> np.ndarray | None:
    return None if path is None else read_mask(path, source_size)


def _position_norm(scorer: Scorer, goods: list[tuple[np.ndarray, np.ndarray | None]], valid: np.ndarray | None
                   ) -> tuple[PositionNorm, list[float]]:
    """The position norm of the good held-out images, and each one's score as an unseen image would get it.

    ``goods`` holds each image's features and the patches that show it (``None``: all). Each good
    image is scored with the statistics of the *other* good images (leave-one-out); scoring it with
    statistics it took part in would set the threshold too low.
    """
    raw = np.stack([scorer.patch_scores(f, shows) for f, shows in goods])
    shown = None if all(s is None for _, s in goods) else np.stack(
        [np.ones(raw.shape[1:], bool) if s is None else s for _, s in goods])
    norms = PositionNorm.leave_one_out(raw, valid, shown)
    scores = [scorer.score(f, norm, shows)[1] for (f, shows), norm in zip(goods, norms, strict=True)]
    return PositionNorm.fit(raw, valid, shown), scores


def _describe_norm(norm: PositionNorm | None, n_good: int, options: FitOptions) -> str:
    """What the bundle records about its position norm, or why it has none."""
    if norm is not None:
        return f"patch scores normalised per position over {norm.images} good images"
    if options.position_norm:
        return f"none ({n_good} held-out good images, {options.position_norm_min_images} wanted)"
    return "none"


def fit(dataset: Dataset, out: str | Path, options: FitOptions, progress: StageProgress | None = None,
        key: bytes | None = None, notify: Callable[[str], None] | None = None) -> FitReport:
    """Fit a model on ``dataset.train``, calibrate it on ``dataset.calibration``, write a verified bundle.

    ``notify`` receives one-line decisions as they are made (the resize policy and why), before the long work.
    """
    t_start = time.perf_counter()
    runtime.configure(options.threads)
    if not dataset.train:
        raise DatasetError(f"{dataset.root}: no training images")
    geometry = choose_geometry([s.path for s in dataset.train], options.resize, options.roi)
    if notify:
        notify(f"resize   {geometry.reason}")
    skipped: list[tuple[str, str]] = list(geometry.unreadable)
    check_skipped(skipped, len(dataset.train), "training images")
    readable = [s for s in dataset.train if str(s.path) not in {p for p, _ in geometry.unreadable}]
    frame = survey_frames([s.path for s in readable], options.frame_convert)
    if notify:
        rule = "every frame is converted to grey first" if frame.convert == "grey" else "other frames are refused"
        notify(f"frames   {frame.describe()} ({rule})")
    source_size = geometry.source_size
    width = options.width
    if width is None and geometry.resize != "fixed" and options.height is not None:
        width = round_to(options.height * geometry.aspect)
    spec = PreprocessSpec.for_source(source_size, options.height, width, options.tile, options.overlap,
                                     options.roi, options.white_level, options.interpolation, geometry.resize,
                                     frame)
    pre = Preprocessor(spec)
    valid_mask = _load_valid_mask(options.valid_mask, source_size)
    plan = plan_tiles(spec)
    if options.scorer not in SCORERS:
        raise ConfigError(f"unknown scorer type {options.scorer!r}; available: {sorted(SCORERS)}")
    try:
        bb_dir = backbone_dir(options.backbone or SCORERS[options.scorer].default_backbone)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    xml = next(bb_dir.glob("*.xml"))
    cache = Path(options.cache_dir) / "openvino" if options.cache_dir else None
    backbone = Backbone(xml, (plan.count, *plan.tile), precision=options.precision, threads=options.threads,
                        streams=2, cache_dir=cache)
    scorer = create(options.scorer, options.settings)

    stream = _feature_stream(readable, pre, backbone, skipped, progress)
    train_embeddings: list[np.ndarray] = []  # the drift baseline's principal axes come from these
    fit_stats = scorer.fit(_tap_embeddings(stream, train_embeddings), len(readable), pre.valid_patches(valid_mask))
    t_fit = time.perf_counter()
    n_train = len(dataset.train) - len(skipped)  # so far only training images were skipped
    if n_train < 1:
        raise DatasetError(f"{dataset.root}: none of the {len(dataset.train)} training images could be used: "
                           f"{describe_skipped(skipped)}")
    check_skipped(skipped, len(dataset.train), "training images")

    calib = [s for s in dataset.calibration if s.label in ("good", "defect")]
    skipped_calib: list[tuple[str, str]] = []
    held_out = [(s, f, pre.frame_valid(shape))
                for s, f, shape in _feature_stream(calib, pre, backbone, skipped_calib, progress, "calibrate")]
    check_skipped(skipped_calib, len(calib), "held-out calibration images")
    skipped += skipped_calib
    goods = [(f, shows) for s, f, shows in held_out if s.label == "good"]
    if len(goods) < 2:
        raise DatasetError(
            f"{dataset.root}: calibration needs at least 2 readable held-out good images, got {len(goods)}; "
            "hold out more train images (calibration fraction) or add a validation folder")
    position_norm = good = None
    if options.position_norm and len(goods) >= max(options.position_norm_min_images, MIN_IMAGES + 1):
        position_norm, good = _position_norm(scorer, goods, pre.valid_patches(valid_mask))
    records = [(scorer.score(f, position_norm, shows)[1], s) for s, f, shows in held_out]  # as the bundle will
    if good is None:
        good = [score for score, s in records if s.label == "good"]
    defect = [score for score, s in records if s.label == "defect"]
    calibration = calibrate(np.array(good), np.array(defect), options.target_false_reject_rate)
    drift, drift_note = _drift_baseline(train_embeddings, [f for s, f, _ in held_out if s.label == "good"], good)
    del held_out, goods
    t_cal = time.perf_counter()

    golden = _golden(records, options.golden)
    training = {
        "dataset": dataset.name, "root": str(dataset.root), "options": _options_record(options),
        "resize": {"policy": geometry.resize, "reason": geometry.reason},
        "images": {"train": n_train, "calibration_good": len(good), "calibration_defect": len(defect)},
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "fit": fit_stats, "calibration": calibration.describe(),
        "position_norm": _describe_norm(position_norm, len(good), options),
        "drift": drift_note,
        "seconds": {"features_and_fit": round(t_fit - t_start, 2), "calibration": round(t_cal - t_fit, 2)},
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    bundle = write_bundle(out, spec=spec, backbone_dir=bb_dir, precision=options.precision, scorer=scorer,
                          calibration=calibration, golden=golden, training=training, valid_mask=valid_mask, key=key,
                          position_norm=position_norm, drift=drift)
    del backbone
    loaded = load_bundle(bundle, threads=options.threads, cache_dir=options.cache_dir, key=key)
    seconds = {**training["seconds"], "total": round(time.perf_counter() - t_start, 2)}
    return FitReport(bundle, loaded, geometry.reason, skipped, seconds, _peak_rss_mb(),
                     {"good": good, "defect": defect}, drift)


def _tap_embeddings(stream: Iterator[tuple[Sample, np.ndarray, tuple[int, int]]], into: list[np.ndarray]
                    ) -> Iterator[np.ndarray]:
    """The features of a stream, each one's pooled embedding appended to ``into`` on the way."""
    for _, features, _ in stream:
        into.append(pooled_embedding(features))
        yield features


def _drift_baseline(train: list[np.ndarray], features: list[np.ndarray], scores: list[float]
                    ) -> tuple[DriftBaseline | None, str]:
    """The drift baseline and the training record's line about it (``None`` and why, when there can be none).

    Axes from the training embeddings, the good held-out images as the reference. ``scores`` are
    the held-out images' calibration scores, as an unseen image gets them (leave-one-out when
    position-normalised): scored with a norm they took part in, every live window would look
    shifted upwards. A model without a baseline is still a model (the daemon then does not watch
    drift), so a baseline that cannot be built never fails the fit.
    """
    if len(features) < MIN_BASELINE:
        return None, f"none ({len(features)} held-out good images, {MIN_BASELINE} wanted)"
    try:
        baseline = DriftBaseline.fit(np.stack(train), np.stack([pooled_embedding(f) for f in features]),
                                     np.asarray(scores))
    except ValueError as exc:
        return None, f"none ({exc})"
    return baseline, baseline.describe()


def _golden(records: list[tuple[float, Sample]], count: int) -> list[Golden]:
    """Lowest, median and highest scoring good calibration images, then the top defect: a spread of scores."""
    goods = sorted((r for r in records if r[1].label == "good"), key=lambda r: r[0])
    defects = sorted((r for r in records if r[1].label == "defect"), key=lambda r: r[0])
    picks = []
    if goods:
        picks += [goods[0], goods[len(goods) // 2], goods[-1]]
    if defects:
        picks.append(defects[-1])
    unique, seen = [], set()
    for score, sample in picks:
        if sample.path not in seen:
            seen.add(sample.path)
            unique.append(Golden(read_image(sample.path), float(score), sample.label))
    return unique[:count] if count < len(unique) else unique


def _options_record(options: FitOptions) -> dict:
    record = asdict(options)
    record.pop("cache_dir")
    return record
