"""The HTTP output: a real aiohttp server on a real asyncio loop in a thread, queried over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from appliance.daemon.publishers import PUBLISHERS, OutputContext, create_publisher
from appliance.daemon.publishers.http import HttpConfig, HttpPublisher
from appliance.daemon.records import Inspection, new_inspection_id
from appliance.errors import PublishError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def loop():
    """The daemon's asyncio loop, running in its own thread as in the daemon."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def daemon_status(healthy: bool = True) -> dict:
    """A status snapshot shaped like the daemon's."""
    return {
        "daemon": {"healthy": healthy, "unhealthy": [] if healthy else ["camera line2: no frame for 12 s"],
                   "version": "0.1.0", "uptime_s": 3600.5},
        "cameras": {
            "line1": {"state": "running", "fps": 9.8, "latency_ms": {"p50": 21.5, "p99": 48.0}, "queue_depth": 1,
                      "drops": 0, "frames": 35280, "counts": {"ok": 35100, "ng": 170, "error": 10},
                      "last": {"verdict": "ok", "score": 0.21},
                      "bundle": {"model_id": "ball-screw-2026-11-30", "bank_hash": "ab12"},
                      "threshold": {"value": 0.5, "source": "bundle"}},
            "line2": {"state": "reconnecting", "fps": 0.0, "latency_ms": {}, "queue_depth": 0, "drops": 3},
        },
        "outputs": {"overlay": {"state": "ok", "backlog": 0}, "mqtt": {"state": "disconnected", "backlog": 42}},
    }


class Status:
    """The daemon's status function: a plain callable over a dict the test can change."""

    def __init__(self, value: dict) -> None:
        self.value = value

    def __call__(self) -> dict:
        return self.value


def make_publisher(tmp_path: Path, loop, status=None, registry=None, **config) -> HttpPublisher:
    context = OutputContext(state_dir=tmp_path, status=status or Status(daemon_status()),
                            registry=registry or CollectorRegistry(), loop=loop)
    return HttpPublisher(HttpConfig(type="http", **{"port": 0, **config}), context)


@pytest.fixture
def server(tmp_path, loop):
    pub = make_publisher(tmp_path, loop)
    pub.start()
    yield pub
    pub.close()


def record(camera: str, seq: int, verdict: str, score: float | None = None, **extra) -> Inspection:
    now = time.time()
    return Inspection(id=new_inspection_id(now), camera=camera, seq=seq, captured_at=now - 0.03, finished_at=now,
                      verdict=verdict, score=score, threshold=0.5, threshold_source="bundle",
                      raw_score=None if score is None else score * 7.1, model_id="ball-screw-2026-11-30",
                      error="camera timeout: no frame in 2 s" if verdict == "error" else None,
                      latency_ms={"backbone": 9.5, "total": 23.25}, **extra)


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as res:
            return res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def get_json(url: str) -> tuple[int, dict]:
    code, headers, body = get(url)
    assert headers["Content-Type"].startswith("application/json")
    return code, json.loads(body)


def png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    ok, data = cv2.imencode(".png", rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert ok
    return data.tobytes()


# ---------------------------------------------------------------------- config and registry


def test_registered_and_configured_strictly(tmp_path, loop):
    assert PUBLISHERS["http"] is HttpPublisher
    config = HttpConfig(type="http")
    assert (config.host, config.port, config.history, config.overlay_dir) == ("127.0.0.1", 8080, 300, None)
    assert "loopback" in HttpConfig.model_fields["host"].description
    context = OutputContext(state_dir=tmp_path, status=dict, registry=CollectorRegistry(), loop=loop)
    assert isinstance(create_publisher(config, context), HttpPublisher)
    with pytest.raises(ValidationError, match="bind"):
        HttpConfig(type="http", bind="0.0.0.0")
    with pytest.raises(ValidationError):
        HttpConfig(type="http", port=70000)
    with pytest.raises(ValidationError):
        HttpConfig(type="http", history=0)


def listening(table: Path, port: int) -> list[str]:
    """Local addresses of the kernel's listening TCP sockets (state 0A) on ``port``, as /proc writes them."""
    if not table.exists():
        return []
    rows = [line.split() for line in table.read_text().splitlines()[1:]]
    return [row[1] for row in rows if row[3] == "0A" and int(row[1].rsplit(":", 1)[1], 16) == port]


def test_default_bind_is_loopback_only(server):
    assert server.url == f"http://127.0.0.1:{server.port}"
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp on this system")
    assert listening(Path("/proc/net/tcp"), server.port) == [f"0100007F:{server.port:04X}"]  # 127.0.0.1 only
    assert listening(Path("/proc/net/tcp6"), server.port) == []


# ---------------------------------------------------------------------- JSON endpoints


def test_api_status_is_the_daemons_snapshot(tmp_path, loop):
    snapshot = daemon_status()
    snapshot["cameras"]["line1"]["fps"] = float("nan")  # JSON has no NaN; browsers reject it
    snapshot["daemon"]["load"] = np.float32(0.25)
    pub = make_publisher(tmp_path, loop, status=Status(snapshot))
    pub.start()
    try:
        code, data = get_json(pub.url + "/api/status")
    finally:
        pub.close()
    assert code == 200
    expected = daemon_status()
    expected["cameras"]["line1"]["fps"] = None
    expected["daemon"]["load"] = 0.25
    assert data == expected


def test_recent_keeps_order_counts_and_history(tmp_path, loop):
    pub = make_publisher(tmp_path, loop, history=4)
    pub.start()
    try:
        verdicts = ["ok", "ng", "ok", "error", "ok", "ng"]
        published = [record("line1", i, v, None if v == "error" else 0.1 + 0.15 * i) for i, v in enumerate(verdicts)]
        deliveries = [pub.publish(r) for r in published]
        pub.publish(record("line2", 0, "ok", 0.05))

        code, data = get_json(pub.url + "/api/cameras/line1/recent?n=100")
        assert code == 200
        assert [item["id"] for item in data["items"]] == [r.id for r in published[-4:]]  # newest last, 4 kept
        assert data["counts"] == {"ok": 3, "ng": 2, "error": 1}  # counted since start, not only the kept ones
        newest = data["items"][-1]
        assert newest["verdict"] == "ng" and newest["score"] == pytest.approx(0.85)
        assert newest["threshold"] == 0.5 and newest["threshold_source"] == "bundle"
        assert newest["raw_score"] == pytest.approx(0.85 * 7.1) and newest["latency_ms"] == 23.25
        assert newest["time"] == published[-1].finished_at and newest["seq"] == 5
        error = data["items"][1]
        assert error["verdict"] == "error" and error["score"] is None and "camera timeout" in error["error"]

        code, data = get_json(pub.url + "/api/cameras/line1/recent?n=2")
        assert [item["id"] for item in data["items"]] == [r.id for r in published[-2:]]
        code, data = get_json(pub.url + "/api/cameras/line2/recent")
        assert data["counts"] == {"ok": 1, "ng": 0, "error": 0} and len(data["items"]) == 1
        assert get(pub.url + "/api/cameras/line1/recent?n=zero")[0] == 400
        assert get(pub.url + "/api/cameras/line1/recent?n=0")[0] == 400

        # Each delivery names the camera's page, and that page is there.
        assert {d.status for d in deliveries} == {"sent"}
        assert deliveries[0].detail == pub.url + "/camera/line1"
        code, headers, _ = get(deliveries[0].detail)
        assert code == 200 and headers["Content-Type"].startswith("text/html")
    finally:
        pub.close()


def test_publish_is_thread_safe(server):
    def worker(k: int) -> None:
        for i in range(200):
            server.publish(record("line1", i, "ng" if (i + k) % 5 == 0 else "ok", 0.3))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    polls = 0
    while any(t.is_alive() for t in threads):
        assert get_json(server.url + "/api/cameras/line1/recent?n=300")[0] == 200
        polls += 1
    for t in threads:
        t.join()
    _, data = get_json(server.url + "/api/cameras/line1/recent?n=1000")
    assert data["counts"] == {"ok": 640, "ng": 160, "error": 0}
    assert len(data["items"]) == 300 and polls > 0


# ---------------------------------------------------------------------- the overlay image


def test_latest_png_served_once_written(server, tmp_path):
    url = server.url + "/api/cameras/line1/latest.png"
    assert get(url)[0] == 404
    assert get_json(server.url + "/api/cameras/line1/recent")[1]["latest_png"] is None
    png = png_bytes(1)
    path = tmp_path / "overlays" / "line1" / "latest.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(png)
    code, headers, body = get(url)
    assert code == 200 and body == png
    assert headers["Content-Type"] == "image/png" and headers["Cache-Control"] == "no-store"
    decoded = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (48, 64, 3)
    latest = get_json(server.url + "/api/cameras/line1/recent")[1]["latest_png"]
    assert latest["url"] == "/api/cameras/line1/latest.png" and latest["mtime"] == path.stat().st_mtime

    png2 = png_bytes(2)
    path.write_bytes(png2)  # the overlay output replaces it for every frame
    assert get(url)[2] == png2


def test_overlay_dir_option(tmp_path, loop):
    elsewhere = tmp_path / "hmi-overlays"
    (elsewhere / "line2").mkdir(parents=True)
    png = png_bytes(3)
    (elsewhere / "line2" / "latest.png").write_bytes(png)
    (tmp_path / "overlays" / "line2").mkdir(parents=True)
    (tmp_path / "overlays" / "line2" / "latest.png").write_bytes(png_bytes(4))
    pub = make_publisher(tmp_path, loop, overlay_dir=elsewhere)
    pub.start()
    try:
        code, _, body = get(pub.url + "/api/cameras/line2/latest.png")
    finally:
        pub.close()
    assert code == 200 and body == png


# ---------------------------------------------------------------------- metrics and health


def test_metrics_exports_the_daemons_registry(tmp_path, loop):
    registry = CollectorRegistry()
    frames = Counter("appliance_frames", "frames inspected", ["camera"], registry=registry)
    frames.labels(camera="line1").inc(3)
    pub = make_publisher(tmp_path, loop, registry=registry)
    pub.start()
    try:
        code, headers, body = get(pub.url + "/metrics")
        frames.labels(camera="line1").inc(2)
        later = get(pub.url + "/metrics")[2].decode()
    finally:
        pub.close()
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'appliance_frames_total{camera="line1"} 3.0' in body.decode()
    assert 'appliance_frames_total{camera="line1"} 5.0' in later


def test_healthz_follows_the_daemon(tmp_path, loop):
    status = Status(daemon_status(healthy=True))
    pub = make_publisher(tmp_path, loop, status=status)
    pub.start()
    try:
        assert get_json(pub.url + "/healthz") == (200, {"status": "ok"})
        status.value = daemon_status(healthy=False)
        assert get_json(pub.url + "/healthz") == (503, {"status": "unhealthy",
                                                        "reasons": ["camera line2: no frame for 12 s"]})
        status.value = {"daemon": {}}
        code, data = get_json(pub.url + "/healthz")
        assert code == 503 and data["status"] == "unhealthy" and data["reasons"]

        def broken() -> dict:
            raise RuntimeError("pipeline lock timed out")

        status.value = None
        pub.context.status = broken
        code, data = get_json(pub.url + "/healthz")
        assert code == 503 and "pipeline lock timed out" in data["reasons"][0]
        assert get(pub.url + "/api/status")[0] == 503
    finally:
        pub.close()


# ---------------------------------------------------------------------- pages and safety


def test_pages_list_cameras_and_escape_ids(tmp_path, loop):
    snapshot = daemon_status()
    odd = 'cam<b>&"1\''
    snapshot["cameras"][odd] = {"state": "running"}
    pub = make_publisher(tmp_path, loop, status=Status(snapshot))
    pub.start()
    pub.publish(record("line2", 0, "ng", 0.9))  # the snapshot has no last verdict of line2: the page's own
    try:
        code, headers, body = get(pub.url + "/")
        index = body.decode()
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        assert '<a class="cam v-ok" href="camera/line1">' in index  # from the daemon's snapshot
        assert '<a class="cam v-ng" href="camera/line2">' in index
        assert "cam&lt;b&gt;&amp;&quot;1&#x27;" in index and "<b>" not in index
        code, _, body = get(pub.url + "/camera/" + urllib.request.quote(odd, safe=""))
        page = body.decode()
        assert code == 200 and "<b>" not in page and 'data-camera="cam&lt;b&gt;&amp;&quot;1&#x27;"' in page
        code, headers, body = get(pub.url + "/camera/line1")
        assert 'data-camera="line1"' in body.decode()
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        for asset, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):
            code, headers, body = get(pub.url + "/static/" + asset)
            assert code == 200 and headers["Content-Type"].startswith(kind) and len(body) > 1000
    finally:
        pub.close()


@pytest.mark.parametrize("path", ["/camera/nope", "/api/cameras/nope/recent", "/api/cameras/nope/latest.png",
                                  "/api/cameras/..%2F..%2Fetc/latest.png", "/static/../http.py", "/static/x.js",
                                  "/nothing"])
def test_unknown_paths_are_404(server, path):
    code, _, body = get(server.url + path)
    assert code == 404
    if path.startswith("/api/cameras/nope"):
        assert json.loads(body) == {"error": "unknown camera 'nope'; known: line1, line2"}


def test_read_only(server):
    for method in ("POST", "PUT", "DELETE"):
        req = urllib.request.Request(server.url + "/api/status", data=b"{}", method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 405


# ---------------------------------------------------------------------- lifecycle


def test_port_in_use_is_a_clear_error(tmp_path, loop):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        pub = make_publisher(tmp_path, loop, port=port)
        with pytest.raises(PublishError, match=rf"127\.0\.0\.1:{port}.*in use"):
            pub.start()
        assert pub.url is None
        pub.close()  # nothing started: still fine


def test_explicit_port_and_clean_stop(tmp_path, loop):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pub = make_publisher(tmp_path, loop, port=port)
    pub.start()
    pub.start()  # a second start does nothing
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    assert pub.state() == {"url": f"http://127.0.0.1:{port}", "listening": True}
    pub.close()
    pub.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    again = make_publisher(tmp_path, loop, port=port)  # the port is free again: a restart can take it
    again.start()
    try:
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        again.close()


def test_start_needs_a_loop_and_not_from_inside_it(tmp_path, loop):
    context = OutputContext(state_dir=tmp_path, status=dict, registry=CollectorRegistry(), loop=None)
    with pytest.raises(PublishError, match="loop"):
        HttpPublisher(HttpConfig(type="http", port=0), context).start()

    pub = make_publisher(tmp_path, loop)

    async def start_on_loop() -> str:
        try:
            pub.start()
        except PublishError as exc:
            return str(exc)
        return "started"

    message = asyncio.run_coroutine_threadsafe(start_on_loop(), loop).result(5)
    assert "start_async" in message
    asyncio.run_coroutine_threadsafe(pub.start_async(), loop).result(5)  # the way from inside the loop
    try:
        assert get(pub.url + "/healthz")[0] == 200
    finally:
        asyncio.run_coroutine_threadsafe(pub.stop_async(), loop).result(5)
