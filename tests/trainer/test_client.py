"""The daemon's TrainerClient (standard library only) against a real trainer on loopback: frames through the API
and through presigned URLs to a real S3 store (SeaweedFS), idempotent resends, labels, drift, models, and which
failures are worth a retry (unreachable, slow, 5xx) and which are refusals (4xx)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import SecretStr
from test_api import FakeQueue, png, running_trainer

from appliance.errors import ApplianceError
from appliance.trainer.client import TrainerClient, TrainerError, TrainerRefused, TrainerUnavailable
from appliance.trainer.config import EmbeddedStorageConfig, FleetStorageConfig, TrainerConfig
from appliance.trainer.records import DriftEvent, FrameMeta, Label, Model
from appliance.trainer.service import TrainerService
from appliance.trainer.storage import open_storage

pytestmark = pytest.mark.timeout(120)


def meta_of(data: bytes, inspection: str = "i-1", camera: str = "line1") -> FrameMeta:
    return FrameMeta(camera_id=camera, inspection_id=inspection, sha256=hashlib.sha256(data).hexdigest(),
                     suffix=".png", size=len(data), captured_at=time.time(), verdict="ng", score=0.91,
                     threshold=0.5, model_id="m-1", reasons=["reject"])


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def embedded(tmp_path, queue) -> Iterator[TrainerService]:
    cfg = TrainerConfig(storage=EmbeddedStorageConfig(folder=tmp_path / "trainer"),
                        admin_tokens={"ann": SecretStr("admin")})
    storage = open_storage(cfg)
    yield TrainerService(storage, queue, cfg)
    storage.close()


@pytest.fixture
def trainer(embedded) -> Iterator[tuple[TrainerService, str]]:
    with running_trainer(embedded) as url:
        yield embedded, url


@pytest.fixture
def client(trainer) -> TrainerClient:
    service, url = trainer
    _, token = service.register_appliance("edge-1", "Line 1")
    return TrainerClient(url, token, timeout=10)


# ---------------------------------------------------------------------- frames, both storages
def test_a_png_goes_up_through_the_api_or_a_presigned_url_once(storage, storage_config, queue, textures):
    service = TrainerService(storage, queue, TrainerConfig(storage=storage_config))
    _, token = service.register_appliance("edge-1")
    data = png(textures)
    meta = meta_of(data)
    with running_trainer(service) as url:
        client = TrainerClient(url, token, timeout=10)
        plan = client.upload_plan(meta)
        assert plan.status == "upload"
        # Embedded: the bytes go through the API; fleet: straight to the object store, presigned.
        assert (plan.url is not None) == (storage_config.type == "fleet")
        done = client.upload_frame(meta, data)
        assert done.status == "recorded" and done.key == plan.key
        assert storage.blobs.get(done.key) == data
        # A resend (the outbox after a kill -9): known at the plan, nothing sent, nothing recorded twice.
        assert client.upload_frame(meta, data).status == "known"
        assert client.finish_upload(meta).status == "known"
        frames = storage.catalogue.frames("edge-1")
        assert [(f.inspection_id, f.sha256, f.verdict, f.score) for f in frames] == [("i-1", meta.sha256, "ng", 0.91)]
        # The same file for a second inspection: known without sending it again.
        assert client.upload_frame(meta_of(data, "i-2"), data).status == "known"
        assert len(storage.catalogue.frames("edge-1")) == 2


def test_a_presigned_put_of_other_bytes_is_caught_at_finish(postgres_url, seaweed_s3, queue, textures):
    fleet = FleetStorageConfig(database_url=SecretStr(postgres_url), s3=seaweed_s3)
    storage = open_storage(fleet)
    service = TrainerService(storage, queue, TrainerConfig(storage=fleet))
    _, token = service.register_appliance("edge-1")
    data = png(textures)
    meta = meta_of(data)
    with contextlib.closing(storage), running_trainer(service) as url:
        client = TrainerClient(url, token, timeout=10)
        client.put_presigned(client.upload_plan(meta).url, png(textures, seed=3))
        with pytest.raises(TrainerRefused, match="send the bytes again") as caught:
            client.finish_upload(meta)
        assert caught.value.status == 422
        assert client.upload_frame(meta, data).status == "recorded"


# ---------------------------------------------------------------------- the other appliance routes
def test_report_labels_drift_and_models(client, trainer, queue):
    service, _ = trainer
    assert client.whoami() == "edge-1"
    camera = client.report_camera("line1", model_id="m-1", drift_state="ok", drift_at=1000.0)
    assert (camera.camera_id, camera.model_id, camera.policy) == ("line1", "m-1", "approve")
    label = Label(id="L1", camera_id="line1", inspection_id="i-1", label="defect", who="ann", at=time.time())
    assert client.add_labels([label]).received == 1
    assert client.add_labels([label.model_copy(update={"undone_at": time.time()})]).recorded == 1
    assert service.catalogue.labels("edge-1") == []
    raised = DriftEvent(id="d1", camera_id="line1", kind="drift_raised", at=time.time(), stats={"p_value": 1e-5})
    answer = client.add_drift_events([raised])
    assert answer.recorded == 1 and [j.status for j in answer.jobs] == ["awaiting_approval"]
    assert client.add_drift_events([raised]).recorded == 0  # the resend
    assert queue.enqueued == []
    service.configure_camera("edge-1", "line2", policy="auto")
    auto = client.add_drift_events([raised.model_copy(update={"id": "d2", "camera_id": "line2"})])
    assert [j.status for j in auto.jobs] == ["queued"] and queue.enqueued == [auto.jobs[0].id]
    assert client.models() == []
    service.catalogue.add_model(Model(id="m-2", appliance_id="edge-1", camera_id="line1", status="published",
                                      created_at=time.time(), bundle="bundles/m-2.tar.gz"))
    service.catalogue.add_model(Model(id="m-3", appliance_id="edge-1", camera_id="line1", status="refused",
                                      created_at=time.time()))
    assert [(m.id, m.bundle) for m in client.models()] == [("m-2", "bundles/m-2.tar.gz")]


# ---------------------------------------------------------------------- failures: refused or unavailable
def test_refusals_carry_the_servers_message_and_status(client, trainer, textures):
    _, url = trainer
    with pytest.raises(TrainerRefused, match="unknown or rotated token") as caught:
        TrainerClient(url, "wrong", timeout=5).whoami()
    assert caught.value.status == 401 and isinstance(caught.value, ApplianceError)
    data = png(textures)
    meta = meta_of(data)
    with pytest.raises(TrainerRefused, match="sha256") as caught:
        client.put_content(meta, data + b"!")
    assert caught.value.status == 422
    with pytest.raises(TrainerRefused, match="send them first") as caught:
        client.finish_upload(meta)
    assert caught.value.status == 409
    with pytest.raises(TrainerRefused, match="camera"):
        client.report_camera("../../etc")
    with pytest.raises(TrainerRefused, match="http"):
        TrainerClient("ftp://trainer", "token")


def test_an_unreachable_trainer_is_unavailable(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(TrainerUnavailable, match="unreachable") as caught:
        TrainerClient(f"http://127.0.0.1:{port}", "token", timeout=5).whoami()
    assert caught.value.status is None


def test_a_trainer_that_does_not_answer_in_time_is_unavailable():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts connections (the kernel's backlog) and never answers
        started = time.monotonic()
        with pytest.raises(TrainerUnavailable, match="timed out"):
            TrainerClient(f"http://127.0.0.1:{listener.getsockname()[1]}", "token", timeout=0.5).whoami()
        assert time.monotonic() - started < 5


def test_a_failing_trainer_is_unavailable_with_its_message(client, trainer, monkeypatch):
    service, _ = trainer

    def broken(*_):
        raise RuntimeError("database went away")

    monkeypatch.setattr(service, "add_labels", broken)
    with pytest.raises(TrainerUnavailable, match="internal error") as caught:
        client.add_labels([Label(id="L1", camera_id="line1", inspection_id="i-1", label="good", who="ann", at=1.0)])
    assert caught.value.status == 500


class Scripted(BaseHTTPRequestHandler):
    """Answers every request with ``status`` and ``body`` (and a Location header)."""

    status, body = 307, b""

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("Location", "http://elsewhere.example/api/v1/whoami")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *_):
        pass


@pytest.fixture
def scripted() -> Iterator[tuple[str, type[Scripted]]]:
    handler = type("Handler", (Scripted,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_redirects_are_not_followed_with_the_token_and_proxies_pages_are_no_answer(scripted):
    url, handler = scripted
    with pytest.raises(TrainerRefused, match=r"redirected to http://elsewhere\.example"):
        TrainerClient(url, "token", timeout=5).whoami()
    handler.status, handler.body = 200, b"<html>captive portal</html>"
    with pytest.raises(TrainerUnavailable, match="not JSON"):
        TrainerClient(url, "token", timeout=5).whoami()
    handler.status, handler.body = 429, b'{"error": "slow down"}'
    with pytest.raises(TrainerUnavailable, match="slow down"):
        TrainerClient(url, "token", timeout=5).whoami()
    handler.status, handler.body = 200, b'{"unexpected": true}'
    with pytest.raises(TrainerError, match="answer does not fit"):
        TrainerClient(url, "token", timeout=5).whoami()


def test_the_client_needs_neither_fastapi_nor_httpx():
    code = ("import sys, appliance.trainer.client\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'httpx', 'uvicorn', 'sqlalchemy', 'boto3', 'croniter'))\n"
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert repr(TrainerClient("http://trainer:8090", "secret-token")) == "TrainerClient('http://trainer:8090')"


# ---------------------------------------------------------------------- the real thing: `appliance trainer ...`
APPLIANCE = Path(sys.executable).parent / "appliance"


def cli(*args: str, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(APPLIANCE), "trainer", *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.slow
def test_the_cli_registers_serves_schedules_and_approves(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "trainer.toml"
    config.write_text(f'port = {port}\nwork_dir = "{tmp_path / "work"}"\n[admin_tokens]\nann = "admin"\n'
                      f'[storage]\ntype = "embedded"\nfolder = "{tmp_path / "trainer"}"\n[jobs]\nscheduler_s = 0.5\n')
    bad = tmp_path / "bad.toml"
    bad.write_text("[storage]\ntype = 'embedded'\nfolders = '/x'\n")
    checked = subprocess.run([str(APPLIANCE), "trainer", "config", "check", str(bad)], capture_output=True,
                             text=True, timeout=60, check=False)
    assert checked.returncode == 2 and "storage.embedded.folders" in checked.stderr
    added = cli("add-appliance", "edge-1", "--name", "Line 1", config=config)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    again = cli("add-appliance", "edge-1", config=config)
    assert again.returncode == 1 and "registered already" in again.stderr
    server = subprocess.Popen([str(APPLIANCE), "trainer", "serve", "--workers", "0", "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = TrainerClient(f"http://127.0.0.1:{port}", token, timeout=5)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert client.whoami() == "edge-1"
                break
            except TrainerUnavailable:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                time.sleep(0.2)
        client.report_camera("line1", model_id="m-1")
        job = client.add_drift_events([DriftEvent(id="d1", camera_id="line1", kind="drift_raised",
                                                  at=time.time())]).jobs[0]
        listed = cli("jobs", "--json", config=config)
        assert [(j["id"], j["status"]) for j in json.loads(listed.stdout)] == [(job.id, "awaiting_approval")]
        approved = cli("approve", str(job.id), config=config)
        assert approved.returncode == 0 and "queued" in approved.stdout
        refused = cli("approve", str(job.id), config=config)
        assert refused.returncode == 1 and "not awaiting approval" in refused.stderr
        # A schedule due every minute, met while the approved job is open: the serving trainer's scheduler
        # records it as skipped.
        assert cli("camera", "edge-1", "line1", "--schedule", "* * * * *", config=config).returncode == 0
        deadline = time.monotonic() + 10
        while not [j for j in json.loads(cli("jobs", "--json", config=config).stdout) if j["reason"] == "schedule"]:
            assert time.monotonic() < deadline, "the scheduler made no job"
            time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
