"""A fleet trainer under load: 50+ simulated appliances, PostgreSQL + S3, one and two rebuild workers, on loopback.

    .venv/bin/python bench/fleet_bench.py --out bench/results/fleet [--appliances 50] [--frames 80] [--jobs 16] \
        [--client-procs 2] [--repeats 20] [--burst 10] [--no-contention] [--quick] [--keep]

Everything is real and local: a throwaway PostgreSQL cluster and SeaweedFS (``weed mini``, S3) started with the
test suite's own helpers (``tests/servers.py``), ``appliance trainer serve --workers 0`` as a subprocess on a
``fleet`` trainer.toml (presigned uploads on; ``rebuild.scorer = "padim"``, ``rebuild.size = "128"`` so that a
rebuild takes seconds, not minutes; ``jobs.max_attempts = 1`` so that a failure shows at once instead of after
a retry delay) and ``appliance trainer worker`` processes. No daemon runs: each simulated appliance is a thread
holding its own ``TrainerClient`` (the daemon uploader's client, with its own token from the admin API) that
makes the uploader's calls in its order: ``report_camera``, then per frame ``upload_plan``, the PUT to the
presigned URL, ``finish_upload``; a label right after the frame it is about; at three quarters of its frames a
drift (``report_camera`` with the drift state and a ``drift_raised`` event, which creates a rebuild job awaiting
approval). The appliance threads are spread over ``--client-procs`` processes so that the client's GIL is not
what is measured (the report gives the clients' CPU time beside the trainer's).

Frames are the bundled ball-screw sample's 160 JPEGs (140 good: verdict ``ok``; 20 pitting: ``ng``), each sent
as its original bytes with a JPEG comment segment (FF FE, after SOI) naming the appliance and the frame: valid
JPEGs with the sample's pixels, a distinct sha256 for every frame, so content addressing dedupes nothing. A
camera's frames cycle through the 160 images from an offset of its own (no image twice in 160 frames). Scores
are synthetic (no model runs on the client): ``ok`` 0.05-0.45, ``ng`` 0.55-0.95, threshold 0.5, recorded under
the running model ``padim-fleetbench``; half the ``ng`` frames are labelled defect, one ``ok`` frame in 40
labelled good. The gate therefore compares each rebuilt model with the appliance's recorded, perfectly
separating scores, and will often refuse it: a refusal is a whole rebuild (dataset, export, fit, pack, store,
evaluate) and counts as an ended job; its reason is reported.

Phases, each with the CPU seconds every part used (trainer, PostgreSQL, SeaweedFS, clients, workers, others):

1. uploads: N appliances x M frames, closed loop (each appliance sends its next frame when the last one is
   done: a saturation test; the figure says how many frames a second the trainer takes from the fleet):
   frames/s, MB/s, per-upload latency p50/p95/p99 (plan + PUT + finish) and per step, errors (should be 0;
   every one is listed). Meanwhile one admin calls the routes of phase 2 in turn, 0.25 s apart ("under load").
2. catalogue queries with N*M frames held: the admin list routes, an appliance's ``GET /api/v1/models``, the
   page ``/`` and ``/healthz`` (p50/p95 over repeated calls), and the dataset draw a rebuild starts with
   (``datasets.draw`` for every camera; ``datasets.create_version`` for one) on the catalogue directly.
3. rebuild throughput: the K cameras' drift jobs (awaiting approval) are cancelled through the admin API, then
   K rebuilds are requested (one per camera) with ONE ``appliance trainer worker`` process waiting for them,
   then K more with TWO worker processes, after 3 more frames reached each camera: a new dataset version of
   nearly the same frames, so nearly the same work (the very same frames would give the same bundle, whose
   earlier verdict the trainer keeps without judging it again; an approved drift job would draw differently:
   frames after the drift are the new normal). Per round: the
   time from the first request until all K ended, jobs/hour in all and per worker, each job's own time, each
   status with its reason, each worker's peak RSS (``ru_maxrss`` from ``wait4``). The K cameras are the first
   whose frames give the gate its ``gate.min_eval_good`` held-out good frames; cameras with fewer than
   ``--rebuild-frames`` frames are topped up first (only the ``--quick`` run needs it).
4. optional (``--contention``, on by default outside ``--quick``): a burst of uploads to each appliance's second
   camera with the workers idle, then the same burst while two workers rebuild: what rebuilds cost the uploads.
   The catalogue queries are timed once more at the end (datasets, models and evaluations now exist).

This machine has few cores (2 where it was written): the clients, the trainer, PostgreSQL, SeaweedFS and the
workers all share them, so every figure is a figure of the whole loopback system, not of the trainer alone,
and the one-to-two-workers ratio is bounded by the cores, not by the queue. The summary says so with the
core count and the load average at the start, and every phase's CPU table has ``others``: the machine's busy time
that none of the bench's processes used (other work on a shared machine). The full default run takes 4.5 to
6.5 minutes on 2 cores (the --quick run about one minute).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import re
import resource
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tomli_w

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
from machine import describe, one_line  # noqa: E402
from servers import ACCESS_KEY, SECRET_KEY, free_port, pg_server, seaweed_server  # noqa: E402

from appliance.trainer.client import TrainerClient, TrainerError  # noqa: E402
from appliance.trainer.config import load_trainer_config  # noqa: E402
from appliance.trainer.datasets import create_version, draw, in_eval  # noqa: E402
from appliance.trainer.records import DatasetRule, DriftEvent, FrameMeta, Label  # noqa: E402
from appliance.trainer.storage import open_storage  # noqa: E402

SAMPLES = ROOT / "appliance" / "samples" / "ball_screw"
EXE = Path(sys.executable).parent / "appliance"
CAMERA, BURST_CAMERA = "line-1", "line-2"
RUNNING = "padim-fleetbench"
THRESHOLD = 0.5
API = "/api/v1"
ENDED = ("succeeded", "refused", "failed", "cancelled")
DAY_S = 86400.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stats_ms(seconds: list[float]) -> dict[str, Any]:
    """p50/p95/p99/max in milliseconds of a list of durations in seconds."""
    if not seconds:
        return {"n": 0}
    ms = np.asarray(seconds, np.float64) * 1000
    return {"n": len(seconds), "p50": round(float(np.percentile(ms, 50)), 1),
            "p95": round(float(np.percentile(ms, 95)), 1), "p99": round(float(np.percentile(ms, 99)), 1),
            "max": round(float(ms.max()), 1)}


# ================================================================================== CPU accounting (/proc)
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """Every process now: pid -> (ppid, CPU seconds of the process and of its reaped children)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / _TICK)
    return table


def tree_cpu(root: int, table: dict[int, tuple[int, float]]) -> float:
    """CPU seconds of ``root`` and its descendants (live ones, and reaped ones through cutime/cstime)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += table.get(pid, (0, 0.0))[1]
        todo += children.get(pid, [])
    return total


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores; /proc/stat, idle and iowait excluded)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / _TICK


def _own_cpu() -> float:
    """CPU seconds of this process (all its threads: the admin calls, the catalogue reads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMeter:
    """CPU seconds used by the long-running parts (by pid tree) and by the whole machine, between two marks."""

    pids: dict[str, int]
    _start: dict[str, float] = field(default_factory=dict)
    _wall: float = 0.0
    _self: float = 0.0

    def snapshot(self) -> dict[str, float]:
        """CPU seconds so far of each part and of the machine."""
        table = _proc_table()
        return {**{name: tree_cpu(pid, table) for name, pid in self.pids.items()}, "machine": machine_busy_s()}

    def start(self) -> None:
        """Mark the start of a measurement."""
        self._start, self._wall, self._self = self.snapshot(), time.perf_counter(), _own_cpu()

    def stop(self, **known: float) -> dict[str, float]:
        """CPU seconds per part since ``start``, with ``known`` parts measured otherwise (clients, workers).

        ``others`` is the machine's busy time not accounted for (other work on a shared machine).
        """
        end = self.snapshot()
        used = {name: end[name] - self._start[name] for name in self.pids}
        used["bench"] = _own_cpu() - self._self
        used.update(known)
        machine = end["machine"] - self._start["machine"]
        used["others"] = machine - sum(used.values())
        used["machine"] = machine
        used["wall_s"] = time.perf_counter() - self._wall
        return {k: round(v, 1) for k, v in used.items()}


# ================================================================================== servers and the trainer
@contextlib.contextmanager
def fleet_servers() -> Iterator[tuple[Any, Any]]:
    """PostgreSQL and SeaweedFS exactly as the tests' session fixtures start them (and stop them, also on errors)."""
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(contextlib.contextmanager(pg_server.__wrapped__)())
        weed = stack.enter_context(contextlib.contextmanager(seaweed_server.__wrapped__)())
        yield pg, weed


def write_config(folder: Path, pg: Any, weed: Any, admin_token: str) -> Path:
    config = folder / "trainer.toml"
    s3 = {"endpoint": weed.endpoint, "bucket": "fleet-bench", "access_key": ACCESS_KEY, "secret_key": SECRET_KEY,
          "presign": True}
    config.write_text(tomli_w.dumps({
        "host": "127.0.0.1", "port": free_port(), "work_dir": str(folder / "work"),
        "admin_tokens": {"bench": admin_token},
        "storage": {"type": "fleet", "database_url": pg.create_database(), "s3": s3},
        "jobs": {"max_attempts": 1},
        "rebuild": {"scorer": "padim", "size": "128"}}))
    return config


def start_process(args: list[str], logfile: Path) -> subprocess.Popen:
    with logfile.open("ab") as out:
        return subprocess.Popen([str(EXE), "trainer", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def stop_process(proc: subprocess.Popen, timeout_s: float = 90.0) -> resource.struct_rusage | None:
    """SIGTERM by pid, reap with ``wait4`` (its rusage: this process only), SIGKILL after ``timeout_s``."""
    if proc.returncode is not None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage
        time.sleep(0.1)
    log(f"process {proc.pid} did not stop in {timeout_s:.0f} s: SIGKILL")
    os.kill(proc.pid, signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage


def wait_healthy(url: str, proc: subprocess.Popen, logfile: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the trainer exited with {proc.returncode}:\n{logfile.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/healthz", timeout=2) as answer:
            if answer.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the trainer did not answer /healthz in {timeout_s:.0f} s:\n{logfile.read_text()[-3000:]}")


class Admin:
    """The admin API over one keep-alive connection, every call timed."""

    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)

    def call(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> tuple[httpx.Response, float]:
        """One request (as an appliance when ``token`` is given): the answer and its time; an error status raises."""
        headers = {"Authorization": f"Bearer {token}"} if token else None
        t0 = time.perf_counter()
        answer = self.http.request(method, path, headers=headers, **kwargs)
        took = time.perf_counter() - t0
        if answer.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text[:500]}")
        return answer, took

    def close(self) -> None:
        """Close the connection."""
        self.http.close()


def register(admin: Admin, count: int) -> tuple[list[tuple[str, str]], list[float]]:
    """``count`` appliances through ``POST /api/v1/admin/appliances``: their (id, token) and each call's time."""
    appliances, times = [], []
    for i in range(count):
        answer, took = admin.call("POST", f"{API}/admin/appliances", json={"id": f"edge-{i:03d}",
                                                                           "name": f"simulated line {i}"})
        appliances.append((answer.json()["appliance"]["id"], answer.json()["token"]))
        times.append(took)
    return appliances, times


# ================================================================================== what each appliance sends
@dataclass(frozen=True)
class FrameSpec:
    """One frame an appliance sends: which sample image, its audit metadata and whether it gets a label."""

    index: int
    inspection_id: str
    source: int
    verdict: str
    score: float
    captured_at: float
    label: str | None


def sources() -> list[tuple[Path, str]]:
    """The sample's 160 images with their verdicts, in a fixed order that spreads the pitting ones out."""
    found = [(p, "ok") for sub in ("train/good", "test/good") for p in sorted((SAMPLES / sub).glob("*.jpg"))]
    found += [(p, "ng") for p in sorted((SAMPLES / "test" / "pitting").glob("*.jpg"))]
    return sorted(found, key=lambda item: hashlib.sha256(item[0].name.encode()).hexdigest())


def plan_frames(appliance: int, camera: str, start: int, stop: int, now: float, verdicts: list[str]) -> list[FrameSpec]:
    """Frames ``start``..``stop - 1`` of an appliance's camera (deterministic: the same call, the same frames)."""
    offset = (appliance * 37 + (0 if camera == CAMERA else 80)) % len(verdicts)
    specs = []
    for i in range(start, stop):
        source = (offset + i) % len(verdicts)
        verdict = verdicts[source]
        rng = random.Random(f"{appliance}/{camera}/{i}")
        score = rng.uniform(0.05, 0.45) if verdict == "ok" else rng.uniform(0.55, 0.95)
        label = "defect" if verdict == "ng" and i % 2 == 0 else "good" if verdict == "ok" and i % 40 == 7 else None
        specs.append(FrameSpec(i, f"{camera}-{i:05d}", source, verdict, round(score, 4),
                               now - 20 * DAY_S + appliance * 60 + i * 30, label))
    return specs


def predicted_eval_good(specs: list[FrameSpec], eval_share: float = 0.2) -> int:
    """Held-out good frames the dataset rule will draw from these frames (before its 1 % outlier cut)."""
    return sum(1 for s in specs if (s.verdict == "ok" or s.label == "good") and s.label != "defect"
               and in_eval(s.inspection_id, eval_share))


def jpeg_bytes(original: bytes, comment: str) -> bytes:
    """The JPEG with a comment segment after SOI: same pixels, other bytes (so another sha256)."""
    text = comment.encode()
    return original[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + original[2:]


@dataclass
class Task:
    """One simulated appliance's share of a phase: its frames of one camera, and whether it raises a drift."""

    appliance: int
    appliance_id: str
    token: str
    camera: str
    start: int
    stop: int
    drift_at: int | None = None


@dataclass
class Outcome:
    """What a group of appliance threads measured: per-upload times, bytes, errors, the process's CPU time."""

    total: list[float] = field(default_factory=list)
    plan: list[float] = field(default_factory=list)
    put: list[float] = field(default_factory=list)
    finish: list[float] = field(default_factory=list)
    labels: list[float] = field(default_factory=list)
    drift: list[float] = field(default_factory=list)  # report_camera and drift events
    frames: int = 0
    known: int = 0
    bytes: int = 0
    labelled: int = 0
    drift_jobs: int = 0
    errors: list[str] = field(default_factory=list)
    first: float = float("inf")
    last: float = 0.0
    cpu_s: float = 0.0

    def merge(self, other: Outcome) -> None:
        """Add another group's measurements to these."""
        for name in ("total", "plan", "put", "finish", "labels", "drift", "errors"):
            getattr(self, name).extend(getattr(other, name))
        for name in ("frames", "known", "bytes", "labelled", "drift_jobs", "cpu_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.first, self.last = min(self.first, other.first), max(self.last, other.last)


def _timed(out: list[float], call: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    result = call()
    out.append(time.perf_counter() - t0)
    return result


def run_appliance(url: str, task: Task, images: list[bytes], verdicts: list[str], now: float) -> Outcome:
    """One appliance's uploads, in the daemon uploader's order; an error is recorded and the next item goes on."""
    out = Outcome()
    client = TrainerClient(url, task.token, timeout=60)
    specs = plan_frames(task.appliance, task.camera, task.start, task.stop, now, verdicts)
    payloads = [jpeg_bytes(images[s.source], f"{task.appliance_id}/{task.camera}/{s.inspection_id}") for s in specs]
    metas = [FrameMeta(camera_id=task.camera, inspection_id=s.inspection_id, sha256=hashlib.sha256(data).hexdigest(),
                       suffix=".jpg", size=len(data), captured_at=s.captured_at, verdict=s.verdict, score=s.score,
                       raw_score=round(s.score * 8, 4), threshold=THRESHOLD, model_id=RUNNING,
                       reasons=["sample"] if s.verdict == "ok" else ["reject"])
             for s, data in zip(specs, payloads, strict=True)]  # the daemon knows each file's sha256 (its name)
    out.first = time.time()
    try:
        _timed(out.drift, lambda: client.report_camera(task.camera, model_id=RUNNING, drift_state="ok"))
    except TrainerError as exc:
        out.errors.append(f"{task.appliance_id} report_camera: {exc}")
    for spec, meta, data in zip(specs, metas, payloads, strict=True):
        try:
            upload(client, meta, data, out)
            if spec.label:
                _timed(out.labels, lambda s=spec: client.add_labels([Label(
                    id=f"{s.inspection_id}-label", camera_id=task.camera, inspection_id=s.inspection_id,
                    label=s.label, who="operator", at=s.captured_at + 5)]))
                out.labelled += 1
            if spec.index == task.drift_at:
                out.drift_jobs += raise_drift(client, task, spec, out)
        except TrainerError as exc:
            out.errors.append(f"{task.appliance_id} {spec.inspection_id}: {type(exc).__name__}: {exc}")
    out.last = time.time()
    return out


def upload(client: TrainerClient, meta: FrameMeta, data: bytes, out: Outcome) -> None:
    """Plan, PUT to the presigned URL (or through the API), finish: the uploader's ``_upload``, each step timed."""
    t0 = time.perf_counter()
    plan = _timed(out.plan, lambda: client.upload_plan(meta))
    if plan.status == "known":
        out.known += 1
    elif plan.url:
        _timed(out.put, lambda: client.put_presigned(plan.url, data))
        _timed(out.finish, lambda: client.finish_upload(meta))
    else:
        _timed(out.finish, lambda: client.finish_upload(meta, data))
    out.total.append(time.perf_counter() - t0)
    out.frames += 1
    out.bytes += len(data)


def raise_drift(client: TrainerClient, task: Task, spec: FrameSpec, out: Outcome) -> int:
    """The camera reports drift and sends ``drift_raised`` (a job awaiting approval); returns the jobs created."""
    at = spec.captured_at + 1
    _timed(out.drift, lambda: client.report_camera(task.camera, model_id=RUNNING, drift_state="drift", drift_at=at))
    received = _timed(out.drift, lambda: client.add_drift_events([DriftEvent(
        id=f"{task.appliance_id}-{task.camera}-drift-1", camera_id=task.camera, kind="drift_raised", at=at,
        stats={"ks_p": 0.0004, "mmd": 0.031, "window": 50})]))
    return len(received.jobs)


def client_group(url: str, tasks: list[Task], now: float, start_at: float) -> Outcome:
    """A client process: one thread per appliance task, all starting at ``start_at`` (wall clock)."""
    found = sources()
    images = [path.read_bytes() for path, _ in found]
    verdicts = [verdict for _, verdict in found]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(max(0.0, start_at - time.time()))
    total = Outcome()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(tasks))) as pool:
        for outcome in pool.map(lambda t: run_appliance(url, t, images, verdicts, now), tasks):
            total.merge(outcome)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    total.cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return total


def _pid(pause_s: float) -> int:
    time.sleep(pause_s)
    return os.getpid()


def run_clients(url: str, tasks: list[Task], procs: int, now: float,
                on_start: Callable[[], Any] | None = None) -> Outcome:
    """The tasks spread over ``procs`` spawned client processes (threads within each); their merged outcome.

    The clock starts (and ``on_start`` is called) once every process is up and imported, so their start-up is
    not counted.
    Leaving the pool terminates its processes, so an error or Ctrl-C here leaves no client behind.
    """
    groups = [tasks[i::procs] for i in range(procs) if tasks[i::procs]]
    with multiprocessing.get_context("spawn").Pool(len(groups)) as pool:
        deadline = time.monotonic() + 120
        while len(set(pool.map(_pid, [0.2] * len(groups), chunksize=1))) < len(groups):
            if time.monotonic() > deadline:
                raise RuntimeError("the client processes did not start in 120 s")
        start_at = time.time() + 0.5
        if on_start is not None:
            on_start()
        total = Outcome()
        for outcome in pool.starmap(client_group, [(url, g, now, start_at) for g in groups], chunksize=1):
            total.merge(outcome)
    return total


def upload_figures(out: Outcome, cpu: dict[str, float]) -> dict[str, Any]:
    wall = max(out.last - out.first, 1e-9)
    return {"frames": out.frames, "known": out.known, "labels": out.labelled, "drift_jobs_created": out.drift_jobs,
            "mb": round(out.bytes / 1e6, 1), "wall_s": round(wall, 1), "frames_per_s": round(out.frames / wall, 1),
            "mb_per_s": round(out.bytes / 1e6 / wall, 2), "latency_ms": stats_ms(out.total),
            "steps_ms": {"plan": stats_ms(out.plan), "presigned_put": stats_ms(out.put),
                         "finish": stats_ms(out.finish), "label": stats_ms(out.labels),
                         "report_camera_and_drift_event": stats_ms(out.drift)},
            "errors": len(out.errors), "error_samples": out.errors[:20], "cpu_s": cpu,
            "cpu_ms_per_frame": {k: round(v * 1000 / max(out.frames, 1), 1) for k, v in cpu.items() if k != "wall_s"},
            "cores_busy": {k: round(v / cpu["wall_s"], 2) for k, v in cpu.items() if k != "wall_s"}}


# ================================================================================== catalogue queries
def routes(appliances: list[tuple[str, str]]) -> list[tuple[str, str, str | None]]:
    """(name, path, appliance token or None for the admin's) of the routes the page's people and appliances call."""
    one, token = appliances[0]
    return [("admin appliances", f"{API}/admin/appliances", None),
            ("admin cameras", f"{API}/admin/cameras", None),
            ("admin cameras of one appliance", f"{API}/admin/cameras?appliance={one}", None),
            ("admin jobs (200 newest)", f"{API}/admin/jobs", None),
            ("admin jobs awaiting approval", f"{API}/admin/jobs?status=awaiting_approval", None),
            ("admin datasets", f"{API}/admin/datasets", None),
            ("admin models", f"{API}/admin/models", None),
            ("admin evaluations", f"{API}/admin/evaluations", None),
            ("appliance GET /api/v1/models", f"{API}/models", token),
            ("page /", "/", None),
            ("healthz", "/healthz", None)]


def time_routes(admin: Admin, appliances: list[tuple[str, str]], repeats: int) -> dict[str, Any]:
    """Each route ``repeats`` times in turn, one at a time: p50/p95 and the answer's size."""
    found: dict[str, Any] = {}
    for name, path, token in routes(appliances):
        times, size = [], 0
        for _ in range(repeats):
            answer, took = admin.call("GET", path, token=token)
            times.append(took)
            size = len(answer.content)
        found[name] = {**stats_ms(times), "bytes": size}
    return found


class QueryLoad(threading.Thread):
    """The routes called in turn, with a pause, while something else runs: latencies under load."""

    def __init__(self, admin: Admin, appliances: list[tuple[str, str]], pause_s: float = 0.25) -> None:
        super().__init__(name="query-load", daemon=True)
        self.admin, self.appliances, self.pause_s = admin, appliances, pause_s
        self.stop = threading.Event()
        self.times: dict[str, list[float]] = {}
        self.errors: list[str] = []

    def run(self) -> None:
        """Call the routes in turn until stopped."""
        while not self.stop.is_set():
            for name, path, token in routes(self.appliances):
                if self.stop.is_set():
                    return
                try:
                    _, took = self.admin.call("GET", path, token=token)
                    self.times.setdefault(name, []).append(took)
                except (httpx.HTTPError, RuntimeError) as exc:
                    self.errors.append(f"{name}: {exc}")
                self.stop.wait(self.pause_s)

    def figures(self) -> dict[str, Any]:
        """Stop, and the latencies per route."""
        self.stop.set()
        self.join(60)
        return {"routes": {name: stats_ms(times) for name, times in self.times.items()}, "errors": self.errors}


def rule(now: float) -> DatasetRule:
    """The rule a rebuild draws by with the default camera settings (30 days back, eval_share 0.2)."""
    return DatasetRule(since=now - 30 * DAY_S, until=now)


def time_draws(storage: Any, cameras: list[str], repeats: int) -> tuple[dict[str, Any], dict[str, dict]]:
    """``datasets.draw`` for every camera (reads only), ``create_version`` for one: times and the drawn counts."""
    now, times, counts = time.time(), [], {}
    for appliance_id in cameras:
        t0 = time.perf_counter()
        members = draw(storage.catalogue, appliance_id, CAMERA, rule(now))
        times.append(time.perf_counter() - t0)
        counts[appliance_id] = {split: sum(1 for m in members if m.split == split)
                                for split in ("train", "eval_good", "eval_defect")}
    versions = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        create_version(storage.catalogue, cameras[0], CAMERA, rule(time.time()))
        versions.append(time.perf_counter() - t0)
    frames = sum(c["train"] + c["eval_good"] + c["eval_defect"] for c in counts.values()) / max(len(counts), 1)
    return {"draw_ms": stats_ms(times), "create_version_ms": stats_ms(versions),
            "frames_per_camera": round(frames, 1)}, counts


# ================================================================================== rebuild rounds
def start_workers(config: Path, count: int, folder: Path, tag: str) -> list[tuple[subprocess.Popen, Path, float]]:
    """``count`` worker processes; returns once each logged that its queue worker runs (stops them if not)."""
    started = []
    try:
        for i in range(count):
            logfile = folder / f"worker-{tag}-{i}.log"
            started.append((start_process(["worker", "--config", str(config)], logfile), logfile,
                            time.perf_counter()))
        deadline = time.monotonic() + 120
        for proc, logfile, _ in started:
            while "worker with" not in logfile.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {logfile.name} not ready:\n{logfile.read_text()[-3000:]}")
                time.sleep(0.1)
    except BaseException:
        for proc, _, _ in started:
            stop_process(proc)
        raise
    return started


def wait_jobs(storage: Any, job_ids: list[int], timeout_s: float) -> list[Any]:
    """The jobs once all ended (one catalogue query every half second)."""
    deadline, wanted = time.monotonic() + timeout_s, set(job_ids)
    while True:
        found = {j.id: j for j in storage.catalogue.jobs(limit=10_000) if j.id in wanted}
        jobs = [found[i] for i in job_ids]
        if all(j.status in ENDED for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs not ended after {timeout_s:.0f} s: {[(j.id, j.status) for j in jobs]}")
        time.sleep(0.5)


def stage_seconds(storage: Any, jobs: list[Any]) -> dict[str, float]:
    """Mean seconds per rebuild stage (dataset, export, fit, pack_and_store, evaluate) from the gate's records.

    A model id is its bundle's content hash, so a rebuild from the same dataset version makes the same id again:
    of a model's evaluations, the one made while this job ran is this job's.
    """
    found: dict[str, list[float]] = {}
    for job in jobs:
        for evaluation in storage.catalogue.evaluations(job.model_id) if job.model_id else []:
            if not job.started_at <= evaluation.created_at <= job.finished_at:
                continue
            for stage, seconds in evaluation.metrics.get("seconds", {}).items():
                found.setdefault(stage, []).append(seconds)
    return {stage: round(float(np.mean(values)), 2) for stage, values in found.items()}


def request_jobs(admin: Admin, cameras: list[str]) -> list[int]:
    """A rebuild of each camera requested through the admin API; the job ids."""
    return [admin.call("POST", f"{API}/admin/appliances/{a}/cameras/{CAMERA}/rebuild")[0].json()["id"]
            for a in cameras]


def cancel_drift_jobs(admin: Admin, cameras: list[str]) -> list[float]:
    """Cancel the cameras' drift jobs that await approval (a camera has one open job at most); each call's time.

    Every round then runs requested rebuilds, drawn by the same rule from (nearly) the same frames.
    (An approved drift job draws differently: frames after the drift count as the new normal.)
    """
    waiting, _ = admin.call("GET", f"{API}/admin/jobs", params={"status": "awaiting_approval", "limit": 10_000})
    chosen = set(cameras)
    return [admin.call("POST", f"{API}/admin/jobs/{j['id']}/cancel")[1] for j in waiting.json()
            if j["appliance_id"] in chosen and j["camera_id"] == CAMERA]


def rebuild_round(ctx: Bench, workers: int, tag: str, burst: Callable[[], Any] | None = None) -> dict[str, Any]:
    """K jobs run by ``workers`` worker processes: makespan, jobs/hour, per-job times, statuses, peak RSS."""
    if ctx.rounds:
        freshen(ctx)
    ctx.rounds += 1
    meter = CpuMeter(ctx.pids)
    meter.start()  # before the workers start: their CPU time (from wait4) includes their start-up
    burst_figures = None
    procs = start_workers(ctx.config, workers, ctx.logs, tag)
    try:
        t0 = time.time()
        job_ids = request_jobs(ctx.admin, ctx.rebuild_cameras)
        log(f"  {len(job_ids)} rebuilds requested, {workers} worker(s) waiting for them")
        if burst is not None:
            burst_figures = burst()
        jobs = wait_jobs(ctx.storage, job_ids, timeout_s=3600)
        makespan = max(j.finished_at for j in jobs) - t0
    finally:
        usages = [(stop_process(proc), logfile, started) for proc, logfile, started in procs]
    workers_cpu = sum(u.ru_utime + u.ru_stime for u, _, _ in usages if u is not None)
    cpu = meter.stop(workers=workers_cpu)
    statuses: dict[str, int] = {}
    for j in jobs:
        statuses[j.status] = statuses.get(j.status, 0) + 1
    run = [j.finished_at - j.started_at for j in jobs if j.started_at]
    stages = stage_seconds(ctx.storage, jobs)
    row = {"workers": workers, "jobs": len(jobs),
           "makespan_s": round(makespan, 1), "jobs_per_hour": round(len(jobs) / makespan * 3600, 1),
           "jobs_per_hour_per_worker": round(len(jobs) / makespan * 3600 / workers, 1),
           "job_s": {"p50": round(float(np.median(run)), 1), "min": round(min(run), 1), "max": round(max(run), 1)},
           "statuses": statuses, "stages_s_mean": stages,
           "workers_cpu_s_per_job": round(workers_cpu / len(jobs), 1),
           "workers_peak_rss_mb": [round(u.ru_maxrss / 1024, 1) for u, _, _ in usages if u is not None],
           "worker_exit_codes": [p.returncode for p, _, _ in procs], "cpu_s": cpu,
           "jobs_detail": [{"id": j.id, "camera": f"{j.appliance_id}/{j.camera_id}", "status": j.status,
                            "s": round(j.finished_at - j.started_at, 1) if j.started_at else None,
                            "dataset_id": j.dataset_id, "model_id": j.model_id, "detail": j.detail} for j in jobs]}
    if burst_figures is not None:
        row["burst"] = burst_figures
    return row


# ================================================================================== the run
@dataclass
class Bench:
    """What the phases share: the trainer's URL and config, the admin client, the storage, the processes' pids."""

    args: argparse.Namespace
    url: str
    config: Path
    logs: Path
    admin: Admin
    storage: Any
    appliances: list[tuple[str, str]]
    pids: dict[str, int]
    now: float
    rebuild_cameras: list[str] = field(default_factory=list)
    frames_held: int = 0  # frames each rebuild camera holds (its next frame's index)
    rounds: int = 0


#: Frames added to each rebuild camera before every round but the first: a new dataset version, so the round
#: fits and judges a new bundle (the same frames would give the same bundle, whose verdict the trainer keeps).
FRESH_FRAMES = 3


def freshen(ctx: Bench) -> None:
    """Upload ``FRESH_FRAMES`` more frames to every rebuild camera (not timed)."""
    ids = {a: i for i, (a, _) in enumerate(ctx.appliances)}
    start = ctx.frames_held
    out = run_clients(ctx.url, tasks_for(ctx, CAMERA, start, start + FRESH_FRAMES, drift=False,
                                         only=[ids[a] for a in ctx.rebuild_cameras]), ctx.args.client_procs, ctx.now)
    if out.errors:
        log(f"  errors adding frames before the round: {out.errors[:5]}")
    ctx.frames_held = start + FRESH_FRAMES


def tasks_for(ctx: Bench, camera: str, start: int, stop: int, drift: bool,
              only: list[int] | None = None) -> list[Task]:
    indices = range(len(ctx.appliances)) if only is None else only
    return [Task(i, ctx.appliances[i][0], ctx.appliances[i][1], camera, start, stop,
                 drift_at=int(stop * 0.75) if drift else None) for i in indices]


def phase_uploads(ctx: Bench) -> dict[str, Any]:
    args = ctx.args
    log(f"phase 1: {len(ctx.appliances)} appliances x {args.frames} frames, {args.client_procs} client process(es)")
    load = QueryLoad(Admin(ctx.url, ctx.args.admin_token), ctx.appliances)
    meter = CpuMeter(ctx.pids)
    out = run_clients(ctx.url, tasks_for(ctx, CAMERA, 0, args.frames, drift=True), args.client_procs, ctx.now,
                      on_start=lambda: (meter.start(), load.start()))
    under_load = load.figures()
    load.admin.close()
    figures = upload_figures(out, meter.stop(clients=out.cpu_s))
    figures["queries_under_load"] = under_load
    log(f"  {figures['frames']} frames in {figures['wall_s']} s: {figures['frames_per_s']} frames/s, "
        f"{figures['mb_per_s']} MB/s, p50/p95/p99 {figures['latency_ms'].get('p50')}/"
        f"{figures['latency_ms'].get('p95')}/{figures['latency_ms'].get('p99')} ms, {figures['errors']} errors")
    return figures


def choose_rebuild_cameras(ctx: Bench) -> tuple[list[str], dict[str, Any] | None]:
    """The first K appliances whose camera, with ``--rebuild-frames`` frames, holds enough for the gate.

    A camera with fewer frames than that is topped up first (timed apart from phase 1).
    """
    args, verdicts = ctx.args, [v for _, v in sources()]
    need = max(args.frames, args.rebuild_frames)
    chosen = []
    for i in range(len(ctx.appliances)):
        specs = plan_frames(i, CAMERA, 0, need, ctx.now, verdicts)
        if predicted_eval_good(specs) >= 12 and any(s.label == "defect" for s in specs):
            chosen.append(i)
        if len(chosen) == args.jobs:
            break
    topped = None
    if need > args.frames:
        log(f"  topping up {len(chosen)} rebuild cameras from {args.frames} to {need} frames")
        out = run_clients(ctx.url, tasks_for(ctx, CAMERA, args.frames, need, drift=False, only=chosen),
                          args.client_procs, ctx.now)
        topped = {"frames": out.frames, "errors": len(out.errors), "error_samples": out.errors[:10],
                  "wall_s": round(out.last - out.first, 1)}
        if out.errors:
            log(f"  top-up errors: {out.errors[:5]}")
    return [ctx.appliances[i][0] for i in chosen], topped


def phase_queries(ctx: Bench, when: str) -> dict[str, Any]:
    log(f"catalogue queries ({when})")
    found = {"routes": time_routes(ctx.admin, ctx.appliances, ctx.args.repeats)}
    draws, counts = time_draws(ctx.storage, [a for a, _ in ctx.appliances], ctx.args.repeats)
    found["dataset_draw"] = draws
    found["frames_in_catalogue"] = ctx.storage.catalogue.frame_count()
    return found | {"_counts": counts}


def burst(ctx: Bench, start: int) -> Callable[[], dict[str, Any]]:
    """An upload burst of ``--burst`` frames per appliance to its second camera (kept out of the rebuilds' data)."""
    def run() -> dict[str, Any]:
        meter = CpuMeter(ctx.pids)
        out = run_clients(ctx.url, tasks_for(ctx, BURST_CAMERA, start, start + ctx.args.burst, drift=False),
                          ctx.args.client_procs, ctx.now, on_start=meter.start)
        figures = upload_figures(out, meter.stop(clients=out.cpu_s))
        figures["window"] = [out.first, out.last]
        return figures
    return run


def phase_rebuilds(ctx: Bench) -> dict[str, Any]:
    log(f"phase 3: {len(ctx.rebuild_cameras)} rebuilds with 1 worker, then with 2")
    one = rebuild_round(ctx, 1, "one")
    log(f"  1 worker: {one['makespan_s']} s, {one['jobs_per_hour']} jobs/h, {one['statuses']}")
    two = rebuild_round(ctx, 2, "two")
    log(f"  2 workers: {two['makespan_s']} s, {two['jobs_per_hour']} jobs/h, {two['statuses']}")
    pairs = list(zip(one["jobs_detail"], two["jobs_detail"], strict=True))
    same_models = sum(1 for a, b in pairs if a["model_id"] and a["model_id"] == b["model_id"])
    return {"one_worker": one, "two_workers": two,
            "new_dataset_versions": all(a["dataset_id"] != b["dataset_id"] for a, b in pairs),
            "same_model_ids": same_models,
            "ratio_two_to_one": round(two["jobs_per_hour"] / one["jobs_per_hour"], 2)}


def phase_contention(ctx: Bench) -> dict[str, Any]:
    """The same burst with the workers idle, then while two workers rebuild the K cameras again."""
    log(f"phase 4: upload bursts of {ctx.args.burst} frames per appliance, workers idle then busy")
    idle = burst(ctx, 0)()
    busy_round = rebuild_round(ctx, 2, "busy", burst=burst(ctx, ctx.args.burst))
    busy = busy_round.pop("burst")
    jobs = busy_round["jobs_detail"]
    started = [ctx.storage.catalogue.job(j["id"]) for j in jobs]
    window = (min(j.started_at for j in started if j.started_at), max(j.finished_at for j in started))
    overlap = max(0.0, min(busy["window"][1], window[1]) - max(busy["window"][0], window[0]))
    busy["share_of_burst_with_jobs_running"] = round(overlap / max(busy["window"][1] - busy["window"][0], 1e-9), 2)
    log(f"  idle {idle['frames_per_s']} frames/s, busy {busy['frames_per_s']} frames/s "
        f"({busy['share_of_burst_with_jobs_running']:.0%} of the burst with jobs running)")
    return {"idle": idle, "busy": busy, "rebuild_round": busy_round}


def run(args: argparse.Namespace, work: Path, result: dict[str, Any]) -> None:
    """Start everything, run the phases into ``result``; every process started is stopped on the way out."""
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        pg, weed = stack.enter_context(fleet_servers())
        args.admin_token = secrets.token_urlsafe(32)
        config = write_config(work, pg, weed, args.admin_token)
        cfg = load_trainer_config(config)
        url = f"http://127.0.0.1:{cfg.port}"
        logs = work / "logs"
        logs.mkdir()
        trainer = start_process(["serve", "--config", str(config), "--workers", "0"], logs / "trainer.log")
        stack.callback(lambda: log(f"trainer stopped (exit {trainer.returncode})"))
        stack.callback(stop_process, trainer)
        wait_healthy(url, trainer, logs / "trainer.log")
        result["startup_s"] = round(time.perf_counter() - t0, 1)
        admin = Admin(url, args.admin_token)
        stack.callback(admin.close)
        storage = stack.enter_context(open_storage(cfg))
        appliances, reg_times = register(admin, args.appliances)
        result["register"] = {"appliances": len(appliances), "ms": stats_ms(reg_times)}
        postmaster = int((pg.folder / "data" / "postmaster.pid").read_text().split()[0])
        ctx = Bench(args, url, config, logs, admin, storage, appliances,
                    {"trainer": trainer.pid, "postgresql": postmaster, "seaweedfs": weed.process.pid}, time.time())
        result["uploads"] = phase_uploads(ctx)
        queries = phase_queries(ctx, "idle, after the uploads")
        result["queries_after_uploads"] = {k: v for k, v in queries.items() if k != "_counts"}
        ctx.rebuild_cameras, result["top_up"] = choose_rebuild_cameras(ctx)
        ctx.frames_held = max(args.frames, args.rebuild_frames)
        result["drift_jobs_cancelled_ms"] = stats_ms(cancel_drift_jobs(admin, ctx.rebuild_cameras))
        _, counts = time_draws(ctx.storage, ctx.rebuild_cameras, 1)
        result["rebuild_cameras"] = counts
        result["rebuilds"] = phase_rebuilds(ctx)
        if args.contention:
            result["contention_phase"] = phase_contention(ctx)
        final = phase_queries(ctx, "at the end, with datasets, models and evaluations")
        result["queries_at_end"] = {k: v for k, v in final.items() if k != "_counts"}
        result["trainer_log"] = log_problems(logs / "trainer.log")
        result["worker_logs"] = {p.name: log_problems(p) for p in sorted(logs.glob("worker-*.log"))}
        result["total_s"] = round(time.perf_counter() - t0, 1)
        shutil.copytree(logs, args.out / "logs", dirs_exist_ok=True)


def log_problems(path: Path) -> dict[str, int]:
    """WARNING and ERROR lines of a log, counted by message (time stamps and numbers left out)."""
    counts: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        if " WARNING " in line or " ERROR " in line:
            message = re.sub(r"\d+", "N", line.split(" ", 2)[2])[:200]
            counts[message] = counts.get(message, 0) + 1
    return counts


# ================================================================================== report
def summary(r: dict[str, Any]) -> str:
    m, u = r["machine"], r["uploads"]
    lines = [f"machine: {one_line(m)}", f"load average at start: {r['loadavg_start']}",
             f"NOTE: clients, trainer, PostgreSQL, SeaweedFS and workers all share these {m['cores']} cores: every "
             "figure is the whole loopback system's.",
             f"start-up (PostgreSQL, SeaweedFS, trainer): {r['startup_s']} s; register {r['register']['appliances']} "
             f"appliances: p50 {r['register']['ms']['p50']} ms", "",
             f"UPLOADS  {r['appliances']} appliances x {r['frames']} frames ({r['client_procs']} client processes, "
             "closed loop, presigned PUT to S3)",
             f"  {u['frames']} frames, {u['mb']} MB in {u['wall_s']} s: {u['frames_per_s']} frames/s, "
             f"{u['mb_per_s']} MB/s; {u['labels']} labels, {u['drift_jobs_created']} drift jobs; errors {u['errors']}",
             f"  per upload (plan+PUT+finish) ms: {_pcts(u['latency_ms'])}"]
    lines += [f"    {step:<30} {_pcts(s)}" for step, s in u["steps_ms"].items()]
    lines.append(f"  CPU ms per frame: {u['cpu_ms_per_frame']}")
    lines.append(f"  cores busy (of {m['cores']}): {u['cores_busy']}  ('others': work on this machine that is not "
                 "the bench's)")
    for title, key in (("QUERIES during the uploads", None), ("QUERIES idle, catalogue full", "queries_after_uploads"),
                       ("QUERIES at the end (datasets, models, evaluations present)", "queries_at_end")):
        q = u["queries_under_load"]["routes"] if key is None else r[key]["routes"]
        lines.append(f"\n{title}" + ("" if key is None else f" ({r[key]['frames_in_catalogue']} frames)"))
        lines += [f"  {name:<32} {_pcts(s)}" + (f"  {s['bytes']} B" if "bytes" in s else "") for name, s in q.items()]
        if key is not None:
            d = r[key]["dataset_draw"]
            lines.append(f"  dataset draw, one camera ({d['frames_per_camera']} frames): {_pcts(d['draw_ms'])}; "
                         f"create_version {_pcts(d['create_version_ms'])}")
    b = r["rebuilds"]
    lines.append(f"\nREBUILDS  padim at size 128, {len(r['rebuild_cameras'])} cameras: "
                 f"{ {a: c for a, c in list(r['rebuild_cameras'].items())[:3]} } ...")
    for key in ("one_worker", "two_workers"):
        x = b[key]
        lines.append(f"  {x['workers']} worker(s): {x['jobs']} requested rebuilds in {x['makespan_s']} s: "
                     f"{x['jobs_per_hour']} jobs/h, {x['jobs_per_hour_per_worker']} per worker; job s p50 "
                     f"{x['job_s']['p50']} (min {x['job_s']['min']}, max {x['job_s']['max']}); {x['statuses']}; "
                     f"peak RSS MB {x['workers_peak_rss_mb']}")
        cpu = x["cpu_s"]
        lines.append(f"      stages s (mean): {x['stages_s_mean']}; worker CPU s per job {x['workers_cpu_s_per_job']}; "
                     f"cores busy: workers {cpu['workers'] / cpu['wall_s']:.2f}, others "
                     f"{cpu['others'] / cpu['wall_s']:.2f}, machine {cpu['machine'] / cpu['wall_s']:.2f}")
    lines.append(f"  ratio two workers / one (jobs/h): {b['ratio_two_to_one']}; a new dataset version per camera "
                 f"in round two ({FRESH_FRAMES} frames more): {b['new_dataset_versions']}; the same model id again: "
                 f"{b['same_model_ids']} of {len(b['two_workers']['jobs_detail'])} (should be 0)")
    reasons = sorted({(j["detail"] or "")[:160] for x in (b["one_worker"], b["two_workers"])
                      for j in x["jobs_detail"] if j["status"] != "succeeded"})
    lines += [f"    not published: {reason}" for reason in reasons[:6]]
    if "contention_phase" in r:
        c = r["contention_phase"]
        lines.append(f"\nCONTENTION  burst {r['burst']} frames x {r['appliances']} appliances: idle "
                     f"{c['idle']['frames_per_s']} frames/s (p95 {c['idle']['latency_ms'].get('p95')} ms), during 2 "
                     f"workers' rebuilds {c['busy']['frames_per_s']} frames/s (p95 {c['busy']['latency_ms'].get('p95')}"
                     f" ms; {c['busy']['share_of_burst_with_jobs_running']:.0%} of the burst with jobs running); that "
                     f"round: {c['rebuild_round']['makespan_s']} s, {c['rebuild_round']['jobs_per_hour']} jobs/h")
    lines.append("\nWARNING/ERROR lines in the trainer's log (count, message):")
    lines += [f"  {n:>6}  {message}" for message, n in r["trainer_log"].items()] or ["  none"]
    for name, found in r["worker_logs"].items():
        lines += [f"  {name}: {n:>4}  {message}" for message, n in found.items()]
    lines.append(f"\ntotal {r['total_s']} s")
    return "\n".join(lines)


def _pcts(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "-"
    return f"p50 {s['p50']:>7.1f}  p95 {s['p95']:>7.1f}  p99 {s['p99']:>7.1f}  max {s['max']:>7.1f}  (n {s['n']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fleet")
    parser.add_argument("--appliances", type=int, default=50, help="simulated appliances (at least 50)")
    parser.add_argument("--frames", type=int, default=None, help="frames per appliance in phase 1 (default 80)")
    parser.add_argument("--jobs", type=int, default=None, help="rebuild jobs (cameras) per round (default 16)")
    parser.add_argument("--rebuild-frames", type=int, default=80, help="frames a rebuilt camera holds at least")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes the appliance threads share")
    parser.add_argument("--repeats", type=int, default=None, help="calls per route when timing queries (default 20)")
    parser.add_argument("--burst", type=int, default=10, help="frames per appliance in each contention burst")
    parser.add_argument("--contention", action=argparse.BooleanOptionalAction, default=None,
                        help="phase 4 (default: on, off with --quick)")
    parser.add_argument("--quick", action="store_true", help="50 appliances x 12 frames, 2 jobs, a few minutes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (configs, logs)")
    args = parser.parse_args()
    if args.appliances < 50:
        parser.error("--appliances: at least 50 (the issue asks for a fleet of 50 or more)")
    args.frames = args.frames or (12 if args.quick else 80)
    args.jobs = args.jobs or (2 if args.quick else 16)
    args.repeats = args.repeats or (5 if args.quick else 20)
    args.contention = (not args.quick) if args.contention is None else args.contention
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the same orderly stop as Ctrl-C
    result: dict[str, Any] = {"machine": describe(), "loadavg_start": os.getloadavg(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              **{k: v for k, v in vars(args).items() if k not in ("out", "admin_token")}}
    log(f"machine: {one_line(result['machine'])}; load average {result['loadavg_start']}")
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    try:
        run(args, work, result)
    except KeyboardInterrupt:
        log("interrupted: every process the bench started has been stopped")
        sys.exit(130)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    (args.out / "fleet.json").write_text(json.dumps(result, indent=1, default=_json_default))
    print(summary(result))
    print(f"\nwritten: {args.out / 'fleet.json'}")


def _json_default(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else str(value)


if __name__ == "__main__":
    main()
