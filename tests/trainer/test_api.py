"""The trainer's HTTP API on a real uvicorn server on loopback, spoken to with real HTTP (httpx): tokens and
scoping, bodies too large or invalid, the admin routes, the OpenAPI document, and the page with real data."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from http.client import HTTPConnection
from pathlib import Path

import httpx
import jsonschema
import pytest
from pydantic import SecretStr

from appliance.trainer.api import create_app
from appliance.trainer.config import EmbeddedStorageConfig, TrainerConfig
from appliance.trainer.queue import JobQueue
from appliance.trainer.records import DatasetMember, DatasetRule, DriftEvent, Model
from appliance.trainer.service import TrainerService
from appliance.trainer.storage import open_storage

pytestmark = pytest.mark.timeout(120)

ADMIN = "admin-token-for-tests"


class FakeQueue(JobQueue):
    """Notes the job ids it is handed (the real queues have their own tests)."""

    def __init__(self) -> None:
        self.enqueued: list[int] = []

    def enqueue(self, job_id: int, delay_s: float = 0.0) -> None:
        self.enqueued.append(job_id)

    def work(self, handler, stop: threading.Event, concurrency: int = 1) -> None:
        raise AssertionError("not here")


@contextmanager
def running_trainer(service: TrainerService, extra=None, **limits: int) -> Iterator[str]:
    """``create_app(service)`` served by uvicorn on a free loopback port in a thread; yields its base URL.

    ``extra(app)`` may add routes first (a test page for the browser).
    """
    import uvicorn

    app = create_app(service, **limits)
    if extra is not None:
        extra(app)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def trainer_config(folder: Path) -> TrainerConfig:
    return TrainerConfig(storage=EmbeddedStorageConfig(folder=folder), admin_tokens={"ann": SecretStr(ADMIN)})


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def service(tmp_path, queue) -> Iterator[TrainerService]:
    cfg = trainer_config(tmp_path / "trainer")
    storage = open_storage(cfg)
    yield TrainerService(storage, queue, cfg)
    storage.close()


@pytest.fixture
def url(service) -> Iterator[str]:
    with running_trainer(service, max_frame_bytes=256 * 1024, max_json_bytes=64 * 1024) as base:
        yield base


@pytest.fixture
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=10) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ADMIN_HEADERS = bearer(ADMIN)


def register(http: httpx.Client, appliance: str) -> dict[str, str]:
    answer = http.post("/api/v1/admin/appliances", json={"id": appliance, "name": appliance.upper()},
                       headers=ADMIN_HEADERS)
    assert answer.status_code == 201, answer.text
    assert answer.json()["appliance"]["id"] == appliance
    return bearer(answer.json()["token"])


def frame(data: bytes, inspection: str = "i-1", camera: str = "line1") -> dict:
    return {"camera_id": camera, "inspection_id": inspection, "sha256": hashlib.sha256(data).hexdigest(),
            "suffix": ".png", "size": len(data), "captured_at": time.time(), "verdict": "ng", "score": 0.9,
            "reasons": ["reject"]}


def png(textures, seed: int = 0) -> bytes:
    import cv2
    import numpy as np

    return cv2.imencode(".png", textures.good(np.random.default_rng(seed), (64, 96)))[1].tobytes()


# ---------------------------------------------------------------------- tokens and scoping
def test_no_token_or_a_wrong_one_is_401_with_a_message(http):
    for headers in ({}, bearer("nope"), {"Authorization": "Basic Zm9vOmJhcg=="}):
        for method, path in (("GET", "/api/v1/models"), ("GET", "/api/v1/admin/jobs")):
            answer = http.request(method, path, headers=headers)
            assert answer.status_code == 401, (path, headers, answer.text)
            assert answer.json()["error"] and answer.headers["www-authenticate"] == "Bearer"


def test_an_appliance_token_is_no_admin_and_an_admin_no_appliance(http):
    edge = register(http, "edge-1")
    assert http.get("/api/v1/whoami", headers=edge).json() == {"appliance_id": "edge-1"}
    answer = http.get("/api/v1/admin/jobs", headers=edge)
    assert answer.status_code == 403 and "appliance token" in answer.json()["error"]
    assert http.get("/api/v1/models", headers=ADMIN_HEADERS).status_code == 403


def test_an_appliance_reaches_only_its_own_data(http, service, textures):
    one, two = register(http, "edge-1"), register(http, "edge-2")
    data = png(textures)
    assert http.post("/api/v1/frames/plan", json=frame(data), headers=one).json()["status"] == "upload"
    sha = hashlib.sha256(data).hexdigest()
    put = http.put(f"/api/v1/frames/{sha}/content", params={"camera": "line1", "suffix": ".png"}, content=data,
                   headers=one)
    assert put.status_code == 200, put.text
    assert http.post("/api/v1/frames", json=frame(data), headers=one).json()["status"] == "recorded"
    # The second appliance names the same camera and frame: it gets its own, never the first one's.
    plan = http.post("/api/v1/frames/plan", json=frame(data), headers=two).json()
    assert plan["status"] == "upload" and plan["key"].startswith("frames/edge-2/")
    assert http.post("/api/v1/frames", json=frame(data), headers=two).status_code == 409
    service.catalogue.add_model(Model(id="m-1", appliance_id="edge-1", camera_id="line1", status="published",
                                      created_at=time.time()))
    assert [m["id"] for m in http.get("/api/v1/models", headers=one).json()] == ["m-1"]
    assert http.get("/api/v1/models", headers=two).json() == []
    assert len(service.catalogue.frames("edge-1")) == 1 and service.catalogue.frames("edge-2") == []


def test_a_rotated_token_stops_working(http):
    old = register(http, "edge-1")
    answer = http.post("/api/v1/admin/appliances/edge-1/token", headers=ADMIN_HEADERS)
    assert answer.status_code == 200
    assert http.get("/api/v1/whoami", headers=old).status_code == 401
    assert http.get("/api/v1/whoami", headers=bearer(answer.json()["token"])).status_code == 200
    assert http.post("/api/v1/admin/appliances/nobody/token", headers=ADMIN_HEADERS).status_code == 404


# ---------------------------------------------------------------------- bodies
def test_invalid_bodies_are_422_saying_what_is_wrong(http, textures):
    edge = register(http, "edge-1")
    bad = {**frame(png(textures)), "sha256": "XYZ"}
    answer = http.post("/api/v1/frames/plan", json=bad, headers=edge)
    assert answer.status_code == 422 and "sha256" in answer.json()["error"]
    answer = http.post("/api/v1/labels", content=b"{not json", headers={**edge, "Content-Type": "application/json"})
    assert answer.status_code == 422 and "error" in answer.json()
    data = png(textures)
    answer = http.put(f"/api/v1/frames/{hashlib.sha256(b'other').hexdigest()}/content",
                      params={"camera": "line1", "suffix": ".png"}, content=data, headers=edge)
    assert answer.status_code == 422 and "sha256" in answer.json()["error"]
    answer = http.put(f"/api/v1/cameras/{'x' * 80}", json={}, headers=edge)
    assert answer.status_code == 422 and "camera" in answer.json()["error"]


def test_bodies_over_the_limit_are_413_by_length_or_while_streaming(http, url, textures):
    edge = register(http, "edge-1")
    big = b"\0" * (256 * 1024 + 1)
    sha = hashlib.sha256(big).hexdigest()
    answer = http.put(f"/api/v1/frames/{sha}/content", params={"camera": "line1", "suffix": ".png"}, content=big,
                      headers=edge)
    assert answer.status_code == 413 and "limit" in answer.json()["error"]
    labels = [{"id": f"L{i}", "camera_id": "line1", "inspection_id": f"i-{i}", "label": "good", "who": "ann",
               "at": 1.0, "note": "x" * 100} for i in range(1000)]
    assert http.post("/api/v1/labels", json=labels, headers=edge).status_code == 413
    # Chunked: no Content-Length to refuse up front; the count while reading stops it.
    host, port = url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=10)
    conn.request("PUT", f"/api/v1/frames/{sha}/content?camera=line1&suffix=.png",
                 body=iter([big[:100_000], big[100_000:200_000], big[200_000:]]), encode_chunked=True,
                 headers={**edge, "Content-Type": "application/octet-stream"})
    reply = conn.getresponse()
    assert reply.status == 413, reply.read()
    conn.close()


# ---------------------------------------------------------------------- admin routes
def test_admin_sets_a_camera_requests_approves_and_cancels_jobs(http, queue):
    edge = register(http, "edge-1")
    assert http.put("/api/v1/cameras/line1", json={"model_id": "m-1", "drift_state": "ok"},
                    headers=edge).status_code == 200
    patch = "/api/v1/admin/appliances/edge-1/cameras/line1"
    answer = http.patch(patch, json={"schedule": "sometimes"}, headers=ADMIN_HEADERS)
    assert answer.status_code == 422 and "cron" in answer.json()["error"]
    answer = http.patch(patch, json={"policy": "maybe"}, headers=ADMIN_HEADERS)
    assert answer.status_code == 422
    answer = http.patch(patch, json={"schedule": "0 3 * * 0", "policy": "approve"}, headers=ADMIN_HEADERS)
    assert answer.json()["schedule"] == "0 3 * * 0" and answer.json()["model_id"] == "m-1"
    assert http.patch(patch, json={"schedule": None}, headers=ADMIN_HEADERS).json()["schedule"] is None
    # Drift -> a job awaiting approval; approving queues it; a request meanwhile is 409.
    drift = [{"id": "d1", "camera_id": "line1", "kind": "drift_raised", "at": time.time(), "stats": {"p": 0.001}}]
    job = http.post("/api/v1/drift", json=drift, headers=edge).json()["jobs"][0]
    assert job["status"] == "awaiting_approval"
    listed = http.get("/api/v1/admin/jobs", params={"status": "awaiting_approval"}, headers=ADMIN_HEADERS).json()
    assert [j["id"] for j in listed] == [job["id"]]
    rebuild = "/api/v1/admin/appliances/edge-1/cameras/line1/rebuild"
    answer = http.post(rebuild, headers=ADMIN_HEADERS)
    assert answer.status_code == 409 and f"job {job['id']}" in answer.json()["error"]
    approved = http.post(f"/api/v1/admin/jobs/{job['id']}/approve", headers=ADMIN_HEADERS)
    assert approved.status_code == 200 and approved.json()["approved_by"] == "ann"
    assert queue.enqueued == [job["id"]]
    assert http.post(f"/api/v1/admin/jobs/{job['id']}/approve", headers=ADMIN_HEADERS).status_code == 409
    assert http.post(f"/api/v1/admin/jobs/{job['id']}/cancel", headers=ADMIN_HEADERS).json()["status"] == "cancelled"
    requested = http.post(rebuild, headers=ADMIN_HEADERS)
    assert requested.status_code == 201 and requested.json()["reason"] == "request"
    assert http.get("/api/v1/admin/jobs/424242", headers=ADMIN_HEADERS).status_code == 404
    assert http.post("/api/v1/admin/appliances", json={"id": "edge-1"}, headers=ADMIN_HEADERS).status_code == 409
    cameras = http.get("/api/v1/admin/cameras", params={"appliance": "edge-1"}, headers=ADMIN_HEADERS).json()
    assert [c["camera_id"] for c in cameras] == ["line1"]
    assert [a["id"] for a in http.get("/api/v1/admin/appliances", headers=ADMIN_HEADERS).json()] == ["edge-1"]


# ---------------------------------------------------------------------- the OpenAPI document
ROUTES = {
    "/api/v1/whoami": {"get"}, "/api/v1/cameras/{camera}": {"put"}, "/api/v1/frames/plan": {"post"},
    "/api/v1/frames/{sha256}/content": {"put"}, "/api/v1/frames": {"post"}, "/api/v1/labels": {"post"},
    "/api/v1/drift": {"post"}, "/api/v1/models": {"get"},
    "/api/v1/admin/appliances": {"get", "post"}, "/api/v1/admin/appliances/{appliance_id}/token": {"post"},
    "/api/v1/admin/cameras": {"get"}, "/api/v1/admin/appliances/{appliance_id}/cameras/{camera}": {"patch"},
    "/api/v1/admin/appliances/{appliance_id}/cameras/{camera}/rebuild": {"post"},
    "/api/v1/admin/datasets": {"get"}, "/api/v1/admin/jobs": {"get"}, "/api/v1/admin/jobs/{job_id}": {"get"},
    "/api/v1/admin/jobs/{job_id}/approve": {"post"}, "/api/v1/admin/jobs/{job_id}/cancel": {"post"},
    "/api/v1/admin/models": {"get"}, "/api/v1/admin/evaluations": {"get"}, "/healthz": {"get"}, "/": {"get"},
}


def test_the_openapi_document_names_every_route_and_its_schemas_fit_real_answers(http):
    doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.") and doc["info"]["title"]
    assert {path: set(ops) for path, ops in doc["paths"].items()} == ROUTES
    schemes = doc["components"]["securitySchemes"]
    assert {s["scheme"] for s in schemes.values()} == {"bearer"} and set(schemes) == {"appliance", "admin"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert (op.get("summary") and "200" in op["responses"]) or "201" in op["responses"], (path, method)
            if path.startswith("/api/v1/admin"):
                assert op["security"] == [{"admin": []}], path
            elif path.startswith("/api/v1"):
                assert op["security"] == [{"appliance": []}], path
    content = doc["paths"]["/api/v1/frames/{sha256}/content"]["put"]["requestBody"]["content"]
    assert "application/octet-stream" in content
    # The document's own schemas validate what the server really answers.
    edge = register(http, "edge-1")
    http.put("/api/v1/cameras/line1", json={"model_id": "m-1"}, headers=edge)
    drift = [{"id": "d1", "camera_id": "line1", "kind": "drift_raised", "at": time.time()}]
    answers = {
        "Received": http.post("/api/v1/drift", json=drift, headers=edge).json(),
        "Camera": http.put("/api/v1/cameras/line1", json={}, headers=edge).json(),
        "ErrorBody": http.get("/api/v1/models").json(),
    }
    for name, answer in answers.items():
        schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        jsonschema.Draft202012Validator(schema).validate(answer)
    jobs = http.get("/api/v1/admin/jobs", headers=ADMIN_HEADERS).json()
    jobs_schema = doc["paths"]["/api/v1/admin/jobs"]["get"]["responses"]["200"]["content"]["application/json"]
    jsonschema.Draft202012Validator({**jobs_schema["schema"], "components": doc["components"]}).validate(jobs)


# ---------------------------------------------------------------------- the page
class Page(HTMLParser):
    """Elements with their attributes, and every script and style the page carries inline."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.inline: list[str] = []
        self._tag = None
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        self._tag = tag
        if "style" in attributes or any(name.startswith("on") for name in attributes):
            self.inline.append(f"{tag} {attributes}")

    def handle_data(self, data):
        if self._tag in ("script", "style") and data.strip():
            self.inline.append(data)

    def handle_endtag(self, tag):
        self._tag = None


def test_the_page_shows_real_data_without_inline_script_and_approving_needs_a_token(http, service, textures):
    edge = register(http, "edge-1")
    data = png(textures)
    http.post("/api/v1/frames", json=frame(data), headers=edge)  # 409: bytes first
    sha = hashlib.sha256(data).hexdigest()
    http.put(f"/api/v1/frames/{sha}/content", params={"camera": "line1", "suffix": ".png"}, content=data,
             headers=edge)
    assert http.post("/api/v1/frames", json=frame(data), headers=edge).json()["status"] == "recorded"
    http.put("/api/v1/cameras/line1", json={"model_id": "m-<b>1</b>", "drift_state": "drift",
                                            "drift_at": time.time()}, headers=edge)
    job = http.post("/api/v1/drift", json=[{"id": "d1", "camera_id": "line1", "kind": "drift_raised",
                                            "at": time.time()}], headers=edge).json()["jobs"][0]
    cat = service.catalogue
    rule = DatasetRule(until=time.time())
    dataset = cat.add_dataset("edge-1", "line1", rule, [DatasetMember(frame=f"frames/edge-1/line1/{sha}.png",
                                                                      inspection_id="i-1", split="train")],
                              time.time())
    cat.add_model(Model(id="m-2", appliance_id="edge-1", camera_id="line1", status="refused", created_at=time.time(),
                        dataset_id=dataset.id, detail="escape rate up"))
    cat.add_evaluation("m-2", "m-<b>1</b>", dataset.id, False, {"auroc": {"candidate": 0.91, "running": 0.95},
                                                               "false_reject_rate": 0.0125}, time.time())
    answer = http.get("/")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    csp = answer.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    markup = answer.text
    page = Page(markup)
    assert page.inline == []
    assert "m-&lt;b&gt;1&lt;/b&gt;" in markup and "<b>1</b>" not in markup  # escaped, everywhere
    for text in ("edge-1", "line1", "drift", "awaiting approval", "escape rate up", "0.0125", "0.91", "v1",
                 dataset.digest[:12], "failed"):
        assert text in markup, text
    buttons = [a for tag, a in page.elements if tag == "button" and a.get("data-action") == "approve"]
    assert [b["data-job"] for b in buttons] == [str(job["id"])] and all("disabled" in b for b in buttons)
    scripts = [a["src"] for tag, a in page.elements if tag == "script"]
    assert scripts == ["/static/page.js"]
    script = http.get("/static/page.js")
    assert script.status_code == 200 and "sessionStorage" in script.text
    assert re.search(r"/api/v1/admin/jobs/\$\{[^}]+\}/\$\{action\}", script.text)
    assert "Bearer" in script.text
    assert http.get("/static/page.css").headers["content-type"].startswith("text/css")
    assert http.get("/static/../api.py").status_code == 404
    # What the button does, through the same route and header the script uses.
    assert http.post(f"/api/v1/admin/jobs/{job['id']}/approve").status_code == 401
    assert http.post(f"/api/v1/admin/jobs/{job['id']}/approve", headers=ADMIN_HEADERS).status_code == 200
    after = http.get("/").text
    assert "0 awaiting approval" in after and not [a for tag, a in Page(after).elements if a.get("data-action") ==
                                                   "approve"]


def test_an_empty_trainer_page_and_health(http):
    markup = http.get("/").text
    assert "No appliance registered yet" in markup and "No rebuild job yet" in markup
    assert http.get("/healthz").json() == {"status": "ok"}


# ---------------------------------------------------------------------- the page in a real browser
CHROMIUM = Path("/usr/bin/chromium")


def chromium_dom(url: str, tmp: Path) -> str:
    """The DOM after the page's scripts ran, from headless Chromium (as tests/daemon/test_http_browser.py)."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env={**os.environ, "HOME": str(tmp)},
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def sign_in_page(app) -> None:
    """``/test/signin``: puts an admin token in this tab's sessionStorage and goes to the page, as a person would."""
    from fastapi.responses import HTMLResponse, Response

    @app.get("/test/signin")
    def signin() -> HTMLResponse:
        return HTMLResponse('<!doctype html><script src="/test/signin.js"></script>')

    @app.get("/test/signin.js")
    def signin_js() -> Response:
        script = f'sessionStorage.setItem("anomaly-trainer-admin-token", "{ADMIN}"); location.replace("/");'
        return Response(script, media_type="text/javascript")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (CI installs it)")
def test_the_page_script_runs_under_its_csp_and_a_signed_in_person_gets_the_buttons(service, tmp_path):
    service.register_appliance("edge-1")
    job = service.add_drift_events("edge-1", [DriftEvent(id="d1", camera_id="line1", kind="drift_raised",
                                                         at=time.time())]).jobs[0]
    with running_trainer(service, extra=sign_in_page) as base:
        anonymous = Page(chromium_dom(base + "/", tmp_path / "one"))
        signed_in = Page(chromium_dom(base + "/test/signin", tmp_path / "two"))
    for page, enabled in ((anonymous, False), (signed_in, True)):
        tags = {a.get("id"): (tag, a) for tag, a in page.elements if a.get("id")}
        body = next(a for tag, a in page.elements if tag == "body")
        assert "scripted" in body.get("class", ""), "page.js did not run"
        assert ("hidden" in tags["signin"][1]) == enabled and ("hidden" in tags["signed-in"][1]) != enabled
        buttons = [a for tag, a in page.elements if tag == "button" and a.get("data-job") == str(job.id)]
        assert {b["data-action"] for b in buttons} == {"approve", "cancel"}
        assert all(("disabled" not in b) == enabled for b in buttons)
