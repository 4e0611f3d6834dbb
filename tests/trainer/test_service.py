"""TrainerService on both real storages (the ``storage`` fixture: SQLite + files, PostgreSQL + S3), with a
queue that records what it was handed: uploads, labels, drift and its rebuild policy, admin operations, the
scheduler (each due time once, also with a second trainer on the same catalogue)."""

from __future__ import annotations

import hashlib
import threading

import cv2
import pytest

from appliance.trainer.client import TrainerUnavailable
from appliance.trainer.config import TrainerConfig
from appliance.trainer.queue import JobQueue
from appliance.trainer.records import DriftEvent, FrameMeta, Label, Model
from appliance.trainer.service import CATCH_UP_S, Conflict, Invalid, NotFound, TrainerService, last_due

pytestmark = pytest.mark.timeout(120)

T0 = 1_800_000_000.0  # a multiple of 15 minutes, so '*/15 * * * *' is due at T0 in every time zone


class FakeQueue(JobQueue):
    """Notes the job ids it is handed; ``fail`` makes ``enqueue`` raise, as a queue whose server is down."""

    def __init__(self) -> None:
        self.enqueued: list[int] = []
        self.fail = False

    def enqueue(self, job_id: int, delay_s: float = 0.0) -> None:
        if self.fail:
            raise ConnectionError("queue down")
        self.enqueued.append(job_id)

    def work(self, handler, stop: threading.Event, concurrency: int = 1) -> None:
        raise AssertionError("the service never works jobs")


class Clock:
    def __init__(self, at: float = T0) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(storage, storage_config, queue, clock) -> TrainerService:
    return TrainerService(storage, queue, TrainerConfig(storage=storage_config), clock=clock)


def png(textures, seed: int = 0) -> bytes:
    import numpy as np

    ok, data = cv2.imencode(".png", textures.good(np.random.default_rng(seed), (64, 96)))
    assert ok
    return data.tobytes()


def meta_of(data: bytes, inspection: str = "i-1", camera: str = "line1", **fields) -> FrameMeta:
    return FrameMeta(camera_id=camera, inspection_id=inspection, sha256=hashlib.sha256(data).hexdigest(),
                     suffix=".png", size=len(data), captured_at=T0 - 60, verdict="ok", score=0.2, **fields)


def raised(event_id: str, camera: str = "line1", at: float = T0 - 30) -> DriftEvent:
    return DriftEvent(id=event_id, camera_id=camera, kind="drift_raised", at=at, stats={"p_value": 1e-4})


# ---------------------------------------------------------------------- appliances
def test_register_gives_a_token_that_authenticates_and_rotating_retires_it(service):
    appliance, token = service.register_appliance("edge-1", "Line 1")
    assert appliance.id == "edge-1" and appliance.name == "Line 1"
    assert service.catalogue.authenticate(token) == "edge-1"
    with pytest.raises(Conflict, match="registered already"):
        service.register_appliance("edge-1")
    with pytest.raises(Invalid, match="appliance"):
        service.register_appliance("../etc")
    _, new = service.rotate_token("edge-1")
    assert service.catalogue.authenticate(token) is None
    assert service.catalogue.authenticate(new) == "edge-1"
    with pytest.raises(NotFound):
        service.rotate_token("nobody")


# ---------------------------------------------------------------------- frames
def test_a_frame_through_the_api_is_recorded_once_and_then_known(service, textures):
    service.register_appliance("edge-1")
    data = png(textures)
    meta = meta_of(data)
    plan = service.upload_plan("edge-1", meta)
    assert plan.status == "upload" and plan.key == f"frames/edge-1/line1/{meta.sha256}.png"
    assert service.finish_upload("edge-1", meta, data).status == "recorded"
    assert service.blobs.get(plan.key) == data
    # The resend after an outage: the plan says known, a late finish changes nothing.
    assert service.upload_plan("edge-1", meta).status == "known"
    assert service.finish_upload("edge-1", meta).status == "known"
    assert service.finish_upload("edge-1", meta, data).status == "known"
    frames = service.catalogue.frames("edge-1")
    assert [(f.inspection_id, f.blob, f.sha256) for f in frames] == [("i-1", plan.key, meta.sha256)]
    assert service.catalogue.camera("edge-1", "line1") is not None  # created on first sight


def test_bytes_already_stored_make_a_new_inspection_known_without_an_upload(service, textures):
    service.register_appliance("edge-1")
    data = png(textures)
    service.finish_upload("edge-1", meta_of(data, "i-1"), data)
    second = meta_of(data, "i-2")  # the same file kept for a second inspection
    assert service.upload_plan("edge-1", second).status == "known"
    assert sorted(f.inspection_id for f in service.catalogue.frames("edge-1")) == ["i-1", "i-2"]


def test_bytes_that_do_not_match_are_refused_and_removed(service, textures):
    service.register_appliance("edge-1")
    data = png(textures)
    meta = meta_of(data)
    with pytest.raises(Invalid, match="sha256"):
        service.finish_upload("edge-1", meta, data[:-1] + b"x")
    with pytest.raises(Invalid, match="bytes sent"):
        service.finish_upload("edge-1", meta, data + b"x")
    with pytest.raises(Conflict, match="send them first"):
        service.finish_upload("edge-1", meta)  # finishing before any bytes arrived
    # A presigned PUT of the wrong bytes: found out at finish, deleted, asked for again.
    key = service.upload_plan("edge-1", meta).key
    service.blobs.put(key, png(textures, seed=1))
    assert service.upload_plan("edge-1", meta).status == "upload"
    with pytest.raises(Invalid, match="send the bytes again"):
        service.finish_upload("edge-1", meta)
    assert not service.blobs.exists(key)
    assert service.catalogue.frames("edge-1") == []


def test_camera_ids_that_could_leave_the_store_are_refused(service, textures):
    service.register_appliance("edge-1")
    data = png(textures)
    with pytest.raises(Invalid, match="camera"):
        service.finish_upload("edge-1", meta_of(data, camera="..%2f.."), data)
    with pytest.raises(Invalid, match="camera"):
        service.report_camera("edge-1", "a/b")


def test_one_appliance_never_sees_another_ones_frames(service, textures):
    for name in ("edge-1", "edge-2"):
        service.register_appliance(name)
    data = png(textures)
    meta = meta_of(data)
    service.finish_upload("edge-1", meta, data)
    plan = service.upload_plan("edge-2", meta)  # same camera name, same bytes: still its own
    assert plan.status == "upload" and plan.key.startswith("frames/edge-2/")
    assert service.catalogue.frames("edge-2") == []
    service.catalogue.add_model(Model(id="m-1", appliance_id="edge-1", camera_id="line1", status="published",
                                      created_at=T0))
    assert [m.id for m in service.published_models("edge-1")] == ["m-1"]
    assert service.published_models("edge-2") == []


# ---------------------------------------------------------------------- labels, reports and drift
def test_labels_and_their_undoing_are_kept_idempotently(service):
    service.register_appliance("edge-1")
    label = Label(id="L1", camera_id="line1", inspection_id="i-1", label="good", who="ann", at=T0)
    assert service.add_labels("edge-1", [label, label]).received == 2
    assert [x.id for x in service.catalogue.labels("edge-1")] == ["L1"]
    service.add_labels("edge-1", [label.model_copy(update={"undone_at": T0 + 5})])
    assert service.catalogue.labels("edge-1") == []


def test_a_report_notes_the_running_model_and_drift_state(service, clock):
    service.register_appliance("edge-1")
    camera = service.report_camera("edge-1", "line1", model_id="m-7", drift_state="ok", drift_at=T0 - 100)
    assert (camera.model_id, camera.drift_state, camera.drift_at) == ("m-7", "ok", T0 - 100)
    clock.at += 10
    camera = service.report_camera("edge-1", "line1", drift_state="drift")
    assert camera.model_id == "m-7" and camera.drift_state == "drift"  # a field not reported stays


def test_drift_raises_one_job_awaiting_approval_and_approval_queues_it(service, queue):
    service.register_appliance("edge-1")
    answer = service.add_drift_events("edge-1", [raised("d1")])
    assert answer.recorded == 1 and len(answer.jobs) == 1
    job = answer.jobs[0]
    assert (job.status, job.reason, job.camera_id) == ("awaiting_approval", "drift", "line1")
    assert queue.enqueued == []
    # The same event again (a resend) and a second raise while the job is open: no second job.
    again = service.add_drift_events("edge-1", [raised("d1"), raised("d2", at=T0 - 10)])
    assert again.recorded == 1 and again.jobs == []
    assert len(service.jobs(appliance_id="edge-1")) == 1
    approved = service.approve(job.id, "ann")
    assert (approved.status, approved.approved_by) == ("queued", "ann")
    assert queue.enqueued == [job.id]
    with pytest.raises(Conflict, match="not awaiting approval"):
        service.approve(job.id, "bob")
    with pytest.raises(NotFound):
        service.approve(999_999, "ann")


def test_a_cleared_drift_asks_for_nothing(service):
    service.register_appliance("edge-1")
    cleared = DriftEvent(id="d9", camera_id="line1", kind="drift_cleared", at=T0)
    assert service.add_drift_events("edge-1", [cleared]).jobs == []
    assert service.jobs() == []


def test_auto_policy_queues_a_drift_rebuild_at_once(service, queue):
    service.register_appliance("edge-1")
    service.configure_camera("edge-1", "line1", policy="auto")
    job = service.add_drift_events("edge-1", [raised("d1")]).jobs[0]
    assert job.status == "queued" and queue.enqueued == [job.id]


def test_cancel_a_waiting_job_then_a_new_drift_may_raise_another(service, queue):
    service.register_appliance("edge-1")
    job = service.add_drift_events("edge-1", [raised("d1")]).jobs[0]
    cancelled = service.cancel(job.id, "ann")
    assert cancelled.status == "cancelled" and "cancelled by ann" in cancelled.detail
    with pytest.raises(Conflict):
        service.cancel(job.id, "ann")
    assert len(service.add_drift_events("edge-1", [raised("d2", at=T0)]).jobs) == 1


def test_a_request_is_queued_unless_a_job_is_open(service, queue):
    service.register_appliance("edge-1")
    with pytest.raises(NotFound, match="no camera"):
        service.request_rebuild("edge-1", "line1", "ann")
    service.report_camera("edge-1", "line1", model_id="m-1")
    job = service.request_rebuild("edge-1", "line1", "ann")
    assert (job.status, job.reason, job.approved_by) == ("queued", "request", "ann")
    assert queue.enqueued == [job.id]
    with pytest.raises(Conflict, match=f"job {job.id}"):
        service.request_rebuild("edge-1", "line1", "bob")


def test_a_queue_that_is_down_fails_the_job_or_undoes_the_approval(service, queue):
    service.register_appliance("edge-1")
    service.report_camera("edge-1", "line1")
    queue.fail = True
    with pytest.raises(TrainerUnavailable, match="could not be queued"):
        service.request_rebuild("edge-1", "line1", "ann")
    assert service.jobs()[0].status == "failed"  # not left open: the camera may have another
    service.configure_camera("edge-1", "line2", policy="auto")
    failed = service.add_drift_events("edge-1", [raised("d0", camera="line2")]).jobs  # the drift is taken
    assert [(j.camera_id, j.status) for j in failed] == [("line2", "failed")] and "queue down" in failed[0].detail
    job = service.add_drift_events("edge-1", [raised("d1")]).jobs[0]
    with pytest.raises(TrainerUnavailable):
        service.approve(job.id, "ann")
    assert service.job(job.id).status == "awaiting_approval"
    queue.fail = False
    assert service.approve(job.id, "ann").status == "queued"


def test_recovery_hands_the_queue_only_the_jobs_shown_running(service, queue, storage):
    class Recovering(FakeQueue):
        def recover(self, running: list[int]) -> list[int]:
            self.asked = running
            return running[:1]

    recovering = Recovering()
    service.queue = recovering
    service.register_appliance("edge-1")
    for camera in ("line1", "line2", "line3"):
        service.report_camera("edge-1", camera)
    running = [service.request_rebuild("edge-1", c, "ann") for c in ("line1", "line2")]
    for job in running:
        storage.catalogue.update_job(job.id, status="running")
    service.request_rebuild("edge-1", "line3", "ann")  # queued: the queue has it already
    assert service.recover_jobs() == [max(j.id for j in running)]  # newest first, as the catalogue lists
    assert sorted(recovering.asked) == sorted(j.id for j in running)


def test_camera_settings_are_checked_when_set(service):
    service.register_appliance("edge-1")
    with pytest.raises(Invalid, match="cron"):
        service.configure_camera("edge-1", "line1", schedule="every sunday")
    with pytest.raises(Invalid, match="backend"):
        service.configure_camera("edge-1", "line1", backend="resnet-magic")
    with pytest.raises(Invalid, match="settings"):
        service.configure_camera("edge-1", "line1", settings={"no_such_setting": 1})
    with pytest.raises(NotFound):
        service.configure_camera("nobody", "line1", policy="auto")
    camera = service.configure_camera("edge-1", "line1", policy="auto", backend="padim", schedule="0 3 * * 0",
                                      settings={"size": "256"})
    assert (camera.policy, camera.backend, camera.schedule, camera.settings) == ("auto", "padim", "0 3 * * 0",
                                                                                {"size": "256"})
    assert service.configure_camera("edge-1", "line1", schedule=None).schedule is None


# ---------------------------------------------------------------------- the scheduler
def test_each_due_time_creates_one_job_even_with_two_trainers(service, storage, queue, clock):
    service.register_appliance("edge-1")
    service.configure_camera("edge-1", "line1", schedule="*/15 * * * *")
    other = TrainerService(storage, queue, TrainerConfig(), clock=clock)  # a second trainer process
    clock.at = T0 + 60
    first = service.tick()
    assert [(j.reason, j.status) for j in first] == [("schedule", "queued")]
    assert service.tick() == [] and other.tick() == []
    assert queue.enqueued == [first[0].id]
    service.catalogue.update_job(first[0].id, status="succeeded", finished_at=T0 + 300)
    clock.at = T0 + 900 + 5  # the next due time
    second = other.tick()
    assert len(second) == 1 and service.tick() == []
    # Due again while that job is still open: met by it, recorded once as skipped.
    clock.at = T0 + 1800 + 5
    assert service.tick() == [] and other.tick() == [] and service.tick() == []
    schedule_jobs = service.jobs(appliance_id="edge-1")
    assert [j.status for j in schedule_jobs] == ["cancelled", "queued", "succeeded"]
    assert "skipped" in schedule_jobs[0].detail
    assert queue.enqueued == [first[0].id, second[0].id]


def test_two_trainers_ticking_in_the_same_instant_keep_the_older_job(service, storage, queue, clock, monkeypatch):
    service.register_appliance("edge-1")
    service.configure_camera("edge-1", "line1", schedule="*/15 * * * *")
    other = TrainerService(storage, queue, TrainerConfig(), clock=clock)
    clock.at = T0 + 60
    created = service.tick()
    # The other process looked before the first job existed: it saw neither an open nor a scheduled job.
    calls = {"n": 0}
    real = other._scheduled_since

    def missed_once(camera, due):
        calls["n"] += 1
        return None if calls["n"] == 1 else real(camera, due)

    monkeypatch.setattr(other, "_scheduled_since", missed_once)
    monkeypatch.setattr(other, "_open_job", lambda *_: None)
    assert other.tick() == []
    jobs = service.jobs(appliance_id="edge-1")
    assert [j.status for j in jobs] == ["cancelled", "queued"]
    assert f"duplicate of job {created[0].id}" in jobs[0].detail
    assert queue.enqueued == [created[0].id]


def test_a_due_time_long_past_is_skipped_as_cron_does(service, queue, clock):
    service.register_appliance("edge-1")
    service.configure_camera("edge-1", "line1", schedule="0 0 1 1 *")  # new year: days before T0
    service.configure_camera("edge-1", "line2", schedule="0 6 * * *")
    service.configure_camera("edge-1", "line3", schedule="0 8 * * *")
    # Half an hour after 08:00 (a trainer restarting then still honours it); 06:00 and new year are long past.
    clock.at = last_due("0 8 * * *", T0) + CATCH_UP_S / 2
    assert [j.camera_id for j in service.tick()] == ["line3"]
    assert service.tick() == []
