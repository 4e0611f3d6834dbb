"""``appliance dataset export``: a slice of the frame store as an MVTec-layout folder that ``appliance fit`` takes.

Reads the audit log (read-only: it runs beside the daemon) and copies stored frames, chosen by
camera, time window, label and verdict, into::

    <out>/train/good/       good frames: labelled good, or OK and not labelled defect
    <out>/test/good/        every ``holdout``-th good frame, held out so `appliance eval` has good images
    <out>/test/defect/      frames labelled defect (confirmed defects and escapes)
    <out>/test/unknown/     NG frames nobody labelled (fit ignores them; eval reports them apart)
    <out>/dataset.json      what was exported: the filters, each file's inspection, label, verdict, sha256

File names are ``<inspection id><suffix>``, in time order. A frame labelled ``defect`` never lands
among the good ones, whatever its verdict; an undone label does not count.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import ApplianceError
from .audit_db import open_reader

_SQL = """SELECT i.id, i.camera, i.captured_at, i.verdict, i.score, i.frame, i.model_id,
    (SELECT l.label FROM labels l WHERE l.inspection_id = i.id AND l.undone_at IS NULL ORDER BY l.at DESC LIMIT 1)
        AS label
    FROM inspections i WHERE i.frame IS NOT NULL"""


def export(db: Path, store: Path, out: Path, *, camera: str | None = None, since: float | None = None,
           until: float | None = None, label: str | None = None, verdict: str | None = None, holdout: int = 5
           ) -> dict[str, Any]:
    """Copy the chosen frames into ``out`` in MVTec layout; returns the counts per folder.

    ``label``: ``good``, ``defect`` or ``none`` (unlabelled only). ``verdict``: ``ok``, ``ng`` or ``error``.

    Raises:
        ApplianceError: no database, ``out`` is not empty, or nothing matches.

    """
    if out.exists() and any(out.iterdir()):
        raise ApplianceError(f"{out} is not empty; export into a new folder")
    sql, params = _SQL, []
    for clause, value in (("i.camera = ?", camera), ("i.captured_at >= ?", since), ("i.captured_at < ?", until),
                          ("i.verdict = ?", verdict)):
        if value is not None:
            sql += f" AND {clause}"
            params.append(value)
    conn = open_reader(db)
    try:
        rows = [dict(zip([d[0] for d in cur.description], r, strict=True)) for cur in [conn.execute(
            sql + " ORDER BY i.captured_at, i.id", params)] for r in cur.fetchall()]
    except sqlite3.Error as exc:
        raise ApplianceError(f"cannot read {db}: {exc}") from None
    finally:
        conn.close()
    if label is not None:
        rows = [r for r in rows if (r["label"] or "none") == label]
    placed, n_good = [], 0
    for r in rows:
        source = store / r["frame"]
        if not source.is_file():
            continue  # deleted by the store's retention since
        if r["label"] == "defect":
            folder = "test/defect"
        elif r["label"] == "good" or r["verdict"] == "ok":
            n_good += 1
            folder = "test/good" if holdout and n_good % holdout == 0 else "train/good"
        elif r["verdict"] == "ng":
            folder = "test/unknown"
        else:
            continue  # an error frame nobody labelled: neither good nor a defect
        target = out / folder / f"{r['id']}{source.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        placed.append({"file": f"{folder}/{target.name}", "inspection_id": r["id"], "camera": r["camera"],
                       "captured_at": r["captured_at"], "verdict": r["verdict"], "score": r["score"],
                       "label": r["label"], "model_id": r["model_id"], "sha256": source.stem})
    if not placed:
        raise ApplianceError("no stored frame matches; widen the filters (is the frames output on?)")
    counts: dict[str, int] = {}
    for p in placed:
        key = p["file"].rsplit("/", 1)[0]
        counts[key] = counts.get(key, 0) + 1
    (out / "dataset.json").write_text(json.dumps({
        "filters": {"camera": camera, "since": since, "until": until, "label": label, "verdict": verdict,
                    "holdout": holdout}, "counts": counts, "frames": placed}, indent=1) + "\n")
    return counts
