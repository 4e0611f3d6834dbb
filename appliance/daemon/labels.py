"""Operator labels: what an operator says about an inspection, and what the appliance learns from it.

A label is ``good`` (the part was fine: a false reject when the verdict was NG) or ``defect`` (a
confirmed defect; an escape when the verdict was OK), with an optional note and who said so. It
comes from any way in (CLI, live page, MQTT, Modbus, OPC UA) as a ``LabelCommand`` and:

1. keeps the frame: the inspection's frame in the frame store (an NG is always there; an OK part is
   taken from the store's recent records) and pins it there while the label stands;
2. for ``good`` on a PatchCore camera, teaches the live memory bank at once: the frame's patches the
   bank does not cover are added (``Engine.learn_good``) until the frame scores ``margin`` below the
   threshold in force, persisted as a delta entry beside the bundle (``bank_delta.DeltaStore``,
   replayed at every start); PaDiM cannot update its Gaussians from one frame and says so;
3. is an audit row (``labels``) and an event, and feeds the threshold rule (``threshold_rule``);
4. can be undone (``UnlabelCommand``): the rows it added are removed exactly (``Engine.forget``),
   the label row records who undid it and when.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bank_delta import DeltaStore, golden_scores, verify_golden_with_delta
from ..errors import ApplianceError, ScorerError
from ..imaging import read_image
from .audit import Recorder
from .audit_db import iso_utc
from .commands import CommandError, LabelCommand, UnlabelCommand
from .records import NG
from .threshold_rule import DEFECT, GOOD, Labelled, LearningConfig, recalibrate
from .thresholds import shift_at

if TYPE_CHECKING:
    from .operator_thresholds import ThresholdStore
    from .pipeline import CameraPipeline
    from .publishers.frames import FramesPublisher

log = logging.getLogger(__name__)


def delta_store(state: Path, camera: str, engine: Any) -> DeltaStore:
    """The camera's store of what its model learned (checked against the engine's model and fitted bank)."""
    return DeltaStore(delta_folder(state, camera, engine.model_id), engine.model_id, engine.base_identity(),
                      engine.max_learned_rows)


def reconcile(engine: Any, store: DeltaStore, active: set[str]) -> tuple[int, list[str]]:
    """Replay a model's delta at load, keeping only entries whose label stands; ``(rows replayed, dropped ids)``.

    A label recorded and undone is the truth: an entry without a standing label (a kill -9 between
    writing the entry and recording its label, or an undo that could not reach this model) is
    dropped from the store, the golden scores recorded anew. Otherwise the golden images must score
    as they did when the delta was written (``verify_golden_with_delta``).
    """
    entries = store.load()
    keep = [e for e in entries if e.entry_id in active]
    engine.apply_learned(keep)
    dropped = [e.entry_id for e in entries if e.entry_id not in active]
    if dropped:
        golden = golden_scores(engine, engine.bundle_path, engine.manifest)
        for entry_id in dropped:
            store.remove(entry_id, golden)
    elif keep:
        verify_golden_with_delta(engine, engine.bundle_path, engine.manifest, store.golden)
    return sum(int(e.rows.shape[0]) for e in keep), dropped


def new_label_id(now: float | None = None) -> str:
    """``L`` + 11 hex digits of epoch milliseconds + 6 random ones: unique, sortable by time."""
    return f"L{int((time.time() if now is None else now) * 1000):011x}{os.urandom(3).hex()}"


def delta_folder(state: Path, camera: str, model_id: str) -> Path:
    """Where a camera's learned rows for one model are kept (beside, never inside, the bundle)."""
    return Path(state) / "learned" / camera / model_id


class LabelBook:
    """Takes labels and undoes them (thread-safe: one label at a time)."""

    def __init__(self, recorder: Recorder, frames: FramesPublisher | None, pipeline: Any,
                 thresholds: ThresholdStore, state: Path, config: LearningConfig, tz: Any,
                 camera_config: Any) -> None:
        self.recorder = recorder
        self.frames = frames
        self._pipeline = pipeline  # camera -> CameraPipeline (raises CommandError for an unknown one)
        self.thresholds = thresholds
        self.state = Path(state)
        self.config = config
        self.tz = tz
        self._camera_config = camera_config  # camera -> Camera config (thresholds schedule)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ label
    def label(self, cmd: LabelCommand) -> dict[str, Any]:
        """Record a label, keep its frame, teach the bank (PatchCore, ``good``), recalibrate; the reply says what."""
        with self._lock:
            row = self._inspection(cmd.inspection)
            if cmd.camera is not None and row["camera"] != cmd.camera:
                raise CommandError(f"inspection {cmd.inspection} is camera {row['camera']}'s, not {cmd.camera}'s")
            active = self._active(cmd.inspection)
            replaced = None
            if active is not None:
                if active["label"] == cmd.label:
                    return {"label_id": active["id"], "inspection": cmd.inspection, "label": cmd.label,
                            "note": "already labelled so; nothing changed"}
                replaced = self._undo(active, cmd.who, f"replaced by a {cmd.label} label")
            label_id = new_label_id()
            frame = self._keep_frame(row)
            learned, note = self._learn(row, cmd, label_id, frame)
            now = time.time()
            record = {"id": label_id, "inspection_id": row["id"], "camera": row["camera"], "label": cmd.label,
                      "note": cmd.note, "who": cmd.who, "at": now, "time": iso_utc(now), "verdict": row["verdict"],
                      "score": row["score"], "threshold": row["threshold"], "model_id": row["model_id"],
                      "frame": frame, "learned": json.dumps(learned) if learned else None,
                      "run_id": self.recorder.run_id}
            self.recorder.on_writer(lambda db: db["labels"].insert(record))
            kind = _kind(row["verdict"], cmd.label)
            self.recorder.event("labelled", row["camera"], f"inspection {row['id']} labelled {cmd.label} ({kind}) "
                                f"by {cmd.who}" + (f": {cmd.note}" if cmd.note else ""),
                                {"label_id": label_id, "inspection_id": row["id"], "label": cmd.label, "kind": kind,
                                 "learned": learned, "replaced": replaced})
            threshold = self._recalibrate(row["camera"], row["captured_at"])
        reply = {"label_id": label_id, "inspection": row["id"], "camera": row["camera"], "label": cmd.label,
                 "kind": kind, "frame": frame, "learned": learned, "threshold": threshold}
        if note:
            reply["note"] = note
        return reply

    def unlabel(self, cmd: UnlabelCommand) -> dict[str, Any]:
        """Undo a label: what the bank learned from it is removed exactly; the row keeps who undid it."""
        if (cmd.label_id is None) == (cmd.inspection is None):
            raise CommandError("unlabel needs a label_id or an inspection (one of them)")
        with self._lock:
            if cmd.label_id is not None:
                rows = self.recorder.read("SELECT * FROM labels WHERE id = ?", [cmd.label_id])
                if not rows:
                    raise CommandError(f"no label {cmd.label_id!r}")
                active = rows[0]
                if active["undone_at"] is not None:
                    raise CommandError(f"label {cmd.label_id} was already undone at {iso_utc(active['undone_at'])}")
            else:
                active = self._active(cmd.inspection)
                if active is None:
                    raise CommandError(f"inspection {cmd.inspection!r} has no label to undo")
            if cmd.camera is not None and active["camera"] != cmd.camera:
                raise CommandError(f"label {active['id']} is camera {active['camera']}'s, not {cmd.camera}'s")
            removed = self._undo(active, cmd.who, "undone")
            row = self._inspection(active["inspection_id"])
            threshold = self._recalibrate(active["camera"], row["captured_at"])
        return {"label_id": active["id"], "inspection": active["inspection_id"], "camera": active["camera"],
                "undone": True, "removed_rows": removed, "threshold": threshold}

    # ------------------------------------------------------------ steps
    def _inspection(self, inspection_id: str) -> dict[str, Any]:
        rows = self.recorder.read("SELECT * FROM inspections WHERE id = ?", [inspection_id])
        if not rows:  # labelled a moment after it was shown: its row may still be on its way
            self.recorder.flush()
            rows = self.recorder.read("SELECT * FROM inspections WHERE id = ?", [inspection_id])
        if not rows:
            raise CommandError(f"no inspection {inspection_id!r} in the audit log")
        return rows[0]

    def _active(self, inspection_id: str) -> dict[str, Any] | None:
        rows = self.recorder.read("SELECT * FROM labels WHERE inspection_id = ? AND undone_at IS NULL "
                                  "ORDER BY at DESC LIMIT 1", [inspection_id])
        return rows[0] if rows else None

    def _keep_frame(self, row: dict[str, Any]) -> str | None:
        """The frame store's file of the inspection (stored now if only held in memory), pinned; else ``None``."""
        if self.frames is None:
            return None
        rel = row.get("frame")
        if rel is None:
            rec = self.frames.recent(row["id"])
            stored = self.frames.store(rec, "label") if rec is not None else None
            if stored is not None:
                rel = stored.path
                self.recorder.on_writer(lambda db: db.execute("UPDATE inspections SET frame = ? WHERE id = ?",
                                                              [rel, row["id"]]))
        if rel is not None:
            self.frames.pin(rel)
        return rel

    def _learn(self, row: dict[str, Any], cmd: LabelCommand, label_id: str, frame: str | None
               ) -> tuple[dict[str, Any] | None, str | None]:
        """Teach the camera's bank a good frame (PatchCore); ``(what was learned, a note for the reply)``."""
        if cmd.label != GOOD or not self.config.bank:
            return None, None
        try:
            pipeline: CameraPipeline = self._pipeline(row["camera"])
        except CommandError:
            return None, f"camera {row['camera']} is not running: the label is kept, nothing was learned"
        engine = pipeline.engine
        if engine.model_id != row["model_id"]:
            return None, (f"the inspection was scored by {row['model_id']}, the camera now runs {engine.model_id}: "
                          "the label is kept, nothing was learned")
        if frame is None:
            return None, "the frame is no longer available (no frames output, or it was not kept): nothing learned"
        threshold, _ = self.thresholds.threshold_for(row["camera"], time.time())
        target = max(0.01, threshold - self.config.margin)
        try:
            image = read_image(self.frames.path(frame))
            learned = engine.learn_good(image, label_id, target=target)
        except ScorerError as exc:  # PaDiM, or a full delta
            return None, str(exc)
        except ApplianceError as exc:
            return None, f"could not learn from the frame: {exc}"
        try:  # kept even with no rows: the bank's identity names every entry, so a restart must replay it too
            delta_store(self.state, row["camera"], engine).append(
                learned, golden_scores(engine, engine.bundle_path, engine.manifest))
        except (ApplianceError, OSError) as exc:
            engine.forget(label_id)  # what cannot survive a restart is not kept live either
            return None, f"could not keep what was learned ({exc}); nothing was learned"
        return {"rows": int(learned.rows.shape[0]), "score_before": round(float(learned.score_before), 4),
                "score_after": round(float(learned.score_after), 4), "target": round(target, 4),
                "ms": round(learned.seconds * 1e3, 1), "model_id": engine.model_id}, None

    def _undo(self, active: dict[str, Any], who: str, why: str) -> int:
        """Mark a label undone, then remove what the bank learned from it; returns the rows removed.

        The audit row is marked first: a delta entry whose label is undone (or was never recorded) is
        dropped when its model is next loaded (``reconcile``), so a kill -9 between the steps leaves
        the label and the bank agreeing once the daemon is back.
        """
        now = time.time()
        self.recorder.on_writer(lambda db: db.execute("UPDATE labels SET undone_at = ?, undone_by = ? WHERE id = ?",
                                                      [now, who, active["id"]]))
        removed = 0
        learned = json.loads(active["learned"]) if active.get("learned") else None
        if learned:
            removed = int(learned["rows"])
            try:
                engine = self._pipeline(active["camera"]).engine
            except CommandError:
                engine = None
            if engine is not None and any(e.entry_id == active["id"] for e in engine.learned):
                engine.forget(active["id"])
                delta_store(self.state, active["camera"], engine).remove(
                    active["id"], golden_scores(engine, engine.bundle_path, engine.manifest))
        if self.frames is not None and active.get("frame"):
            still = self.recorder.read("SELECT 1 FROM labels WHERE frame = ? AND undone_at IS NULL AND id != ?",
                                       [active["frame"], active["id"]])
            if not still:
                self.frames.pin(active["frame"], pinned=False)
        self.recorder.event("label_undone", active["camera"], f"label {active['id']} ({active['label']}) of "
                            f"inspection {active['inspection_id']} {why} by {who}",
                            {"label_id": active["id"], "inspection_id": active["inspection_id"],
                             "removed_rows": removed, "who": who})
        return removed

    def _recalibrate(self, camera: str, when: float) -> dict[str, Any] | None:
        """Apply the threshold rule for the label's camera and shift (unless pinned); what changed, if anything."""
        if not self.config.recalibrate:
            return None
        cam = self._camera_config(camera)
        shift = shift_at(cam.thresholds, self.tz, when)
        if self.thresholds.pinned(camera, shift):
            return None
        since = time.time() - self.config.window_days * 86400
        rows = self.recorder.read(
            "SELECT l.id, l.label, l.score, l.learned, i.captured_at FROM labels l JOIN inspections i "
            "ON i.id = l.inspection_id WHERE l.camera = ? AND l.undone_at IS NULL AND l.at >= ? "
            "AND l.score IS NOT NULL", [camera, since])
        labelled = [Labelled(r["score"], r["label"], r["id"]) for r in rows
                    if not (r["learned"] and json.loads(r["learned"]).get("rows"))  # the bank fixed those
                    and (shift is None or shift_at(cam.thresholds, self.tz, r["captured_at"]) == shift)]
        current, _ = self.thresholds.threshold_for(camera, when)
        proposal = recalibrate(labelled, current, self._day_start(camera, shift, current), self.config)
        if proposal is None:
            return None
        self.thresholds.set_learned(camera, shift, proposal.threshold, {
            "previous": proposal.previous, "cost_before": proposal.cost_before, "cost_after": proposal.cost_after,
            "escapes": proposal.escapes, "false_rejects": proposal.false_rejects,
            "label_ids": list(proposal.label_ids)})
        return {"shift": shift, "previous": proposal.previous, "threshold": proposal.threshold}

    def _day_start(self, camera: str, shift: str | None, current: float) -> float:
        """The learned threshold as it stood at the start of today (local midnight), for the daily step bound."""
        now = time.localtime()
        midnight = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, 0, 0, 0, 0, 0, -1))
        rows = self.recorder.read("SELECT data FROM events WHERE kind = 'threshold_learned' AND camera = ? "
                                  "AND at >= ? ORDER BY id LIMIT 1", [camera, midnight])
        for r in rows:
            data = json.loads(r["data"] or "{}")
            if data.get("shift") == shift and data.get("previous") is not None:
                return float(data["previous"])
        return current


def _kind(verdict: str, label: str) -> str:
    """What a label says about the verdict: a false reject, an escape, or a confirmation."""
    if verdict == NG and label == GOOD:
        return "false_reject"
    if verdict != NG and label == DEFECT:
        return "escape" if verdict != "error" else "defect"
    return "confirmed"
