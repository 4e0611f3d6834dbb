"""The daemon's trainer output against a real trainer (``appliance trainer serve``): embedded and PostgreSQL + S3.

What the frame store kept reaches the trainer exactly once, with its audit metadata and its bytes;
labels and drift events follow; a trainer outage, a kill -9 of the trainer and of the daemon lose
nothing and double nothing; a rotated token makes uploads wait, not fail, until the token file is
replaced. The trainer's catalogue is read behind its back (``open_storage``) and compared with the
daemon's audit log (plain sqlite3) and the stored files' own sha256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from harness import APPLIANCE, Daemon, audit_rows, camera, replay_folder, sample_images, write_config

pytestmark = pytest.mark.slow
pytest.importorskip("fastapi", reason="the trainer comes with the trainer extra")

from trainer_process import Trainer, register, trainer_config  # noqa: E402


@pytest.fixture(params=["embedded", "fleet"])
def trainer(request: pytest.FixtureRequest, tmp_path: Path):
    """A running trainer of each storage kind; stopped at the end."""
    t = Trainer(trainer_config(request, tmp_path, request.param))
    yield t
    if t.proc is not None and t.proc.poll() is None:
        t.stop(signal.SIGKILL)


def uploader_config(tmp_path: Path, bundle: Path, source: dict, trainer: Trainer, token_file: Path,
                    cache: Path) -> Path:
    return write_config(tmp_path / "config.toml", [camera("line1", bundle, source)],
                        outputs=[{"type": "frames", "ok_per_hour": 1e9},  # every OK frame: one per 3.6 µs
                                 {"type": "trainer", "url": trainer.url, "token_file": str(token_file),
                                  "timeout_s": 5}],
                        cache=cache)


def settled(d: Daemon) -> bool:
    """Every trainer delivery decided (none pending)."""
    rows = audit_rows(d.db, "deliveries", "output = 'trainer'")
    return bool(rows) and all(r["status"] != "pending" for r in rows)


def kept_frames(d: Daemon, frames_dir: Path) -> dict[str, str]:
    """inspection id -> sha256 of the file the frame store kept (hashed here, not taken from a name)."""
    return {r["id"]: hashlib.sha256((frames_dir / r["frame"]).read_bytes()).hexdigest()
            for r in audit_rows(d.db) if r["frame"]}


def test_kept_frames_labels_reach_the_trainer_once_with_their_metadata(tmp_path, trainer, sample_bundle,
                                                                       daemon_cache, daemons):
    trainer.start()
    token = register(trainer, "edge-1", tmp_path)
    images = sample_images()
    source = {"type": "replay", "path": str(replay_folder(tmp_path / "replay", images)), "fps": 20}
    d = Daemon(uploader_config(tmp_path, sample_bundle, source, trainer, token, daemon_cache))
    daemons.append(d)
    d.wait_ready()
    d.wait_until(lambda: len(audit_rows(d.db)) == len(images), 120, "every image inspected")
    d.wait_until(lambda: settled(d), 120, "every trainer delivery decided")

    kept = kept_frames(d, tmp_path / "state" / "frames")
    assert len(kept) == len(images)  # ok_per_hour is unbounded: every frame kept
    frames = trainer.frames("edge-1")
    assert sorted(f.inspection_id for f in frames) == sorted(kept)  # each once
    audit = {r["id"]: r for r in audit_rows(d.db)}
    for f in frames:
        assert f.sha256 == kept[f.inspection_id]
        assert hashlib.sha256(trainer.blob(f.blob)).hexdigest() == f.sha256
        row = audit[f.inspection_id]
        assert (f.camera_id, f.verdict, f.score, f.threshold, f.model_id) == (
            row["camera"], row["verdict"], row["score"], row["threshold"], row["model_id"])
        assert f.reasons == (["reject"] if row["verdict"] == "ng" else ["sample"])
    delivered = audit_rows(d.db, "deliveries", "output = 'trainer'")
    assert {r["status"] for r in delivered} == {"sent"}

    # An operator label follows, with its frame; its undoing too (same id, undone_at set).
    target = next(r for r in audit.values() if r["verdict"] == "ng")
    done = subprocess.run([str(APPLIANCE), "label", target["id"], "good", "--who", "ann", "--config",
                           str(d.config), "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    d.wait_until(lambda: [lb.label for lb in trainer.labels("edge-1")] == ["good"], 60, "the label at the trainer")
    label = trainer.labels("edge-1")[0]
    assert (label.inspection_id, label.who, label.undone_at) == (target["id"], "ann", None)
    done = subprocess.run([str(APPLIANCE), "label", target["id"], "--undo", "--config", str(d.config), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    d.wait_until(lambda: trainer.labels("edge-1")[0].undone_at is not None, 60, "the undoing at the trainer")
    assert len(trainer.frames("edge-1")) == len(images)  # the label's frame was known already: not sent again
    assert d.stop() == 0
    assert trainer.stop() == 0


def drop(hot: Path, source: Path, name: str) -> None:
    tmp = hot.parent / f".{name}"
    shutil.copy(source, tmp)
    os.replace(tmp, hot / name)


@pytest.fixture
def embedded_trainer(tmp_path: Path):
    """An embedded trainer, not started; killed at the end whatever happened."""
    t = Trainer(trainer_config(None, tmp_path, "embedded"))
    yield t
    if t.proc is not None and t.proc.poll() is None:
        t.stop(signal.SIGKILL)


def test_outage_kill_9_and_a_rotated_token_lose_nothing_and_double_nothing(tmp_path, sample_bundle, daemon_cache,
                                                                          daemons, embedded_trainer):
    trainer = embedded_trainer
    token = register(trainer, "edge-2", tmp_path)  # registered, but the trainer is not running yet
    hot = tmp_path / "hot"
    hot.mkdir()
    cfg = uploader_config(tmp_path, sample_bundle, {"type": "folder", "path": str(hot), "settle_s": 0.05}, trainer,
                          token, daemon_cache)
    d = Daemon(cfg)
    daemons.append(d)
    d.wait_ready()
    images = sample_images()
    count = 0

    def feed(n: int) -> None:
        nonlocal count
        for _ in range(n):
            drop(hot, images[count % len(images)], f"f{count:04d}{images[count % len(images)].suffix}")
            count += 1

    # 1. The trainer is down: everything waits in the outbox.
    feed(12)
    d.wait_until(lambda: len(audit_rows(d.db)) == 12, 120, "12 inspected")
    time.sleep(2)
    assert {r["status"] for r in audit_rows(d.db, "deliveries", "output = 'trainer'")} == {"pending"}
    assert d.status()["outputs"]["trainer"]["state"] == "disconnected"

    # 2. It comes up: the backlog drains.
    trainer.start()
    d.wait_until(lambda: settled(d), 120, "the backlog delivered")
    deliveries = audit_rows(d.db, "deliveries", "output IN ('trainer', 'frames')")
    assert len(trainer.frames("edge-2")) == 12, deliveries

    # 3. kill -9 of the trainer, then of the daemon, with frames arriving; both come back.
    feed(10)
    time.sleep(0.5)
    trainer.stop(signal.SIGKILL)
    feed(10)
    time.sleep(1.0)
    d.kill()
    d2 = Daemon(cfg)
    daemons.append(d2)
    d2.wait_ready()
    feed(6)
    d2.wait_until(lambda: len(audit_rows(d2.db)) == count, 120, f"all {count} inspected")
    trainer.start()
    d2.wait_until(lambda: settled(d2), 180, "everything delivered after both kills")
    kept = kept_frames(d2, tmp_path / "state" / "frames")
    frames = trainer.frames("edge-2")
    ids = [f.inspection_id for f in frames]
    assert len(ids) == len(set(ids))  # nothing twice
    assert sorted(ids) == sorted(kept)  # nothing lost: every kept frame, and only those
    # A frame the kill -9 caught before the frame store wrote it is not kept (the store says so):
    # its trainer delivery is skipped with that reason, and that is the only reason for a skip.
    deliveries = audit_rows(d2.db, "deliveries", "output = 'trainer'")
    assert {r["status"] for r in deliveries} <= {"sent", "skipped"}
    assert sorted(r["inspection_id"] for r in deliveries if r["status"] == "sent") == sorted(kept)
    assert all(r["inspection_id"] not in kept for r in deliveries if r["status"] == "skipped")

    # 4. The token is rotated: uploads wait (nothing marked failed) until the token file is replaced.
    new_token = trainer.cli("rotate-token", "edge-2").splitlines()[0].strip()
    feed(4)
    d2.wait_until(lambda: len(audit_rows(d2.db)) == count, 60, "4 more inspected")
    d2.wait_until(lambda: "401" in (d2.status()["outputs"]["trainer"]["last_error"] or ""), 60,
                  "the refused token reported")
    statuses = [r["status"] for r in audit_rows(d2.db, "deliveries", "output = 'trainer'")]
    assert "failed" not in statuses and statuses.count("pending") == 4
    token.write_text(new_token + "\n")
    d2.wait_until(lambda: settled(d2), 120, "delivered with the new token")
    assert len(trainer.frames("edge-2")) == count
    assert d2.stop() == 0
    assert trainer.stop() == 0
