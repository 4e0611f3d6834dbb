"""The overlay output on real records, real pixels and real PNG files with EXIF."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import traceback
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from appliance import atomic
from appliance.daemon.disk import DiskConfig, DiskGuard
from appliance.daemon.latest import LatestImages
from appliance.daemon.publishers import PUBLISHERS, OutputContext, create_publisher
from appliance.daemon.publishers.overlay import PAD_RGB, OverlayConfig, OverlayPublisher, planned_path
from appliance.daemon.records import Inspection, LazyMap
from appliance.errors import PublishError
from appliance.overlay import (
    BANNER_RGB,
    CONTOUR_RGB,
    OTHER_VERDICT_RGB,
    png_overlay_metadata,
    read_overlay_metadata,
)

DAY1 = datetime(2025, 6, 15, 23, 59, 30, tzinfo=UTC).timestamp()  # just before midnight UTC
DAY2 = datetime(2025, 6, 16, 8, 0, 0, tzinfo=UTC).timestamp()


def textured_rgb(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    grey = (np.sin(xx / 7.0) + np.cos(yy / 5.0) + 2) / 4
    return np.stack([grey * 255, grey[::-1] * 200, grey[:, ::-1] * 150], axis=2).astype(np.uint8)


def grey16(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx + yy) / (h + w) * 60000 + 2000).astype(np.uint16)


def blob(h, w, peak):
    yy, xx = np.mgrid[0:h, 0:w]
    return (0.05 + (peak - 0.05) * np.exp(-((yy - h / 2) ** 2 + (xx - w / 3) ** 2) / (2 * (min(h, w) / 10) ** 2))
            ).astype(np.float32)


_seq = iter(range(1, 10**6))


def record(verdict="ng", camera="cam-1", captured_at=DAY1, image=None, error=None, shape=(240, 320), **kw):
    seq = next(_seq)
    if image is None and verdict != "error":
        image = textured_rgb(*shape)
    defaults = {"score": 0.81 if verdict == "ng" else 0.2, "threshold": 0.5, "raw_score": 7.25,
                "threshold_source": "shift:A", "model_id": "patchcore-test-1", "trigger_id": f"t-{seq}",
                "source": f"/data/in/{seq}.png"}
    if verdict == "error":
        defaults = {"model_id": "patchcore-test-1"}
    amap = None
    if verdict != "error":
        m = blob(*image.shape[:2], peak=0.9 if verdict == "ng" else 0.2)
        amap = LazyMap(lambda: m)
    return Inspection(id=f"{int(captured_at * 1000):012x}{seq:010x}", camera=camera, seq=seq,
                      captured_at=captured_at, finished_at=captured_at + 0.05, verdict=verdict, error=error,
                      image=image, anomaly_map=amap, **{**defaults, **kw})


def publisher(tmp_path, **options):
    context = OutputContext(state_dir=tmp_path, status=dict, registry=CollectorRegistry())
    out = create_publisher(OverlayConfig(**options), context)
    out.start()
    return out


def pixels(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def count(img, rgb):
    return int(np.all(img == np.array(rgb, np.uint8), axis=2).sum())


def overlay_files(root):
    return sorted(p for p in root.rglob("*.png") if p.name != "latest.png")


# --------------------------------------------------------------------------- files and sizes


def test_registered_and_configured():
    assert PUBLISHERS["overlay"] is OverlayPublisher
    config = OverlayConfig()
    assert (config.width, config.height, config.only_ng, config.keep, config.max_mb) == (1024, 600, False, 2000, 1024)
    with pytest.raises(ValidationError, match="relative"):
        OverlayConfig(dir="overlays")
    with pytest.raises(ValidationError, match="widht"):
        OverlayConfig(widht=800)
    with pytest.raises(ValidationError, match="width"):
        OverlayConfig(width=10)


@pytest.mark.parametrize(("shape", "frame"), [
    ((300, 900), "rgb"), ((900, 300), "rgb"), ((500, 500), "rgb"),
    ((300, 900), "grey16"), ((900, 300), "grey16"), ((60, 80), "grey16"),
])
def test_the_png_is_exactly_the_panel_size_with_the_aspect_kept(tmp_path, shape, frame):
    image = textured_rgb(*shape) if frame == "rgb" else grey16(*shape)
    out = publisher(tmp_path)
    rec = record("ng", image=image)
    delivery = out.publish(rec)
    assert delivery.status == "sent"
    img = pixels(delivery.detail)
    assert img.shape == (600, 1024, 3)
    content = ~np.all(img == np.array(PAD_RGB, np.uint8), axis=2)
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    assert rows[-1] - rows[0] + 1 == 600 or cols[-1] - cols[0] + 1 == 1024  # fills the panel one way
    assert abs(rows[0] - (600 - 1 - rows[-1])) <= 1 and abs(cols[0] - (1024 - 1 - cols[-1])) <= 1  # centred
    # The frame keeps its aspect: the content is the banner strip (mostly its dark fill) over the frame.
    box = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    banner_rows = np.flatnonzero(np.all(box == np.array(BANNER_RGB, np.uint8), axis=2).mean(axis=1) > 0.2)
    assert banner_rows[0] == 0 and 20 < banner_rows[-1] < box.shape[0] // 3
    frame_h, frame_w = box.shape[0] - banner_rows[-1] - 1, box.shape[1]
    assert abs((frame_w / frame_h) / (shape[1] / shape[0]) - 1) < 0.02
    assert count(img, CONTOUR_RGB) > 0  # the NG blob is outlined


def test_file_lands_at_the_planned_path_with_exif(tmp_path):
    out = publisher(tmp_path, width=320, height=200)
    rec = record("ng")
    planned = planned_path(out.cfg, tmp_path, rec.id, rec.camera, rec.captured_at, rec.verdict)
    assert planned == tmp_path / "overlays" / "cam-1" / "2025-06-15" / f"{rec.id}.png"  # UTC date of capture
    delivery = out.publish(rec)
    assert delivery.status == "sent" and delivery.detail == str(planned)
    assert pixels(planned).shape == (200, 320, 3)
    md = read_overlay_metadata(planned)
    assert md["inspection_id"] == rec.id and md["verdict"] == "ng" and md["camera"] == "cam-1"
    assert md["trigger_id"] == rec.trigger_id and md["score"] == 0.81 and md["raw_score"] == 7.25
    assert md["threshold"] == 0.5 and md["threshold_source"] == "shift:A" and md["model_id"] == "patchcore-test-1"
    assert md["timestamp"] == DAY1 and md["source"] == rec.source


def test_publish_writes_exactly_the_overlay_path_of_the_record(tmp_path):
    out = publisher(tmp_path / "state", width=320, height=200)
    wanted = tmp_path / "elsewhere" / "chosen.png"
    delivery = out.publish(record("ng", overlay_path=str(wanted)))
    assert delivery.detail == str(wanted) and wanted.is_file()
    assert overlay_files(tmp_path / "state") == []


def test_latest_png_is_the_newest_overlay_and_no_temp_files_remain(tmp_path):
    out = publisher(tmp_path, width=320, height=200)
    first = out.publish(record("ng"))
    second = out.publish(record("ok"))
    latest = tmp_path / "overlays" / "cam-1" / "latest.png"
    assert latest.read_bytes() == Path(second.detail).read_bytes() != Path(first.detail).read_bytes()
    assert read_overlay_metadata(latest)["verdict"] == "ok"
    assert count(pixels(latest), CONTOUR_RGB) == 0  # an OK map stays below the threshold: no contour
    assert [p.name for p in tmp_path.rglob(".*")] == []


def test_only_ng_skips_ok_files_but_updates_latest(tmp_path):
    out = publisher(tmp_path, width=320, height=200, only_ng=True)
    ok, ng = record("ok"), record("ng")
    assert planned_path(out.cfg, tmp_path, ok.id, ok.camera, ok.captured_at, "ok") is None
    assert planned_path(out.cfg, tmp_path, ng.id, ng.camera, ng.captured_at, "error") is not None
    sent = out.publish(ng)
    skipped = out.publish(ok)
    assert skipped.status == "skipped" and skipped.detail is None
    assert out.drawer.wait_idle()  # latest-only images are drawn on the output's drawer thread
    assert overlay_files(tmp_path) == [Path(sent.detail)]
    assert read_overlay_metadata(tmp_path / "overlays" / "cam-1" / "latest.png")["inspection_id"] == ok.id


# --------------------------------------------------------------------------- error cards


@pytest.mark.parametrize("image", [None, "frame"])
def test_an_error_becomes_an_amber_card_and_the_latest_image(tmp_path, image):
    out = publisher(tmp_path, width=480, height=300)
    frame = grey16(200, 200) if image else None
    message = "camera timeout after 5.0 s: no frame from rtsp://10.0.0.7/stream; check the cable " * 4
    rec = record("error", image=frame, error=message)
    delivery = out.publish(rec)
    card = pixels(delivery.detail)
    assert card.shape == (300, 480, 3)
    assert count(card[:20], OTHER_VERDICT_RGB) > 0.5 * 20 * 480  # the banner is amber
    amber_rows = np.flatnonzero(np.all(card == np.array(OTHER_VERDICT_RGB, np.uint8), axis=2).any(axis=1))
    assert amber_rows[-1] > 60  # a long message wraps onto several lines
    below = card[amber_rows[-1] + 1:]
    if image:
        assert np.array_equal(below[..., 0], below[..., 1]) and np.array_equal(below[..., 1], below[..., 2])  # grey
        assert below.std() > 5  # the frame is there, not a flat fill
    else:
        assert count(below, PAD_RGB) == below.shape[0] * below.shape[1]
    md = read_overlay_metadata(delivery.detail)
    assert md["verdict"] == "error" and md["error"] == message and md["inspection_id"] == rec.id
    assert (tmp_path / "overlays" / "cam-1" / "latest.png").read_bytes() == Path(delivery.detail).read_bytes()


# --------------------------------------------------------------------------- retention


def test_retention_by_count_deletes_the_oldest_and_empty_day_folders(tmp_path):
    out = publisher(tmp_path, width=128, height=96, keep=3)
    names = [Path(out.publish(record("ng", captured_at=t)).detail).name for t in (DAY1, DAY1 + 1, DAY2, DAY2 + 1)]
    names.append(Path(out.publish(record("ng", captured_at=DAY2 + 2)).detail).name)
    cam = tmp_path / "overlays" / "cam-1"
    assert [p.name for p in overlay_files(cam)] == names[2:]
    assert sorted(p.name for p in cam.iterdir()) == ["2025-06-16", "latest.png"]
    assert out.state()["cameras"]["cam-1"]["files"] == 3


def test_retention_by_size_keeps_as_many_newest_files_as_fit(tmp_path):
    out = publisher(tmp_path, width=200, height=120, max_mb=1.0)
    sizes = [os.path.getsize(out.publish(record("ng", captured_at=DAY1 + i, image=textured_rgb(90 + i, 160))).detail)
             for i in range(4)]
    budget = (sizes[-1] + sizes[-2] + sizes[-3] // 2) / 2**20  # room for the newest two, not three
    out = publisher(tmp_path, width=200, height=120, max_mb=budget)  # a restart with a smaller budget trims
    left = overlay_files(tmp_path)
    assert [os.path.getsize(p) for p in left] == sizes[-2:]
    new = out.publish(record("ng", captured_at=DAY1 + 10))
    left = overlay_files(tmp_path)
    assert left[-1] == Path(new.detail) and sum(os.path.getsize(p) for p in left) <= budget * 2**20
    assert len(left) == 2 or os.path.getsize(left[-1]) + sizes[-1] > budget * 2**20


def test_start_indexes_existing_files_per_camera_and_cleans_leftovers(tmp_path):
    first = publisher(tmp_path, width=128, height=96)
    made = {cam: [Path(first.publish(record("ng", camera=cam, captured_at=DAY1 + i)).detail) for i in range(4)]
            for cam in ("a", "b")}
    leftover = tmp_path / "overlays" / "a" / "2025-06-15" / ".x.png.abc.tmp"
    leftover.write_bytes(b"half a png")
    second = publisher(tmp_path, width=128, height=96, keep=2)
    assert overlay_files(tmp_path / "overlays" / "a") == made["a"][2:]
    assert overlay_files(tmp_path / "overlays" / "b") == made["b"][2:]
    assert not leftover.exists()
    assert {c: s["files"] for c, s in second.state()["cameras"].items()} == {"a": 2, "b": 2}


# --------------------------------------------------------------------------- failures


def as_unprivileged(check):
    """Run ``check`` in a forked child that has dropped root (root ignores file modes); fail if it fails."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            check()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the check failed in the unprivileged child (see stderr)"


def test_a_read_only_folder_gives_publish_error(tmp_path):
    root = os.geteuid() == 0
    # The unprivileged child cannot enter root's private pytest folders: give it a folder of its own in /tmp.
    state = Path(tempfile.mkdtemp(prefix="overlay-ro-")) if root else tmp_path
    try:
        state.chmod(0o755)
        cam = state / "overlays" / "cam-1"
        cam.mkdir(parents=True)
        out = publisher(state, width=128, height=96)

        def check():
            with pytest.raises(PublishError, match="writable"):
                out.publish(record("error", error="no frame"))  # an error card: no OpenCV threads after fork
            assert list(cam.iterdir()) == []

        cam.chmod(0o555)
        if root:
            as_unprivileged(check)
        else:
            check()
        cam.chmod(0o755)
    finally:
        if root:
            shutil.rmtree(state)


def test_a_folder_that_cannot_be_made_gives_publish_error(tmp_path):
    (tmp_path / "overlays").write_text("a file where the folder should be")
    context = OutputContext(state_dir=tmp_path, status=dict, registry=CollectorRegistry())
    with pytest.raises(PublishError, match="overlays"):
        create_publisher(OverlayConfig(width=128, height=96), context).start()
    out = OverlayPublisher(OverlayConfig(width=128, height=96), context)  # not started: publish finds out too
    with pytest.raises(PublishError, match="cannot write"):
        out.publish(record("ng"))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_gives_publish_error_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    out = publisher(tmp_path, width=128, height=96)
    kept = Path(out.publish(record("ng")).detail)
    latest = tmp_path / "overlays" / "cam-1" / "latest.png"
    before = latest.read_bytes()
    real_mkstemp = tempfile.mkstemp

    def mkstemp_on_full_disk(*args, **kwargs):
        # A real temp file is created (and must be removed), but its bytes go to /dev/full: a real ENOSPC.
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp_on_full_disk)
    with pytest.raises(PublishError, match="disk full"):
        out.publish(record("ng"))
    assert overlay_files(tmp_path) == [kept]
    assert latest.read_bytes() == before
    assert [p.name for p in tmp_path.rglob(".*")] == []


def test_a_record_without_pixels_or_map_is_refused(tmp_path):
    out = publisher(tmp_path, width=128, height=96)
    rec = record("ng")
    bare = Inspection(id=rec.id, camera=rec.camera, seq=rec.seq, captured_at=rec.captured_at,
                      finished_at=rec.finished_at, verdict="ng", score=0.8, threshold=0.5)
    with pytest.raises(PublishError, match="image, anomaly_map"):
        out.publish(bare)

    def broken():
        raise RuntimeError("scorer state gone")

    failing = Inspection(id=rec.id, camera=rec.camera, seq=rec.seq, captured_at=rec.captured_at,
                         finished_at=rec.finished_at, verdict="ng", score=0.8, threshold=0.5, image=rec.image,
                         anomaly_map=LazyMap(broken))
    with pytest.raises(PublishError, match="scorer state gone"):
        out.publish(failing)
    with pytest.raises(PublishError, match="camera id"):
        out.publish(record("ng", camera="../escape"))
    assert overlay_files(tmp_path) == []


def test_ok_overlays_are_rate_limited_but_ng_and_errors_never(tmp_path):
    from appliance.daemon.publishers.overlay import OverlayConfig, OverlayPublisher

    pub = OverlayPublisher(OverlayConfig(ok_per_s=2.0),
                           OutputContext(state_dir=tmp_path, status=dict, registry=CollectorRegistry()))
    pub.start()
    t0 = 1_780_000_000.0
    planned = {(t, v): pub.plan(f"id{i}", "cam", t0 + t, v)
               for i, (t, v) in enumerate([(0.0, "ok"), (0.1, "ok"), (0.2, "ng"), (0.3, "error"), (0.45, "ok"),
                                           (0.5, "ok"), (0.6, "ok")])}
    drawn_ok = [t for (t, v), path in planned.items() if v == "ok" and path is not None]
    assert drawn_ok == [0.0, 0.5]  # at most one OK per 1/2 s, counted from the last one drawn
    assert planned[(0.2, "ng")] is not None and planned[(0.3, "error")] is not None


# --------------------------------------------------------------------------- the latest image and the disk floor


class Statvfs:
    """``os.statvfs`` of a file system whose free space the test sets (MiB); the rest is the real call's."""

    def __init__(self, free_mb: float) -> None:
        self.free_mb = free_mb

    def __call__(self, path: str) -> os.statvfs_result:
        real = os.statvfs(path)
        blocks = int(self.free_mb * 2**20 / real.f_frsize)
        return os.statvfs_result((real.f_bsize, real.f_frsize, max(real.f_blocks, blocks), blocks, blocks,
                                  real.f_files, real.f_ffree, real.f_favail, real.f_flag, real.f_namemax))


def live_publisher(tmp_path, statvfs=None, **options):
    """An overlay output as the daemon builds it: a shared latest-image store and, if given, a disk guard."""
    disk = None
    if statvfs is not None:
        disk = DiskGuard(DiskConfig(min_free_mb=64, clear_margin_mb=8), [("overlays", tmp_path / "overlays")],
                         statvfs=statvfs)
    context = OutputContext(state_dir=tmp_path, status=dict, registry=CollectorRegistry(), disk=disk,
                            latest=LatestImages())
    out = create_publisher(OverlayConfig(**{"width": 320, "height": 200, **options}), context)
    out.start()
    return out


def test_each_drawn_image_is_the_latest_image_encoded_once(tmp_path):
    out = live_publisher(tmp_path)
    rec = record("ng")
    delivery = out.publish(rec)
    shown = out.context.latest.get("cam-1")
    file = Path(delivery.detail)
    assert (shown.inspection_id, shown.seq, shown.verdict, shown.captured_at) == (rec.id, rec.seq, "ng", DAY1)
    assert shown.data == file.read_bytes()  # the same bytes: encoded once
    assert read_overlay_metadata(file)["inspection_id"] == rec.id
    latest = tmp_path / "overlays" / "cam-1" / "latest.png"
    assert latest.stat().st_ino == file.stat().st_ino  # a hard link: latest.png costs no second write


def test_disk_below_its_floor_drops_the_file_but_the_panel_shows_the_part(tmp_path):
    statvfs = Statvfs(free_mb=10_000)
    out = live_publisher(tmp_path, statvfs=statvfs)
    kept = Path(out.publish(record("ng")).detail)
    latest = tmp_path / "overlays" / "cam-1" / "latest.png"
    before = latest.read_bytes()

    statvfs.free_mb = 20  # below the 64 MiB floor
    out.context.disk.check()
    rec = record("ng")
    planned = out.plan(rec.id, rec.camera, rec.captured_at, rec.verdict)
    delivery = out.publish(replace(rec, overlay_path=str(planned)))
    assert delivery.status == "dropped" and delivery.detail.startswith("disk below its floor (")
    assert not planned.exists() and overlay_files(tmp_path) == [kept]  # nothing written: the audit clears the path
    assert latest.read_bytes() == before  # latest.png is a file too
    assert out.drawer.wait_idle()
    shown = out.context.latest.get("cam-1")
    assert shown.inspection_id == rec.id and png_overlay_metadata(shown.data)["inspection_id"] == rec.id

    ok = record("ok", captured_at=DAY1 + 5)
    assert out.publish(ok).status == "dropped"
    assert out.drawer.wait_idle() and out.context.latest.get("cam-1").inspection_id == ok.id

    statvfs.free_mb = 10_000  # space again: files and latest.png are written again
    out.context.disk.check()
    again = record("ng", captured_at=DAY1 + 6)
    delivery = out.publish(again)
    assert delivery.status == "sent" and Path(delivery.detail).is_file()
    assert read_overlay_metadata(latest)["inspection_id"] == again.id


def test_every_way_without_the_planned_file_says_so(tmp_path):
    """sent means the file is there; skipped only when none was planned; else dropped or PublishError."""
    statvfs = Statvfs(free_mb=10_000)
    out = live_publisher(tmp_path, statvfs=statvfs, only_ng=True)
    outcomes = []
    for verdict, free in (("ng", 10_000), ("ok", 10_000), ("error", 10_000), ("ng", 5), ("error", 5), ("ok", 5)):
        statvfs.free_mb = free
        out.context.disk.check()
        rec = record(verdict, error="no frame" if verdict == "error" else None)
        planned = out.plan(rec.id, rec.camera, rec.captured_at, rec.verdict)
        rec = replace(rec, overlay_path=None if planned is None else str(planned))
        delivery = out.publish(rec)
        outcomes.append((verdict, free, delivery.status))
        if delivery.status == "sent":
            assert Path(delivery.detail) == planned and planned.is_file()
        elif delivery.status == "skipped":
            assert planned is None
        else:
            assert delivery.status == "dropped" and planned is not None and not planned.exists()
    assert outcomes == [("ng", 10_000, "sent"), ("ok", 10_000, "skipped"), ("error", 10_000, "sent"),
                        ("ng", 5, "dropped"), ("error", 5, "dropped"), ("ok", 5, "skipped")]


def test_a_burst_of_latest_only_oks_draws_only_the_newest(tmp_path):
    out = live_publisher(tmp_path, only_ng=True)
    started, release = threading.Event(), threading.Event()
    computed: list[int] = []

    def slow_map(seq: int, m: np.ndarray):
        def compute() -> np.ndarray:
            computed.append(seq)
            if seq == 0:
                started.set()
                assert release.wait(10)  # the drawer is busy with this one while the burst arrives
            return m
        return compute

    burst = []
    for i in range(5):
        rec = record("ok", captured_at=DAY1 + i)
        m = rec.anomaly_map()
        burst.append(replace(rec, anomaly_map=LazyMap(slow_map(i, m))))
    assert out.publish(burst[0]).status == "skipped"  # no file planned: returns at once
    assert started.wait(10)
    assert [out.publish(r).status for r in burst[1:]] == ["skipped"] * 4
    release.set()
    assert out.drawer.wait_idle()
    assert computed == [0, 4]  # the first was being drawn; of the rest only the newest
    assert out.context.latest.get("cam-1").inspection_id == burst[-1].id
    assert read_overlay_metadata(tmp_path / "overlays" / "cam-1" / "latest.png")["inspection_id"] == burst[-1].id
    assert out.state()["latest"] == {"drawn": 2, "superseded": 3, "last_error": None}


def test_the_latest_image_never_goes_back_to_an_older_part(tmp_path):
    out = live_publisher(tmp_path, only_ng=True)
    newer = record("ng", captured_at=DAY1 + 10)
    older = record("ok", captured_at=DAY1 + 5)  # delivered late (the OK went through the drawer)
    out.publish(newer)
    out.publish(older)
    assert out.drawer.wait_idle()
    assert out.context.latest.get("cam-1").inspection_id == newer.id
    assert read_overlay_metadata(tmp_path / "overlays" / "cam-1" / "latest.png")["inspection_id"] == newer.id
