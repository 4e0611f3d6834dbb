"""The trainer's HTTP API (FastAPI, OpenAPI at ``/openapi.json``) and its page, over ``TrainerService``.

Versioned under ``/api/v1``. Appliance routes authenticate with the appliance's bearer token and
take the appliance from it, so a route cannot even name another appliance's data; admin routes
(``/api/v1/admin/...``) take one of the config's ``admin_tokens``. Errors are ``{"error": "..."}``
with 401 (no or a wrong token), 403 (an appliance token on an admin route), 404, 409, 413 (a body
over the limit), 422 (an invalid body) and 503 (the job queue is down). Handlers are plain
functions: FastAPI runs them in its thread pool, where the storage's blocking calls belong.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from .client import API, CameraReport, Received, TrainerError, UploadDone, UploadPlan, Whoami
from .records import (
    Appliance,
    Camera,
    Dataset,
    DriftEvent,
    Evaluation,
    FrameMeta,
    Job,
    JobStatus,
    Label,
    Model,
    ModelStatus,
    Policy,
)
from .service import TrainerService

log = logging.getLogger(__name__)

#: Frames through the API (when the blob store cannot presign); everything else is small JSON.
MAX_FRAME_BYTES = 64 << 20
MAX_JSON_BYTES = 4 << 20
# The page: no inline script or style, nothing from elsewhere (as the daemon's page).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
STATIC = {"page.js": "text/javascript", "page.css": "text/css"}


class ErrorBody(BaseModel):
    """Every refusal's body."""

    error: str


class NewAppliance(BaseModel):
    """An appliance to register."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="1-64 letters, digits, '.', '-' or '_'")
    name: str = ""


class Token(BaseModel):
    """An appliance's token: shown once, only its hash is kept."""

    appliance: Appliance
    token: str


class CameraSettings(BaseModel):
    """What an admin sets on a camera; fields left out stay as they are (``schedule: null`` clears it)."""

    model_config = ConfigDict(extra="forbid")
    policy: Policy | None = Field(None, description="approve: a drift's rebuild waits for a person; auto: queued")
    backend: str | None = Field(None, description="the scorer rebuilds fit (patchcore, padim)")
    settings: dict[str, Any] | None = Field(None, description="fit settings of rebuilds")
    schedule: str | None = Field(None, description="cron expression of scheduled rebuilds ('0 3 * * 0')")


class Stored(BaseModel):
    """Where the bytes of a frame went."""

    key: str
    size: int


_appliance_bearer = HTTPBearer(auto_error=False, scheme_name="appliance",
                               description="the appliance's token (appliance trainer add-appliance)")
_admin_bearer = HTTPBearer(auto_error=False, scheme_name="admin", description="one of the config's admin_tokens")
_ERRORS = {code: {"model": ErrorBody} for code in (401, 403, 404, 409, 413, 422, 503)}


def _unauthorized(why: str) -> HTTPException:
    return HTTPException(401, why, headers={"WWW-Authenticate": "Bearer"})


def _appliance(request: Request,
               credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_appliance_bearer)]) -> str:
    """The appliance the bearer token belongs to (401 without one, 403 for an admin's)."""
    if credentials is None:
        raise _unauthorized("send the appliance's token: Authorization: Bearer <token>")
    service: TrainerService = request.app.state.service
    appliance_id = service.catalogue.authenticate(credentials.credentials)
    if appliance_id is None:
        if _admin_name(request.app.state.admins, credentials.credentials) is not None:
            raise HTTPException(403, "an admin token cannot act as an appliance: use the appliance's token")
        raise _unauthorized("unknown or rotated token")
    return appliance_id


def _admin(request: Request,
           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)]) -> str:
    """The admin's name the bearer token belongs to (401 without one, 403 for an appliance's)."""
    if credentials is None:
        raise _unauthorized("send an admin token (admin_tokens in trainer.toml): Authorization: Bearer <token>")
    name = _admin_name(request.app.state.admins, credentials.credentials)
    if name is None:
        if request.app.state.service.catalogue.authenticate(credentials.credentials) is not None:
            raise HTTPException(403, "an appliance token cannot use admin routes")
        raise _unauthorized("unknown admin token")
    return name


ApplianceId = Annotated[str, Depends(_appliance)]
Admin = Annotated[str, Depends(_admin)]


def create_app(service: TrainerService, *, max_frame_bytes: int = MAX_FRAME_BYTES,
               max_json_bytes: int = MAX_JSON_BYTES) -> FastAPI:
    """The trainer's ASGI app: the API, ``/openapi.json``, ``/healthz`` and the page at ``/``."""
    app = FastAPI(title="anomaly-appliance trainer", version=__version__, docs_url=None, redoc_url=None,
                  description="Appliances register, upload the frames, labels and drift events they kept, and get "
                              "rebuilt models that passed the gate. Frames' bytes go to presigned URLs where the "
                              "blob store offers them.")
    app.state.service = service
    app.state.admins = {name: token.get_secret_value().encode() for name, token in service.config.admin_tokens.items()}
    app.add_middleware(BodyLimit, limit=lambda path: max_frame_bytes if path.endswith("/content") else max_json_bytes)
    _errors(app)
    ok = {"responses": _ERRORS}

    # ------------------------------------------------------------------ appliance routes
    @app.get(f"{API}/whoami", tags=["appliance"], **ok)
    def whoami(appliance_id: ApplianceId) -> Whoami:
        """The appliance the token belongs to."""
        return Whoami(appliance_id=appliance_id)

    @app.put(f"{API}/cameras/{{camera}}", tags=["appliance"], **ok)
    def report_camera(camera: str, report: CameraReport, appliance_id: ApplianceId) -> Camera:
        """Report a camera's running model and drift state."""
        return service.report_camera(appliance_id, camera, report.model_id, report.drift_state, report.drift_at)

    @app.post(f"{API}/frames/plan", tags=["appliance"], **ok)
    def plan_upload(meta: FrameMeta, appliance_id: ApplianceId) -> UploadPlan:
        """Whether the frame's bytes are needed, and where to PUT them."""
        return service.upload_plan(appliance_id, meta)

    @app.put(f"{API}/frames/{{sha256}}/content", tags=["appliance"], **ok, openapi_extra={"requestBody": {
        "required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def put_content(sha256: str, request: Request, appliance_id: ApplianceId,
                          camera: Annotated[str, Query(description="the frame's camera id")],
                          suffix: Annotated[str, Query(description="the file's suffix, e.g. .png")]) -> Stored:
        """The frame's bytes, when the plan gave no presigned URL (checked against the sha256)."""
        data = await request.body()
        key = await run_in_threadpool(service.put_content, appliance_id, camera, sha256, suffix, data)
        return Stored(key=key, size=len(data))

    @app.post(f"{API}/frames", tags=["appliance"], **ok)
    def finish_upload(meta: FrameMeta, appliance_id: ApplianceId) -> UploadDone:
        """Record a frame whose bytes were sent (idempotent: a resend answers known)."""
        return service.finish_upload(appliance_id, meta)

    @app.post(f"{API}/labels", tags=["appliance"], **ok)
    def add_labels(labels: list[Label], appliance_id: ApplianceId) -> Received:
        """Operator labels and their undoings."""
        return service.add_labels(appliance_id, labels)

    @app.post(f"{API}/drift", tags=["appliance"], **ok)
    def add_drift_events(events: list[DriftEvent], appliance_id: ApplianceId) -> Received:
        """Drift events; a raised drift asks for a rebuild as the camera's policy says."""
        return service.add_drift_events(appliance_id, events)

    @app.get(f"{API}/models", tags=["appliance"], **ok)
    def models(appliance_id: ApplianceId) -> list[Model]:
        """The published models of this appliance's cameras, newest first."""
        return service.published_models(appliance_id)

    # ------------------------------------------------------------------ admin routes
    adm = f"{API}/admin"

    @app.get(f"{adm}/appliances", tags=["admin"], **ok)
    def list_appliances(_: Admin) -> list[Appliance]:
        """Every registered appliance."""
        return service.appliances()

    @app.post(f"{adm}/appliances", tags=["admin"], status_code=201, **ok)
    def register_appliance(body: NewAppliance, _: Admin) -> Token:
        """Register an appliance; the answer holds its token, shown this once."""
        registered, token = service.register_appliance(body.id, body.name)
        return Token(appliance=registered, token=token)

    @app.post(f"{adm}/appliances/{{appliance_id}}/token", tags=["admin"], **ok)
    def rotate_token(appliance_id: str, _: Admin) -> Token:
        """A new token for an appliance; the old one stops working at once."""
        rotated, token = service.rotate_token(appliance_id)
        return Token(appliance=rotated, token=token)

    @app.get(f"{adm}/cameras", tags=["admin"], **ok)
    def list_cameras(_: Admin, appliance: str | None = None) -> list[Camera]:
        """Cameras (of one appliance)."""
        return service.cameras(appliance)

    @app.patch(f"{adm}/appliances/{{appliance_id}}/cameras/{{camera}}", tags=["admin"], **ok)
    def configure_camera(appliance_id: str, camera: str, body: CameraSettings, _: Admin) -> Camera:
        """Set a camera's rebuild policy, backend, fit settings or schedule."""
        fields = {k: getattr(body, k) for k in body.model_fields_set}
        fields = {k: v for k, v in fields.items() if v is not None or k == "schedule"}
        if fields.get("schedule") == "":
            fields["schedule"] = None
        return service.configure_camera(appliance_id, camera, **fields)

    @app.post(f"{adm}/appliances/{{appliance_id}}/cameras/{{camera}}/rebuild", tags=["admin"], status_code=201,
              **ok)
    def request_rebuild(appliance_id: str, camera: str, who: Admin) -> Job:
        """Queue a rebuild of a camera's model now (409 if it has an open job)."""
        return service.request_rebuild(appliance_id, camera, who)

    @app.get(f"{adm}/datasets", tags=["admin"], **ok)
    def list_datasets(_: Admin, appliance: str | None = None, camera: str | None = None) -> list[Dataset]:
        """Dataset versions, newest first."""
        return service.datasets(appliance, camera)

    @app.get(f"{adm}/jobs", tags=["admin"], **ok)
    def list_jobs(_: Admin, status: Annotated[list[JobStatus] | None, Query()] = None, appliance: str | None = None,
                  camera: str | None = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 200) -> list[Job]:
        """Jobs, newest first."""
        return service.jobs(status, appliance, camera, limit)

    @app.get(f"{adm}/jobs/{{job_id}}", tags=["admin"], **ok)
    def get_job(job_id: int, _: Admin) -> Job:
        """One job."""
        return service.job(job_id)

    @app.post(f"{adm}/jobs/{{job_id}}/approve", tags=["admin"], **ok)
    def approve(job_id: int, who: Admin) -> Job:
        """Queue a job that awaits approval."""
        return service.approve(job_id, who)

    @app.post(f"{adm}/jobs/{{job_id}}/cancel", tags=["admin"], **ok)
    def cancel(job_id: int, who: Admin) -> Job:
        """Cancel a job that has not started."""
        return service.cancel(job_id, who)

    @app.get(f"{adm}/models", tags=["admin"], **ok)
    def list_models(_: Admin, appliance: str | None = None, camera: str | None = None,
                    status: ModelStatus | None = None) -> list[Model]:
        """Models, newest first."""
        return service.models(appliance, camera, status)

    @app.get(f"{adm}/evaluations", tags=["admin"], **ok)
    def list_evaluations(_: Admin, model: str | None = None) -> list[Evaluation]:
        """Gate evaluations, newest first."""
        return service.evaluations(model)

    # ------------------------------------------------------------------ health and the page
    @app.get("/healthz", tags=["page"])
    def healthz() -> dict[str, str]:
        """Whether the catalogue answers (for load balancers and systemd checks)."""
        service.catalogue.job(0)  # a primary-key lookup: cheap however large the catalogue
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, tags=["page"])
    def page() -> HTMLResponse:
        """The trainer's page: appliances, cameras, datasets, jobs, models and their evaluations."""
        from .page import render

        return HTMLResponse(render(service), headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})

    assets = {name: resources.files("appliance.trainer").joinpath(f"web/{name}").read_bytes() for name in STATIC}

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(assets[name], media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    return app


def _admin_name(admins: dict[str, bytes], token: str) -> str | None:
    """The admin a token belongs to; every configured token is compared, in constant time."""
    found = None
    for name, expected in admins.items():
        if hmac.compare_digest(expected, token.encode()):
            found = name
    return found


def _errors(app: FastAPI) -> None:
    """Every error as ``{"error": "..."}``: the client shows the message as it is."""

    @app.exception_handler(TrainerError)
    async def trainer_error(_: Request, exc: TrainerError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status or 500)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": "invalid request: " + "; ".join(problems[:10]),
                             "detail": jsonable_encoder(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:  # a bug or the storage down: retry later
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the trainer's log has the details"},
                            status_code=500)

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, exc: ValueError) -> JSONResponse:  # a blob key or an id the storage refused
        return JSONResponse({"error": str(exc)}, status_code=422)


class BodyLimit:
    """Refuses request bodies over ``limit(path)`` bytes with 413, by Content-Length or while reading.

    A plain ASGI middleware, so one counter covers JSON bodies FastAPI parses and the raw frames
    the content route reads itself. Before answering it reads and discards the rest of a body of up
    to ``DRAIN_BYTES`` more: closing a socket with unread data sends a reset, which can destroy the
    413 before the client has read it (a client then sees "connection reset", not the reason).
    """

    #: Bytes past the limit read and thrown away so that the refusal arrives; a larger body is cut off.
    DRAIN_BYTES = 8 * 1024 * 1024

    def __init__(self, app: ASGIApp, limit: Callable[[str], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on with a counting ``receive``; answer 413 at once if the length is too large."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._drain(receive, 0, limit)
            response = JSONResponse({"error": f"body of {int(length)} bytes is over the limit of {limit}"},
                                    status_code=413, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                if message.get("more_body", False):
                    await self._drain(receive, seen, limit)
                raise HTTPException(413, f"body over the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)

    async def _drain(self, receive: Receive, seen: int, limit: int) -> None:
        """Read and drop the body's rest, up to ``DRAIN_BYTES`` past the limit."""
        while seen <= limit + self.DRAIN_BYTES:
            message = await receive()
            seen += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
