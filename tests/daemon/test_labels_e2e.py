"""Operator labels end to end with the real daemon: a PatchCore false reject learned at once, kept across a restart,
undone exactly; labels from the live page with a token; a kill -9 while labelling; a dataset export that fits."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from harness import APPLIANCE, Daemon, audit_rows, camera, free_port, sample_images, write_config

from appliance.errors import ApplianceError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def patchcore_bundle(tmp_path_factory: pytest.TempPathFactory, daemon_cache: Path) -> Path:
    """A PatchCore bundle fitted on the bundled ball-screw sample at 128 px, by the real CLI."""
    out = tmp_path_factory.mktemp("pc-bundle") / "patchcore"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(daemon_cache / "numba"))
    done = subprocess.run([str(APPLIANCE), "fit", str(Path(sample_images()[0]).parents[2]), "--out", str(out),
                           "--scorer", "patchcore", "--size", "128", "--cache-dir", str(daemon_cache / "openvino"),
                           "-q"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr + done.stdout
    return out


def goods() -> list[Path]:
    return [p for p in sample_images() if p.parent.name == "good"]


def drop(hot: Path, source: Path, name: str) -> None:
    """A file arrives in the hot folder (written elsewhere, then moved in: a complete file)."""
    tmp = hot.parent / f".{name}"
    shutil.copy(source, tmp)
    os.replace(tmp, hot / name)


def row_of(d: Daemon, name: str, timeout: float = 60) -> dict:
    d.wait_until(lambda: any(r["source"].endswith(name) for r in audit_rows(d.db)), timeout, f"the row of {name}")
    return next(r for r in audit_rows(d.db) if r["source"].endswith(name))


def cli(cfg: Path, *args: str) -> dict:
    done = subprocess.run([str(APPLIANCE), *args, "--config", str(cfg), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_false_reject_is_learned_at_once_kept_across_a_restart_and_undone_exactly(
        tmp_path, patchcore_bundle, daemon_cache, daemons):
    hot = tmp_path / "hot"
    hot.mkdir()
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", patchcore_bundle, {"type": "folder", "path": str(hot), "settle_s": 0.05})],
                       outputs=[{"type": "frames"}], cache=daemon_cache)
    d = Daemon(cfg)
    daemons.append(d)
    d.wait_ready()
    for i, image in enumerate(goods()):
        drop(hot, image, f"good{i:02d}{image.suffix}")
    d.wait_until(lambda: len(audit_rows(d.db)) == len(goods()), 120, "every good image scored")
    worst = max(audit_rows(d.db), key=lambda r: r["score"])
    image = goods()[int(Path(worst["source"]).stem[4:])]
    threshold = round(worst["score"] - 0.02, 3)  # this good part is now a false reject
    cli(cfg, "threshold", "line1", str(threshold))

    rejected = row_of(d, drop(hot, image, "fr1.jpg") or "fr1.jpg")
    assert rejected["verdict"] == "ng" and rejected["score"] == worst["score"] and rejected["frame"]
    result = cli(cfg, "label", rejected["id"], "good", "--who", "ann", "--note", "scratch-free, reflection")
    learned = result["learned"]
    assert result["kind"] == "false_reject" and learned["rows"] >= 1
    assert learned["score_after"] < threshold - 0.05 + 1e-6 and learned["score_before"] > threshold

    after = row_of(d, drop(hot, image, "fr2.jpg") or "fr2.jpg")
    assert after["verdict"] == "ok" and after["score"] == pytest.approx(learned["score_after"], abs=1e-4)
    assert after["bank_hash"] != rejected["bank_hash"]  # the bank changed, and every row says which one scored it

    assert d.stop() == 0
    d2 = Daemon(cfg)
    daemons.append(d2)
    d2.wait_ready()
    replayed = row_of(d2, drop(hot, image, "fr3.jpg") or "fr3.jpg")
    assert replayed["verdict"] == "ok" and replayed["score"] == after["score"]  # the delta was replayed
    assert replayed["bank_hash"] == after["bank_hash"]
    loaded = audit_rows(d2.db, "events", "kind = 'model_loaded'", "id")[-1]
    assert json.loads(loaded["data"])["learned_rows"] == learned["rows"]

    undone = cli(cfg, "label", result["label_id"], "--undo", "--who", "bob")
    assert undone["undone"] and undone["removed_rows"] == learned["rows"]
    back = row_of(d2, drop(hot, image, "fr4.jpg") or "fr4.jpg")
    assert back["verdict"] == "ng" and back["score"] == worst["score"]  # exactly the earlier score
    assert back["bank_hash"] == rejected["bank_hash"]
    labels = audit_rows(d2.db, "labels")
    assert len(labels) == 1 and labels[0]["who"] == "ann" and labels[0]["undone_by"] == "bob"
    assert labels[0]["note"] == "scratch-free, reflection" and labels[0]["frame"] == rejected["frame"]
    assert (d2.state / "frames" / labels[0]["frame"]).is_file()
    kinds = [e["kind"] for e in audit_rows(d2.db, "events", order="id")]
    assert "labelled" in kinds and "label_undone" in kinds
    assert d2.stop() == 0


def test_labels_from_the_page_need_a_token_and_padim_says_it_learns_at_the_rebuild(
        tmp_path, sample_bundle, daemon_cache, daemons):
    hot = tmp_path / "hot"
    hot.mkdir()
    port = free_port()
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", sample_bundle, {"type": "folder", "path": str(hot), "settle_s": 0.05})],
                       outputs=[{"type": "frames", "ok_per_hour": 360000},
                                {"type": "http", "port": port, "label_tokens": {"ann": "s3cret-token"}}],
                       cache=daemon_cache)
    d = Daemon(cfg)
    daemons.append(d)
    d.wait_ready()
    for i, image in enumerate(sample_images()):
        drop(hot, image, f"{i:02d}_{image.parent.name}{image.suffix}")
    d.wait_until(lambda: len(audit_rows(d.db)) == len(sample_images()), 120, "every image scored")
    rows = audit_rows(d.db)
    escape = next(r for r in rows if "pitting" in r["source"] and r["verdict"] == "ok")
    reject = next((r for r in rows if "good" in r["source"] and r["verdict"] == "ng"), None)

    def post(path: str, payload: dict, token: str | None) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    assert post(f"/api/inspections/{escape['id']}/label", {"label": "defect"}, None)[0] == 401
    assert post(f"/api/inspections/{escape['id']}/label", {"label": "defect"}, "wrong")[0] == 401
    code, answer = post(f"/api/inspections/{escape['id']}/label", {"label": "defect", "note": "pitting"},
                        "s3cret-token")
    assert code == 200 and answer["kind"] == "escape" and answer["frame"]
    assert post(f"/api/inspections/{escape['id']}/label", {"label": "maybe"}, "s3cret-token")[0] == 400
    if reject is not None:
        code, answer = post(f"/api/inspections/{reject['id']}/label", {"label": "good"}, "s3cret-token")
        assert code == 200 and "PaDiM learns at the next rebuild" in answer["note"]
    label = audit_rows(d.db, "labels", f"inspection_id = '{escape['id']}'")[0]
    assert label["who"] == "page:ann" and label["label"] == "defect" and label["verdict"] == "ok"
    code, answer = post(f"/api/labels/{label['id']}/undo", {}, "s3cret-token")
    assert code == 200 and answer["undone"]

    # the labelled and kept frames make a dataset that `appliance fit` takes as it is
    code, answer = post(f"/api/inspections/{escape['id']}/label", {"label": "defect"}, "s3cret-token")
    assert code == 200
    out = tmp_path / "dataset"
    done = subprocess.run([str(APPLIANCE), "dataset", "export", "--config", str(cfg), "--out", str(out),
                           "--camera", "line1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "test" / "defect" / f"{escape['id']}.jpg").is_file()
    manifest = json.loads((out / "dataset.json").read_text())
    assert {f["inspection_id"] for f in manifest["frames"] if f["label"] == "defect"} == {escape["id"]}
    assert not any(f["file"].startswith("train/") and f["label"] == "defect" for f in manifest["frames"])
    fitted = subprocess.run([str(APPLIANCE), "fit", str(out), "--out", str(tmp_path / "refit"), "--scorer", "padim",
                             "--size", "128", "--calibration-fraction", "0.3", "-q"], capture_output=True, text=True,
                            timeout=600,
                            env=dict(os.environ, NUMBA_CACHE_DIR=str(daemon_cache / "numba")))
    assert fitted.returncode == 0, fitted.stderr + fitted.stdout
    assert d.stop() == 0


def test_a_kill_9_while_labelling_leaves_labels_and_the_bank_delta_agreeing(tmp_path, patchcore_bundle,
                                                                            daemon_cache):
    rng = random.Random(4711)
    hot = tmp_path / "hot"
    hot.mkdir()
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", patchcore_bundle, {"type": "folder", "path": str(hot), "settle_s": 0.05})],
                       outputs=[{"type": "frames"}], cache=daemon_cache)
    images = goods()
    for cycle in range(5):
        d = Daemon(cfg)
        try:
            d.wait_ready()
            if cycle == 0:
                d.request({"cmd": "threshold", "camera": "line1", "value": 0.05})  # every part is a false reject
            name = f"c{cycle}.jpg"
            row = row_of(d, drop(hot, images[cycle], name) or name)

            def label(row: dict = row, d: Daemon = d) -> None:
                with contextlib.suppress(AssertionError, ApplianceError, OSError):  # killed before it answered
                    d.request({"cmd": "label", "inspection": row["id"], "label": "good", "who": "t"}, timeout=10)

            worker = threading.Thread(target=label)
            worker.start()
            time.sleep(rng.uniform(0.0, 0.25))
        finally:
            d.kill()
        worker.join(15)
        check = Daemon(cfg)  # starts: the delta loads (or is reconciled) and agrees with the labels
        try:
            check.wait_ready()
            model = json.loads((patchcore_bundle / "manifest.json").read_text())["model_id"]
            index = check.state / "learned" / "line1" / model / "index.json"
            stored = {e["id"] for e in json.loads(index.read_text())["entries"]} if index.exists() else set()
            standing = {r["id"] for r in audit_rows(check.db, "labels", "undone_at IS NULL")}
            assert stored == standing, (cycle, stored, standing)
        finally:
            check.kill()
