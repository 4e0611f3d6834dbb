"""The daemon: builds cameras, engines, the audit log and the outputs from the config, and runs them.

One asyncio loop in the main thread serves the network sides (control socket, HTTP, later
Modbus and OPC UA), feeds the watchdog and reacts to signals: SIGTERM/SIGINT drain and stop,
SIGHUP reloads the config (a bad new config is refused, audited, and the old one keeps
running). Each camera's pipeline runs on its own threads; every inspection goes to the audit
log first and to the outputs once its row is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from .. import __version__
from ..bundle import load_bundle
from ..engine import Engine
from ..errors import ApplianceError, ConfigError
from .audit import Recorder
from .config import Camera, DaemonConfig, load_config
from .control import ControlServer
from .metrics import registry_for
from .outputs import Outputs
from .pipeline import CameraPipeline
from .publishers import OutputContext, create_publisher
from .publishers.overlay import OverlayPublisher
from .records import Inspection
from .sources import Captured
from .supervisor import Watchdog, notify
from .thresholds import check_overrides, load_timezone, resolve

log = logging.getLogger(__name__)
STATUS_EVERY_S = 5.0


class Daemon:
    """``appliance run``: everything the appliance does, until it is told to stop."""

    def __init__(self, config: DaemonConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.started_at = time.time()
        self.tz: ZoneInfo = load_timezone(config.timezone)
        self.state_dir = config.paths.state
        self.pipelines: dict[str, CameraPipeline] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.recorder: Recorder | None = None
        self.outputs: Outputs | None = None
        self.control: ControlServer | None = None
        self.registry = registry_for(self.status)
        self.watchdog = Watchdog(self.health)
        self._overrides: dict[str, dict[str, Any]] = {}
        self._overrides_lock = threading.Lock()
        self._stopping: asyncio.Event | None = None
        self._camera_states: dict[str, str] = {}
        self.fault_injection = os.environ.get("APPLIANCE_FAULT_INJECTION") == "1"

    # ------------------------------------------------------------ start-up
    def prepare(self) -> None:
        """Folders, the audit log, the outputs and every camera's engine; nothing inspects yet."""
        cfg = self.config
        for folder in (cfg.paths.state, cfg.paths.cache):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"paths: cannot create {folder}: {exc.strerror or exc}") from None
        self.recorder = Recorder.from_config(cfg.audit, cfg.paths.state)
        self.recorder.start()
        self.recorder.event("start", detail=f"appliance {__version__}",
                            data={"version": __version__, "config": str(self.config_path), "pid": os.getpid()})
        self._overrides = self._load_overrides()
        context = OutputContext(state_dir=cfg.paths.state, status=self.status, registry=self.registry,
                                loop=self.loop, trigger=self.trigger, control=self.handle, outbox=self.recorder)
        self.outputs = Outputs([create_publisher(o, context) for o in cfg.outputs], self._delivered)
        for camera in cfg.cameras:
            self._camera_overlay(camera)
        engines = {c.id: self._load_engine(c) for c in cfg.cameras if c.enabled}
        self.outputs.start()
        for camera in cfg.cameras:
            if camera.enabled:
                self.pipelines[camera.id] = self._pipeline(camera, engines[camera.id])

    def _load_engine(self, camera: Camera) -> Engine:
        path = self.config.state_path(camera.bundle)
        rt = self.config.runtime
        engine = load_bundle(path, threads=rt.threads, streams=rt.streams, cache_dir=self.config.paths.cache)
        self.recorder.event("model_loaded", camera.id, f"{engine.model_id} from {path}",
                            {"model_id": engine.model_id, "bundle": str(path)})
        return engine

    def _pipeline(self, camera: Camera, engine: Engine) -> CameraPipeline:
        return CameraPipeline(camera, engine, threshold_for=self.threshold_for, plan_overlay=self._plan_overlay,
                              emit=self.emit, on_state=self._camera_state, depth=self.config.runtime.streams)

    def _camera_overlay(self, camera: Camera) -> None:
        overlay = self._overlay()
        if overlay is not None:
            o = camera.overlay
            overlay.set_camera_options(camera.id, enabled=o.enabled, only_ng=o.only_ng, keep=o.keep, max_mb=o.max_mb)

    def _overlay(self) -> OverlayPublisher | None:
        publisher = self.outputs.get("overlay") if self.outputs else None
        return publisher if isinstance(publisher, OverlayPublisher) else None

    # ------------------------------------------------------------ the flow of one result
    def _plan_overlay(self, camera: str, captured_at: float, verdict: str, inspection_id: str) -> str | None:
        overlay = self._overlay()
        path = overlay.plan(inspection_id, camera, captured_at, verdict) if overlay else None
        return None if path is None else str(path)

    def emit(self, inspection: Inspection, item: Captured | None) -> None:
        """Audit row first; once committed, every output and the source's ``done`` (hot folder: move the file)."""

        def committed() -> None:
            self.outputs.publish(inspection)
            if item is not None and item.done is not None:
                item.done(inspection.verdict != "error")

        extra = {"camera": inspection.camera, "inspection_id": inspection.id}
        if inspection.verdict == "error":
            log.warning("camera %s: inspection %s failed: %s", inspection.camera, inspection.id, inspection.error,
                        extra=extra)
        outbox = {w.name: w.publisher.payload(inspection) for w in self.outputs.workers if w.publisher.durable}
        self.recorder.record(inspection, self.outputs.names, outbox=outbox, then=committed)

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

    # ------------------------------------------------------------ thresholds
    def threshold_for(self, camera: str, when: float) -> tuple[float, str]:
        """The threshold in force for a frame of ``camera`` captured at ``when`` and where it comes from."""
        with self._overrides_lock:
            overrides = self._overrides.get(camera)
        return tuple(resolve(self.config.camera(camera).thresholds, self.tz, when, overrides))

    def set_threshold(self, camera: str, value: float | None, shift: str | None = None, who: str = "operator"
                      ) -> dict[str, Any]:
        """Set (or clear, with ``None``) an operator threshold for a camera or one of its shifts; audited, persisted."""
        cam = self.config.camera(camera)
        with self._overrides_lock:
            current = dict(self._overrides.get(camera, {"camera": None, "shifts": {}}))
            shifts = dict(current.get("shifts", {}))
            if shift is None:
                current["camera"] = value
            elif value is None:
                shifts.pop(shift, None)
            else:
                shifts[shift] = value
            current["shifts"] = shifts
            checked = check_overrides(current, cam.thresholds)
            before = self._overrides.get(camera)
            self._overrides[camera] = checked
            self._save_overrides()
        value_now, source = self.threshold_for(camera, time.time())
        self.recorder.event("threshold_changed", camera, f"{shift or 'camera'} -> {value} by {who}",
                            {"before": before, "after": checked, "in_force": value_now, "source": source})
        return {"camera": camera, "overrides": checked, "in_force": {"value": value_now, "source": source}}

    def _overrides_file(self) -> Path:
        return self.state_dir / "thresholds.json"

    def _load_overrides(self) -> dict[str, dict[str, Any]]:
        path = self._overrides_file()
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            known = {c.id: c for c in self.config.cameras}
            return {cam: check_overrides(v, known[cam].thresholds) for cam, v in data.items() if cam in known}
        except (ValueError, ApplianceError, AttributeError) as exc:
            self.recorder.event("error", detail=f"operator thresholds in {path} ignored: {exc}")
            return {}

    def _save_overrides(self) -> None:
        path = self._overrides_file()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._overrides, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    # ------------------------------------------------------------ control
    def trigger(self, camera: str, trigger_id: str | None = None) -> bool:
        """One frame from an externally triggered camera, carrying ``trigger_id``."""
        pipeline = self._running(camera)
        if pipeline.camera.trigger.mode != "external":
            raise ConfigError(f"camera {camera!r} is free-running; set trigger.mode = \"external\" to trigger it")
        if not pipeline.enabled:
            raise ConfigError(f"camera {camera!r} is disabled; enable it first ('enable' command)")
        return pipeline.trigger(trigger_id)

    def set_enabled(self, camera: str, enabled: bool, who: str = "operator") -> dict[str, Any]:
        """Turn a running camera's inspection on or off (not persisted: a restart inspects again); audited."""
        pipeline = self._running(camera)
        if not isinstance(enabled, bool):
            raise ConfigError(f"enabled must be true or false, got {enabled!r}")
        before, pipeline.enabled = pipeline.enabled, enabled
        if before != enabled:
            self.recorder.event("camera_enabled" if enabled else "camera_disabled", camera, f"by {who}",
                                {"enabled": enabled, "who": who})
        return {"camera": camera, "enabled": enabled}

    async def select_bundle(self, camera: str, slot: Any, who: str = "operator") -> dict[str, Any]:
        """Hot-swap a camera to the bundle of one of its ``slots`` (frames in flight finish on the old one)."""
        pipeline = self._running(camera)
        slots = pipeline.camera.slots
        if str(slot) not in slots:
            raise ConfigError(f"camera {camera!r} has no bundle slot {slot!r}; configured: {sorted(slots) or 'none'}")
        bundle = slots[str(slot)]
        cam = pipeline.camera.model_copy(update={"bundle": bundle})
        engine = await asyncio.get_running_loop().run_in_executor(None, self._load_engine, cam)
        before = pipeline.engine.model_id
        pipeline.swap_engine(engine)
        self.recorder.event("bundle_selected", camera, f"slot {slot}: {before} -> {engine.model_id} by {who}",
                            {"slot": str(slot), "bundle": str(bundle), "before": before, "after": engine.model_id,
                             "who": who})
        return {"camera": camera, "slot": str(slot), "model_id": engine.model_id}

    def _running(self, camera: str) -> CameraPipeline:
        """The running pipeline of ``camera``, or ``ConfigError`` naming the running ones."""
        pipeline = self.pipelines.get(camera)
        if pipeline is None:
            raise ConfigError(f"no running camera {camera!r}; running: {sorted(self.pipelines)}")
        return pipeline

    async def handle(self, request: dict[str, Any]) -> Any:
        """A control-socket request."""
        cmd = request["cmd"]
        if cmd == "status":
            return self.status()
        if cmd == "reload":
            return await self.reload()
        if cmd == "threshold":
            value = request.get("value")
            if value is not None and not isinstance(value, int | float):
                raise ConfigError(f"threshold value must be a number or null, got {value!r}")
            return self.set_threshold(str(request.get("camera")), value, request.get("shift"),
                                      str(request.get("who", "operator")))
        if cmd == "trigger":
            accepted = self.trigger(str(request.get("camera")), request.get("id"))
            return {"accepted": accepted}
        if cmd == "enable":
            return self.set_enabled(str(request.get("camera")), request.get("enabled"),
                                    str(request.get("who", "operator")))
        if cmd == "bundle":
            return await self.select_bundle(str(request.get("camera")), request.get("slot"),
                                            str(request.get("who", "operator")))
        if cmd == "stall" and self.fault_injection:
            self._running(str(request.get("camera"))).stall(float(request.get("seconds", 30)))
            return {"stalled": request.get("camera")}
        raise ConfigError(f"unknown command {cmd!r}; known: status, reload, threshold, trigger, enable, bundle")

    # ------------------------------------------------------------ status and health
    def health(self) -> tuple[bool, list[str]]:
        """Healthy while every pipeline turns and makes progress, and the audit log's writer lives."""
        reasons = []
        for cam, pipeline in self.pipelines.items():
            why = pipeline.stalled(self.config.watchdog.stall_s)
            if why:
                reasons.append(f"{cam}: {why}")
        if self.recorder is not None and not self.recorder.alive():
            reasons.append("audit writer thread ended")
        return not reasons, reasons

    def status(self) -> dict[str, Any]:
        """The snapshot behind ``appliance status``, ``/api/status`` and ``/metrics``."""
        healthy, reasons = self.health()
        cameras = {}
        for cam, pipeline in self.pipelines.items():
            value, source = self.threshold_for(cam, time.time())
            cameras[cam] = pipeline.status() | {"threshold": {"value": value, "source": source}}
        outputs = self.outputs.state() if self.outputs else {}
        if self.recorder is not None:
            outputs = {"audit": self.recorder.state(), **outputs}
        return {"daemon": {"version": __version__, "pid": os.getpid(), "started_at": self.started_at,
                           "uptime_s": round(time.time() - self.started_at, 1), "config": str(self.config_path),
                           "healthy": healthy, "unhealthy": reasons, "timezone": self.config.timezone},
                "cameras": cameras, "outputs": outputs}

    def status_line(self) -> str:
        """Systemd's one-line STATUS: rate and last verdict per camera."""
        parts = []
        for cam, pipeline in self.pipelines.items():
            snap = pipeline.stats.snapshot()
            last = snap["last"]["verdict"].upper() if snap["last"] else "-"
            parts.append(f"{cam} {snap['fps']:.1f} fps last {last} ({pipeline.capture.state})")
        return "; ".join(parts) or "no cameras"

    # ------------------------------------------------------------ reload
    async def reload(self) -> dict[str, Any]:
        """Read the config file again and apply what changed; a bad file is refused and nothing changes."""
        if self.config_path is None:
            raise ConfigError("the daemon was not started from a config file; nothing to reload")
        try:
            new = load_config(self.config_path)
            return await asyncio.get_running_loop().run_in_executor(None, self._apply, new)
        except ApplianceError as exc:
            self.recorder.event("config_rejected", detail=str(exc))
            log.error("reload refused, the running configuration stays: %s", exc)
            raise ConfigError(f"reload refused, the running configuration stays: {exc}") from None

    def _apply(self, new: DaemonConfig) -> dict[str, Any]:
        old = self.config
        restart_needed = [k for k in ("paths", "audit", "control", "outputs", "runtime", "timezone")
                          if getattr(old, k) != getattr(new, k)]
        old_cams = {c.id: c for c in old.cameras}
        new_cams = {c.id: c for c in new.cameras}
        engines: dict[str, Engine] = {}
        for cam in new.cameras:  # load every new model first: a bundle that fails refuses the whole reload
            before = old_cams.get(cam.id)
            if cam.enabled and (before is None or cam.bundle != before.bundle or not before.enabled
                                or cam.source != before.source or cam.trigger != before.trigger
                                or cam.queue != before.queue):
                engines[cam.id] = self._load_engine(cam)
        self.config = new.model_copy(update={k: getattr(old, k) for k in restart_needed})
        changes = []
        for cam_id, pipeline in list(self.pipelines.items()):
            cam = new_cams.get(cam_id)
            if cam is None or not cam.enabled:
                pipeline.stop()
                pipeline.engine.close()
                del self.pipelines[cam_id]
                changes.append(f"{cam_id}: stopped")
        for cam in new.cameras:
            self._camera_overlay(cam)
            if not cam.enabled:
                continue
            before, pipeline = old_cams.get(cam.id), self.pipelines.get(cam.id)
            if pipeline is None:
                self.pipelines[cam.id] = self._pipeline(cam, engines[cam.id])
                self.pipelines[cam.id].start()
                changes.append(f"{cam.id}: started")
            elif cam.source != before.source or cam.trigger != before.trigger or cam.queue != before.queue:
                pipeline.stop()
                old_engine = pipeline.engine
                self.pipelines[cam.id] = self._pipeline(cam, engines[cam.id])
                self.pipelines[cam.id].start()
                old_engine.close()
                changes.append(f"{cam.id}: restarted (source or trigger changed)")
            elif cam.id in engines:
                old_engine = pipeline.engine
                pipeline.swap_engine(engines[cam.id])
                changes.append(f"{cam.id}: model {old_engine.model_id} -> {engines[cam.id].model_id} (hot swap)")
            else:
                pipeline.camera = cam  # thresholds and overlay options take effect with the next frame
                if cam != before:
                    changes.append(f"{cam.id}: settings updated")
        note = f"; needs a restart to apply: {', '.join(restart_needed)}" if restart_needed else ""
        self.recorder.event("reload", detail="; ".join(changes) + note,
                            data={"changes": changes, "restart_needed": restart_needed})
        return {"changes": changes, "restart_needed": restart_needed}

    # ------------------------------------------------------------ run
    async def run(self) -> None:
        """Start everything, tell systemd, serve until SIGTERM/SIGINT, then drain and stop."""
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            await self.loop.run_in_executor(None, self.prepare)
        except BaseException as exc:
            await self.loop.run_in_executor(None, self._start_failed, exc)
            raise
        cfg = self.config.control
        self.control = ControlServer(cfg.socket, self.handle, cfg.mode, cfg.group)
        try:
            await self.control.start()
            for pipeline in self.pipelines.values():
                pipeline.start()
            self.loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
            self.loop.add_signal_handler(signal.SIGINT, self._stopping.set)
            self.loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload_quietly()))
            notify("READY=1", f"STATUS=inspecting {len(self.pipelines)} camera(s)")
            log.info("ready: %d camera(s), outputs %s", len(self.pipelines), self.outputs.names)
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
        if self.recorder is not None:
            self.recorder.event("start_failed", detail=str(exc) or type(exc).__name__)
            self.recorder.close()

    async def _serve(self) -> None:
        interval = self.watchdog.interval or 1.0
        last_status = 0.0
        while not self._stopping.is_set():
            self.watchdog.tick()
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
        notify("STOPPING=1", "STATUS=draining")
        log.info("stopping: draining queues")
        await self.loop.run_in_executor(None, self._drain)
        if self.control is not None:
            await self.control.stop()

    def _drain(self) -> None:
        for pipeline in self.pipelines.values():
            pipeline.stop()
        if self.recorder is not None:
            self.recorder.flush()
        if self.outputs is not None:
            self.outputs.close()
        for pipeline in self.pipelines.values():
            pipeline.engine.close()
        if self.recorder is not None:
            self.recorder.event("stop", detail="orderly stop")
            self.recorder.close()
