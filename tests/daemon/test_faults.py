"""The real daemon under the faults an outside test found: stops under load, kill -9, idle triggered cameras,
a hot folder under pressure, huge and wrongly formatted images, a full disk, commands it must refuse.

Each test starts ``appliance run`` as a subprocess and checks what it wrote with tools that are not the
code under test (``sqlite3``, ``hashlib``, urllib, a real notify socket).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from harness import APPLIANCE, Daemon, audit_rows, camera, free_port, replay_folder, sample_images, write_config

pytestmark = pytest.mark.slow


def events(db: Path, kind: str) -> list[dict]:
    return audit_rows(db, "events", f"kind = '{kind}'", "id")


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_sigterm_under_load_stops_in_order_and_leaves_nothing_pending(tmp_path, sample_bundle, daemon_cache,
                                                                        daemons):
    """A full overlay queue at every stop: exit 0 within the budget, every delivery finished or given up with why."""
    folder = replay_folder(tmp_path / "replay", sample_images()[:20])
    port = free_port()
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", sample_bundle, {"type": "replay", "path": str(folder), "fps": 200,
                                                        "loop": True})],
                       outputs=[{"type": "overlay", "width": 1920, "height": 1080, "queue": 64},
                                {"type": "http", "port": port}],
                       cache=daemon_cache, runtime={"stop_timeout_s": 6.0})
    for _ in range(3):
        d = Daemon(cfg)
        daemons.append(d)
        d.wait_ready()
        d.wait_until(lambda d=d: len(audit_rows(d.db)) >= 80, 60, "the replay under load")
        started = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - started < 6.0 + 5.0, "the stop must fit its budget (plus the interpreter's exit)"
        assert "terminate called" not in d.log()
    stops = events(d.db, "stop")
    assert len(stops) == 3 and all("orderly stop" in s["detail"] for s in stops)
    assert not events(d.db, "unclean_stop")
    pending = audit_rows(d.db, "deliveries", "status = 'pending'")
    assert pending == [], f"{len(pending)} deliveries that nothing will ever finish"
    rows = audit_rows(d.db)
    named = [r for r in rows if r["overlay_path"]]
    assert named and all(Path(r["overlay_path"]).is_file() for r in named), "a row names an overlay never written"
    dropped = audit_rows(d.db, "deliveries", "output = 'overlay' AND status = 'dropped'")
    assert all(r["detail"] for r in dropped)
    ids = {r["inspection_id"] for r in dropped}
    assert not any(r["overlay_path"] for r in rows if r["id"] in ids)


def test_kill_9_is_recorded_at_the_next_start(tmp_path, sample_bundle, daemon_cache, daemons):
    folder = replay_folder(tmp_path / "replay", sample_images()[:10])
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", sample_bundle, {"type": "replay", "path": str(folder), "fps": 20,
                                                        "loop": True})],
                       outputs=[{"type": "overlay", "width": 160, "height": 100}], cache=daemon_cache)
    first = Daemon(cfg)
    first.wait_ready()
    first.wait_until(lambda: len(audit_rows(first.db)) >= 10, 60, "inspections")
    first.kill()
    killed_rows = len(audit_rows(first.db))
    second = Daemon(cfg)
    daemons.append(second)
    second.wait_ready()
    unclean = events(second.db, "unclean_stop")
    assert len(unclean) == 1, "the next start records that the previous run ended uncleanly"
    data = json.loads(unclean[0]["data"])
    assert data["pid"] == first.proc.pid and data["inspections"] >= killed_rows - 1
    first_run = data["run_id"]
    assert first_run and first_run != second.status()["daemon"]["run_id"]
    assert {r["run_id"] for r in audit_rows(second.db, where=f"run_id = '{first_run}'")} == {first_run}
    second.wait_until(lambda: any(r["run_id"] != first_run for r in audit_rows(second.db)), 60, "new rows")
    assert second.stop() == 0
    left = audit_rows(second.db, "deliveries", "status = 'pending'")
    assert left == []  # the killed run's undrawn overlays were given up at the start, with why


def test_an_idle_triggered_camera_keeps_ready_and_the_watchdog_fed(tmp_path, sample_bundle, daemon_cache, daemons,
                                                                    notify_socket):
    folder = replay_folder(tmp_path / "replay", sample_images()[:6])
    cams = [camera("trig", sample_bundle, {"type": "replay", "path": str(folder), "loop": True},
                   trigger={"mode": "external"}),
            camera("free", sample_bundle, {"type": "replay", "path": str(folder), "fps": 5, "loop": True})]
    cfg = write_config(tmp_path / "config.toml", cams, cache=daemon_cache, watchdog={"stall_s": 1.0})
    d = Daemon(cfg, notify=notify_socket.path, env={"WATCHDOG_USEC": "1000000"})
    daemons.append(d)
    notify_socket.wait_for("READY", "1", timeout=180)
    d.wait_ready()
    assert d.request({"cmd": "trigger", "camera": "trig", "id": "first"})["accepted"]
    d.wait_until(lambda: any(r["trigger_id"] == "first" for r in audit_rows(d.db)), 30, "the first result")
    time.sleep(2.5)  # idle for longer than stall_s: an idle triggered camera is not a hung one
    notify_socket.drain()
    assert d.request({"cmd": "trigger", "camera": "trig", "id": "after-pause"})["accepted"]
    polled = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        s = d.status()
        polled.append((s["daemon"]["healthy"], s["cameras"]["trig"]["ready"], s["cameras"]["free"]["ready"]))
        time.sleep(0.05)
    assert polled and all(p == (True, True, True) for p in polled), [p for p in polled if p != (True, True, True)]
    d.wait_until(lambda: any(r["trigger_id"] == "after-pause" for r in audit_rows(d.db)), 30, "the next result")
    pings = [t for t, m in notify_socket.drain(1.0) if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 2 and max(b - a for a, b in itertools.pairwise(pings)) < 1.5
    assert d.stop() == 0


def test_a_hot_folder_under_pressure_loses_nothing_and_refuses_bad_frames_by_name(tmp_path, sample_bundle,
                                                                                   daemon_cache, daemons):
    hot = tmp_path / "hot"
    hot.mkdir()
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", sample_bundle, {"type": "folder", "path": str(hot), "settle_s": 0.1},
                               queue=1)], cache=daemon_cache)
    d = Daemon(cfg)
    daemons.append(d)
    d.wait_ready()
    staging = tmp_path / "staging"
    staging.mkdir()
    goods = []
    for i, image in enumerate(sample_images() * 2):  # 80 files arrive at once into a queue of 1
        goods.append(shutil.copy(image, staging / f"{i:03d}_{image.name}"))
    bgr = cv2.imread(str(sample_images()[0]))
    assert cv2.imwrite(str(staging / "grey.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    assert cv2.imwrite(str(staging / "huge.png"), np.zeros((20000, 20000), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    for f in sorted(staging.iterdir()):
        os.replace(f, hot / f.name)
    total = len(goods) + 2
    d.wait_until(lambda: len(audit_rows(d.db)) >= total, 300, "every file inspected")
    rows = {r["source"].rsplit("/", 1)[-1]: r for r in audit_rows(d.db)}
    assert len(rows) == total
    assert not events(d.db, "frame_dropped"), "a hot folder waits: nothing is dropped"
    assert all(rows[Path(g).name]["verdict"] in ("ok", "ng") for g in goods)
    assert "grey 8-bit" in rows["grey.png"]["error"] and "RGB" in rows["grey.png"]["error"]
    assert "20000x20000" in rows["huge.png"]["error"] and "limit" in rows["huge.png"]["error"]
    d.wait_until(lambda: (hot / "failed" / "huge.png").exists() and (hot / "failed" / "grey.png").exists(), 30,
                 "the refused files moved aside")
    first = Path(goods[0]).name
    d.wait_until(lambda: (hot / "done" / first).exists(), 30, "moved to done")
    digest = hashlib.sha256((hot / "done" / first).read_bytes()).hexdigest()  # sha256sum of the file finds its row
    assert rows[first]["file_sha256"] == digest and rows[first]["image_sha256"] != digest
    status = d.status()["cameras"]["line1"]
    assert status["drops"] == 0
    assert d.stop() == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs for the daemon's state (root only, as in CI), unmounted afterwards."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_below_its_floor_raises_an_alarm_everywhere_and_the_audit_keeps_every_result(
        tmp_path, small_disk, sample_bundle, daemon_cache, daemons):
    folder = replay_folder(tmp_path / "replay", sample_images()[:20])
    port = free_port()
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", sample_bundle, {"type": "replay", "path": str(folder), "fps": 25,
                                                        "loop": True})],
                       outputs=[{"type": "overlay", "width": 1920, "height": 1080}, {"type": "http", "port": port}],
                       cache=daemon_cache, paths={"state": str(small_disk / "state")},
                       disk={"min_free_mb": 30, "clear_margin_mb": 1, "check_s": 0.2})
    d = Daemon(cfg)
    daemons.append(d)
    d.wait_ready()
    d.wait_until(lambda: d.status()["daemon"]["alarms"], 120, "the disk_low alarm")
    alarm = d.status()["daemon"]["alarms"][0]
    assert alarm["kind"] == "disk_low" and "floor" in alarm["detail"]
    code, health = get(f"http://127.0.0.1:{port}/healthz")
    assert code == 503 and health["status"] == "alarm" and "disk_low" in health["reasons"][0]
    before = len(audit_rows(d.db))
    d.wait_until(lambda: len(audit_rows(d.db)) >= before + 50, 60, "inspection goes on below the floor")
    free_mb = shutil.disk_usage(small_disk).free / 2**20
    assert free_mb > 5, "overlays stopped at the floor: the audit database keeps the rest of the disk"
    dropped = audit_rows(d.db, "deliveries", "output = 'overlay' AND status = 'dropped' AND detail LIKE '%floor%'")
    assert dropped, "overlays below the floor are dropped with why"
    named = [r for r in audit_rows(d.db) if r["overlay_path"]]
    assert all(Path(r["overlay_path"]).is_file() for r in named)
    text = subprocess.run([str(APPLIANCE), "status", "--config", str(cfg)], capture_output=True, text=True,
                          timeout=30).stdout
    assert "ALARM disk_low" in text
    d.request({"cmd": "enable", "camera": "line1", "enabled": False})  # the line stops: no new overlays
    shutil.rmtree(small_disk / "state" / "overlays")  # a technician frees space: the alarm clears by itself
    d.wait_until(lambda: not d.status()["daemon"]["alarms"], 30, "the alarm cleared")
    code, health = get(f"http://127.0.0.1:{port}/healthz")
    assert code == 200 and health["status"] == "ok"
    assert d.stop() == 0
    kinds = [e["kind"] for e in audit_rows(d.db, "events", order="id")]
    assert "disk_low" in kinds and "disk_ok" in kinds


def test_metrics_are_served_by_the_daemon_itself_with_latency_histograms(tmp_path, sample_bundle, daemon_cache,
                                                                         daemons):
    folder = replay_folder(tmp_path / "replay", sample_images()[:10])
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", sample_bundle, {"type": "replay", "path": str(folder), "fps": 20,
                                                        "loop": True})],
                       cache=daemon_cache)  # no http output: metrics do not depend on it
    d = Daemon(cfg)
    daemons.append(d)
    d.wait_ready()
    d.wait_until(lambda: len(audit_rows(d.db)) >= 10, 60, "ten inspections")
    d.request({"cmd": "enable", "camera": "line1", "enabled": False})  # hold the counts still while comparing
    d.wait_until(lambda: d.status()["cameras"]["line1"]["queue_depth"] == 0
                 and d.status()["cameras"]["line1"]["in_engine"] == 0, 30, "the queue empty")
    url = d.status()["daemon"]["metrics_url"]

    def counted() -> float:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return next(float(ln.split()[-1]) for ln in answer.read().decode().splitlines()
                        if ln.startswith('anomaly_appliance_inspection_seconds_count{camera="line1"}'))

    # every scored frame is in the histogram once (its audit row may commit a moment after)
    d.wait_until(lambda: counted() == sum(r["verdict"] != "error" for r in audit_rows(d.db)), 10, "counts equal")
    d.request({"cmd": "enable", "camera": "line1", "enabled": True})
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    assert 'anomaly_appliance_stage_seconds_bucket{camera="line1",le="0.05",stage="backbone"}' in text
    assert 'anomaly_appliance_camera_ready{camera="line1"} 1.0' in text
    assert d.stop() == 0


def test_words_of_the_cli(tmp_path, sample_bundle, daemon_cache, daemons):
    folder = replay_folder(tmp_path / "replay", sample_images()[:4])
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", sample_bundle, {"type": "replay", "path": str(folder), "loop": True})],
                       cache=daemon_cache)
    d = Daemon(cfg)
    daemons.append(d)
    d.wait_ready()
    negative = subprocess.run([str(APPLIANCE), "threshold", "line1", "-0.1", "--config", str(cfg)],
                              capture_output=True, text=True, timeout=60)
    assert negative.returncode == 2 and "[0, 1]" in negative.stderr and "No such option" not in negative.stderr
    for value in ("0.7", "clear"):
        done = subprocess.run([str(APPLIANCE), "threshold", "line1", value, "--config", str(cfg), "--who", "ann"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    details = [e["detail"] for e in events(d.db, "threshold_changed")]
    assert "set to 0.7 by ann" in details[0] and "cleared by ann" in details[1] and "None" not in details[1]
    text = subprocess.run([str(APPLIANCE), "status", "--config", str(cfg)], capture_output=True, text=True,
                          timeout=30).stdout
    assert "READY" in text and "None" not in text and "{" not in text
    assert d.stop() == 0

    (tmp_path / "other").mkdir()
    missing = write_config(tmp_path / "other" / "config.toml",
                           [camera("cam7", tmp_path / "nowhere", {"type": "replay", "path": str(folder)})])
    checked = subprocess.run([str(APPLIANCE), "config", "check", str(missing)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 2 and "cameras[0](cam7).bundle" in checked.stderr and "nowhere" in checked.stderr
    run = subprocess.run([str(APPLIANCE), "run", "--config", str(missing)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, NUMBA_CACHE_DIR=str(daemon_cache / "numba")))
    assert run.returncode == 2 and "camera cam7" in run.stderr and "nowhere" in run.stderr
