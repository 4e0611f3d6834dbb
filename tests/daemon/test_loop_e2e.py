"""The learning loop end to end on loopback: two daemons (replay sources), one trainer with a rebuild worker.

Appliance ``edge-a`` sees its line brighten: the drift watch raises, the trainer opens a rebuild job that
waits for approval (the default policy), an operator's defect labels arrive, and only ``appliance trainer
approve`` lets the job run. The job draws a dataset version from ``edge-a``'s frames and labels alone,
fits, and the gate publishes the model or refuses it, with the figures that decided kept. ``edge-b``
uploads alongside and gets no job. Once on the embedded store, once on PostgreSQL + S3.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from harness import APPLIANCE, Daemon, audit_rows, camera, good_test_images, sample_images, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
pytest.importorskip("fastapi", reason="the trainer comes with the trainer extra")

from trainer_process import Trainer, register, trainer_config  # noqa: E402

from appliance.trainer.client import TrainerClient  # noqa: E402

DRIFT = {"cadence_s": 3.0, "min_frames": 50, "raise_after": 2, "clear_after": 2}
DEFECTS_LABELLED = 8


@pytest.fixture(params=["embedded", "fleet"])
def trainer(request: pytest.FixtureRequest, tmp_path: Path):
    """A trainer of each storage kind with one in-process rebuild worker, fitting PaDiM at 128 px (seconds)."""
    t = Trainer(trainer_config(request, tmp_path, request.param, rebuild={"size": "128"}), workers=1)
    yield t
    if t.proc is not None and t.proc.poll() is None:
        t.stop(signal.SIGKILL)


def line_that_brightens(folder: Path) -> None:
    """140 frames as calibrated, then the same parts 25 % brighter with 20 pitted ones among them."""
    folder.mkdir(parents=True)
    normal = sample_images("train") + good_test_images()
    pitted = [p for p in sample_images() if p.parent.name == "pitting"]
    later = list(normal)
    for i, image in enumerate(pitted):
        later.insert(7 * (i + 1), image)
    for i, image in enumerate(normal):
        (folder / f"{i:05d}_{image.name}").write_bytes(image.read_bytes())
    for i, image in enumerate(later, start=len(normal)):
        bgr = cv2.imread(str(image)).astype(np.float32) * 1.25
        assert cv2.imwrite(str(folder / f"{i:05d}_{image.stem}.png"), np.clip(bgr, 0, 255).astype(np.uint8))


def appliance_config(folder: Path, bundle: Path, images: Path, trainer: Trainer, token: Path, cache: Path,
                     **sections) -> Path:
    return write_config(folder / "config.toml", [camera("line1", bundle, {"type": "replay", "path": str(images),
                                                                          "fps": 25})],
                        outputs=[{"type": "frames", "ok_per_hour": 1e6},
                                 {"type": "trainer", "url": trainer.url, "token_file": str(token), "timeout_s": 10}],
                        cache=cache, **sections)


def replayed(d: Daemon, count: int) -> bool:
    """Every file of the replay inspected, or dropped as a free-running camera drops frames (audited)."""
    return len(audit_rows(d.db)) + len(audit_rows(d.db, "events", "kind = 'frame_dropped'")) == count


def settled(d: Daemon) -> bool:
    rows = audit_rows(d.db, "deliveries", "output = 'trainer'")
    return len(rows) == len(audit_rows(d.db)) and all(r["status"] != "pending" for r in rows)


def label(d: Daemon, inspection: str, verdict: str) -> None:
    done = subprocess.run([str(APPLIANCE), "label", inspection, verdict, "--who", "qa", "--config", str(d.config),
                           "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_drift_waits_for_approval_then_a_rebuild_from_its_own_dataset_passes_the_gate_or_is_refused(
        tmp_path, trainer, drift_bundle, sample_bundle, daemon_cache, daemons):
    trainer.start()
    a_dir, b_dir = tmp_path / "edge-a", tmp_path / "edge-b"
    line_that_brightens(tmp_path / "line-a")
    a = Daemon(appliance_config(a_dir, drift_bundle, tmp_path / "line-a", trainer, register(trainer, "edge-a", a_dir),
                                daemon_cache, drift=DRIFT))
    daemons.append(a)
    b_images = sample_images()
    b_replay = tmp_path / "line-b"
    b_replay.mkdir()
    for i, image in enumerate(b_images):
        (b_replay / f"{i:04d}_{image.name}").write_bytes(image.read_bytes())
    b_token = register(trainer, "edge-b", b_dir)
    b = Daemon(appliance_config(b_dir, sample_bundle, b_replay, trainer, b_token, daemon_cache))
    daemons.append(b)
    a.wait_ready()
    b.wait_ready()
    a_count = len(list((tmp_path / "line-a").iterdir()))
    a.wait_until(lambda: replayed(a, a_count), 180, "edge-a inspected its line")
    b.wait_until(lambda: replayed(b, len(b_images)), 120, "edge-b inspected its line")
    assert [r["kind"] for r in audit_rows(a.db, "events", "kind = 'drift_raised'")], "edge-a's drift raised"

    # The drift reached the trainer as a job that waits for a person.
    def drift_jobs() -> list:
        return trainer.read("jobs", appliance_id="edge-a")

    a.wait_until(lambda: drift_jobs(), 60, "the drift's rebuild job")
    (job,) = drift_jobs()
    assert (job.camera_id, job.reason, job.status) == ("line1", "drift", "awaiting_approval")

    # Operators confirm pitted parts as defects on edge-a, and a reject on edge-b as good.
    audit_a = audit_rows(a.db)
    pitted = [r["id"] for r in audit_a if "crop" in Path(r["source"]).name and r["verdict"] == "ng"]
    pitted += [r["id"] for r in audit_a if "crop" in Path(r["source"]).name and r["verdict"] != "ng"]
    defects = pitted[:DEFECTS_LABELLED]
    assert len(defects) == DEFECTS_LABELLED
    for inspection in defects:
        label(a, inspection, "defect")
    b_reject = next(r["id"] for r in audit_rows(b.db) if r["verdict"] == "ng")
    label(b, b_reject, "good")
    a.wait_until(lambda: len(trainer.labels("edge-a")) == DEFECTS_LABELLED, 60, "edge-a's labels at the trainer")
    b.wait_until(lambda: len(trainer.labels("edge-b")) == 1, 60, "edge-b's label at the trainer")
    a.wait_until(lambda: settled(a), 180, "edge-a's frames delivered")
    b.wait_until(lambda: settled(b), 120, "edge-b's frames delivered")

    # Approval holds the job: nothing is built until a person approves.
    time.sleep(3)
    assert trainer.read("job", job.id).status == "awaiting_approval"
    assert trainer.read("models", "edge-a") == [] and trainer.read("datasets", "edge-a") == []
    trainer.cli("approve", str(job.id), "--who", "qa-lead")
    deadline = time.monotonic() + 600
    while (job := trainer.read("job", job.id)).status in ("queued", "running"):
        assert time.monotonic() < deadline, trainer.log_path.read_text()[-3000:]
        time.sleep(1)
    assert job.status in ("succeeded", "refused"), (job, trainer.log_path.read_text()[-3000:])
    assert job.approved_by == "qa-lead" and job.dataset_id is not None and job.model_id is not None

    # Lineage: the model names the dataset version, drawn from edge-a's line1 alone.
    dataset = trainer.read("dataset", job.dataset_id)
    assert (dataset.appliance_id, dataset.camera_id) == ("edge-a", "line1")
    members = trainer.read("dataset_members", job.dataset_id)
    split: dict[str, set[str]] = {}
    for m in members:
        split.setdefault(m.split, set()).add(m.inspection_id)
    assert {k: len(v) for k, v in split.items()} == {k: v for k, v in dataset.counts.items() if v}
    assert set().union(*split.values()) <= {r["id"] for r in audit_a}  # nothing of edge-b's
    assert split["eval_defect"] == set(defects)  # the confirmed defects are the gate's defect set, only they
    assert not (split["train"] & split["eval_good"]) and not (set(defects) & split["train"])
    # The approved drift made the brightened frames the new normal, though the running model rejected most.
    raised_at = audit_rows(a.db, "events", "kind = 'drift_raised'")[0]["at"]
    rejected_later = {r["id"] for r in audit_a if r["verdict"] == "ng" and r["captured_at"] >= raised_at} - set(defects)
    learned = rejected_later & (split["train"] | split["eval_good"])
    assert len(learned) >= 0.9 * len(rejected_later) > 0  # all but the curation's top 1 % (and unlabelled pits)
    listed = json.loads(trainer.cli("datasets", "--appliance", "edge-a", "--json"))
    assert [(d["id"], d["counts"]) for d in listed] == [(dataset.id, dataset.counts)]
    trainer.cli("export", str(dataset.id), str(tmp_path / "export"))  # what a person refits from elsewhere
    exported = {sub: len(list((tmp_path / "export" / sub).glob("*"))) for sub in ("train/good", "test/good",
                                                                                  "test/defect")}
    assert exported == {"train/good": dataset.counts["train"], "test/good": dataset.counts["eval_good"],
                        "test/defect": dataset.counts["eval_defect"]}
    (model,) = trainer.read("models", "edge-a")
    assert (model.id, model.dataset_id, model.job_id) == (job.model_id, dataset.id, job.id)
    assert model.status == ("published" if job.status == "succeeded" else "refused")

    # The gate's figures are kept, for both models, on that dataset.
    (evaluation,) = trainer.read("evaluations", model.id)
    running_model = json.loads((drift_bundle / "manifest.json").read_text())["model_id"]
    assert (evaluation.dataset_id, evaluation.baseline_model_id) == (dataset.id, running_model)
    assert evaluation.passed == (job.status == "succeeded")
    metrics = evaluation.metrics
    assert metrics["golden"]["passed"]
    assert metrics["running"]["scores_from"] == "appliance"  # the trainer never had edge-a's bundle
    for who in ("candidate", "running"):
        assert metrics[who]["auroc"] is not None and metrics[who]["false_reject_rate"] is not None
    assert set(metrics["checks"]) == {"false_reject_rate", "auroc", "escape_rate"}
    assert evaluation.passed == all(c["passed"] for c in metrics["checks"].values())
    if not evaluation.passed:
        assert metrics["reasons"] and all(r in job.detail for r in metrics["reasons"])

    # What an appliance is offered: edge-a its published model, edge-b nothing of edge-a's.
    offered_a = TrainerClient(trainer.url, (a_dir / "trainer.token").read_text().strip()).models()
    assert [m.id for m in offered_a] == ([model.id] if model.status == "published" else [])
    assert TrainerClient(trainer.url, b_token.read_text().strip()).models() == []
    assert trainer.read("jobs", appliance_id="edge-b") == []
    assert {f.inspection_id for f in trainer.frames("edge-b")} == {r["id"] for r in audit_rows(b.db)}
    assert a.stop() == 0 and b.stop() == 0
    assert trainer.stop() == 0
