"""Frame sources on real files: replay, hot folder and OpenCV (a real MJPEG video and a real FIFO stream)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from appliance.daemon.sources import SOURCES, Captured, create_source
from appliance.daemon.sources.base import EndOfStream
from appliance.daemon.sources.folder import FolderConfig, FolderSource
from appliance.daemon.sources.opencv import OpenCVConfig, OpenCVSource
from appliance.daemon.sources.replay import ReplayConfig, ReplaySource
from appliance.errors import SourceError

H, W = 12, 16


def png_bytes(bgr: tuple[int, int, int]) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((H, W, 3), bgr, np.uint8))
    assert ok
    return buf.tobytes()


def write_png(path: Path, bgr: tuple[int, int, int] = (10, 20, 30)) -> Path:
    path.write_bytes(png_bytes(bgr))
    return path


def rgb_of(item: Captured) -> tuple[int, int, int]:
    assert item.frame is not None, item.error
    image = item.frame.image
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    return tuple(int(v) for v in image[0, 0])


def read_until(source, timeout: float = 2.0) -> Captured:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = source.read(0.05)
        if item is not None:
            return item
    raise AssertionError(f"no item within {timeout} s")


def test_importing_the_package_registers_every_source():
    assert {"replay", "folder", "opencv"} <= set(SOURCES)
    source = create_source(ReplayConfig(type="replay", path=Path("/nonexistent")), "cam1")
    assert isinstance(source, ReplaySource) and source.camera == "cam1"


def test_configs_are_strict():
    with pytest.raises(ValidationError):
        ReplayConfig(type="replay", path=Path("/x"), speed=3)
    with pytest.raises(ValidationError):
        ReplayConfig(type="replay", path=Path("/x"), fps=0)
    with pytest.raises(ValidationError, match="must not be the inbox"):
        FolderConfig(type="folder", path=Path("/data/inbox"), done_dir=Path("/data/inbox/"))
    assert OpenCVConfig(type="opencv", device="0").device == 0
    with pytest.raises(ValidationError):
        OpenCVConfig(type="opencv", device=0, api="directshow")


# -- replay ---------------------------------------------------------------------------------------


def test_replay_delivers_images_in_name_order_as_rgb_then_ends(tmp_path):
    write_png(tmp_path / "b.png", (0, 0, 200))  # BGR on disk: red
    write_png(tmp_path / "a.png", (200, 0, 0))  # blue
    write_png(tmp_path / "c.png", (0, 200, 0))  # green
    (tmp_path / "notes.txt").write_text("not an image")
    source = ReplaySource(ReplayConfig(type="replay", path=tmp_path, fps=1000), "cam")
    source.open()
    items = [source.read(1.0) for _ in range(3)]
    assert [Path(i.source).name for i in items] == ["a.png", "b.png", "c.png"]
    assert [rgb_of(i) for i in items] == [(0, 0, 200), (200, 0, 0), (0, 200, 0)]
    assert items[0].frame.camera == "cam" and items[0].frame.source == str(tmp_path / "a.png")
    with pytest.raises(EndOfStream):
        source.read(1.0)


def test_replay_keeps_its_rate(tmp_path):
    for i in range(5):
        write_png(tmp_path / f"{i}.png")
    source = ReplaySource(ReplayConfig(type="replay", path=tmp_path, fps=20), "cam")
    source.open()
    assert source.read(1.0) is not None
    assert source.read(0.01) is None  # the next slot is 50 ms away
    start = time.monotonic()
    got = 1
    while got < 5:
        got += source.read(1.0) is not None
    # four more items at 20/s take at least 150 ms (the 10 ms spent above counts towards the first slot)
    assert time.monotonic() - start >= 0.14


def test_replay_loops_over_the_folder(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    source = ReplaySource(ReplayConfig(type="replay", path=tmp_path, fps=1000, loop=True), "cam")
    source.open()
    names = [Path(read_until(source).source).name for _ in range(5)]
    assert names == ["a.png", "b.png", "a.png", "b.png", "a.png"]


def test_unreadable_files_are_error_items_and_the_stream_goes_on(tmp_path):
    write_png(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "c.png").write_bytes(b"this is not a png at all")
    (tmp_path / "d.png").write_bytes(png_bytes((9, 9, 9))[:40])  # truncated
    write_png(tmp_path / "e.png", (4, 5, 6))
    source = ReplaySource(ReplayConfig(type="replay", path=tmp_path, fps=1000), "cam")
    source.open()
    items = [read_until(source) for _ in range(5)]
    assert rgb_of(items[0]) == (3, 2, 1)
    for item, name in zip(items[1:4], ["b.png", "c.png", "d.png"], strict=True):
        assert item.frame is None and item.source == str(tmp_path / name)
        assert name in item.error
    assert "empty" in items[1].error
    assert rgb_of(items[4]) == (6, 5, 4)



def test_replay_refuses_a_file_above_the_pixel_limit_as_an_error_item(tmp_path):
    write_png(tmp_path / "a.png", (1, 2, 3))  # 16x12 = 192 pixels
    source = ReplaySource(ReplayConfig(type="replay", path=tmp_path, fps=1000), "cam")
    source.max_pixels = 191
    source.open()
    item = read_until(source)
    assert item.frame is None and item.source == str(tmp_path / "a.png")
    assert item.error == (f"{tmp_path / 'a.png'}: is 16x12 pixels (0.0 MP), above this camera's limit of 0.0 MP "
                          "(refused before decoding; check the camera's resolution, or that the file is the frame "
                          "it should be)")


def test_hot_folder_sends_a_file_above_the_pixel_limit_to_failed(tmp_path):
    write_png(tmp_path / "big.png")
    source = hot(tmp_path)
    source.max_pixels = 100
    item = read_until(source)
    assert item.frame is None and "above this camera's limit" in item.error
    item.done(True)  # not retried after a restart: it is out of the inbox
    assert [p.name for p in (tmp_path / "failed").iterdir()] == ["big.png"] and not (tmp_path / "big.png").exists()
    with pytest.raises(SourceError, match="does not exist"):
        ReplaySource(ReplayConfig(type="replay", path=tmp_path / "nope"), "cam").open()
    with pytest.raises(SourceError, match="no image files"):
        ReplaySource(ReplayConfig(type="replay", path=tmp_path), "cam").open()
    folder = tmp_path / "frames"
    folder.mkdir()
    write_png(folder / "a.png")
    write_png(folder / "b.png")
    source = ReplaySource(ReplayConfig(type="replay", path=folder, fps=1000), "cam")
    source.open()
    assert read_until(source).frame is not None
    shutil.rmtree(folder)
    with pytest.raises(SourceError, match="gone away"):
        read_until(source)


# -- hot folder -----------------------------------------------------------------------------------


def hot(path: Path, **kw) -> FolderSource:
    kw = {"settle_s": 0.05, "poll_s": 0.01} | kw
    source = FolderSource(FolderConfig(type="folder", path=path, **kw), "line1")
    source.open()
    return source


def test_hot_folder_waits_until_a_file_is_complete(tmp_path):
    source = hot(tmp_path, settle_s=0.3)
    data = png_bytes((50, 60, 70))
    with (tmp_path / "x.png").open("wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        assert source.read(0.15) is None  # half written, settle not reached
        f.write(data[len(data) // 2 :])
    finished = time.monotonic()
    assert source.read(0.15) is None  # the size changed: settling starts again
    item = read_until(source)
    assert time.monotonic() - finished >= 0.3
    assert rgb_of(item) == (70, 60, 50) and item.source == str(tmp_path / "x.png")


def test_hot_folder_ignores_hidden_and_temporary_names(tmp_path):
    source = hot(tmp_path)
    for name in ["a.png.part", ".b.png", "c.png.tmp", "d.png~", "e.png.filepart", "F.PNG.TMP"]:
        write_png(tmp_path / name)
    (tmp_path / "sub.png").mkdir()
    assert source.read(0.3) is None
    (tmp_path / "a.png.part").rename(tmp_path / "a.png")
    assert Path(read_until(source).source).name == "a.png"


def test_hot_folder_delivers_oldest_first(tmp_path):
    now = time.time()
    for name, age in [("a.png", 10), ("b.png", 30), ("c.png", 20)]:
        write_png(tmp_path / name)
        os.utime(tmp_path / name, (now - age, now - age))
    source = hot(tmp_path)
    assert [Path(read_until(source).source).name for _ in range(3)] == ["b.png", "c.png", "a.png"]


def test_hot_folder_moves_files_only_after_done(tmp_path):
    write_png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    source = hot(tmp_path)
    items = {Path(i.source).name: i for i in (read_until(source) for _ in range(4))}
    assert items["good.png"].frame is not None
    assert "empty" in items["empty.png"].error
    assert "not an image file" in items["notes.txt"].error
    assert items["bad.png"].error
    # nothing moves before done(), and nothing is handed out twice meanwhile
    assert source.read(0.2) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png", "empty.png", "good.png", "notes.txt"]
    for item in items.values():
        item.done(True)  # an unreadable file goes to failed/ even when the caller says ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "failed"]
    assert [p.name for p in (tmp_path / "done").iterdir()] == ["good.png"]
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == ["bad.png", "empty.png", "notes.txt"]
    assert (tmp_path / "failed" / "notes.txt").read_text() == "hello"


def test_hot_folder_failed_inspection_goes_to_failed_dir_and_custom_dirs(tmp_path):
    inbox, done, failed = tmp_path / "in", tmp_path / "out" / "ok", tmp_path / "out" / "ng"
    inbox.mkdir()
    write_png(inbox / "a.png")
    source = hot(inbox, done_dir=done, failed_dir=failed)
    read_until(source).done(False)
    assert not done.exists() and [p.name for p in failed.iterdir()] == ["a.png"]


def test_hot_folder_never_overwrites_an_existing_name(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "a.png").write_bytes(b"older a")
    (done / "a-1.png").write_bytes(b"older a-1")
    data = png_bytes((1, 1, 1))
    (tmp_path / "a.png").write_bytes(data)
    source = hot(tmp_path)
    read_until(source).done(True)
    assert (done / "a.png").read_bytes() == b"older a"
    assert (done / "a-1.png").read_bytes() == b"older a-1"
    assert (done / "a-2.png").read_bytes() == data
    assert not (tmp_path / "a.png").exists()


def test_hot_folder_done_twice_does_not_touch_a_new_file_of_the_same_name(tmp_path):
    write_png(tmp_path / "a.png")
    source = hot(tmp_path)
    item = read_until(source)
    item.done(True)
    write_png(tmp_path / "a.png", (7, 7, 7))
    item.done(True)
    assert (tmp_path / "a.png").exists() and [p.name for p in (tmp_path / "done").iterdir()] == ["a.png"]
    assert rgb_of(read_until(source)) == (7, 7, 7)  # and the new one is inspected


def test_hot_folder_can_delete_inspected_files(tmp_path):
    write_png(tmp_path / "a.png")
    source = hot(tmp_path, on_done="delete")
    read_until(source).done(True)
    assert list(tmp_path.iterdir()) == []


def test_hot_folder_is_at_least_once_across_a_restart(tmp_path):
    write_png(tmp_path / "a.png")
    first = hot(tmp_path)
    assert read_until(first).source == str(tmp_path / "a.png")
    # the daemon dies before done(): a new process finds the file again
    second = hot(tmp_path)
    again = read_until(second)
    assert again.source == str(tmp_path / "a.png") and again.frame is not None


def test_hot_folder_that_vanishes_is_a_source_error_until_it_returns(tmp_path):
    inbox = tmp_path / "inbox"
    with pytest.raises(SourceError, match="does not exist"):
        hot(inbox)
    inbox.mkdir()
    source = hot(inbox)
    shutil.rmtree(inbox)
    with pytest.raises(SourceError, match="does not exist"):
        source.read(0.1)
    inbox.mkdir()
    write_png(inbox / "b.png")
    source.open()
    assert Path(read_until(source).source).name == "b.png"


@pytest.mark.skipif(
    not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(Path.cwd()).st_dev,
    reason="needs a second file system",
)
def test_hot_folder_moves_across_file_systems(tmp_path):
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("tmp_path and /dev/shm are one file system")
        done = Path(other) / "done"
        done.mkdir()
        (done / "a.png").write_bytes(b"keep me")
        data = png_bytes((3, 3, 3))
        (tmp_path / "a.png").write_bytes(data)
        read_until(hot(tmp_path, done_dir=done)).done(True)
        assert (done / "a.png").read_bytes() == b"keep me" and (done / "a-1.png").read_bytes() == data
        assert not (tmp_path / "a.png").exists()


# -- OpenCV ---------------------------------------------------------------------------------------

COLOURS_BGR = [(0, 0, 200), (0, 200, 0), (200, 0, 0), (100, 100, 100)]


def write_video(path: Path) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    assert writer.isOpened()
    for bgr in COLOURS_BGR:
        writer.write(np.full((24, 32, 3), bgr, np.uint8))
    writer.release()
    return path


def assert_close(actual: np.ndarray, expected: tuple[int, ...], tol: int = 12) -> None:
    assert np.abs(actual.astype(int) - np.array(expected)).max() <= tol, (actual, expected)


def test_opencv_reads_a_video_file_as_rgb_then_ends(tmp_path):
    video = write_video(tmp_path / "clip.avi")
    source = OpenCVSource(OpenCVConfig(type="opencv", device=str(video)), "cam")
    source.open()
    for bgr in COLOURS_BGR:
        item = source.read(1.0)
        assert item.frame.image.shape == (24, 32, 3) and item.frame.image.dtype == np.uint8
        assert_close(item.frame.image[12, 16], bgr[::-1])
    with pytest.raises(EndOfStream):
        source.read(1.0)
    source.close()


def test_opencv_loops_a_file_and_converts_to_grey(tmp_path):
    video = write_video(tmp_path / "clip.avi")
    source = OpenCVSource(OpenCVConfig(type="opencv", device=str(video), loop=True, grey=True), "cam")
    source.open()
    frames = [source.read(1.0).frame.image for _ in range(6)]
    source.close()
    assert all(f.shape == (24, 32) for f in frames)
    luma = [0.114 * b + 0.587 * g + 0.299 * r for b, g, r in COLOURS_BGR]
    for image, expected in zip(frames, luma + luma[:2], strict=True):
        assert_close(image[12, 16], (round(expected),))


def test_opencv_device_that_does_not_exist_is_a_source_error(tmp_path):
    for device in ["/dev/video-does-not-exist", str(tmp_path / "missing.avi")]:
        source = OpenCVSource(OpenCVConfig(type="opencv", device=device), "cam")
        with pytest.raises(SourceError, match="cannot open"):
            source.open()


def test_opencv_live_stream_that_stops_is_a_source_error(tmp_path):
    """A FIFO is not a regular file, so it is read like a live camera: its end is a lost camera, not the end."""
    fifo = tmp_path / "camera.mjpg"
    os.mkfifo(fifo)
    jpegs = [cv2.imencode(".jpg", np.full((24, 32, 3), (0, 0, 180), np.uint8))[1].tobytes() for _ in range(3)]

    def camera() -> None:
        with fifo.open("wb") as f:
            for jpeg in jpegs:
                f.write(jpeg)

    writer = threading.Thread(target=camera, daemon=True)
    writer.start()
    source = OpenCVSource(OpenCVConfig(type="opencv", device=str(fifo), api="ffmpeg"), "cam")
    assert not source.finite
    source.open()
    for _ in range(3):
        assert_close(source.read(1.0).frame.image[0, 0], (180, 0, 0))
    with pytest.raises(SourceError, match="stopped delivering"):
        source.read(1.0)
    source.close()
    writer.join(2)


def test_opencv_masks_credentials_in_what_it_reports():
    source = OpenCVSource(OpenCVConfig(type="opencv", device="rtsp://admin:s3cret@10.0.0.5:554/stream1"), "cam")
    assert "s3cret" not in source.describe() and "10.0.0.5:554/stream1" in source.describe()
