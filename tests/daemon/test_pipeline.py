"""The camera pipeline in-process, with a stand-in engine: ordering, a swap between two frames, drops,
backpressure, the exception path, idle triggered cameras and a bounded stop.

The sources are real (replay and hot folders of real PNG files, real threads); only the engine is a
stand-in that scores a frame by its mean pixel value, so each test can say which frames exist, how
long they take and which one fails.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from appliance.daemon.config import Camera
from appliance.daemon.health import stall_reasons
from appliance.daemon.pipeline import CameraPipeline
from appliance.errors import ApplianceError
from appliance.preprocess import PreprocessSpec
from appliance.types import Decision, Prediction, Score

SPEC = PreprocessSpec((16, 16), (16, 16))


class StandInEngine:
    """Scores a frame by its mean pixel value / 255, after ``delay_s``; pixel value 13 fails, 66 raises."""

    def __init__(self, model_id: str = "stand-in-a", delay_s: float = 0.0) -> None:
        self.model_id = model_id
        self.delay_s = delay_s
        self.spec = SPEC
        self.manifest = {"files": {"scorer/bank.npy": {"sha256": model_id}}}
        self.bundle_path = None
        self.gate = threading.Event()
        self.gate.set()
        self.closed = False

    def predict_stream(self, frames, threshold, on_error, depth: int = 2):
        for frame in frames:
            if frame is None:
                continue
            self.gate.wait()
            time.sleep(self.delay_s)
            value = int(frame.image.flat[0])
            if value == 13:
                on_error(frame, ApplianceError("frame 13 cannot be scored"))
                continue
            if value == 66:
                raise RuntimeError("a bug in the engine")
            score = value / 255
            limit, source = threshold(frame)
            yield Prediction(frame, Score(score, np.zeros((2, 2), np.float32), np.zeros(4, np.float32)),
                             Decision(score, limit, score >= limit, source), self.model_id, {"total": 1.0})

    def anomaly_map(self, score: Score, **kw: Any) -> np.ndarray:
        return np.zeros((16, 16), np.float32)

    def close(self) -> None:
        self.closed = True


class Sink:
    """What the pipeline hands on: records in order, and events."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.events: list[tuple[str, str | None, str | None, Any]] = []
        self.done: list[bool] = []
        self._cond = threading.Condition()

    def emit(self, record, item) -> None:
        if item is not None and item.done is not None:  # the file is moved before the record counts as handed on
            item.done(record.verdict != "error")
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def event(self, kind: str, camera: str | None = None, detail: str | None = None, data: Any = None) -> None:
        with self._cond:
            self.events.append((kind, camera, detail, data))
            self._cond.notify_all()

    def wait(self, predicate, timeout: float = 10.0) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), (self.records[-3:], self.events[-3:])


def write_frames(folder: Path, values: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, value in enumerate(values):
        path = folder / f"{i:04d}.png"
        assert cv2.imwrite(str(path), np.full((16, 16), value, np.uint8))
        paths.append(path)
    return paths


def camera(source: dict[str, Any], **extra: Any) -> Camera:
    return Camera.model_validate({"id": "cam1", "bundle": "/nowhere", "source": source, **extra})


@pytest.fixture
def pipelines():
    started: list[CameraPipeline] = []
    yield started
    for p in started:
        p.stop(2.0)


def make(pipelines, cam: Camera, engine: StandInEngine, sink: Sink) -> CameraPipeline:
    p = CameraPipeline(cam, engine, threshold_for=lambda c, when: (0.5, "bundle"), sink=sink,
                       on_state=lambda *a: None)
    pipelines.append(p)
    return p


def test_results_leave_in_capture_order_with_errors_in_place(tmp_path, pipelines):
    values = [10, 20, 13, 30, 40, 13, 50]
    paths = write_frames(tmp_path / "replay", values)
    (tmp_path / "replay" / "0003a.png").write_bytes(b"not a png")  # an unreadable file between 3 and 4
    sink = Sink()
    p = make(pipelines, camera({"type": "replay", "path": str(tmp_path / "replay"), "fps": 200}),
             StandInEngine(), sink)
    p.start()
    sink.wait(lambda: len(sink.records) == len(values) + 1)
    got = [Path(r.source).name for r in sink.records]
    assert got == sorted(p.name for p in (tmp_path / "replay").iterdir())
    assert [r.seq for r in sink.records] == list(range(1, len(values) + 2))
    errors = {Path(r.source).name: r.error for r in sink.records if r.verdict == "error"}
    assert set(errors) == {paths[2].name, "0003a.png", paths[5].name}
    assert "cannot be scored" in errors[paths[2].name]
    assert all(r.file_sha256 and len(r.file_sha256) == 64 for r in sink.records)
    scored = [r for r in sink.records if r.verdict != "error"]
    assert all(r.embedding is not None for r in scored)


def test_a_swap_happens_between_two_frames_and_loses_none(tmp_path, pipelines):
    write_frames(tmp_path / "inbox", list(range(20, 80)))
    sink = Sink()
    a, b = StandInEngine("model-a", delay_s=0.005), StandInEngine("model-b", delay_s=0.005)
    p = make(pipelines, camera({"type": "folder", "path": str(tmp_path / "inbox"), "settle_s": 0, "poll_s": 0.02}),
             a, sink)
    p.start()
    sink.wait(lambda: len(sink.records) >= 15)
    p.swap_engine(b)
    sink.wait(lambda: len(sink.records) == 60)
    models = [r.model_id for r in sink.records]
    switch = models.index("model-b")
    assert 15 <= switch < 60
    assert models == ["model-a"] * switch + ["model-b"] * (60 - switch)  # exactly one change, between two frames
    assert [r.seq for r in sink.records] == list(range(1, 61))
    assert p.status()["bundle"]["model_id"] == "model-b"


def test_a_live_camera_drops_its_oldest_frame_as_an_audited_event(tmp_path, pipelines):
    paths = write_frames(tmp_path / "replay", [20] * 30)
    sink = Sink()
    engine = StandInEngine()
    engine.gate.clear()  # nothing is scored until the queue has overflowed
    p = make(pipelines, camera({"type": "replay", "path": str(tmp_path / "replay"), "fps": 500}, queue=2),
             engine, sink)
    p.start()
    sink.wait(lambda: len(sink.events) >= 10)
    engine.gate.set()
    sink.wait(lambda: len(sink.records) + len(sink.events) == len(paths))
    drops = [e for e in sink.events if e[0] == "frame_dropped"]
    assert len(drops) == len(sink.events) and p.status()["drops"] == len(drops)
    dropped = {Path(e[3]["source"]).name for e in drops}
    inspected = {Path(r.source).name for r in sink.records}
    assert dropped | inspected == {q.name for q in paths} and not dropped & inspected  # each frame once
    assert all("queue was full" in e[2] for e in drops)


def test_a_hot_folder_waits_for_room_and_loses_nothing(tmp_path, pipelines):
    inbox = tmp_path / "inbox"
    paths = write_frames(inbox, [20] * 12)
    sink = Sink()
    engine = StandInEngine(delay_s=0.02)
    p = make(pipelines, camera({"type": "folder", "path": str(inbox), "settle_s": 0, "poll_s": 0.02}, queue=1),
             engine, sink)
    p.start()
    sink.wait(lambda: len(sink.records) == len(paths))
    assert not sink.events and p.status()["drops"] == 0
    assert sorted(q.name for q in (inbox / "done").iterdir()) == [q.name for q in paths]


def test_an_engine_bug_becomes_error_results_and_inspection_goes_on(tmp_path, pipelines):
    write_frames(tmp_path / "replay", [20, 30, 66, 40, 50])
    sink = Sink()
    p = make(pipelines, camera({"type": "replay", "path": str(tmp_path / "replay"), "fps": 100}),
             StandInEngine(), sink)
    p.start()
    sink.wait(lambda: len(sink.records) == 5)
    verdicts = [(Path(r.source).name, r.verdict) for r in sink.records]
    assert verdicts[:2] == [("0000.png", "ok"), ("0001.png", "ok")]
    assert verdicts[2] == ("0002.png", "error") and "internal error" in sink.records[2].error
    assert [v for _, v in verdicts[3:]] == ["ok", "ok"]


def test_an_idle_triggered_camera_is_healthy_when_its_next_trigger_arrives(tmp_path, pipelines):
    write_frames(tmp_path / "replay", [20, 30])
    sink = Sink()
    engine = StandInEngine()
    p = make(pipelines, camera({"type": "replay", "path": str(tmp_path / "replay"), "loop": True, "fps": 100},
                               trigger={"mode": "external"}), engine, sink)
    p.start()
    assert p.trigger("t1")
    sink.wait(lambda: len(sink.records) == 1)
    time.sleep(0.6)  # idle for longer than the stall limit below: nothing waits, so nothing is stalled
    assert stall_reasons(p.progress(), time.monotonic(), stall_s=0.3) == []
    engine.gate.clear()  # the next frame hangs in the engine
    assert p.trigger("t2")
    deadline = time.monotonic() + 5
    while p.progress().oldest_waiting is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stall_reasons(p.progress(), time.monotonic(), stall_s=0.3) == []  # just arrived: not stalled
    time.sleep(0.5)
    assert "a frame has waited more than 0.3 s for its result" in stall_reasons(p.progress(), time.monotonic(),
                                                                                stall_s=0.3)
    engine.gate.set()
    sink.wait(lambda: len(sink.records) == 2)
    assert [r.trigger_id for r in sink.records] == ["t1", "t2"]


def test_stop_is_bounded_and_answers_every_waiting_trigger(tmp_path, pipelines):
    write_frames(tmp_path / "replay", [20])
    sink = Sink()
    engine = StandInEngine()
    p = make(pipelines, camera({"type": "replay", "path": str(tmp_path / "replay"), "loop": True, "fps": 200},
                               trigger={"mode": "external"}, queue=8), engine, sink)
    p.start()
    engine.gate.clear()  # the engine hangs on the first frame
    for i in range(5):
        assert p.trigger(f"t{i}")
    deadline = time.monotonic() + 5
    while p.queue_depth() < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    threading.Timer(0.5, engine.gate.set).start()  # the engine recovers after the stop has begun
    started = time.monotonic()
    assert p.stop(timeout=0.3)  # shorter than the hang: the queued triggers are answered, not inspected
    assert time.monotonic() - started < 3.0
    by_trigger = {r.trigger_id: r for r in sink.records}
    assert set(by_trigger) == {f"t{i}" for i in range(5)}  # every trigger has exactly one answer
    given_up = [r for r in sink.records if r.verdict == "error"]
    assert given_up and all("not inspected" in r.error for r in given_up)
