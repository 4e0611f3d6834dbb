"""What the PLC-side tests share: a stand-in for the daemon (``Plant``), records, and the PLC's Modbus reads.

The outputs under test (Modbus, OPC UA) see the daemon only through ``OutputContext``: its
asyncio loop, a status snapshot, ``trigger`` and ``control``. ``Plant`` provides those, with a
status the test controls and a log of what it was asked for. test_plc_e2e.py drives the real
daemon with the same Modbus helpers.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from pymodbus.client import ModbusTcpClient
from snapshots import snapshot

from appliance.daemon import modbus_map as mm
from appliance.daemon.publishers import OutputContext
from appliance.daemon.records import Inspection, new_inspection_id
from appliance.daemon.status import Status
from appliance.errors import ConfigError

S = mm.Status
EN = mm.TRIGGER_ENABLE


class Plant:
    """What the Modbus output sees of the daemon: loop, status, trigger, control."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.healthy = True
        self.cameras = {cam: {"state": "running", "enabled": True, "bundle": {"model_id": "m1"},
                              "threshold": {"value": 0.5, "source": "bundle"}} for cam in ("cam1", "cam2")}
        self.alarms: list[dict[str, Any]] = []
        self.triggers: list[tuple[str, str]] = []
        self.trigger_answer: Callable[[], bool] = lambda: True
        self.commands: list[dict[str, Any]] = []

    def status(self) -> Status:
        """The daemon's snapshot: a camera is ready while the plant is healthy and it runs, enabled, with a model."""
        cams = {}
        for cam, c in self.cameras.items():
            ready = (self.healthy and c.get("state") == "running" and c.get("enabled", True)
                     and bool((c.get("bundle") or {}).get("model_id")))
            cams[cam] = {**c, "ready": ready, "healthy": self.healthy}
        return snapshot(cams, healthy=self.healthy, alarms=self.alarms)

    def trigger(self, camera: str, trigger_id: str | None) -> bool:
        self.triggers.append((camera, trigger_id))
        return self.trigger_answer()

    async def control(self, command: Any) -> Any:
        """The daemon's dispatcher: records the typed command as the fields its sender set."""
        self.commands.append({"cmd": command.cmd, **command.model_dump(exclude_unset=True)})
        if getattr(command, "slot", None) == 9:
            raise ConfigError("camera cam1 has no bundle slot 9")
        return {"ok": True}

    def context(self, state_dir: Path) -> OutputContext:
        return OutputContext(state_dir=state_dir, status=self.status, registry=CollectorRegistry(), loop=self.loop,
                             trigger=self.trigger, control=self.control)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def inspection(camera: str = "cam1", trigger_id: str | None = None, verdict: str = "ok", score: float | None = 0.25,
               seq: int = 1, model: str = "m1", total_ms: float = 42.0) -> Inspection:
    now = time.time()
    return Inspection(id=new_inspection_id(), camera=camera, seq=seq, captured_at=now, finished_at=now,
                      verdict=verdict, trigger_id=trigger_id, score=score, model_id=model,
                      error="no image" if verdict == "error" else None, latency_ms={"total": total_ms})


def inputs(plc: ModbusTcpClient, unit: int = 1) -> list[int]:
    answer = plc.read_input_registers(0, count=mm.IR_COUNT, device_id=unit)
    assert not answer.isError(), answer
    return answer.registers


def wait_bits(plc: ModbusTcpClient, on: int = 0, off: int = 0, unit: int = 1, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        regs = inputs(plc, unit)
        if regs[0] & on == on and not regs[0] & off:
            return regs
        assert time.monotonic() < deadline, f"status {regs[0]:#06x}: wanted on {on:#x} off {off:#x}"
        time.sleep(0.01)


def control(plc: ModbusTcpClient, value: int, unit: int = 1) -> None:
    assert not plc.write_register(mm.HR_CONTROL, value, device_id=unit).isError()


def score_of(regs: list[int]) -> float:
    return struct.unpack(">f", struct.pack(">HH", regs[mm.IR_SCORE_HI], regs[mm.IR_SCORE_LO]))[0]



def trigger_once(plc: ModbusTcpClient, unit: int = 1) -> int:
    """One PLC trigger handshake (TriggerEnable, Trigger up, TriggerAck, Trigger down); the TriggerID taken."""
    control(plc, EN, unit)
    control(plc, EN | mm.TRIGGER, unit)
    regs = wait_bits(plc, on=S.TRIGGER_ACK, unit=unit)
    control(plc, EN, unit)
    wait_bits(plc, off=S.TRIGGER_ACK, unit=unit)
    return regs[mm.IR_TRIGGER_ID]


def mbap(tid: int, pdu: bytes, unit: int = 1, pid: int = 0, length: int | None = None) -> bytes:
    """A Modbus TCP frame as raw bytes: MBAP header (``length`` overrides the true one) and PDU."""
    return struct.pack(">HHHB", tid, pid, len(pdu) + 1 if length is None else length, unit) + pdu


def exchange(sock: socket.socket, frame: bytes) -> bytes:
    """Send one raw frame and read exactly one answer (header first, then the length it gives)."""
    sock.sendall(frame)
    answer = b""
    while len(answer) < 6 or len(answer) < 6 + int.from_bytes(answer[4:6], "big"):
        chunk = sock.recv(512)
        if not chunk:
            raise ConnectionError(f"connection closed after {answer.hex()!r}")
        answer += chunk
    return answer
