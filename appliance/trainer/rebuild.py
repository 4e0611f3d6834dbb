"""A rebuild job, top to bottom: dataset version -> export -> fit -> bundle in the blob store -> gate -> verdict.

``run_job`` is what a worker runs for a job id the queue hands it. Every step leaves its trace in the
catalogue: the dataset version and the model (with ``dataset_id`` and ``job_id``: the lineage), one evaluation
whether the gate passes or not, and the job's outcome with the figures in ``detail``. A job that raises is
queued again after ``jobs.retry_delay_s`` until it has had ``jobs.max_attempts`` attempts; what no retry can
mend (a backend this trainer does not build, bad settings, too few frames) ends the job at once.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..bundle import check_golden_images, load_bundle, pack
from ..datasets import Sample, load_mvtec
from ..decision import DEFAULT_THRESHOLD
from ..engine import Engine
from ..errors import ApplianceError, BundleError, ConfigError, DatasetError
from ..evaluation import score_samples
from ..imaging import read_image
from ..training import FitOptions, fit
from .config import RebuildConfig, TrainerConfig
from .datasets import FOLDERS, create_version, export, member_file
from .gate import GateResult, Golden, ModelScores, decide
from .queue import Handler, JobQueue
from .records import Camera, DatasetMember, DatasetRule, Frame, Job, Model
from .storage.base import Catalogue, Storage

log = logging.getLogger(__name__)

#: Scorers this trainer fits (anomalib backends come later).
BACKENDS = ("patchcore", "padim")
DAY_S = 86400.0
#: How far ahead of the trainer's clock an appliance's may be when a drift event is matched to its job.
CLOCK_SKEW_S = 300.0


class RebuildRefusedError(ApplianceError):
    """The job asks for something this trainer does not do (a backend, a setting): refused, never retried."""


class CameraRebuild(BaseModel):
    """What a camera's ``settings`` may say about its rebuilds (each one overrides the trainer's default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: str | None = Field(None, description="working size '256' or '256x624'")
    settings: dict = Field(default_factory=dict, description="scorer settings, over the trainer's")
    threads: int | None = Field(None, ge=1)
    window_days: float = Field(30.0, gt=0, description="ok frames of this many days before the rebuild")
    max_good: int | None = Field(None, description="DatasetRule's, when set")
    outlier_quantile: float | None = Field(None, description="DatasetRule's, when set")
    eval_share: float | None = Field(None, description="DatasetRule's, when set")


@dataclass(frozen=True)
class Plan:
    """What one rebuild fits, and the rule its dataset is drawn by."""

    options: FitOptions
    rule: DatasetRule


@dataclass
class RebuildContext:
    """What a worker needs: the storage, the trainer's config, the queue (for retries) and a work folder."""

    storage: Storage
    config: TrainerConfig
    queue: JobQueue | None = None
    work_dir: Path | None = None  # default: config.work_dir
    clock: Callable[[], float] = field(default=time.time)

    @property
    def folder(self) -> Path:
        """Where jobs unpack, fit and cache (one sub-folder per job, removed when it ends)."""
        return Path(self.work_dir or self.config.work_dir)


class Stopwatch:
    """Seconds per stage of a job, kept with its evaluation: where a rebuild's time goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Close ``stage``: the time since the previous lap."""
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 2)
        self._last = now


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """``'256'`` (height, aspect kept), ``'256x624'`` or ``None`` (fit's default height)."""
    if text is None:
        return 256, None
    try:
        h, _, w = str(text).lower().partition("x")
        return int(h), int(w) if w else None
    except ValueError:
        raise RebuildRefusedError(f"size {text!r}: expected '256' or '256x624'") from None


def plan(camera: Camera, defaults: RebuildConfig, now: float, cache_dir: Path | None = None,
         normal_since: float | None = None) -> Plan:
    """The fit options and dataset rule of a camera's rebuild: its ``backend`` and ``settings`` over ``defaults``.

    The scorer is the camera's ``backend`` if one was set, else the kind of the model it runs (a model id
    starts with its scorer: ``padim-...``), so a PaDiM camera gets a PaDiM rebuild; else ``defaults.scorer``.
    """
    running = (camera.model_id or "").split("-", 1)[0]
    scorer = camera.backend or (running if running in BACKENDS else None) or defaults.scorer
    if scorer not in BACKENDS:
        raise RebuildRefusedError(f"backend {scorer!r} is not built by this trainer (it builds {', '.join(BACKENDS)})")
    try:
        own = CameraRebuild.model_validate(camera.settings)
    except ValidationError as exc:
        raise RebuildRefusedError(f"camera settings: {_problems(exc)}") from None
    height, width = parse_size(own.size or defaults.size)
    options = FitOptions(scorer=scorer, settings={**defaults.settings, **own.settings}, height=height, width=width,
                         threads=own.threads or defaults.threads, cache_dir=str(cache_dir) if cache_dir else None)
    drawn = own.model_dump(include={"max_good", "outlier_quantile", "eval_share"}, exclude_none=True)
    try:
        rule = DatasetRule(since=now - own.window_days * DAY_S, until=now, normal_since=normal_since, **drawn)
    except ValidationError as exc:
        raise RebuildRefusedError(f"camera settings: {_problems(exc)}") from None
    return Plan(options, rule)


def new_normal_since(catalogue: Catalogue, job: Job) -> float | None:
    """Where the new normal begins for a drift rebuild; ``None`` for other rebuilds.

    A drift job runs only once a person approved it (or under ``auto``): from the first frame of the
    window that raised the drift (``window_from``, else the event's time) frames are the new normal. The
    event is the newest one raised up to the job's creation (the appliance's clock may be up to
    ``CLOCK_SKEW_S`` ahead of the trainer's).
    """
    if job.reason != "drift":
        return None
    raised = [e for e in catalogue.drift_events(job.appliance_id, job.camera_id) if e.kind == "drift_raised"]
    before = [e for e in raised if e.at <= job.created_at + CLOCK_SKEW_S] or raised
    if not before:
        return None
    event = before[-1]
    start = event.stats.get("window_from")
    return float(start) if isinstance(start, int | float) else event.at


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def handler(ctx: RebuildContext) -> Handler:
    """The ``Handler`` a worker gives ``JobQueue.work``."""
    return lambda job_id: run_job(ctx, job_id)


def run_job(ctx: RebuildContext, job_id: int) -> None:
    """Run one rebuild to its end and record the outcome.

    A queued job runs. A job still marked running is one whose worker died (the queue hands a job to one
    worker at a time, and out again only when that worker stopped): it runs again while it has attempts
    left, and fails otherwise. Any other job (cancelled, ended) is left as it is.
    """
    catalogue = ctx.storage.catalogue
    job = catalogue.job(job_id)
    if job is None or job.status not in ("queued", "running"):
        log.warning("job %s: %s, not run", job_id, "no such job" if job is None else f"it is {job.status}")
        return
    if job.status == "running":
        reason = f"the worker running attempt {job.attempts} stopped before it ended"
        if job.attempts >= ctx.config.jobs.max_attempts:
            _end(ctx, job, "failed", f"attempt {job.attempts} of {ctx.config.jobs.max_attempts}: {reason}")
            return
        log.warning("job %d: %s; running it again", job_id, reason)
    job = catalogue.update_job(job_id, status="running", started_at=ctx.clock(), attempts=job.attempts + 1)
    folder = ctx.folder / f"job-{job_id}"
    shutil.rmtree(folder, ignore_errors=True)
    outcome: dict = {}
    try:
        _rebuild(ctx, job, folder, outcome)
    except RebuildRefusedError as exc:
        _end(ctx, job, "refused", str(exc))
    except (ConfigError, DatasetError) as exc:  # the frames or settings, not the moment: a retry would fail alike
        _end(ctx, job, "failed", f"{exc} (not retried)", outcome.get("model"))
    except Exception as exc:
        log.exception("job %d: attempt %d failed", job_id, job.attempts)
        _retry_or_fail(ctx, job, f"{type(exc).__name__}: {exc}", outcome.get("model"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _rebuild(ctx: RebuildContext, job: Job, folder: Path, outcome: dict) -> None:
    catalogue, blobs = ctx.storage.catalogue, ctx.storage.blobs
    camera = catalogue.camera(job.appliance_id, job.camera_id)
    if camera is None:
        raise RebuildRefusedError(f"no camera {job.appliance_id}/{job.camera_id} in the catalogue")
    cache = ctx.folder / "cache"
    p = plan(camera, ctx.config.rebuild, ctx.clock(), cache, new_normal_since(catalogue, job))
    watch = Stopwatch()
    dataset = create_version(catalogue, job.appliance_id, job.camera_id, p.rule, at=ctx.clock())
    catalogue.update_job(job.id, dataset_id=dataset.id)
    need = ctx.config.gate.min_eval_good
    if dataset.counts["train"] < 1 or dataset.counts["eval_good"] < need:  # no fit: the gate could not pass it
        raise DatasetError(f"dataset {dataset.id} v{dataset.version} has {dataset.counts['train']} training and "
                           f"{dataset.counts['eval_good']} held-out good frames; a rebuild needs 1 and {need} "
                           "(gate.min_eval_good): wait for more OK frames or labels")
    watch.lap("dataset")
    data = export(ctx.storage, dataset.id, folder / "data")
    watch.lap("export")
    log.info("job %d: dataset %d v%d %s, fitting %s", job.id, dataset.id, dataset.version, dataset.counts,
             p.options.scorer)
    report = fit(load_mvtec(data), folder / "bundle", p.options, notify=lambda line: log.info("job %d: %s",
                                                                                            job.id, line))
    model_id = report.engine.model_id
    report.engine.close()
    watch.lap("fit")
    judged = _judged_already(catalogue.model(model_id), job)
    if judged is not None:  # same frames and settings give the same bundle: its record and verdict stand
        catalogue.update_job(job.id, model_id=model_id)
        _end(ctx, job, "succeeded" if judged.status == "published" else "refused",
             f"the rebuild gave model {model_id} again (dataset {dataset.id} v{dataset.version}: same frames and "
             f"settings, same bundle); it stays {judged.status} as job {judged.job_id} decided")
        return
    archive = pack(report.bundle, folder / f"{model_id}.tar.gz")
    key = f"bundles/{model_id}.tar.gz"
    blobs.put(key, archive)
    model = catalogue.add_model(Model(id=model_id, appliance_id=job.appliance_id, camera_id=job.camera_id,
                                      status="candidate", created_at=ctx.clock(), dataset_id=dataset.id,
                                      job_id=job.id, bundle=key))
    outcome["model"] = model
    catalogue.update_job(job.id, model_id=model_id)
    watch.lap("pack_and_store")

    members = catalogue.dataset_members(dataset.id)
    result = evaluate(ctx, camera, archive, members, data, folder)
    watch.lap("evaluate")
    log.info("job %d: seconds per stage %s", job.id, watch.seconds)
    catalogue.add_evaluation(model_id, camera.model_id, dataset.id, result.passed,
                             result.metrics | {"seconds": watch.seconds}, ctx.clock())
    status = "published" if result.passed else "refused"
    outcome["model"] = catalogue.add_model(model.model_copy(update={"status": status, "detail": result.summary()}))
    _end(ctx, job, "succeeded" if result.passed else "refused", f"model {model_id} {status}: {result.summary()}")


def evaluate(ctx: RebuildContext, camera: Camera, archive: Path, members: list[DatasetMember], data: Path,
             folder: Path) -> GateResult:
    """Score the eval frames with the candidate (loaded from its archive, as published) and the running model.

    Archives unpack into the job's own folder (``load_bundle``'s cache), so jobs running side by side never
    share or remove each other's unpacked bundles.
    """
    engine = load_bundle(archive, threads=ctx.config.rebuild.threads, cache_dir=folder / "load", check_golden=False)
    try:
        golden = golden_parity(engine)
        candidate = score_members(engine, members, data)
    finally:
        engine.close()
    running = None
    if camera.model_id is not None:
        running = _running_scores_here(ctx, camera.model_id, members, data, folder)
        if running is None:
            running = recorded_scores(ctx.storage.catalogue.frames(camera.appliance_id, camera.camera_id),
                                      camera.model_id, members)
    return decide(candidate, running, ctx.config.gate, golden, camera.model_id)


def golden_parity(engine: Engine) -> Golden:
    """The bundle's golden images scored here against their recorded scores, with ``load_bundle``'s own check."""
    manifest = engine.manifest or {}
    scores = [{"file": rec["file"], "recorded": rec["raw_score"],
               "here": float(engine.score(read_image(engine.bundle_path / rec["file"])).image_score)}
              for rec in manifest.get("golden", [])]
    try:
        check_golden_images(engine, engine.bundle_path, manifest, manifest["backbone"]["precision"])
    except BundleError as exc:
        return Golden(False, scores, str(exc))
    return Golden(True, scores)


def score_members(engine: Engine, members: list[DatasetMember], data: Path, source: str = "trainer") -> ModelScores:
    """Normalised scores of the exported eval frames under ``engine``; unreadable ones are left out (and logged)."""
    samples = {}
    for m in members:
        if m.split in ("eval_good", "eval_defect"):
            label = "good" if m.split == "eval_good" else "defect"
            samples[data / member_file(m, FOLDERS[m.split][0])] = (m.inspection_id, label)
    good: dict[str, float] = {}
    defect: dict[str, float] = {}
    skipped: list[tuple[str, str]] = []
    listed = [Sample(path, label, label) for path, (_, label) in samples.items()]
    for sample, _, score in score_samples(engine, listed, skipped):
        inspection_id, label = samples[sample.path]
        (good if label == "good" else defect)[inspection_id] = float(engine.calibration.normalise(score.image_score))
    for path, reason in skipped:
        log.warning("eval frame %s not scored: %s", path, reason)
    return ModelScores(engine.model_id, good, defect, DEFAULT_THRESHOLD, source)


def recorded_scores(frames: list[Frame], model_id: str, members: list[DatasetMember]) -> ModelScores | None:
    """The scores and thresholds the appliance recorded for the eval frames under ``model_id`` (None: none)."""
    by_id = {f.inspection_id: f for f in frames if f.model_id == model_id and f.score is not None}
    good: dict[str, float] = {}
    defect: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    for m in members:
        frame = by_id.get(m.inspection_id)
        if frame is None or m.split == "train":
            continue
        (good if m.split == "eval_good" else defect)[m.inspection_id] = frame.score
        thresholds[m.inspection_id] = DEFAULT_THRESHOLD if frame.threshold is None else frame.threshold
    if not good and not defect:
        return None
    return ModelScores(model_id, good, defect, thresholds, "appliance")


def _running_scores_here(ctx: RebuildContext, model_id: str, members: list[DatasetMember], data: Path,
                         folder: Path) -> ModelScores | None:
    """The running model's scores from its bundle, when this trainer has it (it built and published it)."""
    model = ctx.storage.catalogue.model(model_id)
    if model is None or model.bundle is None or not ctx.storage.blobs.exists(model.bundle):
        return None
    try:
        archive = ctx.storage.blobs.download(model.bundle, folder / "running.tar.gz")
        engine = load_bundle(archive, threads=ctx.config.rebuild.threads, cache_dir=folder / "load")
    except BundleError as exc:
        log.warning("running model %s cannot be loaded here (%s); using the appliance's recorded scores",
                    model_id, exc)
        return None
    try:
        return score_members(engine, members, data)
    finally:
        engine.close()


def _judged_already(existing: Model | None, job: Job) -> Model | None:
    """The model record a rebuild must leave alone: one some other job judged (published or refused on its figures).

    A candidate, this job's own, or one refused unevaluated (its job broke) is evaluated again.
    """
    if existing is None or existing.job_id == job.id or existing.status == "candidate":
        return None
    if existing.status == "refused" and (existing.detail or "").startswith("not evaluated"):
        return None
    return existing


def _retry_or_fail(ctx: RebuildContext, job: Job, reason: str, model: Model | None) -> None:
    """Queue the job again after the retry delay, or fail it for good after its last attempt."""
    jobs = ctx.config.jobs
    if job.attempts < jobs.max_attempts and ctx.queue is not None:
        _refuse_orphan(ctx, model, reason)
        ctx.storage.catalogue.update_job(job.id, status="queued", detail=(
            f"attempt {job.attempts} of {jobs.max_attempts} failed: {reason}; retried in {jobs.retry_delay_s:g} s"))
        ctx.queue.enqueue(job.id, jobs.retry_delay_s)
        return
    _end(ctx, job, "failed", f"attempt {job.attempts} of {jobs.max_attempts} failed: {reason}", model)


def _end(ctx: RebuildContext, job: Job, status: str, detail: str, model: Model | None = None) -> None:
    _refuse_orphan(ctx, model, detail)
    ctx.storage.catalogue.update_job(job.id, status=status, finished_at=ctx.clock(), detail=detail)
    log.info("job %d %s: %s", job.id, status, detail)


def _refuse_orphan(ctx: RebuildContext, model: Model | None, reason: str) -> None:
    """A candidate whose job broke before its verdict is refused, so nothing half-judged is ever published."""
    if model is not None and model.status == "candidate":
        ctx.storage.catalogue.add_model(model.model_copy(update={"status": "refused",
                                                                 "detail": f"not evaluated: {reason}"}))
