"""The typed client of the trainer's appliance routes: what the daemon's uploader calls.

Standard library only (``urllib.request``) and the shared records: the daemon must not need
fastapi or httpx. Every failure is a ``TrainerError`` carrying the server's message, split by
what the caller should do about it: ``TrainerUnavailable`` (connection refused, a timeout, a 5xx,
429: keep the upload in the outbox and retry later) or ``TrainerRefused`` (any other 4xx: a
wrong token, an invalid body; retrying the same request will not help).

A frame travels in three steps (``upload_frame`` does all three): ``upload_plan`` asks whether
the trainer has it already; the bytes go to a presigned URL (S3) or to the API; ``finish_upload``
records the metadata once the trainer has checked the bytes' sha256. Every step is idempotent,
so a resend after an outage or a kill -9 duplicates nothing.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ApplianceError
from .records import Camera, DriftEvent, FrameMeta, Job, Label, Model

API = "/api/v1"
#: Statuses worth retrying: the request may well succeed later as it is.
RETRYABLE = frozenset({408, 425, 429})
_M = TypeVar("_M", bound=BaseModel)


class TrainerError(ApplianceError):
    """The trainer could not do what was asked; ``status`` is the HTTP status when there was an answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TrainerUnavailable(TrainerError):  # noqa: N818 - named for what the caller does: retry
    """Not reachable, too slow, overloaded or failing (5xx): keep the data and try again later."""


class TrainerRefused(TrainerError):  # noqa: N818 - named for what the caller does: give up
    """The trainer refused the request (4xx): resending it unchanged will be refused again."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, status)


# ---------------------------------------------------------------------- bodies and answers beyond records.py
class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraReport(_Wire):
    """What an appliance says about one of its cameras: the model it runs and its drift watch's state."""

    model_id: str | None = Field(None, description="the bundle's model id the camera runs now")
    drift_state: str | None = Field(None, description="the drift watch's state (ok, drift, no_baseline, off...)")
    drift_at: float | None = Field(None, description="when the drift state last changed")


class UploadPlan(_Wire):
    """Whether the trainer needs a frame's bytes, and where to send them."""

    status: Literal["known", "upload"] = Field(description="known: recorded already, nothing to send")
    url: str | None = Field(None, description="a presigned URL to PUT the bytes to; None: PUT them to "
                                              "/api/v1/frames/{sha256}/content")
    key: str = Field(description="the blob store key the bytes go under")


class UploadDone(_Wire):
    """A frame's metadata was taken: ``recorded`` now, or ``known`` from before (a resend)."""

    status: Literal["recorded", "known"]
    key: str


class Received(_Wire):
    """How many items of a batch arrived and how many were new (a resend records nothing twice)."""

    received: int
    recorded: int
    jobs: list[Job] = Field(default_factory=list, description="rebuild jobs the batch created (drift events)")


class Whoami(_Wire):
    """The appliance a token belongs to."""

    appliance_id: str


# ---------------------------------------------------------------------- the client
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are refused: urllib would carry the bearer token to wherever the redirect points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        """Follow nothing (the 3xx surfaces as an error naming the new place)."""
        return None


class TrainerClient:
    """The appliance routes of one trainer, for one appliance's token. Thread-safe (no state per call)."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise TrainerRefused(f"trainer url {base_url!r}: expected http(s)://host[:port]", 0)
        if not token:
            raise TrainerRefused("no trainer token: register the appliance (appliance trainer add-appliance)", 0)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._token = token
        self._opener = urllib.request.build_opener(_NoRedirect)

    def __repr__(self) -> str:
        return f"TrainerClient({self.base_url!r})"  # never the token

    # ------------------------------------------------------------------ appliance routes
    def whoami(self) -> str:
        """The appliance id the token belongs to (a cheap check of the URL and the token)."""
        return _parse(Whoami, self._json("GET", "/whoami"), "whoami").appliance_id

    def report_camera(self, camera_id: str, model_id: str | None = None, drift_state: str | None = None,
                      drift_at: float | None = None) -> Camera:
        """Tell the trainer which model a camera runs and its drift state; returns the trainer's view of it."""
        body = CameraReport(model_id=model_id, drift_state=drift_state, drift_at=drift_at)
        return _parse(Camera, self._json("PUT", f"/cameras/{quote(camera_id, safe='')}", body), "report_camera")

    def upload_plan(self, meta: FrameMeta) -> UploadPlan:
        """Ask whether the trainer needs this frame's bytes and where they go."""
        return _parse(UploadPlan, self._json("POST", "/frames/plan", meta), "upload_plan")

    def put_content(self, meta: FrameMeta, data: bytes) -> None:
        """Send a frame's bytes through the API (when the plan gave no presigned URL)."""
        query = urlencode({"camera": meta.camera_id, "suffix": meta.suffix})
        self._call("PUT", f"{self.base_url}{API}/frames/{meta.sha256}/content?{query}", data,
                   "application/octet-stream")

    def put_presigned(self, url: str, data: bytes) -> None:
        """PUT a frame's bytes to a presigned URL (the object store; no token: the URL is the permission)."""
        self._call("PUT", url, data, "application/octet-stream", auth=False)

    def finish_upload(self, meta: FrameMeta, data: bytes | None = None) -> UploadDone:
        """Record the frame once its bytes are with the trainer (it checks their sha256 and size first).

        With ``data`` (the plan gave no presigned URL) the bytes go through the API first.
        """
        if data is not None:
            self.put_content(meta, data)
        return _parse(UploadDone, self._json("POST", "/frames", meta), "finish_upload")

    def upload_frame(self, meta: FrameMeta, data: bytes) -> UploadDone:
        """Plan, send the bytes if needed, finish: the whole upload of one frame, idempotent."""
        plan = self.upload_plan(meta)
        if plan.status == "known":
            return UploadDone(status="known", key=plan.key)
        if plan.url is not None:
            self.put_presigned(plan.url, data)
            return self.finish_upload(meta)
        return self.finish_upload(meta, data)

    def add_labels(self, labels: Sequence[Label]) -> Received:
        """Send operator labels (and undoings: same id, ``undone_at`` set)."""
        return _parse(Received, self._json("POST", "/labels", _batch(labels)), "add_labels")

    def add_drift_events(self, events: Sequence[DriftEvent]) -> Received:
        """Send drift events; a ``drift_raised`` may create a rebuild job (listed in the answer)."""
        return _parse(Received, self._json("POST", "/drift", _batch(events)), "add_drift_events")

    def models(self) -> list[Model]:
        """The published models of this appliance's cameras, newest first."""
        answer = self._json("GET", "/models")
        if not isinstance(answer, list):
            raise TrainerError(f"models: expected a list, got {type(answer).__name__}")
        return [_parse(Model, m, "models") for m in answer]

    # ------------------------------------------------------------------ transport
    def _json(self, method: str, path: str, body: BaseModel | bytes | None = None) -> Any:
        data = body.model_dump_json().encode() if isinstance(body, BaseModel) else body
        raw = self._call(method, f"{self.base_url}{API}{path}", data, "application/json" if data else None)
        try:
            return json.loads(raw)
        except ValueError:
            raise TrainerUnavailable(f"{self.base_url}{API}{path}: the answer is not JSON (a proxy's page?): "
                                     f"{_excerpt(raw)}") from None

    def _call(self, method: str, url: str, data: bytes | None, content_type: str | None, *,
              auth: bool = True) -> bytes:
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if content_type:
            request.add_header("Content-Type", content_type)
        if auth:
            request.add_header("Authorization", f"Bearer {self._token}")
        where = f"{method} {url.split('?', 1)[0]}"
        try:
            with self._opener.open(request, timeout=self.timeout) as answer:
                return answer.read()
        except urllib.error.HTTPError as exc:
            raise _refusal(where, exc) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise TrainerUnavailable(f"{where}: trainer unreachable: {reason}") from None


def _batch(items: Sequence[BaseModel]) -> bytes:
    return ("[" + ",".join(item.model_dump_json() for item in items) + "]").encode()


def _excerpt(raw: bytes, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _refusal(where: str, exc: urllib.error.HTTPError) -> TrainerError:
    """The error an HTTP error status stands for, with the server's own message."""
    try:
        raw = exc.read()
    except (OSError, http.client.HTTPException):
        raw = b""
    try:
        message = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        message = _excerpt(raw) or exc.reason
    status = exc.code
    if 300 <= status < 400:
        return TrainerRefused(f"{where}: redirected to {exc.headers.get('Location')} (not followed: set the "
                              f"trainer url to where it points)", status)
    text = f"{where}: {status} {message}"
    if status >= 500 or status in RETRYABLE:
        return TrainerUnavailable(text, status)
    return TrainerRefused(text, status)


def _parse(model: type[_M], data: Any, where: str) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise TrainerError(f"{where}: the trainer's answer does not fit this appliance's client (versions "
                           f"apart?): {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from None
