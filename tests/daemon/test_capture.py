"""The capture loop on real sources (replay and hot folders of real PNG files, in a real thread)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.daemon.capture import CaptureLoop
from appliance.daemon.sources import SOURCES, Captured, Source, SourceConfig, register_source
from appliance.daemon.sources.folder import FolderConfig
from appliance.daemon.sources.replay import ReplayConfig, read_item
from appliance.errors import ConfigError


def write_png(path: Path, value: int = 100) -> Path:
    assert cv2.imwrite(str(path), np.full((8, 8), value, np.uint8))
    return path


class Recorder:
    """Collects what the loop delivers and reports, and lets a test wait for it."""

    def __init__(self) -> None:
        self.items: list[tuple[Captured, str | None]] = []
        self.states: list[tuple[str, str]] = []
        self._cond = threading.Condition()

    def deliver(self, item: Captured, trigger_id: str | None) -> None:
        with self._cond:
            self.items.append((item, trigger_id))
            self._cond.notify_all()

    def on_state(self, state: str, detail: str) -> None:
        with self._cond:
            self.states.append((state, detail))
            self._cond.notify_all()

    def wait(self, predicate, timeout: float = 3.0) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), (self.items, self.states)

    def wait_items(self, n: int, timeout: float = 3.0) -> list[tuple[Captured, str | None]]:
        self.wait(lambda: len(self.items) >= n, timeout)
        return self.items[:n]

    def wait_state(self, state: str, after: int = 0, timeout: float = 3.0) -> None:
        self.wait(lambda: state in [s for s, _ in self.states[after:]], timeout)

    def state_names(self) -> list[str]:
        return [s for s, _ in self.states]


@pytest.fixture
def rec():
    return Recorder()


@pytest.fixture
def loops():
    started: list[CaptureLoop] = []
    yield started
    for loop in started:
        loop.stop(2.0)


def make(loops, rec, config: SourceConfig, **kw) -> CaptureLoop:
    kw = {"backoff_initial": 0.05, "backoff_max": 0.2} | kw
    loop = CaptureLoop("cam1", config, deliver=rec.deliver, on_state=rec.on_state, **kw)
    loops.append(loop)
    return loop


def hot(path: Path, **kw) -> FolderConfig:
    return FolderConfig(type="folder", path=path, **({"settle_s": 0.05, "poll_s": 0.01} | kw))


def test_free_run_stamps_frames_and_reports_the_end(tmp_path, rec, loops):
    for i, value in enumerate([10, 20, 30]):
        write_png(tmp_path / f"{i}.png", value)
    loop = make(loops, rec, ReplayConfig(type="replay", path=tmp_path, fps=1000))
    before = time.time()
    loop.start()
    items = rec.wait_items(3)
    rec.wait_state("ended")
    assert [int(i.frame.image[0, 0]) for i, _ in items] == [10, 20, 30]
    assert [i.frame.seq for i, _ in items] == [1, 2, 3]
    assert all(i.frame.camera == "cam1" and t is None for i, t in items)
    stamps = [i.frame.timestamp for i, _ in items]
    assert before <= stamps[0] <= stamps[1] <= stamps[2] <= time.time()
    assert loop.frames == 3 and loop.errors == 0 and loop.state == "ended"
    assert loop.stop(1.0)
    assert rec.state_names() == ["connecting", "running", "ended", "stopped"]


def test_free_run_caps_the_rate(tmp_path, rec, loops):
    write_png(tmp_path / "a.png")
    loop = make(loops, rec, ReplayConfig(type="replay", path=tmp_path, fps=1000, loop=True), fps=20)
    loop.start()
    rec.wait_items(1)
    start = time.monotonic()
    n0 = len(rec.items)
    time.sleep(0.5)
    n = len(rec.items) - n0
    elapsed = time.monotonic() - start
    loop.stop()
    assert 0.5 * 20 * elapsed <= n <= 20 * elapsed + 2


def test_unreadable_files_are_delivered_as_errors_and_counted(tmp_path, rec, loops):
    write_png(tmp_path / "a.png", 1)
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "c.png").write_bytes(b"garbage")
    write_png(tmp_path / "d.png", 4)
    loop = make(loops, rec, ReplayConfig(type="replay", path=tmp_path, fps=1000))
    loop.start()
    items = rec.wait_items(4)
    assert [i.frame is not None for i, _ in items] == [True, False, False, True]
    assert [i.frame.seq for i, _ in items if i.frame is not None] == [1, 2]
    rec.wait_state("ended")
    assert loop.frames == 2 and loop.errors == 2


def test_trigger_mode_gives_one_item_per_trigger_in_order(tmp_path, rec, loops):
    now = time.time()
    for i, value in enumerate([11, 22, 33]):
        write_png(tmp_path / f"{i}.png", value)
        os.utime(tmp_path / f"{i}.png", (now - 10 + i, now - 10 + i))
    loop = make(loops, rec, hot(tmp_path), mode="trigger", trigger_timeout=2.0)
    loop.start()
    rec.wait_state("running")
    time.sleep(0.3)
    assert rec.items == []  # nothing is read without a trigger
    for tid in ["t1", "t2", "t3"]:
        assert loop.trigger(tid)
    items = rec.wait_items(3)
    assert [t for _, t in items] == ["t1", "t2", "t3"]
    assert [int(i.frame.image[0, 0]) for i, _ in items] == [11, 22, 33]
    assert [i.frame.seq for i, _ in items] == [1, 2, 3]


def test_a_trigger_with_nothing_to_read_gets_an_error_item(tmp_path, rec, loops):
    loop = make(loops, rec, hot(tmp_path), mode="trigger", trigger_timeout=0.3)
    loop.start()
    rec.wait_state("running")
    start = time.monotonic()
    assert loop.trigger("t-empty")
    (item, tid), = rec.wait_items(1)
    assert 0.25 <= time.monotonic() - start < 1.5
    assert tid == "t-empty" and item.frame is None and "no image within" in item.error
    assert loop.errors == 1


def test_trigger_overruns_are_refused_and_counted_and_pending_ones_still_answered(tmp_path, rec, loops):
    loop = make(loops, rec, hot(tmp_path), mode="trigger", trigger_queue=2, trigger_timeout=5.0)
    assert loop.trigger("a") and loop.trigger("b")
    assert not loop.trigger("c")
    assert not loop.trigger("d")
    assert loop.trigger_overruns == 2
    loop.start()
    rec.wait_state("running")
    assert loop.stop(1.0)
    items = rec.wait_items(2)
    assert [t for _, t in items] == ["a", "b"] and all(i.error for i, _ in items)
    assert not loop.trigger("e")  # stopped: nobody would answer it


def test_triggers_after_a_finite_source_ended_get_error_items(tmp_path, rec, loops):
    write_png(tmp_path / "a.png", 9)
    loop = make(loops, rec, ReplayConfig(type="replay", path=tmp_path, fps=1000), mode="trigger")
    loop.start()
    loop.trigger("t1")
    rec.wait_items(1)
    loop.trigger("t2")
    rec.wait_state("ended")
    loop.trigger("t3")
    items = rec.wait_items(3)
    assert [t for _, t in items] == ["t1", "t2", "t3"]
    assert int(items[0][0].frame.image[0, 0]) == 9
    assert all("source ended" in i.error for i, _ in items[1:])


def test_trigger_while_the_camera_is_lost_is_answered_at_once(tmp_path, rec, loops):
    loop = make(loops, rec, hot(tmp_path / "missing"), mode="trigger", trigger_timeout=5.0,
                backoff_initial=5.0, backoff_max=5.0)
    loop.start()
    rec.wait_state("lost")
    start = time.monotonic()
    loop.trigger("t1")
    (item, tid), = rec.wait_items(1)
    assert time.monotonic() - start < 1.0
    assert tid == "t1" and "camera lost" in item.error and "does not exist" in item.error


def test_a_vanished_folder_is_lost_then_running_again(tmp_path, rec, loops):
    inbox = tmp_path / "inbox"
    loop = make(loops, rec, hot(inbox))
    loop.start()
    rec.wait_state("lost")  # missing at start: reported, not a crash
    inbox.mkdir()
    rec.wait_state("running")
    write_png(inbox / "a.png", 1)
    rec.wait_items(1)
    mark = len(rec.states)
    shutil.rmtree(inbox)
    rec.wait_state("lost", after=mark)
    assert loop.state == "lost" and "does not exist" in loop.state_detail
    inbox.mkdir()
    write_png(inbox / "b.png", 2)
    rec.wait_state("running", after=mark)
    items = rec.wait_items(2)
    assert [int(i.frame.image[0, 0]) for i, _ in items] == [1, 2]
    assert rec.state_names() == ["connecting", "lost", "running", "lost", "running"]
    assert loop.reconnects == 1 and loop.alive  # the first successful open is not a reconnect


def test_stop_is_prompt_in_every_wait(tmp_path, rec, loops):
    write_png(tmp_path / "a.png")
    slow = ReplayConfig(type="replay", path=tmp_path, fps=0.2, loop=True)
    cases = [
        make(loops, rec, hot(tmp_path), mode="trigger"),  # waiting for a trigger
        make(loops, rec, hot(tmp_path / "missing"), backoff_initial=30.0, backoff_max=30.0),  # backing off
        make(loops, rec, slow),  # between two slow replay items
        make(loops, rec, slow, fps=0.1),  # between two rate-capped items
    ]
    for loop in cases:
        loop.start()
    time.sleep(0.4)
    for loop in cases:
        start = time.monotonic()
        assert loop.stop(2.0)
        assert time.monotonic() - start < 0.5
        assert loop.state == "stopped"


class Flaky(SourceConfig):
    """Config of a test plug-in whose reads fail in ways a real driver might."""

    type: str = "test-flaky"
    path: Path


@pytest.fixture
def flaky_source():
    """A registered plug-in whose first read raises a bare RuntimeError (a driver bug), then works."""

    class FlakySource(Source):
        type = "test-flaky"
        Config = Flaky
        failures = 0

        def open(self) -> None:
            pass

        def read(self, timeout: float) -> Captured | None:
            if FlakySource.failures == 0:
                FlakySource.failures += 1
                raise RuntimeError("driver bug")
            time.sleep(0.02)
            return read_item(self.config.path, self.camera)

    register_source(FlakySource)
    yield FlakySource
    del SOURCES["test-flaky"]


def test_an_unexpected_exception_in_a_source_is_a_loss_not_a_crash(tmp_path, rec, loops, flaky_source):
    loop = make(loops, rec, Flaky(path=write_png(tmp_path / "a.png", 5)))
    loop.start()
    item, _ = rec.wait_items(1)[0]
    assert int(item.frame.image[0, 0]) == 5
    assert rec.state_names()[:4] == ["connecting", "running", "lost", "running"]
    assert "RuntimeError" in rec.states[2][1] and "driver bug" in rec.states[2][1]
    assert loop.reconnects == 1


def test_a_failing_consumer_does_not_stop_the_camera(tmp_path, rec, loops):
    for i in range(3):
        write_png(tmp_path / f"{i}.png", i)
    got: list[int] = []

    def deliver(item: Captured, trigger_id: str | None) -> None:
        got.append(int(item.frame.image[0, 0]))
        if len(got) == 1:
            raise ValueError("consumer bug")
        rec.deliver(item, trigger_id)

    loop = CaptureLoop("cam1", ReplayConfig(type="replay", path=tmp_path, fps=1000), deliver=deliver,
                       on_state=rec.on_state)
    loops.append(loop)
    loop.start()
    rec.wait_items(2)
    assert got == [0, 1, 2]


def test_bad_arguments_are_config_errors(tmp_path, rec):
    config = ReplayConfig(type="replay", path=tmp_path)
    with pytest.raises(ConfigError, match="runs free"):
        CaptureLoop("c", config, deliver=rec.deliver, on_state=rec.on_state).trigger("t")
    with pytest.raises(ConfigError, match="backoff"):
        CaptureLoop("c", config, deliver=rec.deliver, on_state=rec.on_state, backoff_initial=0)
    with pytest.raises(ConfigError, match="unknown source type"):
        CaptureLoop("c", SourceConfig(type="nope"), deliver=rec.deliver, on_state=rec.on_state)
