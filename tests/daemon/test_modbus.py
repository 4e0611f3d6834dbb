"""The Modbus output against a real pymodbus client playing the PLC.

The daemon's side is a small stand-in (``Plant``, plc.py): its asyncio loop on a thread, a
status snapshot the test controls, and the triggers and control commands it was asked for.
The real daemon is driven in test_plc_e2e.py.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from plc import EN, Plant, S, control, inputs, inspection, score_of, wait_bits
from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

from appliance.daemon import modbus_map as mm
from appliance.daemon.publishers.modbus import ModbusConfig, ModbusPublisher
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
    time.sleep(1.3)
    assert inputs(plc)[mm.IR_HEARTBEAT] != beat
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
