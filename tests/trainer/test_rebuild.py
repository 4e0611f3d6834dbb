"""Rebuild jobs end to end on both storages and their queues: real sample frames, real (small) fits, the gate.

Frames go into the catalogue and blob store as an appliance uploads them; the camera's running model
``running-1`` is one the trainer never built, so the gate compares with the scores the appliance recorded,
until the trainer's own published model becomes the running one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_dataset_versions import APP, CAM, label, sample_images, upload

from appliance.bundle import load_bundle
from appliance.trainer.config import GateConfig, JobsConfig, RebuildConfig, TrainerConfig
from appliance.trainer.datasets import in_eval
from appliance.trainer.queues import open_queue
from appliance.trainer.rebuild import RebuildContext, RebuildRefusedError, handler, plan, run_job
from appliance.trainer.records import Camera, Job
from appliance.trainer.storage.base import Storage

pytestmark = pytest.mark.timeout(600)
SHARE = 0.3
#: Good frames the appliance rejected (score 0.7) and an operator labelled good; they hash into eval_good,
#: so the running model has false rejects there.
FALSE_REJECTS = ("fr-04", "fr-05", "fr-06")


def seed(storage: Storage, now: float, defects: int = 0, frames: int = 50) -> None:
    """An appliance with one camera (PaDiM at 128 px), its ok frames, three false rejects and labelled defects."""
    cat = storage.catalogue
    cat.add_appliance(APP)
    cat.upsert_camera(APP, CAM, model_id="running-1", backend="padim",
                      settings={"size": "128", "eval_share": SHARE})
    assert all(in_eval(i, SHARE) for i in FALSE_REJECTS)
    images = sample_images("train/good") + sample_images("test/good")
    for i in range(frames):
        iid = f"fr-{i:02d}"
        rejected = iid in FALSE_REJECTS
        upload(storage, images[i], iid, now - 3600 + 10 * i, verdict="ng" if rejected else "ok",
               score=0.7 if rejected else 0.2)
        if rejected:
            label(storage, iid, "good", at=now - 60)
    for i, path in enumerate(sample_images("test/pitting")[:defects]):
        upload(storage, path, f"pit-{i}", now - 1800 + i, verdict="ng", score=0.9)
        label(storage, f"pit-{i}", "defect", at=now - 60)


@pytest.fixture
def config(storage_config, tmp_path: Path) -> TrainerConfig:
    return TrainerConfig(storage=storage_config, work_dir=tmp_path / "work",
                         jobs=JobsConfig(max_attempts=3, retry_delay_s=2.0), rebuild=RebuildConfig(threads=2))


def new_job(storage: Storage) -> Job:
    return storage.catalogue.add_job(APP, CAM, "request", "queued", time.time())


def wait_for(storage: Storage, job_id: int, done: tuple[str, ...], timeout: float = 300) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = storage.catalogue.job(job_id)
        if job.status in done:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {storage.catalogue.job(job_id)}")


@pytest.fixture
def worker(storage: Storage, config: TrainerConfig) -> Iterator[RebuildContext]:
    """The configured queue (huey beside embedded storage, procrastinate beside fleet) worked by a thread."""
    queue = open_queue(config)
    ctx = RebuildContext(storage, config, queue)
    stop = threading.Event()
    thread = threading.Thread(target=queue.work, args=(handler(ctx), stop, 1))
    thread.start()
    yield ctx
    stop.set()
    thread.join(120)
    queue.close()
    assert not thread.is_alive()


def test_a_rebuild_publishes_a_model_that_passes_the_gate(storage: Storage, worker: RebuildContext) -> None:
    cat = storage.catalogue
    now = time.time()
    seed(storage, now)
    job = new_job(storage)
    worker.queue.enqueue(job.id)
    job = wait_for(storage, job.id, ("succeeded", "refused", "failed"))
    assert job.status == "succeeded", job.detail
    assert job.attempts == 1 and job.started_at and job.finished_at
    model = cat.model(job.model_id)
    assert (model.status, model.dataset_id, model.job_id) == ("published", job.dataset_id, job.id)
    assert model.bundle == f"bundles/{model.id}.tar.gz" and storage.blobs.exists(model.bundle)
    dataset = cat.dataset(job.dataset_id)
    assert dataset.counts["eval_good"] >= 10 and dataset.counts["eval_defect"] == 0
    assert dataset.rule.until <= job.finished_at
    assert dataset.rule.since == pytest.approx(dataset.rule.until - 30 * 86400)
    (evaluation,) = cat.evaluations(model.id)
    assert evaluation.passed and evaluation.baseline_model_id == "running-1"
    m = evaluation.metrics
    assert m["running"]["scores_from"] == "appliance"
    assert m["running"]["false_reject_rate"] == pytest.approx(3 / dataset.counts["eval_good"])
    assert any("appliance recorded" in n for n in m["notes"])
    assert any("not compared" in n for n in m["notes"])  # no labelled defects
    assert m["golden"]["passed"] and len(m["golden"]["scores"]) == 3
    assert all(abs(g["here"] - g["recorded"]) <= 1e-3 * max(1.0, abs(g["recorded"])) for g in m["golden"]["scores"])
    assert "gate passed" in job.detail and "false rejects" in job.detail
    assert set(m["seconds"]) == {"dataset", "export", "fit", "pack_and_store", "evaluate"}

    # the appliance now runs the published model; more frames arrive; the next rebuild scores the eval
    # frames with that model's own bundle
    cat.upsert_camera(APP, CAM, model_id=model.id)
    for i, path in enumerate(sample_images("test/good")[10:15]):
        upload(storage, path, f"new-{i}", now - 30 + i, model_id=model.id)
    second = new_job(storage)
    worker.queue.enqueue(second.id)
    second = wait_for(storage, second.id, ("succeeded", "refused", "failed"))
    assert second.status in ("succeeded", "refused"), second.detail
    assert cat.dataset(second.dataset_id).version == 2 and second.model_id != model.id
    (evaluation,) = cat.evaluations(second.model_id)
    assert evaluation.baseline_model_id == model.id
    assert evaluation.metrics["running"]["scores_from"] == "trainer"
    assert not any("appliance recorded" in n for n in evaluation.metrics["notes"])
    # nothing new since: a third rebuild fits the same bundle, and the judged model's record stands
    before = cat.model(second.model_id)
    third = new_job(storage)
    worker.queue.enqueue(third.id)
    third = wait_for(storage, third.id, ("succeeded", "refused", "failed"))
    assert (third.dataset_id, third.model_id) == (second.dataset_id, second.model_id)
    assert third.status == second.status and "again" in third.detail, third.detail
    assert cat.model(second.model_id) == before and len(cat.evaluations(second.model_id)) == 1
    # the published archive loads on its own and passes its golden check
    load_bundle(storage.blobs.download(model.bundle, worker.folder / "check.tar.gz"),
                cache_dir=worker.folder / "check").close()


def test_a_job_that_fails_once_succeeds_on_retry(storage: Storage, worker: RebuildContext) -> None:
    now = time.time()
    seed(storage, now)
    # one frame's bytes are not in the store yet (its upload is late): the export fails
    late = next(f for f in storage.catalogue.frames(APP, CAM) if f.inspection_id == "fr-10")
    data = storage.blobs.get(late.blob)
    storage.blobs.delete(late.blob)
    job = new_job(storage)
    worker.queue.enqueue(job.id)
    deadline = time.monotonic() + 60
    while (waiting := storage.catalogue.job(job.id)).attempts < 1 or waiting.status != "queued":
        assert time.monotonic() < deadline, waiting
        time.sleep(0.05)
    storage.blobs.put(late.blob, data)  # the upload arrives during the retry's wait
    assert waiting.detail.startswith("attempt 1 of 3 failed: KeyError") and "retried in 2 s" in waiting.detail
    job = wait_for(storage, job.id, ("succeeded", "refused", "failed"))
    assert (job.status, job.attempts) == ("succeeded", 2), job.detail
    assert storage.catalogue.model(job.model_id).status == "published"


def test_a_refused_job_keeps_its_evaluation(storage: Storage, config: TrainerConfig) -> None:
    now = time.time()
    seed(storage, now, defects=6)
    # the running model, as the appliance recorded it, catches every labelled defect: no escape is allowed
    strict = config.model_copy(update={"gate": GateConfig(auroc_margin=0.0, escape_margin=0.0)})
    job = new_job(storage)
    run_job(RebuildContext(storage, strict), job.id)
    job = storage.catalogue.job(job.id)
    assert job.status == "refused", job.detail
    model = storage.catalogue.model(job.model_id)
    assert model.status == "refused" and storage.blobs.exists(model.bundle)
    (evaluation,) = storage.catalogue.evaluations(model.id)
    assert not evaluation.passed and evaluation.dataset_id == job.dataset_id
    m = evaluation.metrics
    assert m["running"]["escape_rate"] == 0.0 and m["running"]["auroc"] == 1.0
    failed = [k for k, c in m["checks"].items() if not c["passed"]]
    assert failed and set(failed) <= {"auroc", "escape_rate"}
    assert m["reasons"] and all(r in job.detail for r in m["reasons"])
    assert m["candidate"]["n_defect"] == 6 and m["margins"]["escape_margin"] == 0.0


def test_a_backend_this_trainer_does_not_build_is_refused(storage: Storage, config: TrainerConfig) -> None:
    seed(storage, time.time(), frames=3)
    storage.catalogue.upsert_camera(APP, CAM, backend="anomalib-efficientad")
    job = new_job(storage)
    run_job(RebuildContext(storage, config), job.id)
    job = storage.catalogue.job(job.id)
    assert (job.status, job.attempts) == ("refused", 1)
    assert "anomalib-efficientad" in job.detail and "patchcore, padim" in job.detail
    assert storage.catalogue.datasets(APP, CAM) == [] and storage.catalogue.models() == []
    run_job(RebuildContext(storage, config), job.id)  # not queued any more: left as it is
    assert storage.catalogue.job(job.id).attempts == 1


def test_a_job_left_running_by_a_dead_worker_runs_again_or_fails_after_its_last_attempt(
        storage: Storage, config: TrainerConfig) -> None:
    seed(storage, time.time(), frames=12)
    job = new_job(storage)
    storage.catalogue.update_job(job.id, status="running", attempts=3)  # its worker was killed in attempt 3 of 3
    run_job(RebuildContext(storage, config), job.id)
    job = storage.catalogue.job(job.id)
    assert (job.status, job.attempts) == ("failed", 3)
    assert "attempt 3 of 3: the worker running attempt 3 stopped before it ended" in job.detail
    again = new_job(storage)
    storage.catalogue.update_job(again.id, status="running", attempts=1)
    run_job(RebuildContext(storage, config), again.id)
    assert storage.catalogue.job(again.id).attempts == 2  # ran again (and ended: too few frames here)


def test_too_few_frames_fail_before_any_fit(storage: Storage, config: TrainerConfig) -> None:
    seed(storage, time.time(), frames=12)  # about 4 held out: the gate needs 10
    job = new_job(storage)
    run_job(RebuildContext(storage, config, queue=None), job.id)
    job = storage.catalogue.job(job.id)
    assert (job.status, job.attempts) == ("failed", 1)
    assert "held-out good frames" in job.detail and "not retried" in job.detail
    assert job.dataset_id is not None and job.model_id is None and storage.catalogue.models() == []


def test_the_cameras_settings_override_the_trainers_defaults() -> None:
    defaults = RebuildConfig(scorer="patchcore", size="256x624", settings={"coreset_ratio": 0.05, "k": 3})
    cam = Camera(appliance_id=APP, camera_id=CAM, backend="patchcore",
                 settings={"settings": {"coreset_ratio": 0.1}, "window_days": 7, "max_good": 100})
    p = plan(cam, defaults, now=1000.0 * 86400)
    assert (p.options.height, p.options.width) == (256, 624)
    assert p.options.settings == {"coreset_ratio": 0.1, "k": 3}
    assert (p.rule.since, p.rule.until, p.rule.max_good) == (993.0 * 86400, 1000.0 * 86400, 100)
    assert p.rule.eval_share == 0.2  # DatasetRule's own default
    assert plan(cam.model_copy(update={"backend": None, "model_id": "padim-0123abcd"}), defaults, 0.0).options.scorer \
        == "padim"  # no backend set: the running model's kind
    assert plan(cam.model_copy(update={"backend": None, "model_id": "m-1"}), defaults, 0.0).options.scorer \
        == "patchcore"  # an unknown kind: the config's
    assert plan(cam.model_copy(update={"model_id": "padim-0123abcd"}), defaults, 0.0).options.scorer \
        == "patchcore"  # a backend set on the camera wins
    with pytest.raises(RebuildRefusedError, match="windw_days"):
        plan(cam.model_copy(update={"settings": {"windw_days": 7}}), defaults, 0.0)
    with pytest.raises(RebuildRefusedError, match="size"):
        plan(cam.model_copy(update={"settings": {"size": "big"}}), defaults, 0.0)


def test_a_drift_rebuild_takes_the_new_normal_from_the_raising_window(storage: Storage) -> None:
    from appliance.trainer.rebuild import new_normal_since
    from appliance.trainer.records import DriftEvent

    cat = storage.catalogue
    cat.add_appliance(APP)
    cat.upsert_camera(APP, CAM)
    for event in (DriftEvent(id="e1", camera_id=CAM, kind="drift_raised", at=1000.0, stats={"window_from": 990.0}),
                  DriftEvent(id="e2", camera_id=CAM, kind="drift_cleared", at=1100.0),
                  DriftEvent(id="e3", camera_id=CAM, kind="drift_raised", at=2000.0)):  # an older appliance
        cat.add_drift_event(APP, event)
    first = cat.add_job(APP, CAM, "drift", "awaiting_approval", 1005.0, "")
    second = cat.add_job(APP, CAM, "drift", "awaiting_approval", 2003.0, "")
    request = cat.add_job(APP, CAM, "request", "queued", 2004.0, "")
    assert new_normal_since(cat, first) == 990.0  # the raising window's first frame
    assert new_normal_since(cat, second) == 2000.0  # no window_from: the event's time
    assert new_normal_since(cat, request) is None  # only a drift rebuild accepts a new normal
