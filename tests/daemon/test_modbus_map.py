"""The register map's handshake as a pure state machine: edges, buffer, overrun, refusals."""

from __future__ import annotations

import struct
import zlib

from appliance.daemon import modbus_map as mm
from appliance.daemon.modbus_map import CameraMap, Exc, Result, Status, TriggerAction, Verdict


def result(rid: int, verdict: Verdict = Verdict.OK, score: float = 0.25) -> Result:
    return Result(rid, verdict, score, 12.0, "model-a", str(rid))


def ready_map(depth: int = 8) -> CameraMap:
    cam = CameraMap(depth)
    cam.set_health(True, True, True, "model-a", 0.5)
    return cam


def bit(cam: CameraMap, flag: Status) -> bool:
    return bool(cam.inputs[mm.IR_STATUS] & flag)


def test_trigger_fires_on_the_rising_edge_only() -> None:
    cam = ready_map()
    assert cam.write(6, mm.HR_CONTROL, [mm.TRIGGER_ENABLE]) == []
    assert cam.write(6, mm.HR_CONTROL, [mm.TRIGGER_ENABLE | mm.TRIGGER]) == [TriggerAction(1)]
    assert cam.write(6, mm.HR_CONTROL, [mm.TRIGGER_ENABLE | mm.TRIGGER]) == []  # still high: no new trigger
    cam.trigger_answered(1, True)
    assert bit(cam, Status.TRIGGER_ACK) and bit(cam, Status.BUSY)
    cam.write(6, mm.HR_CONTROL, [mm.TRIGGER_ENABLE])
    assert not bit(cam, Status.TRIGGER_ACK)
    assert cam.write(6, mm.HR_CONTROL, [mm.TRIGGER_ENABLE | mm.TRIGGER]) == [TriggerAction(2)]


def test_refused_triggers_raise_error_with_code_and_cause_until_clear_error() -> None:
    cam = ready_map()
    assert cam.write(6, mm.HR_CONTROL, [mm.TRIGGER]) == []  # TriggerEnable off
    assert bit(cam, Status.ERROR) and cam.inputs[mm.IR_ERROR_CODE] == 1 and cam.inputs[mm.IR_ERROR_CAUSE] == 1
    cam.write(6, mm.HR_CONTROL, [mm.CLEAR_ERROR])
    assert not bit(cam, Status.ERROR) and cam.inputs[mm.IR_ERROR_CODE] == 0
    cam.set_health(False, True, True)
    assert cam.write(6, mm.HR_CONTROL, [mm.TRIGGER_ENABLE | mm.TRIGGER]) == []  # not ready
    assert cam.inputs[mm.IR_ERROR_CODE] == 2


def test_results_are_released_one_by_one_by_result_ack() -> None:
    cam = ready_map()
    for rid in (7, 8):
        assert cam.add_result(result(rid))
    assert bit(cam, Status.RESULT_VALID) and cam.inputs[mm.IR_RESULT_ID] == 7 and cam.inputs[mm.IR_BUFFERED] == 2
    toggle = bit(cam, Status.RESULT_TOGGLE)
    cam.write(6, mm.HR_CONTROL, [mm.RESULT_ACK])
    assert not bit(cam, Status.RESULT_VALID) and cam.inputs[mm.IR_BUFFERED] == 1
    assert cam.inputs[mm.IR_RESULT_ID] == 7  # the next one waits until ResultAck is low again
    cam.write(6, mm.HR_CONTROL, [0])
    assert bit(cam, Status.RESULT_VALID) and cam.inputs[mm.IR_RESULT_ID] == 8
    assert bit(cam, Status.RESULT_TOGGLE) != toggle


def test_a_full_buffer_drops_the_newest_and_flags_overrun() -> None:
    cam = ready_map(depth=8)
    kept = [cam.add_result(result(rid)) for rid in range(1, 11)]
    assert kept == [True] * 8 + [False] * 2
    assert bit(cam, Status.BUFFER_OVERRUN) and cam.overruns == 2 and cam.inputs[mm.IR_BUFFERED] == 8
    seen = []
    for _ in range(8):
        seen.append(cam.inputs[mm.IR_RESULT_ID])
        cam.write(6, mm.HR_CONTROL, [mm.RESULT_ACK])
        cam.write(6, mm.HR_CONTROL, [0])
    assert seen == list(range(1, 9))
    cam.write(6, mm.HR_CONTROL, [mm.CLEAR_ERROR])
    assert not bit(cam, Status.BUFFER_OVERRUN)


def test_result_registers_encode_score_model_and_verdict() -> None:
    cam = ready_map()
    cam.add_result(Result(3, Verdict.NG, 0.5, 41.6, "model-a"))
    regs = cam.inputs
    assert (regs[mm.IR_SCORE_HI], regs[mm.IR_SCORE_LO]) == (0x3F00, 0x0000)  # 0.5 in IEEE-754, high word first
    assert regs[mm.IR_SCORE_X1000] == 500 and regs[mm.IR_TIME_MS] == 42 and regs[mm.IR_VERDICT] == 2
    assert (regs[mm.IR_MODEL_HI] << 16 | regs[mm.IR_MODEL_LO]) == zlib.crc32(b"model-a")  # the documented hash
    hi, lo = mm.float_words(0.731)
    assert abs(struct.unpack(">f", struct.pack(">HH", hi, lo))[0] - 0.731) < 1e-6


def test_error_results_read_as_verdict_3_with_the_error_bit() -> None:
    cam = ready_map()
    cam.add_result(Result(4, Verdict.ERROR, None, None, None, "4"))
    assert cam.inputs[mm.IR_VERDICT] == 3 and bit(cam, Status.ERROR)
    assert cam.inputs[mm.IR_ERROR_CODE] == mm.ErrorCode.INSPECTION_ERROR and cam.inputs[mm.IR_ERROR_CAUSE] == 4
    assert cam.inputs[mm.IR_SCORE_X1000] == 0


def test_writes_outside_the_control_block_change_nothing() -> None:
    cam = ready_map()
    before = list(cam.holding)
    assert cam.write(16, mm.HR_ARG0, [1, 2, 3, 4]) == Exc.ILLEGAL_ADDRESS  # runs past the writable block
    assert cam.write(6, mm.MIRROR, [1]) == Exc.ILLEGAL_ADDRESS
    assert cam.write(5, 0, [1]) == Exc.ILLEGAL_FUNCTION  # FC5 writes a coil: there are none
    assert cam.holding == before
    assert cam.read(4, 0, mm.IR_COUNT + 1) == Exc.ILLEGAL_ADDRESS
    assert cam.read(3, mm.MIRROR, mm.IR_COUNT) == cam.inputs


def test_commands_are_acted_on_when_the_code_is_written_and_echoed_when_done() -> None:
    cam = ready_map()
    actions = cam.write(16, mm.HR_COMMAND, [mm.Command.THRESHOLD, 620])
    assert actions == [mm.CommandAction(4, (620, 0))]
    cam.command_done(4)
    assert cam.inputs[mm.IR_COMMAND_DONE] == 4 and cam.inputs[mm.IR_COMMAND_STATUS] == 0
    assert cam.write(6, mm.HR_COMMAND, [0]) == [] and cam.inputs[mm.IR_COMMAND_DONE] == 0


def test_result_ids_follow_the_trigger_id_else_the_frame_counter() -> None:
    assert mm.result_id_for("65537", 5) == 1
    assert mm.result_id_for("ctl-7", 70000) == 70000 - 65536
    assert mm.result_id_for(None, 3) == 3


def test_trigger_ids_go_on_from_the_last_one_and_wrap() -> None:
    cam = ready_map()
    cam.next_trigger_id = 65534  # what the output restores from the last run
    ids = []
    for _ in range(3):
        ids += [a.trigger_id for a in cam.write(6, mm.HR_CONTROL, [mm.TRIGGER_ENABLE | mm.TRIGGER])]
        cam.write(6, mm.HR_CONTROL, [mm.TRIGGER_ENABLE])
    assert ids == [65535, 0, 1]


def test_disk_low_is_an_alarm_clear_error_does_not_clear() -> None:
    cam = ready_map()
    cam.set_alarm(mm.ErrorCode.DISK_LOW)
    assert bit(cam, Status.ERROR) and cam.inputs[mm.IR_ERROR_CODE] == mm.ErrorCode.DISK_LOW
    cam.write(6, mm.HR_CONTROL, [mm.CLEAR_ERROR])
    assert bit(cam, Status.ERROR) and cam.inputs[mm.IR_ERROR_CODE] == mm.ErrorCode.DISK_LOW
    assert cam.add_result(result(3)) and bit(cam, Status.RESULT_VALID) and bit(cam, Status.READY)  # results flow
    cam.set_alarm(None)
    assert not bit(cam, Status.ERROR) and cam.inputs[mm.IR_ERROR_CODE] == 0


def test_an_inspection_error_during_the_alarm_stays_latched_after_it() -> None:
    cam = ready_map()
    cam.set_alarm(mm.ErrorCode.DISK_LOW)
    cam.add_result(Result(4, Verdict.ERROR, None, None, None, "4"))
    cam.set_alarm(None)
    assert bit(cam, Status.ERROR) and cam.inputs[mm.IR_ERROR_CODE] == mm.ErrorCode.INSPECTION_ERROR
    cam.write(6, mm.HR_CONTROL, [mm.CLEAR_ERROR])
    assert not bit(cam, Status.ERROR)


def test_only_the_documented_function_codes_reach_the_registers() -> None:
    cam = ready_map()
    assert cam.read(22, 0, 1) == Exc.ILLEGAL_FUNCTION and cam.read(1, 0, 1) == Exc.ILLEGAL_FUNCTION
    assert cam.write(22, 0, [1]) == Exc.ILLEGAL_FUNCTION
