"""Commands to the daemon, typed once: every way in (control socket, CLI, MQTT, Modbus, OPC UA) builds these.

A command is a frozen pydantic model tagged by ``cmd``; ``parse_command`` turns a JSON object into
one (or a ``CommandError`` naming the field and the reason), and a ``Dispatcher`` maps each model
to the one handler that carries it out. A new command (label an inspection, activate a model) is a
model here and a handler in the daemon's table: the control socket and MQTT take it by name, the
CLI and the PLC outputs build it directly.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from ..errors import ApplianceError

#: Largest command accepted from any client, in bytes of JSON: a command is a few fields.
MAX_COMMAND_BYTES = 8 * 1024
#: Deepest bracket nesting accepted (a command is flat; this bounds the recursive parser, not the schema).
MAX_DEPTH = 32
_WHO = Field("operator", min_length=1, max_length=64, description="who asked, for the audit log")
_CAMERA = Field(min_length=1, max_length=64, description="camera id")


class CommandError(ApplianceError):
    """A command that is not run: malformed, unknown, not allowed or refused by the daemon."""


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class StatusCommand(_Command):
    """The daemon's status snapshot."""

    cmd: Literal["status"] = "status"


class ReloadCommand(_Command):
    """Read the config file again; a bad one is refused and the running one stays."""

    cmd: Literal["reload"] = "reload"
    who: str = _WHO


class ThresholdCommand(_Command):
    """Set (a number in [0, 1]) or clear (``None``) the operator threshold of a camera or one of its shifts."""

    cmd: Literal["threshold"] = "threshold"
    camera: str = _CAMERA
    value: float | None = Field(ge=0.0, le=1.0, description="normalised threshold; null clears the override")
    shift: str | None = Field(None, min_length=1, max_length=64, description="a shift name of the schedule")
    who: str = _WHO

    @field_validator("value")
    @classmethod
    def _no_negative_zero(cls, value: float | None) -> float | None:
        return None if value is None else value + 0.0  # -0.0 + 0.0 == 0.0: one zero on every display


class TriggerCommand(_Command):
    """One frame from an externally triggered camera; ``id`` is carried into its result."""

    cmd: Literal["trigger"] = "trigger"
    camera: str = _CAMERA
    id: str | None = Field(None, min_length=1, max_length=64, description="trigger id, carried into the result")


class EnableCommand(_Command):
    """Turn a running camera's inspection on or off (not kept across restarts)."""

    cmd: Literal["enable"] = "enable"
    camera: str = _CAMERA
    enabled: bool
    who: str = _WHO


class BundleCommand(_Command):
    """Hot-swap a camera to the bundle of one of its configured slots."""

    cmd: Literal["bundle"] = "bundle"
    camera: str = _CAMERA
    slot: int | str = Field(description="slot number configured in the camera's 'slots'")
    who: str = _WHO


class LabelCommand(_Command):
    """An operator's label on an inspection: ``good`` (a false reject) or ``defect`` (a confirmed defect).

    A PatchCore false reject goes into the live memory bank at once; every label feeds the
    threshold rule; the label is an audit row and can be undone (``unlabel``).
    """

    cmd: Literal["label"] = "label"
    inspection: str = Field(min_length=1, max_length=64, description="the inspection id")
    camera: str | None = Field(None, min_length=1, max_length=64,
                               description="if given, the inspection must be this camera's (MQTT, Modbus say it)")
    label: Literal["good", "defect"]
    note: str | None = Field(None, max_length=500, description="why, for the audit log")
    who: str = _WHO


class UnlabelCommand(_Command):
    """Undo a label (by its id, or the inspection's active label): what the model learned from it is removed."""

    cmd: Literal["unlabel"] = "unlabel"
    label_id: str | None = Field(None, min_length=1, max_length=64, description="the label's id")
    camera: str | None = Field(None, min_length=1, max_length=64,
                               description="if given, the label must be of this camera's inspection")
    inspection: str | None = Field(None, min_length=1, max_length=64, description="or the inspection id")
    who: str = _WHO


class DriftCommand(_Command):
    """The drift watch of every camera (or one): state, last window's statistics, history."""

    cmd: Literal["drift"] = "drift"
    camera: str | None = Field(None, min_length=1, max_length=64)


class StallCommand(_Command):
    """Fault injection for tests (only with ``APPLIANCE_FAULT_INJECTION=1``): hold a camera's inference."""

    cmd: Literal["stall"] = "stall"
    camera: str = _CAMERA
    seconds: float = Field(30.0, gt=0, le=3600)


Command = Annotated[StatusCommand | ReloadCommand | ThresholdCommand | TriggerCommand | EnableCommand
                    | BundleCommand | LabelCommand | UnlabelCommand | DriftCommand | StallCommand,
                    Field(discriminator="cmd")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Command)
#: Command names, in the order they are documented.
NAMES = ("status", "reload", "threshold", "trigger", "enable", "bundle", "label", "unlabel", "drift")


def load_json(payload: bytes | str, limit: int = MAX_COMMAND_BYTES) -> Any:
    """Parse a command's JSON with bounded size and nesting; ``CommandError`` for anything else.

    Deep nesting is refused before the recursive parser sees it (Python's ``json`` raises
    ``RecursionError``, not ``ValueError``, on thousands of brackets).
    """
    if len(payload) > limit:
        raise CommandError(f"payload is {len(payload)} bytes; a command is at most {limit}")
    text = payload.decode("utf-8") if isinstance(payload, bytes | bytearray) else payload
    brackets, depth = 0, 0
    for ch in text:  # an upper bound of the nesting (brackets inside strings count too): refuse before parsing
        if ch in "[{":
            depth += 1
            brackets = max(brackets, depth)
        elif ch in "]}":
            depth -= 1
    if brackets > MAX_DEPTH:
        raise CommandError(f"payload nests {brackets} levels deep; a command is a flat JSON object")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:  # not reachable after the scan above; kept because it is not a ValueError
        raise CommandError("payload nests too deeply; a command is a flat JSON object") from None
    except ValueError as exc:
        raise CommandError(f"payload is not JSON: {exc}") from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a command may carry")


def parse_command(data: Any) -> Any:
    """A typed command from a JSON object (``{"cmd": "threshold", ...}``), or ``CommandError`` saying why not."""
    if not isinstance(data, dict):
        raise CommandError(f"a command is a JSON object with a 'cmd' string, got {type(data).__name__}")
    name = data.get("cmd")
    if not isinstance(name, str) or name not in (*NAMES, "stall"):
        raise CommandError(f"unknown command {str(name)[:64]!r}; known: {', '.join(NAMES)}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise CommandError(f"invalid {name} command: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """A validation error as ``field: reason; ...`` (the tag of the union left out)."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and x in (*NAMES, "stall"))]
        value = err.get("input")
        shown = "" if isinstance(value, dict) or value is None else f" (got {str(value)[:40]!r})"
        parts.append(f"{'.'.join(loc) or 'payload'}: {err['msg']}{shown}")
    return "; ".join(parts)


Handler = Callable[[Any], Awaitable[Any] | Any]


class Dispatcher:
    """The one table from command type to handler; every way in calls ``dispatch``."""

    def __init__(self, handlers: dict[type[_Command], Handler]) -> None:
        self._handlers = dict(handlers)

    def knows(self, command: Any) -> bool:
        """Whether this daemon has a handler for the command's type."""
        return type(command) in self._handlers

    async def dispatch(self, command: Any) -> Any:
        """Run the command's handler (awaited if it is a coroutine) and return its JSON-ready result."""
        handler = self._handlers.get(type(command))
        if handler is None:
            raise CommandError(f"command {getattr(command, 'cmd', command)!r} is not available here")
        result = handler(command)
        if isinstance(result, Awaitable):
            result = await result
        return result

    async def run(self, data: Any) -> Any:
        """Parse then dispatch a JSON object (the control socket's and MQTT's way in)."""
        return await self.dispatch(parse_command(data))

