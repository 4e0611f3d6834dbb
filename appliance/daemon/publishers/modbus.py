"""Modbus TCP server for PLCs: the vision-sensor handshake of ``modbus_map`` on the daemon's asyncio loop.

Each configured camera is one Modbus unit id. pymodbus does the framing and the transport; the
registers live in ``RegisterStore``, which pymodbus calls for every read and write. Every change
to the registers (a PLC write, a new result, a health refresh) happens on the loop thread under
one lock, and reads take the same lock, so a multi-register read never mixes two results.
Results reach the map from the output's worker thread through the loop; the audit log stays the
record of every inspection (a result the PLC never saw is marked ``failed`` there, with why).

Clients whose address is not in ``allow`` are disconnected on connect; frames with a broken MBAP
header (protocol id, length, function code) close the connection; both are counted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import ipaddress
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pymodbus.constants import ExcCodes
from pymodbus.pdu import DecodePDU
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import SimData, SimDevice

from ...errors import ApplianceError, PublishError
from ..modbus_map import (
    CameraMap,
    Command,
    CommandAction,
    ErrorCode,
    Exc,
    Result,
    TriggerAction,
    Verdict,
    result_id_for,
)
from ..records import Inspection
from .base import Delivery, OutputContext, Publisher, PublisherConfig, register_publisher, run_on_loop

log = logging.getLogger(__name__)

_VERDICTS = {"ok": Verdict.OK, "ng": Verdict.NG, "error": Verdict.ERROR}
#: Largest MBAP length field: unit id + a PDU of at most 253 bytes.
_MAX_MBAP_LENGTH = 254


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


class RegisterStore:
    """All cameras' maps behind one lock; pymodbus calls it as its datastore (``async_getValues`` ...)."""

    def __init__(self, units: dict[int, CameraMap]) -> None:
        self.units = units
        self.lock = threading.Lock()
        self.on_actions: Any = None  # (unit, actions) -> None, set by the publisher

    def device_ids(self) -> list[int]:
        """Configured unit ids."""
        return list(self.units)

    async def async_getValues(self, device_id: int, func_code: int, address: int,  # noqa: N802 - pymodbus' API
                              count: int = 1) -> list[int] | ExcCodes:
        """A read: one consistent snapshot of the registers asked for."""
        cam = self.units.get(device_id)
        if cam is None:
            return ExcCodes.GATEWAY_NO_RESPONSE
        with self.lock:
            values = cam.read(func_code, address, count)
        return ExcCodes(int(values)) if isinstance(values, Exc) else values

    async def async_setValues(self, device_id: int, func_code: int, address: int,  # noqa: N802 - pymodbus' API
                              values: list[int]) -> ExcCodes | None:
        """A write; the triggers and commands it asks for are carried out before the answer goes out."""
        cam = self.units.get(device_id)
        if cam is None:
            return ExcCodes.GATEWAY_NO_RESPONSE
        with self.lock:
            actions = cam.write(func_code, address, [int(v) for v in values])
        if isinstance(actions, Exc):
            return ExcCodes(int(actions))
        if actions and self.on_actions is not None:
            self.on_actions(device_id, actions)
        return None


class _Counters:
    def __init__(self) -> None:
        self.requests = self.refused = self.malformed = self.connections = 0


class _CountingDecoder(DecodePDU):
    """pymodbus' request decoder, counting the frames it cannot decode."""

    def __init__(self, counters: _Counters) -> None:
        super().__init__(True)
        self.counters = counters

    def decode(self, frame: bytes) -> Any:
        """Decode a PDU; ``None`` (counted) if it is not a request pymodbus knows."""
        pdu = super().decode(frame)
        if pdu is None:
            self.counters.malformed += 1
        return pdu


def mbap_problem(data: bytes) -> str | None:
    """What is wrong with the MBAP header at the start of ``data`` (as far as it has arrived), or ``None``."""
    if len(data) >= 4 and data[2:4] != b"\x00\x00":
        return "protocol id is not 0"
    if len(data) >= 6 and not 2 <= int.from_bytes(data[4:6], "big") <= _MAX_MBAP_LENGTH:
        return "length out of range"
    if len(data) >= 8 and (data[7] == 0 or data[7] >= 0x80):
        return "function code out of range"
    return None


class _Handler(ServerRequestHandler):
    """One client connection: the allow-list on connect, broken headers close the connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        owner: _Server = self.server
        peer = transport.get_extra_info("peername")
        if not owner.allowed(peer[0] if peer else None):
            owner.counters.refused += 1
            log.warning("modbus: client %s is not in allow; disconnected", peer)
            self.close()
            return
        owner.counters.connections += 1

    def callback_data(self, data: bytes, addr: tuple | None = None) -> int:
        owner: _Server = self.server
        problem = mbap_problem(data)
        if problem is not None:
            owner.counters.malformed += 1
            log.debug("modbus: malformed frame (%s); closing the connection", problem)
            self.close()
            return len(data)
        used = super().callback_data(data, addr)
        if self.last_pdu is not None:
            owner.counters.requests += 1
        return used


class _Server(ModbusTcpServer):
    def __init__(self, store: RegisterStore, host: str, port: int, allow: list[str]) -> None:
        placeholder = SimDevice(0, simdata=[SimData(0)])  # pymodbus wants one; the store replaces it
        super().__init__(placeholder, address=(host, port))
        self.context = store
        self.counters = _Counters()
        self.decoder = _CountingDecoder(self.counters)
        self._allow = [ipaddress.ip_network(a, strict=False) for a in allow]

    def allowed(self, address: str | None) -> bool:
        if address is None:
            return False
        ip = ipaddress.ip_address(address.split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._allow)

    def callback_new_connection(self) -> _Handler:
        return _Handler(self, self.trace_packet, self.trace_pdu, self.trace_connect)


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
        self._server: _Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._port: int | None = None
        self._closing = False
        self._plc_beat: dict[int, tuple[int, float]] = {}  # unit -> (changes seen, monotonic time of the last)

    @property
    def port(self) -> int | None:
        """The port listened on (useful with ``port = 0``); ``None`` until started."""
        return self._port

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Listen on the daemon's loop; ``PublishError`` if the port cannot be had."""
        run_on_loop(self.context.loop, self.start_async(), self.config.timeout, self.type, "start")

    async def start_async(self) -> None:
        """Listen (on the running loop) and start the refresh task."""
        server = _Server(self.store, self.config.host, self.config.port, self.config.allow)
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
        request = _command_request(camera, action)
        error = ErrorCode.NONE
        if request is None:
            error = ErrorCode.UNKNOWN_COMMAND
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
        """Ready, ModelLoaded, InspectionEnabled and the threshold from the daemon's status."""
        try:
            status = self.context.status()
        except Exception as exc:
            log.warning("modbus: the daemon's status failed: %s", exc)
            status = {}
        healthy = bool(status.get("daemon", {}).get("healthy")) and not self._closing
        cameras = status.get("cameras", {})
        now = time.monotonic()
        with self.store.lock:
            for cam_id, unit in self.config.cameras.items():
                cam = cameras.get(cam_id) or {}
                model_id = (cam.get("bundle") or {}).get("model_id")
                enabled = bool(cam.get("enabled", bool(cam)))
                ready = healthy and cam.get("state") == "running" and enabled and bool(model_id)
                threshold = (cam.get("threshold") or {}).get("value")
                self.maps[unit].set_health(ready, bool(model_id), enabled, model_id, threshold)
                seen = self.maps[unit].plc_heartbeat_changes
                if seen and self._plc_beat.get(unit, (0, 0.0))[0] != seen:
                    self._plc_beat[unit] = (seen, now)

    # ------------------------------------------------------------ status, doctor
    def state(self) -> dict[str, Any]:
        """Listening, clients, requests, refused clients, malformed frames, PLC heartbeat age per camera."""
        server = self._server
        counters = server.counters if server is not None else _Counters()
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
                "refused_clients": counters.refused, "malformed_frames": counters.malformed, "cameras": cameras}

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


def _command_request(camera: str, action: CommandAction) -> dict[str, Any] | None:
    arg0 = action.args[0]
    if action.code in (Command.ENABLE, Command.DISABLE):
        return {"cmd": "enable", "camera": camera, "enabled": action.code == Command.ENABLE, "who": "modbus"}
    if action.code == Command.BUNDLE_SLOT:
        return {"cmd": "bundle", "camera": camera, "slot": arg0, "who": "modbus"}
    if action.code == Command.THRESHOLD:
        return {"cmd": "threshold", "camera": camera, "value": None if arg0 == 0xFFFF else arg0 / 1000,
                "who": "modbus"}
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
