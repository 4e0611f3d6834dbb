"""What the trainer does when asked: the one place the API, the page, the CLI and the scheduler go through.

Appliance operations take the appliance id the caller authenticated as and touch only that
appliance's rows and blobs, so no route can reach another appliance's data. Admin operations
register appliances, set camera policies and schedules, and start, approve or cancel rebuilds.

Rebuild jobs live in the catalogue; the queue only carries their ids to the workers. Two rules
hold even with several trainer processes on one catalogue: a camera never has two open rebuild
jobs, and each due time of a schedule creates one job. Both are check-then-create followed by a
re-check in which the oldest job wins (a later duplicate is cancelled before it is enqueued),
because the catalogue interface has no cross-process lock to offer.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from .client import Received, TrainerRefused, TrainerUnavailable, UploadDone, UploadPlan
from .config import TrainerConfig
from .queue import JobQueue
from .records import (
    Appliance,
    Camera,
    Dataset,
    DriftEvent,
    Evaluation,
    FrameMeta,
    Job,
    Label,
    Model,
)
from .storage.base import Storage

log = logging.getLogger(__name__)

#: A job in one of these states is open: a camera has at most one.
OPEN = ("awaiting_approval", "queued", "running")
#: A schedule's due time is still honoured this long after it passed (a trainer restarting at 03:00);
#: older ones are skipped, as cron does.
CATCH_UP_S = 3600.0
#: Camera ids end up in blob keys and file names: the daemon's own rule, a little wider.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Fields of a camera an admin sets (the appliance reports the others).
CAMERA_SETTINGS = ("policy", "backend", "settings", "schedule")


class NotFound(TrainerRefused):
    """No such appliance, camera or job (404)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 404)


class Conflict(TrainerRefused):
    """The request does not fit the current state: a job already open, an id taken (409)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 409)


class Invalid(TrainerRefused):
    """The request is well-formed but wrong: bytes that do not match their sha256, a bad cron (422)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 422)


def frame_key(appliance_id: str, camera_id: str, sha256: str, suffix: str) -> str:
    """Where a frame's bytes go in the blob store: content-addressed, under its appliance and camera."""
    return f"frames/{appliance_id}/{camera_id}/{sha256}{suffix}"


def check_id(value: str, what: str) -> str:
    """An appliance or camera id that is safe in blob keys and file names, or ``Invalid``."""
    if not _ID.match(value):
        raise Invalid(f"{what} {value!r}: use 1-64 letters, digits, '.', '-' or '_', starting with a letter or digit")
    return value


def check_schedule(expression: str) -> str:
    """A cron expression croniter understands (``0 3 * * 0``, ``@daily``), or ``Invalid``."""
    from croniter import croniter

    if not croniter.is_valid(expression):
        raise Invalid(f"schedule {expression!r} is not a cron expression (e.g. '0 3 * * 0': Sundays at 03:00)")
    return expression


def last_due(expression: str, now: float) -> float:
    """The latest time at or before ``now`` a schedule was due, in the trainer's local time zone."""
    from croniter import croniter

    base = datetime.fromtimestamp(now).astimezone()
    return croniter(expression, base).get_prev(datetime).timestamp()


_NO_BYTES = "no bytes"


class TrainerService:
    """The trainer's operations over its storage and job queue (thread-safe)."""

    def __init__(self, storage: Storage, queue: JobQueue, config: TrainerConfig,
                 clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.catalogue = storage.catalogue
        self.blobs = storage.blobs
        self.queue = queue
        self.config = config
        self.clock = clock
        self._jobs_lock = threading.Lock()
        self._cameras: set[tuple[str, str]] = set()  # known to exist: saves a lookup per frame

    # ================================================================== appliance operations
    def report_camera(self, appliance_id: str, camera_id: str, model_id: str | None = None,
                      drift_state: str | None = None, drift_at: float | None = None) -> Camera:
        """Note the model a camera runs and its drift state (fields left ``None`` stay as they were)."""
        check_id(camera_id, "camera")
        fields = {k: v for k, v in (("model_id", model_id), ("drift_state", drift_state), ("drift_at", drift_at))
                  if v is not None}
        camera = self.catalogue.upsert_camera(appliance_id, camera_id, updated_at=self.clock(), **fields)
        self._cameras.add((appliance_id, camera_id))
        return camera

    def upload_plan(self, appliance_id: str, meta: FrameMeta) -> UploadPlan:
        """Whether the frame's bytes are needed: ``known`` (recorded, nothing to send) or ``upload`` (where to).

        Bytes already in the store under the frame's key (the same file kept for two inspections, or a
        resend whose metadata never arrived) are checked and the frame recorded at once.
        """
        key = self._frame_key(appliance_id, meta)
        if self._blob_matches(key, meta) is None:  # one read: absent bytes are a miss like wrong ones
            self.catalogue.add_frame(appliance_id, meta, key, self.clock())
            return UploadPlan(status="known", key=key)
        return UploadPlan(status="upload", url=self._presign(key), key=key)

    def put_content(self, appliance_id: str, camera_id: str, sha256: str, suffix: str, data: bytes) -> str:
        """Store a frame's bytes that came through the API (not presigned); returns the blob key."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256) or not re.fullmatch(r"\.[a-z0-9]{1,5}", suffix):
            raise Invalid("sha256 must be 64 lower-case hex digits and suffix like '.png'")
        self._ensure_camera(appliance_id, camera_id)
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise Invalid(f"the bytes' sha256 is {actual}, not {sha256}: the frame changed or was cut short")
        key = frame_key(appliance_id, camera_id, sha256, suffix)
        self.blobs.put(key, data)  # even over bytes already there: they may be a bad presigned PUT's
        return key

    def finish_upload(self, appliance_id: str, meta: FrameMeta, data: bytes | None = None) -> UploadDone:
        """Record a frame whose bytes are in the store (or are ``data``), once their sha256 and size check out.

        Idempotent: a frame recorded before answers ``known``. Bytes that do not match (a presigned PUT
        cut short, or of another file) are deleted, so the next plan asks for them again.
        """
        key = self._frame_key(appliance_id, meta)
        if data is not None:
            if len(data) != meta.size:
                raise Invalid(f"{len(data)} bytes sent, the metadata says {meta.size}")
            self.put_content(appliance_id, meta.camera_id, meta.sha256, meta.suffix, data)
        else:
            problem = self._blob_matches(key, meta)  # one read: no bytes, or which bytes
            if problem == _NO_BYTES:
                raise Conflict(f"no bytes under {key}: send them first (plan the upload again)")
            if problem is not None:
                self.blobs.delete(key)
                raise Invalid(f"{key}: {problem}; deleted, send the bytes again")
        recorded = self.catalogue.add_frame(appliance_id, meta, key, self.clock())
        return UploadDone(status="recorded" if recorded else "known", key=key)

    def add_labels(self, appliance_id: str, labels: Sequence[Label]) -> Received:
        """Record labels and their undoings (idempotent by label id: the newer state wins)."""
        for label in labels:
            self._ensure_camera(appliance_id, label.camera_id)
            self.catalogue.upsert_label(appliance_id, label)
        return Received(received=len(labels), recorded=len(labels))

    def add_drift_events(self, appliance_id: str, events: Sequence[DriftEvent]) -> Received:
        """Record drift events; a new ``drift_raised`` asks for a rebuild as the camera's policy says.

        ``approve`` (the default): the job waits for a person; ``auto``: it is queued at once. A camera
        with an open job gets no second one (the open one will rebuild from the newer frames anyway).
        """
        recorded, jobs = 0, []
        for event in sorted(events, key=lambda e: e.at):
            self._ensure_camera(appliance_id, event.camera_id)
            if not self.catalogue.add_drift_event(appliance_id, event):
                continue
            recorded += 1
            if event.kind != "drift_raised":
                continue
            camera = self.catalogue.camera(appliance_id, event.camera_id)
            status = "queued" if camera is not None and camera.policy == "auto" else "awaiting_approval"
            try:
                job, blocker = self._new_job(appliance_id, event.camera_id, "drift", status,
                                             f"drift raised at {_when(event.at)} (event {event.id})")
            except TrainerUnavailable:  # the job is recorded as failed, with why; a resend would not redo it
                jobs.extend(self.catalogue.jobs(appliance_id=appliance_id, camera_id=event.camera_id, limit=1))
                continue
            if job is not None:
                jobs.append(job)
            else:
                log.info("drift on %s/%s: job %s is open already", appliance_id, event.camera_id, blocker.id)
        return Received(received=len(events), recorded=recorded, jobs=jobs)

    def published_models(self, appliance_id: str) -> list[Model]:
        """The published models of the appliance's cameras, newest first."""
        return self.catalogue.models(appliance_id=appliance_id, status="published")

    # ================================================================== admin operations
    def register_appliance(self, appliance_id: str, name: str = "") -> tuple[Appliance, str]:
        """Register an appliance; returns it and its token (shown once: only its hash is kept)."""
        check_id(appliance_id, "appliance")
        try:
            token = self.catalogue.add_appliance(appliance_id, name)
        except KeyError:
            raise Conflict(f"appliance {appliance_id!r} is registered already (rotate its token instead)") from None
        return self.appliance(appliance_id), token

    def rotate_token(self, appliance_id: str) -> tuple[Appliance, str]:
        """A new token for an appliance (the old one stops working at once); returns it and the token."""
        appliance = self.appliance(appliance_id)
        try:
            return appliance, self.catalogue.rotate_token(appliance_id)
        except KeyError:
            raise NotFound(f"no appliance {appliance_id!r}") from None

    def configure_camera(self, appliance_id: str, camera_id: str, **fields: Any) -> Camera:
        """Set a camera's rebuild ``policy``, ``backend``, fit ``settings`` or cron ``schedule`` (None: none)."""
        self.appliance(appliance_id)
        check_id(camera_id, "camera")
        unknown = set(fields) - set(CAMERA_SETTINGS)
        if unknown:
            raise Invalid(f"unknown camera settings: {', '.join(sorted(unknown))}")
        if fields.get("policy") not in (None, "approve", "auto"):
            raise Invalid(f"policy {fields['policy']!r}: 'approve' or 'auto'")
        if fields.get("schedule") is not None:
            check_schedule(fields["schedule"])
        if "backend" in fields or "settings" in fields:
            _check_rebuild(fields)
        camera = self.catalogue.upsert_camera(appliance_id, camera_id, **fields)
        self._cameras.add((appliance_id, camera_id))
        return camera

    def request_rebuild(self, appliance_id: str, camera_id: str, who: str) -> Job:
        """Queue a rebuild a person asked for; ``Conflict`` if the camera has an open job."""
        if self.catalogue.camera(appliance_id, camera_id) is None:
            raise NotFound(f"no camera {camera_id!r} on appliance {appliance_id!r}")
        job, blocker = self._new_job(appliance_id, camera_id, "request", "queued", f"requested by {who}",
                                     approved_by=who)
        if job is None:
            raise Conflict(f"job {blocker.id} of {appliance_id}/{camera_id} is {blocker.status}: approve, cancel "
                           f"or wait for it")
        return job

    def approve(self, job_id: int, who: str) -> Job:
        """Queue a job that waits for approval, noting who approved it."""
        with self._jobs_lock:
            job = self._job(job_id)
            if job.status != "awaiting_approval":
                raise Conflict(f"job {job_id} is {job.status}, not awaiting approval")
            job = self.catalogue.update_job(job_id, status="queued", approved_by=who)
        return self._enqueue(job, revert="awaiting_approval")

    def cancel(self, job_id: int, who: str) -> Job:
        """Cancel a job that has not started (awaiting approval or queued)."""
        with self._jobs_lock:
            job = self._job(job_id)
            if job.status not in ("awaiting_approval", "queued"):
                raise Conflict(f"job {job_id} is {job.status}: only a job awaiting approval or queued can be "
                               f"cancelled")
            return self.catalogue.update_job(job_id, status="cancelled", finished_at=self.clock(),
                                             detail=_append(job.detail, f"cancelled by {who}"))

    # ------------------------------------------------------------------ lists (the page and the admin API)
    def appliances(self) -> list[Appliance]:
        """Every registered appliance."""
        return self.catalogue.appliances()

    def cameras(self, appliance_id: str | None = None) -> list[Camera]:
        """Cameras (of one appliance)."""
        return self.catalogue.cameras(appliance_id)

    def datasets(self, appliance_id: str | None = None, camera_id: str | None = None) -> list[Dataset]:
        """Dataset versions, newest first."""
        return self.catalogue.datasets(appliance_id, camera_id)

    def jobs(self, status: Sequence[str] | None = None, appliance_id: str | None = None,
             camera_id: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first."""
        return self.catalogue.jobs(status=status, appliance_id=appliance_id, camera_id=camera_id, limit=limit)

    def job(self, job_id: int) -> Job:
        """One job, or ``NotFound``."""
        return self._job(job_id)

    def models(self, appliance_id: str | None = None, camera_id: str | None = None,
               status: str | None = None) -> list[Model]:
        """Models, newest first."""
        return self.catalogue.models(appliance_id, camera_id, status)

    def evaluations(self, model_id: str | None = None) -> list[Evaluation]:
        """Gate evaluations, newest first."""
        return self.catalogue.evaluations(model_id)

    # ================================================================== the scheduler
    def tick(self, now: float | None = None) -> list[Job]:
        """Create and enqueue the scheduled rebuilds whose cron time has passed; each due time once.

        A due time counts as done when the camera has a ``schedule`` job created at or after it, so
        any number of trainer processes may tick. When another job is open at the due time, a
        cancelled job records that the schedule was met by it.
        """
        now = self.clock() if now is None else now
        created = []
        for camera in self.catalogue.cameras():
            if not camera.schedule:
                continue
            try:
                due = last_due(camera.schedule, now)
            except (ValueError, KeyError) as exc:  # set before validation existed, or by hand in the database
                log.warning("camera %s/%s: schedule %r: %s", camera.appliance_id, camera.camera_id,
                            camera.schedule, exc)
                continue
            if now - due > CATCH_UP_S or self._scheduled_since(camera, due) is not None:
                continue
            job, blocker = self._new_job(camera.appliance_id, camera.camera_id, "schedule", "queued",
                                         f"schedule '{camera.schedule}' due {_when(due)}", due=due)
            if job is not None:
                created.append(job)
            elif self._scheduled_since(camera, due) is None:  # blocked by an open job, not by a rival's tick
                self.catalogue.add_job(camera.appliance_id, camera.camera_id, "schedule", "cancelled", now,
                                       f"schedule '{camera.schedule}' due {_when(due)}: skipped, job {blocker.id} "
                                       f"was {blocker.status}")
        return created

    def recover_jobs(self) -> list[int]:
        """Hand again to the workers the jobs shown running whose worker died (see ``JobQueue.recover``)."""
        running = [job.id for job in self.catalogue.jobs(status=["running"])]
        recovered = self.queue.recover(running) if running else []
        for job_id in recovered:
            log.warning("job %d was left running by a worker that died; queued again", job_id)
        return recovered

    # ================================================================== internals
    def _new_job(self, appliance_id: str, camera_id: str, reason: str, status: str, detail: str, *,
                 approved_by: str | None = None, due: float | None = None) -> tuple[Job | None, Job | None]:
        """Create a job unless the camera has an open one: ``(job, None)`` or ``(None, the open one)``."""
        with self._jobs_lock:
            blocker = self._open_job(appliance_id, camera_id)
            if blocker is not None:
                return None, blocker
            now = self.clock()
            job = self.catalogue.add_job(appliance_id, camera_id, reason, status, now, detail)
            rival = self._rival(job, due)
            if rival is not None:  # another trainer process created one in the same instant: the older wins
                self.catalogue.update_job(job.id, status="cancelled", finished_at=now,
                                          detail=_append(detail, f"duplicate of job {rival.id}"))
                return None, rival
            if approved_by is not None:
                job = self.catalogue.update_job(job.id, approved_by=approved_by)
        log.info("job %d: %s rebuild of %s/%s, %s", job.id, reason, appliance_id, camera_id, status)
        return (self._enqueue(job, revert=None) if status == "queued" else job), None

    def _enqueue(self, job: Job, revert: str | None) -> Job:
        """Hand a queued job to the workers; if the queue fails, undo (``revert``) or fail the job, and say so."""
        try:
            self.queue.enqueue(job.id)
        except Exception as exc:  # the queue's library and its server: any failure means "not queued"
            log.exception("job %d could not be queued", job.id)
            if revert is not None:
                self.catalogue.update_job(job.id, status=revert, approved_by=None)
            else:
                self.catalogue.update_job(job.id, status="failed", finished_at=self.clock(),
                                          detail=_append(job.detail, f"could not be queued: {exc}"))
            raise TrainerUnavailable(f"job {job.id} could not be queued: {exc}", 503) from exc
        return job

    def _open_job(self, appliance_id: str, camera_id: str) -> Job | None:
        jobs = self.catalogue.jobs(status=OPEN, appliance_id=appliance_id, camera_id=camera_id)
        return min(jobs, key=lambda j: j.id) if jobs else None

    def _rival(self, job: Job, due: float | None) -> Job | None:
        """An older job that makes ``job`` a duplicate: open, or (for a schedule) created since its due time."""
        for other in self.catalogue.jobs(appliance_id=job.appliance_id, camera_id=job.camera_id):
            if other.id >= job.id:
                continue
            if other.status in OPEN:
                return other
            if due is not None and other.reason == "schedule" and other.created_at >= due:
                return other
        return None

    def _scheduled_since(self, camera: Camera, due: float) -> Job | None:
        for job in self.catalogue.jobs(appliance_id=camera.appliance_id, camera_id=camera.camera_id):
            if job.created_at < due:
                return None  # newest first: nothing older can be at or after due
            if job.reason == "schedule":
                return job
        return None

    def _frame_key(self, appliance_id: str, meta: FrameMeta) -> str:
        self._ensure_camera(appliance_id, meta.camera_id)
        return frame_key(appliance_id, meta.camera_id, meta.sha256, meta.suffix)

    def _ensure_camera(self, appliance_id: str, camera_id: str) -> None:
        """Create the camera's row on first sight: frames, labels and drift may come before its first report."""
        if (appliance_id, camera_id) in self._cameras:
            return
        check_id(camera_id, "camera")
        if self.catalogue.camera(appliance_id, camera_id) is None:
            self.catalogue.upsert_camera(appliance_id, camera_id)
        self._cameras.add((appliance_id, camera_id))

    def _blob_matches(self, key: str, meta: FrameMeta) -> str | None:
        """``None`` when the blob under ``key`` is the frame's bytes, else what is wrong with it."""
        try:
            data = self.blobs.get(key)
        except KeyError:
            return _NO_BYTES
        if len(data) != meta.size:
            return f"{len(data)} bytes stored, the metadata says {meta.size}"
        actual = hashlib.sha256(data).hexdigest()
        return None if actual == meta.sha256 else f"the stored bytes' sha256 is {actual}, not {meta.sha256}"

    def _presign(self, key: str) -> str | None:
        s3 = getattr(self.config.storage, "s3", None)
        if s3 is not None and not s3.presign:
            return None
        return self.blobs.presign_put(key)

    def appliance(self, appliance_id: str) -> Appliance:
        """One appliance, or ``NotFound``."""
        for appliance in self.catalogue.appliances():
            if appliance.id == appliance_id:
                return appliance
        raise NotFound(f"no appliance {appliance_id!r} (register it: appliance trainer add-appliance)")

    def _job(self, job_id: int) -> Job:
        job = self.catalogue.job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job


def _check_rebuild(fields: dict[str, Any]) -> None:
    """A backend and settings the rebuild can use, checked now rather than when a job fails on them."""
    from pydantic import ValidationError

    from .rebuild import BACKENDS, CameraRebuild  # the fitting code: imported only when settings change

    if fields.get("backend") is not None and fields["backend"] not in BACKENDS:
        raise Invalid(f"backend {fields['backend']!r}: this trainer builds {', '.join(BACKENDS)}")
    if fields.get("settings") is not None:
        try:
            CameraRebuild.model_validate(fields["settings"])
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise Invalid(f"camera settings: {problems}") from None


def _when(at: float) -> str:
    return datetime.fromtimestamp(at).astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _append(detail: str | None, text: str) -> str:
    return f"{detail}; {text}" if detail else text
