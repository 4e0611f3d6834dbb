"""The Modbus output against a real pymodbus client playing the PLC.

The daemon's side is a small stand-in (``Plant``, plc.py): its asyncio loop on a thread, a
status snapshot the test controls, and the triggers and control commands it was asked for.
The real daemon is driven in test_plc_e2e.py.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from plc import EN, Plant, S, control, exchange, inputs, inspection, mbap, score_of, trigger_once, wait_bits
from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

from appliance.daemon import modbus_map as mm
from appliance.daemon.modbus_server import FUNCTION_CODES
from appliance.daemon.publishers.modbus import TRIGGER_IDS_FILE, ModbusConfig, ModbusPublisher
from appliance.errors import ConfigError, PublishError


def start_output(tmp_path: Path, plant: Plant, **config: Any) -> ModbusPublisher:
    cfg = ModbusConfig(**{"port": 0, "cameras": {"cam1": 1, "cam2": 2}, "refresh_s": 0.05, **config})
    out = ModbusPublisher(cfg, plant.context(tmp_path))
    out.start()
    return out


@pytest.fixture
def output(tmp_path: Path, plant: Plant) -> Iterator[ModbusPublisher]:
    out = start_output(tmp_path, plant)
    yield out
    out.close()


@pytest.fixture
def plc(output: ModbusPublisher) -> Iterator[ModbusTcpClient]:
    client = ModbusTcpClient("127.0.0.1", port=output.port, timeout=3, retries=0)
    assert client.connect()
    yield client
    client.close()


def test_full_handshake_trigger_to_result_ack(plant: Plant, output: ModbusPublisher, plc: ModbusTcpClient) -> None:
    wait_bits(plc, on=S.READY | S.MODEL_LOADED)
    for n, (verdict, score, code) in enumerate([("ng", 0.73, 2), ("ok", 0.125, 1)], start=1):
        control(plc, EN)
        control(plc, EN | mm.TRIGGER)
        regs = wait_bits(plc, on=S.TRIGGER_ACK | S.BUSY, off=S.RESULT_VALID)
        assert regs[mm.IR_TRIGGER_ID] == n and plant.triggers[-1] == ("cam1", str(n))
        control(plc, EN)  # Trigger low: TriggerAck follows
        wait_bits(plc, off=S.TRIGGER_ACK)
        output.publish(inspection(trigger_id=plant.triggers[-1][1], verdict=verdict, score=score))
        regs = wait_bits(plc, on=S.RESULT_VALID, off=S.BUSY)
        assert regs[mm.IR_RESULT_ID] == n and regs[mm.IR_VERDICT] == code
        assert abs(score_of(regs) - score) < 1e-6 and regs[mm.IR_SCORE_X1000] == round(score * 1000)
        assert regs[mm.IR_TIME_MS] == 42 and (regs[mm.IR_MODEL_HI] << 16 | regs[mm.IR_MODEL_LO]) == zlib.crc32(b"m1")
        control(plc, EN | mm.RESULT_ACK)
        wait_bits(plc, off=S.RESULT_VALID)
        control(plc, EN)
    assert inputs(plc)[mm.IR_BUFFERED] == 0
    state = output.state()
    assert state["listening"] and state["clients"] == 1 and state["requests"] > 10


def test_buffer_of_8_overruns_and_releases_in_order(output: ModbusPublisher, plc: ModbusTcpClient) -> None:
    failed = 0
    for rid in range(1, 11):
        try:
            output.publish(inspection(trigger_id=str(rid)))
        except PublishError as exc:
            assert "overrun" in str(exc)
            failed += 1
    assert failed == 2
    regs = wait_bits(plc, on=S.BUFFER_OVERRUN | S.RESULT_VALID)
    assert regs[mm.IR_BUFFERED] == 8
    seen = []
    for _ in range(8):
        regs = wait_bits(plc, on=S.RESULT_VALID)
        seen.append(regs[mm.IR_RESULT_ID])
        control(plc, mm.RESULT_ACK)
        wait_bits(plc, off=S.RESULT_VALID)
        control(plc, 0)
    assert seen == list(range(1, 9))
    control(plc, mm.CLEAR_ERROR)
    assert not inputs(plc)[0] & S.BUFFER_OVERRUN


def expected_score(rid: int) -> float:
    return (rid % 997) / 997


def test_multi_register_reads_never_mix_two_results(output: ModbusPublisher, plc: ModbusTcpClient) -> None:
    """A reader hammers whole-block reads while results are published and acknowledged as fast as possible."""
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def reader() -> None:
        client = ModbusTcpClient("127.0.0.1", port=output.port, timeout=3, retries=0)
        client.connect()
        while not stop.is_set():
            regs = client.read_holding_registers(mm.MIRROR, count=mm.IR_COUNT, device_id=1).registers
            reads[0] += 1
            rid = regs[mm.IR_RESULT_ID]
            if rid == 0:
                continue
            model = zlib.crc32(f"m{rid}".encode())
            want = (round(expected_score(rid) * 1000), model >> 16, model & 0xFFFF, 1 + rid % 2)
            got = (regs[mm.IR_SCORE_X1000], regs[mm.IR_MODEL_HI], regs[mm.IR_MODEL_LO], regs[mm.IR_VERDICT])
            if got != want or abs(score_of(regs) - expected_score(rid)) > 1e-6:
                problems.append(f"result {rid}: {got} != {want}")
        client.close()

    def producer() -> None:
        for rid in range(1, 400):
            verdict = "ok" if rid % 2 == 0 else "ng"
            while not stop.is_set():
                try:
                    output.publish(inspection(trigger_id=str(rid), verdict=verdict, score=expected_score(rid),
                                              model=f"m{rid}"))
                    break
                except PublishError:  # buffer full: the acker catches up
                    time.sleep(0.001)

    threads = [threading.Thread(target=reader), threading.Thread(target=producer)]
    for t in threads:
        t.start()
    acked = 0
    deadline = time.monotonic() + 30
    while acked < 399 and time.monotonic() < deadline:
        if inputs(plc)[0] & S.RESULT_VALID:
            control(plc, mm.RESULT_ACK)
            control(plc, 0)
            acked += 1
    stop.set()
    for t in threads:
        t.join(10)
    assert acked == 399 and reads[0] > 100
    assert not problems, problems[:5]


def test_read_only_registers_and_unknown_units_are_refused(plc: ModbusTcpClient) -> None:
    answer = plc.write_register(mm.MIRROR + mm.IR_RESULT_ID, 5, device_id=1)
    assert answer.isError() and answer.exception_code == 2
    answer = plc.write_registers(mm.HR_ARG0, [1, 2, 3, 4], device_id=1)  # runs past the writable block
    assert answer.isError() and answer.exception_code == 2
    assert plc.read_coils(0, count=1, device_id=1).exception_code == 1
    assert plc.read_input_registers(0, count=1, device_id=9).exception_code == 0x0B
    assert plc.read_holding_registers(mm.MIRROR, count=mm.IR_COUNT, device_id=2).registers[mm.IR_RESULT_ID] == 0


def test_refused_triggers_set_error_code_and_cause(plant: Plant, plc: ModbusTcpClient) -> None:
    wait_bits(plc, on=S.READY)
    control(plc, mm.TRIGGER)  # TriggerEnable is off
    regs = wait_bits(plc, on=S.ERROR)
    assert (regs[mm.IR_ERROR_CODE], regs[mm.IR_ERROR_CAUSE]) == (mm.ErrorCode.TRIGGER_DISABLED, 1)
    assert plant.triggers == []

    def refuse() -> bool:
        raise ConfigError("camera 'cam1' is free-running")

    cases = ((refuse, mm.ErrorCode.TRIGGER_REFUSED), (lambda: False, mm.ErrorCode.TRIGGER_OVERRUN))
    for trigger_id, (answer, code) in enumerate(cases, start=2):
        control(plc, mm.CLEAR_ERROR)
        wait_bits(plc, off=S.ERROR)
        plant.trigger_answer = answer
        control(plc, EN | mm.TRIGGER)
        regs = wait_bits(plc, on=S.ERROR, off=S.TRIGGER_ACK | S.BUSY)
        assert (regs[mm.IR_ERROR_CODE], regs[mm.IR_ERROR_CAUSE]) == (code, trigger_id)
        assert plant.triggers[-1] == ("cam1", str(trigger_id))
        control(plc, EN)


def test_error_results_read_as_verdict_3_with_error(output: ModbusPublisher, plc: ModbusTcpClient) -> None:
    output.publish(inspection(trigger_id="5", verdict="error", score=None))
    regs = wait_bits(plc, on=S.RESULT_VALID | S.ERROR)
    assert regs[mm.IR_VERDICT] == 3 and regs[mm.IR_ERROR_CODE] == mm.ErrorCode.INSPECTION_ERROR
    assert regs[mm.IR_RESULT_ID] == 5 and regs[mm.IR_SCORE_X1000] == 0


@pytest.mark.parametrize(("code", "args", "request_", "status"), [
    (mm.Command.THRESHOLD, [620, 0], {"cmd": "threshold", "camera": "cam1", "value": 0.62}, 0),
    (mm.Command.THRESHOLD, [0xFFFF, 0], {"cmd": "threshold", "camera": "cam1", "value": None}, 0),
    (mm.Command.DISABLE, [0, 0], {"cmd": "enable", "camera": "cam1", "enabled": False}, 0),
    (mm.Command.BUNDLE_SLOT, [9, 0], {"cmd": "bundle", "camera": "cam1", "slot": 9}, mm.ErrorCode.COMMAND_FAILED),
    (99, [0, 0], None, mm.ErrorCode.UNKNOWN_COMMAND),
])
def test_commands_run_on_the_daemon_and_are_echoed(plant: Plant, plc: ModbusTcpClient, code: int, args: list[int],
                                                   request_: dict[str, Any] | None, status: int) -> None:
    assert not plc.write_registers(mm.HR_ARG0, args, device_id=1).isError()
    assert not plc.write_register(mm.HR_COMMAND, code, device_id=1).isError()
    deadline = time.monotonic() + 5
    while inputs(plc)[mm.IR_COMMAND_DONE] != code:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert inputs(plc)[mm.IR_COMMAND_STATUS] == status
    sent = [{k: v for k, v in c.items() if k != "who"} for c in plant.commands]
    assert sent == ([request_] if request_ else [])
    assert not plc.write_register(mm.HR_COMMAND, 0, device_id=1).isError()
    assert inputs(plc)[mm.IR_COMMAND_DONE] == 0


def test_ready_follows_health_and_close(plant: Plant, output: ModbusPublisher, plc: ModbusTcpClient) -> None:
    wait_bits(plc, on=S.READY, unit=2)
    plant.cameras["cam2"]["state"] = "lost"
    wait_bits(plc, off=S.READY, unit=2)
    wait_bits(plc, on=S.READY, unit=1)
    plant.healthy = False
    wait_bits(plc, off=S.READY, unit=1)
    beat = inputs(plc)[mm.IR_HEARTBEAT]
    plc.write_register(mm.HR_PLC_HEARTBEAT, 1, device_id=1)
    deadline = time.monotonic() + 5.0  # the appliance's heartbeat ticks every heartbeat_s (1 s)
    while inputs(plc)[mm.IR_HEARTBEAT] == beat:
        assert time.monotonic() < deadline, "the appliance heartbeat did not change"
        time.sleep(0.05)
    assert output.state()["cameras"]["cam1"]["plc_heartbeat_age_s"] is not None
    assert output.state()["cameras"]["cam2"]["plc_heartbeat_stale"]
    output.close()
    plc.close()
    with pytest.raises((ModbusException, ConnectionError, OSError)):
        if not plc.connect():
            raise ConnectionError("refused")
        plc.read_input_registers(0, count=1, device_id=1)


def test_clients_outside_allow_are_disconnected_and_counted(tmp_path: Path, plant: Plant) -> None:
    out = start_output(tmp_path, plant, allow=["10.9.9.9/32"])
    try:
        client = ModbusTcpClient("127.0.0.1", port=out.port, timeout=1, retries=0)
        client.connect()
        with pytest.raises((ModbusException, ConnectionError)):
            answer = client.read_input_registers(0, count=1, device_id=1)
            if answer.isError():
                raise ModbusException("error answer")
        client.close()
        assert out.state()["refused_clients"] >= 1 and out.state()["requests"] == 0
    finally:
        out.close()


def test_config_rejects_bad_networks_and_shared_units() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        ModbusConfig(cameras={"cam1": 1}, allow=["plc.local"])
    with pytest.raises(ValueError, match="own unit id"):
        ModbusConfig(cameras={"cam1": 1, "cam2": 1})
    with pytest.raises(ValueError, match=r"greater than or equal to 8"):
        ModbusConfig(cameras={"cam1": 1}, buffer=4)


def test_doctor_check_sees_a_taken_port_and_our_server(tmp_path: Path, output: ModbusPublisher) -> None:
    status, detail = ModbusPublisher.check(ModbusConfig(cameras={"cam1": 1}, port=output.port), tmp_path)
    assert status == "ok" and "answers" in detail
    status, detail = ModbusPublisher.check(ModbusConfig(cameras={"cam1": 1}, port=0, allow=["0.0.0.0/0"]), tmp_path)
    assert status == "warn" and "any client" in detail


@pytest.fixture
def raw(output: ModbusPublisher) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", output.port), timeout=3)
    yield sock
    sock.close()


def exception_answer(tid: int, unit: int, function_code: int, code: int) -> bytes:
    return mbap(tid, bytes([function_code | 0x80, code]), unit=unit)


def test_every_undocumented_function_code_answers_exception_1(output: ModbusPublisher, raw: socket.socket,
                                                              plc: ModbusTcpClient,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Each code 1..127 but 3, 4, 6, 16, 23, with any body and unit: ``fc | 0x80``, exception 1, nothing logged."""
    caplog.set_level(logging.WARNING, logger="pymodbus")
    rng = random.Random(7)
    refused = [fc for fc in range(1, 128) if fc not in FUNCTION_CODES]
    tid = 0
    for fc in refused:
        for unit, body in ((1, b""), (2, b"\x00\x00\x00\x01"), (9, rng.randbytes(20)), (0, rng.randbytes(3))):
            tid += 1
            assert exchange(raw, mbap(tid, bytes([fc]) + body, unit=unit)) == exception_answer(tid, unit, fc, 1), fc
    assert exchange(raw, mbap(4242, b"\x41\x00\x01")) == bytes.fromhex("109200000003" "01" "c1" "01")
    state = output.state()
    assert len(refused) == 122 and state["refused_function_codes"] == tid + 1
    assert state["requests"] == 0 and state["malformed_frames"] == 0
    assert inputs(plc)[0] & S.READY  # the same server still serves a PLC
    assert not [r for r in caplog.records if r.name.startswith("pymodbus")]


@pytest.mark.parametrize("sub", [0x0000, 0x0004, 0x1234, 0xFFFF], ids=["echo", "listen-only", "bogus", "ffff"])
def test_diagnostics_are_refused_and_reads_go_on(raw: socket.socket, output: ModbusPublisher, sub: int,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """FC 8 neither echoes nor goes listen-only: exception 1, and FC 3 is answered on the same connection."""
    caplog.set_level(logging.WARNING, logger="pymodbus")
    pdu = struct.pack(">BHH", 8, sub, 0xA55A)
    assert exchange(raw, mbap(77, pdu, unit=1)) == exception_answer(77, 1, 8, 1)
    assert exchange(raw, mbap(78, pdu, unit=1)) == exception_answer(78, 1, 8, 1)  # not listen-only now
    answer = exchange(raw, mbap(79, struct.pack(">BHH", 3, mm.MIRROR, 2), unit=1))
    assert answer[:9] == mbap(79, b"\x03\x04\x00\x00\x00\x00", unit=1)[:9] and len(answer) == 13
    assert output.state()["refused_function_codes"] == 2
    assert not [r for r in caplog.records if r.name.startswith("pymodbus")]  # no traceback, no line per frame


@pytest.mark.parametrize("pdu", [
    struct.pack(">BHH", 3, 0, 0),  # count 0
    struct.pack(">BHH", 4, 0, 126),  # count above Modbus' 125
    b"\x03\x00",  # fields missing
    b"\x06\x00\x00\x01",
    b"\x10\x00",
    struct.pack(">BHHHHB", 23, 0, 1, 0, 0, 0),  # write count 0
], ids=["fc3-count-0", "fc4-count-126", "fc3-short", "fc6-short", "fc16-short", "fc23-write-0"])
def test_documented_codes_with_bad_fields_answer_exception_3(raw: socket.socket, output: ModbusPublisher,
                                                             pdu: bytes) -> None:
    assert exchange(raw, mbap(5, pdu, unit=2)) == exception_answer(5, 2, pdu[0], 3)
    assert output.state()["malformed_frames"] == 1
    answer = exchange(raw, mbap(6, struct.pack(">BHH", 4, 0, 1), unit=2))
    assert answer[7:9] == b"\x04\x02"


def test_trigger_ids_continue_across_restarts(tmp_path: Path, plant: Plant) -> None:
    """The last TriggerID per camera is kept in the state folder; the next run continues after it."""
    for run, want in enumerate(([1, 2, 3], [4, 5]), start=1):
        out = start_output(tmp_path, plant)
        client = ModbusTcpClient("127.0.0.1", port=out.port, timeout=3, retries=0)
        try:
            assert client.connect()
            wait_bits(client, on=S.READY)
            assert [trigger_once(client) for _ in want] == want, f"run {run}"
            assert trigger_once(client, unit=2) == run  # each camera counts on its own
        finally:
            client.close()
            out.close()
    assert json.loads((tmp_path / TRIGGER_IDS_FILE).read_text()) == {"cam1": 5, "cam2": 2}
    assert [t for t in plant.triggers if t[0] == "cam1"] == [("cam1", str(n)) for n in range(1, 6)]


def test_trigger_ids_wrap_and_an_unreadable_file_starts_again(tmp_path: Path, plant: Plant,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / TRIGGER_IDS_FILE).write_text(json.dumps({"cam1": 65535, "gone": 9}))
    out = start_output(tmp_path, plant)
    client = ModbusTcpClient("127.0.0.1", port=out.port, timeout=3, retries=0)
    try:
        assert client.connect()
        wait_bits(client, on=S.READY)
        assert [trigger_once(client) for _ in range(2)] == [0, 1]  # wraps 65535 -> 0, as documented
    finally:
        client.close()
        out.close()
    assert json.loads((tmp_path / TRIGGER_IDS_FILE).read_text()) == {"cam1": 1, "gone": 9}
    (tmp_path / TRIGGER_IDS_FILE).write_text("{not json")
    out = start_output(tmp_path, plant)
    try:
        assert out.maps[1].next_trigger_id == 0 and "unreadable" in caplog.text
    finally:
        out.close()


def test_a_trigger_id_file_that_cannot_be_written_does_not_stop_triggering(
        tmp_path: Path, plant: Plant, caplog: pytest.LogCaptureFixture) -> None:
    out = start_output(tmp_path / "no-such-folder", plant)
    client = ModbusTcpClient("127.0.0.1", port=out.port, timeout=3, retries=0)
    try:
        assert client.connect()
        wait_bits(client, on=S.READY)
        with caplog.at_level(logging.WARNING, logger="appliance.daemon.publishers.modbus"):
            assert [trigger_once(client) for _ in range(3)] == [1, 2, 3]
        assert plant.triggers == [("cam1", "1"), ("cam1", "2"), ("cam1", "3")]
        assert out.state()["trigger_id_write_errors"] == 3
        assert len([r for r in caplog.records if "cannot keep the last TriggerID" in r.message]) == 1  # rate-limited
    finally:
        client.close()
        out.close()


def test_disk_low_alarm_holds_error_8_until_the_disk_recovers(plant: Plant, output: ModbusPublisher,
                                                              plc: ModbusTcpClient) -> None:
    """A daemon alarm: Error with code 8 on every unit; ClearError does not clear it; results still flow."""
    wait_bits(plc, on=S.READY)
    plant.alarms = [{"kind": "disk_low", "detail": "/var/lib: 80 MB free, floor 200 MB", "since": time.time()}]
    for unit in (1, 2):
        regs = wait_bits(plc, on=S.ERROR | S.READY, unit=unit)
        assert (regs[mm.IR_ERROR_CODE], regs[mm.IR_ERROR_CAUSE]) == (mm.ErrorCode.DISK_LOW, 0)
    control(plc, mm.CLEAR_ERROR)
    regs = inputs(plc)
    assert regs[0] & S.ERROR and regs[mm.IR_ERROR_CODE] == mm.ErrorCode.DISK_LOW
    control(plc, 0)
    output.publish(inspection(trigger_id="3", verdict="ng", score=0.9))
    regs = wait_bits(plc, on=S.RESULT_VALID | S.ERROR)
    assert regs[mm.IR_RESULT_ID] == 3 and regs[mm.IR_VERDICT] == 2
    plant.alarms = []
    for unit in (1, 2):
        regs = wait_bits(plc, off=S.ERROR, unit=unit)
        assert regs[mm.IR_ERROR_CODE] == 0
