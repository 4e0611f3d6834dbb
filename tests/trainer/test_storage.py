"""The storage contract, run against both implementations: SQLite + files, and PostgreSQL + SeaweedFS's S3.

Every test taking ``storage`` (or ``catalogue_url``) runs once per kind on real servers (see conftest);
the few that only make sense for one kind say so in their name.
"""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import SecretStr, ValidationError

from appliance.errors import ConfigError
from appliance.trainer.config import FleetStorageConfig, TrainerConfig
from appliance.trainer.records import DatasetMember, DatasetRule, DriftEvent, FrameMeta, Label, Model
from appliance.trainer.storage import open_storage, sql
from appliance.trainer.storage.engine import make_engine
from appliance.trainer.storage.migrate import upgrade
from appliance.trainer.storage.s3 import S3BlobStore
from appliance.trainer.storage.schema import metadata
from appliance.trainer.storage.sql import SqlCatalogue, dataset_digest

APP = "app-1"


def meta(n: int, camera: str = "cam-a", verdict: str = "ok", captured_at: float | None = None) -> FrameMeta:
    data = f"frame {n}".encode()
    return FrameMeta(camera_id=camera, inspection_id=f"insp-{n:04d}", sha256=hashlib.sha256(data).hexdigest(),
                     suffix=".jpg", size=len(data), captured_at=1000.0 + n if captured_at is None else captured_at,
                     verdict=verdict, score=0.5, raw_score=1.5, threshold=1.0, model_id="m-0",
                     reasons=["sample", "label"])


def blob_key(m: FrameMeta) -> str:
    return f"frames/{APP}/{m.camera_id}/{m.sha256}{m.suffix}"


def member(n: int, split: str = "train") -> DatasetMember:
    return DatasetMember(frame=f"frames/{APP}/cam-a/{n:064d}.jpg", inspection_id=f"insp-{n:04d}", split=split)


@pytest.fixture
def cat(storage):
    """The catalogue with one registered appliance."""
    storage.catalogue.add_appliance(APP, "line 1")
    return storage.catalogue


def raw_rows(catalogue: SqlCatalogue, table: str) -> list[dict]:
    with catalogue.engine.connect() as connection:
        return [dict(r) for r in connection.execute(sa.text(f"SELECT * FROM {table}")).mappings()]


# ---------------------------------------------------------------------------------------------- appliances
def test_tokens_right_wrong_rotated_and_only_hashes_stored(storage):
    c = storage.catalogue
    token = c.add_appliance(APP, "line 1")
    other = c.add_appliance("app-2")
    assert c.authenticate(token) == APP and c.authenticate(other) == "app-2"
    assert c.authenticate(token + "x") is None and c.authenticate("") is None
    with pytest.raises(KeyError):
        c.add_appliance(APP)
    rotated = c.rotate_token(APP)
    assert rotated != token and c.authenticate(token) is None and c.authenticate(rotated) == APP
    with pytest.raises(KeyError):
        c.rotate_token("nobody")
    rows = raw_rows(c, "appliances")
    assert {r["token_sha256"] for r in rows} == {hashlib.sha256(t.encode()).hexdigest() for t in (rotated, other)}
    cells = " ".join(str(v) for r in rows for v in r.values())
    assert token not in cells and rotated not in cells and other not in cells
    assert [(a.id, a.name) for a in c.appliances()] == [(APP, "line 1"), ("app-2", "")]
    with pytest.raises(ValidationError):
        c.add_appliance("no spaces allowed")


def test_last_seen_written_at_most_once_a_minute(storage, monkeypatch):
    c = storage.catalogue
    token = c.add_appliance(APP)
    assert c.appliances()[0].last_seen is None
    c.authenticate(token)
    first = c.appliances()[0].last_seen
    assert first is not None
    c.authenticate(token)
    assert c.appliances()[0].last_seen == first
    monkeypatch.setattr(sql, "LAST_SEEN_EVERY_S", 0.0)
    c.authenticate(token)
    assert c.appliances()[0].last_seen > first


# ---------------------------------------------------------------------------------------------- cameras
def test_cameras_upsert_only_the_given_fields(cat):
    made = cat.upsert_camera(APP, "cam-a", policy="auto", settings={"scorer": "padim", "size": [256, 624]})
    assert (made.policy, made.backend, made.settings) == ("auto", None, {"scorer": "padim", "size": [256, 624]})
    changed = cat.upsert_camera(APP, "cam-a", schedule="0 3 * * 0", model_id="m-1", updated_at=5.0)
    assert (changed.policy, changed.schedule, changed.model_id, changed.updated_at) == ("auto", "0 3 * * 0", "m-1", 5.0)
    assert changed.settings == {"scorer": "padim", "size": [256, 624]}
    assert cat.camera(APP, "cam-a") == changed and cat.camera(APP, "nope") is None
    cat.add_appliance("app-2")
    cat.upsert_camera("app-2", "cam-b")
    assert [(x.appliance_id, x.camera_id) for x in cat.cameras()] == [(APP, "cam-a"), ("app-2", "cam-b")]
    assert [x.camera_id for x in cat.cameras("app-2")] == ["cam-b"]
    with pytest.raises(TypeError):
        cat.upsert_camera(APP, "cam-a", colour="red")
    with pytest.raises(ValidationError):
        cat.upsert_camera(APP, "cam-a", policy="sometimes")
    with pytest.raises(KeyError):
        cat.upsert_camera("nobody", "cam-a")


# ---------------------------------------------------------------------------------------------- frames
def test_add_frame_is_idempotent_by_inspection(cat):
    m = meta(1)
    assert cat.add_frame(APP, m, blob_key(m), at=2000.0) is True
    assert cat.add_frame(APP, m, blob_key(m), at=2001.0) is False
    assert cat.frame_count(APP) == cat.frame_count() == 1 and len(raw_rows(cat, "frames")) == 1
    (frame,) = cat.frames(APP)
    assert frame.model_dump(exclude={"appliance_id", "blob", "uploaded_at"}) == m.model_dump()
    assert (frame.appliance_id, frame.blob, frame.uploaded_at) == (APP, blob_key(m), 2000.0)
    assert cat.camera(APP, "cam-a") is not None  # a camera the trainer hears of is listed
    with pytest.raises(KeyError):
        cat.add_frame("nobody", m, blob_key(m), at=1.0)


def test_frames_filters_and_order(cat):
    cat.add_appliance("app-2")
    for n, (camera, verdict) in enumerate([("cam-a", "ok"), ("cam-b", "ng"), ("cam-a", "ng"), ("cam-a", "error")]):
        m = meta(n, camera, verdict, captured_at=100.0 - n)  # inserted newest first
        cat.add_frame(APP, m, blob_key(m), at=200.0)
    cat.add_frame("app-2", meta(9), blob_key(meta(9)), at=200.0)
    assert [f.captured_at for f in cat.frames(APP)] == [97.0, 98.0, 99.0, 100.0]
    assert [f.inspection_id for f in cat.frames(APP, "cam-a")] == ["insp-0003", "insp-0002", "insp-0000"]
    assert [f.captured_at for f in cat.frames(APP, since=98.0, until=100.0)] == [98.0, 99.0]
    assert [f.verdict for f in cat.frames(APP, verdicts=["ng", "error"])] == ["error", "ng", "ng"]
    assert [f.captured_at for f in cat.frames(APP, limit=2)] == [97.0, 98.0]
    assert cat.frames(APP, verdicts=[]) == []
    assert (cat.frame_count(APP), cat.frame_count("app-2"), cat.frame_count()) == (4, 1, 5)


def test_concurrent_add_frame_inserts_once(cat):
    m = meta(7)
    barrier = threading.Barrier(4, timeout=60)

    def add(_: int) -> bool:
        barrier.wait()
        return cat.add_frame(APP, m, blob_key(m), at=1.0)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(add, range(4)))
    assert sorted(results) == [False, False, False, True]
    assert cat.frame_count() == 1


def test_concurrent_openers_migrate_once_and_insert_once(catalogue_url):
    """Four processes' worth of catalogues (own engines) open a new database at once and race one frame."""
    barrier = threading.Barrier(4, timeout=60)

    def open_and_add(n: int) -> bool:
        barrier.wait()
        catalogue = SqlCatalogue(catalogue_url)
        try:
            if n == 0:
                catalogue.add_appliance(APP)
            barrier.wait()
            m = meta(3)
            return catalogue.add_frame(APP, m, blob_key(m), at=1.0)
        finally:
            catalogue.close()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(open_and_add, range(4)))
    assert sorted(results) == [False, False, False, True]


# ---------------------------------------------------------------------------------------------- labels, drift
def test_labels_idempotent_and_undo_never_unset(cat):
    label = Label(id="lab-1", camera_id="cam-a", inspection_id="insp-0001", label="defect", note="scratch",
                  who="ana", at=10.0)
    cat.upsert_label(APP, label)
    cat.upsert_label(APP, label)
    assert len(raw_rows(cat, "labels")) == 1 and cat.labels(APP) == [label]
    undone = label.model_copy(update={"undone_at": 20.0})
    cat.upsert_label(APP, undone)
    assert cat.labels(APP) == [] and cat.labels(APP, active_only=False) == [undone]
    cat.upsert_label(APP, label)  # a late resend of the original state
    cat.upsert_label(APP, label.model_copy(update={"undone_at": 30.0}))  # and a second undo
    assert cat.labels(APP, active_only=False) == [undone]
    good = Label(id="lab-0", camera_id="cam-b", inspection_id="insp-0002", label="good", who="bo", at=5.0)
    cat.upsert_label(APP, good)
    assert [x.id for x in cat.labels(APP, active_only=False)] == ["lab-0", "lab-1"]
    assert cat.labels(APP, "cam-b") == [good] and cat.labels("app-unknown") == []


def test_drift_events_idempotent_and_camera_state_follows(cat):
    raised = DriftEvent(id="d-1", camera_id="cam-a", kind="drift_raised", at=10.0, stats={"ks": 0.4, "n": 200})
    assert cat.add_drift_event(APP, raised) is True
    assert cat.add_drift_event(APP, raised) is False
    assert len(raw_rows(cat, "drift_events")) == 1 and cat.drift_events(APP) == [raised]
    camera = cat.camera(APP, "cam-a")
    assert (camera.drift_state, camera.drift_at) == ("drift", 10.0)
    cleared = DriftEvent(id="d-2", camera_id="cam-a", kind="drift_cleared", at=20.0)
    assert cat.add_drift_event(APP, cleared) is True
    assert (cat.camera(APP, "cam-a").drift_state, cat.camera(APP, "cam-a").drift_at) == ("ok", 20.0)
    late = DriftEvent(id="d-0", camera_id="cam-a", kind="drift_raised", at=5.0)  # an old event resent late
    assert cat.add_drift_event(APP, late) is True
    assert cat.camera(APP, "cam-a").drift_state == "ok"
    assert [e.id for e in cat.drift_events(APP, "cam-a")] == ["d-0", "d-1", "d-2"]
    assert cat.drift_events(APP, "cam-b") == []


# ---------------------------------------------------------------------------------------------- datasets
def test_dataset_versions_and_digests(cat):
    rule = DatasetRule(until=500.0, max_good=100)
    members = [member(3, "eval_good"), member(1), member(2), member(4, "eval_defect")]
    first = cat.add_dataset(APP, "cam-a", rule, members, at=1.0)
    assert (first.version, first.rule, first.counts) == (1, rule, {"train": 2, "eval_good": 1, "eval_defect": 1})
    assert first.digest == dataset_digest(members) == dataset_digest(reversed(members))
    again = cat.add_dataset(APP, "cam-a", rule, list(reversed(members)), at=2.0)
    assert again == first and len(raw_rows(cat, "datasets")) == 1 and len(raw_rows(cat, "dataset_members")) == 4
    assert cat.dataset_members(first.id) == sorted(members, key=lambda m: (m.split, m.inspection_id))
    second = cat.add_dataset(APP, "cam-a", rule, members[:3], at=3.0)
    assert second.version == 2 and second.digest != first.digest
    third = cat.add_dataset(APP, "cam-a", rule, members, at=4.0)  # equal to an older version, not the newest
    assert third.version == 3 and third.digest == first.digest
    other = cat.add_dataset(APP, "cam-b", rule, [], at=5.0)
    assert (other.version, other.counts) == (1, {"train": 0, "eval_good": 0, "eval_defect": 0})
    assert cat.dataset_members(other.id) == []
    assert [d.id for d in cat.datasets()] == [other.id, third.id, second.id, first.id]
    assert [d.version for d in cat.datasets(APP, "cam-a")] == [3, 2, 1]
    assert cat.dataset(second.id) == second and cat.dataset(10_000) is None
    with pytest.raises(ValueError, match="twice"):
        cat.add_dataset(APP, "cam-a", rule, [member(1), member(1, "eval_good")], at=6.0)
    with pytest.raises(KeyError):
        cat.add_dataset("nobody", "cam-a", rule, members, at=7.0)


def test_concurrent_add_dataset_makes_one_version(cat):
    members = [member(n) for n in range(50)]
    barrier = threading.Barrier(4, timeout=60)

    def add(_: int) -> int:
        barrier.wait()
        return cat.add_dataset(APP, "cam-a", DatasetRule(until=1.0), members, at=1.0).id

    with ThreadPoolExecutor(4) as pool:
        ids = set(pool.map(add, range(4)))
    assert len(ids) == 1 and [d.version for d in cat.datasets()] == [1]


# ---------------------------------------------------------------------------------------------- jobs, models
def test_jobs_update_and_order(cat):
    first = cat.add_job(APP, "cam-a", "drift", "awaiting_approval", at=1.0, detail="drift raised")
    second = cat.add_job(APP, "cam-b", "schedule", "queued", at=2.0)
    assert (first.status, first.attempts, first.detail) == ("awaiting_approval", 0, "drift raised")
    assert [j.id for j in cat.jobs()] == [second.id, first.id]
    dataset = cat.add_dataset(APP, "cam-a", DatasetRule(until=1.0), [member(1)], at=1.0)
    running = cat.update_job(first.id, status="running", started_at=3.0, attempts=1, approved_by="ana",
                             dataset_id=dataset.id)
    assert (running.status, running.started_at, running.attempts, running.approved_by, running.reason) == (
        "running", 3.0, 1, "ana", "drift")
    assert cat.job(first.id) == running and cat.job(10_000) is None
    assert [j.id for j in cat.jobs(status=["running"])] == [first.id]
    assert [j.id for j in cat.jobs(status=["queued", "running"], camera_id="cam-b")] == [second.id]
    assert [j.id for j in cat.jobs(appliance_id=APP, limit=1)] == [second.id]
    assert cat.jobs(appliance_id="app-2") == []
    with pytest.raises(KeyError):
        cat.update_job(10_000, status="failed")
    with pytest.raises(TypeError):
        cat.update_job(first.id, camera_id="cam-z")
    with pytest.raises(ValidationError):
        cat.update_job(first.id, status="exploded")
    with pytest.raises(KeyError):
        cat.update_job(first.id, dataset_id=10_000)
    assert cat.job(first.id) == running


def test_models_recorded_again_update_and_order(cat):
    job = cat.add_job(APP, "cam-a", "request", "running", at=1.0)
    dataset = cat.add_dataset(APP, "cam-a", DatasetRule(until=1.0), [member(1)], at=1.0)
    old = Model(id="m-old", appliance_id=APP, camera_id="cam-a", status="published", created_at=1.0)
    new = Model(id="m-new", appliance_id=APP, camera_id="cam-a", status="candidate", created_at=2.0,
                dataset_id=dataset.id, job_id=job.id, bundle="bundles/m-new.tar.gz")
    assert cat.add_model(old) == old and cat.add_model(new) == new
    assert [m.id for m in cat.models()] == ["m-new", "m-old"]
    published = new.model_copy(update={"status": "published", "detail": "passed the gate"})
    cat.add_model(published)
    assert cat.model("m-new") == published and len(raw_rows(cat, "models")) == 2
    assert [m.id for m in cat.models(APP, "cam-a", "published")] == ["m-new", "m-old"]
    assert cat.models(status="refused") == [] and cat.models(camera_id="cam-b") == [] and cat.model("x") is None
    with pytest.raises(KeyError):
        cat.add_model(Model(id="m-x", appliance_id="nobody", camera_id="c", status="candidate", created_at=1.0))


def test_evaluations_all_kept_newest_first(cat):
    dataset = cat.add_dataset(APP, "cam-a", DatasetRule(until=1.0), [member(1)], at=1.0)
    for model_id in ("m-1", "m-2"):
        cat.add_model(Model(id=model_id, appliance_id=APP, camera_id="cam-a", status="candidate", created_at=1.0))
    metrics = {"candidate": {"auroc": 0.98, "false_reject": 0.01}, "margins": {"auroc": 0.01}}
    first = cat.add_evaluation("m-2", "m-1", dataset.id, False, metrics, at=10.0)
    second = cat.add_evaluation("m-2", "m-1", dataset.id, True, metrics, at=11.0)
    third = cat.add_evaluation("m-1", None, dataset.id, True, {}, at=12.0)
    assert (first.passed, first.metrics, first.baseline_model_id) == (False, metrics, "m-1")
    assert cat.evaluations() == [third, second, first]
    assert cat.evaluations("m-2") == [second, first] and cat.evaluations("m-3") == []
    with pytest.raises(KeyError):
        cat.add_evaluation("m-unknown", None, dataset.id, True, {}, at=13.0)
    # JSON has no NaN: an undefined metric is stored as null by both catalogues alike
    undefined = cat.add_evaluation("m-1", None, dataset.id, True, {"auroc": float("nan"), "fr": [float("inf"), 0.5]},
                                   at=14.0)
    assert cat.evaluations("m-1")[0] == undefined and undefined.metrics == {"auroc": None, "fr": [None, 0.5]}


# ---------------------------------------------------------------------------------------------- blobs
def test_blob_put_get_exists_delete(storage, tmp_path):
    blobs = storage.blobs
    key = "frames/app-1/cam-a/" + "ab" * 32 + ".jpg"
    assert not blobs.exists(key)
    with pytest.raises(KeyError):
        blobs.get(key)
    blobs.put(key, b"\xff\xd8 jpeg bytes")
    assert blobs.exists(key) and blobs.get(key) == b"\xff\xd8 jpeg bytes"
    blobs.put(key, b"replaced")
    assert blobs.get(key) == b"replaced"
    blobs.delete(key)
    blobs.delete(key)  # absent: no error
    assert not blobs.exists(key)
    with pytest.raises(KeyError):
        blobs.download(key, tmp_path / "x")


def test_blob_files_and_download(storage, tmp_path):
    payload = os.urandom(3 << 20)
    source = tmp_path / "bundle.tar.gz"
    source.write_bytes(payload)
    storage.blobs.put("bundles/m-1.tar.gz", source)
    target = tmp_path / "deep" / "down" / "m-1.tar.gz"
    assert storage.blobs.download("bundles/m-1.tar.gz", target) == target
    assert target.read_bytes() == payload and storage.blobs.get("bundles/m-1.tar.gz") == payload
    assert [p.name for p in target.parent.iterdir()] == ["m-1.tar.gz"]  # no temporary left beside it


def test_blob_keys_that_could_escape_are_refused(storage):
    blobs = storage.blobs
    for key in ["", "/etc/passwd", "../outside", "frames/../../x", "a//b", "a/./b", "a\\b", "a/\x00"]:
        for call in (lambda k: blobs.put(k, b"x"), blobs.get, blobs.exists, blobs.delete,
                     lambda k: blobs.download(k, Path("unused"))):
            with pytest.raises(ValueError):
                call(key)


def test_blob_put_is_atomic(storage, tmp_path):
    """Readers racing a writer see one whole version or the other; a failed put leaves the old bytes."""
    blobs, key = storage.blobs, "bundles/racing.bin"
    versions = [b"A" * (256 << 10), b"B" * (256 << 10)]
    blobs.put(key, versions[0])
    stop, seen = threading.Event(), []

    def read() -> None:
        while not stop.is_set():
            seen.append(blobs.get(key))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            blobs.put(key, versions[i % 2])
    finally:
        stop.set()
        reader.join()
    assert seen and all(data in versions for data in seen)
    with pytest.raises(OSError):
        blobs.put(key, tmp_path / "no such file")
    assert blobs.get(key) in versions
    if hasattr(blobs, "folder"):
        assert not [p for p in Path(blobs.folder).rglob(".tmp-*")]


def test_presigned_put_then_get_over_http(storage):
    key = "frames/app-1/cam-a/" + "cd" * 32 + ".png"
    put_url = storage.blobs.presign_put(key, expires_s=60)
    if storage.description.startswith("embedded"):
        assert put_url is None and storage.blobs.presign_get(key) is None
        return
    request = urllib.request.Request(put_url, data=b"straight from the appliance", method="PUT")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert storage.blobs.get(key) == b"straight from the appliance"
    with urllib.request.urlopen(storage.blobs.presign_get(key, expires_s=60), timeout=10) as response:
        assert response.read() == b"straight from the appliance"
    tampered = put_url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(urllib.request.Request(tampered, data=b"forged", method="PUT"), timeout=10)
    assert storage.blobs.get(key) == b"straight from the appliance"


def test_s3_presign_off_and_bad_secret_refused(seaweed_server, seaweed_s3):
    store = S3BlobStore(seaweed_s3.model_copy(update={"presign": False}))
    assert store.presign_put("a/b") is None and store.presign_get("a/b") is None
    store.close()
    bad = seaweed_s3.model_copy(update={"secret_key": SecretStr("not-the-secret")})
    with pytest.raises(ConfigError, match=r"access refused .*check storage\.s3\.access_key") as refused:
        S3BlobStore(bad)
    assert "not-the-secret" not in str(refused.value)
    with pytest.raises(ConfigError, match="cannot reach"):
        S3BlobStore(seaweed_s3.model_copy(update={"endpoint": "http://127.0.0.1:9"}))


# ---------------------------------------------------------------------------------------------- opening
def test_open_storage_describes_without_secrets(postgres_url, seaweed_s3):
    with_password = postgres_url.replace("postgres@", "postgres:db-s3cret@")  # trust auth ignores it
    config = TrainerConfig(storage=FleetStorageConfig(database_url=SecretStr(with_password), s3=seaweed_s3))
    opened = open_storage(config)
    try:
        assert opened.description.startswith("fleet: catalogue postgresql+psycopg://postgres:***@")
        assert "db-s3cret" not in opened.description and seaweed_s3.secret() not in opened.description
    finally:
        opened.close()
    unreachable = with_password.rsplit(":", 1)[0] + ":9/nowhere"
    with pytest.raises(ConfigError, match="cannot open the database") as refused:
        SqlCatalogue(unreachable)
    assert "db-s3cret" not in str(refused.value)


def test_open_migrates_to_head_and_reopening_changes_nothing(catalogue_url):
    first = SqlCatalogue(catalogue_url)
    token = first.add_appliance(APP)
    with first.engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_heads() == ("0001",)
        # the migrations create exactly the tables the queries are written against
        assert compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), metadata) == []
    first.close()
    again = SqlCatalogue(catalogue_url)
    assert again.authenticate(token) == APP
    with again.engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_heads() == ("0001",)
    again.close()


LATER_REVISION = '''
"""A revision from the future, for the test: a column with a default filled from existing rows."""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("appliances", sa.Column("site", sa.String(), nullable=True))
    op.execute("UPDATE appliances SET site = 'plant ' || id")
'''


def test_later_revision_upgrades_data_and_newer_database_is_refused(catalogue_url, tmp_path):
    catalogue = SqlCatalogue(catalogue_url)
    token = catalogue.add_appliance(APP)
    m = meta(1)
    catalogue.add_frame(APP, m, blob_key(m), at=1.0)
    catalogue.close()
    later = tmp_path / "later_versions"
    later.mkdir()
    (later / "0002_site.py").write_text(LATER_REVISION)
    engine = make_engine(catalogue_url)
    try:
        upgrade(engine, "test database", extra_versions=[later])
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_heads() == ("0002",)
            rows = connection.execute(sa.text("SELECT id, site FROM appliances")).all()
            assert [tuple(r) for r in rows] == [(APP, f"plant {APP}")]
            assert connection.execute(sa.text("SELECT count(*) FROM frames")).scalar_one() == 1
        upgrade(engine, "test database", extra_versions=[later])  # at head: nothing to do
    finally:
        engine.dispose()
    with pytest.raises(ConfigError, match=r"revision 0002, which this trainer does not know .*newer trainer"):
        SqlCatalogue(catalogue_url)
    engine = make_engine(catalogue_url)
    with engine.connect() as connection:  # the refusal touched nothing
        assert connection.execute(sa.text("SELECT token_sha256 FROM appliances")).scalar_one() == \
            hashlib.sha256(token.encode()).hexdigest()
    engine.dispose()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "mysql://u@h/db", "not a url"])
def test_unsupported_catalogue_urls_refused(url):
    with pytest.raises(ConfigError, match="catalogue"):
        SqlCatalogue(url)
