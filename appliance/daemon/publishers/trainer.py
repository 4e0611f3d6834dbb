"""The uploader: what the appliance kept goes to the central trainer, store and forward, nothing lost or doubled.

A durable output like MQTT: each inspection has a ``pending`` delivery in the audit's outbox from
the moment its row is committed, and a sender thread works through the outbox in order. For each
row it waits until the frame store has decided about the frame (its ``frames`` delivery is no
longer pending); a frame the store did not keep is ``skipped``; a kept one is sent to the trainer
(``TrainerClient``: the trainer says whether it knows it already, else the bytes go to a presigned
URL of its object store or through its API), then the row is marked ``sent``. Labels, their undoing
and drift events follow from the audit's events (a cursor kept in ``trainer-sync.json``), each
with its frame. The trainer keys everything by the appliance's own ids, so what a kill -9 makes the
sender repeat is recorded once; an outage (``TrainerUnavailable``) leaves the rows pending and the
sender retries with backoff. A refused token (401/403: rotated, or the token file not yet replaced)
is an outage too: the token file is read again before each retry, nothing is given up. Any other
refusal of a frame is retried ``_REFUSALS`` times (a presigned URL may have expired on the way)
and then the row is marked ``failed`` with the trainer's message; a refused label or drift event is
audited and passed over, so one bad record cannot stop the rest.

Bandwidth: at most ``kbps`` on average; per camera at most ``daily_mb`` a day (UTC): beyond it a
camera's frames wait in the outbox for the next day, except frames an operator labelled.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, model_validator

from ...atomic import write_atomic
from ...errors import ApplianceError, ConfigError, PublishError
from ...trainer.client import TrainerClient, TrainerRefused
from ...trainer.records import DriftEvent, FrameMeta, Label
from ..records import Inspection
from .base import Delivery, OutputContext, Publisher, PublisherConfig, register_publisher

log = logging.getLogger(__name__)
_TICK_S = 1.0
_SYNC_FILE = "trainer-sync.json"
_EVENT_KINDS = ("labelled", "label_undone", "drift_raised", "drift_cleared")
_REFUSALS = 3  # a frame the trainer refuses this many times is given up (marked failed)
_AUTH = (401, 403)


class TrainerOutputConfig(PublisherConfig):
    """Where the trainer is, this appliance's credentials, and how much it may send."""

    type: Literal["trainer"] = "trainer"
    url: str = Field(description="the trainer's base URL, e.g. http://trainer.plant.local:8090")
    token: SecretStr | None = Field(None, description="this appliance's token (or token_file)")
    token_file: Path | None = Field(None, description="file holding the token (keeps it out of the config)")
    timeout_s: float = Field(30.0, gt=0, le=600, description="one request's time limit")
    kbps: float = Field(0.0, ge=0, description="average upload rate cap in kilobytes per second (0: none)")
    daily_mb: float = Field(0.0, ge=0, description="frames sent per camera and UTC day, in MiB (0: no budget); "
                                                   "beyond it frames wait for the next day, labelled ones do not")
    max_pending: int = Field(200_000, ge=1, description="unsent rows kept in the outbox; beyond it the oldest are "
                                                        "dropped, counted and audited")
    batch: int = Field(64, ge=1, le=1000, description="outbox rows looked at per turn")

    @model_validator(mode="after")
    def _one_token(self) -> TrainerOutputConfig:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("set token or token_file (one of them)")
        return self

    def read_token(self) -> str:
        """The token from the config or its file."""
        if self.token_file is None:
            return self.token.get_secret_value()
        try:
            return self.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"outputs.trainer.token_file: cannot read {self.token_file}: "
                              f"{exc.strerror or exc}") from None


class _Bucket:
    """A token bucket of bytes: ``take(n)`` waits until ``n`` bytes may go at ``rate`` bytes per second."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate
        self._at = time.monotonic()

    def take(self, n: int, stop: threading.Event) -> None:
        if self.rate <= 0:
            return
        while True:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= min(n, self.rate):
                self._tokens -= n
                return
            if stop.wait(min(1.0, (min(n, self.rate) - self._tokens) / self.rate)):
                return


@register_publisher
class TrainerPublisher(Publisher):
    """Frames, labels and drift events to the trainer (see the module docstring)."""

    type: ClassVar[str] = "trainer"
    Config: ClassVar[type[PublisherConfig]] = TrainerOutputConfig
    durable = True

    def __init__(self, config: TrainerOutputConfig, context: OutputContext) -> None:
        super().__init__(config, context)
        self.cfg = config
        self._client: Any = None
        self._frames: Any = None  # the frames output: where the kept files are
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._bucket = _Bucket(config.kbps * 1024)
        self._last_id = 0
        self._deferred: dict[int, dict[str, Any]] = {}  # outbox rows waiting for a camera's next daily budget
        self._sync_path = Path(context.state_dir) / _SYNC_FILE
        self._cursor = 0  # the last audit event id whose label or drift event the trainer has
        self._sent_today: dict[str, tuple[str, int]] = {}  # camera -> (UTC day, bytes)
        self._reported: dict[str, tuple[Any, ...]] = {}
        self._retry_at = 0.0
        self._delay = 1.0
        self._refused: dict[int, int] = {}  # outbox row id -> refusals so far
        self.sent = self.skipped = self.failed = self.dropped = 0
        self.bytes_sent = 0
        self.connected = False
        self.last_error: str | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Connect lazily (the trainer may be down), read the sync cursor, start the sender."""
        if self.context.outbox is None:
            raise PublishError("the trainer output needs the audit outbox (it is a durable output)")
        try:
            token = self.cfg.read_token()
        except ConfigError as exc:
            raise PublishError(str(exc)) from None
        self._client = TrainerClient(self.cfg.url, token, timeout=self.cfg.timeout_s)
        self._token = token
        self._frames = self.context.extra.get("frames")
        if self._frames is None:
            raise PublishError("the trainer output sends the frames the frames output keeps: configure a "
                               "[[outputs]] type = \"frames\" too")
        try:
            self._cursor = int(json.loads(self._sync_path.read_text()).get("event_cursor", 0))
        except FileNotFoundError:
            self._cursor = 0  # no sync yet: every label and drift event in the audit goes
        except (OSError, ValueError, AttributeError) as exc:
            raise PublishError(f"trainer output: {self._sync_path} is unreadable ({exc}); remove it to resend "
                               "every label and drift event (the trainer ignores repeats)") from None
        self._thread = threading.Thread(target=self._run, name="trainer-sender", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the sender (rows not sent stay pending: they go after the restart)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.cfg.timeout_s + 5)

    def payload(self, inspection: Inspection) -> str:
        """The outbox row: the inspection's id and camera (the frame is looked up when it is sent)."""
        return json.dumps({"camera": inspection.camera, "id": inspection.id})

    def publish(self, inspection: Inspection) -> Delivery:
        """A new row is committed to the outbox: wake the sender."""
        self._wake.set()
        return Delivery("pending", detail="outbox")

    def state(self) -> dict[str, Any]:
        """Connection, backlog, counters, bytes sent today per camera."""
        try:
            backlog: int | None = self.context.outbox.pending_count(self.name)
        except Exception:  # a status read must not fail for the audit log's sake
            backlog = None
        return {"state": "ok" if self.connected else "disconnected", "url": self.cfg.url, "backlog": backlog,
                "sent": self.sent, "skipped": self.skipped, "failed": self.failed, "dropped": self.dropped,
                "bytes_sent": self.bytes_sent, "today": {c: b for c, (_, b) in self._sent_today.items()},
                "event_cursor": self._cursor, "last_error": self.last_error}

    # ------------------------------------------------------------ the sender thread
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(_TICK_S)
            self._wake.clear()
            if time.monotonic() < self._retry_at:
                continue
            try:
                self._fresh_token()
                self._report_cameras()
                self._sync_events()
                busy = self._send_frames()
                self._bound()
                self.connected, self.last_error, self._delay = True, None, 1.0
                if busy:
                    self._wake.set()  # more rows wait: go on at once
            except ApplianceError as exc:  # TrainerUnavailable (outage) or a refusal: rows stay pending
                self.connected = False
                self.last_error = str(exc)
                self._retry_at = time.monotonic() + self._delay
                self._delay = min(self._delay * 2, 60.0)
                log.warning("trainer output: %s (retrying in %.0f s)", exc, self._delay)
            except Exception as exc:  # a bug must not end the sender
                log.exception("trainer sender")
                self.last_error = f"sender: {type(exc).__name__}: {exc}"
                self._retry_at = time.monotonic() + self._delay

    def _fresh_token(self) -> None:
        """Pick up a replaced token file (after a rotation) without a restart."""
        if self.cfg.token_file is None:
            return
        token = self.cfg.read_token()
        if token != self._token:
            self._client = TrainerClient(self.cfg.url, token, timeout=self.cfg.timeout_s)
            self._token = token
            log.info("trainer output: the token file changed; using the new token")

    def _report_cameras(self) -> None:
        """Each camera's running model and drift state, when it changed."""
        for camera, cam in self.context.status().cameras.items():
            key = (cam.bundle.model_id, cam.drift.get("state"))
            if self._reported.get(camera) != key:
                self._client.report_camera(camera, model_id=cam.bundle.model_id, drift_state=cam.drift.get("state"))
                self._reported[camera] = key

    def _send_frames(self) -> bool:
        """Work through the outbox in order; True when a full batch was handled (more may wait).

        Rows deferred by a camera's daily budget are looked at again first, once that camera has
        budget again; the others go in outbox order.
        """
        again = [r for r in self._deferred.values() if self._within_budget(r["info"])]
        rows = again + self.context.outbox.pending(self.name, limit=self.cfg.batch, after=self._last_id)
        for row in rows:
            info = row.get("info") or self._inspection(row["inspection_id"])
            if info is None:  # its inspection was deleted by retention meanwhile
                self._done(row, "skipped", "the inspection is no longer in the audit log")
                continue
            if info["frames_status"] == "pending":
                return False  # the frame store has not decided yet: this row and the ones after it wait
            if not info["frame"]:
                self._done(row, "skipped", "frame not kept by the frame store")
                continue
            if not self._within_budget(info):
                if len(self._deferred) < self.cfg.max_pending:
                    self._deferred[row["id"]] = {**row, "info": info}
                self._last_id = max(self._last_id, row["id"])
                continue  # waits for tomorrow's budget; later rows of other cameras may go
            try:
                self._upload(info)
            except PublishError as exc:  # the stored file is gone: nothing will ever send it
                self._done(row, "skipped", str(exc))
                continue
            except TrainerRefused as exc:
                if exc.status in _AUTH:
                    raise  # the token, not the frame: wait for a new one, give nothing up
                self._refused[row["id"]] = self._refused.get(row["id"], 0) + 1
                if self._refused[row["id"]] < _REFUSALS:
                    raise  # perhaps transient (an expired presigned URL): the turn ends, backoff, again
                self._done(row, "failed", str(exc))
                continue
            self._done(row, "sent", info["frame"])
        return len(rows) >= self.cfg.batch

    def _inspection(self, inspection_id: str) -> dict[str, Any] | None:
        rows = self.context.outbox.read(
            "SELECT i.id, i.camera, i.captured_at, i.verdict, i.score, i.raw_score, i.threshold, i.model_id, i.frame, "
            "(SELECT status FROM deliveries d WHERE d.inspection_id = i.id AND d.output = 'frames') AS frames_status, "
            "(SELECT count(*) FROM labels l WHERE l.inspection_id = i.id) AS labels "
            "FROM inspections i WHERE i.id = ?", [inspection_id])
        return rows[0] if rows else None

    def _within_budget(self, info: dict[str, Any]) -> bool:
        if not self.cfg.daily_mb or info["labels"]:
            return True
        day = time.strftime("%Y-%m-%d", time.gmtime())
        today, sent = self._sent_today.get(info["camera"], (day, 0))
        return today != day or sent < self.cfg.daily_mb * 2**20

    def _upload(self, info: dict[str, Any], reasons: list[str] | None = None) -> None:
        """One kept frame to the trainer (the trainer skips what it has); counts bytes and the budget."""
        path = self._frames.path(info["frame"])
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise PublishError(f"stored frame {path} is gone (deleted by the store's retention)") from None
        if reasons is None:
            reasons = {"ng": ["reject"], "error": ["error"]}.get(info["verdict"], ["sample"])
        meta = FrameMeta(camera_id=info["camera"], inspection_id=info["id"], sha256=path.stem, suffix=path.suffix,
                         size=len(data), captured_at=info["captured_at"], verdict=info["verdict"], score=info["score"],
                         raw_score=info["raw_score"], threshold=info["threshold"], model_id=info["model_id"],
                         reasons=reasons)
        plan = self._client.upload_plan(meta)
        if plan.status != "known":
            self._bucket.take(len(data), self._stop)
            if plan.url:
                self._client.put_presigned(plan.url, data)
                self._client.finish_upload(meta)
            else:
                self._client.finish_upload(meta, data)
            self.bytes_sent += len(data)
            day = time.strftime("%Y-%m-%d", time.gmtime())
            today, sent = self._sent_today.get(info["camera"], (day, 0))
            self._sent_today[info["camera"]] = (day, (sent if today == day else 0) + len(data))

    def _done(self, row: dict[str, Any], status: str, detail: str) -> None:
        self.context.outbox.delivered(row["inspection_id"], self.name, status, detail, time.time())
        self._deferred.pop(row["id"], None)
        self._refused.pop(row["id"], None)
        self._last_id = max(self._last_id, row["id"])
        if status == "sent":
            self.sent += 1
        elif status == "failed":
            self.failed += 1
        else:
            self.skipped += 1

    def _bound(self) -> None:
        outbox, limit = self.context.outbox, self.cfg.max_pending
        if outbox.pending_count(self.name) <= limit:
            return
        detail = f"trainer outbox full: more than {limit} rows waiting; the oldest dropped"
        dropped = outbox.drop_pending(self.name, keep=limit, detail=detail, after=self._last_id)
        if dropped:
            self.dropped += dropped
            outbox.event("outbox_dropped", None, detail, {"output": self.name, "dropped": dropped})

    # ------------------------------------------------------------ labels and drift events
    def _sync_events(self) -> None:
        """Labels (and undos) and drift events after the cursor, in order, each with its frame; cursor saved."""
        rows = self.context.outbox.read(
            f"SELECT id, at, kind, camera, data, run_id FROM events WHERE id > ? AND kind IN "
            f"({','.join('?' * len(_EVENT_KINDS))}) ORDER BY id LIMIT 100", [self._cursor, *_EVENT_KINDS])
        for event in rows:
            try:
                self._send_event(event)
            except TrainerRefused as exc:
                if exc.status in _AUTH:
                    raise
                log.warning("trainer output: event %s (%s) refused, passed over: %s", event["id"], event["kind"], exc)
                self.context.outbox.event("trainer_refused", event["camera"], f"the trainer refused {event['kind']} "
                                          f"event {event['id']}: {exc}", {"event_id": event["id"]})
            self._cursor = event["id"]
            self._save_cursor()

    def _send_event(self, event: dict[str, Any]) -> None:
        """One label (or its undoing) or drift event, after the frame it is about."""
        data = json.loads(event["data"] or "{}")
        if event["kind"] in ("labelled", "label_undone"):
            found = self.context.outbox.read("SELECT * FROM labels WHERE id = ?", [data.get("label_id")])
            if not found:
                return  # the label row was lost with an unclean stop; the event alone says too little
            label = found[0]
            self._upload_kept(label["inspection_id"], label["frame"], "label")
            self._client.add_labels([Label(
                id=label["id"], camera_id=label["camera"], inspection_id=label["inspection_id"], label=label["label"],
                note=label["note"], who=label["who"], at=label["at"], undone_at=label["undone_at"])])
            return
        for kept in data.get("frames", []):
            self._upload_kept(kept["inspection_id"], kept.get("frame"), "drift")
        self._client.add_drift_events([DriftEvent(
            id=f"{event['run_id'] or 'run'}-{event['id']}", camera_id=event["camera"], kind=event["kind"],
            at=event["at"], stats={k: v for k, v in data.items() if k != "frames"})])

    def _upload_kept(self, inspection_id: str, frame: str | None, reason: str) -> None:
        """The frame a label or drift event is about (the store may have kept it apart from the row's own)."""
        info = self._inspection(inspection_id)
        if info is None or not (frame or info["frame"]):
            return
        try:
            self._upload({**info, "frame": frame or info["frame"]}, [reason])
        except PublishError as exc:  # deleted by retention meanwhile: the record goes without it
            log.warning("trainer output: %s", exc)

    def _save_cursor(self) -> None:
        write_atomic(self._sync_path, json.dumps({"event_cursor": self._cursor}) + "\n", sync=False)
