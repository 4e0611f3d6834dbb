"""The HTTP output: a real aiohttp server on a real asyncio loop in a thread, queried over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError
from snapshots import snapshot

from appliance.daemon.latest import LatestImage, LatestImages
from appliance.daemon.publishers import PUBLISHERS, OutputContext, create_publisher
from appliance.daemon.publishers.http import HttpConfig, HttpPublisher
from appliance.daemon.records import Inspection, new_inspection_id
from appliance.errors import PublishError
from appliance.overlay import encode_overlay, render_panel

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


def daemon_status(healthy: bool = True, alarms: list[dict] | None = None, **line1: object):
    """A real ``Status`` of two cameras: line1 running and ready, line2 reconnecting."""
    return snapshot(
        {"line1": {"fps": 9.8, "latency_ms": {"p50": 21.5, "p99": 48.0}, "queue_depth": 1, "frames": 35280,
                   "counts": {"ok": 35100, "ng": 170, "error": 10},
                   "last": {"id": "0199aa000000aaaaaaaaaa", "seq": 35279, "verdict": "ok", "score": 0.21,
                            "finished_at": time.time()},
                   "bundle": {"model_id": "ball-screw-2026-11-30", "bank_hash": "ab12"}, **line1},
         "line2": {"state": "reconnecting", "state_detail": "rtsp timeout", "ready": False, "drops": 3,
                   "healthy": healthy, "unhealthy": [] if healthy else ["no frame for 12 s"]}},
        healthy=healthy, unhealthy=[] if healthy else ["line2: no frame for 12 s"], alarms=alarms,
        outputs={"overlay": {"state": "ok", "backlog": 0}, "mqtt": {"state": "disconnected", "backlog": 42}})


class Status:
    """The daemon's status function: a plain callable over a snapshot the test can change."""

    def __init__(self, value) -> None:
        self.value = value

    def __call__(self):
        return self.value


def make_publisher(tmp_path: Path, loop, status=None, registry=None, latest=None, **config) -> HttpPublisher:
    context = OutputContext(state_dir=tmp_path, status=status or Status(daemon_status()),
                            registry=registry or CollectorRegistry(), loop=loop, latest=latest)
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
    status = daemon_status(alarms=[{"kind": "disk_low", "detail": "/var/lib: 12 MiB free", "since": 1.0e9}],
                           fps=float("nan"))  # JSON has no NaN; browsers reject it
    pub = make_publisher(tmp_path, loop, status=Status(status))
    pub.start()
    try:
        code, data = get_json(pub.url + "/api/status")
    finally:
        pub.close()
    assert code == 200
    expected = status.to_json()
    expected["cameras"]["line1"]["fps"] = None
    assert data == expected
    assert data["daemon"]["alarms"] == [{"kind": "disk_low", "detail": "/var/lib: 12 MiB free", "since": 1.0e9}]
    assert data["cameras"]["line1"]["ready"] is True and data["cameras"]["line2"]["ready"] is False


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
    while True:  # read while they write (at least once, however fast they are)
        assert get_json(server.url + "/api/cameras/line1/recent?n=300")[0] == 200
        polls += 1
        if not any(t.is_alive() for t in threads):
            break
    for t in threads:
        t.join()
    _, data = get_json(server.url + "/api/cameras/line1/recent?n=1000")
    assert data["counts"] == {"ok": 640, "ng": 160, "error": 0}
    assert len(data["items"]) == 300 and polls > 0


# ---------------------------------------------------------------------- the overlay image


def overlay_png(record: Inspection) -> bytes:
    """A real overlay of ``record``, drawn and encoded as the overlay output does (EXIF included)."""
    rng = np.random.default_rng(record.seq)
    frame = rng.integers(0, 255, (46, 113, 3), dtype=np.uint8)
    heat = np.full((46, 113), 0.9 if record.verdict == "ng" else 0.1, np.float32)
    panel = render_panel(frame, heat, 256, 150, score=record.score or 0.0, threshold=0.5, verdict=record.verdict,
                         model_id="m1")
    return encode_overlay(panel, {"inspection_id": record.id, "seq": record.seq, "verdict": record.verdict,
                                  "score": record.score, "threshold": 0.5, "model_id": "m1", "raw_score": 1.0,
                                  "timestamp": record.captured_at, "camera": record.camera, "source": None})


def latest_image(record: Inspection) -> LatestImage:
    return LatestImage(record.id, record.seq, record.verdict, record.captured_at, time.time(), overlay_png(record))


def test_latest_image_from_memory_names_its_inspection(tmp_path, loop):
    latest = LatestImages()
    pub = make_publisher(tmp_path, loop, latest=latest)
    pub.start()
    try:
        base = pub.url + "/api/cameras/line1/"
        assert get_json(base + "recent")[1]["latest_image"] is None
        assert get(base + "latest.png")[0] == 404 and get(base + "thumb.jpg")[0] == 404
        first, second = record("line1", 1, "ok", 0.2), record("line1", 2, "ng", 0.8)
        for r in (first, second):
            pub.publish(r)
        latest.put("line1", latest_image(first))  # the overlay output drew only the first so far

        _, data = get_json(base + "recent")
        shown = data["latest_image"]
        assert (shown["inspection_id"], shown["seq"], shown["verdict"]) == (first.id, 1, "ok")
        assert shown["captured_at"] == first.captured_at and data["items"][-1]["id"] == second.id  # not the same
        assert data["items"][-1]["captured_at"] == second.captured_at
        assert shown["url"] == f"/api/cameras/line1/latest.png?id={first.id}"
        code, headers, body = get(pub.url + shown["url"])
        assert code == 200 and body == latest.get("line1").data and headers["X-Inspection-Id"] == first.id
        assert headers["Content-Type"] == "image/png" and headers["Cache-Control"] == "no-store"
        assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == (150, 256, 3)

        latest.put("line1", latest_image(second))
        shown = get_json(base + "recent")[1]["latest_image"]
        assert shown["inspection_id"] == second.id
        assert get(base + f"latest.png?id={first.id}")[2] == latest.get("line1", first.id).data  # still held
        code, _, body = get(base + "latest.png?id=gone")
        assert code == 404 and "no longer held" in json.loads(body)["error"]
        assert get(base + "latest.png")[2] == latest.get("line1").data  # no id: the newest

        code, headers, body = get(pub.url + shown["thumbnail"])
        thumb = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        assert code == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
        assert thumb.shape[1] <= 320 and headers["X-Inspection-Id"] == second.id
    finally:
        pub.close()


def test_latest_png_file_when_no_overlay_output_runs_here(server, tmp_path):
    url = server.url + "/api/cameras/line1/latest.png"
    assert get(url)[0] == 404
    assert get_json(server.url + "/api/cameras/line1/recent")[1]["latest_image"] is None
    png = png_bytes(1)  # a PNG without overlay metadata: an image of an unknown inspection
    path = tmp_path / "overlays" / "line1" / "latest.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(png)
    code, headers, body = get(url)
    assert code == 200 and body == png
    assert headers["Content-Type"] == "image/png" and headers["Cache-Control"] == "no-store"
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == (48, 64, 3)
    shown = get_json(server.url + "/api/cameras/line1/recent")[1]["latest_image"]
    assert shown["inspection_id"] is None and shown["url"].startswith("/api/cameras/line1/latest.png?t=")

    rec = record("line1", 7, "ng", 0.9)
    path.write_bytes(overlay_png(rec))  # the overlay output (in another process) replaces it
    shown = get_json(server.url + "/api/cameras/line1/recent")[1]["latest_image"]
    assert (shown["inspection_id"], shown["seq"], shown["verdict"]) == (rec.id, 7, "ng")
    assert shown["captured_at"] == rec.captured_at
    assert get(server.url + shown["url"])[2] == path.read_bytes()
    assert get(url + "?id=another")[0] == 404


def test_memory_image_wins_over_the_file(tmp_path, loop):
    (tmp_path / "overlays" / "line1").mkdir(parents=True)
    (tmp_path / "overlays" / "line1" / "latest.png").write_bytes(png_bytes(5))  # left by an earlier run
    latest = LatestImages()
    rec = record("line1", 3, "ok", 0.1)
    latest.put("line1", latest_image(rec))
    pub = make_publisher(tmp_path, loop, latest=latest)
    pub.start()
    try:
        assert get(pub.url + "/api/cameras/line1/latest.png")[2] == latest.get("line1").data
        assert get_json(pub.url + "/api/cameras/line1/recent")[1]["latest_image"]["inspection_id"] == rec.id
    finally:
        pub.close()


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
        assert get_json(pub.url + "/healthz") == (503, {"status": "unhealthy", "alarms": [],
                                                        "reasons": ["line2: no frame for 12 s"]})
        # Healthy, but the disk is below its floor: an alarm is a 503 too, with its own status word.
        status.value = daemon_status(alarms=[{"kind": "disk_low", "detail": "/var/lib: 12 MiB free",
                                              "since": time.time()}])
        assert get_json(pub.url + "/healthz") == (503, {"status": "alarm",
                                                        "reasons": ["disk_low: /var/lib: 12 MiB free"],
                                                        "alarms": ["disk_low: /var/lib: 12 MiB free"]})
        status.value = daemon_status(healthy=False, alarms=[{"kind": "disk_low", "detail": "full", "since": 1.0}])
        code, data = get_json(pub.url + "/healthz")
        assert code == 503 and data["status"] == "unhealthy"
        assert data["reasons"] == ["line2: no frame for 12 s", "disk_low: full"]

        def broken():
            raise RuntimeError("pipeline lock timed out")

        pub.context.status = broken
        code, data = get_json(pub.url + "/healthz")
        assert code == 503 and "pipeline lock timed out" in data["reasons"][0]
        code, data = get_json(pub.url + "/api/status")
        assert code == 503 and "pipeline lock timed out" in data["error"]
        code, _, body = get(pub.url + "/")  # the camera list still answers, and says why it shows no status
        assert code == 200 and "NO STATUS" in body.decode()
    finally:
        pub.close()


# ---------------------------------------------------------------------- pages and safety


def test_pages_list_cameras_and_escape_ids(tmp_path, loop):
    odd = 'cam<b>&"1\''
    status = daemon_status()
    status = status.model_copy(update={"cameras": {**status.cameras, odd: status.cameras["line1"]}})
    pub = make_publisher(tmp_path, loop, status=Status(status))
    pub.start()
    pub.publish(record("line3", 0, "ng", 0.9))  # a camera only seen in records: the page's own verdict
    try:
        code, headers, body = get(pub.url + "/")
        index = body.decode()
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        assert '<li class="card v-ok" data-camera="line1"><a class="cam" href="camera/line1">' in index
        assert '<li class="card v-ng not-ready" data-camera="line3"><a class="cam" href="camera/line3">' in index
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


class Cards(HTMLParser):
    """The camera list: per card (by camera) the text under each class and the thumbnail; the alarm banners."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.cards: dict[str, dict] = {}
        self.alarms: list[str] = []
        self._card: dict | None = None
        self._open: list[tuple[str, str]] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        cls = attrs.get("class") or ""
        if tag == "li" and "card" in cls.split():
            self._card = self.cards[attrs["data-camera"]] = {"class": cls, "text": {}}
        if tag == "img" and self._card is not None:
            self._card["img"] = attrs["src"]
        if tag not in ("img", "meta", "link"):
            self._open.append((tag, cls))
            if cls == "alarm":
                self.alarms.append("")

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass
        if tag == "li":
            self._card = None

    def handle_data(self, data):
        for _, cls in self._open:
            if cls == "alarm":
                self.alarms[-1] += data
            elif self._card is not None and cls:
                self._card["text"][cls] = self._card["text"].get(cls, "") + data


def test_camera_list_shows_what_a_supervisor_needs(tmp_path, loop):
    latest = LatestImages()
    alarms = [{"kind": "disk_low", "detail": "/var/lib/anomaly-appliance: 12 MiB free of 30 MiB", "since": 1.0e9}]
    status = Status(daemon_status(alarms=alarms))
    pub = make_publisher(tmp_path, loop, status=status, latest=latest)
    pub.start()
    try:
        shown = status.value.cameras["line1"].last
        older = record("line1", 35270, "ng", 0.8)  # the image the overlay output drew last: not the verdict's
        latest.put("line1", latest_image(older))
        code, headers, body = get(pub.url + "/")
        index = body.decode()
        assert code == 200 and "<script" not in index and "style=" not in index  # the CSP forbids inline
        assert '<meta http-equiv="refresh" content="5">' in index
        page = Cards(index)
        since = time.strftime("%H:%M:%S", time.localtime(1.0e9))
        assert [" ".join(a.split()) for a in page.alarms] == [
            f"DISK LOW /var/lib/anomaly-appliance: 12 MiB free of 30 MiB since {since}"]
        line1, line2 = page.cards["line1"], page.cards["line2"]
        assert line1["class"] == "card v-ok" and line1["text"]["last"] == "OK"
        assert line1["text"]["ready s-good"] == "READY"
        assert " ".join(line1["text"]["counts-line"].split()) == "OK 35,100 NG 170 ERROR 10"
        assert line1["text"]["meta"] == "running \u00b7 9.8 fps"
        assert line1["img"] == f"api/cameras/line1/thumb.jpg?id={older.id}"
        assert line1["text"]["thumb-note"] == "image of #35270 (NG), not the verdict shown"  # stale, and says so
        assert "thumb stale" in index
        code, headers, _ = get(pub.url + "/" + line1["img"])
        assert code == 200 and headers["Content-Type"] == "image/jpeg" and headers["X-Inspection-Id"] == older.id

        assert line2["class"] == "card v-none not-ready" and line2["text"]["thumb none"] == "no image yet"
        assert " ".join(line2["text"]["ready s-bad"].split()) == "NOT READY camera reconnecting: rtsp timeout"
        assert line2["text"]["meta"] == "reconnecting \u00b7 0.0 fps"

        # The image of the verdict shown: no stale mark. The alarm cleared: no banner.
        current = record("line1", shown.seq, "ok", 0.21)
        latest.put("line1", LatestImage(shown.id, shown.seq, "ok", current.captured_at + 1, time.time(),
                                        overlay_png(current)))
        status.value = daemon_status(healthy=False)
        page = Cards(get(pub.url + "/")[2].decode())
        assert page.alarms == [] and "thumb-note" not in page.cards["line1"]["text"]
        assert " ".join(page.cards["line2"]["text"]["ready s-bad"].split()) == (
            "NOT READY no frame for 12 s; camera reconnecting: rtsp timeout")
        _, data = get_json(pub.url + "/api/cameras/line2/recent")
        assert data["ready"] == {"ready": False, "why": ["no frame for 12 s", "camera reconnecting: rtsp timeout"]}
        assert get_json(pub.url + "/api/cameras/line1/recent")[1]["ready"] == {"ready": True, "why": []}
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
