"""The real daemon, end to end: replayed real images in, audit rows, overlays, HTTP and systemd's notify out.

Each test starts ``appliance run`` as a subprocess on a config file, as systemd would, and
checks what it wrote with tools that are not the code under test (``sqlite3``, PIL, urllib).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from harness import APPLIANCE, Daemon, audit_rows, camera, free_port, replay_folder, sample_images, write_config

from appliance.overlay import read_overlay_metadata

pytestmark = pytest.mark.slow


def events(db: Path, kind: str | None = None) -> list[dict]:
    return audit_rows(db, "events", f"kind = '{kind}'" if kind else "1", "id")


def test_replay_every_frame_audited_once_with_overlays_http_and_notify(tmp_path, sample_bundle, daemon_cache,
                                                                        daemons, notify_socket):
    images = sample_images()
    folder = replay_folder(tmp_path / "replay", images)
    port = free_port()
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", sample_bundle, {"type": "replay", "path": str(folder), "fps": 8,
                                                        "loop": False})],
                       outputs=[{"type": "overlay", "width": 320, "height": 200},
                                {"type": "http", "port": port}],
                       cache=daemon_cache)
    d = Daemon(cfg, notify=notify_socket.path, env={"WATCHDOG_USEC": "2000000"})
    daemons.append(d)
    ready = notify_socket.wait_for("READY", "1", timeout=180)
    assert ready["READY"] == "1"
    notify_socket.wait_for("WATCHDOG", "1", timeout=10)
    d.wait_ready()
    d.wait_until(lambda: d.db.exists() and len(audit_rows(d.db)) >= len(images), 120, "every frame audited")
    d.wait_until(lambda: d.status()["cameras"]["line1"]["state"] == "ended", 30, "replay ended")
    status_line = notify_socket.wait_for("STATUS", timeout=15, contains="fps")["STATUS"]
    assert "line1" in status_line and "fps" in status_line

    rows = audit_rows(d.db)
    # Every file exactly once, in replay order, each with a unique id and a verdict.
    assert [Path(r["source"]).name for r in rows] == sorted(p.name for p in folder.iterdir())
    assert len({r["id"] for r in rows}) == len(rows)
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
    assert all(r["verdict"] in ("ok", "ng") for r in rows)
    assert all(r["model_id"] and r["bank_hash"] and r["image_sha256"] for r in rows)
    # The model works on real data: defects score higher than good parts on average.
    good = [r["score"] for r, p in zip(rows, images, strict=True) if p.parent.name == "good"]
    bad = [r["score"] for r, p in zip(rows, images, strict=True) if p.parent.name == "pitting"]
    assert sum(bad) / len(bad) > sum(good) / len(good)

    # Overlays: one per inspection, carrying its id and score in EXIF; latest.png is the last one.
    for row in rows:
        meta = read_overlay_metadata(row["overlay_path"])
        assert meta["inspection_id"] == row["id"]
        assert abs(meta["score"] - row["score"]) < 1e-6
    latest = read_overlay_metadata(d.state / "overlays" / "line1" / "latest.png")
    assert latest["inspection_id"] == rows[-1]["id"]

    # Every output's delivery is in the audit log.
    deliveries = audit_rows(d.db, "deliveries")
    by_output = Counter((x["output"], x["status"]) for x in deliveries)
    assert by_output[("overlay", "sent")] == len(rows) and by_output[("http", "sent")] == len(rows)

    # The HTTP side shows the same last inspection, and Prometheus counts every frame.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5) as answer:
        api = json.load(answer)
    assert api["cameras"]["line1"]["last"]["id"] == rows[-1]["id"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        metrics = answer.read().decode()
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("anomaly_appliance_inspections_total{") and 'camera="line1"' in line)
    assert counted == len(rows)

    # appliance status --json over the control socket, as a technician runs it.
    out = subprocess.run([str(APPLIANCE), "status", "--config", str(cfg), "--json"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["cameras"]["line1"]["last"]["id"] == rows[-1]["id"]
    assert status["cameras"]["line1"]["drops"] == 0

    assert d.stop() == 0
    kinds = [e["kind"] for e in events(d.db)]
    assert kinds[0] == "start" and "model_loaded" in kinds and kinds[-1] == "stop"
    assert "STOPPING" in {k for _, m in notify_socket.drain(1.0) + notify_socket.messages for k in m}


def test_stalled_pipeline_stops_the_watchdog_pings(tmp_path, sample_bundle, daemon_cache, daemons, notify_socket):
    folder = replay_folder(tmp_path / "replay", sample_images()[:8])
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", sample_bundle, {"type": "replay", "path": str(folder), "fps": 10,
                                                        "loop": True})],
                       cache=daemon_cache, watchdog={"stall_s": 2.0})
    d = Daemon(cfg, notify=notify_socket.path, env={"WATCHDOG_USEC": "1000000", "APPLIANCE_FAULT_INJECTION": "1"})
    daemons.append(d)
    notify_socket.wait_for("READY", "1", timeout=180)
    notify_socket.drain(3.0)
    pings = [t for t, m in notify_socket.messages if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 3, "a healthy daemon pings every half WatchdogSec"

    d.request({"cmd": "stall", "camera": "line1", "seconds": 8})
    stalled_at = time.monotonic()
    new = notify_socket.drain(7.0)
    late_pings = [t for t, m in new if m.get("WATCHDOG") == "1" and t > stalled_at + 3.0]
    assert late_pings == [], "pings must stop once the pipeline has been stalled longer than stall_s"
    health = d.status()["daemon"]
    assert not health["healthy"] and "line1" in " ".join(health["unhealthy"])

    # Once the stall ends, frames flow again and so do the pings.
    new = notify_socket.drain(8.0)
    assert any(m.get("WATCHDOG") == "1" for _, m in new)
    assert d.stop() == 0


def test_bad_frames_and_a_vanished_hot_folder_give_error_rows_and_the_daemon_goes_on(tmp_path, sample_bundle,
                                                                                       daemon_cache, daemons):
    hot = tmp_path / "hot"
    hot.mkdir()
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", sample_bundle, {"type": "folder", "path": str(hot)})],
                       cache=daemon_cache)
    d = Daemon(cfg)
    daemons.append(d)
    d.wait_ready()
    good = sample_images()[0]
    shutil.copy(good, hot / "a_good.jpg")
    (hot / "b_corrupt.jpg").write_bytes(good.read_bytes()[:400] + b"\0" * 300)
    (hot / "c_empty.png").write_bytes(b"")
    d.wait_until(lambda: len(audit_rows(d.db)) >= 3, 60, "three rows")
    rows = {Path(r["source"]).name: r for r in audit_rows(d.db)}
    assert rows["a_good.jpg"]["verdict"] in ("ok", "ng")
    assert rows["b_corrupt.jpg"]["verdict"] == "error" and rows["b_corrupt.jpg"]["error"]
    assert rows["c_empty.png"]["verdict"] == "error" and rows["c_empty.png"]["error"]
    assert (hot / "done" / "a_good.jpg").exists()
    assert (hot / "failed" / "b_corrupt.jpg").exists() and (hot / "failed" / "c_empty.png").exists()

    # The folder vanishes (an unmounted share): the camera is reported lost, the daemon stays up.
    shutil.rmtree(hot)
    d.wait_until(lambda: d.status()["cameras"]["line1"]["state"] == "lost", 30, "camera lost")
    assert d.proc.poll() is None
    hot.mkdir()
    shutil.copy(good, hot / "d_back.jpg")
    d.wait_until(lambda: any(r["source"].endswith("d_back.jpg") for r in audit_rows(d.db)), 60, "back")
    assert d.status()["cameras"]["line1"]["state"] == "running"
    assert d.stop() == 0
    kinds = [e["kind"] for e in events(d.db)]
    assert "camera_lost" in kinds and "camera_back" in kinds


def test_a_bad_config_exits_non_zero_naming_the_key(tmp_path, sample_bundle):
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", sample_bundle, {"type": "replay", "path": str(tmp_path), "fps": "fast"},
                               queue=0)])
    done = subprocess.run([str(APPLIANCE), "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{cfg}: cameras[0](line1).source.fps" in done.stderr
    assert "cameras[0](line1).queue" in done.stderr
    assert not (tmp_path / "state" / "audit.db").exists()


def test_a_missing_bundle_stops_the_start_up_with_its_path_and_an_audit_event(tmp_path, daemon_cache):
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", tmp_path / "no-such-bundle", {"type": "replay", "path": str(tmp_path)})],
                       outputs=[{"type": "overlay"}], cache=daemon_cache)
    done = subprocess.run([str(APPLIANCE), "run", "--config", str(cfg)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "no-such-bundle" in done.stderr
    failed = events(tmp_path / "state" / "audit.db", "start_failed")
    assert len(failed) == 1 and "no-such-bundle" in failed[0]["detail"]


def test_triggers_thresholds_reload_and_drain(tmp_path, sample_bundle, daemon_cache, daemons):
    folder = replay_folder(tmp_path / "replay", sample_images())
    cam = camera("line1", sample_bundle, {"type": "replay", "path": str(folder), "loop": True},
                 trigger={"mode": "external"})
    cfg = write_config(tmp_path / "config.toml", [cam], cache=daemon_cache)
    d = Daemon(cfg)
    daemons.append(d)
    d.wait_ready()

    for i in range(5):
        assert d.request({"cmd": "trigger", "camera": "line1", "id": f"T{i}"})["accepted"]
    d.wait_until(lambda: len(audit_rows(d.db)) >= 5, 60, "five triggered results")
    assert [r["trigger_id"] for r in audit_rows(d.db)] == [f"T{i}" for i in range(5)]

    # An operator threshold applies to the next frame, is audited and survives a restart.
    changed = d.request({"cmd": "threshold", "camera": "line1", "value": 0.9, "who": "test"})
    assert changed["in_force"] == {"value": 0.9, "source": "operator"}
    d.request({"cmd": "trigger", "camera": "line1", "id": "after"})
    d.wait_until(lambda: len(audit_rows(d.db)) >= 6, 60, "one more")
    last = audit_rows(d.db)[-1]
    assert (last["trigger_id"], last["threshold"], last["threshold_source"]) == ("after", 0.9, "operator")
    assert events(d.db, "threshold_changed")

    # A bad new config on SIGHUP is refused and the old one keeps running; a good one applies.
    good_text = cfg.read_text()
    cfg.write_text(good_text.replace('mode = "external"', 'mode = "sometimes"'))
    d.proc.send_signal(1)
    d.wait_until(lambda: len(events(d.db, "config_rejected")) == 1, 30, "reload refused")
    assert d.proc.poll() is None
    # `appliance reload` checks the file itself first (exit 2, a bad config) ...
    checked = subprocess.run([str(APPLIANCE), "reload", "--config", str(cfg)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 2 and "cameras[0](line1).trigger.mode" in checked.stderr
    # ... and the daemon refuses it too when asked directly (exit 1, a refused request).
    refused = subprocess.run([str(APPLIANCE), "reload", "--socket", str(d.socket)], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and "reload refused" in refused.stderr and "trigger.mode" in refused.stderr
    assert d.proc.poll() is None
    cfg.write_text(good_text.replace("[cameras.trigger]", "[cameras.thresholds]\nvalue = 0.7\n\n[cameras.trigger]"))
    applied = subprocess.run([str(APPLIANCE), "reload", "--config", str(cfg), "--json"], capture_output=True,
                             text=True, timeout=60)
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["changes"] == ["line1: settings updated"]

    # SIGTERM drains: every accepted trigger has its row before the process ends.
    for i in range(3):
        d.request({"cmd": "trigger", "camera": "line1", "id": f"D{i}"})
    assert d.stop() == 0
    ids = [r["trigger_id"] for r in audit_rows(d.db)]
    assert ids[-3:] == ["D0", "D1", "D2"]
    assert json.loads((d.state / "thresholds.json").read_text())["operator"]["line1"]["camera"] == 0.9


def test_doctor_reports_every_check_as_json(tmp_path, sample_bundle, daemon_cache):
    folder = replay_folder(tmp_path / "replay", sample_images()[:2])
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", sample_bundle, {"type": "replay", "path": str(folder)}),
                        camera("line2", tmp_path / "no-bundle", {"type": "folder", "path": str(tmp_path / "none")})],
                       cache=daemon_cache)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(daemon_cache / "numba"))
    done = subprocess.run([str(APPLIANCE), "doctor", "--config", str(cfg), "--json"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    by_check = {c["check"]: c for c in report["checks"]}
    failed = {name for name, c in by_check.items() if c["status"] == "fail"}
    assert any("line2" in name and "bundle" in name for name in failed)
    assert not any("line1" in name for name in failed), by_check


def test_kill_9_at_20_random_moments_loses_no_reported_inspection(tmp_path, sample_bundle, daemon_cache):
    """A power cut or the OOM killer, 20 times during a replay: the audit log stays sound and complete.

    Complete means: every inspection an output already reported (its overlay file exists, and
    overlays are written only after the audit row's COMMIT) has its row, and no row appears twice.
    """
    import random
    import sqlite3

    rng = random.Random(20261205)
    folder = replay_folder(tmp_path / "replay", sample_images()[:12])
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", sample_bundle, {"type": "replay", "path": str(folder), "fps": 25,
                                                        "loop": True})],
                       outputs=[{"type": "overlay", "width": 160, "height": 100}],
                       cache=daemon_cache, audit={"batch": 8})
    for cycle in range(20):
        d = Daemon(cfg)
        try:
            if cycle % 4 == 3:  # now and then while it is still starting up
                time.sleep(rng.uniform(0.2, 2.0))
            else:
                d.wait_ready()
                time.sleep(rng.uniform(0.0, 1.5))
        finally:
            d.kill()
        conn = sqlite3.connect(d.db) if d.db.exists() else None
        if conn is not None:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok", f"cycle {cycle}"
            conn.close()
    rows = audit_rows(d.db)
    assert len(rows) >= 20, "the replay inspected frames between the kills"
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert len({(r["camera"], r["captured_at"], r["seq"]) for r in rows}) == len(rows), "a frame recorded twice"
    reported = {p.stem for p in (d.state / "overlays" / "line1").glob("*/*.png")}
    assert reported, "overlays were written"
    missing = reported - set(ids)
    assert not missing, f"{len(missing)} inspections were reported by the overlay output but have no audit row"
    starts = audit_rows(d.db, "events", "kind = 'start'")
    assert len(starts) >= 15  # some kills land before the audit log is even opened
