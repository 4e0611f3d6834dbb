"""Dataset versions from production frames on both storages: reproducible draws, labels, the outlier rule, the
window, and an export that ``appliance fit`` takes as it is.

(Named apart from ``tests/test_datasets.py``: test modules share one namespace here.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli import SAMPLE_DIR, app
from appliance.trainer.datasets import create_version, draw, export, in_eval, select
from appliance.trainer.records import DatasetRule, FrameMeta, Label
from appliance.trainer.service import frame_key
from appliance.trainer.storage.base import Storage

APP, CAM = "line-1", "cam-1"
T0 = 1_790_000_000.0


def sample_images(split: str) -> list[Path]:
    """The bundled ball-screw sample's images of ``split`` (``train/good``, ``test/good``, ``test/pitting``)."""
    return sorted((SAMPLE_DIR / split).glob("*.jpg"))


def upload(storage: Storage, path: Path, inspection_id: str, captured_at: float, verdict: str = "ok",
           score: float | None = 0.1, threshold: float | None = 0.5, model_id: str | None = "running-1",
           camera_id: str = CAM) -> None:
    """Put a frame into the blob store and the catalogue as an appliance's upload would."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    key = frame_key(APP, camera_id, sha, path.suffix.lower())
    storage.blobs.put(key, data)
    meta = FrameMeta(camera_id=camera_id, inspection_id=inspection_id, sha256=sha, suffix=path.suffix.lower(),
                     size=len(data), captured_at=captured_at, verdict=verdict, score=score, threshold=threshold,
                     model_id=model_id, reasons=["sample" if verdict == "ok" else "reject"])
    storage.catalogue.add_frame(APP, meta, key, captured_at + 1)


def label(storage: Storage, inspection_id: str, value: str, at: float, undone_at: float | None = None,
          label_id: str | None = None) -> None:
    """An operator's label (or its undoing), as the appliance sends it."""
    storage.catalogue.upsert_label(APP, Label(id=label_id or f"label-{inspection_id}-{at}", camera_id=CAM,
                                              inspection_id=inspection_id, label=value, who="test", at=at,
                                              undone_at=undone_at))


def splits(members: list) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"train": set(), "eval_good": set(), "eval_defect": set()}
    for m in members:
        out[m.split].add(m.inspection_id)
    return out


@pytest.fixture
def store(storage: Storage) -> Storage:
    """The ``storage`` fixture (embedded and fleet) with the appliance registered."""
    storage.catalogue.add_appliance(APP)
    return storage


def test_the_same_frames_and_labels_give_the_same_version(store: Storage) -> None:
    cat = store.catalogue
    for i, path in enumerate(sample_images("train/good")[:30]):
        upload(store, path, f"insp-{i:03d}", T0 + i)
    rule = DatasetRule(until=T0 + 100, eval_share=0.3)
    first = create_version(cat, APP, CAM, rule, at=T0 + 100)
    assert first.version == 1 and sum(first.counts.values()) == 30
    assert draw(cat, APP, CAM, rule) == cat.dataset_members(first.id)
    # drawn again later, with a later end: the same members, so the same version
    again = create_version(cat, APP, CAM, rule.model_copy(update={"until": T0 + 200}), at=T0 + 200)
    assert (again.id, again.version, again.digest) == (first.id, 1, first.digest)
    # a label given after the rule's end does not change the draw at that end
    label(store, "insp-005", "defect", at=T0 + 150)
    assert draw(cat, APP, CAM, rule) == cat.dataset_members(first.id)

    # a new frame: a new version, and no older frame changes its split
    upload(store, sample_images("train/good")[30], "insp-030", T0 + 160)
    second = create_version(cat, APP, CAM, rule.model_copy(update={"until": T0 + 200}), at=T0 + 200)
    assert second.version == 2 and second.digest != first.digest
    before = {m.inspection_id: m.split for m in cat.dataset_members(first.id)}
    after = {m.inspection_id: m.split for m in cat.dataset_members(second.id)}
    assert after.pop("insp-005") == "eval_defect"  # the label now counts
    assert all(after[i] == s for i, s in before.items() if i in after)
    assert "insp-030" in after


def test_a_frame_labelled_defect_is_never_a_good_one(store: Storage) -> None:
    images = sample_images("train/good")
    for i in range(20):
        upload(store, images[i], f"ok-{i:02d}", T0 + i)
    upload(store, sample_images("test/pitting")[0], "ng-unlabelled", T0 + 30, verdict="ng", score=0.9)
    upload(store, sample_images("test/good")[0], "ng-but-good", T0 + 31, verdict="ng", score=0.7)
    upload(store, sample_images("test/pitting")[1], "ng-error", T0 + 32, verdict="error", score=None)
    label(store, "ok-03", "defect", at=T0 + 40)  # an escape an operator caught
    label(store, "ok-04", "defect", at=T0 + 41, undone_at=T0 + 42)  # undone before the end: good again
    label(store, "ok-05", "good", at=T0 + 43)
    label(store, "ok-05", "defect", at=T0 + 44)  # the newer label wins
    label(store, "ng-but-good", "good", at=T0 + 45)  # a false reject
    rule = DatasetRule(until=T0 + 100, eval_share=0.5)
    got = splits(draw(store.catalogue, APP, CAM, rule))
    assert got["eval_defect"] == {"ok-03", "ok-05"}
    good = got["train"] | got["eval_good"]
    assert not good & got["eval_defect"]
    assert {"ok-04", "ng-but-good"} <= good
    assert "ng-unlabelled" not in good | got["eval_defect"] and "ng-error" not in good
    assert got["eval_good"] == {i for i in good if in_eval(i, 0.5)} and got["eval_good"]  # the hash rule
    # at an end before the labels, every ok frame was good
    early = splits(draw(store.catalogue, APP, CAM, rule.model_copy(update={"until": T0 + 35})))
    assert early["eval_defect"] == set() and {"ok-03", "ok-05"} <= early["train"] | early["eval_good"]


def test_the_outlier_rule_drops_the_stated_frames(store: Storage) -> None:
    images = sample_images("train/good")
    for i in range(20):  # recorded scores 0.00, 0.02, ..., 0.38
        upload(store, images[i], f"ok-{i:02d}", T0 + i, score=0.02 * i)
    upload(store, images[20], "unscored", T0 + 20, score=None)
    upload(store, images[21], "false-reject", T0 + 21, verdict="ng", score=0.9)
    label(store, "false-reject", "good", at=T0 + 30)
    rule = DatasetRule(until=T0 + 100, outlier_quantile=0.9, eval_share=0.3)
    kept = {m.inspection_id for m in draw(store.catalogue, APP, CAM, rule)}
    # the 0.9 quantile of the unlabelled ok frames' scores is 0.342: the frames scoring 0.36 and 0.38 go,
    # the labelled false reject (0.9) and the frame without a score stay
    assert {f"ok-{i:02d}" for i in range(20)} - kept == {"ok-18", "ok-19"}
    assert {"false-reject", "unscored"} <= kept
    everything = {m.inspection_id for m in draw(store.catalogue, APP, CAM, rule.model_copy(
        update={"outlier_quantile": 1.0}))}
    assert len(everything) == 22
    # the newest max_good, then the rule
    newest = {m.inspection_id for m in draw(store.catalogue, APP, CAM, rule.model_copy(
        update={"max_good": 5, "outlier_quantile": 1.0}))}
    assert newest == {"false-reject", "unscored", "ok-19", "ok-18", "ok-17"}


def test_ok_frames_come_from_the_window_and_labelled_ones_from_any_time(store: Storage) -> None:
    images = sample_images("train/good")
    upload(store, images[0], "old-ok", T0)
    upload(store, images[1], "old-good", T0 + 1)
    upload(store, images[2], "old-defect", T0 + 2)
    upload(store, images[3], "recent-ok", T0 + 50)
    upload(store, images[4], "after-the-end", T0 + 200)
    label(store, "old-good", "good", at=T0 + 60)
    label(store, "old-defect", "defect", at=T0 + 60)
    members = select(store.catalogue.frames(APP, CAM), store.catalogue.labels(APP, CAM, active_only=False),
                     DatasetRule(since=T0 + 10, until=T0 + 100))
    assert {m.inspection_id: m.split for m in members}.keys() == {"old-good", "old-defect", "recent-ok"}


def test_the_export_is_an_mvtec_folder_that_appliance_fit_takes(store: Storage, tmp_path: Path) -> None:
    sources: dict[str, Path] = {}
    for i, path in enumerate(sample_images("train/good")[:40] + sample_images("test/good")[:10]):
        sources[f"ok-{i:02d}"] = path
        upload(store, path, f"ok-{i:02d}", T0 + i)
    for i, path in enumerate(sample_images("test/pitting")[:4]):
        sources[f"pit-{i}"] = path
        upload(store, path, f"pit-{i}", T0 + 60 + i, verdict="ng", score=0.8)
        label(store, f"pit-{i}", "defect", at=T0 + 70)
    dataset = create_version(store.catalogue, APP, CAM, DatasetRule(until=T0 + 100, eval_share=0.25), at=T0 + 100)
    folder = export(store, dataset.id, tmp_path / "data")

    found = {sub: sorted(p.name for p in (folder / sub).glob("*")) for sub in
             ("train/good", "validation/good", "test/good", "test/defect")}
    assert len(found["train/good"]) == dataset.counts["train"]
    assert found["validation/good"] == []  # the fit calibrates on train frames it holds out, never on test/
    assert len(found["test/good"]) == dataset.counts["eval_good"]
    assert not set(found["train/good"]) & set(found["test/good"])
    assert found["test/defect"] == [f"pit-{i}.jpg" for i in range(4)]
    assert (folder / "test/defect/pit-2.jpg").read_bytes() == sources["pit-2"].read_bytes()
    lineage = json.loads((folder / "dataset.json").read_text())
    assert (lineage["dataset_id"], lineage["version"], lineage["digest"]) == (dataset.id, 1, dataset.digest)
    assert lineage["rule"]["eval_share"] == 0.25 and len(lineage["members"]) == 54
    assert {m["inspection_id"]: m["files"] for m in lineage["members"]}["pit-0"] == ["test/defect/pit-0.jpg"]

    result = CliRunner().invoke(app, ["fit", str(folder), "--out", str(tmp_path / "bundle"), "--scorer", "padim",
                                      "--size", "128", "-q"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    images = manifest["training"]["images"]
    assert images["train"] + images["calibration_good"] == dataset.counts["train"] and images["calibration_good"] >= 1
    with pytest.raises(Exception, match="not empty"):
        export(store, dataset.id, folder)


def test_after_an_accepted_drift_the_new_normal_is_good_whatever_the_old_model_said(store: Storage) -> None:
    images = sample_images("train/good")
    for i in range(10):  # before the drift: the old model's ok frames are the good ones, its rejects are not
        upload(store, images[i], f"before-{i}", T0 + i, verdict="ng" if i == 9 else "ok", score=0.01 * i)
    for i in range(10):  # after it: the old model scores everything high and rejects most of it
        upload(store, images[10 + i], f"after-{i}", T0 + 100 + i, verdict="ng" if i < 8 else "ok",
               score=0.6 + 0.04 * i)
    upload(store, images[20], "pitted", T0 + 120, verdict="ng", score=0.99)
    label(store, "pitted", "defect", at=T0 + 130)
    rule = DatasetRule(until=T0 + 200, outlier_quantile=1.0, eval_share=0.0)
    plain = splits(draw(store.catalogue, APP, CAM, rule))
    assert plain["train"] == {f"before-{i}" for i in range(9)} | {"after-8", "after-9"}
    accepted = splits(draw(store.catalogue, APP, CAM, rule.model_copy(update={"normal_since": T0 + 100})))
    assert accepted["train"] == {f"before-{i}" for i in range(9)} | {f"after-{i}" for i in range(10)}
    assert accepted["eval_defect"] == {"pitted"}  # a confirmed defect stays one in the new normal
    # Curation judges each side among its own scores: the old model's high scores of the new normal do not
    # push it out as outliers of the old normal, and the top of each side goes. The 0.85 quantiles (linear):
    # before 0.00..0.08 -> 0.068 (0.07 and 0.08 go); after 0.60..0.96 -> 0.906 (0.92 and 0.96 go).
    curated = splits(draw(store.catalogue, APP, CAM, rule.model_copy(
        update={"normal_since": T0 + 100, "outlier_quantile": 0.85})))
    assert ({f"before-{i}" for i in range(9)} | {f"after-{i}" for i in range(10)}) - curated["train"] == {
        "before-7", "before-8", "after-8", "after-9"}
