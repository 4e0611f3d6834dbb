"""The Modbus register map of one camera and its PLC handshake, as a pure state machine (no I/O).

Modelled on the handshakes of vision sensors (Cognex In-Sight, Keyence IV, MVTec MERLIC): the PLC
writes control bits into holding registers, the appliance answers in input registers (mirrored
into holding registers at ``MIRROR`` for PLCs that read holding registers only). Writes return
``Action`` objects (a trigger, a command) that the Modbus output carries out on the daemon and
reports back; nothing here blocks or talks to the network. docs/modbus-register-map.md is the
table a PLC programmer works from; the constants below are its source.
"""

from __future__ import annotations

import collections
import math
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

# ---------------------------------------------------------------- addresses (0-based, per unit id)
# Holding registers written by the PLC.
HR_CONTROL, HR_COMMAND, HR_ARG0, HR_ARG1, HR_PLC_HEARTBEAT = range(5)
HR_WRITABLE = 5
#: Input registers 0..IR_COUNT-1 are also holding registers MIRROR.. (read-only there).
MIRROR = 100

# Control bits (HR_CONTROL).
TRIGGER_ENABLE, TRIGGER, RESULT_ACK, CLEAR_ERROR = 1, 2, 4, 8

# Input registers written by the appliance.
(IR_STATUS, IR_TRIGGER_ID, IR_RESULT_ID, IR_VERDICT, IR_SCORE_HI, IR_SCORE_LO, IR_SCORE_X1000, IR_TIME_MS,
 IR_MODEL_HI, IR_MODEL_LO, IR_ERROR_CODE, IR_ERROR_CAUSE, IR_HEARTBEAT, IR_BUFFERED, IR_COMMAND_DONE,
 IR_COMMAND_STATUS, IR_THRESHOLD_X1000) = range(17)
IR_COUNT = 17
#: The registers of one result: they change together, in one step.
RESULT_REGISTERS = range(IR_RESULT_ID, IR_MODEL_LO + 1)


class Status(IntEnum):
    """Bits of ``IR_STATUS``."""

    READY = 1
    BUSY = 2
    TRIGGER_ACK = 4
    RESULT_VALID = 8
    RESULT_TOGGLE = 16
    BUFFER_OVERRUN = 32
    ERROR = 64
    MODEL_LOADED = 128
    DRIFT = 256  # the camera's drift watch has raised a drift (see docs/daemon.md)
    TRIGGER_ENABLED = 512
    INSPECTION_ENABLED = 1024


class Verdict(IntEnum):
    """``IR_VERDICT``: a PLC must never read an error (3) or nothing (0) as OK."""

    NONE = 0
    OK = 1
    NG = 2
    ERROR = 3


class ErrorCode(IntEnum):
    """``IR_ERROR_CODE`` (``IR_ERROR_CAUSE`` names the trigger, result or command concerned)."""

    NONE = 0
    TRIGGER_DISABLED = 1  # Trigger rose while TriggerEnable was 0
    NOT_READY = 2  # Trigger rose while Ready was 0
    TRIGGER_REFUSED = 3  # the camera refused it: free-running or inspection disabled
    TRIGGER_OVERRUN = 4  # too many triggers waiting for the camera
    INSPECTION_ERROR = 5  # a result with verdict 3 (no image, camera lost, ...)
    UNKNOWN_COMMAND = 6
    COMMAND_FAILED = 7  # the daemon refused the command (bad slot, bad threshold, ...)
    DISK_LOW = 8  # an alarm, not an event: the Error bit stays set while the disk is below its floor


class Command(IntEnum):
    """``HR_COMMAND`` codes; arguments in ``HR_ARG0``/``HR_ARG1``."""

    ENABLE = 1  # inspect again
    DISABLE = 2  # triggers refused, free-run frames not inspected
    BUNDLE_SLOT = 3  # ARG0: slot number configured in the camera's `slots`
    THRESHOLD = 4  # ARG0: threshold x1000 (500 = 0.5); 65535 clears the operator threshold
    LABEL = 5  # ARG0: a ResultID of the last 256 results; ARG1: 1 good (a false reject), 2 defect
    UNLABEL = 6  # ARG0: a ResultID of the last 256 results: undo its label


class Exc(IntEnum):
    """Modbus exception codes the map answers with."""

    ILLEGAL_FUNCTION = 1
    ILLEGAL_ADDRESS = 2
    ILLEGAL_VALUE = 3


@dataclass(frozen=True)
class Result:
    """What the PLC sees of one inspection."""

    result_id: int
    verdict: Verdict
    score: float | None
    time_ms: float | None
    model_id: str | None
    trigger_id: str | None = None


@dataclass(frozen=True)
class TriggerAction:
    """The PLC asked for one frame: ``trigger_id`` goes to ``context.trigger`` as ``str(trigger_id)``."""

    trigger_id: int


@dataclass(frozen=True)
class CommandAction:
    """The PLC asked for a command (``code`` may be unknown: the output reports it)."""

    code: int
    args: tuple[int, int]


Action = TriggerAction | CommandAction


def float_words(value: float) -> tuple[int, int]:
    """IEEE-754 float32 as two registers, high word first (big-endian, "ABCD")."""
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return hi, lo


def model_hash(model_id: str | None) -> int:
    """The model id as a 32-bit number for the PLC: CRC-32 of its UTF-8 text (0: no model)."""
    return zlib.crc32(model_id.encode()) if model_id else 0


def result_id_for(trigger_id: str | None, seq: int) -> int:
    """A result's id: the TriggerID that asked for it, else the camera's frame counter, both mod 2^16."""
    if trigger_id is not None and trigger_id.isdecimal():
        return int(trigger_id) & 0xFFFF
    return seq & 0xFFFF


def _u16(value: float) -> int:
    return 0 if not math.isfinite(value) else max(0, min(0xFFFF, round(value)))


class CameraMap:
    """One camera's registers (one Modbus unit id) and the handshake around them.

    Results wait in a buffer of ``depth`` (the one shown included); ResultAck (rising edge)
    retires the shown one and the next appears once ResultAck is low again, so the PLC always
    sees ResultValid drop between two results. A result arriving at a full buffer is dropped
    (the newest: the PLC keeps an unbroken sequence of the ones it has) and BufferOverrun is
    set until ClearError; the audit log still holds it.
    """

    def __init__(self, depth: int = 8) -> None:
        if depth < 1:
            raise ValueError(f"buffer depth must be at least 1, got {depth}")
        self.depth = depth
        self.holding = [0] * HR_WRITABLE
        self.inputs = [0] * IR_COUNT
        self.buffer: collections.deque[Result] = collections.deque()
        self.outstanding: set[int] = set()  # accepted triggers without a result yet
        self.next_trigger_id = 0  # the last TriggerID taken; the output restores it at start (ids go on across runs)
        self.overruns = 0
        self.ready = False
        self.alarm: ErrorCode | None = None  # a condition the Error bit shows while it lasts (DISK_LOW)
        self.plc_heartbeat_changes = 0

    # ------------------------------------------------------------ PLC side
    def read(self, function_code: int, address: int, count: int) -> list[int] | Exc:
        """Registers for FC3 (holding, incl. the mirror) or FC4 (input); an exception code otherwise."""
        if function_code == 4:
            area, start = self.inputs, address
        elif function_code in (3, 6, 16, 23):  # 6, 16: pymodbus reads back what was written
            if address >= MIRROR:
                area, start = self.inputs, address - MIRROR
            else:
                area, start = self.holding, address
        else:
            return Exc.ILLEGAL_FUNCTION
        if count < 1 or start < 0 or start + count > len(area):
            return Exc.ILLEGAL_ADDRESS
        return area[start:start + count]

    def write(self, function_code: int, address: int, values: list[int]) -> list[Action] | Exc:
        """Apply a PLC write (FC6/16/23) to the holding registers; returns the actions it asks for.

        Only ``HR_CONTROL``..``HR_PLC_HEARTBEAT`` are writable; a write touching anything else
        is refused whole (ILLEGAL_ADDRESS) and changes nothing.
        """
        if function_code not in (6, 16, 23):
            return Exc.ILLEGAL_FUNCTION
        if not values or address < 0 or address + len(values) > HR_WRITABLE:
            return Exc.ILLEGAL_ADDRESS
        if any(not 0 <= v <= 0xFFFF for v in values):
            return Exc.ILLEGAL_VALUE
        before = list(self.holding)
        self.holding[address:address + len(values)] = values
        actions: list[Action] = []
        if before[HR_PLC_HEARTBEAT] != self.holding[HR_PLC_HEARTBEAT]:
            self.plc_heartbeat_changes += 1
        if address <= HR_COMMAND < address + len(values):
            actions += self._command_written(self.holding[HR_COMMAND])
        actions += self._control_changed(before[HR_CONTROL], self.holding[HR_CONTROL])
        return actions

    def _command_written(self, code: int) -> list[Action]:
        self.inputs[IR_COMMAND_DONE] = 0
        self.inputs[IR_COMMAND_STATUS] = 0
        if code == 0:  # the PLC clears the command before the next one
            return []
        return [CommandAction(code, (self.holding[HR_ARG0], self.holding[HR_ARG1]))]

    def _control_changed(self, old: int, new: int) -> list[Action]:
        rose, fell = new & ~old, old & ~new
        self._set(Status.TRIGGER_ENABLED, bool(new & TRIGGER_ENABLE))
        if rose & CLEAR_ERROR:
            self.inputs[IR_ERROR_CODE] = self.inputs[IR_ERROR_CAUSE] = 0
            self._set(Status.ERROR, False)
            self._set(Status.BUFFER_OVERRUN, False)
            if self.alarm is not None:  # an alarm is not cleared by acknowledging it: only by its cause going
                self.error(self.alarm, 0)
        if fell & TRIGGER:
            self._set(Status.TRIGGER_ACK, False)
        if rose & RESULT_ACK and self.buffer and self._has(Status.RESULT_VALID):
            self.buffer.popleft()
            self._set(Status.RESULT_VALID, False)
        if fell & RESULT_ACK:
            self._show_next()
        actions: list[Action] = []
        if rose & TRIGGER:
            self.next_trigger_id = (self.next_trigger_id + 1) & 0xFFFF
            tid = self.next_trigger_id
            if not new & TRIGGER_ENABLE:
                self.error(ErrorCode.TRIGGER_DISABLED, tid)
            elif not self.ready:
                self.error(ErrorCode.NOT_READY, tid)
            else:
                actions.append(TriggerAction(tid))
        self._update_counts()
        return actions

    # ------------------------------------------------------------ appliance side
    def trigger_answered(self, trigger_id: int, accepted: bool, code: ErrorCode = ErrorCode.TRIGGER_REFUSED) -> None:
        """The camera took the trigger (TriggerAck, Busy) or refused it (Error, ``code``)."""
        if accepted:
            self.inputs[IR_TRIGGER_ID] = trigger_id
            self.outstanding.add(trigger_id)
            self._set(Status.TRIGGER_ACK, True)
        else:
            self.error(code, trigger_id)
        self._update_counts()

    def add_result(self, result: Result) -> bool:
        """Buffer a result (shown at once if nothing is); False if the buffer was full and it was dropped."""
        if result.trigger_id is not None and result.trigger_id.isdecimal():
            self.outstanding.discard(int(result.trigger_id))
        if result.verdict == Verdict.ERROR:
            self.error(ErrorCode.INSPECTION_ERROR, result.result_id)
        kept = len(self.buffer) < self.depth
        if kept:
            self.buffer.append(result)
        else:
            self.overruns += 1
            self._set(Status.BUFFER_OVERRUN, True)
        if not self._has(Status.RESULT_VALID) and not self.holding[HR_CONTROL] & RESULT_ACK:
            self._show_next()
        self._update_counts()
        return kept

    def command_done(self, code: int, error: ErrorCode = ErrorCode.NONE) -> None:
        """A command finished: CommandDone echoes its code, CommandStatus 0 or the error code."""
        if self.holding[HR_COMMAND] != code:  # the PLC moved on (wrote 0 or another command) meanwhile
            return
        self.inputs[IR_COMMAND_DONE] = code
        self.inputs[IR_COMMAND_STATUS] = int(error)
        if error:
            self.error(error, code)

    def set_health(self, ready: bool, model_loaded: bool, enabled: bool, model_id: str | None = None,
                   threshold: float | None = None) -> None:
        """The camera's state as the daemon reports it (Ready drops on a stall, a stop, a lost camera)."""
        self.ready = ready
        self._set(Status.READY, ready)
        self._set(Status.MODEL_LOADED, model_loaded)
        self._set(Status.INSPECTION_ENABLED, enabled)
        if threshold is not None:
            self.inputs[IR_THRESHOLD_X1000] = _u16(threshold * 1000)
        self._update_counts()

    def set_alarm(self, code: ErrorCode | None) -> None:
        """Raise (Error bit with ``code``) or clear a lasting condition such as ``DISK_LOW``.

        Clearing drops the Error bit only when the alarm is the error shown; a latched event
        error (an inspection error) stays until ClearError.
        """
        if code == self.alarm:
            return
        before, self.alarm = self.alarm, code
        if code is not None:
            self.error(code, 0)
        elif before is not None and self.inputs[IR_ERROR_CODE] == int(before):
            self.inputs[IR_ERROR_CODE] = self.inputs[IR_ERROR_CAUSE] = 0
            self._set(Status.ERROR, False)

    def set_drift(self, raised: bool) -> None:
        """The Drift bit follows the camera's drift alarm (raised and cleared by the drift watch's hysteresis)."""
        self._set(Status.DRIFT, raised)

    def beat(self) -> None:
        """The appliance's heartbeat counter (the PLC watches it change)."""
        self.inputs[IR_HEARTBEAT] = (self.inputs[IR_HEARTBEAT] + 1) & 0xFFFF

    def error(self, code: ErrorCode, cause: int) -> None:
        """Raise the Error bit with a code and the id concerned (until ClearError)."""
        self.inputs[IR_ERROR_CODE] = int(code)
        self.inputs[IR_ERROR_CAUSE] = cause & 0xFFFF
        self._set(Status.ERROR, True)

    # ------------------------------------------------------------ internals
    def _show_next(self) -> None:
        if self._has(Status.RESULT_VALID) or not self.buffer:
            return
        r = self.buffer[0]
        score = r.score if r.score is not None and math.isfinite(r.score) else None
        hi, lo = float_words(score if score is not None else 0.0)
        model = model_hash(r.model_id)
        self.inputs[IR_RESULT_ID] = r.result_id & 0xFFFF
        self.inputs[IR_VERDICT] = int(r.verdict)
        self.inputs[IR_SCORE_HI], self.inputs[IR_SCORE_LO] = hi, lo
        self.inputs[IR_SCORE_X1000] = _u16(score * 1000) if score is not None else 0
        self.inputs[IR_TIME_MS] = _u16(r.time_ms) if r.time_ms is not None else 0
        self.inputs[IR_MODEL_HI], self.inputs[IR_MODEL_LO] = model >> 16, model & 0xFFFF
        self._set(Status.RESULT_TOGGLE, not self._has(Status.RESULT_TOGGLE))
        self._set(Status.RESULT_VALID, True)

    def _update_counts(self) -> None:
        self.inputs[IR_BUFFERED] = len(self.buffer)
        self._set(Status.BUSY, bool(self.outstanding))

    def _has(self, bit: Status) -> bool:
        return bool(self.inputs[IR_STATUS] & bit)

    def _set(self, bit: Status, on: bool) -> None:
        self.inputs[IR_STATUS] = self.inputs[IR_STATUS] | bit if on else self.inputs[IR_STATUS] & ~bit
