"""The daemon: builds the parts from the config, runs them, and stops them in order.

One asyncio loop in the main thread serves the network sides (control socket, HTTP, Modbus,
OPC UA), feeds the watchdog, watches free space and reacts to signals: SIGTERM/SIGINT stop in
order, SIGHUP reloads the config (a bad new config is refused, audited, and the old one keeps
running). Each camera's pipeline runs on its own threads and hands its results to the
``ResultFlow`` (audit first, then the outputs). Commands from every way in go through one
``Dispatcher``; every reader of the daemon's state reads one ``Status``.

Stopping is bounded by ``runtime.stop_timeout_s``: capture stops, queued frames are inspected
until a share of the budget is spent (the rest are recorded as not inspected), the audit log
is flushed, outputs drain until their share is spent (the rest are recorded as dropped),
engines are closed, and the audit log closes last with a ``stop`` event that counts what was
given up. Every thread is joined or named as abandoned; none is left running in native code
when the interpreter exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..bundle import load_bundle, load_drift_baseline
from ..engine import Engine
from ..errors import ApplianceError, ConfigError
from .audit import Recorder
from .commands import (
    BundleCommand,
    CommandError,
    Dispatcher,
    DriftCommand,
    EnableCommand,
    LabelCommand,
    ReloadCommand,
    StallCommand,
    StatusCommand,
    ThresholdCommand,
    TriggerCommand,
    UnlabelCommand,
)
from .config import Camera, DaemonConfig, load_config
from .control import ControlServer
from .disk import DiskGuard, Volume
from .drift_watch import DriftLog, DriftWatch
from .health import stall_reasons
from .labels import LabelBook, delta_folder, delta_store, reconcile
from .latest import LatestImages
from .metrics import Metrics
from .operator_thresholds import ThresholdStore
from .outputs import Outputs
from .pipeline import CameraPipeline
from .publishers import PUBLISHERS, OutputContext, create_publisher
from .publishers.frames import FramesPublisher
from .publishers.overlay import OverlayPublisher
from .reload import plan_reload
from .results import ResultFlow
from .status import Alarm, CameraStatus, DaemonInfo, Status
from .supervisor import Watchdog, notify
from .thresholds import load_timezone

log = logging.getLogger(__name__)
STATUS_EVERY_S = 5.0
#: Shares of the stop budget: inspecting what is queued, then the outputs draining (the rest: closing).
_DRAIN_SHARE, _OUTPUT_SHARE = 0.4, 0.35


class Daemon:
    """``appliance run``: everything the appliance does, until it is told to stop."""

    def __init__(self, config: DaemonConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.started_at = time.time()
        self.run_id = f"{int(self.started_at):x}-{os.urandom(3).hex()}"
        self.tz = load_timezone(config.timezone)
        self.pipelines: dict[str, CameraPipeline] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.recorder: Recorder | None = None
        self.outputs: Outputs | None = None
        self.flow: ResultFlow | None = None
        self.control: ControlServer | None = None
        self.thresholds: ThresholdStore | None = None
        self.labels: LabelBook | None = None
        self.disk: DiskGuard | None = None
        self.metrics = Metrics(self.status)
        self.drift = DriftWatch(config.drift, lambda *window: self.drift_log.window(*window))
        self.drift_log: DriftLog | None = None
        self._drift_tests: set[str] = set()  # cameras whose window is being tested
        self.watchdog = Watchdog(self.health)
        self.dispatcher = Dispatcher({
            StatusCommand: lambda c: self.status().to_json(),
            ReloadCommand: lambda c: self.reload(),
            ThresholdCommand: lambda c: self.thresholds.set(c.camera, c.value, c.shift, c.who),
            TriggerCommand: lambda c: {"accepted": self.trigger(c.camera, c.id)},
            EnableCommand: lambda c: self.set_enabled(c.camera, c.enabled, c.who),
            BundleCommand: lambda c: self.select_bundle(c.camera, c.slot, c.who),
            LabelCommand: lambda c: self._off_loop(self.labels.label, c),
            UnlabelCommand: lambda c: self._off_loop(self.labels.unlabel, c),
            DriftCommand: lambda c: self._off_loop(self._drift_report, c),
            **({StallCommand: self._stall} if os.environ.get("APPLIANCE_FAULT_INJECTION") == "1" else {}),
        })
        self._stopping: asyncio.Event | None = None
        self._is_stopping = False
        self._camera_states: dict[str, str] = {}
        self._alarms: dict[str, Alarm] = {}
        self.abandoned: list[str] = []  # threads a stop left running (the process exits without waiting)

    # ------------------------------------------------------------ start-up
    def prepare(self) -> None:
        """Folders, the audit log, the outputs and every camera's engine; nothing inspects yet."""
        cfg = self.config
        for folder in (cfg.paths.state, cfg.paths.cache):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"paths: cannot create {folder}: {exc.strerror or exc}") from None
        self.recorder = Recorder.from_config(cfg.audit, cfg.paths.state, run_id=self.run_id,
                                             artifacts={"overlay": "overlay_path", "frames": "frame"},
                                             spill_dirs=[cfg.paths.cache, cfg.control.socket.parent])
        durable = [o.type for o in cfg.outputs if PUBLISHERS[o.type].durable]
        self.recorder.start(durable=durable)
        self.recorder.event("start", detail=f"appliance {__version__}",
                            data={"version": __version__, "config": str(self.config_path), "pid": os.getpid(),
                                  "run_id": self.run_id})
        self.disk = DiskGuard(cfg.disk, self._disk_folders(), self._disk_changed)
        self.thresholds = ThresholdStore(cfg, self.tz, self.recorder.event)
        context = OutputContext(state_dir=cfg.paths.state, status=self.status, registry=self.metrics.registry,
                                loop=self.loop, trigger=self.trigger, control=self.dispatcher.dispatch,
                                outbox=self.recorder, disk=self.disk, latest=LatestImages())
        self.outputs = Outputs([create_publisher(o, context) for o in cfg.outputs], self._delivered)
        context.extra["frames"] = self.outputs.get("frames")  # the uploader sends what the frame store keeps
        self.flow = ResultFlow(self.recorder, self.outputs, [self.metrics.observe, self.drift.observe])
        frames = self.outputs.get("frames")
        self.drift_log = DriftLog(self.drift, self.recorder, frames if isinstance(frames, FramesPublisher) else None,
                                  cfg.drift)
        self.labels = LabelBook(self.recorder, frames if isinstance(frames, FramesPublisher) else None,
                                self._running, self.thresholds, cfg.paths.state, cfg.learning, self.tz,
                                lambda cam: self.config.camera(cam))
        for camera in cfg.cameras:
            self._camera_overlay(camera)
        engines = {c.id: self._load_engine(c) for c in cfg.cameras if c.enabled}
        self.outputs.start()
        if self.labels.frames is not None:  # labelled frames stay in the store while their label stands
            for row in self.recorder.read("SELECT DISTINCT frame FROM labels WHERE undone_at IS NULL AND frame IS NOT "
                                          "NULL"):
                self.labels.frames.pin(row["frame"])
        self._serve_metrics()
        for camera in cfg.cameras:
            if camera.enabled:
                self.pipelines[camera.id] = self._pipeline(camera, engines[camera.id])

    def _serve_metrics(self) -> None:
        try:
            self.metrics.serve(self.config.metrics)
        except ApplianceError as exc:  # metrics are for people; inspection goes on without them
            log.error("%s", exc)
            self.recorder.event("error", detail=str(exc))

    def _load_engine(self, camera: Camera) -> Engine:
        path = self.config.state_path(camera.bundle)
        rt = self.config.runtime
        started = time.monotonic()
        log.info("camera %s: loading bundle %s (verify files, compile the backbone, golden images)", camera.id, path,
                 extra={"camera": camera.id})
        try:
            engine = load_bundle(path, threads=rt.threads, streams=rt.streams, cache_dir=self.config.paths.cache)
            learned = self._apply_learned(camera, engine)
        except ApplianceError as exc:
            raise ConfigError(f"camera {camera.id}: bundle {path}: {exc}") from None
        seconds = time.monotonic() - started
        log.info("camera %s: model %s ready in %.1f s", camera.id, engine.model_id, seconds,
                 extra={"camera": camera.id})
        if engine.backbone.cache_problem:
            self.recorder.event("cache_unusable", camera.id, engine.backbone.cache_problem)
        self.recorder.event("model_loaded", camera.id, f"{engine.model_id} from {path} in {seconds:.1f} s"
                            + (f", {learned} learned rows replayed" if learned else ""),
                            {"model_id": engine.model_id, "bundle": str(path), "seconds": round(seconds, 2),
                             "learned_rows": learned})
        return engine

    def _apply_learned(self, camera: Camera, engine: Engine) -> int:
        """Replay what operators taught this camera's model (its delta beside the bundle); rows replayed."""
        if not delta_folder(self.config.paths.state, camera.id, engine.model_id).exists():
            return 0
        active = {r["id"] for r in self.recorder.read("SELECT id FROM labels WHERE camera = ? AND undone_at IS NULL",
                                                      [camera.id])}
        rows, dropped = reconcile(engine, delta_store(self.config.paths.state, camera.id, engine), active)
        if dropped:
            self.recorder.event("delta_reconciled", camera.id, f"{len(dropped)} learned entries without a standing "
                                "label dropped from the bank delta", {"dropped": dropped, "model_id": engine.model_id})
        return rows

    def _watch_drift(self, camera: str, engine: Engine) -> None:
        """Watch the camera against its (new) model's baseline; a model without one says so in the status."""
        baseline = load_drift_baseline(engine.bundle_path, engine.manifest) if engine.bundle_path else None
        self.drift.watch(camera, baseline, engine.model_id)

    def _drift_report(self, command: DriftCommand) -> dict[str, Any]:
        cameras = [command.camera] if command.camera else list(self.pipelines)
        for cam in cameras:
            self._running(cam)
        return self.drift_log.report(cameras)

    async def _off_loop(self, fn: Any, command: Any) -> Any:
        """Run a command's handler on a worker thread: it reads files and may teach the bank (tens of ms)."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, command)

    def _pipeline(self, camera: Camera, engine: Engine) -> CameraPipeline:
        self._watch_drift(camera.id, engine)
        return CameraPipeline(camera, engine, threshold_for=self.thresholds.threshold_for, sink=self.flow,
                              on_state=self._camera_state, depth=self.config.runtime.streams)

    def _camera_overlay(self, camera: Camera) -> None:
        overlay = self.outputs.get("overlay") if self.outputs else None
        if isinstance(overlay, OverlayPublisher):
            o = camera.overlay
            overlay.set_camera_options(camera.id, enabled=o.enabled, only_ng=o.only_ng, keep=o.keep, max_mb=o.max_mb)

    def _disk_folders(self) -> list[tuple[str, Path]]:
        cfg = self.config
        folders = [("state", cfg.paths.state), ("audit", cfg.audit.resolve_path(cfg.paths.state).parent)]
        for output in cfg.outputs:
            folder = getattr(output, "dir", None)
            if folder is not None:
                folders.append((output.type, Path(folder)))
        return folders

    def _disk_changed(self, volume: Volume) -> None:
        """A file system went below the floor (alarm) or came back above it (cleared, audit retried at once)."""
        floor = self.config.disk.min_free_mb
        key = f"disk_low:{volume.path}"
        if volume.low:
            detail = f"{volume.describe()}, below the floor of {floor:g} MiB: overlay files are not written there"
            self._alarms[key] = Alarm(kind="disk_low", detail=detail, since=volume.since or time.time())
            self.recorder.event("disk_low", detail=detail, data={"path": str(volume.path), "free_mb": volume.free_mb,
                                                                 "floor_mb": floor})
        elif self._alarms.pop(key, None) is not None:
            self.recorder.event("disk_ok", detail=f"{volume.describe()}: above the floor again",
                                data={"path": str(volume.path), "free_mb": volume.free_mb})
            self.recorder.nudge()

    # ------------------------------------------------------------ the flow of one result
    def _delivered(self, inspection_id: str, output: str, status: str, detail: str | None, at: float | None) -> None:
        self.recorder.delivered(inspection_id, output, status, detail, at)

    def _camera_state(self, camera: str, state: str, detail: str) -> None:
        before = self._camera_states.get(camera)
        self._camera_states[camera] = state
        if state == "lost" and before != "lost":
            self.recorder.event("camera_lost", camera, detail)
        elif state == "running" and before == "lost":
            self.recorder.event("camera_back", camera, detail)
        elif state in ("ended", "stopped") and before != state:
            self.recorder.event(f"camera_{state}", camera, detail)

    # ------------------------------------------------------------ commands
    def threshold_for(self, camera: str, when: float) -> tuple[float, str]:
        """The threshold in force for a frame of ``camera`` captured at ``when`` and where it comes from."""
        return self.thresholds.threshold_for(camera, when)

    def trigger(self, camera: str, trigger_id: str | None = None) -> bool:
        """One frame from an externally triggered camera, carrying ``trigger_id``."""
        pipeline = self._running(camera)
        if pipeline.camera.trigger.mode != "external":
            raise CommandError(f"camera {camera!r} is free-running; set trigger.mode = \"external\" to trigger it")
        if not pipeline.enabled:
            raise CommandError(f"camera {camera!r} is disabled; enable it first ('enable' command)")
        return pipeline.trigger(trigger_id)

    def set_enabled(self, camera: str, enabled: bool, who: str = "operator") -> dict[str, Any]:
        """Turn a running camera's inspection on or off (not persisted: a restart inspects again); audited."""
        pipeline = self._running(camera)
        before = pipeline.enabled
        pipeline.set_enabled(enabled)
        if before != enabled:
            self.recorder.event("camera_enabled" if enabled else "camera_disabled", camera, f"by {who}",
                                {"enabled": enabled, "who": who})
        return {"camera": camera, "enabled": enabled}

    async def select_bundle(self, camera: str, slot: int | str, who: str = "operator") -> dict[str, Any]:
        """Hot-swap a camera to the bundle of one of its ``slots`` (frames in flight finish on the old one)."""
        pipeline = self._running(camera)
        slots = pipeline.camera.slots
        if str(slot) not in slots:
            raise CommandError(f"camera {camera!r} has no bundle slot {slot!r}; configured: {sorted(slots) or 'none'}")
        bundle = slots[str(slot)]
        cam = pipeline.camera.model_copy(update={"bundle": bundle})
        engine = await asyncio.get_running_loop().run_in_executor(None, self._load_engine, cam)
        before = pipeline.engine.model_id
        self._watch_drift(camera, engine)
        pipeline.swap_engine(engine)
        self.recorder.event("bundle_selected", camera, f"slot {slot}: {before} -> {engine.model_id} by {who}",
                            {"slot": str(slot), "bundle": str(bundle), "before": before, "after": engine.model_id,
                             "who": who})
        return {"camera": camera, "slot": str(slot), "model_id": engine.model_id}

    def _stall(self, command: StallCommand) -> dict[str, Any]:
        self._running(command.camera).stall(command.seconds)
        return {"stalled": command.camera}

    def _running(self, camera: str) -> CameraPipeline:
        """The running pipeline of ``camera``, or ``CommandError`` naming the running ones."""
        pipeline = self.pipelines.get(camera)
        if pipeline is None:
            raise CommandError(f"no running camera {camera!r}; running: {sorted(self.pipelines)}")
        return pipeline

    # ------------------------------------------------------------ status and health
    def camera_health(self, camera: str, now: float | None = None) -> list[str]:
        """Why ``camera`` counts as hung (empty: it does not)."""
        pipeline = self.pipelines[camera]
        return stall_reasons(pipeline.progress(), time.monotonic() if now is None else now,
                             self.config.watchdog.stall_s)

    def health(self) -> tuple[bool, list[str]]:
        """Healthy while every camera makes progress and the audit log's writer lives (feeds the watchdog)."""
        now = time.monotonic()
        reasons = [f"{cam}: {why}" for cam in list(self.pipelines) for why in self.camera_health(cam, now)]
        if self.recorder is not None and not self.recorder.alive():
            reasons.append("audit writer thread ended")
        return not reasons, reasons

    def status(self) -> Status:
        """The snapshot behind ``appliance status``, ``/api/status``, metrics and every PLC output."""
        now = time.monotonic()
        writer_ok = self.recorder is not None and self.recorder.alive()
        cameras, reasons = {}, []
        for cam, pipeline in list(self.pipelines.items()):
            why = self.camera_health(cam, now)
            reasons += [f"{cam}: {w}" for w in why]
            value, source = self.thresholds.threshold_for(cam, time.time())
            info = pipeline.status()
            ready = (not why and writer_ok and not self._is_stopping and info["state"] == "running"
                     and info["enabled"] and bool(info["bundle"]["model_id"]))
            cameras[cam] = CameraStatus(**info, healthy=not why, unhealthy=why, ready=ready,
                                        threshold={"value": value, "source": source}, drift=self.drift.snapshot(cam))
        if not writer_ok and self.recorder is not None:
            reasons.append("audit writer thread ended")
        outputs = self.outputs.state() if self.outputs else {}
        if self.recorder is not None:
            outputs = {"audit": self.recorder.state(), **outputs}
        daemon = DaemonInfo(version=__version__, pid=os.getpid(), run_id=self.run_id, started_at=self.started_at,
                            uptime_s=round(time.time() - self.started_at, 1), config=str(self.config_path),
                            healthy=not reasons, unhealthy=reasons, stopping=self._is_stopping,
                            alarms=list(self._alarms.values()), timezone=self.config.timezone,
                            metrics_url=self.metrics.url)
        return Status(daemon=daemon, cameras=cameras, outputs=outputs,
                      disk=self.disk.snapshot() if self.disk else {})

    def status_line(self) -> str:
        """Systemd's one-line STATUS: rate and last verdict per camera, and any alarm."""
        parts = []
        for cam, pipeline in list(self.pipelines.items()):
            snap = pipeline.stats.snapshot()
            last = snap["last"]["verdict"].upper() if snap["last"] else "-"
            parts.append(f"{cam} {snap['fps']:.1f} fps last {last} ({pipeline.capture.state})")
        parts += [f"ALARM {a.kind}" for a in self._alarms.values()]
        return "; ".join(parts) or "no cameras"

    # ------------------------------------------------------------ reload
    async def reload(self) -> dict[str, Any]:
        """Read the config file again and apply what changed; a bad file is refused and nothing changes."""
        if self.config_path is None:
            raise CommandError("the daemon was not started from a config file; nothing to reload")
        try:
            new = load_config(self.config_path)
            return await asyncio.get_running_loop().run_in_executor(None, self._apply, new)
        except ApplianceError as exc:
            self.recorder.event("config_rejected", detail=str(exc))
            log.error("reload refused, the running configuration stays: %s", exc)
            raise ConfigError(f"reload refused, the running configuration stays: {exc}") from None

    def _apply(self, new: DaemonConfig) -> dict[str, Any]:
        old = self.config
        plan = plan_reload(old, new, set(self.pipelines))
        cams = {c.id: c for c in new.cameras}
        engines = {cam: self._load_engine(cams[cam]) for cam in plan.loads}  # any failure refuses the reload
        self.config = new.model_copy(update={k: getattr(old, k) for k in plan.restart_needed})
        self.thresholds.reconfigure(self.config)
        budget = self.config.runtime.stop_timeout_s
        changes = []
        for cam in plan.stop:
            pipeline = self.pipelines.pop(cam)
            pipeline.stop(budget)
            pipeline.engine.close()
            changes.append(f"{cam}: stopped")
        for cam in plan.restart:
            old_pipeline = self.pipelines[cam]
            old_pipeline.stop(budget)
            old_pipeline.engine.close()
        for camera in new.cameras:
            self._camera_overlay(camera)
        for cam in (*plan.start, *plan.restart):
            self.pipelines[cam] = self._pipeline(cams[cam], engines[cam])
            self.pipelines[cam].start()
            changes.append(f"{cam}: started" if cam in plan.start else f"{cam}: restarted (source or trigger changed)")
        for cam in plan.swap:
            before = self.pipelines[cam].engine.model_id
            self.pipelines[cam].camera = cams[cam]
            self._watch_drift(cam, engines[cam])
            self.pipelines[cam].swap_engine(engines[cam])
            changes.append(f"{cam}: model {before} -> {engines[cam].model_id} (hot swap)")
        for cam in plan.update:
            self.pipelines[cam].camera = cams[cam]  # thresholds and overlay options take effect with the next frame
            changes.append(f"{cam}: settings updated")
        note = f"; needs a restart to apply: {', '.join(plan.restart_needed)}" if plan.restart_needed else ""
        self.recorder.event("reload", detail=("; ".join(changes) or "no changes") + note,
                            data={"changes": changes, "restart_needed": list(plan.restart_needed)})
        return {"changes": changes, "restart_needed": list(plan.restart_needed)}

    # ------------------------------------------------------------ run
    async def run(self) -> None:
        """Start everything, tell systemd, serve until SIGTERM/SIGINT, then stop in order."""
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):  # from the first moment: a stop during start-up is orderly too
            self.loop.add_signal_handler(sig, self._stopping.set)
        started = time.monotonic()
        try:
            await self.loop.run_in_executor(None, self.prepare)
        except BaseException as exc:
            await self.loop.run_in_executor(None, self._start_failed, exc)
            raise
        cfg = self.config.control
        self.control = ControlServer(cfg.socket, self.dispatcher.run, cfg.mode, cfg.group)
        try:
            await self.control.start()
            for pipeline in self.pipelines.values():
                pipeline.start()
            self.loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload_quietly()))
            notify("READY=1", f"STATUS=inspecting {len(self.pipelines)} camera(s)")
            seconds = time.monotonic() - started
            log.info("ready in %.1f s: %d camera(s), outputs %s", seconds, len(self.pipelines), self.outputs.names)
            self.recorder.event("ready", detail=f"ready in {seconds:.1f} s", data={"seconds": round(seconds, 2)})
            await self._serve()
        finally:
            await self._shutdown()

    def _start_failed(self, exc: BaseException) -> None:
        """A start-up that failed (a missing bundle, a port in use): audit why, release what was opened."""
        log.error("start-up failed: %s", exc)
        for pipeline in self.pipelines.values():
            pipeline.engine.close()
        if self.outputs is not None:
            with contextlib.suppress(Exception):
                self.outputs.close(timeout=2.0)
        self.metrics.close()
        if self.recorder is not None:
            self.recorder.event("start_failed", detail=str(exc) or type(exc).__name__)
            self.recorder.close()

    async def _serve(self) -> None:
        interval = self.watchdog.interval or 1.0
        last_status = 0.0
        while not self._stopping.is_set():
            self.watchdog.tick()
            self.disk.maybe_check()
            for cam in self.drift.due():
                if cam not in self._drift_tests:  # a test runs off the loop; one per camera at a time
                    self._drift_tests.add(cam)
                    future = self.loop.run_in_executor(None, self.drift.test, cam)
                    future.add_done_callback(lambda f, cam=cam: self._drift_tests.discard(cam))
            if time.monotonic() - last_status >= STATUS_EVERY_S:
                notify(f"STATUS={self.status_line()}")
                last_status = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=min(interval, 1.0))

    async def _reload_quietly(self) -> None:
        notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            await self.reload()
        except ApplianceError:
            pass  # refused and audited; the old configuration keeps running
        finally:
            notify("READY=1")

    def stop(self) -> None:
        """Ask a running daemon to stop (thread-safe)."""
        if self.loop is not None and self._stopping is not None:
            self.loop.call_soon_threadsafe(self._stopping.set)

    async def _shutdown(self) -> None:
        self._is_stopping = True  # Ready drops on every PLC output from now on
        budget = self.config.runtime.stop_timeout_s
        notify("STOPPING=1", "STATUS=stopping: inspecting what is queued, draining the outputs")
        log.info("stopping (budget %.0f s): inspecting what is queued, then draining the outputs", budget)
        if self.control is not None:
            await self.control.stop()
        await self.loop.run_in_executor(None, self._stop_in_order, budget)

    def _stop_in_order(self, budget: float) -> None:
        """Capture and inspection, audit flush, outputs, engines, audit log: each within its share of ``budget``."""
        started = time.monotonic()
        unfinished = [cam for cam, p in self.pipelines.items() if not p.stop(budget * _DRAIN_SHARE)]
        if self.recorder is not None:
            with contextlib.suppress(ApplianceError, TimeoutError):
                self.recorder.flush(timeout=max(1.0, budget * 0.1))
        stuck: list[str] = []
        if self.outputs is not None:
            stuck = self.outputs.close(timeout=budget * _OUTPUT_SHARE)
        self.metrics.close()
        for cam, pipeline in self.pipelines.items():
            if cam not in unfinished:  # a pipeline still inside the engine keeps its engine (the process exits)
                pipeline.engine.close()
        self.abandoned = ([f"inspect-{cam}" for cam in unfinished] + [f"output-{name}" for name in stuck]
                          + [f"capture-{cam}" for cam, p in self.pipelines.items() if p.capture.alive])
        if self.recorder is None:
            return
        workers = self.outputs.workers if self.outputs else []
        dropped: dict[str, int] = {}
        with contextlib.suppress(ApplianceError, TimeoutError):
            dropped = self.recorder.abandon([w.name for w in workers if not w.publisher.durable],
                                            "not delivered: the daemon stopped before this output took it")
        seconds = time.monotonic() - started
        self.recorder.event("stop", detail=f"orderly stop in {seconds:.1f} s", data={
            "seconds": round(seconds, 2), "budget_s": budget, "undelivered": dropped,
            "threads_abandoned": self.abandoned})
        self.recorder.close(timeout=max(2.0, budget - seconds))
