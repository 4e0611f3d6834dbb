"""Read-only HTTP: a live page per camera for the HMI, JSON status, Prometheus metrics, health.

An output like any other: ``publish`` keeps a short summary of each record in a per-camera ring
buffer (the page's trend and verdict), while an aiohttp server on the daemon's asyncio loop
serves the pages and the daemon's snapshot. Everything is GET and read-only: nothing here can
change the daemon, so the only risk of exposing it is disclosure, and it binds to loopback
unless configured otherwise.

Routes: ``/`` (cameras), ``/camera/{id}`` (live page), ``/api/status``,
``/api/cameras/{id}/recent?n=`` (results, counts, readiness and which inspection the latest image
shows), ``/api/cameras/{id}/latest.png?id=`` and ``/api/cameras/{id}/thumb.jpg?id=`` (the latest
image, or that inspection's while still held), ``/metrics``, ``/healthz``. The latest image comes
from the overlay output in memory (``context.latest``), else from ``<camera>/latest.png``.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import html
import json
import logging
import math
import socket
import string
import threading
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field, SecretStr

from ...errors import ApplianceError, ImageError, PublishError
from ..commands import parse_command
from ..latest import LatestImage, read_latest_file, thumbnail
from ..records import VERDICTS, Inspection
from ..status import Status
from .base import Delivery, OutputContext, Publisher, PublisherConfig, register_publisher, run_on_loop
from .http_pages import Card, image_info, index_page, readiness

log = logging.getLogger(__name__)

#: The page's files (HTML template, script, style), shipped as package data beside the daemon.
ASSETS = ("page.html", "page.js", "page.css")
_STATIC_TYPES = {"page.js": "text/javascript", "page.css": "text/css"}
_NO_STORE = {"Cache-Control": "no-store"}
# No inline script or style, nothing from elsewhere: the page works offline and an id that slipped
# past escaping still could not run.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'")


class HttpConfig(PublisherConfig):
    """Where the read-only web server listens and how much history it keeps."""

    type: Literal["http"] = "http"
    host: str = Field("127.0.0.1", min_length=1,
                      description="address to listen on; loopback by default, so only a browser on this machine "
                                  "(the HMI panel) sees the pages: set 0.0.0.0 or one interface's address to serve "
                                  "them to the plant network")
    port: int = Field(8080, ge=0, le=65535, description="TCP port to listen on (0: any free port, for tests)")
    history: int = Field(300, ge=1, le=100_000,
                         description="inspections kept per camera for the live page's trend and /recent")
    overlay_dir: Path | None = Field(None, description="folder holding <camera>/latest.png as the overlay output "
                                                       "writes it, read only while no overlay output in this "
                                                       "daemon has drawn an image; default <state_dir>/overlays")
    timeout: float = Field(10.0, gt=0, description="seconds to wait for the server to start or stop")
    label_tokens: dict[str, SecretStr] = Field(
        default_factory=dict, description="operator name -> token: who holds one may label inspections from the "
                                          "live page (teaching the model is a write); none: the page is read-only")


def summarize(inspection: Inspection) -> dict[str, Any]:
    """The few fields of a record the live page needs (no pixels, no map), JSON-ready."""
    total = inspection.latency_ms.get("total")
    return {
        "id": inspection.id, "seq": inspection.seq, "time": _num(inspection.finished_at),
        "captured_at": _num(inspection.captured_at),
        "verdict": inspection.verdict, "score": _num(inspection.score), "threshold": _num(inspection.threshold),
        "threshold_source": inspection.threshold_source, "raw_score": _num(inspection.raw_score),
        "trigger_id": inspection.trigger_id, "error": inspection.error, "latency_ms": _num(total),
        "overlay_path": inspection.overlay_path, "model_id": inspection.model_id,
    }


@register_publisher
class HttpPublisher(Publisher):
    """The live HMI page, ``/api/status``, ``/metrics`` and ``/healthz`` on the daemon's loop.

    ``publish`` runs on the output's worker thread and the request handlers on the loop, so the
    ring buffers are guarded by one lock. ``start``/``close`` may be called from any thread but
    the loop's own (there, await ``start_async``/``stop_async``).
    """

    type = "http"
    Config = HttpConfig

    def __init__(self, config: HttpConfig, context: OutputContext) -> None:
        super().__init__(config, context)
        self.config: HttpConfig = config
        self._lock = threading.Lock()
        self._recent: dict[str, deque[dict[str, Any]]] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._assets: dict[str, str] = {}
        self._thumbs: dict[str, tuple[tuple[str | None, float], bytes]] = {}  # per camera: (image, JPEG)
        self._files: dict[Path, tuple[tuple[int, int, int], LatestImage | None]] = {}  # latest.png read, by stat

    # ------------------------------------------------------------------ the output side

    @property
    def port(self) -> int | None:
        """The port actually listened on (useful with ``port = 0``), ``None`` until started."""
        return self._port

    @property
    def url(self) -> str | None:
        """Base URL of the server, ``None`` until started."""
        if self._port is None:
            return None
        host = self.config.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self._port}"

    def camera_url(self, camera: str) -> str:
        """URL of a camera's live page."""
        return f"{self.url or ''}/camera/{quote(camera, safe='')}"

    def publish(self, inspection: Inspection) -> Delivery:
        """Remember a summary of the record for the page and count its verdict."""
        item = summarize(inspection)
        with self._lock:
            buffer = self._recent.get(inspection.camera)
            if buffer is None:
                buffer = self._recent[inspection.camera] = deque(maxlen=self.config.history)
                self._counts[inspection.camera] = dict.fromkeys(VERDICTS, 0)
            buffer.append(item)
            self._counts[inspection.camera][inspection.verdict] += 1
        return Delivery("sent", detail=self.camera_url(inspection.camera))

    def recent(self, camera: str, n: int | None = None) -> dict[str, Any]:
        """The last ``n`` summaries of a camera (oldest first) and its verdict counts since start."""
        with self._lock:
            items = list(self._recent.get(camera, ()))
            counts = dict(self._counts.get(camera, dict.fromkeys(VERDICTS, 0)))
        return {"camera": camera, "counts": counts, "items": items[-n:] if n else items}

    @classmethod
    def check(cls, config: PublisherConfig, state_dir: Path) -> tuple[str, str]:
        """The port is free, or this appliance's own server answers on it."""
        host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
        url = f"http://{host}:{config.port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=3) as answer:
                return "ok", f"the appliance answers on {url} ({answer.status})"
        except urllib.error.HTTPError as exc:
            return ("ok", f"the appliance answers on {url} (unhealthy: {exc.code})") if exc.code == 503 else (
                "fail", f"port {config.port} answers but not as this appliance ({exc.code})")
        except OSError:
            pass
        try:
            with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((config.host, config.port))
        except OSError as exc:
            return "fail", f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        return "ok", f"{config.host}:{config.port} is free"

    def state(self) -> dict[str, Any]:
        """Where the pages are served."""
        return {"url": self.url, "listening": self._runner is not None}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start serving on the daemon's loop; ``PublishError`` if the port is taken or there is no loop."""
        run_on_loop(self.context.loop, self.start_async(), self.config.timeout, self.type, "start")

    def close(self) -> None:
        """Stop serving and close open connections; never raises."""
        if self._runner is None:
            return
        try:
            run_on_loop(self.context.loop, self.stop_async(), self.config.timeout, self.type, "stop")
        except Exception as exc:  # close must not raise: the daemon is shutting down anyway
            log.warning("http output did not stop cleanly: %s", exc)

    async def start_async(self) -> None:
        """Start serving (on the running loop); a second call does nothing."""
        if self._runner is not None:
            return
        self._assets = _load_assets()
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=min(self.config.timeout, 2.0))
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise PublishError(_listen_error(self.config.host, self.config.port, exc)) from exc
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("http output serving %s", self.url)

    async def stop_async(self) -> None:
        """Stop serving; a second call does nothing."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # ------------------------------------------------------------------ the web side

    def _app(self) -> web.Application:
        app = web.Application()
        app.on_response_prepare.append(_security_headers)
        add = app.router.add_get
        add("/", self._index)
        add("/camera/{camera}", self._camera_page)
        add("/static/{name}", self._static)
        add("/api/status", self._api_status)
        add("/api/cameras/{camera}/recent", self._api_recent)
        add("/api/cameras/{camera}/latest.png", self._latest_png)
        add("/api/cameras/{camera}/thumb.jpg", self._thumbnail)
        add("/metrics", self._metrics)
        add("/healthz", self._healthz)
        app.router.add_post("/api/inspections/{inspection}/label", self._label)
        app.router.add_post("/api/labels/{label}/undo", self._unlabel)
        return app

    def _operator(self, request: web.Request) -> str:
        """The operator whose token the request carries (``Authorization: Bearer <token>``), or 401/403."""
        if not self.config.label_tokens:
            raise web.HTTPForbidden(text=json.dumps({"error": "labelling from the page is off: the http output "
                                                              "has no label_tokens"}), content_type="application/json")
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        for name, token in self.config.label_tokens.items():
            if given and hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
                return name
        raise web.HTTPUnauthorized(text=json.dumps({"error": "sign in: a valid operator token is needed"}),
                                   content_type="application/json")

    async def _write(self, request: web.Request, command: dict[str, Any]) -> web.Response:
        """Run a labelling command as the signed-in operator through the daemon's dispatcher."""
        command["who"] = f"page:{self._operator(request)}"
        if self.context.control is None:
            return _json({"error": "this daemon takes no commands"}, 503)
        try:
            result = await self.context.control(parse_command(command))
        except ApplianceError as exc:
            return _json({"error": str(exc)}, 400)
        return _json(result)

    async def _label(self, request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return _json({"error": "the body is not JSON"}, 400)
        if not isinstance(body, dict):
            return _json({"error": "the body is a JSON object with label (good or defect) and note"}, 400)
        return await self._write(request, {"cmd": "label", "inspection": request.match_info["inspection"],
                                           "label": body.get("label"), "note": body.get("note")})

    async def _unlabel(self, request: web.Request) -> web.Response:
        return await self._write(request, {"cmd": "unlabel", "label_id": request.match_info["label"]})

    def _snapshot(self) -> tuple[Status | None, str | None]:
        """The daemon's typed snapshot, or ``None`` and why (logged) when the daemon cannot give one."""
        try:
            return self.context.status(), None
        except Exception as exc:
            log.warning("http output: the daemon's status failed: %s", exc)
            return None, f"the daemon's status is unavailable: {exc}"

    def _cameras(self, status: Status | None) -> list[str]:
        """Known cameras: the daemon's, then any only seen in records."""
        known = list(status.cameras) if status is not None else []
        with self._lock:
            known += [c for c in self._recent if c not in known]
        return known

    def _known_camera(self, request: web.Request, api: bool = True) -> tuple[str, Status | None]:
        """The request's camera id, checked against the known ones (404 otherwise: ids are not paths)."""
        camera = request.match_info["camera"]
        status, _ = self._snapshot()
        known = self._cameras(status)
        if camera not in known:
            message = f"unknown camera {camera!r}; known: {', '.join(sorted(known)) or 'none'}"
            if api:
                raise web.HTTPNotFound(text=json.dumps({"error": message}), content_type="application/json")
            raise web.HTTPNotFound(text=message)
        return camera, status

    async def _index(self, request: web.Request) -> web.Response:
        status, problem = self._snapshot()
        cards = []
        for cam in self._cameras(status):
            st = status.cameras.get(cam) if status is not None else None
            own = self.recent(cam, 1)
            last = st.last.model_dump() if st is not None and st.last is not None else (
                own["items"][-1] if own["items"] else None)  # the daemon's newest, else the one this output saw
            counts = dict(st.counts) if st is not None and st.counts else own["counts"]
            cards.append(Card(cam, st, last, counts, await self._latest(cam)))
        page = index_page(cards, status.daemon if status is not None else None, problem)
        return web.Response(text=page, content_type="text/html", headers=_NO_STORE)

    async def _camera_page(self, request: web.Request) -> web.Response:
        camera, _ = self._known_camera(request, api=False)
        page = string.Template(self._assets["page.html"]).substitute(
            camera=html.escape(camera), history=str(self.config.history))
        return web.Response(text=page, content_type="text/html", headers=_NO_STORE)

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC_TYPES:
            raise web.HTTPNotFound()
        return web.Response(text=self._assets[name], content_type=_STATIC_TYPES[name],
                            headers={"Cache-Control": "no-cache"})

    async def _api_status(self, request: web.Request) -> web.Response:
        status, problem = self._snapshot()
        if status is None:
            return _json({"error": problem}, 503)
        return _json(status.to_json())

    async def _api_recent(self, request: web.Request) -> web.Response:
        camera, status = self._known_camera(request)
        try:
            n = int(request.query.get("n", "100"))
        except ValueError:
            n = 0
        if n < 1:
            return _json({"error": "n must be a positive integer"}, 400)
        data = self.recent(camera, min(n, self.config.history))
        data["latest_image"] = image_info(await self._latest(camera), camera)
        data["ready"] = readiness(status.cameras.get(camera), status.daemon) if status is not None else {
            "ready": False, "why": ["the daemon's status is unavailable"]}
        return _json(data)

    async def _latest_png(self, request: web.Request) -> web.Response:
        camera, _ = self._known_camera(request)
        wanted = request.query.get("id")
        image = await self._latest(camera, wanted)
        if image is None:
            why = f"the image of inspection {wanted} is no longer held" if wanted else "no overlay yet"
            raise web.HTTPNotFound(text=json.dumps({"error": f"camera {camera!r}: {why}"}),
                                   content_type="application/json", headers=_NO_STORE)
        return web.Response(body=image.data, content_type=image.content_type, headers=_image_headers(image))

    async def _thumbnail(self, request: web.Request) -> web.Response:
        camera, _ = self._known_camera(request)
        image = await self._latest(camera, request.query.get("id"))
        if image is None:
            raise web.HTTPNotFound(text=json.dumps({"error": f"camera {camera!r}: no such image"}),
                                   content_type="application/json", headers=_NO_STORE)
        key = (image.inspection_id, image.drawn_at)
        cached = self._thumbs.get(camera)
        if cached is None or cached[0] != key:
            try:
                cached = self._thumbs[camera] = (key, await asyncio.to_thread(thumbnail, image))
            except ImageError as exc:
                raise web.HTTPNotFound(text=json.dumps({"error": str(exc)}), content_type="application/json",
                                       headers=_NO_STORE) from None
        return web.Response(body=cached[1], content_type="image/jpeg", headers=_image_headers(image))

    async def _latest(self, camera: str, inspection_id: str | None = None) -> LatestImage | None:
        """The camera's latest image (or that inspection's, while held): the overlay output's, else the file's.

        The in-memory image is the one to show; ``latest.png`` is read only when no overlay output
        runs in this process (or has drawn nothing yet), e.g. a separate overlay writer.
        """
        store = self.context.latest
        if store is not None and store.get(camera) is not None:
            return store.get(camera, inspection_id)
        path = self._latest_path(camera)
        if path is None:
            return None
        image = await asyncio.to_thread(self._read_file, path)
        if image is None or (inspection_id is not None and image.inspection_id != inspection_id):
            return None
        return image

    def _read_file(self, path: Path) -> LatestImage | None:
        """``read_latest_file``, kept while the file is unchanged (the page asks every second)."""
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._files.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        image = read_latest_file(path)
        self._files[path] = (key, image)
        return image

    def _latest_path(self, camera: str) -> Path | None:
        """``<overlay_dir>/<camera>/latest.png``, or ``None`` if the id would lead outside that folder."""
        root = Path(self.config.overlay_dir or Path(self.context.state_dir) / "overlays")
        path = root / camera / "latest.png"
        return path if path.resolve().is_relative_to(root.resolve()) else None

    async def _metrics(self, request: web.Request) -> web.Response:
        data = await asyncio.to_thread(generate_latest, self.context.registry)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST, **_NO_STORE})

    async def _healthz(self, request: web.Request) -> web.Response:
        """200 ``ok`` only when every camera makes progress and no alarm is raised (a full disk is an alarm)."""
        try:
            daemon = self.context.status().daemon
        except Exception as exc:
            return _json({"status": "unhealthy", "reasons": [f"the daemon's status is unavailable: {exc}"]}, 503)
        alarms = [f"{a.kind}: {a.detail}" for a in daemon.alarms]
        if daemon.healthy and not alarms:
            return _json({"status": "ok"})
        state = "unhealthy" if not daemon.healthy else "alarm"
        return _json({"status": state, "reasons": list(daemon.unhealthy) + alarms, "alarms": alarms}, 503)


# ---------------------------------------------------------------------- helpers


def _load_assets() -> dict[str, str]:
    folder = resources.files("appliance.daemon").joinpath("web")
    try:
        return {name: folder.joinpath(name).read_text(encoding="utf-8") for name in ASSETS}
    except OSError as exc:
        raise PublishError(f"the http output's page files are missing ({exc}): reinstall the package") from exc


def _listen_error(host: str, port: int, exc: OSError) -> str:
    where = f"http output cannot listen on {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (f"{where}: the port is in use (another program, or a second daemon, holds it); stop that program "
                "or set this output's port to a free one")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: no interface of this machine has that address; set host to one that exists (or 0.0.0.0)"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges); use a port of 1024 or above"
    return f"{where}: {exc.strerror or exc}; check host and port in this output's config"


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Content-Security-Policy", _CSP)


def _image_headers(image: LatestImage) -> dict[str, str]:
    """No caching, and which inspection the image shows (for API clients; the page asks by id)."""
    headers = dict(_NO_STORE)
    if image.inspection_id:
        headers["X-Inspection-Id"] = image.inspection_id
    return headers


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(_jsonable(data), separators=(",", ":"), allow_nan=False), status=status,
                        content_type="application/json", headers=_NO_STORE)


def _jsonable(value: Any) -> Any:
    """Plain JSON types: NaN and infinities become ``null`` (browsers reject them), NumPy scalars numbers."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset | deque):
        return [_jsonable(v) for v in value]
    item = getattr(value, "item", None)  # NumPy scalars
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _num(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


