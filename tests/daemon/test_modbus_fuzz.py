"""10,000 malformed Modbus TCP frames on raw sockets: the server counts them, survives, and still serves a PLC.

Counted, not logged: pymodbus (held at WARNING here, louder than the daemon keeps it) writes next to nothing.
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from plc import mbap
from pymodbus.client import ModbusTcpClient
from test_modbus import Plant, inputs, start_output

from appliance.daemon import modbus_map as mm
from appliance.daemon.modbus_server import FUNCTION_CODES
from appliance.daemon.publishers.modbus import ModbusPublisher

FRAMES = 10_000


def frames(rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """``(kind, bytes)``: truncated frames leave the server waiting; the rest get an answer or a close."""
    for tid in range(FRAMES):
        kind = rng.choice(("random_fc", "random_fc", "bad_pid", "bad_length", "truncated", "short_body",
                           "valid_then_garbage", "exception_fc", "huge_count"))
        body = rng.randbytes(rng.randint(0, 20))
        if kind == "random_fc":
            data = mbap(tid, bytes([rng.randint(1, 0x7F)]) + body, unit=rng.choice((1, 2, 0, 255)))
        elif kind == "bad_pid":
            data = mbap(tid, b"\x03\x00\x00\x00\x01", pid=rng.randint(1, 0xFFFF))
        elif kind == "bad_length":
            data = mbap(tid, b"\x03" + body, length=rng.choice((0, 1, 255, 0xFFFF, rng.randint(256, 0xFFFF))))
        elif kind == "truncated":
            data = mbap(tid, b"\x04\x00\x00\x00\x02")[: rng.randint(1, 11)]
        elif kind == "short_body":  # a known function code without its fields
            data = mbap(tid, bytes([rng.choice((3, 4, 6, 16, 23))]) + body[:3])
        elif kind == "valid_then_garbage":
            data = mbap(tid, b"\x04\x00\x00\x00\x02") + rng.randbytes(rng.randint(1, 30))
        elif kind == "exception_fc":
            data = mbap(tid, bytes([rng.randint(0x80, 0xFF)]) + body)
        else:  # a read of more registers than exist, or than Modbus allows
            data = mbap(tid, struct.pack(">BHH", rng.choice((3, 4)), rng.randint(0, 0xFFFF), rng.randint(0, 0xFFFF)))
        yield kind, data


@pytest.fixture
def output(tmp_path: Path) -> Iterator[tuple[Plant, ModbusPublisher]]:
    plant = Plant()
    out = start_output(tmp_path, plant)
    yield plant, out
    out.close()
    plant.close()


def test_ten_thousand_malformed_frames_are_counted_and_the_server_keeps_serving(
        output: tuple[Plant, ModbusPublisher], caplog: pytest.LogCaptureFixture) -> None:
    plant, out = output
    caplog.set_level(logging.WARNING, logger="pymodbus")
    rng = random.Random(20240615)
    sock: socket.socket | None = None
    sent = closed_by_server = answered = 0
    started = time.monotonic()
    for tid, (kind, data) in enumerate(frames(rng)):
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", out.port), timeout=2)
        try:
            sock.sendall(data)
            sent += 1
            if kind == "truncated":  # the server waits for the rest: give up on this connection
                sock.close()
                sock = None
                continue
            sock.settimeout(0.5)
            reply = sock.recv(512)
        except (TimeoutError, ConnectionError):
            reply = b""
        if reply:
            answered += 1
            assert reply[2:4] == b"\x00\x00"  # every answer is a well-formed MBAP frame
            if kind == "random_fc" and data[7] not in FUNCTION_CODES:  # exception 1 for the code asked
                assert reply == mbap(tid, bytes([data[7] | 0x80, 1]), unit=data[6]), (data.hex(), reply.hex())
        if not reply or kind == "valid_then_garbage":  # closed, silent, or leftover bytes: start clean
            closed_by_server += not reply
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    elapsed = time.monotonic() - started
    state = out.state()
    assert sent == FRAMES and plant.thread.is_alive() and state["listening"]
    assert state["malformed_frames"] >= 2000, state  # broken headers and undecodable PDUs
    assert state["refused_function_codes"] >= 1000, state  # codes the register map does not serve
    noise = [r for r in caplog.records if r.name.startswith("pymodbus")]
    assert len(noise) < 10, [r.getMessage()[:200] for r in noise[:5]]
    assert answered > 1000 and closed_by_server > 1000
    plc = ModbusTcpClient("127.0.0.1", port=out.port, timeout=3, retries=0)
    assert plc.connect()
    assert inputs(plc)[0] & mm.Status.READY
    assert not plc.write_register(mm.HR_CONTROL, mm.TRIGGER_ENABLE, device_id=1).isError()
    plc.close()
    print(f"{FRAMES} frames in {elapsed:.1f} s: {state['malformed_frames']} malformed, "
          f"{state['refused_function_codes']} refused function codes, {answered} answered, "
          f"{closed_by_server} connections closed, {len(noise)} pymodbus log records")
