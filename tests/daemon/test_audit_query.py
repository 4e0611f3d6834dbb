"""The audit log's read side and ``appliance audit``, on a real database written by the real recorder."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from appliance.daemon.audit import Recorder
from appliance.daemon.audit_cli import audit
from appliance.daemon.audit_db import event_row, open_reader
from appliance.daemon.audit_query import events, inspections, parse_time, write_csv, write_json
from appliance.daemon.records import Inspection
from appliance.errors import AuditError

pytestmark = pytest.mark.timeout(30)

T0 = 1_714_564_800.0  # 2024-05-01T12:00:00Z
app = typer.Typer()
app.command()(audit)
runner = CliRunner()


def make(i: int, camera: str, at: float, verdict: str, score: float | None, **kw) -> Inspection:
    return Inspection(id=f"id{i:02d}", camera=camera, seq=i, captured_at=at, finished_at=at + 0.1, verdict=verdict,
                      score=score, error="camera timeout" if verdict == "error" else None, **kw)


@pytest.fixture(scope="module")
def db_path(tmp_path_factory) -> Path:
    """Six inspections on two cameras across two days, their deliveries, and four events."""
    path = tmp_path_factory.mktemp("audit") / "audit.db"
    rec = Recorder(path, retention_days=100_000, retention_interval_s=3600)
    rec.start()
    plan = [  # (camera, seconds after T0, verdict, score)
        ("cam1", 0.0, "ok", 0.1), ("cam2", 60.0, "ng", 0.9), ("cam1", 120.0, "ng", 0.75),
        ("cam2", 86400.0, "ok", 0.2), ("cam1", 86460.0, "error", None), ("cam1", 2 * 86400.0, "ok", 0.3),
    ]
    for i, (camera, dt, verdict, score) in enumerate(plan):
        rec.record(make(i, camera, T0 + dt, verdict, score, latency_ms={"backbone": 40.0 + i, "total": 50.0 + i}),
                   ["overlay", "mqtt"], {"mqtt": f'{{"n": {i}}}'})
    rec.flush()
    rec.delivered("id00", "overlay", "skipped", at=T0 + 1.5)
    rec.delivered("id00", "mqtt", "sent", detail="plant/cam1", at=T0 + 0.25)
    rec.delivered("id01", "mqtt", "failed", detail="broker down", at=T0 + 61)
    for kind, camera, dt, data in [("start", None, 0, None), ("camera_lost", "cam2", 30, {"after_s": 5}),
                                   ("camera_back", "cam2", 90, None), ("reload", None, 86400, {"ok": True})]:
        rec.on_writer(lambda db, k=kind, c=camera, d=dt, x=data: db["events"].insert(  # at a chosen time
            event_row(k, camera=c, data=x, at=T0 + d)))
    rec.close()
    return path


def test_parse_time(monkeypatch):
    assert parse_time(None) is None
    assert parse_time("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_time("90m", now=10_000.0) == 10_000.0 - 5400
    assert parse_time("1w", now=1e6) == 1e6 - 7 * 86400
    assert parse_time("1.5d", now=1e6) == 1e6 - 1.5 * 86400
    assert parse_time("2024-05-01T12:00:00Z") == T0
    assert parse_time("2024-05-01T14:00:00+02:00") == T0
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # UTC+9, no daylight saving
    time.tzset()
    try:
        assert parse_time("2024-05-01") == T0 - 21 * 3600  # local midnight
        assert parse_time("2024-05-01", end=True) == T0 + 3 * 3600  # the next local midnight
        assert parse_time("2024-05-01T21:00") == T0
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    for bad in ("yesterday", "2h30", "2024-13-01", ""):
        with pytest.raises(ValueError, match="ISO date"):
            parse_time(bad)


def test_inspections_filters_and_outputs(db_path):
    rows = inspections(db_path)
    assert [r["id"] for r in rows] == [f"id{i:02d}" for i in range(6)]
    assert rows[0]["outputs"] == "overlay:skipped@2024-05-01T12:00:01.500Z; mqtt:sent@2024-05-01T12:00:00.250Z"
    assert rows[1]["outputs"] == "overlay:pending; mqtt:failed@2024-05-01T12:01:01.000Z"
    assert rows[2]["latency_ms"] == {"backbone": 42.0, "total": 52.0}
    assert rows[4]["verdict"] == "error" and rows[4]["error"] == "camera timeout" and rows[4]["score"] is None
    assert [r["id"] for r in inspections(db_path, camera="cam2")] == ["id01", "id03"]
    assert [r["id"] for r in inspections(db_path, verdict="ng")] == ["id01", "id02"]
    assert [r["id"] for r in inspections(db_path, camera="cam1", verdict="ok")] == ["id00", "id05"]
    assert [r["id"] for r in inspections(db_path, since="2024-05-02T00:00:00Z")] == ["id03", "id04", "id05"]
    assert [r["id"] for r in inspections(db_path, since=T0 + 60, until=T0 + 86400)] == ["id01", "id02"]
    assert [r["id"] for r in inspections(db_path, until="2024-05-01T12:01:00Z")] == ["id00"]
    assert [r["id"] for r in inspections(db_path, limit=2, order="desc")] == ["id05", "id04"]
    assert inspections(db_path, since="1h") == []  # all of it is long past
    with pytest.raises(ValueError, match="verdict"):
        inspections(db_path, verdict="bad")
    with pytest.raises(ValueError, match="order"):
        inspections(db_path, order="up")


def test_same_capture_time_keeps_recording_order(tmp_path):
    path = tmp_path / "audit.db"
    rec = Recorder(path, retention_interval_s=3600)
    rec.start()
    for seq, name in enumerate(["zz", "aa", "mm"]):  # ids that sort differently from the recording order
        rec.record(Inspection(id=name, camera="c", seq=seq, captured_at=T0, finished_at=T0, verdict="ok"), [])
    rec.close()
    assert [r["seq"] for r in inspections(path)] == [0, 1, 2]
    assert [r["seq"] for r in inspections(path, order="desc")] == [2, 1, 0]


def test_events_query(db_path):
    assert [e["kind"] for e in events(db_path)] == ["start", "camera_lost", "camera_back", "reload"]
    lost = events(db_path, kind="camera_lost")
    assert len(lost) == 1 and lost[0]["camera"] == "cam2" and lost[0]["data"] == {"after_s": 5}
    assert [e["kind"] for e in events(db_path, camera="cam2")] == ["camera_lost", "camera_back"]
    assert [e["kind"] for e in events(db_path, since=T0 + 60, until=T0 + 86400)] == ["camera_back"]
    assert [e["kind"] for e in events(db_path, limit=1, order="desc")] == ["reload"]


def test_csv_and_json_parse_back(db_path, tmp_path):
    rows = inspections(db_path)
    buffer = io.StringIO()
    assert write_csv(rows, buffer) == 6
    parsed = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert len(parsed) == 6
    assert parsed[2]["latency_backbone_ms"] == "42.0" and parsed[2]["latency_total_ms"] == "52.0"
    assert "latency_ms" not in parsed[0]
    assert parsed[1]["outputs"] == "overlay:pending; mqtt:failed@2024-05-01T12:01:01.000Z"
    assert parsed[4]["score"] == "" and parsed[4]["error"] == "camera timeout"
    assert [float(p["captured_at"]) for p in parsed] == [r["captured_at"] for r in rows]
    out = tmp_path / "rows.json"
    assert write_json(rows, out) == 6
    assert json.loads(out.read_text()) == rows
    ev = events(db_path)
    write_csv(ev, tmp_path / "events.csv")
    with open(tmp_path / "events.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert [json.loads(b["data"]) if b["data"] else None for b in back] == [e["data"] for e in ev]
    assert write_json([], tmp_path / "empty.json") == 0 and json.loads((tmp_path / "empty.json").read_text()) == []


def test_reader_never_blocks_the_writer_and_cannot_write(tmp_path):
    path = tmp_path / "audit.db"
    rec = Recorder(path, retention_interval_s=3600)
    rec.start()
    rec.record(make(0, "cam1", T0, "ok", 0.1), ["overlay"])
    rec.flush()
    inside, release = threading.Event(), threading.Event()

    def long_write(db):  # the writer in the middle of a transaction
        db.execute("BEGIN IMMEDIATE")
        db["inspections"].insert({"id": "uncommitted", "time": "", "camera": "c", "seq": 1, "captured_at": T0,
                                  "finished_at": T0, "verdict": "ok"})
        inside.set()
        release.wait(10)
        db.execute("COMMIT")

    holder = threading.Thread(target=rec.on_writer, args=(long_write,))
    holder.start()
    assert inside.wait(5)
    try:
        started = time.monotonic()
        assert [r["id"] for r in inspections(path)] == ["id00"]  # the committed state, at once
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        holder.join()
    assert [r["id"] for r in inspections(path)] == ["id00", "uncommitted"]
    reader = open_reader(path)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("DELETE FROM inspections")
    reader.close()
    rec.close()


def test_cli_table_csv_json(db_path, tmp_path):
    result = runner.invoke(app, ["--db", str(db_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["id", "time", "camera", "seq"] and len(lines) == 7
    assert lines[2].split()[:4] == ["id01", "2024-05-01T12:01:00.000Z", "cam2", "1"]

    result = runner.invoke(app, ["--db", str(db_path), "--format", "csv", "--verdict", "ng"])
    assert result.exit_code == 0, result.output
    parsed = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [p["id"] for p in parsed] == ["id01", "id02"] and parsed[0]["score"] == "0.9"

    out = tmp_path / "recent.json"
    result = runner.invoke(app, ["--db", str(db_path), "--format", "json", "--limit", "2", "--camera", "cam1",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in json.loads(out.read_text())] == ["id04", "id05"]  # the two most recent, in order
    assert "wrote 2 inspections" in result.stderr

    result = runner.invoke(app, ["--db", str(db_path), "--events", "--kind", "camera_lost", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [(e["kind"], e["camera"]) for e in json.loads(result.stdout)] == [("camera_lost", "cam2")]

    result = runner.invoke(app, ["--db", str(db_path), "--since", "2024-05-04T00:00Z"])
    assert result.exit_code == 0 and result.stdout == "" and "no inspections match" in result.stderr


@pytest.mark.parametrize("args, message", [
    ([], "pass --db"),
    (["--db", "{tmp}/missing.db"], "no audit database at"),
    (["--db", "{tmp}/junk.db"], "junk.db"),
    (["--db", "{db}", "--format", "xml"], "--format"),
    (["--db", "{db}", "--verdict", "maybe"], "--verdict"),
    (["--db", "{db}", "--since", "last tuesday"], "ISO date"),
    (["--db", "{db}", "--events", "--verdict", "ok"], "--verdict"),
])
def test_cli_errors_exit_2_with_one_line(db_path, tmp_path, args, message):
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    args = [a.format(tmp=tmp_path, db=db_path) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_open_reader_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(AuditError, match="no audit database"):
        open_reader(tmp_path / "none.db")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(AuditError, match="not an audit database"):
        open_reader(other)
