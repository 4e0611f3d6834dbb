"""Modbus TCP server for PLCs: the vision-sensor handshake of ``modbus_map`` on the daemon's asyncio loop.

Each configured camera is one Modbus unit id. ``modbus_server`` is the wire (pymodbus, only the
documented function codes, counters instead of log lines); the registers live in its
``RegisterStore``. Every change to the registers (a PLC write, a new result, a health refresh)
happens on the loop thread under one lock. Results reach the map from the output's worker thread
through the loop; the audit log stays the record of every inspection (a result the PLC never saw
is marked ``failed`` there, with why).

TriggerIDs continue across restarts: the last one per camera is kept in the state folder
(``modbus-trigger-ids.json``), so a trigger id in the audit log is not reused by the next run.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import ipaddress
import json
import logging
import math
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from ...atomic import write_atomic
from ...errors import ApplianceError, PublishError
from ..commands import BundleCommand, CommandError, EnableCommand, LabelCommand, UnlabelCommand, parse_command
from ..modbus_map import (
    CameraMap,
    Command,
    CommandAction,
    ErrorCode,
    Result,
    TriggerAction,
    Verdict,
    result_id_for,
)
from ..modbus_server import Counters, ModbusServer, RegisterStore
from ..records import Inspection
from .base import Delivery, OutputContext, Publisher, PublisherConfig, register_publisher, run_on_loop

log = logging.getLogger(__name__)
#: Results per camera a PLC may still label by their ResultID (LABEL / UNLABEL commands).
_LABELLED_RESULTS = 256

_VERDICTS = {"ok": Verdict.OK, "ng": Verdict.NG, "error": Verdict.ERROR}
#: In the state folder: the last TriggerID per camera id, so ids continue across restarts.
TRIGGER_IDS_FILE = "modbus-trigger-ids.json"


class ModbusConfig(PublisherConfig):
    """The Modbus TCP server: where it listens, who may connect, which camera is which unit id."""

    type: Literal["modbus"] = "modbus"
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on; 0.0.0.0 for the plant network")
    port: int = Field(5020, ge=0, le=65535, description="TCP port (502, the Modbus standard, needs "
                                                        "CAP_NET_BIND_SERVICE; 0: any free port, for tests)")
    allow: list[str] = Field(["127.0.0.1", "::1"], description="client addresses or networks (CIDR) allowed to "
                                                               "connect; others are disconnected and counted")
    cameras: dict[str, int] = Field(min_length=1, description="camera id -> Modbus unit id (1-247); each "
                                                              "camera's registers are addressed by its unit id")
    buffer: int = Field(8, ge=8, le=1024, description="results waiting for ResultAck per camera; when full the "
                                                      "newest is dropped and BufferOverrun is set")
    heartbeat_s: float = Field(1.0, gt=0, description="period of the appliance heartbeat counter")
    plc_heartbeat_timeout_s: float = Field(5.0, gt=0, description="a PLC heartbeat unchanged this long is "
                                                                  "reported stale in status")
    refresh_s: float = Field(0.25, gt=0, le=5, description="how often Ready and ModelLoaded follow the daemon")
    timeout: float = Field(10.0, gt=0, description="seconds to wait for the server to start or stop")

    @field_validator("allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network (e.g. 10.0.0.5 or "
                                 "10.0.0.0/24)") from None
        return value

    @field_validator("cameras")
    @classmethod
    def _units(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {cam: unit for cam, unit in value.items() if not 1 <= unit <= 247}
        if bad:
            raise ValueError(f"unit ids must be 1-247, got {bad}")
        units = list(value.values())
        twice = sorted({u for u in units if units.count(u) > 1})
        if twice:
            raise ValueError(f"each camera needs its own unit id; repeated: {twice}")
        return value


class TriggerIdFile:
    """The last TriggerID per camera in a small JSON file, replaced atomically on every new id.

    Without it TriggerIDs would start at 1 again on every start and repeat in the audit log. An
    unreadable file starts the ids again (logged); a failed write is counted and logged at most once
    a minute, and triggering goes on: every audit row also carries the run that wrote it (``run_id``).
    """

    LOG_EVERY_S = 60.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: dict[str, int] = {}
        self.write_errors = 0
        self._logged_at = -math.inf

    def load(self) -> dict[str, int]:
        """Read the file (entries of cameras no longer configured are kept for when they come back)."""
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            self.ids = {str(cam): int(tid) & 0xFFFF for cam, tid in data.items()
                        if isinstance(tid, int) and not isinstance(tid, bool)}
        except FileNotFoundError:
            self.ids = {}
        except (OSError, ValueError) as exc:
            log.warning("modbus: %s is unreadable (%s); TriggerIDs start again from 1", self.path, exc)
            self.ids = {}
        return dict(self.ids)

    def save(self, camera: str, trigger_id: int) -> None:
        """Keep ``trigger_id`` as ``camera``'s last; never raises."""
        self.ids[camera] = trigger_id
        try:
            write_atomic(self.path, json.dumps(self.ids, sort_keys=True) + "\n", sync=False)
        except OSError as exc:
            self.write_errors += 1
            now = time.monotonic()
            if now - self._logged_at >= self.LOG_EVERY_S:
                self._logged_at = now
                log.warning("modbus: cannot keep the last TriggerID in %s: %s (%d failed writes); triggering goes "
                            "on, but after a restart TriggerIDs may repeat (the audit's run_id tells the runs apart)",
                            self.path, exc.strerror or exc, self.write_errors)


@register_publisher
class ModbusPublisher(Publisher):
    """PLC handshake over Modbus TCP: triggers in, results out (see docs/modbus-register-map.md)."""

    type = "modbus"
    Config = ModbusConfig

    def __init__(self, config: ModbusConfig, context: OutputContext) -> None:
        super().__init__(config, context)
        self.config: ModbusConfig = config
        self.maps = {unit: CameraMap(config.buffer) for unit in config.cameras.values()}
        self.store = RegisterStore(self.maps)
        self.store.on_actions = self._actions
        self.store.on_trigger_id = self._trigger_id_taken
        self.trigger_ids = TriggerIdFile(Path(context.state_dir) / TRIGGER_IDS_FILE)
        self._server: ModbusServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._port: int | None = None
        self._closing = False
        self._plc_beat: dict[int, tuple[int, float]] = {}  # unit -> (changes seen, monotonic time of the last)
        # unit -> the last results' ResultID -> inspection id: a PLC labels a result by the id it saw
        self._results: dict[int, collections.OrderedDict[int, str]] = {}

    @property
    def port(self) -> int | None:
        """The port listened on (useful with ``port = 0``); ``None`` until started."""
        return self._port

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Listen on the daemon's loop; ``PublishError`` if the port cannot be had."""
        run_on_loop(self.context.loop, self.start_async(), self.config.timeout, self.type, "start")

    async def start_async(self) -> None:
        """Continue the TriggerIDs of the last run, listen (on the running loop), start the refresh task."""
        last = self.trigger_ids.load()
        with self.store.lock:
            for cam_id, unit in self.config.cameras.items():
                self.maps[unit].next_trigger_id = last.get(cam_id, 0)
        server = ModbusServer(self.store, self.config.host, self.config.port, self.config.allow)
        if not await server.listen():
            raise PublishError(_listen_error(self.config.host, self.config.port))
        self._server = server
        self._port = int(server.transport.sockets[0].getsockname()[1])
        self._tasks = [asyncio.create_task(self._refresh_forever(), name="modbus-refresh")]
        log.info("modbus output listening on %s:%d, units %s", self.config.host, self._port, self.config.cameras)

    def close(self) -> None:
        """Ready drops at once; then the server stops and clients are disconnected. Never raises."""
        self._closing = True
        with self.store.lock:
            for cam in self.maps.values():
                cam.set_health(False, False, False)
        if self._server is None:
            return
        try:
            run_on_loop(self.context.loop, self.stop_async(), self.config.timeout, self.type, "stop")
        except Exception as exc:  # close must not raise: the daemon is stopping anyway
            log.warning("modbus output did not stop cleanly: %s", exc)

    async def stop_async(self) -> None:
        """Stop the refresh task and the server (on the running loop)."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()

    # ------------------------------------------------------------ results (worker thread)
    def publish(self, inspection: Inspection) -> Delivery:
        """Queue the result in its camera's buffer (on the loop); ``PublishError`` if the buffer was full."""
        unit = self.config.cameras.get(inspection.camera)
        if unit is None:
            return Delivery("skipped", detail=f"camera {inspection.camera} has no unit id")
        result = Result(result_id_for(inspection.trigger_id, inspection.seq), _VERDICTS[inspection.verdict],
                        inspection.score, inspection.latency_ms.get("total"), inspection.model_id,
                        inspection.trigger_id)
        future: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def add() -> None:
            with self.store.lock:
                future.set_result(self.maps[unit].add_result(result))
                seen = self._results.setdefault(unit, collections.OrderedDict())
                seen.pop(result.result_id, None)
                seen[result.result_id] = inspection.id
                while len(seen) > _LABELLED_RESULTS:
                    seen.popitem(last=False)

        loop = self.context.loop
        if loop is None or loop.is_closed():
            raise PublishError("modbus output: the daemon's loop is gone")
        loop.call_soon_threadsafe(add)
        try:
            kept = future.result(self.config.timeout)
        except concurrent.futures.TimeoutError:
            raise PublishError("modbus output: the daemon's loop did not take the result in time") from None
        if not kept:
            raise PublishError(f"modbus buffer overrun on unit {unit}: {self.config.buffer} results wait for "
                               f"ResultAck; result {result.result_id} was not shown to the PLC")
        return Delivery("sent", detail=f"modbus unit {unit} result {result.result_id}")

    # ------------------------------------------------------------ PLC requests (loop thread)
    def _actions(self, unit: int, actions: list[TriggerAction | CommandAction]) -> None:
        camera = self._camera(unit)
        for action in actions:
            if isinstance(action, TriggerAction):
                self._trigger(unit, camera, action.trigger_id)
            else:
                self._tasks.append(asyncio.ensure_future(self._command(unit, camera, action)))
                self._tasks = [t for t in self._tasks if not t.done()]

    def _trigger_id_taken(self, unit: int, trigger_id: int) -> None:
        self.trigger_ids.save(self._camera(unit), trigger_id)

    def _trigger(self, unit: int, camera: str, trigger_id: int) -> None:
        code = ErrorCode.TRIGGER_REFUSED
        try:
            accepted = bool(self.context.trigger(camera, str(trigger_id))) if self.context.trigger else False
            if not accepted:
                code = ErrorCode.TRIGGER_OVERRUN
        except ApplianceError as exc:
            log.warning("modbus: trigger %d for %s refused: %s", trigger_id, camera, exc)
            accepted = False
        with self.store.lock:
            self.maps[unit].trigger_answered(trigger_id, accepted, code)

    async def _command(self, unit: int, camera: str, action: CommandAction) -> None:
        error = ErrorCode.NONE
        try:
            request = _command_request(camera, action, self._results.get(unit, {}))
        except ApplianceError as exc:
            log.warning("modbus: command %s for %s refused: %s", action.code, camera, exc)
            request, error = None, ErrorCode.COMMAND_FAILED
        if request is None:
            error = error or ErrorCode.UNKNOWN_COMMAND
        else:
            try:
                if self.context.control is None:
                    raise PublishError("the daemon gave this output no control handler")
                await self.context.control(request)
            except ApplianceError as exc:
                log.warning("modbus: command %s for %s failed: %s", action.code, camera, exc)
                error = ErrorCode.COMMAND_FAILED
            except Exception:
                log.exception("modbus: command %s for %s failed", action.code, camera)
                error = ErrorCode.COMMAND_FAILED
        with self.store.lock:
            self.maps[unit].command_done(action.code, error)

    def _camera(self, unit: int) -> str:
        return next(cam for cam, u in self.config.cameras.items() if u == unit)

    # ------------------------------------------------------------ health (loop thread)
    async def _refresh_forever(self) -> None:
        last_beat = time.monotonic()
        while True:
            try:
                self.refresh()
                if time.monotonic() - last_beat >= self.config.heartbeat_s:
                    last_beat = time.monotonic()
                    with self.store.lock:
                        for cam in self.maps.values():
                            cam.beat()
            except Exception:  # the loop must go on: a PLC watches Ready and the heartbeat
                log.exception("modbus: refreshing the status registers failed")
            await asyncio.sleep(self.config.refresh_s)

    def refresh(self) -> None:
        """Ready, ModelLoaded, InspectionEnabled, the threshold and alarms from the daemon's status.

        Each unit follows its own camera: one camera's trouble never drops another camera's Ready.
        A daemon alarm (a full disk) sets every unit's Error bit with its code while it lasts.
        """
        try:
            status = self.context.status()
            cameras, alarms = status.cameras, [a.kind for a in status.daemon.alarms]
        except Exception as exc:
            log.warning("modbus: the daemon's status failed: %s", exc)
            cameras, alarms = {}, []
        alarm = ErrorCode.DISK_LOW if "disk_low" in alarms else None
        now = time.monotonic()
        with self.store.lock:
            for cam_id, unit in self.config.cameras.items():
                cam = cameras.get(cam_id)
                model_id = cam.bundle.model_id if cam is not None else None
                enabled = cam.enabled if cam is not None else False
                ready = cam is not None and cam.ready and not self._closing
                threshold = cam.threshold.value if cam is not None else None
                self.maps[unit].set_health(ready, bool(model_id), enabled, model_id, threshold)
                self.maps[unit].set_alarm(alarm)
                self.maps[unit].set_drift(cam is not None and cam.drift.get("state") == "drift")
                seen = self.maps[unit].plc_heartbeat_changes
                if seen and self._plc_beat.get(unit, (0, 0.0))[0] != seen:
                    self._plc_beat[unit] = (seen, now)

    # ------------------------------------------------------------ status, doctor
    def state(self) -> dict[str, Any]:
        """Listening, clients, requests, refused clients and function codes, malformed frames, PLC heartbeat ages."""
        server = self._server
        counters = server.counters if server is not None else Counters()
        now = time.monotonic()
        cameras = {}
        with self.store.lock:
            for cam_id, unit in self.config.cameras.items():
                m = self.maps[unit]
                beat = self._plc_beat.get(unit)
                age = round(now - beat[1], 1) if beat else None
                cameras[cam_id] = {"unit": unit, "ready": m.ready, "buffered": len(m.buffer), "overruns": m.overruns,
                                   "plc_heartbeat_age_s": age,
                                   "plc_heartbeat_stale": age is None or age > self.config.plc_heartbeat_timeout_s}
        return {"listening": server is not None, "address": f"{self.config.host}:{self._port}",
                "clients": len(server.active_connections) if server is not None else 0,
                "connections": counters.connections, "requests": counters.requests,
                "refused_clients": counters.refused_clients, "malformed_frames": counters.malformed,
                "refused_function_codes": counters.refused_functions,
                "trigger_id_write_errors": self.trigger_ids.write_errors, "cameras": cameras}

    @classmethod
    def check(cls, config: PublisherConfig, state_dir: Path) -> tuple[str, str]:
        """The port is free or a Modbus server (this appliance's, running) answers on it; allow is sane."""
        assert isinstance(config, ModbusConfig)
        note = "" if config.allow else "; allow is empty: every client will be refused"
        open_to = [a for a in config.allow if ipaddress.ip_network(a, strict=False).prefixlen == 0]
        if open_to:
            note += f"; allow {open_to} admits any client"
        try:
            with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((config.host, config.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and _answers_modbus(config.host, config.port):
                return "ok", f"a Modbus server (the running appliance?) answers on {config.host}:{config.port}" + note
            return "fail", _listen_error(config.host, config.port, exc)
        status = "warn" if note else "ok"
        return status, f"{config.host}:{config.port} is free; units {config.cameras}" + note


def _command_request(camera: str, action: CommandAction, results: Mapping[int, str]) -> Any:
    """The daemon's typed command for a PLC's command code, ``None`` for an unknown code.

    ``results`` maps the ResultIDs the PLC saw lately to their inspections (for LABEL and UNLABEL).

    Raises:
        CommandError: the arguments are out of range (a threshold above 1000, an unknown ResultID or label).

    """
    arg0, arg1 = action.args
    if action.code in (Command.ENABLE, Command.DISABLE):
        return EnableCommand(camera=camera, enabled=action.code == Command.ENABLE, who="modbus")
    if action.code == Command.BUNDLE_SLOT:
        return BundleCommand(camera=camera, slot=arg0, who="modbus")
    if action.code == Command.THRESHOLD:
        return parse_command({"cmd": "threshold", "camera": camera,
                              "value": None if arg0 == 0xFFFF else arg0 / 1000, "who": "modbus"})
    if action.code in (Command.LABEL, Command.UNLABEL):
        inspection = results.get(arg0)
        if inspection is None:
            raise CommandError(f"ResultID {arg0} is not one of the last {_LABELLED_RESULTS} results of {camera}")
        if action.code == Command.UNLABEL:
            return UnlabelCommand(inspection=inspection, camera=camera, who="modbus")
        if arg1 not in (1, 2):
            raise CommandError(f"label code {arg1}: 1 is good, 2 is defect")
        return LabelCommand(inspection=inspection, label="good" if arg1 == 1 else "defect", camera=camera,
                            who="modbus")
    return None


def _answers_modbus(host: str, port: int) -> bool:
    """A Modbus TCP server answers a read of the heartbeat register of unit 255 (any answer counts)."""
    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    try:
        with socket.create_connection((target, port), timeout=2) as sock:
            sock.sendall(bytes.fromhex("000100000006ff04000c0001"))
            answer = sock.recv(256)
    except OSError:
        return False
    return len(answer) >= 9 and answer[:4] == bytes.fromhex("00010000")


def _listen_error(host: str, port: int, exc: OSError | None = None) -> str:
    if exc is None:  # pymodbus only says it failed: ask the OS why
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as probe_exc:
            exc = probe_exc
    where = f"modbus output cannot listen on {host}:{port}"
    if exc is None:
        return f"{where}; check host and port in this output's config"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: the port is in use; stop the program holding it or choose another port"
    if exc.errno == errno.EACCES:
        return (f"{where}: permission denied: ports below 1024 (502) need CAP_NET_BIND_SERVICE "
                "(AmbientCapabilities= in the systemd unit), or use 5020")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: no interface of this machine has that address"
    return f"{where}: {exc.strerror or exc}"
