"""The audit writer on real SQLite files: schema, group commit, the outbox, retention, a full disk, kill -9."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from appliance.daemon.audit import AuditConfig, Recorder
from appliance.daemon.audit_db import iso_utc
from appliance.daemon.records import Inspection, new_inspection_id
from appliance.errors import AuditError

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]


def inspection(seq: int = 0, camera: str = "cam1", at: float | None = None, verdict: str = "ok",
               **kw) -> Inspection:
    at = time.time() if at is None else at
    error = "cannot read frame" if verdict == "error" else None
    return Inspection(id=new_inspection_id(at), camera=camera, seq=seq, captured_at=at, finished_at=at + 0.05,
                      verdict=verdict, error=error, **kw)


def wait_for(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=5)
    conn.row_factory = sqlite3.Row
    return conn


@pytest.fixture
def recorder(tmp_path):
    rec = Recorder(tmp_path / "audit.db", retention_interval_s=3600, retry_s=0.05, retry_max_s=0.2)
    rec.start()
    yield rec
    rec.close()


def test_schema_and_one_row_per_inspection(tmp_path):
    path = tmp_path / "state" / "audit.db"  # the folder does not exist yet
    rec = Recorder(path)
    rec.start()
    assert rec.on_writer(lambda db: db.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL by default
    at = 1_714_564_800.25  # 2024-05-01T12:00:00.250Z
    ins = Inspection(id="018f3cf4a6ea0123456789", camera="line2", seq=7, captured_at=at, finished_at=at + 0.08,
                     verdict="ng", trigger_id="T-42", source="/data/in/a.png", image_sha256="ab" * 32,
                     model_id="bundle-1", bank_hash="cafe", threshold=0.5, threshold_source="shift:night",
                     raw_score=3.5, score=0.71, latency_ms={"backbone": 41.25, "scorer": 3.5, "total": 50.0},
                     overlay_path="/var/lib/x/ovl.png")
    rec.record(ins, ["overlay", "mqtt"], {"mqtt": '{"verdict": "ng"}'})
    rec.record(inspection(1), ["overlay"])
    rec.close()

    conn = connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT count(*) FROM inspections").fetchone()[0] == 2
    row = dict(conn.execute("SELECT * FROM inspections WHERE id = ?", [ins.id]).fetchone())
    assert row["time"] == "2024-05-01T12:00:00.250Z"
    assert row["captured_at"] == at and row["finished_at"] == at + 0.08
    assert (row["camera"], row["seq"], row["verdict"], row["trigger_id"]) == ("line2", 7, "ng", "T-42")
    assert (row["threshold"], row["threshold_source"], row["raw_score"], row["score"]) == (0.5, "shift:night", 3.5,
                                                                                         0.71)
    assert (row["model_id"], row["bank_hash"], row["image_sha256"]) == ("bundle-1", "cafe", "ab" * 32)
    assert row["run_id"] == rec.run_id and row["file_sha256"] is None
    assert row["source"] == "/data/in/a.png" and row["overlay_path"] == "/var/lib/x/ovl.png"
    assert json.loads(row["latency_ms"]) == {"backbone": 41.25, "scorer": 3.5, "total": 50.0}
    assert conn.execute("SELECT json_extract(latency_ms, '$.backbone') FROM inspections WHERE id = ?",
                        [ins.id]).fetchone()[0] == 41.25
    deliveries = [dict(r) for r in conn.execute("SELECT * FROM deliveries WHERE inspection_id = ? ORDER BY id",
                                                [ins.id])]
    assert [(d["output"], d["status"], d["payload"], d["attempts"]) for d in deliveries] == [
        ("overlay", "pending", None, 0), ("mqtt", "pending", '{"verdict": "ng"}', 0)]
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"idx_inspections_camera_captured_at", "idx_inspections_verdict_captured_at",
            "idx_deliveries_output_status_id"} <= indexes
    assert "AUTOINCREMENT" in conn.execute("SELECT sql FROM sqlite_master WHERE name = 'deliveries'").fetchone()[0]


def test_outbox_must_name_listed_outputs(recorder):
    with pytest.raises(ValueError, match="mqtt"):
        recorder.record(inspection(), ["overlay"], {"mqtt": "x"})


def test_then_runs_only_once_the_row_is_visible_elsewhere(recorder):
    reader = sqlite3.connect(recorder.path, check_same_thread=False)  # used on the writer thread only
    seen: list[tuple[int, int]] = []
    n = 60

    def then(i: str) -> None:
        ins_rows = reader.execute("SELECT count(*) FROM inspections WHERE id = ?", [i]).fetchone()[0]
        out_rows = reader.execute("SELECT count(*) FROM deliveries WHERE inspection_id = ?", [i]).fetchone()[0]
        seen.append((ins_rows, out_rows))

    for k in range(n):
        ins = inspection(k)
        recorder.record(ins, ["overlay", "mqtt"], then=lambda _committed, i=ins.id: then(i))
    recorder.flush()
    assert seen == [(1, 2)] * n


def test_group_commit_from_many_threads(tmp_path):
    rec = Recorder(tmp_path / "audit.db", batch=32, retention_interval_s=3600)
    rec.start()
    commits: list[str] = []
    rec.on_writer(lambda db: db.conn.set_trace_callback(
        lambda sql: commits.append(sql) if sql.strip().upper().startswith("COMMIT") else None))
    gate = threading.Event()  # holds the writer while the producers fill its queue
    holder = threading.Thread(target=rec.on_writer, args=(lambda db: gate.wait(10),))
    holder.start()
    threads, per_thread = 6, 150
    called: list[str] = []
    sent: dict[int, list[str]] = {t: [] for t in range(threads)}

    def producer(t: int) -> None:
        for k in range(per_thread):
            ins = inspection(k, camera=f"cam{t}")
            sent[t].append(ins.id)
            rec.record(ins, ["mqtt"], {"mqtt": ins.id}, then=lambda _committed, i=ins.id: called.append(i))

    workers = [threading.Thread(target=producer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    gate.set()
    holder.join()
    rec.flush()
    rec.on_writer(lambda db: db.conn.set_trace_callback(None))
    total = threads * per_thread
    assert sorted(called) == sorted(i for ids in sent.values() for i in ids)  # each then() once
    assert -(-total // 32) <= len(commits) <= -(-total // 32) + 2  # full batches of 32, never more
    assert rec.state()["written"] == total
    rec.close()
    conn = connect(rec.path)
    assert conn.execute("SELECT count(*) FROM inspections").fetchone()[0] == total
    for t, ids in sent.items():  # each producer's records keep their order in the outbox
        order = [r[0] for r in conn.execute("SELECT inspection_id FROM deliveries WHERE inspection_id IN "
                                            f"(SELECT id FROM inspections WHERE camera = 'cam{t}') ORDER BY id")]
        assert order == ids


def test_delivered_updates_the_row(recorder):
    a, b = inspection(1), inspection(2)
    recorder.record(a, ["overlay", "mqtt"], {"mqtt": "p"})
    recorder.record(b, ["overlay"])
    recorder.delivered(a.id, "mqtt", "pending", detail="broker unreachable", at=1000.0)
    recorder.delivered(a.id, "mqtt", "sent", detail="plant/line1", at=1001.5)
    recorder.delivered(a.id, "overlay", "skipped", detail="ok frames are not drawn")
    recorder.delivered(b.id, "http")  # an output the record did not list (a reload added it)
    recorder.delivered("no-such-inspection", "overlay")
    with pytest.raises(ValueError, match="status"):
        recorder.delivered(a.id, "mqtt", "lost")
    recorder.flush()
    conn = connect(recorder.path)
    rows = {(r["inspection_id"], r["output"]): dict(r) for r in conn.execute("SELECT * FROM deliveries")}
    assert len(rows) == 4
    mqtt = rows[(a.id, "mqtt")]
    assert (mqtt["status"], mqtt["delivered_at"], mqtt["attempts"], mqtt["detail"]) == ("sent", 1001.5, 2,
                                                                                         "plant/line1")
    assert (rows[(a.id, "overlay")]["status"], rows[(a.id, "overlay")]["attempts"]) == ("skipped", 1)
    assert rows[(b.id, "overlay")]["status"] == "pending"
    assert rows[(b.id, "http")]["status"] == "sent"


def test_pending_is_the_outbox_oldest_first_across_a_restart(tmp_path):
    path = tmp_path / "audit.db"
    rec = Recorder(path, retention_interval_s=3600)
    rec.start()
    items = [inspection(k) for k in range(6)]
    for k, ins in enumerate(items):
        rec.record(ins, ["overlay", "mqtt"], {"mqtt": f"payload-{k}"})
    rec.delivered(items[1].id, "mqtt")
    rec.delivered(items[4].id, "mqtt", "dropped")
    rec.flush()
    expect = [(items[k].id, f"payload-{k}") for k in (0, 2, 3, 5)]
    assert [(r["inspection_id"], r["payload"]) for r in rec.pending("mqtt")] == expect
    assert [r["inspection_id"] for r in rec.pending("mqtt", limit=2)] == [items[0].id, items[2].id]
    assert [r["payload"] for r in rec.pending("overlay")] == [None] * 6
    assert rec.pending("modbus") == []
    rec.close()

    again = Recorder(path, retention_interval_s=3600)  # the daemon restarted: the outbox is still there
    again.start(durable=["mqtt"])
    try:
        assert [(r["inspection_id"], r["payload"]) for r in again.pending("mqtt")] == expect
        assert again.pending("overlay") == []  # nothing will ever draw those: dropped, with why
    finally:
        again.close()
    dropped = connect(path).execute("SELECT count(*), min(detail) FROM deliveries WHERE output = 'overlay' AND "
                                    "status = 'dropped'").fetchone()
    assert dropped[0] == 6 and "stopped before" in dropped[1]


def test_a_run_killed_without_a_stop_event_is_recorded_at_the_next_start(tmp_path):
    path = tmp_path / "audit.db"
    first = Recorder(path, retention_interval_s=3600, run_id="run-one")
    first.start()
    first.event("start", data={"pid": 4242, "version": "x"})
    first.record(inspection(1), ["overlay"])
    first.close()  # no "stop" event: as after a kill -9
    second = Recorder(path, retention_interval_s=3600, run_id="run-two")
    assert second.start()["pid"] == 4242
    second.event("start", data={"pid": 4343})
    second.event("stop", detail="orderly stop")
    second.close()
    third = Recorder(path, retention_interval_s=3600)
    assert third.start() is None  # the second run stopped in order
    third.close()
    conn = connect(path)
    rows = [dict(r) for r in conn.execute("SELECT kind, data, run_id FROM events WHERE kind = 'unclean_stop'")]
    assert len(rows) == 1 and rows[0]["run_id"] == "run-two"
    data = json.loads(rows[0]["data"])
    assert data["run_id"] == "run-one" and data["inspections"] == 1 and data["pid"] == 4242
    assert conn.execute("SELECT run_id FROM inspections").fetchone()[0] == "run-one"


def test_a_dropped_overlay_no_longer_names_its_file(recorder):
    kept, lost = inspection(1), dataclasses.replace(inspection(2), overlay_path="/x/2.png")
    kept = dataclasses.replace(kept, overlay_path="/x/1.png")
    recorder.artifacts["overlay"] = "overlay_path"
    recorder.record(kept, ["overlay"])
    recorder.record(lost, ["overlay"])
    recorder.delivered(kept.id, "overlay", "sent", "/x/1.png")
    recorder.delivered(lost.id, "overlay", "dropped", "overlay queue full (256)")
    recorder.flush()
    rows = dict(connect(recorder.path).execute("SELECT id, overlay_path FROM inspections").fetchall())
    assert rows == {kept.id: "/x/1.png", lost.id: None}


def test_what_cannot_be_written_at_close_is_spilled_and_written_at_the_next_start(tmp_path):
    path = tmp_path / "db" / "audit.db"
    spare = tmp_path / "spare"
    rec = Recorder(path, retention_interval_s=3600, retry_s=0.05, retry_max_s=0.1, run_id="full", spill_dirs=[spare])
    rec.start()
    rec.record(inspection(1), ["mqtt"], {"mqtt": "p1"})
    rec.flush()
    rec.on_writer(lambda db: db.execute("PRAGMA query_only = 1"))  # every write now fails, as on a full disk
    committed: list[bool] = []
    rec.record(inspection(2), ["mqtt"], {"mqtt": "p2"}, then=committed.append)
    rec.event("camera_lost", "cam1", "gone")
    rec.flush()
    assert committed == [False] and rec.state()["state"] == "error"
    rec.close()
    spills = list(path.parent.glob("audit-spill-*.jsonl")) + list(spare.glob("audit-spill-*.jsonl"))
    assert len(spills) == 1
    again = Recorder(path, retention_interval_s=3600, spill_dirs=[spare])
    again.start(durable=["mqtt"])
    try:
        assert [r["payload"] for r in again.pending("mqtt")] == ["p1", "p2"]
    finally:
        again.close()
    assert not list(path.parent.glob("audit-spill-*")) and not list(spare.glob("audit-spill-*"))
    kinds = [r[0] for r in connect(path).execute("SELECT kind FROM events ORDER BY id")]
    assert "camera_lost" in kinds and "audit_spill_written" in kinds


def test_a_version_1_file_is_migrated_in_place(tmp_path):  # to 2 (runs, file hashes), then 3 (frames, labels)
    path = tmp_path / "audit.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE inspections (id TEXT PRIMARY KEY, time TEXT NOT NULL, camera TEXT NOT NULL, seq INTEGER NOT NULL,
            trigger_id TEXT, captured_at FLOAT NOT NULL, finished_at FLOAT NOT NULL, verdict TEXT NOT NULL,
            score FLOAT, raw_score FLOAT, threshold FLOAT, threshold_source TEXT, error TEXT, model_id TEXT,
            bank_hash TEXT, source TEXT, image_sha256 TEXT, overlay_path TEXT, latency_ms TEXT);
        CREATE TABLE deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT, inspection_id TEXT NOT NULL,
            output TEXT NOT NULL, status TEXT NOT NULL, payload TEXT, created_at REAL NOT NULL, delivered_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0, detail TEXT);
        CREATE TABLE events (id INTEGER PRIMARY KEY, at FLOAT NOT NULL, time TEXT NOT NULL, kind TEXT NOT NULL,
            camera TEXT, detail TEXT, data TEXT);
        INSERT INTO inspections VALUES ('old', '2024', 'cam1', 1, NULL, 1.0, 1.0, 'ok', 0.1, 0.1, 0.5, 'bundle',
            NULL, 'm', 'b', NULL, NULL, NULL, '{}');
        PRAGMA user_version = 1;""")
    conn.close()
    rec = Recorder(path, retention_days=100_000, retention_interval_s=3600)
    rec.start()
    rec.record(inspection(1), [])
    rec.close()
    conn = connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    assert conn.execute("SELECT count(*) FROM labels").fetchone()[0] == 0
    rows = [dict(r) for r in conn.execute("SELECT id, run_id FROM inspections ORDER BY captured_at")]
    assert rows[0] == {"id": "old", "run_id": None} and rows[1]["run_id"] == rec.run_id


def test_events(recorder):
    recorder.event("start", detail="appliance 0.1.0")
    recorder.event("camera_lost", camera="cam2", detail="no frame for 5 s", data={"retry_s": 2.0, "n": 3})
    recorder.event("a-custom-kind")
    with pytest.raises(ValueError, match="kind"):
        recorder.event("")
    with pytest.raises(ValueError, match="kind"):
        recorder.event("x" * 65)
    recorder.flush()
    rows = [dict(r) for r in connect(recorder.path).execute("SELECT * FROM events ORDER BY id")]
    assert [(r["kind"], r["camera"], r["detail"]) for r in rows] == [
        ("start", None, "appliance 0.1.0"), ("camera_lost", "cam2", "no frame for 5 s"), ("a-custom-kind", None, None)]
    assert json.loads(rows[1]["data"]) == {"retry_s": 2.0, "n": 3}
    assert abs(rows[0]["at"] - time.time()) < 10
    assert datetime.fromisoformat(rows[0]["time"]).timestamp() == pytest.approx(rows[0]["at"], abs=0.001)


def test_then_that_raises_does_not_stop_the_writer(recorder):
    got = []
    recorder.record(inspection(1), ["overlay"], then=lambda _committed: 1 / 0)
    recorder.record(inspection(2), ["overlay"], then=lambda _committed: got.append(2))
    recorder.flush()
    assert got == [2] and recorder.state()["state"] == "ok" and recorder.state()["written"] == 2


def test_then_may_call_back_into_the_recorder(tmp_path):
    # outputs that deliver inline report from the writer thread itself; a tiny queue must not deadlock it
    rec = Recorder(tmp_path / "audit.db", queue_size=2, batch=4, retention_interval_s=3600)
    rec.start()
    items = [inspection(k) for k in range(40)]
    for ins in items:
        rec.record(ins, ["mqtt"], {"mqtt": "p"}, then=lambda _c, i=ins.id: (rec.delivered(i, "mqtt"), rec.flush(1)))
    rec.close(timeout=10)
    conn = connect(rec.path)
    assert [tuple(r) for r in conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status")] == [("sent", 40)]


def test_close_writes_everything_queued(tmp_path):
    rec = Recorder(tmp_path / "audit.db", batch=8, synchronous="normal")
    rec.start()
    assert rec.on_writer(lambda db: db.execute("PRAGMA synchronous").fetchone()[0]) == 1  # NORMAL
    for k in range(300):
        rec.record(inspection(k), ["overlay"])
    rec.close()
    with pytest.raises(AuditError, match="not running"):
        rec.record(inspection(), ["overlay"])
    rec.delivered("late", "mqtt")  # a late report at shutdown is logged, not raised
    rec.event("stop")
    conn = connect(rec.path)
    assert conn.execute("SELECT count(*) FROM inspections").fetchone()[0] == 300
    assert not Path(f"{rec.path}-wal").exists() or Path(f"{rec.path}-wal").stat().st_size == 0  # checkpointed


def test_retention_by_age(recorder):
    now = time.time()
    old = [inspection(k, at=now - 100 * 86400 + k) for k in range(5)]
    new = [inspection(k, at=now - 10 * 86400 + k) for k in range(3)]
    for ins in old + new:
        recorder.record(ins, ["overlay", "mqtt"])
    recorder.flush()
    with connect(recorder.path) as ext:  # an old event, written before this recorder's time
        ext.execute("INSERT INTO events (at, time, kind) VALUES (?, '2000-01-01T00:00:00.000Z', 'start')",
                    [now - 95 * 86400])
    counts = recorder.prune()
    assert counts == {"inspections": 5, "deliveries": 10, "events": 1}
    conn = connect(recorder.path)
    assert {r[0] for r in conn.execute("SELECT id FROM inspections")} == {i.id for i in new}
    assert {r[0] for r in conn.execute("SELECT DISTINCT inspection_id FROM deliveries")} == {i.id for i in new}
    retention = conn.execute("SELECT data FROM events WHERE kind = 'retention'").fetchall()
    assert [json.loads(r[0]) for r in retention] == [{"inspections": 5, "deliveries": 10, "events": 1}]
    assert recorder.prune() == {"inspections": 0, "deliveries": 0, "events": 0}
    recorder.flush()
    assert conn.execute("SELECT count(*) FROM events WHERE kind = 'retention'").fetchone()[0] == 1


def test_retention_by_size(tmp_path):
    limit_mb = 0.25
    rec = Recorder(tmp_path / "audit.db", max_mb=limit_mb, retention_interval_s=3600)
    rec.start()
    t0 = time.time() - 3600
    items = [inspection(k, at=t0 + k) for k in range(400)]
    for ins in items:
        rec.record(ins, ["mqtt"], {"mqtt": ins.id * 100})  # ~2 kB each: about 1 MB in all
    rec.flush()
    conn = connect(rec.path)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    assert conn.execute("PRAGMA page_count").fetchone()[0] * page > 3 * limit_mb * 2**20
    counts = rec.prune()
    rec.close()
    assert counts["inspections"] > 0 and counts["deliveries"] == counts["inspections"]
    conn = connect(rec.path)
    kept = [r[0] for r in conn.execute("SELECT id FROM inspections ORDER BY captured_at")]
    assert 0 < len(kept) < len(items)
    assert kept == [i.id for i in items[-len(kept):]]  # the newest survive
    pages, free = (conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count"))
    assert free == 0  # incremental vacuum gave the space back
    assert pages * page <= limit_mb * 2**20
    assert rec.path.stat().st_size == pages * page
    assert conn.execute("SELECT count(*) FROM events WHERE kind = 'retention'").fetchone()[0] == 1


def _set_max_pages(db, pages: int | None) -> int:
    if pages is None:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    return db.execute(f"PRAGMA max_page_count = {pages}").fetchone()[0]


def test_full_disk_keeps_delivering_then_recovers_without_loss(recorder):
    before = [inspection(k) for k in range(10)]
    for ins in before:
        recorder.record(ins, ["mqtt"], {"mqtt": "x" * 4000})
    recorder.flush()
    recorder.on_writer(lambda db: _set_max_pages(db, None))  # SQLite now answers SQLITE_FULL
    during = [inspection(100 + k) for k in range(40)]
    called = []
    for ins in during:
        recorder.record(ins, ["mqtt"], {"mqtt": "y" * 4000}, then=lambda _committed, i=ins.id: called.append(i))
    recorder.flush()
    state = recorder.state()
    assert called == [i.id for i in during]  # outputs kept delivering
    assert state["state"] == "error" and "full" in state["last_error"] and state["backlog"] > 0
    recorder.delivered(during[0].id, "mqtt")  # waits in the backlog behind its record
    recorder.event("reload")
    time.sleep(0.3)  # a few retries fail
    assert recorder.state()["state"] == "error"

    recorder.on_writer(lambda db: _set_max_pages(db, 1_000_000))
    wait_for(lambda: recorder.state()["state"] == "ok")
    recorder.flush()
    state = recorder.state()
    assert (state["backlog"], state["dropped"]) == (0, 0)
    conn = connect(recorder.path)
    ids = {r[0] for r in conn.execute("SELECT id FROM inspections")}
    assert ids == {i.id for i in before + during}
    assert conn.execute("SELECT status FROM deliveries WHERE inspection_id = ?", [during[0].id]).fetchone()[0] == "sent"
    kinds = [r[0] for r in conn.execute("SELECT kind FROM events ORDER BY id")]
    assert kinds.count("audit_error") == 1 and "reload" in kinds and "audit_recovered" in kinds
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_backlog_overflow_is_counted(tmp_path):
    rec = Recorder(tmp_path / "audit.db", backlog=10, retry_s=0.05, retry_max_s=0.1, retention_interval_s=3600)
    rec.start()
    rec.record(inspection(0), ["mqtt"], {"mqtt": "x" * 4000})
    rec.flush()
    rec.on_writer(lambda db: _set_max_pages(db, None))
    called = []
    for k in range(30):
        rec.record(inspection(k + 1), ["mqtt"], {"mqtt": "y" * 4000}, then=lambda _committed, k=k: called.append(k))
    rec.flush()
    state = rec.state()
    assert len(called) == 30
    assert state["state"] == "error" and state["backlog"] == 10 and state["dropped"] >= 20
    rec.on_writer(lambda db: _set_max_pages(db, 1_000_000))
    wait_for(lambda: rec.state()["state"] == "ok")
    rec.close()
    rows = connect(rec.path).execute("SELECT count(*) FROM inspections").fetchone()[0]
    assert 1 + 30 - rec.state()["dropped"] <= rows < 31


def test_unusable_paths_raise_audit_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(AuditError, match="a-file"):
        Recorder(blocker / "audit.db").start()
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(AuditError, match=r"junk\.db"):
        Recorder(junk).start()
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(AuditError, match="not an audit log"):
        Recorder(other).start()
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(AuditError, match="newer"):
        Recorder(newer).start()


def test_config():
    cfg = AuditConfig()
    assert (cfg.path, cfg.synchronous, cfg.retention_days, cfg.max_mb, cfg.batch) == (None, "full", 90, 2048, 256)
    assert cfg.resolve_path(Path("/var/lib/x")) == Path("/var/lib/x/audit.db")
    assert AuditConfig(path="/data/a.db").resolve_path(Path("/var/lib/x")) == Path("/data/a.db")
    for bad in ({"synchronous": "off"}, {"batch": 0}, {"retention_days": 0}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            AuditConfig(**bad)
    rec = Recorder.from_config(AuditConfig(synchronous="normal", batch=7), Path("/tmp/state"))
    assert (rec.path, rec.synchronous, rec.batch) == (Path("/tmp/state/audit.db"), "normal", 7)


CHILD = r"""
import sys, time
from pathlib import Path
from appliance.daemon.audit import Recorder
from appliance.daemon.records import Inspection, new_inspection_id

rec = Recorder(Path(sys.argv[1]), batch=int(sys.argv[2]), retention_interval_s=3600)
rec.start()
out = sys.stdout
seq = 0
while True:
    now = time.time()
    ins = Inspection(id=new_inspection_id(now), camera="cam", seq=seq, captured_at=now, finished_at=now,
                     verdict="ok", score=0.25, latency_ms={"total": 1.0})
    rec.record(ins, ["overlay", "mqtt"], {"mqtt": "p" * 200},
               then=lambda _committed, i=ins.id: (out.write(i + "\n"), out.flush()))
    seq += 1
    if seq % 64 == 0:
        time.sleep(0.002)
"""


@pytest.mark.slow
def test_kill_9_loses_no_recorded_inspection(tmp_path):
    path = tmp_path / "audit.db"
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    printed: list[str] = []
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(rng.choice([1, 16, 256]))],
                                 stdout=subprocess.PIPE, env=env, cwd=tmp_path)
        want = rng.randint(20, 400)
        got = 0
        while got < want:
            line = child.stdout.readline()
            assert line, "the child stopped before recording anything"
            printed.append(line.decode().strip())
            got += 1
        time.sleep(rng.uniform(0, 0.05))
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read().decode()
        child.wait()
        printed += rest.split("\n")[:-1]  # a line cut by the kill has no newline: not counted
        conn = connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {r[0] for r in conn.execute("SELECT id FROM inspections")}
        outbox = [r[0] for r in conn.execute("SELECT inspection_id FROM deliveries WHERE output = 'mqtt'")]
        conn.close()
        assert len(printed) == len(set(printed))
        assert set(printed) <= rows
        assert set(printed) <= set(outbox) and len(outbox) == len(set(outbox)) == len(rows)
    assert len(printed) > 5 * 20


def test_iso_time_matches_datetime():
    ts = datetime(2024, 2, 29, 23, 59, 59, 999000, tzinfo=UTC).timestamp()
    assert iso_utc(ts) == "2024-02-29T23:59:59.999Z"
    assert iso_utc(ts + 3600) == "2024-03-01T00:59:59.999Z"
