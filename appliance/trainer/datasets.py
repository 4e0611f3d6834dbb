"""Dataset versions drawn from production frames, and their export as an MVTec folder that ``appliance fit`` takes.

A version is a pure function of the rule and of the frames and labels the catalogue holds up to
``rule.until``: drawing again later gives the same members (labels given or undone after ``until`` do not
count), and the catalogue keeps one version per distinct member set (``add_dataset`` dedupes by digest).

The rule, in order:

1. Labels in force at ``until``: each inspection's newest label given before ``until`` and not undone by then.
2. Good frames: frames labelled good (captured before ``until``), plus frames whose verdict was ``ok`` captured
   in ``[since, until)`` and not labelled defect; the newest ``max_good`` of them are kept. After an accepted
   drift (``normal_since``, set by a drift rebuild that a person approved or the camera's ``auto`` policy
   allowed), every frame captured from ``normal_since`` on counts as good whatever the running model said,
   unless labelled defect: the old model rejects the new normal, which is what the rebuild must learn.
3. Curation: of the unlabelled frames, those whose recorded score (the model that was running when the
   frame was captured) is above the ``outlier_quantile`` of their scores are dropped: an ``ok`` near the
   threshold may be an unnoticed defect. The new normal's frames are judged among themselves (the old
   model's scores of them are shifted as a whole), the others among themselves. A frame an operator
   labelled good is never dropped: it is often a false reject the model should learn.
4. Splits: ``eval_defect`` = frames labelled defect (captured before ``until``); ``eval_good`` = the good frames
   whose inspection id hashes below ``eval_share`` (so new frames never move an old frame between splits);
   ``train`` = the other good frames. A frame labelled defect is never a good one.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import DatasetError
from .records import Dataset, DatasetMember, DatasetRule, Frame, Label
from .storage.base import Catalogue, Storage

#: MVTec folders of each split. The fit calibrates its threshold on a share of ``train/good`` it holds out
#: itself, never on ``test/``: the gate's false-reject rate is then measured on frames the candidate never saw.
FOLDERS = {"train": ("train/good",), "eval_good": ("test/good",), "eval_defect": ("test/defect",)}
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")


def labels_at(labels: Iterable[Label], until: float) -> dict[str, str]:
    """Each inspection's label in force at ``until``: its newest label given before then and not undone by then.

    Undoing a label brings back the one it replaced, as on the appliance.
    """
    newest: dict[str, Label] = {}
    for label in labels:
        if label.at >= until or (label.undone_at is not None and label.undone_at < until):
            continue
        held = newest.get(label.inspection_id)
        if held is None or (label.at, label.id) > (held.at, held.id):
            newest[label.inspection_id] = label
    return {i: label.label for i, label in newest.items()}


def in_eval(inspection_id: str, share: float) -> bool:
    """Whether a good frame is held out: its inspection id's hash, as a fraction of 2**64, is below ``share``."""
    digest = hashlib.sha256(inspection_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


def select(frames: Iterable[Frame], labels: Iterable[Label], rule: DatasetRule) -> list[DatasetMember]:
    """The members of a dataset version (sorted by split, then inspection id); pure."""
    state = labels_at(labels, rule.until)
    since = float("-inf") if rule.since is None else rule.since
    normal = float("inf") if rule.normal_since is None else max(rule.normal_since, since)
    good: list[Frame] = []
    defect: list[Frame] = []
    for f in frames:
        if f.captured_at >= rule.until:
            continue
        label = state.get(f.inspection_id)
        if label == "defect":
            defect.append(f)
        elif label == "good" or (f.verdict == "ok" and f.captured_at >= since) or f.captured_at >= normal:
            good.append(f)
    good.sort(key=lambda f: (-f.captured_at, f.inspection_id))
    good = good[: rule.max_good]
    new = [f for f in good if f.captured_at >= normal]
    old = [f for f in good if f.captured_at < normal]
    kept = {f.inspection_id for group in (new, old) for f in _drop_outliers(group, state, rule.outlier_quantile)}
    good = [f for f in good if f.inspection_id in kept]
    members = [DatasetMember(frame=f.blob, inspection_id=f.inspection_id,
                             split="eval_good" if in_eval(f.inspection_id, rule.eval_share) else "train")
               for f in good]
    members += [DatasetMember(frame=f.blob, inspection_id=f.inspection_id, split="eval_defect") for f in defect]
    return sorted(members, key=lambda m: (m.split, m.inspection_id))


def _drop_outliers(good: list[Frame], state: dict[str, str], quantile: float) -> list[Frame]:
    """``good`` without the unlabelled frames scoring above the ``quantile`` of the unlabelled frames' scores."""
    scored = [f.score for f in good if f.inspection_id not in state and f.score is not None]
    if quantile >= 1 or not scored:
        return good
    limit = float(np.quantile(np.asarray(scored, np.float64), quantile))
    return [f for f in good if f.inspection_id in state or f.score is None or f.score <= limit]


def draw(catalogue: Catalogue, appliance_id: str, camera_id: str, rule: DatasetRule) -> list[DatasetMember]:
    """The members the rule draws from the camera's frames and labels in the catalogue (see ``select``)."""
    frames = catalogue.frames(appliance_id, camera_id, until=rule.until)
    labels = catalogue.labels(appliance_id, camera_id, active_only=False)
    return select(frames, labels, rule)


def create_version(catalogue: Catalogue, appliance_id: str, camera_id: str, rule: DatasetRule,
                   at: float | None = None) -> Dataset:
    """Draw and store a dataset version (the newest one again if nothing changed)."""
    members = draw(catalogue, appliance_id, camera_id, rule)
    return catalogue.add_dataset(appliance_id, camera_id, rule, members, time.time() if at is None else at)


def member_file(member: DatasetMember, folder: str) -> str:
    """A member's file in the export: ``<folder>/<inspection id><suffix of its blob>``."""
    if not _FILE_NAME.match(member.inspection_id):
        raise DatasetError(f"inspection id {member.inspection_id!r} cannot be a file name; the export refuses it")
    return f"{folder}/{member.inspection_id}{PurePosixPath(member.frame).suffix.lower()}"


def export(storage: Storage, dataset_id: int, folder: str | Path) -> Path:
    """Write a dataset version as an MVTec folder (frames fetched from the blob store) with ``dataset.json``.

    Layout: ``train/good`` (train), ``test/good`` (eval_good), ``test/defect``
    (eval_defect). ``dataset.json`` holds the lineage: id, version, digest, rule and each member's file.

    Raises:
        DatasetError: no such version, or ``folder`` exists and is not empty.
        KeyError: a member's bytes are not in the blob store (yet).

    """
    dataset = storage.catalogue.dataset(dataset_id)
    if dataset is None:
        raise DatasetError(f"no dataset version {dataset_id}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise DatasetError(f"{folder}: not empty; export a dataset into a new folder")
    records = []
    for member in storage.catalogue.dataset_members(dataset_id):
        files = [member_file(member, sub) for sub in FOLDERS[member.split]]
        first = folder / files[0]
        first.parent.mkdir(parents=True, exist_ok=True)
        storage.blobs.download(member.frame, first)
        for extra in files[1:]:
            (folder / extra).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(first, folder / extra)
        records.append({**member.model_dump(), "files": files})
    (folder / "dataset.json").write_text(json.dumps(lineage(dataset, records), indent=1) + "\n")
    return folder


def lineage(dataset: Dataset, members: list[dict]) -> dict:
    """What ``dataset.json`` records: where the folder came from, enough to draw it again and check it."""
    return {"dataset_id": dataset.id, "appliance_id": dataset.appliance_id, "camera_id": dataset.camera_id,
            "version": dataset.version, "digest": dataset.digest, "rule": dataset.rule.model_dump(),
            "counts": dataset.counts, "created_at": dataset.created_at, "members": members}
