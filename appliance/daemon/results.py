"""Where each finished inspection goes: the audit log first, then every output, then the source's ``done``.

``ResultFlow`` is the pipelines' sink. For one record it decides the overlay's file name (so the
audit row can name it), stores the payloads of durable outputs (MQTT) in the outbox in the same
transaction as the row, and once that transaction is committed hands the record to every
output and tells the source (a hot folder moves its file). When the audit log cannot write (a
full disk) outputs still get the record, marked uncommitted: durable outputs then send it from
memory, and the audit log keeps it in its backlog (or spill file) until it can write.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ApplianceError
from .audit import Recorder
from .outputs import Outputs
from .publishers.overlay import OverlayPublisher
from .records import ERROR, Inspection
from .sources import Captured

log = logging.getLogger(__name__)


class ResultFlow:
    """The sink of every camera pipeline: audit, outputs, metrics, the source's ``done``."""

    def __init__(self, recorder: Recorder, outputs: Outputs,
                 observers: Sequence[Callable[[Inspection], None]] = ()) -> None:
        self.recorder = recorder
        self.outputs = outputs
        self.observers = list(observers)  # metrics, the drift watch: each sees every record once
        overlay = outputs.get("overlay")
        self._overlay = overlay if isinstance(overlay, OverlayPublisher) else None

    def emit(self, record: Inspection, item: Captured | None) -> None:
        """Audit row first; once committed (or kept for later), every output and the source's ``done``."""
        record = self._with_overlay_path(record)
        if record.verdict == ERROR:
            log.warning("camera %s: inspection %s failed: %s", record.camera, record.id, record.error,
                        extra={"camera": record.camera, "inspection_id": record.id})
        for observe in self.observers:
            try:
                observe(record)
            except Exception:  # an observer's bug must not cost the result
                log.exception("observing inspection %s failed", record.id)

        def then(committed: bool) -> None:
            self.outputs.publish(record, committed)
            if item is not None and item.done is not None:
                item.done(record.verdict != ERROR)

        outbox = {w.name: w.publisher.payload(record) for w in self.outputs.workers if w.publisher.durable}
        self.recorder.record(record, self.outputs.names, outbox=outbox, then=then)

    def event(self, kind: str, camera: str | None = None, detail: str | None = None, data: Any = None) -> None:
        """An audit event (a frame dropped, a camera lost, ...)."""
        self.recorder.event(kind, camera, detail, data)

    def delivered(self, inspection_id: str, output: str, status: str, detail: str | None, at: float | None) -> None:
        """What an output did with a record, for the audit log."""
        self.recorder.delivered(inspection_id, output, status, detail, at)

    def _with_overlay_path(self, record: Inspection) -> Inspection:
        """The record naming the overlay file it will get, decided before its audit row is written."""
        if self._overlay is None:
            return record
        try:
            path = self._overlay.plan(record.id, record.camera, record.captured_at, record.verdict)
        except ApplianceError as exc:
            log.error("camera %s: no overlay path: %s", record.camera, exc)
            return record
        return record if path is None else dataclasses.replace(record, overlay_path=str(path))
