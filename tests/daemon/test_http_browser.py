"""The live camera page in a real headless Chromium: the DOM after the page's script ran, and a screenshot."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from snapshots import snapshot

from appliance.daemon.latest import LatestImage, LatestImages
from appliance.daemon.publishers import OutputContext
from appliance.daemon.publishers.http import HttpConfig, HttpPublisher
from appliance.daemon.records import Inspection, new_inspection_id
from appliance.daemon.status import Status
from appliance.overlay import encode_overlay, render_panel

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install chromium; CI installs it)"),
]

MODEL = "ball-screw-2026-11-30"


def chromium(url: str, tmp: Path, *args: str, budget_ms: int = 5000) -> str:
    """Run headless Chromium on ``url`` as the project notes say; its stdout."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", f"--virtual-time-budget={budget_ms}", *args, url]
    env = {**os.environ, "HOME": str(tmp)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Elements(HTMLParser):
    """Every element with an id: its attributes and its text (descendants included)."""

    VOID: ClassVar[set[str]] = {"img", "br", "hr", "meta", "link", "input", "source", "area", "base", "col",
                                "embed", "wbr", "path", "line", "circle", "rect"}

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.by_id: dict[str, dict] = {}
        self._open: list[tuple[str, dict | None]] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        entry = {"tag": tag, "attrs": attrs, "text": ""} if "id" in attrs else None
        if entry:
            self.by_id[attrs["id"]] = entry
        if tag not in self.VOID:
            self._open.append((tag, entry))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self._open.pop()

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                return

    def handle_data(self, data):
        for _, entry in self._open:
            if entry is not None:
                entry["text"] += data

    def text(self, element_id: str) -> str:
        return " ".join(self.by_id[element_id]["text"].split())

    def attr(self, element_id: str, name: str) -> str | None:
        return self.by_id[element_id]["attrs"].get(name)


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def status_snapshot(alarms: list[dict] | None = None) -> Status:
    return snapshot(
        {"line1": {"fps": 9.8, "latency_ms": {"p50": 21.5, "p99": 48.0}, "queue_depth": 1, "drops": 2, "frames": 50,
                   "counts": {"ok": 41, "ng": 7, "error": 2}, "bundle": {"model_id": MODEL},
                   "threshold": {"value": 0.45, "source": "shift:night"}},
         "line2": {"state": "reconnecting", "state_detail": "rtsp timeout", "ready": False, "frames": 1,
                   "counts": {"ok": 0, "ng": 0, "error": 1}}},
        alarms=alarms,
        outputs={"overlay": {"state": "ok", "backlog": 0}, "audit": {"state": "ok", "backlog": 0},
                 "mqtt": {"state": "disconnected", "backlog": 42}, "http": {"state": "ok", "backlog": 0}})


def inspections(camera: str, n: int, last_verdict: str, last_score: float | None) -> list[Inspection]:
    rng = np.random.default_rng(7)
    now = time.time()
    out = []
    for i in range(n):
        last = i == n - 1
        score = last_score if last else float(np.clip(0.25 + 0.05 * rng.standard_normal(), 0, 1))
        verdict = last_verdict if last else ("ng" if score >= 0.45 else "ok")
        out.append(Inspection(
            id=new_inspection_id(now - n + i), camera=camera, seq=1000 + i, captured_at=now - n + i - 0.03,
            finished_at=now - n + i, verdict=verdict, score=score, threshold=0.45, threshold_source="shift:night",
            raw_score=None if score is None else score * 7.0, model_id=MODEL, latency_ms={"total": 23.0},
            error="camera timeout: no frame in 2 s" if verdict == "error" else None,
            trigger_id=f"T-{1000 + i}"))
    return out


def overlay_of(record: Inspection, textures) -> LatestImage:
    """A real overlay of ``record`` as the overlay output draws and encodes it, as the latest image it keeps."""
    frame, mask = textures.blob(textures.good(np.random.default_rng(record.seq), (200, 480)), (300, 110), radius=12)
    heat = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 8) * (3.0 if record.verdict == "ng" else 0.3)
    panel = render_panel(frame, np.clip(heat, 0, 1), 1024, 600, score=record.score or 0.0, threshold=0.45,
                         verdict=record.verdict, model_id=MODEL)
    meta = {"inspection_id": record.id, "seq": record.seq, "score": record.score, "threshold": 0.45,
            "verdict": record.verdict, "model_id": MODEL, "raw_score": 5.14, "timestamp": record.captured_at,
            "camera": record.camera, "source": None}
    return LatestImage(record.id, record.seq, record.verdict, record.captured_at, time.time(),
                       encode_overlay(panel, meta))


class Daemon:
    """The daemon's status function over a snapshot the test can change."""

    def __init__(self, value: Status) -> None:
        self.value = value

    def __call__(self) -> Status:
        return self.value


@pytest.fixture
def page(tmp_path, loop, textures):
    """A running HTTP output with 60 inspections of line1 (the last NG at 0.734, its image drawn) and one error
    on line2."""
    state = tmp_path / "state"
    context = OutputContext(state_dir=state, status=Daemon(status_snapshot()), registry=CollectorRegistry(),
                            loop=loop, latest=LatestImages())
    pub = HttpPublisher(HttpConfig(type="http", port=0), context)
    pub.start()
    line1 = inspections("line1", 60, "ng", 0.734)
    for record in line1 + inspections("line2", 1, "error", None):
        pub.publish(record)
    context.latest.put("line1", overlay_of(line1[-1], textures))
    pub.line1 = line1
    yield pub
    pub.close()


def test_live_page_dom_after_script(page, tmp_path):
    markup = chromium(page.url + "/camera/line1", tmp_path, "--dump-dom")
    dom = Elements(markup)
    assert dom.text("verdict-text") == "NG"
    assert "v-ng" in dom.attr("verdict", "class").split()
    assert "#1059" in dom.text("verdict-meta") and "T-1059" in dom.text("verdict-meta")
    assert dom.text("score") == "0.734"
    assert dom.text("threshold") == "0.450" and dom.text("threshold-source") == "from shift:night"
    # Counts are the daemon's (they include frames the page's own queue may have dropped).
    assert (dom.text("count-ok"), dom.text("count-ng"), dom.text("count-error")) == ("41", "7", "2")
    assert dom.text("state").lower() == "running"
    assert dom.text("fps") == "9.8 fps" and dom.text("latency") == "21.5 / 48.0 ms" and dom.text("queue") == "1 / 2"
    assert dom.text("model") == MODEL
    outputs = dom.text("outputs")
    assert "mqtt" in outputs and "disconnected" in outputs and "42 queued" in outputs
    src = dom.attr("overlay", "src")
    assert src and src.endswith(f"/api/cameras/line1/latest.png?id={page.line1[-1].id}")
    assert "hidden" not in dom.by_id["overlay"]["attrs"] and "hidden" in dom.by_id["noimage"]["attrs"]
    # The image is this verdict's: shown plainly, captioned with its inspection.
    assert "stale" not in dom.attr("view", "class").split()
    assert dom.text("imgcaption").startswith("image #1059 \u00b7 ")
    assert dom.text("ready") == "READY" and "hidden" in dom.by_id["ready-why"]["attrs"]
    assert "hidden" in dom.by_id["alarms"]["attrs"]
    # The trend: one vertex per inspection, the threshold line, a marker on every NG point.
    series = re.search(r'<path class="series" d="([^"]+)"', markup)
    assert series and len(re.findall(r"[ML]", series.group(1))) == 60
    assert re.search(r'<path class="thr" d="M[^"]+"', markup)
    ng = sum(r.verdict == "ng" for r in inspections("line1", 60, "ng", 0.734))
    assert len(re.findall(r'<circle class="pt-ng"', markup)) == ng
    assert dom.text("trend-info").startswith("last 60 inspections")
    assert dom.text("conn") == "live" and "hidden" in dom.by_id["lost"]["attrs"]


def test_error_camera_page(page, tmp_path):
    dom = Elements(chromium(page.url + "/camera/line2", tmp_path, "--dump-dom"))
    assert dom.text("verdict-text") == "ERROR" and "v-error" in dom.attr("verdict", "class").split()
    assert dom.text("error") == "camera timeout: no frame in 2 s"
    assert dom.text("score") == "\u2014" and dom.text("state").lower() == "reconnecting"
    assert "hidden" in dom.by_id["overlay"]["attrs"] and "hidden" not in dom.by_id["noimage"]["attrs"]
    assert dom.text("ready") == "NOT READY" and dom.text("ready-why") == "Not ready: camera reconnecting: rtsp timeout"
    assert (dom.text("count-ok"), dom.text("count-ng"), dom.text("count-error")) == ("0", "0", "1")


def test_page_says_when_data_stops(page, tmp_path):
    calls = 0

    def status_then_broken() -> dict:
        """The daemon answers the page and its first poll (3 calls), then its status fails."""
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("status lock timed out")
        return status_snapshot()

    page.context.status = status_then_broken
    markup = chromium(page.url + "/camera/line1", tmp_path, "--dump-dom", budget_ms=9000)
    dom = Elements(markup)
    assert calls > 4
    assert dom.text("verdict-text") == "NG"  # the last answer, greyed out by the page's lost state
    assert re.search(r'<body[^>]*class="[^"]*\bis-lost\b', markup)
    assert "hidden" not in dom.by_id["lost"]["attrs"] and "out of date" in dom.text("lost")
    assert dom.text("conn").startswith("no data since")


def test_image_of_another_inspection_is_marked_stale(page, tmp_path, textures):
    """The overlay output drew #1040 (an OK part, rate-limited since): beside the NG verdict of #1059 it must
    not pass for that part's image."""
    earlier = page.line1[40]
    assert earlier.verdict == "ok"
    page.context.latest = LatestImages()
    page.context.latest.put("line1", overlay_of(earlier, textures))
    dom = Elements(chromium(page.url + "/camera/line1", tmp_path, "--dump-dom"))
    assert dom.text("verdict-text") == "NG" and "#1059" in dom.text("verdict-meta")
    assert dom.attr("overlay", "src").endswith(f"latest.png?id={earlier.id}")
    assert "stale" in dom.attr("view", "class").split()
    assert dom.text("imgcaption") == "image of #1040 (OK), 19 s before this verdict"


def test_alarm_banner_and_camera_list(page, tmp_path):
    detail = "/var/lib/anomaly-appliance (audit, overlays): 12 MiB free of 30 MiB"
    page.context.status.value = status_snapshot(alarms=[{"kind": "disk_low", "detail": detail,
                                                         "since": time.time() - 60}])
    dom = Elements(chromium(page.url + "/camera/line1", tmp_path, "--dump-dom"))
    assert "hidden" not in dom.by_id["alarms"]["attrs"] and dom.text("alarms") == f"DISK LOW {detail}"

    shot = tmp_path / "index.png"
    # Less virtual time than the list's 5 s reload: a reload inside the budget would keep Chromium loading.
    chromium(page.url + "/", tmp_path, f"--screenshot={shot}", "--window-size=1024,600", budget_ms=2000)
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = np.all(np.abs(image - (0xE0, 0x32, 0x3A)) <= 12, axis=-1)
    banner_rows = np.flatnonzero(red.mean(axis=1) > 0.9)  # full-width rows of the alarm banner's red
    assert banner_rows.size >= 15 and banner_rows[0] < 120
    # line1's card shows its thumbnail, loaded for real: somewhere below the banner is the gravel's texture.
    below = image[banner_rows[-1] + 1:].mean(axis=-1)
    windows = [below[y:y + 80, x:x + 80].std() for y in range(0, below.shape[0] - 80, 40)
               for x in range(0, below.shape[1] - 80, 40)]
    assert max(windows) > 30


def test_screenshot_at_hmi_size(page, tmp_path):
    shot = tmp_path / "page.png"
    chromium(page.url + "/camera/line1", tmp_path, f"--screenshot={shot}", "--window-size=1024,600")
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (600, 1024, 3)
    assert image.std() > 20  # not blank
    # The NG verdict box: a large block of the page's NG red (#e0323a).
    red = np.all(np.abs(image.astype(int) - (0xE0, 0x32, 0x3A)) <= 12, axis=-1)
    assert red.mean() > 0.04
